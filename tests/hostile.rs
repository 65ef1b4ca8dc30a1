//! Hostile input and abuse, each closed cleanly while the other users keep
//! working: no ClientHello, hundreds of silent connections, a huge length
//! prefix followed by a flood, bytes that trickle, old TLS versions, login
//! guessing, and too many connections from one address.

mod common;

use std::time::{Duration, Instant};

use common::*;
use csm::client::{ClientError, SessionClient};
use csm_actors::proto::lines::ErrorCode;
use csm_actors::proto::{Packet, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes; returns what came and how long it took.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("not closed within {limit:?}"),
        }
    }
}

/// The server still serves: a message from alice reaches bob.
async fn still_serving(server: &TestServer, bob: &mut SessionClient, id: &str) {
    server
        .send("alice", id, &["bob"], &sample_data("still here"))
        .await
        .unwrap();
    loop {
        if let Packet::MessageAvailable { id: got, .. } = next(bob).await {
            assert_eq!(got, id);
            break;
        }
    }
}

#[tokio::test]
async fn no_client_hello_is_closed_at_the_handshake_timeout() {
    let server = TestServer::start_with(|c| c.timeouts.handshake_secs = 1);
    let (_alice, mut bob) = pair(&server).await;
    for addr in [server.session_addr, server.message_addr] {
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let (got, took) = until_closed(&mut silent, Duration::from_secs(5)).await;
        assert!(got.is_empty());
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }
    still_serving(&server, &mut bob, "after-silence").await;
}

#[tokio::test]
async fn five_hundred_silent_connections_do_not_stop_anyone() {
    let server = TestServer::start_with(|c| c.timeouts.handshake_secs = 2);
    let (_alice, mut bob) = pair(&server).await;
    let mut silent = Vec::new();
    for n in 0..500 {
        let addr = if n % 2 == 0 {
            server.session_addr
        } else {
            server.message_addr
        };
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    still_serving(&server, &mut bob, "among-the-silent").await;
    let mut carol_ok = false;
    server.add_user("carol", &password_of("carol"));
    if let Ok(mut carol) = SessionClient::login(
        &server.connector,
        server.session_addr,
        "carol",
        &password_of("carol"),
    )
    .await
    {
        read_sign_on(&mut carol, 3, 0).await;
        carol_ok = true;
    }
    assert!(
        carol_ok,
        "a new user signs on while 500 connections sit silent"
    );
    for stream in &mut silent {
        let (got, _) = until_closed(stream, Duration::from_secs(10)).await;
        assert!(got.is_empty());
    }
}

#[tokio::test]
async fn a_huge_length_prefix_and_a_flood_are_cut_off() {
    let server = TestServer::start();
    let (mut alice, mut bob) = pair(&server).await;
    alice.send_raw(&[0x7F, 0xFF, 0xFF, 0xFF]).await.unwrap();
    // The server closes at the prefix; a 100 MB flood after it is refused
    // by the closed connection, not read into memory.
    let chunk = vec![0x41u8; 1 << 20];
    let mut written = 0usize;
    let flood = async {
        while written < 100 << 20 {
            if alice.send_raw(&chunk).await.is_err() {
                break;
            }
            written += chunk.len();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("flood ends");
    assert!(
        written < 100 << 20,
        "the server kept reading a refused frame ({written} bytes)"
    );
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Offline, None)
    );
    still_serving(&server, &mut bob, "after-flood").await;
}

#[tokio::test]
async fn trickling_bytes_hit_the_frame_and_line_timeouts() {
    let server = TestServer::start_with(|c| {
        c.timeouts.frame_secs = 1;
        c.timeouts.read_secs = 1;
    });
    let (mut alice, mut bob) = pair(&server).await;
    // A frame of 40 bytes, one byte every 300 ms.
    let frame = Packet::Idle { idle_secs: 1 }.to_frame();
    let started = Instant::now();
    for byte in &frame {
        if alice.send_raw(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    assert_closed(&mut alice).await;
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Offline, None)
    );

    // A header line, one byte every 300 ms.
    let mut stream = server.connector.connect(server.message_addr).await.unwrap();
    let line = b"alice-trickling-slowly\n";
    let mut answer = Vec::new();
    for byte in line {
        if stream.write_all(&[*byte]).await.is_err() || stream.flush().await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("error malformed "), "{answer:?}");
    still_serving(&server, &mut bob, "after-trickle").await;
}

/// A TLS 1.1 ClientHello without the supported_versions extension.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02];
    hello.extend_from_slice(&[7u8; 32]);
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // AES-CBC-SHA suites
    hello.extend_from_slice(&[0x01, 0x00]); // no compression
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn tls_1_0_and_1_1_are_refused() {
    let server = TestServer::start();
    for addr in [server.session_addr, server.message_addr] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&tls11_client_hello()).await.unwrap();
        let (got, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
        // An alert record (0x15), never a ServerHello handshake (0x16).
        assert_eq!(got.first(), Some(&0x15), "{got:02x?}");
    }
}

#[tokio::test]
async fn the_login_throttle_follows_its_settings() {
    let server = TestServer::start_with(|config| {
        config.limits.login_free_failures = 1;
        config.limits.login_account_lockout = 2;
        config.timeouts.login_delay_max_ms = 50;
    });
    server.add_user("alice", &password_of("alice"));
    let login = |password: String| {
        let server = &server;
        async move {
            match SessionClient::login(&server.connector, server.session_addr, "alice", &password)
                .await
            {
                Err(ClientError::LoginRefused(reason)) => reason,
                Err(e) => panic!("{e}"),
                Ok(_) => "signed on".to_owned(),
            }
        }
    };
    for attempt in 0..2 {
        assert_eq!(
            login(format!("guess{attempt}")).await,
            "unknown user or wrong password"
        );
    }
    // Locked out after two failures, as configured (the default is ten):
    // even the right password is refused from this address.
    assert_eq!(
        login(password_of("alice")).await,
        "too many failed logins for this account from your address; try again later"
    );
}

/// Message data of one attachment of `bytes` bytes, all `fill`.
fn data_of(bytes: usize, fill: u8) -> Vec<u8> {
    use csm_actors::proto::data::{Attachment, MessageData};
    MessageData::new("", vec![Attachment::new("blob", vec![fill; bytes])])
        .encode()
        .unwrap()
}

#[tokio::test]
async fn message_bytes_in_flight_are_bounded_over_all_streams() {
    let server = TestServer::start_with(|config| {
        config.limits.message_bytes = 1 << 20;
        config.limits.bytes_in_flight = 1 << 20;
        config.timeouts.budget_wait_secs = 1;
    });
    for user in ["alice", "bob", "carol"] {
        server.add_user(user, &password_of(user));
    }
    // carol's send holds 900 KiB of the 1 MiB budget and stalls.
    let big = data_of(900 * 1024, 7);
    let held = big.len() - 1000;
    let mut carol = server.connector.connect(server.message_addr).await.unwrap();
    carol
        .write_all(&send_request("carol", "held", &["bob"]))
        .await
        .unwrap();
    carol.write_all(&big[..held]).await.unwrap();
    carol.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // alice's 200 KiB do not fit: she is told so once the wait is over, and
    // nothing of hers is kept.
    let medium = data_of(200 * 1024, 9);
    let started = Instant::now();
    match server.send("alice", "medium", &["bob"], &medium).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.text.contains("bytes of messages in flight"), "{e}");
        }
        other => panic!("a send past the budget is refused: {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(matches!(
        server.receive("bob", "medium").await,
        Err(ClientError::Refused(e)) if e.code == ErrorCode::NoSuchMessage
    ));
    // A small message still fits beside carol's.
    server
        .send("alice", "small", &["bob"], &sample_data("small"))
        .await
        .unwrap();

    // carol finishes: her message is stored whole, and her bytes come free.
    carol.write_all(&big[held..]).await.unwrap();
    carol.flush().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, carol.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), "done\n");
    server
        .send("alice", "medium", &["bob"], &medium)
        .await
        .unwrap();
    assert_eq!(server.receive("bob", "held").await.unwrap().data, big);
    assert_eq!(server.receive("bob", "medium").await.unwrap().data, medium);
}

#[tokio::test]
async fn guessing_a_password_is_slowed_then_refused_from_that_address() {
    let server = TestServer::start();
    server.add_user("alice", &password_of("alice"));
    let mut last = Duration::ZERO;
    for attempt in 0..10 {
        let started = Instant::now();
        match SessionClient::login(
            &server.connector,
            server.session_addr,
            "alice",
            &format!("guess{attempt}"),
        )
        .await
        {
            Err(ClientError::LoginRefused(_)) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a guess got in"),
        }
        last = started.elapsed();
    }
    assert!(
        last >= Duration::from_secs(2),
        "later failures are delayed ({last:?})"
    );
    let locked = SessionClient::login(
        &server.connector,
        server.session_addr,
        "alice",
        &password_of("alice"),
    )
    .await;
    match locked {
        Err(ClientError::LoginRefused(reason)) => assert!(reason.contains("too many"), "{reason}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a locked-out address is refused even with the right password"),
    }
    match server
        .send("alice", "m", &["alice"], &sample_data("x"))
        .await
    {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unavailable),
        other => panic!("message streams are throttled too: {other:?}"),
    }
    // From another address the real user still gets in.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(server.session_addr).await.unwrap();
    let tls = server.connector.handshake(tcp).await.unwrap();
    SessionClient::over(tls)
        .sign_on("alice", &password_of("alice"))
        .await
        .unwrap();
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let server = TestServer::start_with(|c| c.limits.connections_per_address = 5);
    server.add_user("alice", &password_of("alice"));
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(server.connector.connect(server.session_addr).await.unwrap());
    }
    assert!(
        server.connector.connect(server.session_addr).await.is_err(),
        "the sixth is closed"
    );
    // Another address is not affected.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(server.session_addr).await.unwrap();
    server.connector.handshake(tcp).await.unwrap();
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    SessionClient::login(
        &server.connector,
        server.session_addr,
        "alice",
        &password_of("alice"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_panic_in_one_session_or_stream_closes_only_that_one() {
    let server = TestServer::start();
    let (mut alice, mut bob) = pair(&server).await;
    alice
        .send(&Packet::Idle {
            idle_secs: csm_actors::FAILPOINT_IDLE_SECS,
        })
        .await
        .unwrap();
    assert_closed(&mut alice).await;
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Offline, None),
        "presence heard it"
    );
    let mut answer = raw_exchange(
        &server,
        &send_request("alice", csm_actors::FAILPOINT_MESSAGE_ID, &["bob"]),
        false,
    )
    .await;
    answer.retain(|c| c != '\n');
    assert!(
        answer.is_empty(),
        "the panicking stream is closed without an answer: {answer:?}"
    );
    still_serving(&server, &mut bob, "after-panics").await;
    let mut again = server.login("alice").await;
    read_sign_on(&mut again, 2, 0).await;
}

/// [`pair`], with one message from alice waiting for bob.
async fn pair_with_waiting(server: &TestServer, id: &str) -> (SessionClient, SessionClient) {
    let (alice, mut bob) = pair(server).await;
    server
        .send("alice", id, &["bob"], &sample_data(id))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut bob).await,
        Packet::MessageAvailable { .. }
    ));
    (alice, bob)
}

#[tokio::test]
async fn the_mailbox_and_presence_actors_restart_after_a_panic() {
    let server = TestServer::start();
    let (mut alice, mut bob) = pair_with_waiting(&server, "before").await;

    // The mailbox actor panics on this message: the sender is told to try
    // again (the actor stopped before it could answer), and the actor comes
    // back with its index reloaded from the store.
    match server
        .send(
            "alice",
            csm_actors::FAILPOINT_MAILBOX_ID,
            &["bob"],
            &sample_data("x"),
        )
        .await
    {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unavailable),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server.receive("bob", "before").await.unwrap().data,
        sample_data("before")
    );
    still_serving(&server, &mut bob, "after-mailbox-panic").await;

    // The presence actor panics on this packet and comes back with the
    // sessions it had: presence keeps flowing.
    alice
        .send(&Packet::Idle {
            idle_secs: csm_actors::FAILPOINT_PRESENCE_IDLE_SECS,
        })
        .await
        .unwrap();
    alice.send(&Packet::Idle { idle_secs: 0 }).await.unwrap();
    assert_eq!(next_status(&mut bob).await.1, Status::Idle);
    alice.send(&Packet::NotIdle {}).await.unwrap();
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Back, None)
    );
    server.add_user("carol", &password_of("carol"));
    let mut carol = server.login("carol").await;
    let (users, statuses, _) = read_sign_on(&mut carol, 3, 0).await;
    assert_eq!(users, vec!["alice", "bob", "carol"]);
    assert_eq!(statuses.len(), 3);
}

#[tokio::test]
async fn a_message_written_as_the_mailbox_actor_panics_is_committed_and_announced_once() {
    let server = TestServer::start();
    let (_alice, mut bob) = pair_with_waiting(&server, "before").await;

    // The message is written, then the actor panics before its commit: the
    // restart drops the commit it waited for. The sender is told to try
    // again; the message must neither be lost to bob's session nor be
    // announced twice.
    let id = csm_actors::FAILPOINT_STORED_THEN_PANIC;
    match server.send("alice", id, &["bob"], &sample_data("y")).await {
        Err(ClientError::Refused(e)) => {
            assert!(
                matches!(e.code, ErrorCode::Internal | ErrorCode::Unavailable),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    match next(&mut bob).await {
        Packet::MessageAvailable { id: got, from, .. } => {
            assert_eq!((got.as_str(), from.as_str()), (id, "alice"))
        }
        other => panic!("expected the notice after the restart, got {other:?}"),
    }
    // The sender's retry is the same message: done, and no second notice.
    server
        .send("alice", id, &["bob"], &sample_data("y"))
        .await
        .unwrap();
    assert_eq!(
        server.receive("bob", id).await.unwrap().data,
        sample_data("y")
    );
    still_serving(&server, &mut bob, "after-stored-panic").await;
}

#[tokio::test]
async fn every_handler_of_the_central_actors_is_contained() {
    let server = TestServer::start();
    let (mut alice, mut bob) = pair_with_waiting(&server, "kept").await;

    // A receive that panics the mailbox actor is refused; the message it
    // asked for was never there, the others still are.
    match server.receive("bob", csm_actors::FAILPOINT_FETCH_ID).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::Internal, "{e}");
            assert!(e.text.contains("restarts, try again"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server.receive("bob", "kept").await.unwrap().data,
        sample_data("kept")
    );
    still_serving(&server, &mut bob, "after-fetch-panic").await;

    // A sign-on that panics the presence actor closes that session only;
    // presence comes back with the sessions it had.
    let user = csm_actors::FAILPOINT_REGISTER_USER;
    server.add_user(user, &password_of(user));
    assert!(matches!(next(&mut bob).await, Packet::AddUser { .. }));
    let mut failing = server.login(user).await;
    assert_closed(&mut failing).await;
    alice.send(&Packet::Idle { idle_secs: 3 }).await.unwrap();
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Idle, Some(3))
    );
    server.add_user("carol", &password_of("carol"));
    assert!(matches!(next(&mut bob).await, Packet::AddUser { .. }));
    let mut carol = server.login("carol").await;
    let (users, statuses, _) = read_sign_on(&mut carol, 3, 0).await;
    assert_eq!(users, vec!["alice", "bob", "carol", user]);
    let online: Vec<&str> = statuses.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        online,
        ["alice", "bob", "carol"],
        "the failed sign-on is not online"
    );
    let more = carol.next_packet(Duration::from_millis(300)).await;
    assert!(
        !matches!(more, Ok(Some(_))),
        "nothing more after the sign-on: {more:?}"
    );
    still_serving(&server, &mut bob, "after-register-panic").await;
}

#[tokio::test]
async fn toggling_idle_in_a_loop_is_closed_not_fanned_out() {
    let server = TestServer::start_with(|c| c.limits.presence_changes_per_sec = 10);
    let (mut alice, mut bob) = pair(&server).await;
    for n in 0..40 {
        let packet = if n % 2 == 0 {
            Packet::Idle { idle_secs: 0 }
        } else {
            Packet::NotIdle {}
        };
        if alice.send(&packet).await.is_err() {
            break;
        }
    }
    assert_closed(&mut alice).await;
    let mut seen = 0;
    loop {
        match next_status(&mut bob).await {
            (user, Status::Offline, _) if user == "alice" => break,
            _ => seen += 1,
        }
    }
    assert!(
        seen <= 10,
        "at most the allowed changes reached bob ({seen})"
    );
    still_serving(&server, &mut bob, "after-toggling").await;
}
