//! `csm admin` user and mailbox commands against a running server (through
//! the admin socket, taking effect live) and on a stopped server's store.

mod common;

use std::process::{Command, Stdio};

use common::*;
use csm::admin::protocol::{Reply, Request};
use csm::client::{ClientError, SessionClient};
use csm_actors::proto::data::{Attachment, MessageData};
use csm_actors::proto::lines::ErrorCode;
use csm_actors::proto::Status;

fn admin(dir: &std::path::Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_csm"))
        .arg("admin")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(dir: &std::path::Path, args: &[&str]) -> Reply {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = admin(dir, &all, "");
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn letter() -> Vec<u8> {
    MessageData::new(
        "Dear Bob,\0 see attached 😀",
        vec![
            Attachment::new("../../report.pdf", vec![1, 2, 3, 4]),
            Attachment::new("photo.jpg", vec![9; 2048]),
        ],
    )
    .encode()
    .unwrap()
}

/// Checks every mailbox command on the state: bob has `m1` and `m2`, carol `m2`.
fn check_mailbox_commands(dir: &std::path::Path) {
    let Reply::Mailbox { items } = json(dir, &["mailbox", "list", "bob"]) else {
        panic!()
    };
    assert_eq!(
        items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec!["m1", "m2"]
    );
    assert_eq!(items[0].sender, "alice");
    assert_eq!(items[0].recipients, vec!["bob"]);
    assert_eq!(items[0].size, letter().len() as u64);
    assert_eq!(
        items[0].attachments,
        vec![
            ("../../report.pdf".to_string(), 4),
            ("photo.jpg".to_string(), 2048)
        ]
    );
    let Reply::Mailbox { items } = json(dir, &["mailbox", "list"]) else {
        panic!()
    };
    assert_eq!(items.len(), 3, "all mailboxes");
    let (code, table, _) = admin(dir, &["mailbox", "list"], "");
    assert_eq!(code, 0);
    assert!(
        table.starts_with("USER") && table.contains("photo.jpg (2.0 KiB)"),
        "{table}"
    );

    let Reply::Message { message } = json(dir, &["mailbox", "show", "bob", "m1"]) else {
        panic!()
    };
    assert_eq!(message.text, "Dear Bob,\0 see attached 😀");
    assert!(message.attachments.iter().all(|a| a.data_base64.is_none()));
    let save = tempfile::tempdir().unwrap();
    let target = save.path().join("out");
    let (code, shown, err) = admin(
        dir,
        &[
            "mailbox",
            "show",
            "bob",
            "m1",
            "--save",
            target.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("Dear Bob"), "{shown}");
    assert_eq!(
        std::fs::read(target.join("_.._report.pdf")).unwrap(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        std::fs::read(target.join("photo.jpg")).unwrap(),
        vec![9; 2048]
    );
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        2,
        "nothing written outside the names"
    );

    let Reply::Stats {
        users,
        total_messages,
        total_bytes,
    } = json(dir, &["mailbox", "stats"])
    else {
        panic!()
    };
    assert_eq!(total_messages, 3);
    assert_eq!(total_bytes, letter().len() as u64 * 3);
    assert_eq!(
        users
            .iter()
            .map(|u| (u.user.as_str(), u.messages))
            .collect::<Vec<_>>(),
        vec![("bob", 2), ("carol", 1)]
    );
    let (_, table, _) = admin(dir, &["mailbox", "stats"], "");
    assert!(table.contains("TOTAL"), "{table}");

    let (code, _, err) = admin(dir, &["mailbox", "show", "bob", "nope"], "");
    assert_eq!(code, 1, "not found exits 1: {err}");
    let (code, out, _) = admin(dir, &["mailbox", "delete", "bob", "m1"], "");
    assert_eq!(code, 0, "{out}");
    let (code, _, _) = admin(dir, &["mailbox", "delete", "bob", "m1"], "");
    assert_eq!(code, 1, "a second delete finds nothing");
    let (code, out, _) = admin(
        dir,
        &["mailbox", "purge", "carol", "--older-than", "1h"],
        "",
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("0 messages purged"), "{out}");
    let (code, out, _) = admin(dir, &["mailbox", "purge", "carol"], "");
    assert_eq!(code, 0);
    assert!(out.starts_with("1 messages purged"), "{out}");
    let (code, _, _) = admin(
        dir,
        &["mailbox", "purge", "carol", "--older-than", "soon"],
        "",
    );
    assert_eq!(code, 2, "a bad duration is a usage error");
    let Reply::Mailbox { items } = json(dir, &["mailbox", "list"]) else {
        panic!()
    };
    assert_eq!(
        items
            .iter()
            .map(|i| (i.user.as_str(), i.id.as_str()))
            .collect::<Vec<_>>(),
        vec![("bob", "m2")]
    );
}

async fn seeded(server: &TestServer) {
    for user in ["alice", "bob", "carol"] {
        server.add_user(user, &password_of(user));
    }
    server
        .send("alice", "m1", &["bob"], &letter())
        .await
        .unwrap();
    server
        .send("alice", "m2", &["bob", "carol"], &letter())
        .await
        .unwrap();
}

#[tokio::test]
async fn mailbox_commands_on_a_running_server_take_effect_live() {
    let server = TestServer::start();
    seeded(&server).await;
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 1, 2).await;
    check_mailbox_commands(&server.data_dir);
    // Deleted by admin: gone for its receiver too.
    match server.receive("bob", "m1").await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::NoSuchMessage),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.receive("bob", "m2").await.unwrap().data, letter());

    let Reply::Sessions { sessions } = json(&server.data_dir, &["sessions"]) else {
        panic!()
    };
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (
            sessions[0].user.as_str(),
            sessions[0].status,
            sessions[0].session_count
        ),
        ("bob", Status::Online, 1)
    );
    assert!(sessions[0].peer.starts_with("127.0.0.1:"));
    let (_, table, _) = admin(&server.data_dir, &["sessions"], "");
    assert!(
        table.starts_with("USER") && table.contains("PEER") && table.contains("bob"),
        "{table}"
    );
}

#[tokio::test]
async fn mailbox_commands_on_a_stopped_server_work_on_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {});
    seeded(&server).await;
    server.stop();
    check_mailbox_commands(dir.path());
    let (code, _, err) = admin(dir.path(), &["sessions"], "");
    assert_eq!(code, 1, "no sessions without a server: {err}");
    // The server starts on what the offline admin left.
    let server = TestServer::start_in(dir.path(), |_| {});
    let mut bob = server.login("bob").await;
    let (_, _, messages) = read_sign_on(&mut bob, 1, 1).await;
    assert_eq!(messages[0].0, "m2");
    match server.receive("bob", "m1").await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::NoSuchMessage),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn removing_a_user_live_closes_sessions_and_refuses_them() {
    let server = TestServer::start();
    seeded(&server).await;
    let mut alice = server.login("alice").await;
    read_sign_on(&mut alice, 1, 0).await;
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 2, 2).await;
    assert_eq!(next_status(&mut alice).await.0, "bob");

    let (code, out, err) = admin(&server.data_dir, &["user", "remove", "bob"], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 waiting messages"), "{out}");
    assert_closed(&mut bob).await;
    assert_eq!(
        next_status(&mut alice).await,
        ("bob".into(), Status::Offline, None)
    );
    assert!(matches!(
        SessionClient::login(
            &server.connector,
            server.session_addr,
            "bob",
            &password_of("bob")
        )
        .await,
        Err(ClientError::LoginRefused(_))
    ));
    match server.send("alice", "m3", &["bob"], &letter()).await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::UnknownRecipient),
        other => panic!("{other:?}"),
    }
    // carol still has her copy of m2; bob's is gone.
    assert_eq!(server.receive("carol", "m2").await.unwrap().data, letter());
    let (code, _, _) = admin(&server.data_dir, &["user", "remove", "bob"], "");
    assert_eq!(code, 1);
}

#[tokio::test]
async fn password_change_live_drops_cached_credentials_at_once() {
    let server = TestServer::start();
    seeded(&server).await;
    // alice's credentials are cached by the sends above.
    let (code, _, err) = admin(
        &server.data_dir,
        &["user", "passwd", "alice", "--password-stdin"],
        "new-secret\n",
    );
    assert_eq!(code, 0, "{err}");
    match server.send("alice", "m4", &["bob"], &letter()).await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::Auth),
        other => panic!("old password must fail at once: {other:?}"),
    }
    let recipients = vec!["bob".to_string()];
    let data = letter();
    csm::client::send_message(
        &server.connector,
        server.message_addr,
        &csm::client::Outgoing {
            username: "alice",
            password: "new-secret",
            id: "m4",
            recipients: &recipients,
            data: &data,
        },
    )
    .await
    .unwrap();
    let (code, _, _) = admin(
        &server.data_dir,
        &["user", "passwd", "nobody", "--password-stdin"],
        "x\n",
    );
    assert_eq!(code, 1);
}

#[tokio::test]
async fn remove_and_passwd_on_a_stopped_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {});
    seeded(&server).await;
    server.stop();
    let (code, _, err) = admin(dir.path(), &["user", "remove", "carol"], "");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = admin(
        dir.path(),
        &["user", "passwd", "alice", "--password-stdin"],
        "changed\n",
    );
    assert_eq!(code, 0, "{err}");
    let Reply::Users { live: false, users } =
        csm::admin::execute(dir.path(), Request::UserList).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
        vec!["alice", "bob"]
    );
    let server = TestServer::start_in(dir.path(), |_| {});
    SessionClient::login(&server.connector, server.session_addr, "alice", "changed")
        .await
        .unwrap();
    let mut bob = server.login("bob").await;
    let (added, _, messages) = read_sign_on(&mut bob, 1, 2).await;
    assert_eq!(added, vec!["alice", "bob"]);
    assert_eq!(
        messages.len(),
        2,
        "bob's messages stay; carol's copy of m2 went with her"
    );
    assert_eq!(server.receive("bob", "m2").await.unwrap().data, letter());
}
