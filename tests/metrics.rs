//! Prometheus metrics, in a test binary of their own: the metrics recorder
//! is global to a process, and other tests' servers would count too.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

fn value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_are_exposed_for_prometheus() {
    let metrics_addr = free_addr().to_string();
    let addr = metrics_addr.clone();
    // Sessions on the two network threads: the two sign-ons below go to
    // one each, which `csm_session_threads` shows.
    let server = TestServer::start_with(move |c| {
        c.metrics_addr = Some(addr);
        c.limits.network_threads = 2;
        c.limits.sessions_on_network_threads = true;
    });
    for user in ["alice", "bob"] {
        server.add_user(user, &password_of(user));
    }
    let mut alice = server.login("alice").await;
    read_sign_on(&mut alice, 1, 0).await;
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 2, 0).await;
    server
        .send("alice", "m1", &["bob"], &sample_data("x"))
        .await
        .unwrap();
    server.receive("bob", "m1").await.unwrap();
    let _ = server
        .send("alice", "m2", &["nobody"], &sample_data("x"))
        .await;
    // Gauges of presence are published once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = scrape(&metrics_addr);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(value(&text, "csm_sessions_open"), Some(2.0), "{text}");
    assert_eq!(value(&text, "csm_users_online"), Some(2.0), "{text}");
    assert_eq!(value(&text, "csm_session_threads"), Some(2.0), "{text}");
    assert_eq!(value(&text, "csm_sign_ons_total"), Some(2.0), "{text}");
    assert_eq!(
        value(&text, "csm_messages_stored_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "csm_messages_delivered_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value(&text, "csm_mailbox_messages"), Some(0.0), "{text}");
    assert!(
        value(&text, "csm_fanout_packets_total").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("csm_message_stream_errors_total{code=\"unknown-recipient\"} 1"),
        "{text}"
    );
    assert!(text.contains("csm_flush_seconds"), "{text}");
    assert!(
        value(&text, "csm_disk_free_bytes").is_some_and(|free| free > 0.0),
        "{text}"
    );
    assert!(text.contains("csm_commit_batch_size"), "{text}");
    // Two sessions and three message streams, all through one connector:
    // the first is a full handshake, later ones resume from its tickets.
    let handshakes = |kind: &str| {
        value(
            &text,
            &format!("csm_tls_handshakes_total{{kind=\"{kind}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(handshakes("full") + handshakes("resumed"), 5.0, "{text}");
    assert!(handshakes("full") >= 1.0, "{text}");
    assert!(handshakes("resumed") >= 1.0, "{text}");
}
