//! Mutation smoke tests of the three parsers a peer can reach: session
//! frames and packets, message-stream lines, and message data. Each starts
//! from valid encodings and throws hundreds of thousands of mutants at the
//! parser (flipped, inserted and deleted bytes, truncations, and length
//! fields set to extremes). None may panic, hang or over-read; message
//! data must also round-trip exactly when it is accepted.
//!
//! This runs on the stable toolchain in every test run. The coverage-guided
//! targets in `fuzz/` go deeper where a nightly toolchain is available.

use std::time::Duration;

use csm_actors::proto::data::{Attachment, DataLimits, MessageData};
use csm_actors::proto::frame::read_frame;
use csm_actors::proto::lines::read_line;
use csm_actors::proto::mutf8;
use csm_actors::proto::{Packet, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let len = bytes.len();
        match rng.gen_range(0..6) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                bytes[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => {
                let i = rng.gen_range(0..=len);
                bytes.insert(i, rng.gen());
            }
            2 if len > 0 => {
                bytes.remove(rng.gen_range(0..len));
            }
            3 => bytes.truncate(rng.gen_range(0..=len)),
            4 if len >= 4 => {
                // An extreme value where a length or count may sit.
                let i = rng.gen_range(0..len - 3);
                let extremes = [[0xFF; 4], [0x7F, 0xFF, 0xFF, 0xFF], [0x80, 0, 0, 0], [0; 4]];
                bytes[i..i + 4].copy_from_slice(&extremes[rng.gen_range(0..4)]);
            }
            _ if len > 0 => {
                let i = rng.gen_range(0..len);
                let special = [0x00, 0x80, 0xC0, 0xDF, 0xE0, 0xED, 0xF0, 0xFF, b'\n', b'\r'];
                bytes[i] = special[rng.gen_range(0..special.len())];
            }
            _ => bytes.push(rng.gen()),
        }
    }
    bytes
}

const ROUNDS: usize = 200_000;

#[test]
fn packets_survive_mutation() {
    let seeds: Vec<Vec<u8>> = [
        Packet::Login {
            username: "alice".into(),
            password: "pässword".into(),
        },
        Packet::Idle { idle_secs: 300 },
        Packet::NotIdle {},
        Packet::StatusChange {
            username: "bob".into(),
            status: Status::Idle,
            idle_secs: Some(70_000),
        },
        Packet::MessageAvailable {
            id: "id".into(),
            from: "x".into(),
            size: 1 << 40,
        },
    ]
    .iter()
    .map(Packet::to_body)
    .collect();
    let mut rng = StdRng::seed_from_u64(1);
    let mut accepted = 0;
    for round in 0..ROUNDS {
        let body = mutate(&mut rng, &seeds[round % seeds.len()]);
        if Packet::decode(&body).is_ok() {
            accepted += 1;
        }
    }
    assert!(
        accepted > 0 && accepted < ROUNDS,
        "mutants both accepted and refused ({accepted})"
    );
}

#[tokio::test]
async fn frames_survive_mutation_without_over_reading() {
    let frame = Packet::Login {
        username: "alice".into(),
        password: "pw".into(),
    }
    .to_frame();
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..ROUNDS / 4 {
        let bytes = mutate(&mut rng, &frame);
        let mut reader = &bytes[..];
        let limit = 64;
        if let Ok(Some(body)) = read_frame(&mut reader, limit, Duration::from_secs(1)).await {
            assert!(!body.is_empty() && body.len() <= limit);
            assert_eq!(
                body.len() + 4 + reader.len(),
                bytes.len(),
                "read exactly one frame"
            );
        }
    }
}

#[tokio::test]
async fn lines_survive_mutation_within_their_limit() {
    let seed = b"alice\r\npassword\nid-1\nsend\nbob\n\nc".to_vec();
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..ROUNDS / 4 {
        let bytes = mutate(&mut rng, &seed);
        let mut reader = tokio::io::BufReader::with_capacity(8, &bytes[..]);
        while let Ok(line) = read_line(&mut reader, 16).await {
            assert!(line.len() <= 16 && !line.contains('\n'));
        }
    }
}

#[test]
fn message_data_survives_mutation_and_accepts_only_exact_encodings() {
    let seeds: Vec<Vec<u8>> = vec![
        MessageData::new(
            "hi \0 😀",
            vec![
                Attachment::new("a.bin", vec![1, 2, 3]),
                Attachment::new("", vec![]),
            ],
        )
        .encode()
        .unwrap(),
        MessageData::new("", vec![]).encode().unwrap(),
        MessageData::new("ünïcode", vec![Attachment::new("x", vec![0; 40])])
            .encode()
            .unwrap(),
    ];
    let limits = DataLimits {
        max_bytes: 512,
        max_attachments: 4,
    };
    let mut rng = StdRng::seed_from_u64(4);
    let mut accepted = 0;
    for round in 0..ROUNDS {
        let bytes = mutate(&mut rng, &seeds[round % seeds.len()]);
        if let Ok(data) = MessageData::parse(&bytes, limits) {
            accepted += 1;
            assert_eq!(
                data.encode().unwrap(),
                bytes,
                "accepted data re-encodes to itself"
            );
            assert!(data.attachments.len() <= 4 && bytes.len() <= 512);
        }
    }
    assert!(accepted > 0 && accepted < ROUNDS);
}

#[test]
fn modified_utf8_validation_agrees_with_decoding() {
    let mut rng = StdRng::seed_from_u64(5);
    let seed = mutf8::encode("a\0é€😀z");
    for _ in 0..ROUNDS {
        let bytes = mutate(&mut rng, &seed);
        assert_eq!(
            mutf8::validate(&bytes).is_ok(),
            mutf8::decode_utf16(&bytes).is_ok()
        );
    }
}
