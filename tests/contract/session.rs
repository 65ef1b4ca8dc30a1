// The session stream, end to end over TLS: sign-on order and contents,
// presence across users and sessions, and what closes a session.

use std::time::Duration;

use common::*;
use csm::client::{ClientError, SessionClient};
use csm_actors::proto::{Packet, Status};

fn names(list: &[(String, Status, Option<u64>)]) -> Vec<(&str, Status)> {
    let mut v: Vec<_> = list.iter().map(|(u, s, _)| (u.as_str(), *s)).collect();
    v.sort();
    v
}

#[tokio::test]
async fn sign_on_order_and_contents() {
    let server = start();
    for user in ["alice", "bob", "carol"] {
        server.add_user(user, &password_of(user));
    }
    server
        .send("bob", "m-1", &["alice"], &sample_data("first"))
        .await
        .unwrap();
    server
        .send("carol", "m-2", &["alice"], &sample_data("second"))
        .await
        .unwrap();
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;
    let mut carol = server.login("carol").await;
    read_sign_on(&mut carol, 2, 0).await;
    assert_eq!(next_status(&mut bob).await.0, "carol");
    carol.send(&Packet::Idle { idle_secs: 30 }).await.unwrap();
    assert_eq!(next_status(&mut bob).await.1, Status::Idle);

    let mut alice = server.login("alice").await;
    let (users, statuses, messages) = read_sign_on(&mut alice, 3, 2).await;
    assert_eq!(
        users,
        vec!["alice", "bob", "carol"],
        "every registered user, self included"
    );
    assert_eq!(
        names(&statuses),
        vec![
            ("alice", Status::Online),
            ("bob", Status::Online),
            ("carol", Status::Idle)
        ]
    );
    let carol_idle = statuses.iter().find(|s| s.0 == "carol").unwrap().2.unwrap();
    assert!(
        (30..40).contains(&carol_idle),
        "carol idle for {carol_idle}s"
    );
    assert!(statuses
        .iter()
        .filter(|s| s.1 != Status::Idle)
        .all(|s| s.2.is_none()));
    let first_size = sample_data("first").len() as u64;
    assert_eq!(
        messages,
        vec![
            ("m-1".to_string(), "bob".to_string(), first_size),
            (
                "m-2".to_string(),
                "carol".to_string(),
                sample_data("second").len() as u64
            ),
        ],
        "waiting messages, oldest first"
    );
    // Others hear that alice came online.
    assert_eq!(
        next_status(&mut bob).await,
        ("alice".into(), Status::Online, None)
    );
    assert_eq!(
        next_status(&mut carol).await,
        ("alice".into(), Status::Online, None)
    );
}

#[tokio::test]
async fn presence_across_three_users_and_two_sessions() {
    let server = start();
    for user in ["alice", "bob", "carol"] {
        server.add_user(user, &password_of(user));
    }
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;
    let mut carol = server.login("carol").await;
    read_sign_on(&mut carol, 2, 0).await;
    assert_eq!(
        next_status(&mut bob).await,
        ("carol".into(), Status::Online, None)
    );

    let mut alice1 = server.login("alice").await;
    read_sign_on(&mut alice1, 3, 0).await;
    for watcher in [&mut bob, &mut carol] {
        assert_eq!(
            next_status(watcher).await,
            ("alice".into(), Status::Online, None)
        );
    }
    // A second session of an online user is not news.
    let mut alice2 = server.login("alice").await;
    read_sign_on(&mut alice2, 3, 0).await;

    // One of two sessions idle: still shown online.
    alice1.send(&Packet::Idle { idle_secs: 120 }).await.unwrap();
    // Both idle: IDLE, timed from the session that went idle last.
    alice2.send(&Packet::Idle { idle_secs: 5 }).await.unwrap();
    for watcher in [&mut bob, &mut carol] {
        let (user, status, secs) = next_status(watcher).await;
        assert_eq!(
            (user.as_str(), status),
            ("alice", Status::Idle),
            "first news is IDLE, not the half-idle state"
        );
        assert!((5..10).contains(&secs.unwrap()), "idle_secs {secs:?}");
    }
    // A repeated Idle from an idle session changes nothing.
    alice2.send(&Packet::Idle { idle_secs: 50 }).await.unwrap();
    // NotIdle: BACK.
    alice1.send(&Packet::NotIdle {}).await.unwrap();
    for watcher in [&mut bob, &mut carol] {
        assert_eq!(
            next_status(watcher).await,
            ("alice".into(), Status::Back, None)
        );
    }
    // The active session ends while the other is idle: IDLE again.
    alice1.close().await;
    for watcher in [&mut bob, &mut carol] {
        let (user, status, secs) = next_status(watcher).await;
        assert_eq!((user.as_str(), status), ("alice", Status::Idle));
        assert!(secs.unwrap() >= 5);
    }
    // A new session of an idle user: BACK.
    let mut alice3 = server.login("alice").await;
    read_sign_on(&mut alice3, 3, 0).await;
    for watcher in [&mut bob, &mut carol] {
        assert_eq!(
            next_status(watcher).await,
            ("alice".into(), Status::Back, None)
        );
    }
    // The user's own sessions are not told about themselves.
    bob.send(&Packet::Idle { idle_secs: 0 }).await.unwrap();
    assert_eq!(next_status(&mut alice3).await.0, "bob");
    assert_eq!(next_status(&mut alice2).await.0, "bob");
    // Last sessions end, the idle one first: no news, then OFFLINE once.
    // (Sessions may run on several threads, where two closes at the same
    // moment are seen in either order: the second close waits until the
    // server has seen the first.)
    alice2.close().await;
    wait_for_sessions_of(&server, "alice", 1).await;
    alice3.close().await;
    let (user, status, _) = next_status(&mut carol).await;
    assert_eq!((user.as_str(), status), ("bob", Status::Idle));
    assert_eq!(
        next_status(&mut carol).await,
        ("alice".into(), Status::Offline, None)
    );
    // A dead peer (dropped without close) also ends presence.
    drop(bob);
    assert_eq!(
        next_status(&mut carol).await,
        ("bob".into(), Status::Offline, None)
    );
}

/// Waits (bounded) until the server lists `count` sessions of `user`.
async fn wait_for_sessions_of(server: &common::TestServer, user: &str, count: usize) {
    use csm::admin::protocol::{Reply, Request};
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let Ok(Reply::Sessions { sessions }) =
            csm::admin::execute(&server.data_dir, Request::Sessions)
        else {
            panic!("admin sessions failed");
        };
        let open = sessions.iter().filter(|s| s.user == user).count();
        if open == count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{user} still has {open} sessions, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn late_sign_on_sees_idle_user_and_new_users_are_announced() {
    let server = start();
    for user in ["alice", "bob"] {
        server.add_user(user, &password_of(user));
    }
    let mut alice = server.login("alice").await;
    read_sign_on(&mut alice, 1, 0).await;
    alice.send(&Packet::Idle { idle_secs: 600 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut bob = server.login("bob").await;
    let (_, statuses, _) = read_sign_on(&mut bob, 2, 0).await;
    let alice_status = statuses.iter().find(|s| s.0 == "alice").unwrap();
    assert_eq!(alice_status.1, Status::Idle);
    assert!(
        (601..620).contains(&alice_status.2.unwrap()),
        "{alice_status:?}"
    );

    server.add_user("dave", &password_of("dave"));
    for watcher in [&mut alice, &mut bob] {
        loop {
            match next(watcher).await {
                Packet::AddUser { username } => {
                    assert_eq!(username, "dave");
                    break;
                }
                Packet::StatusChange { .. } => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let server = start();
    server.add_user("alice", &password_of("alice"));
    let wrong = SessionClient::login(&server.connector, server.session_addr, "alice", "nope").await;
    let unknown = SessionClient::login(&server.connector, server.session_addr, "zed", "nope").await;
    let bad_name =
        SessionClient::login(&server.connector, server.session_addr, "a b", "nope").await;
    let (ClientError::LoginRefused(a), ClientError::LoginRefused(b), ClientError::LoginRefused(c)) = (
        wrong.err().unwrap(),
        unknown.err().unwrap(),
        bad_name.err().unwrap(),
    ) else {
        panic!("logins should be refused");
    };
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert!(!a.is_empty());
}

#[tokio::test]
async fn refused_login_is_closed_after_the_response() {
    let server = start();
    server.add_user("alice", &password_of("alice"));
    let mut client = SessionClient::connect(&server.connector, server.session_addr)
        .await
        .unwrap();
    client
        .send(&Packet::Login {
            username: "alice".into(),
            password: "bad".into(),
        })
        .await
        .unwrap();
    match next(&mut client).await {
        Packet::LoginResponse {
            ok: false,
            reason: Some(_),
        } => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_closed(&mut client).await;
}

#[tokio::test]
async fn first_packet_must_be_login() {
    let server = start();
    let mut client = SessionClient::connect(&server.connector, server.session_addr)
        .await
        .unwrap();
    client.send(&Packet::Idle { idle_secs: 1 }).await.unwrap();
    assert_closed(&mut client).await;
}

#[tokio::test]
async fn login_timeout_closes_a_silent_connection() {
    let server = start_with(|c| c.timeouts.login_secs = 1);
    let mut client = SessionClient::connect(&server.connector, server.session_addr)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert_closed(&mut client).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// After `alice` misbehaves, bob sees her go offline and still works.
async fn assert_alice_closed_bob_fine(
    server: &TestServer,
    alice: &mut SessionClient,
    bob: &mut SessionClient,
) {
    assert_closed(alice).await;
    assert_eq!(
        next_status(bob).await,
        ("alice".into(), Status::Offline, None)
    );
    let mut again = server.login("alice").await;
    read_sign_on(&mut again, 2, 0).await;
    assert_eq!(
        next_status(bob).await,
        ("alice".into(), Status::Online, None)
    );
}

#[tokio::test]
async fn garbage_frame_closes_only_that_session() {
    let server = start();
    let (mut alice, mut bob) = pair(&server).await;
    alice
        .send_raw(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1])
        .await
        .unwrap();
    assert_alice_closed_bob_fine(&server, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn two_gib_frame_is_refused_before_reading_it() {
    let server = start();
    let (mut alice, mut bob) = pair(&server).await;
    alice.send_raw(&[0x80, 0, 0, 0]).await.unwrap();
    assert_alice_closed_bob_fine(&server, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn zero_length_frame_closes() {
    let server = start();
    let (mut alice, mut bob) = pair(&server).await;
    alice.send_raw(&[0, 0, 0, 0]).await.unwrap();
    assert_alice_closed_bob_fine(&server, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn server_packet_from_client_closes() {
    let server = start();
    let (mut alice, mut bob) = pair(&server).await;
    alice
        .send(&Packet::AddUser {
            username: "x".into(),
        })
        .await
        .unwrap();
    assert_alice_closed_bob_fine(&server, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn second_login_closes() {
    let server = start();
    let (mut alice, mut bob) = pair(&server).await;
    alice
        .send(&Packet::Login {
            username: "alice".into(),
            password: password_of("alice"),
        })
        .await
        .unwrap();
    assert_alice_closed_bob_fine(&server, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn wrong_field_type_closes() {
    let server = start();
    let (mut alice, mut bob) = pair(&server).await;
    // {"type": "Idle", "idle_secs": "long"}
    let mut body = vec![0x82, 0xa4];
    body.extend_from_slice(b"type");
    body.push(0xa4);
    body.extend_from_slice(b"Idle");
    body.push(0xa9);
    body.extend_from_slice(b"idle_secs");
    body.push(0xa4);
    body.extend_from_slice(b"long");
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    alice.send_raw(&frame).await.unwrap();
    assert_alice_closed_bob_fine(&server, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn unknown_packet_type_is_ignored() {
    let server = start();
    let (mut alice, mut bob) = pair(&server).await;
    // {"type": "Typing", "to": "bob"}
    let body = [
        0x82, 0xa4, b't', b'y', b'p', b'e', 0xa6, b'T', b'y', b'p', b'i', b'n', b'g', 0xa2, b't',
        b'o', 0xa3, b'b', b'o', b'b',
    ];
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    alice.send_raw(&frame).await.unwrap();
    alice.send(&Packet::Idle { idle_secs: 0 }).await.unwrap();
    let (user, status, _) = next_status(&mut bob).await;
    assert_eq!(
        (user.as_str(), status),
        ("alice", Status::Idle),
        "session still alive after unknown type"
    );
}

#[tokio::test]
async fn a_frame_that_stalls_is_closed() {
    let server = start_with(|c| c.timeouts.frame_secs = 1);
    let (mut alice, mut bob) = pair(&server).await;
    alice.send_raw(&[0, 0, 0, 20, 0x81]).await.unwrap();
    assert_alice_closed_bob_fine(&server, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn a_silent_session_is_not_closed_for_silence() {
    let server = start_with(|c| {
        c.timeouts.frame_secs = 1;
        c.timeouts.login_secs = 1;
    });
    let (mut alice, mut bob) = pair(&server).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    alice.send(&Packet::Idle { idle_secs: 0 }).await.unwrap();
    assert_eq!(next_status(&mut bob).await.1, Status::Idle);
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_closed_not_buffered() {
    let server = start_with(|c| {
        c.limits.session_queue = 8;
        c.limits.presence_changes_per_sec = u32::MAX;
    });
    for user in ["alice", "bob", "carol"] {
        server.add_user(user, &password_of(user));
    }
    let mut carol = server.login("carol").await;
    read_sign_on(&mut carol, 1, 0).await;
    // alice's socket takes little before the kernel stops accepting.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.session_addr).await.unwrap();
    let tls = server.connector.handshake(tcp).await.unwrap();
    let mut alice = SessionClient::over(tls);
    alice
        .send(&Packet::Login {
            username: "alice".into(),
            password: password_of("alice"),
        })
        .await
        .unwrap();
    assert!(matches!(
        next(&mut alice).await,
        Packet::LoginResponse { ok: true, .. }
    ));
    read_sign_on(&mut alice, 2, 0).await;
    assert_eq!(next_status(&mut carol).await.0, "alice");
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 3, 0).await;
    assert_eq!(next_status(&mut carol).await.0, "bob");

    // carol keeps reading; alice never reads again; bob floods presence.
    let watcher = tokio::spawn(async move {
        loop {
            match carol.next_packet(Duration::from_secs(60)).await {
                Ok(Some(Packet::StatusChange {
                    username,
                    status: Status::Offline,
                    ..
                })) if username == "alice" => return true,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    });
    let flood = async {
        for _ in 0..200_000 {
            bob.send(&Packet::Idle { idle_secs: 0 }).await.unwrap();
            bob.send(&Packet::NotIdle {}).await.unwrap();
            if watcher.is_finished() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), flood)
        .await
        .expect("flood in time");
    assert!(
        watcher.await.unwrap(),
        "carol saw alice closed for not reading, and kept working"
    );
    drop(alice);
}

/// TCP keepalive finds the dead peers of silent sessions; it is read with
/// getsockopt from the server's own sockets on both ports: on, probing
/// after the configured idle time, every 10 s, 6 probes.
#[tokio::test]
async fn both_ports_keep_tcp_keepalive_on() {
    let server = start_with(|c| c.timeouts.keepalive_secs = 30);
    server.add_user("alice", &password_of("alice"));
    let _alice = server.login("alice").await;
    let _stream = server.connector.connect(server.message_addr).await.unwrap();
    // The server runs in this process: read the options of its accepted
    // sockets themselves.
    for port in [server.session_addr.port(), server.message_addr.port()] {
        let options = accepted_socket_options(port);
        assert_eq!(options.len(), 1, "one accepted socket on port {port}");
        assert_eq!(
            options[0],
            KeepaliveOptions {
                on: true,
                idle_secs: 30,
                interval_secs: 10,
                probes: 6
            },
            "port {port}"
        );
    }
}

#[derive(Debug, PartialEq, Eq)]
struct KeepaliveOptions {
    on: bool,
    idle_secs: i32,
    interval_secs: i32,
    probes: i32,
}

/// The keepalive options of every connected TCP socket of this process
/// whose local port is `port` (the server's side of its connections).
fn accepted_socket_options(port: u16) -> Vec<KeepaliveOptions> {
    let option = |fd: i32, level: i32, name: i32| -> Option<i32> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len are valid for the call's writes.
        let rc = unsafe {
            libc::getsockopt(fd, level, name, (&mut value as *mut i32).cast(), &mut len)
        };
        (rc == 0).then_some(value)
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the addresses are written into zeroed storage of the
        // size given; a descriptor that is not a socket just fails.
        let (local, connected) = unsafe {
            let mut addr: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) != 0
                || i32::from(addr.ss_family) != libc::AF_INET
            {
                continue;
            }
            let v4 = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            let mut peer: libc::sockaddr_storage = std::mem::zeroed();
            let mut peer_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let connected = libc::getpeername(
                fd,
                (&mut peer as *mut libc::sockaddr_storage).cast(),
                &mut peer_len,
            ) == 0;
            (u16::from_be(v4.sin_port), connected)
        };
        if local != port || !connected {
            continue;
        }
        if let (Some(on), Some(idle_secs), Some(interval_secs), Some(probes)) = (
            option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        ) {
            found.push(KeepaliveOptions {
                on: on != 0,
                idle_secs,
                interval_secs,
                probes,
            });
        }
    }
    found
}
