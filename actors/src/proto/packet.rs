//! Session-stream packets: one MessagePack map with string keys per frame,
//! the key `type` naming the packet. Encoding goes through serde; decoding
//! reads the bytes directly (see `msgpack.rs`): the whole body is checked
//! first, with a nesting limit, so that an unknown `type` can be told apart
//! from a known packet with a field of the wrong type.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::frame::encode_frame;
use super::msgpack::{Item, Malformed, Reader};

/// Deepest nesting of MessagePack containers accepted in a packet. Packets
/// are flat maps; anything deeper is hostile.
pub const MAX_NESTING: usize = 8;

/// A user's presence as shown to others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Online,
    Offline,
    Idle,
    Back,
}

/// Every packet of the session stream, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Packet {
    /// client → server: the first frame of every session.
    Login { username: String, password: String },
    /// server → client: the answer to `Login`; `reason` when `ok` is false.
    LoginResponse {
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// server → client: a registered user.
    AddUser { username: String },
    /// server → client: a user's presence; `idle_secs` with `IDLE` only.
    StatusChange {
        username: String,
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idle_secs: Option<u64>,
    },
    /// client → server: this session has been idle for `idle_secs`.
    Idle {
        #[serde(default)]
        idle_secs: u64,
    },
    /// client → server: this session is in use again.
    NotIdle {},
    /// server → client: a message waits in the user's mailbox.
    MessageAvailable { id: String, from: String, size: u64 },
}

/// The result of decoding one frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Known(Packet),
    /// A well-formed map whose `type` this side does not know.
    Unknown(String),
}

/// Why a frame body is not a packet. Each closes the stream.
#[derive(Debug, Error)]
pub enum PacketError {
    #[error("body is not MessagePack: {0}")]
    NotMessagePack(String),
    #[error("body has {0} bytes after the packet")]
    TrailingBytes(usize),
    #[error("packet is not a map with string keys")]
    NotAMap,
    #[error("packet has no string `type`")]
    NoType,
    #[error("{kind} packet has a missing or mistyped field: {detail}")]
    BadField { kind: String, detail: String },
}

/// Every packet `type` this side knows.
pub const KNOWN_TYPES: [&str; 7] = [
    "Login",
    "LoginResponse",
    "AddUser",
    "StatusChange",
    "Idle",
    "NotIdle",
    "MessageAvailable",
];

impl Packet {
    /// The packet's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Packet::Login { .. } => "Login",
            Packet::LoginResponse { .. } => "LoginResponse",
            Packet::AddUser { .. } => "AddUser",
            Packet::StatusChange { .. } => "StatusChange",
            Packet::Idle { .. } => "Idle",
            Packet::NotIdle {} => "NotIdle",
            Packet::MessageAvailable { .. } => "MessageAvailable",
        }
    }

    /// The packet's body: a MessagePack map with `type` first.
    pub fn to_body(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("packets always serialize")
    }

    /// The packet as a whole frame, length prefix included.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_frame(&mut out);
        out
    }

    /// Appends the whole frame to `out`, so many packets share one buffer.
    pub fn write_frame(&self, out: &mut Vec<u8>) {
        encode_frame(&self.to_body(), out);
    }

    /// Decodes one frame body: first the whole body is checked as one
    /// MessagePack value (nesting limited, nothing after it); then every key
    /// must be a UTF-8 string and the last `type` names the packet; then the
    /// fields of a known packet are read, unknown keys ignored.
    pub fn decode(body: &[u8]) -> Result<Decoded, PacketError> {
        let mut check = Reader::new(body);
        check
            .skip_value(0, MAX_NESTING)
            .map_err(|e| PacketError::NotMessagePack(e.to_string()))?;
        if check.remaining() > 0 {
            return Err(PacketError::TrailingBytes(check.remaining()));
        }
        let mut reader = Reader::new(body);
        let Ok(Item::Map(entries)) = reader.next_item() else {
            return Err(PacketError::NotAMap);
        };
        // One pass over the entries finds the type and keeps the value of
        // every field a known packet has, before the type is known (it may
        // come last); which of them belong to the packet is decided after.
        let mut kind = None;
        let mut slots = Slots::default();
        for entry in 0..entries {
            let key = text(reader.next_item()).ok_or(PacketError::NotAMap)?;
            if key == "type" {
                slots.saw_type(entry);
                kind = Some(text(reader.next_item()).ok_or(PacketError::NoType)?);
            } else if let Some(slot) = FIELD_NAMES.iter().position(|name| *name == key) {
                // A scalar is read once; only a container (which no field
                // takes, so only its header is kept) is skipped past.
                let at = reader.clone();
                let item = reader
                    .next_item()
                    .map_err(|e| PacketError::NotMessagePack(e.to_string()))?;
                if matches!(item, Item::Array(_) | Item::Map(_)) {
                    reader = at;
                    skip(&mut reader);
                }
                slots.offer(slot, item, entry);
            } else {
                skip(&mut reader);
            }
        }
        let kind = kind.ok_or(PacketError::NoType)?;
        if !KNOWN_TYPES.contains(&kind) {
            return Ok(Decoded::Unknown(kind.to_owned()));
        }
        let bad = |detail: String| PacketError::BadField {
            kind: kind.to_owned(),
            detail,
        };
        if let Some(name) = slots.first_repeated(fields_of(kind)) {
            return Err(bad(format!("duplicate field `{name}`")));
        }
        slots.packet(kind).map(Decoded::Known).map_err(bad)
    }
}

/// A key that is a valid UTF-8 `str`, or a value that is one.
fn text(item: Result<Item<'_>, Malformed>) -> Option<&str> {
    match item {
        Ok(Item::Str(bytes)) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// Skips a value the first check already found well-formed.
fn skip(reader: &mut Reader<'_>) {
    let checked = reader.skip_value(1, MAX_NESTING);
    debug_assert!(checked.is_ok(), "checked before");
}

/// The fields of each known packet, by name.
fn fields_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "Login" => &["username", "password"],
        "LoginResponse" => &["ok", "reason"],
        "AddUser" => &["username"],
        "StatusChange" => &["username", "status", "idle_secs"],
        "Idle" => &["idle_secs"],
        "MessageAvailable" => &["id", "from", "size"],
        _ => &[],
    }
}

/// Every field name of every known packet.
pub const FIELD_NAMES: [&str; 9] = [
    "username",
    "password",
    "ok",
    "reason",
    "status",
    "idle_secs",
    "id",
    "from",
    "size",
];

/// The value given for each name of [`FIELD_NAMES`] (the first, if given
/// twice), and where a name, or `type`, came a second time; a container
/// value is kept as its header only (no field takes one).
#[derive(Default)]
struct Slots<'a> {
    values: [Option<Item<'a>>; FIELD_NAMES.len()],
    repeated_at: [Option<usize>; FIELD_NAMES.len()],
    type_seen: bool,
    type_repeated_at: Option<usize>,
}

impl<'a> Slots<'a> {
    fn saw_type(&mut self, entry: usize) {
        if std::mem::replace(&mut self.type_seen, true) && self.type_repeated_at.is_none() {
            self.type_repeated_at = Some(entry);
        }
    }

    fn offer(&mut self, slot: usize, item: Item<'a>, entry: usize) {
        if self.values[slot].is_none() {
            self.values[slot] = Some(item);
        } else if self.repeated_at[slot].is_none() {
            self.repeated_at[slot] = Some(entry);
        }
    }

    /// Of `type` and `fields`, the one whose second appearance came first:
    /// a field the packet does not have may come twice, as any unknown key.
    fn first_repeated(&self, fields: &[&'static str]) -> Option<&'static str> {
        let type_repeated = self.type_repeated_at.map(|at| (at, "type"));
        fields
            .iter()
            .filter_map(|&name| {
                let slot = FIELD_NAMES.iter().position(|n| *n == name)?;
                Some((self.repeated_at[slot]?, name))
            })
            .chain(type_repeated)
            .min()
            .map(|(_, name)| name)
    }

    fn take(&mut self, name: &str) -> Option<Item<'a>> {
        let slot = FIELD_NAMES.iter().position(|&n| n == name)?;
        self.values[slot].take()
    }

    fn string(&mut self, name: &str) -> Result<String, String> {
        let item = self
            .take(name)
            .ok_or_else(|| format!("missing field `{name}`"))?;
        as_string(name, item)
    }

    fn optional_string(&mut self, name: &str) -> Result<Option<String>, String> {
        match self.take(name) {
            None | Some(Item::Nil) => Ok(None),
            Some(item) => as_string(name, item).map(Some),
        }
    }

    /// An integer field that may be absent (not nil).
    fn uint(&mut self, name: &str) -> Result<Option<u64>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(item) => as_uint(name, item).map(Some),
        }
    }

    fn required_uint(&mut self, name: &str) -> Result<u64, String> {
        self.uint(name)?
            .ok_or_else(|| format!("missing field `{name}`"))
    }

    /// An `Option` field: absent or nil is `None`.
    fn optional_uint(&mut self, name: &str) -> Result<Option<u64>, String> {
        match self.take(name) {
            None | Some(Item::Nil) => Ok(None),
            Some(item) => as_uint(name, item).map(Some),
        }
    }

    fn packet(mut self, kind: &str) -> Result<Packet, String> {
        Ok(match kind {
            "Login" => Packet::Login {
                username: self.string("username")?,
                password: self.string("password")?,
            },
            "LoginResponse" => Packet::LoginResponse {
                ok: match self.take("ok") {
                    Some(Item::Bool(ok)) => ok,
                    Some(other) => return Err(format!("`ok` is {other:?}, not a boolean")),
                    None => return Err("missing field `ok`".into()),
                },
                reason: self.optional_string("reason")?,
            },
            "AddUser" => Packet::AddUser {
                username: self.string("username")?,
            },
            "StatusChange" => Packet::StatusChange {
                username: self.string("username")?,
                status: match self.take("status") {
                    Some(Item::Str(bytes)) => status_named(bytes)?,
                    Some(other) => return Err(format!("`status` is {other:?}, not a string")),
                    None => return Err("missing field `status`".into()),
                },
                idle_secs: self.optional_uint("idle_secs")?,
            },
            "Idle" => Packet::Idle {
                idle_secs: self.uint("idle_secs")?.unwrap_or(0),
            },
            "NotIdle" => Packet::NotIdle {},
            "MessageAvailable" => Packet::MessageAvailable {
                id: self.string("id")?,
                from: self.string("from")?,
                size: self.required_uint("size")?,
            },
            other => return Err(format!("no fields known for {other}")),
        })
    }
}

fn as_uint(name: &str, item: Item<'_>) -> Result<u64, String> {
    match item {
        Item::Uint(value) => Ok(value),
        other => Err(format!("`{name}` is {other:?}, not an integer >= 0")),
    }
}

/// A text field: a `str`, or a `bin` (as older MessagePack writers send
/// strings), holding UTF-8.
fn as_string(name: &str, item: Item<'_>) -> Result<String, String> {
    match item {
        Item::Str(bytes) | Item::Bin(bytes) => std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| format!("`{name}` is not UTF-8")),
        other => Err(format!("`{name}` is {other:?}, not a string")),
    }
}

fn status_named(bytes: &[u8]) -> Result<Status, String> {
    Ok(match bytes {
        b"ONLINE" => Status::Online,
        b"OFFLINE" => Status::Offline,
        b"IDLE" => Status::Idle,
        b"BACK" => Status::Back,
        other => {
            return Err(format!(
                "unknown status {:?}",
                String::from_utf8_lossy(other)
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn not_idle_is_a_map_with_only_type() {
        assert_eq!(
            hex(&Packet::NotIdle {}.to_frame()),
            "00 00 00 0e 81 a4 74 79 70 65 a7 4e 6f 74 49 64 6c 65"
        );
    }

    #[test]
    fn login_response_ok_omits_reason() {
        let body = Packet::LoginResponse {
            ok: true,
            reason: None,
        }
        .to_body();
        assert_eq!(
            hex(&body),
            "82 a4 74 79 70 65 ad 4c 6f 67 69 6e 52 65 73 70 6f 6e 73 65 a2 6f 6b c3"
        );
    }

    #[test]
    fn status_is_an_uppercase_string() {
        let body = Packet::StatusChange {
            username: "b".into(),
            status: Status::Online,
            idle_secs: None,
        }
        .to_body();
        assert!(
            hex(&body).ends_with("a6 73 74 61 74 75 73 a6 4f 4e 4c 49 4e 45"),
            "{}",
            hex(&body)
        );
    }

    #[test]
    fn every_packet_round_trips() {
        let packets = vec![
            Packet::Login {
                username: "alice".into(),
                password: "pw".into(),
            },
            Packet::LoginResponse {
                ok: false,
                reason: Some("bad".into()),
            },
            Packet::AddUser {
                username: "bob".into(),
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
            Packet::Idle { idle_secs: 7 },
            Packet::NotIdle {},
            Packet::MessageAvailable {
                id: "m1".into(),
                from: "bob".into(),
                size: 1 << 20,
            },
        ];
        for packet in packets {
            assert_eq!(
                Packet::decode(&packet.to_body()).unwrap(),
                Decoded::Known(packet)
            );
        }
    }

    fn map(entries: Vec<(&str, rmpv::Value)>) -> Vec<u8> {
        let value = rmpv::Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &value).unwrap();
        out
    }

    #[test]
    fn unknown_keys_are_ignored_and_idle_secs_defaults() {
        let body = map(vec![("future", 1.into()), ("type", "Idle".into())]);
        assert_eq!(
            Packet::decode(&body).unwrap(),
            Decoded::Known(Packet::Idle { idle_secs: 0 })
        );
    }

    #[test]
    fn unknown_type_is_reported_not_rejected() {
        let body = map(vec![("type", "Typing".into()), ("to", "bob".into())]);
        assert_eq!(
            Packet::decode(&body).unwrap(),
            Decoded::Unknown("Typing".into())
        );
    }

    #[test]
    fn wrong_field_type_is_an_error() {
        let body = map(vec![("type", "Idle".into()), ("idle_secs", "soon".into())]);
        assert!(matches!(
            Packet::decode(&body),
            Err(PacketError::BadField { .. })
        ));
        let body = map(vec![("type", "Idle".into()), ("idle_secs", (-5).into())]);
        assert!(matches!(
            Packet::decode(&body),
            Err(PacketError::BadField { .. })
        ));
        let body = map(vec![("type", "Login".into()), ("username", "a".into())]);
        assert!(matches!(
            Packet::decode(&body),
            Err(PacketError::BadField { .. })
        ));
    }

    #[test]
    fn field_rules_decided_in_the_protocol_page() {
        use rmpv::Value;
        let bad =
            |body: Vec<u8>| matches!(Packet::decode(&body), Err(PacketError::BadField { .. }));
        // A text field may come as `bin` holding UTF-8.
        let body = map(vec![
            ("type", "AddUser".into()),
            ("username", Value::Binary(b"ann".to_vec())),
        ]);
        assert_eq!(
            Packet::decode(&body).unwrap(),
            Decoded::Known(Packet::AddUser {
                username: "ann".into()
            })
        );
        assert!(bad(map(vec![
            ("type", "AddUser".into()),
            ("username", Value::Binary(vec![0xff])),
        ])));
        // A field or `type` given twice.
        assert!(bad(map(vec![
            ("type", "AddUser".into()),
            ("username", "a".into()),
            ("username", "b".into()),
        ])));
        assert!(bad(map(vec![
            ("type", "NotIdle".into()),
            ("type", "NotIdle".into())
        ])));
        // `status` is one of the four strings, nothing else.
        for status in [
            Value::from(0),
            Value::from("online"),
            Value::Binary(b"IDLE".to_vec()),
        ] {
            assert!(bad(map(vec![
                ("type", "StatusChange".into()),
                ("username", "a".into()),
                ("status", status),
            ])));
        }
        // An optional field may be nil; `Idle`'s idle_secs may be absent, not nil.
        let body = map(vec![
            ("type", "StatusChange".into()),
            ("username", "a".into()),
            ("status", "BACK".into()),
            ("idle_secs", Value::Nil),
        ]);
        assert!(matches!(
            Packet::decode(&body),
            Ok(Decoded::Known(Packet::StatusChange {
                idle_secs: None,
                ..
            }))
        ));
        assert!(bad(map(vec![
            ("type", "Idle".into()),
            ("idle_secs", Value::Nil)
        ])));
        // Integers in any width, as long as they are not negative.
        let wide = map(vec![
            ("type", "Idle".into()),
            ("idle_secs", Value::from(7i64)),
        ]);
        assert_eq!(
            Packet::decode(&wide).unwrap(),
            Decoded::Known(Packet::Idle { idle_secs: 7 })
        );
    }

    #[test]
    fn every_field_of_every_packet_has_a_slot() {
        for kind in KNOWN_TYPES {
            for field in fields_of(kind) {
                assert!(FIELD_NAMES.contains(field), "{kind}.{field}");
            }
        }
    }

    #[test]
    fn a_repeated_field_is_refused_only_if_the_packet_has_it() {
        use rmpv::Value;
        // `password` is no field of StatusChange: given twice, it is an
        // unknown key like any other.
        let body = map(vec![
            ("password", "x".into()),
            ("type", "StatusChange".into()),
            ("username", "a".into()),
            ("status", "ONLINE".into()),
            ("password", "y".into()),
        ]);
        assert!(matches!(
            Packet::decode(&body),
            Ok(Decoded::Known(Packet::StatusChange { .. }))
        ));
        // The earliest repeat is the one named, `type` included.
        let body = map(vec![
            ("username", "a".into()),
            ("type", "AddUser".into()),
            ("type", "AddUser".into()),
            ("username", Value::Nil),
        ]);
        match Packet::decode(&body) {
            Err(PacketError::BadField { detail, .. }) => {
                assert_eq!(detail, "duplicate field `type`")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Packet::decode(&[0xc1]).is_err());
        assert!(matches!(
            Packet::decode(&[0x93, 1, 2, 3]),
            Err(PacketError::NotAMap)
        ));
        assert!(matches!(
            Packet::decode(&[0x81, 0x01, 0x02]),
            Err(PacketError::NotAMap)
        ));
        assert!(matches!(Packet::decode(&[0x80]), Err(PacketError::NoType)));
        let mut trailing = Packet::NotIdle {}.to_body();
        trailing.push(0);
        assert!(matches!(
            Packet::decode(&trailing),
            Err(PacketError::TrailingBytes(1))
        ));
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let mut body = vec![0x81, 0xa1, b'x'];
        body.extend(std::iter::repeat_n(0x91, 10_000));
        body.push(0xc0);
        assert!(matches!(
            Packet::decode(&body),
            Err(PacketError::NotMessagePack(_))
        ));
    }
}
