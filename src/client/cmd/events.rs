//! What a signed-on client sees, as events for people and scripts: the
//! session stream's packets turned into readable lines (`12:03:04 bob is
//! idle (5 min)`) or JSON objects, shared by `watch` and `chat`.

use std::time::{SystemTime, UNIX_EPOCH};

use csm_actors::proto::{Packet, Status};
use serde_json::{json, Value};

/// One thing that happened on the session stream (or to a message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The sign-on list of users is complete.
    SignedOn {
        user: String,
        users: Vec<String>,
    },
    /// A user was registered after sign-on.
    UserAdded {
        user: String,
    },
    Presence {
        user: String,
        status: Status,
        idle_secs: Option<u64>,
    },
    MessageAvailable {
        id: String,
        from: String,
        size: u64,
    },
    /// A message was received, kept at `path` and acknowledged.
    Saved {
        id: String,
        from: String,
        path: String,
    },
}

impl Event {
    /// `12:03:04 bob is idle (5 min)`.
    pub fn line(&self, at: SystemTime) -> String {
        let what = match self {
            Event::SignedOn { user, users } => {
                const SHOWN: usize = 10;
                let mut names = users
                    .iter()
                    .take(SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if users.len() > SHOWN {
                    names.push_str(", …");
                }
                format!("signed on as {user}; {} users: {names}", users.len())
            }
            Event::UserAdded { user } => format!("{user} was added"),
            Event::Presence {
                user,
                status,
                idle_secs,
            } => format!("{user} is {}", presence_text(*status, *idle_secs)),
            Event::MessageAvailable { id, from, size } => {
                format!("message {id} from {from} ({})", size_text(*size))
            }
            Event::Saved { id, from, path } => format!("message {id} from {from} saved in {path}"),
        };
        format!("{} {what}", clock(at))
    }

    /// The same as one JSON object, with the time in RFC 3339 (UTC).
    pub fn json(&self, at: SystemTime) -> Value {
        let at = humantime::format_rfc3339_seconds(at).to_string();
        match self {
            Event::SignedOn { user, users } => {
                json!({"at": at, "event": "signed-on", "user": user, "users": users})
            }
            Event::UserAdded { user } => json!({"at": at, "event": "user-added", "user": user}),
            Event::Presence {
                user,
                status,
                idle_secs,
            } => {
                let mut value = json!({
                    "at": at, "event": "presence", "user": user, "status": status_name(*status)
                });
                if let Some(secs) = idle_secs {
                    value["idle_secs"] = json!(secs);
                }
                value
            }
            Event::MessageAvailable { id, from, size } => {
                json!({"at": at, "event": "message", "id": id, "from": from, "size": size})
            }
            Event::Saved { id, from, path } => {
                json!({"at": at, "event": "saved", "id": id, "from": from, "path": path})
            }
        }
    }
}

/// Turns packets into events: the sign-on `AddUser` list becomes one
/// `SignedOn` (it ends at the first `StatusChange`, which always follows
/// because the user itself is online), and the user's own presence is left
/// out.
pub struct Events {
    user: String,
    listing: Option<Vec<String>>,
}

impl Events {
    pub fn new(user: &str) -> Events {
        Events {
            user: user.to_owned(),
            listing: Some(Vec::new()),
        }
    }

    /// The events one packet makes (none, one, or the sign-on list and one).
    pub fn feed(&mut self, packet: Packet) -> Vec<Event> {
        let mut events = Vec::new();
        if let Packet::AddUser { username } = packet {
            match &mut self.listing {
                Some(users) => users.push(username),
                None => events.push(Event::UserAdded { user: username }),
            }
            return events;
        }
        if let Some(users) = self.listing.take() {
            events.push(Event::SignedOn {
                user: self.user.clone(),
                users,
            });
        }
        match packet {
            Packet::StatusChange {
                username,
                status,
                idle_secs,
            } if username != self.user => events.push(Event::Presence {
                user: username,
                status,
                idle_secs,
            }),
            Packet::MessageAvailable { id, from, size } => {
                events.push(Event::MessageAvailable { id, from, size })
            }
            _ => {}
        }
        events
    }
}

/// `online`, `offline`, `idle (5 min)`, `back`.
pub fn presence_text(status: Status, idle_secs: Option<u64>) -> String {
    match status {
        Status::Online => "online".into(),
        Status::Offline => "offline".into(),
        Status::Back => "back".into(),
        Status::Idle => format!("idle ({})", duration_text(idle_secs.unwrap_or(0))),
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Online => "online",
        Status::Offline => "offline",
        Status::Idle => "idle",
        Status::Back => "back",
    }
}

/// `40 s`, `5 min`, `2 h 5 min`, `3 d 4 h`.
pub fn duration_text(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h {} min", secs / 3600, (secs % 3600) / 60),
        _ => format!("{} d {} h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

/// `900 B`, `1.2 KiB`, `3.4 MiB`.
pub fn size_text(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// The local wall-clock time as `HH:MM:SS`.
pub fn clock(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r only reads `secs` and writes the `tm` it is given.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        let of_day = secs.rem_euclid(86_400);
        return format!(
            "{:02}:{:02}:{:02}",
            of_day / 3600,
            (of_day % 3600) / 60,
            of_day % 60
        );
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(user: &str, status: Status, idle_secs: Option<u64>) -> Packet {
        Packet::StatusChange {
            username: user.into(),
            status,
            idle_secs,
        }
    }

    #[test]
    fn the_sign_on_list_is_one_event_and_the_own_status_is_left_out() {
        let mut events = Events::new("alice");
        for user in ["alice", "bob"] {
            assert!(events
                .feed(Packet::AddUser {
                    username: user.into()
                })
                .is_empty());
        }
        assert_eq!(
            events.feed(status("alice", Status::Online, None)),
            [Event::SignedOn {
                user: "alice".into(),
                users: vec!["alice".into(), "bob".into()]
            }]
        );
        assert_eq!(
            events.feed(status("bob", Status::Idle, Some(300))),
            [Event::Presence {
                user: "bob".into(),
                status: Status::Idle,
                idle_secs: Some(300)
            }]
        );
        assert_eq!(
            events.feed(Packet::AddUser {
                username: "carol".into()
            }),
            [Event::UserAdded {
                user: "carol".into()
            }]
        );
    }

    #[test]
    fn lines_read_as_sentences() {
        let at = UNIX_EPOCH;
        let idle = Event::Presence {
            user: "bob".into(),
            status: Status::Idle,
            idle_secs: Some(300),
        };
        assert!(idle.line(at).ends_with(" bob is idle (5 min)"));
        assert_eq!(idle.json(at)["idle_secs"], 300);
        assert_eq!(idle.json(at)["status"], "idle");
        assert_eq!(duration_text(7500), "2 h 5 min");
        assert_eq!(size_text(1536), "1.5 KiB");
        let message = Event::MessageAvailable {
            id: "m1".into(),
            from: "bob".into(),
            size: 12,
        };
        assert!(message.line(at).ends_with(" message m1 from bob (12 B)"));
    }
}
