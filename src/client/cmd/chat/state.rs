//! What the chat shows, apart from how: the users with their presence, one
//! conversation per user, the line being typed and a notice. Keys and
//! session events change it; it knows nothing of terminals or sockets, so
//! it is tested on its own.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use csm_actors::proto::Status;

use super::super::events::{duration_text, Event};

/// Longest line the input takes, in characters.
pub const MAX_INPUT: usize = 4096;
/// Lines kept per conversation; older ones scroll away for good.
pub const MAX_LINES: usize = 1000;

/// How a user is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    Online,
    Idle { since: Instant },
    Offline,
}

impl Shown {
    pub fn text(self, now: Instant) -> String {
        match self {
            Shown::Online => "online".into(),
            Shown::Offline => "offline".into(),
            Shown::Idle { since } => {
                format!(
                    "idle ({})",
                    duration_text(now.duration_since(since).as_secs())
                )
            }
        }
    }
}

/// Where a line of a conversation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// From the other user.
    Received,
    /// Sent by this user; waiting for the server's `done`.
    Sending,
    /// On the server's disk.
    Sent,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Line {
    pub at: SystemTime,
    pub from: String,
    pub text: String,
    pub delivery: Delivery,
    /// The local handle of a message being sent, to mark it when done.
    pub ticket: Option<u64>,
}

/// What a key asks of the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Quit,
    Send {
        ticket: u64,
        to: String,
        text: String,
    },
}

/// A key, as the chat understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Backspace,
    Enter,
    Up,
    Down,
    Quit,
}

pub struct Chat {
    pub me: String,
    /// Everyone else, in byte order of the names (as the server lists them).
    pub users: Vec<String>,
    pub shown: HashMap<String, Shown>,
    pub selected: usize,
    pub conversations: HashMap<String, Vec<Line>>,
    pub unread: HashMap<String, usize>,
    pub input: String,
    pub notice: Option<String>,
    next_ticket: u64,
}

impl Chat {
    pub fn new(me: &str) -> Chat {
        Chat {
            me: me.to_owned(),
            users: Vec::new(),
            shown: HashMap::new(),
            selected: 0,
            conversations: HashMap::new(),
            unread: HashMap::new(),
            input: String::new(),
            notice: None,
            next_ticket: 1,
        }
    }

    pub fn selected_user(&self) -> Option<&str> {
        self.users.get(self.selected).map(String::as_str)
    }

    pub fn shown(&self, user: &str) -> Shown {
        self.shown.get(user).copied().unwrap_or(Shown::Offline)
    }

    /// Applies what the session stream said.
    pub fn apply(&mut self, event: &Event, now: Instant) {
        match event {
            Event::SignedOn { users, .. } => {
                for user in users {
                    self.add_user(user);
                }
            }
            Event::UserAdded { user } => self.add_user(user),
            Event::Presence {
                user,
                status,
                idle_secs,
            } => {
                let shown = match status {
                    Status::Online | Status::Back => Shown::Online,
                    Status::Offline => Shown::Offline,
                    Status::Idle => Shown::Idle {
                        since: now
                            .checked_sub(Duration::from_secs(idle_secs.unwrap_or(0)))
                            .unwrap_or(now),
                    },
                };
                self.shown.insert(user.clone(), shown);
            }
            Event::MessageAvailable { .. } | Event::Saved { .. } => {}
        }
    }

    fn add_user(&mut self, user: &str) {
        if user == self.me {
            return;
        }
        if let Err(at) = self.users.binary_search_by(|u| u.as_str().cmp(user)) {
            let selected = self.selected_user().map(str::to_owned);
            self.users.insert(at, user.to_owned());
            // Keep the same person selected when someone is added above.
            if let Some(selected) = selected {
                if let Ok(index) = self.users.binary_search(&selected) {
                    self.selected = index;
                }
            }
        }
    }

    /// A message from `from` arrived (and is shown before it is
    /// acknowledged).
    pub fn received(&mut self, from: &str, text: String, at: SystemTime) {
        self.add_user(from);
        self.push(
            from,
            Line {
                at,
                from: from.to_owned(),
                text,
                delivery: Delivery::Received,
                ticket: None,
            },
        );
        if self.selected_user() != Some(from) {
            *self.unread.entry(from.to_owned()).or_default() += 1;
        }
    }

    /// The send with `ticket` ended.
    pub fn sent(&mut self, ticket: u64, result: Result<(), String>) {
        let line = self
            .conversations
            .values_mut()
            .flat_map(|lines| lines.iter_mut())
            .find(|line| line.ticket == Some(ticket));
        if let Some(line) = line {
            line.delivery = match result {
                Ok(()) => Delivery::Sent,
                Err(e) => Delivery::Failed(e),
            };
        }
    }

    pub fn key(&mut self, key: Key, at: SystemTime) -> Action {
        match key {
            Key::Quit => return Action::Quit,
            Key::Up => self.select(
                self.selected
                    .checked_sub(1)
                    .unwrap_or(self.users.len().saturating_sub(1)),
            ),
            Key::Down => self.select(if self.selected + 1 >= self.users.len() {
                0
            } else {
                self.selected + 1
            }),
            Key::Backspace => {
                self.input.pop();
            }
            Key::Char(c) => {
                if self.input.chars().count() < MAX_INPUT && !c.is_control() {
                    self.input.push(c);
                }
            }
            Key::Enter => {
                let Some(to) = self.selected_user().map(str::to_owned) else {
                    self.notice = Some("nobody to send to yet".into());
                    return Action::Nothing;
                };
                if self.input.trim().is_empty() {
                    return Action::Nothing;
                }
                let text = std::mem::take(&mut self.input);
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.push(
                    &to,
                    Line {
                        at,
                        from: self.me.clone(),
                        text: text.clone(),
                        delivery: Delivery::Sending,
                        ticket: Some(ticket),
                    },
                );
                return Action::Send { ticket, to, text };
            }
        }
        Action::Nothing
    }

    fn select(&mut self, index: usize) {
        if index < self.users.len() {
            self.selected = index;
            self.unread.remove(&self.users[index]);
        }
    }

    fn push(&mut self, with: &str, line: Line) {
        let lines = self.conversations.entry(with.to_owned()).or_default();
        if lines.len() >= MAX_LINES {
            lines.remove(0);
        }
        lines.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_on(chat: &mut Chat, users: &[&str]) {
        chat.apply(
            &Event::SignedOn {
                user: chat.me.clone(),
                users: users.iter().map(|u| u.to_string()).collect(),
            },
            Instant::now(),
        );
    }

    #[test]
    fn typing_and_enter_send_to_the_selected_user() {
        let mut chat = Chat::new("alice");
        signed_on(&mut chat, &["alice", "bob", "carol"]);
        assert_eq!(chat.users, ["bob", "carol"]);
        let now = SystemTime::now();
        chat.key(Key::Down, now);
        for c in "hi".chars() {
            chat.key(Key::Char(c), now);
        }
        let action = chat.key(Key::Enter, now);
        assert_eq!(
            action,
            Action::Send {
                ticket: 1,
                to: "carol".into(),
                text: "hi".into()
            }
        );
        assert!(chat.input.is_empty());
        chat.sent(1, Ok(()));
        assert_eq!(chat.conversations["carol"][0].delivery, Delivery::Sent);
        assert_eq!(chat.key(Key::Enter, now), Action::Nothing, "nothing typed");
    }

    #[test]
    fn messages_elsewhere_count_as_unread_until_chosen() {
        let mut chat = Chat::new("alice");
        signed_on(&mut chat, &["bob", "carol"]);
        chat.received("carol", "hello".into(), SystemTime::now());
        assert_eq!(chat.unread["carol"], 1);
        chat.key(Key::Down, SystemTime::now());
        assert!(!chat.unread.contains_key("carol"));
    }

    #[test]
    fn a_user_added_above_keeps_the_selection() {
        let mut chat = Chat::new("alice");
        signed_on(&mut chat, &["bob", "dave"]);
        chat.key(Key::Down, SystemTime::now());
        chat.apply(
            &Event::UserAdded {
                user: "carol".into(),
            },
            Instant::now(),
        );
        assert_eq!(chat.selected_user(), Some("dave"));
    }

    #[test]
    fn idle_shows_how_long() {
        let mut chat = Chat::new("alice");
        let now = Instant::now();
        chat.apply(
            &Event::Presence {
                user: "bob".into(),
                status: Status::Idle,
                idle_secs: Some(300),
            },
            now,
        );
        assert_eq!(chat.shown("bob").text(now), "idle (5 min)");
        assert_eq!(chat.shown("carol").text(now), "offline");
    }
}
