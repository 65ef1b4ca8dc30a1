//! Server memory stays flat under hostile input. The server runs as its
//! own process so that its resident set can be read from /proc: after a
//! warm-up (sign-ons, sends and receives, one of 1 MiB), its peak resident
//! set is reset, then rounds of attacks run against it, each round holding
//! 500 silent connections while it floods: a 0x7FFFFFFF frame prefix and
//! 100 MB after it, a 100 MB header line without a newline, and a message
//! claiming a 2 GiB attachment followed by 100 MB, a connection that
//! trickles one byte at a time, and a receiver that never reads the 1 MiB
//! message it asked for. The peak over all rounds must stay within 30 MiB
//! of the baseline (buffering any one flood would take 95 MiB), the server
//! must serve normal users throughout, and once the attackers are gone the
//! resident set must be back near the baseline.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use csm::client::{Connector, SessionClient};
use csm_actors::proto::Packet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FLOOD: usize = 100_000_000;
const ROUNDS: usize = 3;
/// Most the peak resident set may grow over the warmed-up baseline.
const GROWTH_BOUND: u64 = 30 << 20;
/// Most the resident set may stay above the baseline once every attacker
/// is gone.
const AFTER_BOUND: u64 = 12 << 20;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn add_user(dir: &Path, name: &str) {
    let request = csm::admin::protocol::Request::UserAdd {
        name: name.into(),
        password: password_of(name),
    };
    csm::admin::execute(dir, request).unwrap();
}

/// Writes `bytes` of filler after `prefix` until the server stops taking
/// them; returns how many it took.
async fn flood<S: AsyncWriteExt + Unpin>(stream: &mut S, prefix: &[u8]) -> usize {
    if stream.write_all(prefix).await.is_err() {
        return 0;
    }
    let chunk = vec![0x41u8; 1 << 20];
    let mut written = 0;
    let pour = async {
        while written < FLOOD {
            if stream.write_all(&chunk).await.is_err() || stream.flush().await.is_err() {
                break;
            }
            written += chunk.len();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), pour)
        .await
        .expect("the flood ends");
    written
}

/// Message data: `text` and one attachment of `bytes` bytes, all `fill`.
fn one_attachment(text: &str, bytes: usize, fill: u8) -> Vec<u8> {
    use csm_actors::proto::data::{Attachment, MessageData};
    MessageData::new(text, vec![Attachment::new(text, vec![fill; bytes])])
        .encode()
        .unwrap()
}

/// alice sends `data` to `to` as `id`, and the server says `done`.
async fn alice_sends(
    connector: &Connector,
    addr: std::net::SocketAddr,
    to: &str,
    id: &str,
    data: &[u8],
) {
    let recipients = vec![to.to_string()];
    let pw = password_of("alice");
    let outgoing = csm::client::Outgoing {
        username: "alice",
        password: &pw,
        id,
        recipients: &recipients,
        data,
    };
    csm::client::send_message(connector, addr, &outgoing)
        .await
        .unwrap();
}

/// Asks for message `id` of `user` on a message stream, and reads nothing.
async fn ask_to_receive<S: AsyncWriteExt + Unpin>(stream: &mut S, user: &str, id: &str) {
    let request = csm_actors::proto::lines::Header {
        username: user.into(),
        password: password_of(user),
        message_id: id.into(),
        action: csm_actors::proto::lines::Action::Receive,
    }
    .to_lines();
    stream.write_all(&request).await.unwrap();
    stream.flush().await.unwrap();
}

/// Sends alice → bob and waits for bob's notice.
async fn still_serving(
    connector: &Connector,
    addr: std::net::SocketAddr,
    bob: &mut SessionClient,
    id: &str,
    data: &[u8],
) {
    alice_sends(connector, addr, "bob", id, data).await;
    loop {
        match bob.next_packet(WAIT).await.unwrap() {
            Some(Packet::MessageAvailable { id: got, .. }) if got == id => break,
            Some(_) => continue,
            None => panic!("bob heard nothing of {id}"),
        }
    }
    let got = csm::client::receive_message(connector, addr, "bob", &password_of("bob"), id)
        .await
        .unwrap();
    assert_eq!(got.data, data);
}

#[tokio::test]
async fn memory_stays_flat_under_floods_and_silent_connections() {
    let dir = tempfile::tempdir().unwrap();
    for user in ["alice", "bob", "mallory"] {
        add_user(dir.path(), user);
    }
    let server = start_binary(dir.path());
    let pid = server.child.id();
    let connector = Connector::for_data_dir(dir.path()).unwrap();
    let mut bob = SessionClient::login(&connector, server.session, "bob", &password_of("bob"))
        .await
        .unwrap();
    let big = one_attachment("warm-up", 1 << 20, 7);
    for n in 0..10 {
        still_serving(
            &connector,
            server.message,
            &mut bob,
            &format!("warm-{n}"),
            &sample_data("warm"),
        )
        .await;
    }
    still_serving(&connector, server.message, &mut bob, "warm-big", &big).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = status_kib(pid, "VmRSS:") << 10;
    // "5" resets the peak resident set (VmHWM) to the current one.
    let peak_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    assert!(
        peak_reset || status_kib(pid, "VmHWM:") << 10 <= baseline + GROWTH_BOUND,
        "cannot reset the peak and it is already high"
    );

    for round in 0..ROUNDS {
        let mut silent = Vec::new();
        for n in 0..500 {
            let addr = if n % 2 == 0 {
                server.session
            } else {
                server.message
            };
            silent.push(TcpStream::connect(addr).await.unwrap());
        }

        // Signed on, then a frame prefix of 0x7FFFFFFF.
        let mut mallory = connector.connect(server.session).await.unwrap();
        let mut prefix = Packet::Login {
            username: "mallory".into(),
            password: password_of("mallory"),
        }
        .to_frame();
        prefix.extend_from_slice(&[0x7F, 0xFF, 0xFF, 0xFF]);
        let taken = flood(&mut mallory, &prefix).await;
        assert!(taken < FLOOD, "a refused frame was read on ({taken} bytes)");

        let mut stream = connector.connect(server.message).await.unwrap();
        let taken = flood(&mut stream, b"mallory").await;
        assert!(
            taken < FLOOD,
            "a line without end was read on ({taken} bytes)"
        );
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;

        let mut stream = connector.connect(server.message).await.unwrap();
        let mut claim = send_request("mallory", &format!("claim-{round}"), &["bob"]);
        claim.extend_from_slice(&[0, 0]); // empty text
        claim.extend_from_slice(&1i32.to_be_bytes());
        claim.extend_from_slice(&[0, 1, b'a']);
        claim.extend_from_slice(&i32::MAX.to_be_bytes());
        let taken = flood(&mut stream, &claim).await;
        assert!(
            taken < FLOOD,
            "a 2 GiB attachment was read on ({taken} bytes)"
        );

        // One byte every 100 ms on a session frame and on a header line.
        let mut tricklers = Vec::new();
        for addr in [server.session, server.message] {
            let connector = connector.clone();
            tricklers.push(tokio::spawn(async move {
                let Ok(mut stream) = connector.connect(addr).await else {
                    return;
                };
                for _ in 0..20 {
                    if stream.write_all(b"m").await.is_err() || stream.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }

        // A receiver that asks for 1 MiB and never reads it.
        let id = format!("unread-{round}");
        alice_sends(&connector, server.message, "mallory", &id, &big).await;
        let tcp = TcpStream::connect(server.message).await.unwrap();
        let mut never_reads = connector.handshake(tcp).await.unwrap();
        ask_to_receive(&mut never_reads, "mallory", &id).await;

        still_serving(
            &connector,
            server.message,
            &mut bob,
            &format!("round-{round}"),
            &sample_data("between floods"),
        )
        .await;
        for trickler in tricklers {
            let _ = trickler.await;
        }
        drop(never_reads);
        drop(silent);
        let peak = status_kib(pid, "VmHWM:") << 10;
        assert!(server_alive(pid));
        eprintln!(
            "round {round}: baseline {} KiB, peak {} KiB, now {} KiB",
            baseline >> 10,
            peak >> 10,
            status_kib(pid, "VmRSS:")
        );
        assert!(
            peak <= baseline + GROWTH_BOUND,
            "round {round}: peak resident set {peak} bytes over a baseline of {baseline}"
        );
    }
    // The attackers are gone: the resident set comes back near the start.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = status_kib(pid, "VmRSS:") << 10;
    eprintln!(
        "after: baseline {} KiB, now {} KiB",
        baseline >> 10,
        after >> 10
    );
    assert!(
        after <= baseline + AFTER_BOUND,
        "resident set {after} bytes after the attacks, baseline {baseline}"
    );
    server.kill();
}

fn server_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Receivers that ask for a large message and do not read it cost the
/// server a buffer each, not a copy of the message: large data is
/// streamed from its file.
#[tokio::test]
async fn slow_receivers_of_a_large_message_hold_no_copy_of_it() {
    const RECEIVERS: usize = 8;
    const BOUND: u64 = 40 << 20;
    let dir = tempfile::tempdir().unwrap();
    for user in ["alice", "bob"] {
        add_user(dir.path(), user);
    }
    let server = start_binary(dir.path());
    let pid = server.child.id();
    let connector = Connector::for_data_dir(dir.path()).unwrap();
    let large = one_attachment("large", 15 << 20, 3);
    alice_sends(&connector, server.message, "bob", "large", &large).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = status_kib(pid, "VmRSS:") << 10;
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");

    let mut receivers = Vec::new();
    for _ in 0..RECEIVERS {
        let mut stream = connector.connect(server.message).await.unwrap();
        ask_to_receive(&mut stream, "bob", "large").await;
        receivers.push(stream);
    }
    // Each stream has filled what the kernel buffers and waits on its peer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = status_kib(pid, "VmHWM:") << 10;
    eprintln!(
        "{RECEIVERS} unread receives of {} MiB: baseline {} KiB, peak {} KiB",
        large.len() >> 20,
        baseline >> 10,
        peak >> 10
    );
    assert!(
        peak <= baseline + BOUND,
        "peak resident set {peak} bytes over a baseline of {baseline}: \
         the receives hold copies of the message"
    );
    // Each of them still gets the whole message when it reads.
    let mut first = receivers.swap_remove(0);
    drop(receivers);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    // The answer's lines, then the data.
    while got.len() < large.len() || !got.ends_with(&large) {
        assert!(got.len() < large.len() + 4096, "the message comes whole");
        let n = tokio::time::timeout(WAIT, first.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the stream ended after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    server.kill();
}
