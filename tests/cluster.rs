//! Two csm nodes on one PostgreSQL acting as one server: presence and
//! notices across them, a send at one node received at the other byte for
//! byte, retries of one id at both nodes storing one copy, quotas and
//! removals when both nodes write one mailbox, admin views of every node,
//! and the admin working directly on the database.

#![cfg(csm_postgres)]

mod common;

use std::time::Duration;

use common::postgres::Postgres;
use common::*;
use csm::admin::protocol::{Reply, Request};
use csm::client::ClientError;
use csm_actors::proto::lines::ErrorCode;
use csm_actors::proto::{Packet, Status};

/// Two nodes on one fresh database.
fn two_nodes(tweak: impl Fn(&mut csm::config::Config)) -> (TestServer, TestServer) {
    let a = TestServer::start_on(Backend::Postgres, |c| {
        c.store.lease_secs = 2;
        tweak(c);
    });
    let url = a.store_url.clone().expect("a database");
    let b = TestServer::start_on(Backend::Postgres, |c| {
        c.store.url = Some(url);
        c.store.lease_secs = 2;
        tweak(c);
    });
    (a, b)
}

fn database_of(server: &TestServer) -> String {
    let url = server.store_url.as_deref().expect("a database");
    url.rsplit('/').next().expect("a name").to_owned()
}

fn add_users(server: &TestServer, names: &[&str]) {
    for name in names {
        server.add_user(name, &password_of(name));
    }
}

fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused(e)) => e.code,
        other => panic!("expected an error line, got {other:?}"),
    }
}

/// The next MessageAvailable, as (id, from, size).
async fn next_notice(client: &mut csm::client::SessionClient) -> (String, String, u64) {
    match next(client).await {
        Packet::MessageAvailable { id, from, size } => (id, from, size),
        other => panic!("expected MessageAvailable, got {other:?}"),
    }
}

#[tokio::test]
async fn presence_and_user_list_span_both_nodes() {
    let (a, b) = two_nodes(|_| {});
    add_users(&a, &["alice", "bob", "carol"]);

    let mut carol = b.login("carol").await;
    let (listed, _, _) = read_sign_on(&mut carol, 1, 0).await;
    assert_eq!(
        listed,
        ["alice", "bob", "carol"],
        "B lists users added at A"
    );
    let mut alice_a = a.login("alice").await;
    read_sign_on(&mut alice_a, 2, 0).await;
    assert_eq!(
        next_status(&mut carol).await,
        ("alice".into(), Status::Online, None),
        "carol at B hears alice come online at A"
    );

    // A sign-on at B now shows the user signed on at A.
    let mut bob = b.login("bob").await;
    let (_, statuses, _) = read_sign_on(&mut bob, 3, 0).await;
    let shown: Vec<(&str, Status)> = statuses.iter().map(|(u, s, _)| (u.as_str(), *s)).collect();
    assert_eq!(
        shown,
        [
            ("alice", Status::Online),
            ("bob", Status::Online),
            ("carol", Status::Online)
        ]
    );
    assert_eq!(next_status(&mut alice_a).await.0, "bob");
    assert_eq!(next_status(&mut carol).await.0, "bob");

    // Idle and back at A reach B, with the idle time.
    alice_a.send(&Packet::Idle { idle_secs: 90 }).await.unwrap();
    let (user, status, idle) = next_status(&mut bob).await;
    assert_eq!((user.as_str(), status), ("alice", Status::Idle));
    assert!((90..=92).contains(&idle.unwrap_or(0)), "{idle:?}");
    assert_eq!(next_status(&mut carol).await.1, Status::Idle);
    alice_a.send(&Packet::NotIdle {}).await.unwrap();
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Back, None)
    );
    assert_eq!(next_status(&mut carol).await.1, Status::Back);

    // A second session of alice at B: sessions on two nodes aggregate as
    // on one. Closing the one at A changes nothing; the next thing bob
    // hears is alice going idle at B, then offline when B's session ends.
    let mut alice_b = b.login("alice").await;
    read_sign_on(&mut alice_b, 3, 0).await;
    alice_a.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice_b.send(&Packet::Idle { idle_secs: 5 }).await.unwrap();
    let (user, status, _) = next_status(&mut bob).await;
    assert_eq!((user.as_str(), status), ("alice", Status::Idle));
    alice_b.close().await;
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Offline, None)
    );
    assert_eq!(next_status(&mut carol).await.1, Status::Idle);
    assert_eq!(next_status(&mut carol).await.1, Status::Offline);

    // A user added through A is announced at B.
    add_users(&a, &["dave"]);
    match next(&mut bob).await {
        Packet::AddUser { username } => assert_eq!(username, "dave"),
        other => panic!("expected AddUser, got {other:?}"),
    }
}

#[tokio::test]
async fn a_send_at_one_node_is_announced_and_received_at_the_other() {
    let (a, b) = two_nodes(|_| {});
    add_users(&a, &["alice", "bob", "carol"]);
    let mut bob = b.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;

    let data = sample_data("across nodes: ü 😀 \u{0}");
    a.send("alice", "x-1", &["bob", "carol"], &data)
        .await
        .expect("stored at A");
    assert_eq!(
        next_notice(&mut bob).await,
        ("x-1".into(), "alice".into(), data.len() as u64)
    );
    let received = b.receive("bob", "x-1").await.expect("received at B");
    assert_eq!(received.data, data, "byte for byte");
    assert_eq!(received.sender, "alice");
    assert_eq!(received.recipients, ["bob", "carol"]);
    assert_eq!(
        refused(a.receive("bob", "x-1").await),
        ErrorCode::NoSuchMessage,
        "gone at A once B's done is answered"
    );

    // carol was offline: she hears of it at sign-on, at either node.
    let mut carol = b.login("carol").await;
    let (_, _, waiting) = read_sign_on(&mut carol, 2, 1).await;
    assert_eq!(waiting, [("x-1".into(), "alice".into(), data.len() as u64)]);
    assert_eq!(a.receive("carol", "x-1").await.unwrap().data, data);
    let db = database_of(&a);
    let pg = Postgres::shared();
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM messages"), "0");
    assert_eq!(
        pg.sql(&db, "SELECT sum(box_messages), sum(box_bytes) FROM users"),
        "0|0"
    );
}

#[tokio::test]
async fn one_id_retried_at_both_nodes_stores_one_copy() {
    let (a, b) = two_nodes(|_| {});
    add_users(&a, &["alice", "bob"]);
    let data = sample_data("once");
    a.send("alice", "r-1", &["bob"], &data).await.unwrap();
    b.send("alice", "r-1", &["bob"], &data)
        .await
        .expect("an exact retry at B is done");
    assert_eq!(
        refused(b.send("alice", "r-1", &["bob"], b"\0\x01x\0\0\0\0").await),
        ErrorCode::Duplicate
    );
    // The same new message sent to both nodes at once: one copy.
    let other = sample_data("twice at once");
    let (at_a, at_b) = tokio::join!(
        a.send("alice", "r-2", &["bob"], &other),
        b.send("alice", "r-2", &["bob"], &other)
    );
    at_a.unwrap();
    at_b.unwrap();
    let mut bob = a.login("bob").await;
    let (_, _, waiting) = read_sign_on(&mut bob, 1, 2).await;
    let ids: Vec<&str> = waiting.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["r-1", "r-2"]);
    let db = database_of(&a);
    assert_eq!(
        Postgres::shared().sql(&db, "SELECT count(*) FROM messages"),
        "2"
    );
    // Received, then retried again at the other node: still `done`, no copy.
    b.receive("bob", "r-1").await.unwrap();
    a.send("alice", "r-1", &["bob"], &data).await.unwrap();
    assert_eq!(
        refused(a.receive("bob", "r-1").await),
        ErrorCode::NoSuchMessage
    );
}

#[tokio::test]
async fn both_nodes_writing_one_mailbox_keep_its_quota_and_hand_each_message_out_once() {
    let (a, b) = two_nodes(|c| c.limits.mailbox_messages = 10);
    add_users(&a, &["alice", "bob"]);
    let data = sample_data("q");
    let sends = (0..12).map(|i| {
        let node = if i % 2 == 0 { &a } else { &b };
        let id = format!("q-{i}");
        let data = data.clone();
        async move { node.send("alice", &id, &["bob"], &data).await }
    });
    let results = futures_util::future::join_all(sends).await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    let over = results
        .into_iter()
        .filter(|r| !matches!(r, Ok(())))
        .map(refused)
        .collect::<Vec<_>>();
    assert_eq!(stored, 10, "the quota holds across nodes");
    assert_eq!(over, [ErrorCode::Quota, ErrorCode::Quota]);

    // Every waiting message received at both nodes at once, `done` at both.
    let mut handed_out = Vec::new();
    for i in 0..12 {
        let id = format!("q-{i}");
        let (at_a, at_b) = tokio::join!(a.receive("bob", &id), b.receive("bob", &id));
        let got = [at_a, at_b].into_iter().filter(|r| r.is_ok()).count();
        if got > 0 {
            handed_out.push(id.clone());
        }
        // Once a `done` is answered, neither node hands it out again.
        for node in [&a, &b] {
            assert_eq!(
                refused(node.receive("bob", &id).await),
                ErrorCode::NoSuchMessage
            );
        }
    }
    assert_eq!(handed_out.len(), 10);
    let db = database_of(&a);
    let pg = Postgres::shared();
    assert_eq!(
        pg.sql(
            &db,
            "SELECT box_messages, box_bytes FROM users WHERE name = 'bob'"
        ),
        "0|0"
    );
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM mailbox"), "0");
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM messages"), "0");
}

#[tokio::test]
async fn admin_sees_every_node_and_works_on_the_database_directly() {
    let (a, b) = two_nodes(|_| {});
    add_users(&a, &["alice", "bob"]);
    let mut alice = a.login("alice").await;
    read_sign_on(&mut alice, 1, 0).await;
    let mut bob = b.login("bob").await;
    read_sign_on(&mut bob, 2, 0).await;
    assert_eq!(next_status(&mut alice).await.0, "bob");
    a.send("alice", "adm-1", &["bob"], &sample_data("admin"))
        .await
        .unwrap();
    assert_eq!(next_notice(&mut bob).await.0, "adm-1");

    // Sessions of both nodes, each with its node's name, from either node.
    let sessions = loop {
        let Ok(Reply::Sessions { sessions }) = csm::admin::execute(&b.data_dir, Request::Sessions)
        else {
            panic!("sessions failed")
        };
        if sessions.len() == 2 {
            break sessions;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut seen: Vec<(String, bool)> = sessions
        .iter()
        .map(|s| (s.user.clone(), s.node.is_some()))
        .collect();
    seen.sort();
    assert_eq!(seen, [("alice".into(), true), ("bob".into(), true)]);
    assert_ne!(sessions[0].node, sessions[1].node);

    // Directly on the database, no socket: a user added there is
    // announced by the nodes; the mailbox is listed.
    let nowhere = tempfile::tempdir().unwrap();
    let url = a.store_url.clone().unwrap();
    let direct = |request| csm::admin::execute_on(nowhere.path(), Some(&url), request);
    match direct(Request::UserAdd {
        name: "erin".into(),
        password: password_of("erin"),
    }) {
        Ok(Reply::Done { .. }) => {}
        other => panic!("direct user add: {other:?}"),
    }
    for session in [&mut alice, &mut bob] {
        match next(session).await {
            Packet::AddUser { username } => assert_eq!(username, "erin"),
            other => panic!("expected AddUser, got {other:?}"),
        }
    }
    match direct(Request::MailboxList { user: None }) {
        Ok(Reply::Mailbox { items }) => {
            let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids, ["adm-1"]);
        }
        other => panic!("direct mailbox list: {other:?}"),
    }
    // Removing bob there closes his session at B and drops his mailbox.
    match direct(Request::UserRemove { name: "bob".into() }) {
        Ok(Reply::Done { message }) => assert!(message.contains("1 waiting"), "{message}"),
        other => panic!("direct user remove: {other:?}"),
    }
    assert_closed(&mut bob).await;
    assert_eq!(
        refused(a.send("alice", "adm-2", &["bob"], &sample_data("x")).await),
        ErrorCode::UnknownRecipient
    );
    let db = database_of(&a);
    assert_eq!(
        Postgres::shared().sql(&db, "SELECT count(*) FROM messages"),
        "0"
    );
}

/// `csm serve` on `url` that must fail to start; its standard error.
fn serve_fails(url: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_csm"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--session-addr",
            "127.0.0.1:0",
            "--message-addr",
            "127.0.0.1:0",
        ])
        .args(["--store-url", url])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the server started on {url}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_unreachable_database_or_a_newer_schema_stops_the_start_with_a_clear_error() {
    let unreachable = serve_fails("postgres://postgres:secret@127.0.0.1:1/csm");
    assert!(unreachable.contains("store.url"), "{unreachable}");
    assert!(
        !unreachable.contains("secret"),
        "password shown: {unreachable}"
    );

    let pg = Postgres::shared();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database_for(dir.path());
    TestServer::start_in_on(Backend::Postgres, dir.path(), |_| {}).stop();
    let db = url.rsplit('/').next().unwrap().to_owned();
    pg.sql(&db, "UPDATE csm_schema SET version = 99");
    let newer = serve_fails(&url);
    assert!(
        newer.contains("schema version 99") && newer.contains("newer"),
        "{newer}"
    );
}

#[tokio::test]
async fn hints_lost_while_a_node_was_not_listening_are_repaired_by_its_rescan() {
    let a = TestServer::start_on(Backend::Postgres, |c| c.store.lease_secs = 2);
    let url = a.store_url.clone().unwrap();
    // B rescans every three leases (30 s): within the 10 s this test waits
    // only the rescan after reconnecting can repair what B missed.
    let b = TestServer::start_on(Backend::Postgres, |c| {
        c.store.url = Some(url);
        c.store.node = Some("node-b".into());
        c.store.lease_secs = 10;
    });
    add_users(&a, &["alice", "bob", "carol"]);
    let mut bob = b.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;

    // Cut B's listening connection, then change things at A while B is
    // reconnecting: their hints never reach B.
    let db = database_of(&a);
    let pg = Postgres::shared();
    let cut = pg.sql(
        &db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'csm node-b' AND query LIKE 'LISTEN%'",
    );
    assert_eq!(cut, "1", "B's listener found and cut");
    a.send("alice", "lost-1", &["bob"], &sample_data("while cut"))
        .await
        .unwrap();
    let mut carol = a.login("carol").await;
    read_sign_on(&mut carol, 1, 0).await;

    let (mut notice, mut online) = (false, false);
    while !(notice && online) {
        match next(&mut bob).await {
            Packet::MessageAvailable { id, .. } => {
                assert_eq!(id, "lost-1");
                assert!(!notice, "announced twice");
                notice = true;
            }
            Packet::StatusChange {
                username, status, ..
            } if username == "carol" => {
                assert_eq!(status, Status::Online);
                online = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
