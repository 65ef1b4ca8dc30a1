//! The hints nodes send each other with `NOTIFY` on [`CHANNEL`]: one line
//! of tab-separated fields, the first naming the kind. Usernames and node
//! names never hold a tab; message ids may, so an id travels as hex, last.
//! `NOTIFY` payloads stop short of 8,000 bytes: a message to many
//! recipients is announced in several hints of at most
//! [`MAX_HINT_BYTES`].

use std::fmt::Write;

/// The channel every node listens on.
pub const CHANNEL: &str = "csm";

/// Largest payload built (PostgreSQL's own limit is 8,000 bytes).
pub const MAX_HINT_BYTES: usize = 7_000;

/// How one node shows a user it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// At least one session there is in use.
    Active,
    /// Every session there is idle, the last since this Unix time (ms).
    Idle { since_ms: i64 },
}

/// A stored message some recipients should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailHint {
    /// The node that stored it (it told its own sessions already).
    pub origin: String,
    pub seq: u64,
    pub size: u64,
    pub from: String,
    pub recipients: Vec<String>,
    pub id: String,
}

/// One hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    Mail(MailHint),
    /// `node` shows `user` as `state` (`None`: not signed on there) as of
    /// `version`, which only grows for one node.
    Presence {
        node: String,
        version: i64,
        user: String,
        state: Option<NodeState>,
    },
    /// A node started (or came back after its lease ran out).
    NodeUp {
        node: String,
    },
    /// A node's lease ran out or it stopped: its users are gone from it.
    NodeGone {
        node: String,
    },
    UserAdded {
        user: String,
    },
    UserRemoved {
        user: String,
    },
    PasswordChanged {
        user: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl MailHint {
    /// The payloads announcing this message, recipients spread so that
    /// each stays under [`MAX_HINT_BYTES`].
    pub fn payloads(&self) -> Vec<String> {
        let head = format!(
            "m\t{}\t{}\t{}\t{}\t{}",
            self.origin,
            self.seq,
            self.size,
            self.from,
            hex(self.id.as_bytes())
        );
        let mut payloads = Vec::new();
        let mut current = head.clone();
        let mut count = 0;
        for recipient in &self.recipients {
            if count > 0 && current.len() + 1 + recipient.len() > MAX_HINT_BYTES {
                payloads.push(std::mem::replace(&mut current, head.clone()));
                count = 0;
            }
            current.push('\t');
            current.push_str(recipient);
            count += 1;
        }
        if count > 0 {
            payloads.push(current);
        }
        payloads
    }
}

impl Hint {
    /// The payload of this hint. A `Mail` hint whose recipients do not fit
    /// in one payload is sent as [`MailHint::payloads`]; this is the first.
    pub fn payload(&self) -> String {
        match self {
            Hint::Mail(mail) => mail.payloads().into_iter().next().unwrap_or_default(),
            Hint::Presence {
                node,
                version,
                user,
                state,
            } => {
                let state = match state {
                    None => "O".to_owned(),
                    Some(NodeState::Active) => "A".to_owned(),
                    Some(NodeState::Idle { since_ms }) => format!("I{since_ms}"),
                };
                format!("p\t{node}\t{version}\t{user}\t{state}")
            }
            Hint::NodeUp { node } => format!("n\t{node}"),
            Hint::NodeGone { node } => format!("g\t{node}"),
            Hint::UserAdded { user } => format!("u\t{user}"),
            Hint::UserRemoved { user } => format!("r\t{user}"),
            Hint::PasswordChanged { user } => format!("w\t{user}"),
        }
    }

    /// Reads a payload; `None` for one this build does not know (a newer
    /// node's), which is ignored.
    pub fn parse(payload: &str) -> Option<Hint> {
        let mut fields = payload.split('\t');
        let kind = fields.next()?;
        let one = |mut fields: std::str::Split<'_, char>| -> Option<String> {
            let value = fields.next()?.to_owned();
            fields.next().is_none().then_some(value)
        };
        Some(match kind {
            "m" => {
                let origin = fields.next()?.to_owned();
                let seq = fields.next()?.parse().ok()?;
                let size = fields.next()?.parse().ok()?;
                let from = fields.next()?.to_owned();
                let id = String::from_utf8(unhex(fields.next()?)?).ok()?;
                let recipients: Vec<String> = fields.map(str::to_owned).collect();
                if recipients.is_empty() {
                    return None;
                }
                Hint::Mail(MailHint {
                    origin,
                    seq,
                    size,
                    from,
                    recipients,
                    id,
                })
            }
            "p" => {
                let node = fields.next()?.to_owned();
                let version = fields.next()?.parse().ok()?;
                let user = fields.next()?.to_owned();
                let state = match fields.next()? {
                    "O" => None,
                    "A" => Some(NodeState::Active),
                    idle => Some(NodeState::Idle {
                        since_ms: idle.strip_prefix('I')?.parse().ok()?,
                    }),
                };
                Hint::Presence {
                    node,
                    version,
                    user,
                    state,
                }
            }
            "n" => Hint::NodeUp { node: one(fields)? },
            "g" => Hint::NodeGone { node: one(fields)? },
            "u" => Hint::UserAdded { user: one(fields)? },
            "r" => Hint::UserRemoved { user: one(fields)? },
            "w" => Hint::PasswordChanged { user: one(fields)? },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hint_reads_back() {
        let hints = [
            Hint::Presence {
                node: "a:4710".into(),
                version: 17,
                user: "bob".into(),
                state: Some(NodeState::Idle { since_ms: 1234 }),
            },
            Hint::Presence {
                node: "a".into(),
                version: 1,
                user: "bob".into(),
                state: None,
            },
            Hint::NodeUp { node: "n1".into() },
            Hint::NodeGone { node: "n1".into() },
            Hint::UserAdded { user: "x".into() },
            Hint::UserRemoved { user: "x".into() },
            Hint::PasswordChanged { user: "x".into() },
        ];
        for hint in hints {
            assert_eq!(Hint::parse(&hint.payload()), Some(hint));
        }
        assert_eq!(Hint::parse("z\tnew kind"), None);
        assert_eq!(Hint::parse("u\ta\tb"), None);
    }

    #[test]
    fn mail_hints_carry_any_id_and_split_long_recipient_lists() {
        let mail = MailHint {
            origin: "n1".into(),
            seq: 42,
            size: 9,
            from: "alice".into(),
            recipients: (0..1000).map(|i| format!("user-{i:059}")).collect(),
            id: "tab\there \u{0}nul é".into(),
        };
        let payloads = mail.payloads();
        assert!(payloads.len() > 1);
        let mut recipients = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_HINT_BYTES, "{}", payload.len());
            let Some(Hint::Mail(part)) = Hint::parse(payload) else {
                panic!("{payload}")
            };
            assert_eq!(part.id, mail.id);
            assert_eq!((part.seq, part.size), (42, 9));
            recipients.extend(part.recipients);
        }
        assert_eq!(recipients, mail.recipients);
    }
}
