//! The message stream, end to end over TLS: send, receive, `done` both
//! ways, idempotent retries, every error code, and durability across a
//! restart.
//!
//! The suite is in `contract/message.rs` and runs once per backend: on the
//! embedded sled store, and on a PostgreSQL that the tests start
//! themselves (module `postgres`, built when PostgreSQL's programs are
//! installed; CI requires them), and once more on sled with the session
//! streams on the network threads, where a recipient's notice crosses
//! threads before the sender's `done`.

#[macro_use]
mod common;

contract_suite!("message.rs", also_with_sessions_on_network_threads);

/// Large data is written to its spool file by the courier before the
/// mailbox records it; a send refused or retried after that must not leave
/// the file behind. (The embedded store only: PostgreSQL keeps data in its
/// rows.)
#[tokio::test]
async fn refused_and_retried_large_sends_leave_no_spool_file() {
    use csm::client::ClientError;
    use csm_actors::proto::data::{Attachment, MessageData};
    use csm_actors::proto::lines::ErrorCode;

    let server = common::TestServer::start_with(|c| c.limits.mailbox_messages = 2);
    for name in ["alice", "bob"] {
        server.add_user(name, &common::password_of(name));
    }
    let spool = csm::config::store_dir(&server.data_dir).join("spool");
    let files = || std::fs::read_dir(&spool).unwrap().count();
    let large = |fill: u8| {
        MessageData::new("large", vec![Attachment::new("a", vec![fill; 100_000])])
            .encode()
            .unwrap()
    };
    let refused = |result: Result<(), ClientError>| match result {
        Err(ClientError::Refused(e)) => e.code,
        other => panic!("expected an error line, got {other:?}"),
    };

    server
        .send("alice", "big", &["bob"], &large(1))
        .await
        .unwrap();
    assert_eq!(files(), 1);
    server
        .send("alice", "big", &["bob"], &large(1))
        .await
        .unwrap();
    assert_eq!(files(), 1, "a retry left its staged file");
    let other = server.send("alice", "big", &["bob"], &large(2)).await;
    assert_eq!(refused(other), ErrorCode::Duplicate);
    assert_eq!(files(), 1, "a duplicate left its staged file");
    server
        .send("alice", "next", &["bob"], &large(3))
        .await
        .unwrap();
    assert_eq!(files(), 2);
    let over = server.send("alice", "over", &["bob"], &large(4)).await;
    assert_eq!(refused(over), ErrorCode::Quota);
    assert_eq!(files(), 2, "a send over quota left its staged file");

    for (id, fill) in [("big", 1), ("next", 3)] {
        let got = server.receive("bob", id).await.unwrap();
        assert!(got.data == large(fill), "{id} came back changed");
    }
    // The file goes once the removal is durable.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while files() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(files(), 0, "the received message's file stayed");
}
