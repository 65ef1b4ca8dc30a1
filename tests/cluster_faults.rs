//! Faults of a cluster on PostgreSQL: a node killed with SIGKILL under
//! load (nothing it acknowledged is lost, its users go offline elsewhere
//! within the lease), and the database restarted under load (sends are
//! refused `unavailable`, never answered `done` without a commit, and the
//! nodes recover without a restart of their own).

#![cfg(csm_postgres)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::*;
use csm::client::{send_message, ClientError, Connector, Outgoing, SessionClient};
use csm_actors::proto::lines::ErrorCode;
use csm_actors::proto::{Packet, Status};

const LEASE_SECS: u64 = 2;

fn database_of(url: &str) -> String {
    url.rsplit('/').next().expect("a name").to_owned()
}

/// What a stream of sends was answered.
#[derive(Default)]
struct Ledger {
    done: Vec<String>,
    refused: Vec<ErrorCode>,
    failed: usize,
}

/// Sends alice → bob with fresh ids until `stop` is set.
async fn send_until(
    connector: Connector,
    addr: std::net::SocketAddr,
    prefix: &str,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut k = 0;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let id = format!("{prefix}-{k}");
        k += 1;
        let data = sample_data(&id);
        let recipients = vec!["bob".to_string()];
        let sent = send_message(
            &connector,
            addr,
            &Outgoing {
                username: "alice",
                password: &password_of("alice"),
                id: &id,
                recipients: &recipients,
                data: &data,
            },
        )
        .await;
        {
            let mut ledger = ledger.lock().unwrap();
            match sent {
                Ok(()) => ledger.done.push(id),
                Err(ClientError::Refused(e)) => ledger.refused.push(e.code),
                Err(_) => ledger.failed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn expect_status(client: &mut SessionClient, user: &str, status: Status) {
    loop {
        match next(client).await {
            Packet::StatusChange {
                username,
                status: s,
                ..
            } if username == user && s == status => return,
            Packet::StatusChange { .. } | Packet::MessageAvailable { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_killed_node_loses_nothing_it_acknowledged_and_its_users_go_offline() {
    let b = TestServer::start_on(Backend::Postgres, |c| c.store.lease_secs = LEASE_SECS);
    let url = b.store_url.clone().unwrap();
    for user in ["alice", "bob"] {
        b.add_user(user, &password_of(user));
    }
    let dir_a = tempfile::tempdir().unwrap();
    let config = dir_a.path().join("csm.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{url}\"\nnode = \"node-a\"\nlease_secs = {LEASE_SECS}\n"
        ),
    )
    .unwrap();
    let node_a = start_binary_with(
        dir_a.path(),
        &[std::ffi::OsStr::new("--config"), config.as_os_str()],
    );
    let connector_a = Connector::for_data_dir(dir_a.path()).unwrap();

    let mut bob = b.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;
    let mut alice =
        SessionClient::login(&connector_a, node_a.session, "alice", &password_of("alice"))
            .await
            .unwrap();
    read_sign_on(&mut alice, 1, 0).await;
    expect_status(&mut bob, "alice", Status::Online).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(send_until(
        connector_a.clone(),
        node_a.message,
        "k",
        ledger.clone(),
        stop.clone(),
    ));
    while ledger.lock().unwrap().done.len() < 30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node_a.kill();
    let killed = Instant::now();
    expect_status(&mut bob, "alice", Status::Offline).await;
    let offline_after = killed.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Release);
    load.await.unwrap();
    eprintln!("alice shown offline {offline_after:?} after the kill (lease {LEASE_SECS} s)");
    // Expired at most a lease after its last renewal, seen at the next
    // check (every third of a lease) of the surviving node.
    assert!(
        offline_after < Duration::from_secs(2 * LEASE_SECS + 2),
        "{offline_after:?}"
    );

    let done = std::mem::take(&mut ledger.lock().unwrap().done);
    assert!(done.len() >= 30);
    for id in &done {
        let received = b
            .receive("bob", id)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
        assert_eq!(received.data, sample_data(id));
    }
}

#[tokio::test]
async fn a_database_restart_refuses_sends_and_the_nodes_recover_by_themselves() {
    let pg = Arc::new(Postgres::start());
    let dir_a = tempfile::tempdir().unwrap();
    let url = pg.database_for(dir_a.path());
    let with_url = |url: String| {
        move |c: &mut csm::config::Config| {
            c.store.backend = csm::config::Backend::Postgres;
            c.store.url = Some(url);
            c.store.lease_secs = LEASE_SECS;
        }
    };
    // Both nodes on this test's own cluster, which it stops and restarts.
    let a = TestServer::start_in_on(Backend::Sled, dir_a.path(), with_url(url.clone()));
    let b = TestServer::start_on(Backend::Sled, with_url(url.clone()));
    for user in ["alice", "bob", "carol"] {
        a.add_user(user, &password_of(user));
    }
    let mut bob = b.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(send_until(
        a.connector.clone(),
        a.message_addr,
        "d",
        ledger.clone(),
        stop.clone(),
    ));
    while ledger.lock().unwrap().done.len() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pg_stop = pg.clone();
    tokio::task::spawn_blocking(move || pg_stop.stop())
        .await
        .unwrap();
    let done_before_outage = ledger.lock().unwrap().done.len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let ledger = ledger.lock().unwrap();
        assert!(
            ledger.done.len() <= done_before_outage + 1,
            "no send is done while the database is down ({} then {})",
            done_before_outage,
            ledger.done.len()
        );
        assert!(!ledger.refused.is_empty(), "sends were refused while down");
    }
    let pg_start = pg.clone();
    tokio::task::spawn_blocking(move || pg_start.restart())
        .await
        .unwrap();
    let restarted = Instant::now();
    let done_at_restart = ledger.lock().unwrap().done.len();
    while ledger.lock().unwrap().done.len() < done_at_restart + 20 {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "sends did not resume after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    load.await.unwrap();
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    eprintln!(
        "{} done, {} refused, {} connections failed; sends resumed {:?} after the restart",
        ledger.done.len(),
        ledger.refused.len(),
        ledger.failed,
        restarted.elapsed()
    );
    assert!(
        ledger
            .refused
            .iter()
            .all(|code| *code == ErrorCode::Unavailable),
        "only `unavailable` while the database is down: {:?}",
        ledger.refused
    );

    // Every `done` was a commit.
    let db = database_of(&url);
    for id in &ledger.done {
        assert_eq!(
            pg.sql(
                &db,
                &format!("SELECT count(*) FROM messages WHERE id = '{id}'::bytea")
            ),
            "1",
            "acknowledged {id} is stored"
        );
    }
    // B's listener reconnected: a new message and a new sign-on at A reach
    // bob at B, and bob hears of every message stored while B was not
    // listening (by its rescan).
    a.send("alice", "after", &["bob"], &sample_data("after"))
        .await
        .unwrap();
    let mut carol = a.login("carol").await;
    read_sign_on(&mut carol, 1, 0).await;
    let mut announced = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut carol_seen = false;
    while !(carol_seen && announced.contains("after")) {
        assert!(Instant::now() < deadline, "B did not recover its hints");
        match bob.next_packet(Duration::from_secs(20)).await {
            Ok(Some(Packet::MessageAvailable { id, .. })) => {
                announced.insert(id);
            }
            Ok(Some(Packet::StatusChange {
                username, status, ..
            })) if username == "carol" && status == Status::Online => carol_seen = true,
            Ok(Some(_)) => {}
            other => panic!("bob's session: {other:?}"),
        }
    }
    for id in &ledger.done {
        assert!(announced.contains(id), "bob never heard of {id}");
    }
}

#[tokio::test]
async fn a_send_the_store_does_not_confirm_in_time_is_unavailable_and_safe_to_retry() {
    let server = TestServer::start_on(Backend::Postgres, |c| c.timeouts.exchange_secs = 2);
    for user in ["alice", "bob"] {
        server.add_user(user, &password_of(user));
    }
    let db = database_of(server.store_url.as_deref().unwrap());
    // Another session holds bob's row, so the storing transaction waits.
    let holder = std::thread::spawn(move || {
        Postgres::shared().sql(
            &db,
            "BEGIN; SELECT name FROM users WHERE name = 'bob' FOR UPDATE; \
             SELECT pg_sleep(4); COMMIT;",
        )
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let data = sample_data("slow");
    match server.send("alice", "slow-1", &["bob"], &data).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.text.contains("same id"), "{e}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    holder.join().unwrap();
    // The retry is done, and one copy waits.
    server
        .send("alice", "slow-1", &["bob"], &data)
        .await
        .unwrap();
    let mut bob = server.login("bob").await;
    let (_, _, waiting) = read_sign_on(&mut bob, 1, 1).await;
    assert_eq!(waiting.len(), 1);
    assert_eq!(server.receive("bob", "slow-1").await.unwrap().data, data);
}
