//! A full disk, on a small tmpfs that each test mounts. With the disk
//! reserve on (the default), a send that would eat into it is answered
//! `unavailable` before anything is written, the server keeps serving
//! sign-ons, receives and removals, and takes sends again as soon as space
//! returns, all in the same process. With the reserve off, the write itself
//! fails: the send is answered `unavailable`, never `done`; the server goes
//! on with sign-ons and receives while sends stay refused, and once space
//! is back it reopens the store in place, with its sessions still signed
//! on and everything acknowledged kept. Needs root to mount; where that is
//! not allowed the tests say so and do nothing.

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use csm::client::{receive_message, send_message, ClientError, Connector, Outgoing, Received};
use csm_actors::proto::data::{Attachment, MessageData};
use csm_actors::proto::Packet;

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).ok()?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .ok()?;
    status.success().then(|| Mount(at.to_owned()))
}

fn big(n: usize) -> Vec<u8> {
    MessageData::new(
        &format!("filler {n}"),
        vec![Attachment::new("blob", vec![n as u8; 1 << 20])],
    )
    .encode()
    .unwrap()
}

/// 16 KiB of data: small enough to be kept inside the database.
fn small(n: usize) -> Vec<u8> {
    MessageData::new(
        &format!("small {n}"),
        vec![Attachment::new("blob", vec![n as u8; 16 * 1024])],
    )
    .encode()
    .unwrap()
}

/// A 64 MiB tmpfs holding `ballast` (space to give back later) and a data
/// directory with alice and bob.
struct SmallDisk {
    _outer: tempfile::TempDir,
    _mount: Mount,
    ballast: PathBuf,
    data_dir: PathBuf,
    config: PathBuf,
}

impl SmallDisk {
    fn new(disk_reserve_bytes: u64) -> Option<SmallDisk> {
        let outer = tempfile::tempdir().unwrap();
        let mnt = outer.path().join("small");
        let mount = mount_tmpfs(&mnt, "64m")?;
        let ballast = mnt.join("ballast");
        std::fs::write(&ballast, vec![0u8; 24 << 20]).unwrap();
        let config = outer.path().join("csm.toml");
        std::fs::write(
            &config,
            format!("[limits]\ndisk_reserve_bytes = {disk_reserve_bytes}\n"),
        )
        .unwrap();
        let data_dir = mnt.join("data");
        for user in ["alice", "bob"] {
            let request = csm::admin::protocol::Request::UserAdd {
                name: user.into(),
                password: password_of(user),
            };
            csm::admin::execute(&data_dir, request).unwrap();
        }
        Some(SmallDisk {
            _outer: outer,
            _mount: mount,
            ballast,
            data_dir,
            config,
        })
    }

    fn start(&self) -> BinaryServer {
        start_binary_with(
            &self.data_dir,
            &[OsStr::new("--config"), self.config.as_os_str()],
        )
    }

    fn connector(&self) -> Connector {
        Connector::for_data_dir(&self.data_dir).unwrap()
    }
}

async fn send(
    connector: &Connector,
    addr: SocketAddr,
    id: &str,
    data: &[u8],
) -> Result<(), ClientError> {
    let recipients = vec!["bob".to_string()];
    let pw = password_of("alice");
    let outgoing = Outgoing {
        username: "alice",
        password: &pw,
        id,
        recipients: &recipients,
        data,
    };
    send_message(connector, addr, &outgoing).await
}

async fn receive(
    connector: &Connector,
    addr: SocketAddr,
    id: &str,
) -> Result<Received, ClientError> {
    receive_message(connector, addr, "bob", &password_of("bob"), id).await
}

/// Sends 1 MiB messages `fill-N` until one is refused; returns how many
/// were acknowledged and the refusal.
async fn fill(
    connector: &Connector,
    addr: SocketAddr,
) -> (usize, csm_actors::proto::lines::StreamError) {
    for n in 0..200 {
        match send(connector, addr, &format!("fill-{n}"), &big(n)).await {
            Ok(()) => continue,
            Err(ClientError::Refused(e)) => return (n, e),
            Err(e) => panic!("a full disk must be answered with an error line: {e}"),
        }
    }
    panic!("200 MiB went onto a 64 MiB disk");
}

/// Receives `PREFIX-N` for each N and checks its data is `data(N)`: each
/// was acknowledged, so it is kept.
async fn assert_kept(
    connector: &Connector,
    addr: SocketAddr,
    prefix: &str,
    numbers: impl IntoIterator<Item = usize>,
    data: fn(usize) -> Vec<u8>,
) {
    for n in numbers {
        let id = format!("{prefix}-{n}");
        let got = receive(connector, addr, &id).await;
        assert_eq!(got.unwrap().data, data(n), "{id} was acknowledged");
    }
}

fn assert_no_such_message(result: Result<Received, ClientError>, why: &str) {
    match result {
        Err(ClientError::Refused(e)) => assert!(e.text.contains("no such message"), "{why}: {e}"),
        Ok(received) => panic!("{why}: {} is still there", received.id),
        Err(e) => panic!("{why}: {e}"),
    }
}

#[tokio::test]
async fn a_full_disk_refuses_sends_keeps_receiving_and_recovers_in_place() {
    let Some(disk) = SmallDisk::new(8 << 20) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let mut server = disk.start();
    let connector = disk.connector();
    let addr = server.message;
    let first = sample_data("before the disk filled");
    send(&connector, addr, "first", &first).await.unwrap();

    let (filled, error) = fill(&connector, addr).await;
    eprintln!("disk low after {filled} messages of 1 MiB: {error}");
    assert!(filled >= 10, "the disk took only {filled} messages");
    assert_eq!(error.code.as_str(), "unavailable", "{error}");
    assert!(error.text.contains("low on disk space"), "{error}");
    // Still refused, and the retry of the refused one is refused too.
    for _ in 0..3 {
        match send(&connector, addr, &format!("fill-{filled}"), &big(filled)).await {
            Err(ClientError::Refused(e)) => assert_eq!(e.code.as_str(), "unavailable"),
            other => panic!("sends stay refused while the disk is low: {other:?}"),
        }
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server keeps running on a low disk"
    );

    // Sign-ons work and list every acknowledged message.
    let mut bob =
        csm::client::SessionClient::login(&connector, server.session, "bob", &password_of("bob"))
            .await
            .unwrap();
    let mut waiting = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting.len() < filled + 1 {
        assert!(Instant::now() < deadline, "sign-on listed {waiting:?}");
        if let Some(Packet::MessageAvailable { id, .. }) =
            bob.next_packet(Duration::from_secs(5)).await.unwrap()
        {
            waiting.push(id);
        }
    }
    assert_eq!(waiting[0], "first");
    assert_eq!(waiting[filled], format!("fill-{}", filled - 1));

    // Receives and their removals work on the low disk.
    assert_eq!(
        receive(&connector, addr, "first").await.unwrap().data,
        first
    );
    assert_no_such_message(
        receive(&connector, addr, "first").await,
        "received and removed",
    );
    for n in 0..3 {
        assert_eq!(
            receive(&connector, addr, &format!("fill-{n}"))
                .await
                .unwrap()
                .data,
            big(n)
        );
    }

    // Space returns: sends are taken again, in the same process.
    std::fs::remove_file(&disk.ballast).unwrap();
    send(&connector, addr, "after", &sample_data("after"))
        .await
        .unwrap();
    send(&connector, addr, &format!("fill-{filled}"), &big(filled))
        .await
        .unwrap();
    let notice = bob.next_packet(Duration::from_secs(5)).await.unwrap();
    assert!(
        matches!(&notice, Some(Packet::MessageAvailable { id, .. }) if id == "after"),
        "{notice:?}"
    );
    bob.close().await;
    assert!(server.child.try_wait().unwrap().is_none());

    // Everything acknowledged and not received is still there after a
    // restart; what was received stays gone.
    server.kill();
    let server = disk.start();
    let addr = server.message;
    assert_kept(&connector, addr, "fill", 3..=filled, big).await;
    assert_eq!(
        receive(&connector, addr, "after").await.unwrap().data,
        sample_data("after")
    );
    assert_no_such_message(
        receive(&connector, addr, "fill-0").await,
        "received before the restart",
    );
    server.kill();
}

#[tokio::test]
async fn without_the_reserve_a_failed_write_refuses_sends_serves_on_and_reopens_in_place() {
    let Some(disk) = SmallDisk::new(0) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let server = disk.start();
    let connector = disk.connector();
    let addr = server.message;
    let first = sample_data("before the disk filled");
    send(&connector, addr, "first", &first).await.unwrap();

    // Large data goes to a file of its own; a file that does not fit is
    // refused for that send only, and the server goes on.
    let (filled, error) = fill(&connector, addr).await;
    eprintln!("disk full after {filled} messages of 1 MiB: {error}");
    assert_eq!(error.code.as_str(), "unavailable", "{error}");
    assert!(error.text.contains("No space left"), "{error}");
    let mut child = server.child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "a failed file write is not fatal"
    );
    assert_eq!(
        receive(&connector, addr, "fill-0").await.unwrap().data,
        big(0)
    );

    // Small data goes into the database, which takes no more writes after
    // a failed one (sled 0.34.7 stays failed until reopened).
    let mut small_sends = 0;
    let small_refused = loop {
        let data = small(small_sends);
        match send(&connector, addr, &format!("small-{small_sends}"), &data).await {
            Ok(()) => small_sends += 1,
            Err(ClientError::Refused(e)) => break e,
            Err(e) => panic!("a full disk must be answered with an error line: {e}"),
        }
        assert!(small_sends < 10_000, "small sends never failed");
    };
    eprintln!("database full after {small_sends} more sends of 16 KiB: {small_refused}");
    assert_eq!(
        small_refused.code.as_str(),
        "unavailable",
        "{small_refused}"
    );

    // The server serves on: sends are refused with the reason, sign-ons
    // list every acknowledged message, and messages can be read.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server serves on while the disk is full"
    );
    match send(&connector, addr, "while-failed", &small(0)).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code.as_str(), "unavailable", "{e}");
            assert!(e.text.contains("the store failed a write"), "{e}");
        }
        other => panic!("sends are refused while the store is failed: {other:?}"),
    }
    let mut bob =
        csm::client::SessionClient::login(&connector, server.session, "bob", &password_of("bob"))
            .await
            .unwrap();
    let expected = 1 + (filled - 1) + small_sends;
    let mut waiting = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting.len() < expected {
        assert!(Instant::now() < deadline, "sign-on listed {waiting:?}");
        if let Some(Packet::MessageAvailable { id, .. }) =
            bob.next_packet(Duration::from_secs(5)).await.unwrap()
        {
            waiting.push(id);
        }
    }
    assert_eq!(waiting[0], "first");
    assert!(!waiting.contains(&"fill-0".to_string()), "{waiting:?}");
    // A receive reads the message; its removal needs a write, so it is
    // refused and the message stays.
    match receive(&connector, addr, "first").await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code.as_str(), "unavailable", "{e}");
            assert!(e.text.contains("the message stays"), "{e}");
        }
        other => panic!("the removal cannot be written: {other:?}"),
    }

    // Space returns: the store is reopened in place. The same process
    // takes sends again, and bob, signed on throughout, hears of them.
    std::fs::remove_file(&disk.ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match send(&connector, addr, "after", &sample_data("after")).await {
            Ok(()) => break,
            Err(ClientError::Refused(e)) if e.code.as_str() == "unavailable" => {
                assert!(
                    Instant::now() < deadline,
                    "sends must be taken again once space is back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("sends are refused or taken, nothing else: {e}"),
        }
    }
    let notice = bob.next_packet(Duration::from_secs(5)).await.unwrap();
    assert!(
        matches!(&notice, Some(Packet::MessageAvailable { id, .. }) if id == "after"),
        "bob's session lives on through the reopen and is told: {notice:?}"
    );
    assert_eq!(
        receive(&connector, addr, "after").await.unwrap().data,
        sample_data("after")
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the store is reopened in place, without a restart"
    );

    // Everything acknowledged is there, in the same process; the removal
    // that could not be written is taken now; the refused sends are not
    // stored.
    assert_eq!(
        receive(&connector, addr, "first").await.unwrap().data,
        first,
        "acknowledged before the disk filled"
    );
    assert_no_such_message(receive(&connector, addr, "first").await, "received");
    assert_kept(&connector, addr, "fill", 1..filled, big).await;
    assert_kept(&connector, addr, "small", 0..small_sends, small).await;
    assert_no_such_message(receive(&connector, addr, "fill-0").await, "received before");
    assert_no_such_message(
        receive(&connector, addr, &format!("fill-{filled}")).await,
        "the refused send must not be stored",
    );
    assert_no_such_message(
        receive(&connector, addr, &format!("small-{small_sends}")).await,
        "the refused send must not be stored",
    );
    send(&connector, addr, "kept", &sample_data("kept"))
        .await
        .unwrap();
    bob.close().await;

    // The reopened store is as durable as any: after a kill, the receives
    // stay done and the one message left is there.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let server = disk.start();
    let addr = server.message;
    for id in ["first", "after", "fill-1", "small-0"] {
        assert_no_such_message(
            receive(&connector, addr, id).await,
            "received before the kill",
        );
    }
    assert_eq!(
        receive(&connector, addr, "kept").await.unwrap().data,
        sample_data("kept")
    );
    server.kill();
}
