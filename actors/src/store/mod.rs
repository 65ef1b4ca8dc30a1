//! The durable store behind traits, so actors never name the database.
//! [`Directory`] is the user list every backend serves (asynchronous:
//! a shared database answers over the network). [`Store`] is the embedded
//! engine's record interface; [`SledStore`] implements it, its key layout
//! lives in `sled_store.rs` and nowhere else, and [`GroupCommit`] makes its
//! writes durable with one flush per burst. The PostgreSQL backend lives
//! in `crate::cluster`.

mod commit;
mod directory;
mod platter;
mod sled_store;
mod spool;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use commit::{CommitError, Flusher, GroupCommit};
pub use directory::{Directory, SledDirectory};
pub use sled_store::{PendingBackup, SledStore, MAX_REOPENS};
pub use spool::{StagedData, SPOOL_FROM_BYTES};

/// A failure of the store, whichever backend it is.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(String),
    /// Another process holds the embedded database.
    #[error("database locked: {0}")]
    Locked(String),
    /// The shared database cannot be reached (or refused to commit); a
    /// later attempt may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("message file: {0}")]
    File(#[from] std::io::Error),
    /// The shared database's schema does not fit this build.
    #[error("database schema: {0}")]
    Schema(String),
    /// The embedded store failed a write earlier and takes none until it
    /// is reopened (once space is back).
    #[error("the store failed a write earlier ({0}) and takes no more until it is reopened")]
    Failed(String),
    #[error("user {0} already exists")]
    UserExists(String),
}

impl StoreError {
    /// True when another process holds the database.
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Locked(_))
    }

    /// True when a later attempt may succeed (the shared database is
    /// unreachable or restarting, or the embedded one failed a write and is
    /// reopened once there is room): answered `unavailable`, not
    /// `internal`.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Failed(_))
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked(io.to_string())
            }
            other => StoreError::Db(other.to_string()),
        }
    }
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// argon2id hash as a PHC string.
    pub password_hash: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// What the store keeps about a message besides its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageHeader {
    pub id: String,
    pub sender: String,
    /// Original recipients, repeats removed, in the order first named.
    pub recipients: Vec<String>,
    pub size: u64,
    pub stored_unix: u64,
}

/// A remembered message id, for idempotent retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRecord {
    pub sender: String,
    /// SHA-256 of the recipient set and the data.
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
    pub seq: u64,
    pub accepted_unix: u64,
}

/// A remembered id in acceptance order, as pruning walks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatedId {
    pub id: String,
    pub accepted_unix: u64,
    /// The message it names; `None` when the id record itself is gone.
    pub seq: Option<u64>,
}

/// A stored message's data: in memory, or (large data kept in a file of
/// its own) the open file, for a receive to stream from without a copy in
/// memory. A file stays readable when its message is removed meanwhile.
#[derive(Debug)]
pub enum MessageBody {
    Bytes(Vec<u8>),
    File { file: std::fs::File, len: u64 },
}

impl MessageBody {
    /// The data in memory (a file is read whole).
    pub fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self {
            MessageBody::Bytes(bytes) => Ok(bytes),
            MessageBody::File { file, len } => {
                use std::io::Read;
                let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                file.take(len).read_to_end(&mut bytes)?;
                if bytes.len() as u64 != len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("message file holds {} of {len} bytes", bytes.len()),
                    ));
                }
                Ok(bytes)
            }
        }
    }
}

/// The data of a message to store: in memory, or already written into the
/// spool by [`Store::stage`], off the thread that records it.
#[derive(Debug)]
pub enum NewData {
    Bytes(Vec<u8>),
    Staged(StagedData),
}

impl NewData {
    /// Bytes of data.
    pub fn size(&self) -> u64 {
        match self {
            NewData::Bytes(bytes) => bytes.len() as u64,
            NewData::Staged(staged) => staged.size(),
        }
    }

    /// The data in memory (staged data is read back).
    pub fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self {
            NewData::Bytes(bytes) => Ok(bytes),
            NewData::Staged(staged) => staged.read(),
        }
    }
}

/// A message as a receiver gets it.
#[derive(Debug)]
pub struct Fetched {
    pub header: MessageHeader,
    pub data: MessageBody,
}

/// One waiting message in one user's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxEntry {
    pub user: String,
    pub seq: u64,
}

/// What a [`Store::write_out`] leaves for its [`Store::make_durable`]: the
/// spool files of messages whose removal it wrote, to unlink once that
/// removal is durable.
#[derive(Debug, Default)]
pub struct WrittenOut {
    removed_files: Vec<u64>,
}

/// The durable state of the server: users, messages, mailboxes, ids.
/// Writes become durable only at [`Store::flush`].
pub trait Store: Send + Sync + 'static {
    fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;
    /// Creates a user; fails with `UserExists` if the name is taken.
    fn add_user(&self, name: &str, record: &UserRecord) -> Result<(), StoreError>;
    /// Replaces a user's record; false if there is no such user.
    fn update_user(&self, name: &str, record: &UserRecord) -> Result<bool, StoreError>;
    /// Removes a user's record (the mailbox is dropped by the mailbox
    /// actor, which owns its index); false if absent.
    fn remove_user(&self, name: &str) -> Result<bool, StoreError>;
    /// All usernames, sorted.
    fn list_users(&self) -> Result<Vec<String>, StoreError>;

    /// A fresh, increasing message sequence number.
    fn next_seq(&self) -> Result<u64, StoreError>;
    /// Writes data that the store keeps in a file of its own into that
    /// file, durably, under a fresh sequence number, ahead of the
    /// [`Store::put_message`] that records it: the caller's thread waits
    /// for the disk, not the one that records. `None` for data the store
    /// keeps inline.
    fn stage(&self, _data: &[u8]) -> Result<Option<StagedData>, StoreError> {
        Ok(None)
    }
    /// Writes the message data once, one mailbox entry per recipient and
    /// the id record, in one atomic batch. Staged data must have been
    /// staged under `seq`.
    fn put_message(
        &self,
        seq: u64,
        header: &MessageHeader,
        data: &NewData,
        id_record: &IdRecord,
    ) -> Result<(), StoreError>;
    fn message_header(&self, seq: u64) -> Result<Option<MessageHeader>, StoreError>;
    /// A message's data, in memory or as its open file.
    fn message_body(&self, seq: u64) -> Result<Option<MessageBody>, StoreError>;
    /// A message's data, in memory.
    fn message_data(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.message_body(seq)? {
            Some(body) => Ok(Some(body.into_bytes()?)),
            None => Ok(None),
        }
    }
    /// Removes one mailbox entry, and the message itself when `last` says
    /// no other mailbox holds it.
    fn remove_entry(&self, user: &str, seq: u64, last: bool) -> Result<(), StoreError>;
    /// Every mailbox entry, in mailbox order per user.
    fn mailbox_entries(&self) -> Result<Vec<MailboxEntry>, StoreError>;

    fn get_id(&self, id: &str) -> Result<Option<IdRecord>, StoreError>;
    /// Up to `limit` remembered ids accepted before `before_unix`, oldest
    /// first, starting after `after`: pruning walks them in bounded chunks.
    fn ids_accepted_before(
        &self,
        before_unix: u64,
        after: Option<&DatedId>,
        limit: usize,
    ) -> Result<Vec<DatedId>, StoreError>;
    /// Forgets a remembered id.
    fn remove_id(&self, dated: &DatedId) -> Result<(), StoreError>;

    /// Makes every write before it durable.
    fn flush(&self) -> Result<(), StoreError> {
        let written = self.write_out()?;
        self.make_durable(vec![written])
    }

    /// The first half of [`Store::flush`]: hands every write before it to
    /// the operating system. What it returns goes to
    /// [`Store::make_durable`], which may run on another thread while the
    /// next `write_out` runs.
    fn write_out(&self) -> Result<WrittenOut, StoreError>;

    /// The second half: makes what the given `write_out`s wrote durable,
    /// with one sync for all of them, then does what had to wait for that.
    fn make_durable(&self, written: Vec<WrittenOut>) -> Result<(), StoreError>;

    /// Bytes free for the store's growth on its filesystem, when known.
    fn free_space(&self) -> Option<u64> {
        None
    }

    /// The error that left the store unable to go on, if one did.
    fn failed(&self) -> Option<String> {
        None
    }

    /// Opens the store again after it [`failed`](Store::failed), so that
    /// it takes writes again without a restart; nothing when it has not
    /// failed. Every other writer must wait meanwhile.
    fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Copies the store's records into a new store at `dir`. The copy is
    /// consistent when no writes run meanwhile (the server runs this on
    /// the mailbox actor, which does every message write). The message
    /// files, the long part, are copied by [`PendingBackup::finish`],
    /// which may run elsewhere while writes go on.
    fn backup(&self, dir: &std::path::Path) -> Result<PendingBackup, StoreError>;
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
