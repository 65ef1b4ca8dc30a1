//! `csm admin user add|list`, live through the admin socket and offline on
//! the store, and the `csm` binary's own start, sign-on and signal handling.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use csm::admin::protocol::{FailureKind, Reply, Request};
use csm_actors::proto::{Packet, Status};

fn csm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_csm"))
}

fn admin(dir: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = csm();
    cmd.arg("admin").arg("--data-dir").arg(dir).args(args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn csm admin");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn offline_user_add_then_live_server_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = admin(
        dir.path(),
        &["user", "add", "alice", "--password-stdin"],
        Some("pw-alice-ü\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = admin(dir.path(), &["user", "list"], None);
    assert_eq!(code, 0);
    assert!(out.contains("alice"), "{out}");
    assert!(out.contains("no server running"), "{out}");
    let (code, _, err) = admin(
        dir.path(),
        &["user", "add", "alice", "--password-stdin"],
        Some("x\n"),
    );
    assert_eq!(code, 1, "a second add is refused: {err}");
    assert!(err.contains("already exists"), "{err}");

    let server = TestServer::start_in(dir.path(), |_| {});
    let mut alice = server.login("alice").await;
    read_sign_on(&mut alice, 1, 0).await;
}

#[tokio::test]
async fn live_user_add_is_announced_and_listed_with_presence() {
    let server = TestServer::start();
    server.add_user("alice", &password_of("alice"));
    let mut alice = server.login("alice").await;
    read_sign_on(&mut alice, 1, 0).await;
    alice.send(&Packet::Idle { idle_secs: 90 }).await.unwrap();

    let (code, out, err) = admin(
        &server.data_dir,
        &["user", "add", "bob", "--password-stdin"],
        Some("pw-bob-ü\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        next(&mut alice).await,
        Packet::AddUser {
            username: "bob".into()
        }
    );
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 2, 0).await;

    let (code, out, _) = admin(&server.data_dir, &["--json", "user", "list"], None);
    assert_eq!(code, 0);
    let reply: Reply = serde_json::from_str(&out).expect("JSON reply");
    let Reply::Users { live: true, users } = reply else {
        panic!("{out}")
    };
    let alice_row = users.iter().find(|u| u.name == "alice").unwrap();
    assert_eq!(alice_row.status, Some(Status::Idle));
    assert!(alice_row.idle_secs.unwrap() >= 90);
    assert_eq!(alice_row.sessions, 1);
    let (_, table, _) = admin(&server.data_dir, &["user", "list"], None);
    assert!(table.lines().next().unwrap().starts_with("USER"), "{table}");
    assert!(table.contains("IDLE"), "{table}");
}

#[test]
fn admin_socket_is_owner_only() {
    let server = TestServer::start();
    let mode = std::fs::metadata(server.data_dir.join("admin.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn bad_names_and_usage_errors() {
    let server = TestServer::start();
    let (code, _, err) = admin(
        &server.data_dir,
        &["user", "add", "no spaces", "--password-stdin"],
        Some("pw\n"),
    );
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = admin(&server.data_dir, &["user", "frobnicate"], None);
    assert_eq!(code, 2, "usage errors exit 2");
}

#[test]
fn locked_store_without_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _held = csm_actors::store::SledStore::open(&csm::config::store_dir(dir.path())).unwrap();
    let result = csm::admin::execute(dir.path(), Request::UserList);
    let failure = result.expect_err("must fail");
    assert_eq!(failure.kind, FailureKind::Internal);
    assert!(failure.message.contains("locked"), "{}", failure.message);
    assert!(
        failure.message.contains("admin.sock"),
        "{}",
        failure.message
    );
}

/// The real binary: starts on a fresh directory with a self-signed
/// certificate, serves a client, and exits 0 on SIGTERM, and on SIGINT the
/// second time; restarts reuse the certificate.
#[tokio::test]
async fn binary_serves_and_stops_on_sigterm_or_sigint_and_reuses_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut fingerprints = Vec::new();
    for round in 0..2 {
        let (session_addr, message_addr) = (free_addr(), free_addr());
        let child = csm()
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "--session-addr",
                &session_addr.to_string(),
                "--message-addr",
                &message_addr.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let started = Instant::now();
        // The admin socket appears once the store is open and the actors run.
        while !dir.path().join("admin.sock").exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if round == 0 {
            let (code, _, err) = admin(
                dir.path(),
                &["user", "add", "alice", "--password-stdin"],
                Some("pw-alice-ü\n"),
            );
            assert_eq!(code, 0, "{err}");
        }
        let connector = csm::client::Connector::for_data_dir(dir.path()).unwrap();
        let alice =
            csm::client::SessionClient::login(&connector, session_addr, "alice", "pw-alice-ü")
                .await
                .unwrap();
        alice.close().await;
        let (signal, name) = [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")][round];
        unsafe { libc::kill(child.0.id() as i32, signal) };
        let status = child.0.wait().unwrap();
        assert_eq!(status.code(), Some(0), "graceful exit on {name}");
        let mut log = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut log).unwrap();
        assert!(
            !dir.path().join("admin.sock").exists(),
            "socket removed at shutdown"
        );
        let fingerprint = log
            .lines()
            .find_map(|l| l.split("fingerprint ").nth(1))
            .expect("fingerprint logged")
            .to_owned();
        assert_eq!(fingerprint.len(), 32 * 3 - 1);
        fingerprints.push(fingerprint);
    }
    assert_eq!(
        fingerprints[0], fingerprints[1],
        "the certificate is reused"
    );
}

/// Kills the server if the test fails half-way, so no orphan keeps running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
