//! The mailboxes as plain data over the store: the in-memory index (per
//! user: entries in arrival order, id → entry, bytes) rebuilt from the store
//! at start, and every change to it (store, commit, fetch, remove, purge).
//! The actor wraps this with group commit and notices; it takes and gives
//! its own types (a [`NewMessage`] in, a [`Fetched`] out), never actor
//! messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::lines::{ErrorCode, StreamError};
use crate::settings::{Limits, Timeouts};
use crate::store::{
    unix_now, Fetched, IdRecord, MessageHeader, NewData, PendingBackup, Store, StoreError,
};

use super::disk::{cannot_write, is_disk_failure};

/// Limits and retention of the mailboxes.
#[derive(Debug, Clone)]
pub struct MailboxSettings {
    pub max_messages: usize,
    pub max_bytes: u64,
    /// How long an accepted message id is remembered for retries.
    pub id_retention: Duration,
    /// Free bytes on the store's filesystem that sends never use.
    pub disk_reserve: u64,
}

impl MailboxSettings {
    /// The mailbox part of the server's settings.
    pub fn new(limits: &Limits, timeouts: &Timeouts) -> MailboxSettings {
        MailboxSettings {
            max_messages: limits.mailbox_messages,
            max_bytes: limits.mailbox_bytes,
            id_retention: timeouts.id_retention(),
            disk_reserve: limits.disk_reserve_bytes,
        }
    }
}

/// The documented defaults, from the one place they are defined.
impl Default for MailboxSettings {
    fn default() -> Self {
        MailboxSettings::new(&Limits::default(), &Timeouts::default())
    }
}

/// One waiting message in one mailbox, as the index holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub from: String,
    pub size: u64,
    pub stored_unix: u64,
    /// Durable and announced; only committed entries can be received.
    pub committed: bool,
}

/// Messages written but not committed, each with the recipients whose
/// entries wait for the commit.
pub type Uncommitted = Vec<(u64, Vec<String>)>;

#[derive(Default)]
pub(super) struct UserBox {
    pub(super) entries: BTreeMap<u64, Entry>,
    pub(super) by_id: HashMap<String, u64>,
    pub(super) bytes: u64,
}

/// A message to store, as the courier read it.
pub struct NewMessage<'a> {
    pub sender: &'a str,
    pub id: &'a str,
    /// Recipients, repeats removed, in the order first named.
    pub recipients: &'a [String],
    pub data: &'a NewData,
    /// [`digest`] of the recipients and the data.
    pub digest: &'a [u8],
}

/// What `store_message` did.
pub enum Stored {
    New(u64),
    /// The same sender sent the same message with this id before.
    Retry(u64),
}

pub fn internal(e: impl std::fmt::Display) -> StreamError {
    log::error!("mailbox store failure: {e}");
    StreamError::new(ErrorCode::Internal, format!("store failure: {e}"))
}

pub(crate) fn no_such_message() -> StreamError {
    StreamError::new(ErrorCode::NoSuchMessage, "no such message in this mailbox")
}

/// SHA-256 over the recipient set (sorted) and the data: what makes two
/// sends with one id "the same message".
pub fn digest(recipients: &[String], data: &[u8]) -> Vec<u8> {
    let mut sorted: Vec<&str> = recipients.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for recipient in sorted {
        ctx.update(recipient.as_bytes());
        ctx.update(b"\n");
    }
    ctx.update(b"\0");
    ctx.update(data);
    ctx.finish().as_ref().to_vec()
}

/// The index and the operations on it; see the module doc. Writes are not
/// durable until the caller flushes or commits.
pub struct Mailboxes {
    pub(super) store: Arc<dyn Store>,
    pub(super) settings: MailboxSettings,
    pub(super) boxes: HashMap<String, UserBox>,
    /// Mailboxes still holding each message; its data goes with the last.
    pub(super) holders: HashMap<u64, usize>,
    /// Entries and bytes in all mailboxes.
    pub(super) total: (usize, u64),
    /// Sends are being refused for want of disk space (logged once per
    /// spell, not once per send).
    pub(super) disk_low: bool,
}

impl Mailboxes {
    /// Rebuilds the index from the store.
    pub fn load(store: Arc<dyn Store>, settings: MailboxSettings) -> Result<Mailboxes, StoreError> {
        let mut mailboxes = Mailboxes {
            store,
            settings,
            boxes: HashMap::new(),
            holders: HashMap::new(),
            total: (0, 0),
            disk_low: false,
        };
        // Each header is read once and lent to all its entries: a message
        // to a thousand recipients must not be copied a thousand times.
        let mut headers: HashMap<u64, Option<MessageHeader>> = HashMap::new();
        for entry in mailboxes.store.mailbox_entries()? {
            let header = match headers.entry(entry.seq) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(new) => {
                    new.insert(mailboxes.store.message_header(entry.seq)?)
                }
            };
            let Some(header) = header.as_ref() else {
                log::warn!(
                    "mailbox entry {}/{} has no message; skipped",
                    entry.user,
                    entry.seq
                );
                continue;
            };
            mailboxes.insert_entry(&entry.user, entry.seq, header, true);
        }
        Ok(mailboxes)
    }

    /// A fresh index from the store, with the same settings.
    pub fn reload(&self) -> Result<Mailboxes, StoreError> {
        Mailboxes::load(self.store.clone(), self.settings.clone())
    }

    /// A fresh index from the store after this one may have been left
    /// half-changed by a panic. An entry this index did not hold as
    /// committed (written, its commit still waiting) is not committed in
    /// the new one either: it is returned, per message with its recipients,
    /// to be committed and announced, so that it is neither received before
    /// it is durable nor left unannounced.
    pub fn reload_after_failure(&self) -> Result<(Mailboxes, Uncommitted), StoreError> {
        let mut fresh = self.reload()?;
        let mut waiting: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (user, bx) in &mut fresh.boxes {
            let known = self.boxes.get(user);
            for (seq, entry) in &mut bx.entries {
                let was_committed = known
                    .and_then(|old| old.entries.get(seq))
                    .is_some_and(|old| old.committed);
                if !was_committed {
                    entry.committed = false;
                    waiting.entry(*seq).or_default().push(user.clone());
                }
            }
        }
        Ok((fresh, waiting.into_iter().collect()))
    }

    /// Messages and bytes waiting, in all mailboxes.
    pub fn totals(&self) -> (usize, u64) {
        self.total
    }

    /// The committed entries of a mailbox, oldest first.
    pub fn committed(&self, user: &str) -> impl Iterator<Item = &Entry> {
        self.boxes
            .get(user)
            .into_iter()
            .flat_map(|bx| bx.entries.values())
            .filter(|e| e.committed)
    }

    fn insert_entry(&mut self, user: &str, seq: u64, header: &MessageHeader, committed: bool) {
        let bx = self.boxes.entry(user.to_owned()).or_default();
        if bx.entries.contains_key(&seq) {
            return;
        }
        bx.entries.insert(
            seq,
            Entry {
                id: header.id.clone(),
                from: header.sender.clone(),
                size: header.size,
                stored_unix: header.stored_unix,
                committed,
            },
        );
        bx.by_id.insert(header.id.clone(), seq);
        bx.bytes += header.size;
        self.total.0 += 1;
        self.total.1 += header.size;
        *self.holders.entry(seq).or_default() += 1;
    }

    /// Checks quota and id, then writes the message and its entries
    /// (uncommitted). An exact retry writes nothing.
    pub fn store_message(&mut self, msg: NewMessage<'_>) -> Result<Stored, StreamError> {
        if let Some(reason) = self.store.failed() {
            return Err(cannot_write(format!("the store failed a write: {reason}")));
        }
        let digest = msg.digest;
        let earlier = self.store.get_id(msg.id).map_err(internal)?;
        let conflict = match &earlier {
            Some(rec) if rec.sender == msg.sender && rec.digest == digest => {
                return Ok(Stored::Retry(rec.seq))
            }
            Some(_) => true,
            None => false,
        };
        // The courier checked the names, but a user may have been removed
        // since: storing for them would leave an entry nobody can receive.
        for recipient in msg.recipients {
            if self.store.get_user(recipient).map_err(internal)?.is_none() {
                return Err(StreamError::new(
                    ErrorCode::UnknownRecipient,
                    format!("no user {recipient}"),
                ));
            }
        }
        let size = msg.data.size();
        for recipient in msg.recipients {
            let (count, bytes) = self
                .boxes
                .get(recipient)
                .map_or((0, 0), |bx| (bx.entries.len(), bx.bytes));
            if count + 1 > self.settings.max_messages || bytes + size > self.settings.max_bytes {
                return Err(StreamError::new(
                    ErrorCode::Quota,
                    format!("mailbox of {recipient} is full"),
                ));
            }
        }
        if conflict {
            return Err(StreamError::new(
                ErrorCode::Duplicate,
                "message id already used for another message",
            ));
        }
        // Staged data is on the disk already: only its record is to come.
        let seq = match msg.data {
            NewData::Staged(staged) => {
                self.check_disk_space(0)?;
                staged.seq()
            }
            NewData::Bytes(_) => {
                self.check_disk_space(size)?;
                self.store.next_seq().map_err(internal)?
            }
        };
        let now = unix_now();
        let header = MessageHeader {
            id: msg.id.to_owned(),
            sender: msg.sender.to_owned(),
            recipients: msg.recipients.to_vec(),
            size,
            stored_unix: now,
        };
        let id_record = IdRecord {
            sender: msg.sender.to_owned(),
            digest: digest.to_vec(),
            seq,
            accepted_unix: now,
        };
        self.store
            .put_message(seq, &header, msg.data, &id_record)
            .map_err(|e| match self.store.failed() {
                Some(reason) => cannot_write(format!("the store failed a write: {reason}")),
                None if is_disk_failure(&e) => cannot_write(e),
                None => internal(e),
            })?;
        for recipient in msg.recipients {
            self.insert_entry(recipient, seq, &header, false);
        }
        #[cfg(feature = "failpoints")]
        if msg.id == crate::FAILPOINT_STORED_THEN_PANIC {
            panic!("failpoint: mailbox actor panic after a write, before its commit");
        }
        Ok(Stored::New(seq))
    }

    /// Marks the message's entries committed; returns the entry and the
    /// recipients whose entry just became committed.
    pub fn mark_committed(
        &mut self,
        seq: u64,
        recipients: &[String],
    ) -> Option<(Entry, Vec<String>)> {
        let mut newly = Vec::new();
        let mut shown = None;
        for recipient in recipients {
            let Some(entry) = self
                .boxes
                .get_mut(recipient)
                .and_then(|bx| bx.entries.get_mut(&seq))
            else {
                continue;
            };
            if !entry.committed {
                entry.committed = true;
                newly.push(recipient.clone());
                shown.get_or_insert_with(|| entry.clone());
            }
        }
        shown.map(|entry| (entry, newly))
    }

    fn seq_of(&self, user: &str, id: &str) -> Option<u64> {
        let bx = self.boxes.get(user)?;
        let seq = *bx.by_id.get(id)?;
        bx.entries.get(&seq).filter(|e| e.committed).map(|_| seq)
    }

    /// A committed message of a mailbox, header and data.
    pub fn fetch(&self, user: &str, id: &str) -> Result<Fetched, StreamError> {
        let seq = self.seq_of(user, id).ok_or_else(no_such_message)?;
        let header = self.store.message_header(seq).map_err(internal)?;
        let data = self.store.message_body(seq).map_err(internal)?;
        match (header, data) {
            (Some(header), Some(data)) => Ok(Fetched { header, data }),
            _ => Err(internal(format!("message {seq} is indexed but not stored"))),
        }
    }

    /// Removes one message from one mailbox (its data with the last
    /// holder). False if it was not there.
    pub fn remove(&mut self, user: &str, id: &str) -> Result<bool, StreamError> {
        let Some(seq) = self.seq_of(user, id) else {
            return Ok(false);
        };
        let last = self.holders.get(&seq).copied().unwrap_or(1) <= 1;
        // The store first: a removal it refuses (a full disk) leaves the
        // message listed and receivable, as it still is.
        self.store
            .remove_entry(user, seq, last)
            .map_err(|e| match self.store.failed() {
                Some(reason) => cannot_write(format!(
                    "the store failed a write: {reason}; the message stays"
                )),
                None => internal(e),
            })?;
        let Some(bx) = self.boxes.get_mut(user) else {
            return Ok(true);
        };
        bx.by_id.remove(id);
        if let Some(entry) = bx.entries.remove(&seq) {
            bx.bytes -= entry.size;
            self.total.0 -= 1;
            self.total.1 -= entry.size;
        }
        if bx.entries.is_empty() {
            self.boxes.remove(user);
        }
        if last {
            self.holders.remove(&seq);
        } else if let Some(holders) = self.holders.get_mut(&seq) {
            *holders -= 1;
        }
        Ok(true)
    }

    /// Removes the messages of a mailbox stored before `older_than_unix`
    /// (all of them when `None`); returns how many.
    pub fn purge(
        &mut self,
        user: &str,
        older_than_unix: Option<u64>,
    ) -> Result<usize, StreamError> {
        let ids: Vec<String> = self
            .boxes
            .get(user)
            .map(|bx| {
                bx.entries
                    .values()
                    .filter(|e| older_than_unix.is_none_or(|cutoff| e.stored_unix < cutoff))
                    .map(|e| e.id.clone())
                    .collect()
            })
            .unwrap_or_default();
        for id in &ids {
            self.remove(user, id)?;
        }
        Ok(ids.len())
    }

    /// Copies the store to `dir` (see [`Store::backup`]).
    /// Copies the records into a backup at `dir`; the message files are
    /// copied by the [`PendingBackup`]'s `finish`, off the actor.
    pub fn backup(&self, dir: &std::path::Path) -> Result<PendingBackup, StreamError> {
        self.store.backup(dir).map_err(internal)
    }

    pub fn settings(&self) -> &MailboxSettings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::PRUNE_CHUNK;
    use crate::store::SledStore;

    /// A message from alice to `to`, stored through `mailboxes`.
    fn send_to(mailboxes: &mut Mailboxes, id: &str, to: &str) -> Result<Stored, StreamError> {
        let recipients = [to.to_owned()];
        let bytes = vec![0; 6];
        let digest = digest(&recipients, &bytes);
        mailboxes.store_message(NewMessage {
            sender: "alice",
            id,
            recipients: &recipients,
            data: &NewData::Bytes(bytes),
            digest: &digest,
        })
    }

    fn bob() -> crate::store::UserRecord {
        crate::store::UserRecord {
            password_hash: "$argon2id$x".into(),
            created_unix: 0,
        }
    }

    /// A sled store in `dir` with the user bob.
    fn store_with_bob(dir: &std::path::Path) -> Arc<dyn Store> {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).unwrap());
        store.add_user("bob", &bob()).unwrap();
        store
    }

    #[test]
    fn a_recipient_removed_after_the_courier_checked_it_gets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_bob(dir.path());
        let mut mailboxes = Mailboxes::load(store.clone(), MailboxSettings::default()).unwrap();
        store.remove_user("bob").unwrap();
        match send_to(&mut mailboxes, "late", "bob") {
            Err(e) => assert_eq!(e.code, ErrorCode::UnknownRecipient),
            Ok(_) => panic!("stored for a removed user"),
        }
        assert!(store.mailbox_entries().unwrap().is_empty());
        // Added again, the name starts with an empty mailbox.
        store.add_user("bob", &bob()).unwrap();
        assert!(mailboxes.committed("bob").next().is_none());
    }

    #[test]
    fn ids_are_kept_for_their_retention_and_while_their_message_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_bob(dir.path());
        let keep_a_day = MailboxSettings::default();
        let mut mailboxes = Mailboxes::load(store.clone(), keep_a_day).unwrap();
        for id in ["waiting", "received"] {
            let Ok(Stored::New(seq)) = send_to(&mut mailboxes, id, "bob") else {
                panic!()
            };
            mailboxes.mark_committed(seq, &["bob".to_string()]);
        }
        assert!(mailboxes.remove("bob", "received").unwrap());
        mailboxes.prune_ids();
        assert!(
            store.get_id("received").unwrap().is_some(),
            "remembered within the retention"
        );

        let no_retention = MailboxSettings {
            id_retention: Duration::ZERO,
            ..MailboxSettings::default()
        };
        let mut mailboxes = Mailboxes::load(store.clone(), no_retention).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        mailboxes.prune_ids();
        assert!(
            store.get_id("received").unwrap().is_none(),
            "forgotten after the retention"
        );
        assert!(
            store.get_id("waiting").unwrap().is_some(),
            "kept while its message waits"
        );
        assert!(matches!(
            send_to(&mut mailboxes, "waiting", "bob"),
            Ok(Stored::Retry(_))
        ));
    }
    #[test]
    fn ids_are_pruned_in_bounded_chunks_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_bob(dir.path());
        let no_retention = MailboxSettings {
            id_retention: Duration::ZERO,
            ..MailboxSettings::default()
        };
        let mut mailboxes = Mailboxes::load(store.clone(), no_retention).unwrap();
        let received = 2 * PRUNE_CHUNK + PRUNE_CHUNK / 2;
        for n in 0..=received {
            let id = format!("m{n}");
            let Ok(Stored::New(seq)) = send_to(&mut mailboxes, &id, "bob") else {
                panic!()
            };
            mailboxes.mark_committed(seq, &["bob".to_string()]);
            // The last one stays in the mailbox.
            if n < received {
                assert!(mailboxes.remove("bob", &id).unwrap());
            }
        }
        std::thread::sleep(Duration::from_millis(1100));
        let mut pass = mailboxes.start_id_pruning();
        let mut chunks = 0;
        let mut left = store
            .ids_accepted_before(u64::MAX, None, usize::MAX)
            .unwrap()
            .len();
        assert_eq!(left, received + 1);
        loop {
            let more = mailboxes.prune_id_chunk(&mut pass);
            chunks += 1;
            let now = store
                .ids_accepted_before(u64::MAX, None, usize::MAX)
                .unwrap()
                .len();
            assert!(left - now <= PRUNE_CHUNK, "one chunk pruned {}", left - now);
            left = now;
            if !more {
                break;
            }
        }
        assert_eq!(chunks, 3);
        assert_eq!(left, 1, "only the waiting message's id is kept");
        assert!(store.get_id("m0").unwrap().is_none());
        assert!(store.get_id(&format!("m{received}")).unwrap().is_some());
        // The time index went with the records.
        let rest = store.ids_accepted_before(u64::MAX, None, 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, format!("m{received}"));
    }

    /// Start-up cost of broadcast messages: `cargo test --release -p
    /// csm-actors --lib -- --ignored --nocapture loading_broadcasts`.
    #[test]
    #[ignore = "a benchmark, run by hand"]
    fn loading_broadcasts() {
        const USERS: usize = 1000;
        const MESSAGES: u64 = 20;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let users: Vec<String> = (0..USERS).map(|i| format!("user{i:04}")).collect();
        for user in &users {
            store.add_user(user, &bob()).unwrap();
        }
        for seq in 1..=MESSAGES {
            let header = MessageHeader {
                id: format!("broadcast-{seq}"),
                sender: "user0000".into(),
                recipients: users.clone(),
                size: 6,
                stored_unix: 0,
            };
            let id = crate::store::IdRecord {
                sender: "user0000".into(),
                digest: vec![0; 32],
                seq,
                accepted_unix: 0,
            };
            store
                .put_message(seq, &header, &NewData::Bytes(vec![0; 6]), &id)
                .unwrap();
        }
        store.flush().unwrap();
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let loaded = Mailboxes::load(store.clone(), MailboxSettings::default()).unwrap();
            times.push(started.elapsed());
            assert_eq!(loaded.totals().0, USERS * MESSAGES as usize);
        }
        times.sort();
        println!(
            "load of {MESSAGES} messages to {USERS} recipients each: median {:?} (runs {times:?})",
            times[2]
        );
    }
}
