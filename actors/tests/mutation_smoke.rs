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
use csm_actors::proto::packet::{Decoded, KNOWN_TYPES};
use csm_actors::proto::{Packet, PacketError, Status};
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

/// Every kind of packet, encoded, to mutate from.
fn seed_packets() -> Vec<Vec<u8>> {
    [
        Packet::Login {
            username: "alice".into(),
            password: "pässword".into(),
        },
        Packet::LoginResponse {
            ok: false,
            reason: Some("no".into()),
        },
        Packet::LoginResponse {
            ok: true,
            reason: None,
        },
        Packet::AddUser {
            username: "carol".into(),
        },
        Packet::Idle { idle_secs: 300 },
        Packet::NotIdle {},
        Packet::StatusChange {
            username: "bob".into(),
            status: Status::Idle,
            idle_secs: Some(70_000),
        },
        Packet::StatusChange {
            username: "bob".into(),
            status: Status::Back,
            idle_secs: None,
        },
        Packet::MessageAvailable {
            id: "id".into(),
            from: "x".into(),
            size: 1 << 40,
        },
    ]
    .iter()
    .map(Packet::to_body)
    .collect()
}

#[test]
fn packets_survive_mutation() {
    let seeds = seed_packets();
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

/// The decoder as it was first written: a generic value tree (rmpv), then
/// serde. Kept here as the reference the direct decoder must agree with.
fn reference_decode(body: &[u8]) -> Result<Decoded, PacketError> {
    let mut reader = body;
    let value = rmpv::decode::read_value_with_max_depth(&mut reader, 64)
        .map_err(|e| PacketError::NotMessagePack(e.to_string()))?;
    if !reader.is_empty() {
        return Err(PacketError::TrailingBytes(reader.len()));
    }
    let rmpv::Value::Map(entries) = &value else {
        return Err(PacketError::NotAMap);
    };
    let mut kind = None;
    for (key, field) in entries {
        let key = key.as_str().ok_or(PacketError::NotAMap)?;
        if key == "type" {
            kind = Some(field.as_str().ok_or(PacketError::NoType)?.to_owned());
        }
    }
    let kind = kind.ok_or(PacketError::NoType)?;

    if !KNOWN_TYPES.contains(&kind.as_str()) {
        return Ok(Decoded::Unknown(kind));
    }
    rmpv::ext::from_value::<Packet>(value)
        .map(Decoded::Known)
        .map_err(|e| PacketError::BadField {
            kind,
            detail: e.to_string(),
        })
}

/// What a decode came to, without error texts.
fn outcome(result: &Result<Decoded, PacketError>) -> String {
    match result {
        Ok(decoded) => format!("{decoded:?}"),
        Err(PacketError::BadField { kind, .. }) => format!("BadField({kind})"),
        Err(PacketError::TrailingBytes(n)) => format!("TrailingBytes({n})"),
        Err(PacketError::NotMessagePack(_)) => "NotMessagePack".into(),
        Err(PacketError::NotAMap) => "NotAMap".into(),
        Err(PacketError::NoType) => "NoType".into(),
    }
}

/// Asserts both decoders come to the same packet or the same error;
/// true when that is a known packet.
fn decoders_agree(body: &[u8]) -> bool {
    let direct = Packet::decode(body);
    let (d, r) = (outcome(&direct), outcome(&reference_decode(body)));
    assert_eq!(d, r, "{body:02x?}");
    matches!(direct, Ok(Decoded::Known(_)))
}

/// Nested containers in a value, capped at 3.
fn nesting(body: &[u8]) -> usize {
    (0..3)
        .find(|&depth| {
            csm_actors::proto::msgpack::Reader::new(body)
                .skip_value(0, depth)
                .is_ok()
        })
        .unwrap_or(3)
}

#[test]
fn direct_packet_decoding_agrees_with_the_serde_reference() {
    let mut seeds = seed_packets();
    // Unknown keys and types, and a nested unknown value.
    let extra = rmpv::Value::Map(vec![
        ("type".into(), "Idle".into()),
        (
            "later".into(),
            rmpv::Value::Array(vec![1.into(), "x".into()]),
        ),
        ("idle_secs".into(), 5.into()),
    ]);
    let unknown = rmpv::Value::Map(vec![
        ("to".into(), "bob".into()),
        ("type".into(), "Typing".into()),
    ]);
    for value in [extra, unknown] {
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &value).unwrap();
        seeds.push(body);
    }

    let mut rng = StdRng::seed_from_u64(4);
    let mut known = 0;
    for round in 0..ROUNDS {
        let body = mutate(&mut rng, &seeds[round % seeds.len()]);
        // The reference counts nesting its own way; compare flat bodies.
        if nesting(&body) <= 2 {
            known += usize::from(decoders_agree(&body));
        }
    }
    eprintln!("{known} of {ROUNDS} mutants decoded to a known packet");
    assert!(known > 1000, "too few mutants decode: {known}");
}

/// A random value, most often of the kind the field `key` takes.
fn random_value(rng: &mut StdRng, key: &str, depth: usize) -> rmpv::Value {
    use rmpv::Value;
    let texts = [
        "alice", "", "ONLINE", "OFFLINE", "IDLE", "BACK", "idle", "Login", "Typing",
    ];
    let natural = rng.gen_bool(0.6);
    match key {
        "type" if natural => {
            // A known type, or now and then one this side does not know.
            let kind = KNOWN_TYPES.get(rng.gen_range(0..=KNOWN_TYPES.len()));
            return kind.copied().unwrap_or("Typing").into();
        }
        "ok" if natural => return rng.gen::<bool>().into(),
        "idle_secs" | "size" if natural => return rng.gen_range(0..u64::MAX).into(),
        "status" if natural => return texts[rng.gen_range(2..6)].into(),
        _ if natural => return texts[rng.gen_range(0..texts.len())].into(),
        _ => {}
    }
    match rng.gen_range(0..10) {
        0 => Value::Nil,
        1 => rng.gen::<bool>().into(),
        2 => rng.gen_range(0..300u64).into(),
        3 => rng.gen_range(-300..0i64).into(),
        4 => Value::F64(1.5),
        5 => Value::Binary(texts[rng.gen_range(0..texts.len())].as_bytes().to_vec()),
        6 => Value::Ext(1, vec![1, 2]),
        7 if depth < 2 => Value::Array(
            (0..rng.gen_range(0..3))
                .map(|_| random_value(rng, "", depth + 1))
                .collect(),
        ),
        8 if depth < 2 => random_map(rng, depth + 1),
        _ => texts[rng.gen_range(0..texts.len())].into(),
    }
}

/// A random map over the packets' keys, with repeats and strangers; half
/// of them start from a whole packet of one kind.
fn random_map(rng: &mut StdRng, depth: usize) -> rmpv::Value {
    let mut keys = vec!["type", "type", "extra"];
    keys.extend(csm_actors::proto::packet::FIELD_NAMES);
    let kinds: [(&str, &[&str]); 7] = [
        ("Login", &["username", "password"]),
        ("LoginResponse", &["ok", "reason"]),
        ("AddUser", &["username"]),
        ("StatusChange", &["username", "status", "idle_secs"]),
        ("Idle", &["idle_secs"]),
        ("NotIdle", &[]),
        ("MessageAvailable", &["id", "from", "size"]),
    ];
    let mut entries: Vec<(rmpv::Value, rmpv::Value)> = Vec::new();
    if depth == 0 && rng.gen_bool(0.5) {
        let (kind, fields) = kinds[rng.gen_range(0..kinds.len())];
        entries.push(("type".into(), kind.into()));
        for field in fields {
            if rng.gen_range(0..10) > 0 {
                entries.push(((*field).into(), random_value(rng, field, depth)));
            }
        }
    }
    for _ in 0..rng.gen_range(0..4) {
        if rng.gen_range(0..20) == 0 {
            let key = random_value(rng, "", depth + 1);
            entries.push((key, random_value(rng, "", depth + 1)));
        } else {
            let key = keys[rng.gen_range(0..keys.len())];
            entries.push((key.into(), random_value(rng, key, depth)));
        }
    }
    let at = rng.gen_range(0..=entries.len());
    entries.rotate_left(at);
    rmpv::Value::Map(entries)
}

#[test]
fn direct_packet_decoding_agrees_with_the_serde_reference_on_random_maps() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut known = 0;
    for _ in 0..ROUNDS {
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &random_map(&mut rng, 0)).unwrap();
        known += usize::from(decoders_agree(&body));
    }
    eprintln!("{known} of {ROUNDS} random maps decoded to a known packet");
    assert!(known * 20 > ROUNDS, "too few random maps decode: {known}");
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
