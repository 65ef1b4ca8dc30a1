//! What the admin sees of the mailboxes: each message with its
//! attachments' names and sizes, and the totals per user.

use serde::{Deserialize, Serialize};

use crate::proto::data::{DataLimits, MessageData};
use crate::proto::lines::StreamError;

use super::{internal, Mailboxes};

/// A message as the admin lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxItem {
    pub user: String,
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: u64,
    pub stored_unix: u64,
    /// Name (display form) and size of each attachment.
    pub attachments: Vec<(String, u64)>,
}

/// Messages and bytes waiting for one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxStats {
    pub user: String,
    pub messages: usize,
    pub bytes: u64,
}

impl Mailboxes {
    /// The committed messages of one mailbox, or of all, oldest first per
    /// user, with their attachments' names and sizes.
    pub fn list(&self, user: Option<&str>) -> Result<Vec<MailboxItem>, StreamError> {
        let mut users: Vec<&String> = match user {
            Some(user) => self
                .boxes
                .get_key_value(user)
                .map(|(k, _)| k)
                .into_iter()
                .collect(),
            None => self.boxes.keys().collect(),
        };
        users.sort();
        let mut items = Vec::new();
        for user in users {
            for entry in self.committed(user) {
                let mut fetched = self.fetch(user, &entry.id)?;
                let limits = DataLimits {
                    max_bytes: usize::MAX,
                    max_attachments: usize::MAX,
                };
                let data = std::mem::replace(
                    &mut fetched.data,
                    crate::store::MessageBody::Bytes(Vec::new()),
                )
                .into_bytes()
                .map_err(internal)?;
                let attachments = MessageData::parse(&data, limits)
                    .map(|data| {
                        data.attachments
                            .iter()
                            .map(|a| (a.name(), a.data.len() as u64))
                            .collect()
                    })
                    .unwrap_or_default();
                items.push(MailboxItem {
                    user: user.clone(),
                    id: entry.id.clone(),
                    sender: fetched.header.sender,
                    recipients: fetched.header.recipients,
                    size: entry.size,
                    stored_unix: entry.stored_unix,
                    attachments,
                });
            }
        }
        Ok(items)
    }

    /// Messages and bytes per user, users in name order.
    pub fn stats(&self) -> Vec<MailboxStats> {
        let mut stats: Vec<MailboxStats> = self
            .boxes
            .iter()
            .map(|(user, bx)| MailboxStats {
                user: user.clone(),
                messages: bx.entries.len(),
                bytes: bx.bytes,
            })
            .collect();
        stats.sort_by(|a, b| a.user.cmp(&b.user));
        stats
    }
}
