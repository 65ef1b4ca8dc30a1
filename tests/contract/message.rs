// The message stream, end to end over TLS: send, receive, `done` both
// ways, idempotent retries, every error code, and durability across a
// restart.

use common::*;
use csm::client::{fetch_message, ClientError};
use csm_actors::proto::data::{Attachment, MessageData};
use csm_actors::proto::lines::ErrorCode;
use csm_actors::proto::Packet;

fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused(e)) => e.code,
        other => panic!("expected an error line, got {other:?}"),
    }
}

fn users(server: &TestServer, names: &[&str]) {
    for name in names {
        server.add_user(name, &password_of(name));
    }
}

#[tokio::test]
async fn offline_recipient_gets_notice_at_sign_on_then_identical_bytes_then_removal() {
    let server = start();
    users(&server, &["alice", "bob"]);
    let data = sample_data("hello \0 bob 😀");
    server.send("alice", "id-1", &["bob"], &data).await.unwrap();

    let mut bob = server.login("bob").await;
    let (_, _, messages) = read_sign_on(&mut bob, 1, 1).await;
    assert_eq!(
        messages,
        vec![("id-1".to_string(), "alice".to_string(), data.len() as u64)]
    );

    let got = server.receive("bob", "id-1").await.unwrap();
    assert_eq!(got.sender, "alice");
    assert_eq!(got.id, "id-1");
    assert_eq!(got.recipients, vec!["bob"]);
    assert_eq!(got.data, data, "byte for byte what the sender sent");
    let parsed = MessageData::parse(&got.data, Default::default()).unwrap();
    assert_eq!(parsed.text(), "hello \0 bob 😀");

    assert_eq!(
        refused(server.receive("bob", "id-1").await),
        ErrorCode::NoSuchMessage
    );
    bob.close().await;
    let mut bob = server.login("bob").await;
    let (_, _, messages) = read_sign_on(&mut bob, 1, 0).await;
    assert!(messages.is_empty());
}

#[tokio::test]
async fn receive_answer_is_the_send_format_byte_for_byte() {
    let server = start();
    users(&server, &["alice", "bob", "carol"]);
    let data = MessageData::new("", vec![]).encode().unwrap();
    server
        .send("alice", "exact", &["bob", "carol"], &data)
        .await
        .unwrap();
    let request = format!("bob\n{}\nexact\nreceive\n", password_of("bob"));
    let expected = b"alice\n\nexact\nsend\nbob\ncarol\n\nc\0\0\0\0\0\0";
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = server.connector.connect(server.message_addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let mut answer = vec![0u8; expected.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        String::from_utf8_lossy(expected)
    );
    drop(stream);
    // No done was sent: the message stays.
    assert!(server.receive("bob", "exact").await.is_ok());
}

#[tokio::test]
async fn connection_ending_before_done_keeps_the_message() {
    let server = start();
    users(&server, &["alice", "bob"]);
    server
        .send("alice", "keep", &["bob"], &sample_data("x"))
        .await
        .unwrap();
    let first = fetch_message(
        &server.connector,
        server.message_addr,
        "bob",
        &password_of("bob"),
        "keep",
        false,
    )
    .await
    .unwrap();
    let again = server.receive("bob", "keep").await.unwrap();
    assert_eq!(first, again);
}

#[tokio::test]
async fn online_recipient_hears_message_available() {
    let server = start();
    users(&server, &["alice", "bob"]);
    let mut bob1 = server.login("bob").await;
    read_sign_on(&mut bob1, 1, 0).await;
    let mut bob2 = server.login("bob").await;
    read_sign_on(&mut bob2, 1, 0).await;
    let data = sample_data("ping");
    server
        .send("alice", "live-1", &["bob"], &data)
        .await
        .unwrap();
    for session in [&mut bob1, &mut bob2] {
        assert_eq!(
            next(session).await,
            Packet::MessageAvailable {
                id: "live-1".into(),
                from: "alice".into(),
                size: data.len() as u64
            },
            "every open session of the recipient is told"
        );
    }
}

/// The notice is on its way to the recipient before the sender reads
/// `done`: on loopback the server's write lands in the peer's receive
/// buffer at once, so right after each `done` the recipient's socket must
/// already hold bytes (it held none before the send). The recipient's
/// session writer waits 30 ms before each write (a failpoint), as a writer
/// on a busy thread would: the order must not hold by luck of scheduling.
#[tokio::test]
async fn message_available_is_written_before_the_senders_done() {
    use std::os::fd::AsRawFd;
    // Named `bob` below; its session's writer is the slow one.
    let slow = csm_actors::FAILPOINT_SLOW_WRITER_USER;
    let server = start();
    users(&server, &["alice", slow]);
    let tcp = tokio::net::TcpStream::connect(server.session_addr)
        .await
        .unwrap();
    let bob_fd = tcp.as_raw_fd();
    let tls = server.connector.handshake(tcp).await.unwrap();
    let mut bob = csm::client::SessionClient::over(tls)
        .sign_on(slow, &password_of(slow))
        .await
        .unwrap();
    read_sign_on(&mut bob, 1, 0).await;
    let pending = || {
        let mut bytes: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; bob's socket is open here.
        assert_eq!(unsafe { libc::ioctl(bob_fd, libc::FIONREAD, &mut bytes) }, 0);
        bytes
    };
    for n in 0..20 {
        let id = format!("ordered-{n}");
        assert_eq!(pending(), 0, "nothing waits before send {n}");
        server.send("alice", &id, &[slow], &sample_data("x")).await.unwrap();
        assert!(
            pending() > 0,
            "after the done of {id}, bob's notice is not yet in his socket"
        );
        match next(&mut bob).await {
            Packet::MessageAvailable { id: got, .. } => assert_eq!(got, id),
            other => panic!("expected the notice of {id}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn several_recipients_each_get_their_copy() {
    let server = start();
    users(&server, &["alice", "bob", "carol"]);
    let data = sample_data("to both");
    server
        .send("alice", "multi", &["bob", "carol", "bob"], &data)
        .await
        .unwrap();
    let for_bob = server.receive("bob", "multi").await.unwrap();
    assert_eq!(
        for_bob.recipients,
        vec!["bob", "carol"],
        "repeats are ignored"
    );
    assert_eq!(
        refused(server.receive("bob", "multi").await),
        ErrorCode::NoSuchMessage
    );
    let for_carol = server.receive("carol", "multi").await.unwrap();
    assert_eq!(
        for_carol.data, data,
        "bob's done does not remove carol's copy"
    );
}

#[tokio::test]
async fn retries_with_the_same_id_store_one_copy() {
    let server = start();
    users(&server, &["alice", "bob", "carol"]);
    let data = sample_data("once");
    server
        .send("alice", "retry", &["bob"], &data)
        .await
        .unwrap();
    server
        .send("alice", "retry", &["bob"], &data)
        .await
        .unwrap();
    let mut bob = server.login("bob").await;
    let (_, _, messages) = read_sign_on(&mut bob, 1, 1).await;
    assert_eq!(messages.len(), 1);
    server.receive("bob", "retry").await.unwrap();
    // Also after the recipient already has it.
    server
        .send("alice", "retry", &["bob"], &data)
        .await
        .unwrap();
    assert_eq!(
        refused(server.receive("bob", "retry").await),
        ErrorCode::NoSuchMessage
    );
    // Same id, other data / other recipients / other sender: duplicate.
    assert_eq!(
        refused(
            server
                .send("alice", "retry", &["bob"], &sample_data("other"))
                .await
        ),
        ErrorCode::Duplicate
    );
    assert_eq!(
        refused(server.send("alice", "retry", &["carol"], &data).await),
        ErrorCode::Duplicate
    );
    assert_eq!(
        refused(server.send("carol", "retry", &["bob"], &data).await),
        ErrorCode::Duplicate
    );
}

#[tokio::test]
async fn auth_error_is_the_same_for_unknown_user_and_wrong_password() {
    let server = start();
    users(&server, &["alice", "bob"]);
    let wrong = raw_exchange(&server, b"alice\nwrong\nid\nsend\nbob\n\nc", false).await;
    let unknown = raw_exchange(&server, b"nobody\nwrong\nid\nsend\nbob\n\nc", false).await;
    assert_error(&wrong, "auth");
    assert_eq!(wrong, unknown);
}

#[tokio::test]
async fn malformed_requests() {
    let server = start();
    users(&server, &["alice", "bob"]);
    let pw = password_of("alice");
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "unknown action",
            format!("alice\n{pw}\nid\nfetch\n").into_bytes(),
            false,
        ),
        (
            "empty id",
            format!("alice\n{pw}\n\nsend\n").into_bytes(),
            false,
        ),
        (
            "id of 257 bytes",
            format!("alice\n{pw}\n{}\nsend\n", "i".repeat(257)).into_bytes(),
            false,
        ),
        ("header cut short", b"alice\n".to_vec(), true),
        (
            "no recipients",
            format!("alice\n{pw}\nid\nsend\n\nc").into_bytes(),
            false,
        ),
        (
            "x instead of c",
            format!("alice\n{pw}\nid\nsend\nbob\n\nx\0\0\0\0\0\0").into_bytes(),
            false,
        ),
        (
            "negative count",
            [
                send_request("alice", "id", &["bob"]),
                vec![0, 0, 0xff, 0xff, 0xff, 0xff],
            ]
            .concat(),
            false,
        ),
        (
            "negative length",
            [
                send_request("alice", "id", &["bob"]),
                vec![0, 0, 0, 0, 0, 1, 0, 1, b'a', 0xff, 0xff, 0xff, 0xfe],
            ]
            .concat(),
            false,
        ),
        (
            "bad modified UTF-8",
            [
                send_request("alice", "id", &["bob"]),
                vec![0, 1, 0x80, 0, 0, 0, 0],
            ]
            .concat(),
            false,
        ),
        (
            "4-byte UTF-8",
            [
                send_request("alice", "id", &["bob"]),
                vec![0, 4, 0xf0, 0x9f, 0x98, 0x80, 0, 0, 0, 0],
            ]
            .concat(),
            false,
        ),
        (
            "count past the data",
            [
                send_request("alice", "id", &["bob"]),
                vec![0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0],
            ]
            .concat(),
            true,
        ),
    ];
    for (what, bytes, eof) in cases {
        let answer = raw_exchange(&server, &bytes, eof).await;
        assert!(answer.starts_with("error malformed "), "{what}: {answer:?}");
    }
    let mut bob = server.login("bob").await;
    let (_, _, messages) = read_sign_on(&mut bob, 1, 0).await;
    assert!(messages.is_empty(), "nothing stored by malformed sends");
}

#[tokio::test]
async fn too_large_requests() {
    let server = start_with(|c| {
        c.limits.message_bytes = 1000;
        c.limits.attachments = 2;
        c.limits.recipients = 2;
    });
    users(&server, &["alice", "bob", "carol", "dave"]);
    let long_line = format!("{}\n", "a".repeat(1025));
    assert_error(
        &raw_exchange(&server, long_line.as_bytes(), false).await,
        "too-large",
    );
    let big = MessageData::new("x", vec![Attachment::new("a", vec![0; 2000])])
        .encode()
        .unwrap();
    assert_eq!(
        refused(server.send("alice", "big", &["bob"], &big).await),
        ErrorCode::TooLarge
    );
    let many = MessageData::new("x", vec![Attachment::new("a", vec![]); 3])
        .encode()
        .unwrap();
    assert_eq!(
        refused(server.send("alice", "many", &["bob"], &many).await),
        ErrorCode::TooLarge
    );
    let small = sample_data("");
    let small = &small[..0];
    let _ = small;
    let ok = MessageData::new("x", vec![]).encode().unwrap();
    assert_eq!(
        refused(
            server
                .send("alice", "crowd", &["bob", "carol", "dave"], &ok)
                .await
        ),
        ErrorCode::TooLarge
    );
    server
        .send("alice", "fits", &["bob", "carol", "bob"], &ok)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_line_limit_counts_every_byte_before_the_lf() {
    let server = start_with(|c| c.limits.line_bytes = 8);
    users(&server, &["alice", "bob"]);
    // "bob\r" is 4 bytes; "12345678\r" is 9 and over the limit of 8.
    let answer = raw_exchange(&server, b"12345678\r\n", false).await;
    assert_error(&answer, "too-large");
}

#[tokio::test]
async fn unknown_recipient_stores_nothing_for_anyone() {
    let server = start();
    users(&server, &["alice", "bob"]);
    let data = sample_data("x");
    assert_eq!(
        refused(server.send("alice", "u1", &["bob", "zed"], &data).await),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(
        refused(
            server
                .send("alice", "u2", &["bob", "bad name"], &data)
                .await
        ),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(
        refused(server.receive("bob", "u1").await),
        ErrorCode::NoSuchMessage
    );
    // The id was not used up by the refused send.
    server.send("alice", "u1", &["bob"], &data).await.unwrap();
}

#[tokio::test]
async fn no_such_message_also_for_someone_elses_message() {
    let server = start();
    users(&server, &["alice", "bob", "carol"]);
    server
        .send("alice", "for-bob", &["bob"], &sample_data("x"))
        .await
        .unwrap();
    assert_eq!(
        refused(server.receive("carol", "for-bob").await),
        ErrorCode::NoSuchMessage
    );
    assert_eq!(
        refused(server.receive("carol", "never").await),
        ErrorCode::NoSuchMessage
    );
    assert!(server.receive("bob", "for-bob").await.is_ok());
}

#[tokio::test]
async fn full_mailbox_is_quota_and_stores_nothing() {
    let server = start_with(|c| c.limits.mailbox_messages = 1);
    users(&server, &["alice", "bob", "carol"]);
    let data = sample_data("x");
    server.send("alice", "q1", &["bob"], &data).await.unwrap();
    assert_eq!(
        refused(server.send("alice", "q2", &["carol", "bob"], &data).await),
        ErrorCode::Quota
    );
    assert_eq!(
        refused(server.receive("carol", "q2").await),
        ErrorCode::NoSuchMessage
    );
    // An exact retry of an accepted message is not a new message.
    server.send("alice", "q1", &["bob"], &data).await.unwrap();
    server.receive("bob", "q1").await.unwrap();
    server
        .send("alice", "q2", &["carol", "bob"], &data)
        .await
        .unwrap();
}

#[tokio::test]
async fn shutting_down_server_answers_unavailable() {
    let mut server = start();
    users(&server, &["alice", "bob"]);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = server.connector.connect(server.message_addr).await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(stream);
    server.begin_stop();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    writer
        .write_all(&send_request("alice", "late", &["bob"]))
        .await
        .unwrap();
    writer.flush().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, reader.read_to_end(&mut answer)).await;
    assert_error(&String::from_utf8_lossy(&answer), "unavailable");
}

#[tokio::test]
async fn sixteen_mib_message_round_trips() {
    let server = start();
    users(&server, &["alice", "bob"]);
    let chunk = 16 * 1024 * 1024 / 2 - 100;
    let data = MessageData::new(
        "big",
        vec![
            Attachment::new("a.bin", (0..chunk).map(|i| (i % 251) as u8).collect()),
            Attachment::new("b.bin", vec![0xAB; chunk]),
        ],
    )
    .encode()
    .unwrap();
    assert!(data.len() <= 16 * 1024 * 1024);
    server.send("alice", "huge", &["bob"], &data).await.unwrap();
    let got = server.receive("bob", "huge").await.unwrap();
    assert!(got.data == data, "16 MiB came back changed");
}

#[tokio::test]
async fn restart_keeps_users_messages_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample_data("survives");
    {
        let server = start_in(dir.path(), |_| {});
        users(&server, &["alice", "bob", "carol"]);
        server
            .send("alice", "durable", &["bob", "carol"], &data)
            .await
            .unwrap();
        server.receive("carol", "durable").await.unwrap();
        server.stop();
    }
    let server = start_in(dir.path(), |_| {});
    let mut bob = server.login("bob").await;
    let (added, _, messages) = read_sign_on(&mut bob, 1, 1).await;
    assert_eq!(added, vec!["alice", "bob", "carol"]);
    assert_eq!(messages[0].0, "durable");
    // A retry after the restart is still recognised.
    server
        .send("alice", "durable", &["bob", "carol"], &data)
        .await
        .unwrap();
    assert_eq!(server.receive("bob", "durable").await.unwrap().data, data);
    assert_eq!(
        refused(server.receive("carol", "durable").await),
        ErrorCode::NoSuchMessage
    );
}
