//! docs/PROTOCOL.md's hex examples are what the shared protocol code
//! produces: each example is encoded here and must appear in the document.

use csm_actors::proto::data::{Attachment, MessageData};
use csm_actors::proto::lines::{recipients_block, Action, ErrorCode, Header, StreamError};
use csm_actors::proto::{Packet, Status};

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap()
}

#[test]
fn every_packet_example_is_exact() {
    let doc = doc();
    let packets = [
        Packet::Login {
            username: "alice".into(),
            password: "s3cret".into(),
        },
        Packet::LoginResponse {
            ok: true,
            reason: None,
        },
        Packet::LoginResponse {
            ok: false,
            reason: Some(csm_actors::session::LOGIN_REFUSED.into()),
        },
        Packet::AddUser {
            username: "bob".into(),
        },
        Packet::StatusChange {
            username: "bob".into(),
            status: Status::Online,
            idle_secs: None,
        },
        Packet::StatusChange {
            username: "bob".into(),
            status: Status::Idle,
            idle_secs: Some(300),
        },
        Packet::StatusChange {
            username: "bob".into(),
            status: Status::Back,
            idle_secs: None,
        },
        Packet::StatusChange {
            username: "bob".into(),
            status: Status::Offline,
            idle_secs: None,
        },
        Packet::Idle { idle_secs: 120 },
        Packet::NotIdle {},
        Packet::MessageAvailable {
            id: "m1".into(),
            from: "bob".into(),
            size: 26,
        },
    ];
    for packet in packets {
        let frame = hex(&packet.to_frame());
        assert!(
            doc.contains(&frame),
            "PROTOCOL.md lacks {packet:?}:\n{frame}"
        );
    }
}

#[test]
fn send_receive_and_error_examples_are_exact() {
    let doc = doc();
    let data = MessageData::new("Hi\0", vec![Attachment::new("a.txt", b"xyz".to_vec())])
        .encode()
        .unwrap();
    assert!(doc.contains(&hex(&data)));
    let recipients = vec!["bob".to_string()];
    let mut send = Header {
        username: "alice".into(),
        password: "s3cret".into(),
        message_id: "m1".into(),
        action: Action::Send,
    }
    .to_lines();
    send.extend(recipients_block(&recipients));
    send.extend(&data);
    assert!(doc.contains(&hex(&send)), "send example");
    let receive = Header {
        username: "bob".into(),
        password: "pw".into(),
        message_id: "m1".into(),
        action: Action::Receive,
    };
    assert!(doc.contains(&format!("client: {}", hex(&receive.to_lines()))));
    let mut answer = Header {
        username: "alice".into(),
        password: String::new(),
        message_id: "m1".into(),
        action: Action::Send,
    }
    .to_lines();
    answer.extend(recipients_block(&recipients));
    answer.extend(&data);
    assert!(
        doc.contains(&format!("server: {}", hex(&answer))),
        "receive answer example"
    );
    let error = StreamError::new(ErrorCode::UnknownRecipient, "no user zed").to_line();
    assert!(doc.contains(&hex(&error)));
    assert!(doc.contains(&hex(b"done\n")));
    for code in ErrorCode::ALL {
        assert!(
            doc.contains(&format!("| `{}` |", code.as_str())),
            "{code} documented"
        );
    }
}
