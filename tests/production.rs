//! Running it for real: Prometheus metrics, systemd readiness, and backups
//! taken from a running server that restore into a working data directory.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use csm::admin::protocol::{Reply, Request};

#[test]
fn the_binary_tells_systemd_when_it_is_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_csm"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--session-addr",
            &free_addr().to_string(),
            "--message-addr",
            &free_addr().to_string(),
        ])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = socket.recv(&mut buf).unwrap();
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = child.wait().unwrap();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn backup_of_a_running_server_restores() {
    let server = TestServer::start();
    for user in ["alice", "bob"] {
        server.add_user(user, &password_of(user));
    }
    let data = sample_data("kept in the backup");
    server.send("alice", "b1", &["bob"], &data).await.unwrap();
    let backups = tempfile::tempdir().unwrap();
    let target = backups.path().join("csm-backup");
    let request = Request::Backup {
        dir: target.display().to_string(),
    };
    match csm::admin::execute(&server.data_dir, request) {
        Ok(Reply::Done { .. }) => {}
        other => panic!("backup: {other:?}"),
    }
    // Written after the backup: not in it.
    server.send("alice", "b2", &["bob"], &data).await.unwrap();
    let again = csm::admin::execute(
        &server.data_dir,
        Request::Backup {
            dir: target.display().to_string(),
        },
    );
    assert!(again.is_err(), "an existing directory is refused");
    let relative = csm::admin::execute(
        &server.data_dir,
        Request::Backup {
            dir: "relative".into(),
        },
    );
    assert!(relative.is_err(), "a relative path is refused");
    server.stop();

    let restored = TestServer::start_in(&target, |_| {});
    let mut bob = restored.login("bob").await;
    let (users, _, messages) = read_sign_on(&mut bob, 1, 1).await;
    assert_eq!(users, vec!["alice", "bob"]);
    assert_eq!(messages[0].0, "b1");
    assert_eq!(restored.receive("bob", "b1").await.unwrap().data, data);
    assert!(restored.receive("bob", "b2").await.is_err());
}

/// A backup copies the records between two mailbox writes, then copies
/// the message files while sends go on: a send made while the files are
/// being copied is answered before the backup is done (it is not in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_go_on_while_a_backup_copies_the_message_files() {
    let server = TestServer::start();
    for user in ["alice", "bob", "carol"] {
        server.add_user(user, &password_of(user));
    }
    const LARGE: usize = 24;
    let large = |n: usize| {
        csm_actors::proto::MessageData::new(
            "large",
            vec![csm_actors::proto::Attachment::new(
                "a",
                vec![n as u8; 2 << 20],
            )],
        )
        .encode()
        .unwrap()
    };
    for n in 0..LARGE {
        let id = format!("large{n}");
        server
            .send("alice", &id, &["bob"], &large(n))
            .await
            .unwrap();
    }
    let small = sample_data("sent during the backup");
    server
        .send("alice", "warm", &["carol"], &small)
        .await
        .unwrap();

    let backups = tempfile::tempdir().unwrap();
    let target = backups.path().join("csm-backup");
    let copied_files = csm::config::store_dir(&target).join("spool");
    let backup = tokio::task::spawn_blocking({
        let data_dir = server.data_dir.clone();
        let dir = target.display().to_string();
        move || csm::admin::execute(&data_dir, Request::Backup { dir })
    });
    // The records are copied once the backup's spool directory exists.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !copied_files.exists() {
        assert!(Instant::now() < deadline, "the backup never began");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server
        .send("alice", "during", &["carol"], &small)
        .await
        .unwrap();
    assert!(
        !backup.is_finished(),
        "the send waited for the backup to copy {LARGE} files of 2 MiB"
    );
    match backup.await.unwrap() {
        Ok(Reply::Done { .. }) => {}
        other => panic!("backup: {other:?}"),
    }
    server.stop();

    let restored = TestServer::start_in(&target, |_| {});
    for n in [0, LARGE - 1] {
        let got = restored.receive("bob", &format!("large{n}")).await.unwrap();
        assert!(got.data == large(n), "large{n} came back changed");
    }
    assert!(restored.receive("carol", "warm").await.is_ok());
    assert!(
        restored.receive("carol", "during").await.is_err(),
        "a send after the records were copied is in the backup"
    );
}

/// A burst of connects larger than the 128 that the standard library and
/// tokio queue waits in the kernel's backlog for the server to accept it,
/// rather than being dropped and retried a second later. The server is
/// stopped (SIGSTOP) while the burst arrives, so nothing is accepted: only
/// the backlog holds the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_waits_in_the_backlog() {
    // The kernel holds at most net.core.somaxconn (4,096 on current
    // kernels) whatever the server asks for.
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(4096);
    let burst = somaxconn.min(500);
    if burst <= 128 {
        eprintln!("net.core.somaxconn is {somaxconn}: this machine cannot show a larger backlog");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_binary(dir.path());
    let pid = server.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let connects = (0..burst).map(|_| {
        tokio::time::timeout(
            Duration::from_millis(700),
            tokio::net::TcpStream::connect(server.session),
        )
    });
    let results = futures_util::future::join_all(connects).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let connected = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    drop(results);
    assert_eq!(
        connected, burst,
        "connects waited past 700 ms: the listen backlog is too small"
    );
    // The server goes on serving once it runs again.
    let (user, password) = ("alice", password_of("alice"));
    csm::admin::execute(
        dir.path(),
        Request::UserAdd {
            name: user.into(),
            password: password.clone(),
        },
    )
    .unwrap();
    let connector = csm::client::Connector::for_data_dir(dir.path()).unwrap();
    csm::client::SessionClient::connect(&connector, server.session)
        .await
        .unwrap()
        .sign_on(user, &password)
        .await
        .unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

#[test]
fn offline_backup_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {});
    server.add_user("alice", &password_of("alice"));
    server.stop();
    let target = dir.path().join("copy");
    let out = Command::new(env!("CARGO_BIN_EXE_csm"))
        .arg("admin")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("backup")
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Reply::Users { users, .. } = csm::admin::execute(&target, Request::UserList).unwrap()
    else {
        panic!()
    };
    assert_eq!(users.len(), 1);
    assert!(
        csm::tls::dev_cert_paths(&target).0.exists(),
        "the certificate travels with the backup"
    );
    let _ = Instant::now();
}

/// A server that runs one password check at a time and lets no other wait
/// for it: logins or hashes at once find it busy.
fn server_with_one_password_check_and_no_wait() -> TestServer {
    TestServer::start_with(|c| {
        c.limits.password_checks = 1;
        c.timeouts.password_check_wait_secs = 0;
    })
}

/// An admin command that hashes a password and finds every password check
/// taken is told the server is busy, with the login's words and a kind of
/// its own (not `internal`). Nothing is changed by it, and the same command
/// succeeds once the checks are free. (One check at a time and no wait make
/// twelve additions at once overlap, as in the login test below.)
#[tokio::test]
async fn an_admin_command_that_finds_the_password_checks_busy_is_told_so() {
    use csm::admin::protocol::{FailureKind, Reply, Request};
    let server = server_with_one_password_check_and_no_wait();
    let names: Vec<String> = (0..12).map(|n| format!("a{n}")).collect();
    let additions = names.iter().map(|name| {
        let dir = server.data_dir.clone();
        let request = Request::UserAdd {
            name: name.clone(),
            password: password_of(name),
        };
        tokio::task::spawn_blocking(move || csm::admin::execute(&dir, request))
    });
    let mut busy = Vec::new();
    for (name, result) in names
        .iter()
        .zip(futures_util::future::join_all(additions).await)
    {
        match result.unwrap() {
            Ok(_) => {}
            Err(failure) => {
                assert_eq!(failure.kind, FailureKind::Busy, "{name}: {failure:?}");
                assert_eq!(failure.message, "server busy; try again later", "{name}");
                busy.push(name.clone());
            }
        }
    }
    assert!(!busy.is_empty(), "no addition found the checks busy");

    let Reply::Users { users, .. } =
        csm::admin::execute(&server.data_dir, Request::UserList).unwrap()
    else {
        panic!("user list answered something else")
    };
    for name in &busy {
        assert!(
            users.iter().all(|row| &row.name != name),
            "{name} was added though the answer was busy"
        );
    }
    for name in &busy {
        csm::admin::execute(
            &server.data_dir,
            Request::UserAdd {
                name: name.clone(),
                password: password_of(name),
            },
        )
        .unwrap();
        server.login(name).await;
    }
}

/// A login that finds every password check taken for the configured wait
/// is told so, on both protocols, with the documented words; nothing is
/// lost and the same logins succeed once the checks are free. (One check
/// at a time and no wait make sixteen logins at once overlap: each runs
/// argon2 for tens of milliseconds.)
#[tokio::test]
async fn a_login_that_finds_the_password_checks_busy_is_told_so_on_both_protocols() {
    use csm::client::{ClientError, SessionClient};
    use csm_actors::proto::lines::ErrorCode;
    let server = server_with_one_password_check_and_no_wait();
    let session_users: Vec<String> = (0..16).map(|n| format!("s{n}")).collect();
    let message_users: Vec<String> = (0..16).map(|n| format!("m{n}")).collect();
    for user in session_users.iter().chain(&message_users) {
        server.add_user(user, &password_of(user));
    }
    let server = &server;
    let logins = session_users.iter().map(|user| async move {
        let password = password_of(user);
        SessionClient::login(&server.connector, server.session_addr, user, &password).await
    });
    let mut busy_logins = Vec::new();
    for (user, result) in session_users
        .iter()
        .zip(futures_util::future::join_all(logins).await)
    {
        match result {
            Ok(_) => {}
            Err(ClientError::LoginRefused(reason)) => {
                assert_eq!(reason, "server busy; try again later", "{user}");
                busy_logins.push(user.clone());
            }
            Err(e) => panic!("{user}: {e}"),
        }
    }
    assert!(!busy_logins.is_empty(), "no login found the checks busy");

    let data = sample_data("hello");
    let data = &data;
    let sends = message_users.iter().enumerate().map(|(n, user)| {
        let id = format!("busy-{n}");
        async move { (id.clone(), server.send(user, &id, &["s0"], data).await) }
    });
    let mut busy_sends = Vec::new();
    for (user, (id, result)) in message_users
        .iter()
        .zip(futures_util::future::join_all(sends).await)
    {
        match result {
            Ok(()) => {}
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::Unavailable, "{user}: {e}");
                assert_eq!(e.text, "server busy; try again later", "{user}");
                busy_sends.push((user.clone(), id));
            }
            Err(e) => panic!("{user}: {e}"),
        }
    }
    assert!(!busy_sends.is_empty(), "no send found the checks busy");

    // One at a time, the refused ones succeed, and every message is there.
    for user in &busy_logins {
        server.login(user).await;
    }
    for (user, id) in &busy_sends {
        server.send(user, id, &["s0"], data).await.unwrap();
    }
    for n in 0..message_users.len() {
        let received = server.receive("s0", &format!("busy-{n}")).await.unwrap();
        assert_eq!(&received.data, data);
    }
}

/// An address another program holds is refused with an error that names
/// the setting and the address, not a bare "address in use".
#[tokio::test]
async fn a_taken_address_is_refused_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let config = csm::config::Config {
        session_addr: taken_addr.clone(),
        message_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let error = csm::serve::bind(&config).await.expect_err("refused");
    let text = format!("{error:#}");
    assert!(
        text.contains(&format!("binding the session address {taken_addr}"))
            && text.to_lowercase().contains("in use"),
        "{text}"
    );
}
