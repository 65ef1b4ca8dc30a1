//! MailboxActor: the durable mailboxes. It stores a message's data once for
//! all its recipients, makes it durable through group commit before the
//! sender hears `done`, and only then tells the recipients' sessions with
//! `MessageAvailable`. It is the one ordering point for mailbox notices: a
//! session that subscribes gets every committed message once, either in its
//! sign-on list or as a notice, never both and never neither.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, ResponseActFuture, WrapFuture};
use bytes::Bytes;

use crate::messages::{
    Deliver, DropMailbox, Fetch, Fetched, Remove, SessionId, Subscribe, Unsubscribe,
};
use crate::outbound::Outbound;
use crate::proto::lines::{ErrorCode, StreamError};
use crate::proto::Packet;
use crate::store::{
    unix_now, CommitError, GroupCommit, IdRecord, MessageHeader, Store, StoreError,
};

/// Limits and retention of the mailboxes.
#[derive(Debug, Clone)]
pub struct MailboxSettings {
    pub max_messages: usize,
    pub max_bytes: u64,
    /// How long an accepted message id is remembered for retries.
    pub id_retention: Duration,
}

impl Default for MailboxSettings {
    fn default() -> Self {
        MailboxSettings {
            max_messages: 10_000,
            max_bytes: 1 << 30,
            id_retention: Duration::from_secs(24 * 3600),
        }
    }
}

struct Entry {
    id: String,
    from: String,
    size: u64,
    /// Durable and announced; only committed entries can be received.
    committed: bool,
}

#[derive(Default)]
struct UserBox {
    entries: BTreeMap<u64, Entry>,
    by_id: HashMap<String, u64>,
    bytes: u64,
}

/// Owns the mailboxes; see the module doc.
pub struct MailboxActor {
    store: Arc<dyn Store>,
    commit: GroupCommit,
    settings: MailboxSettings,
    boxes: HashMap<String, UserBox>,
    /// Mailboxes still holding each message; its data goes with the last.
    holders: HashMap<u64, usize>,
    subscribers: HashMap<String, HashMap<SessionId, Outbound>>,
}

fn internal(e: impl std::fmt::Display) -> StreamError {
    log::error!("mailbox store failure: {e}");
    StreamError::new(ErrorCode::Internal, format!("store failure: {e}"))
}

fn commit_error(e: CommitError) -> StreamError {
    match e {
        CommitError::Overloaded | CommitError::Closed => {
            StreamError::new(ErrorCode::Unavailable, format!("{e}; try again"))
        }
        CommitError::Flush(_) => internal(e),
    }
}

/// SHA-256 over the recipient set (sorted) and the data: what makes two
/// sends with one id "the same message".
fn digest(recipients: &[String], data: &[u8]) -> Vec<u8> {
    let mut sorted: Vec<&str> = recipients.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for recipient in sorted {
        ctx.update(recipient.as_bytes());
        ctx.update(b"\n");
    }
    ctx.update(b"\0");
    ctx.update(data);
    ctx.finish().as_ref().to_vec()
}

enum Stored {
    New(u64),
    /// The same sender sent the same message with this id before.
    Retry(u64),
}

impl MailboxActor {
    /// Rebuilds the in-memory index from the store.
    pub fn load(
        store: Arc<dyn Store>,
        commit: GroupCommit,
        settings: MailboxSettings,
    ) -> Result<MailboxActor, StoreError> {
        let mut actor = MailboxActor {
            store,
            commit,
            settings,
            boxes: HashMap::new(),
            holders: HashMap::new(),
            subscribers: HashMap::new(),
        };
        let mut headers: HashMap<u64, Option<MessageHeader>> = HashMap::new();
        for entry in actor.store.mailbox_entries()? {
            let header = match headers.get(&entry.seq) {
                Some(h) => h.clone(),
                None => {
                    let h = actor.store.message_header(entry.seq)?;
                    headers.insert(entry.seq, h.clone());
                    h
                }
            };
            let Some(header) = header else {
                log::warn!(
                    "mailbox entry {}/{} has no message; skipped",
                    entry.user,
                    entry.seq
                );
                continue;
            };
            actor.insert_entry(&entry.user, entry.seq, &header, true);
        }
        Ok(actor)
    }

    /// Messages and bytes waiting, in all mailboxes.
    pub fn totals(&self) -> (usize, u64) {
        self.boxes
            .values()
            .fold((0, 0), |(n, b), bx| (n + bx.entries.len(), b + bx.bytes))
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
                committed,
            },
        );
        bx.by_id.insert(header.id.clone(), seq);
        bx.bytes += header.size;
        *self.holders.entry(seq).or_default() += 1;
    }

    fn store_message(&mut self, msg: &Deliver) -> Result<Stored, StreamError> {
        let digest = digest(&msg.recipients, &msg.data);
        let earlier = self.store.get_id(&msg.id).map_err(internal)?;
        let conflict = match &earlier {
            Some(rec) if rec.sender == msg.sender && rec.digest == digest => {
                return Ok(Stored::Retry(rec.seq))
            }
            Some(_) => true,
            None => false,
        };
        let size = msg.data.len() as u64;
        for recipient in &msg.recipients {
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
        let seq = self.store.next_seq().map_err(internal)?;
        let now = unix_now();
        let header = MessageHeader {
            id: msg.id.clone(),
            sender: msg.sender.clone(),
            recipients: msg.recipients.clone(),
            size,
            stored_unix: now,
        };
        let id_record = IdRecord {
            sender: msg.sender.clone(),
            digest,
            seq,
            accepted_unix: now,
        };
        self.store
            .put_message(seq, &header, &msg.data, &id_record)
            .map_err(internal)?;
        for recipient in &msg.recipients {
            self.insert_entry(recipient, seq, &header, false);
        }
        Ok(Stored::New(seq))
    }

    /// After the flush: make the entries receivable and tell the sessions.
    fn mark_committed(&mut self, seq: u64, recipients: &[String]) {
        let mut frame: Option<Bytes> = None;
        for recipient in recipients {
            let Some(entry) = self
                .boxes
                .get_mut(recipient)
                .and_then(|bx| bx.entries.get_mut(&seq))
            else {
                continue;
            };
            if entry.committed {
                continue;
            }
            entry.committed = true;
            let Some(sessions) = self.subscribers.get(recipient) else {
                continue;
            };
            let frame = frame
                .get_or_insert_with(|| {
                    Bytes::from(
                        Packet::MessageAvailable {
                            id: entry.id.clone(),
                            from: entry.from.clone(),
                            size: entry.size,
                        }
                        .to_frame(),
                    )
                })
                .clone();
            for outbound in sessions.values() {
                outbound.push(frame.clone());
            }
        }
    }

    fn remove_entry(&mut self, user: &str, id: &str) -> Result<bool, StreamError> {
        let Some(bx) = self.boxes.get_mut(user) else {
            return Ok(false);
        };
        let Some(seq) = bx.by_id.remove(id) else {
            return Ok(false);
        };
        if let Some(entry) = bx.entries.remove(&seq) {
            bx.bytes -= entry.size;
        }
        if bx.entries.is_empty() {
            self.boxes.remove(user);
        }
        let holders = self.holders.entry(seq).or_insert(1);
        *holders -= 1;
        let last = *holders == 0;
        if last {
            self.holders.remove(&seq);
        }
        self.store.remove_entry(user, seq, last).map_err(internal)?;
        Ok(true)
    }

    /// Forgets accepted ids past their retention whose message is gone.
    fn prune_ids(&mut self) {
        let cutoff = unix_now().saturating_sub(self.settings.id_retention.as_secs());
        let records = match self.store.id_records() {
            Ok(records) => records,
            Err(e) => {
                log::warn!("could not scan message ids for pruning: {e}");
                return;
            }
        };
        let mut pruned = 0;
        for (id, record) in records {
            if record.accepted_unix < cutoff && !self.holders.contains_key(&record.seq) {
                if let Err(e) = self.store.remove_id(&id) {
                    log::warn!("could not prune message id: {e}");
                    return;
                }
                pruned += 1;
            }
        }
        if pruned > 0 {
            log::info!(
                "pruned {pruned} message ids older than {:?}",
                self.settings.id_retention
            );
        }
    }

    fn commit_then<T: 'static>(
        &self,
        then: impl FnOnce(&mut Self) -> Result<T, StreamError> + 'static,
    ) -> ResponseActFuture<Self, Result<T, StreamError>> {
        let commit = self.commit.clone();
        Box::pin(
            async move { commit.commit().await.map_err(commit_error) }
                .into_actor(self)
                .map(move |result, actor, _| result.and_then(|()| then(actor))),
        )
    }
}

impl Actor for MailboxActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (messages, bytes) = self.totals();
        log::info!("mailboxes loaded: {messages} messages, {bytes} bytes waiting");
        self.prune_ids();
        let every = (self.settings.id_retention / 24).max(Duration::from_secs(60));
        ctx.run_interval(every, |actor, _| actor.prune_ids());
    }
}

impl Handler<Deliver> for MailboxActor {
    type Result = ResponseActFuture<Self, Result<(), StreamError>>;

    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) -> Self::Result {
        let seq = match self.store_message(&msg) {
            Ok(Stored::New(seq) | Stored::Retry(seq)) => seq,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let recipients = msg.recipients;
        self.commit_then(move |actor| {
            actor.mark_committed(seq, &recipients);
            Ok(())
        })
    }
}

impl Handler<Fetch> for MailboxActor {
    type Result = Result<Fetched, StreamError>;

    fn handle(&mut self, msg: Fetch, _: &mut Context<Self>) -> Self::Result {
        let missing =
            || StreamError::new(ErrorCode::NoSuchMessage, "no such message in your mailbox");
        let seq = self
            .boxes
            .get(&msg.user)
            .and_then(|bx| {
                let seq = *bx.by_id.get(&msg.id)?;
                bx.entries.get(&seq).filter(|e| e.committed).map(|_| seq)
            })
            .ok_or_else(missing)?;
        let header = self.store.message_header(seq).map_err(internal)?;
        let data = self.store.message_data(seq).map_err(internal)?;
        match (header, data) {
            (Some(header), Some(data)) => Ok(Fetched { header, data }),
            _ => Err(internal(format!("message {seq} is indexed but not stored"))),
        }
    }
}

impl Handler<Remove> for MailboxActor {
    type Result = ResponseActFuture<Self, Result<(), StreamError>>;

    fn handle(&mut self, msg: Remove, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.remove_entry(&msg.user, &msg.id) {
            return Box::pin(actix::fut::ready(Err(e)));
        }
        self.commit_then(|_| Ok(()))
    }
}

impl Handler<Subscribe> for MailboxActor {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) {
        if let Some(bx) = self.boxes.get(&msg.user) {
            let mut frames = Vec::new();
            for entry in bx.entries.values().filter(|e| e.committed) {
                Packet::MessageAvailable {
                    id: entry.id.clone(),
                    from: entry.from.clone(),
                    size: entry.size,
                }
                .write_frame(&mut frames);
            }
            if !frames.is_empty() {
                msg.outbound.push(Bytes::from(frames));
            }
        }
        self.subscribers
            .entry(msg.user)
            .or_default()
            .insert(msg.session, msg.outbound);
    }
}

impl Handler<Unsubscribe> for MailboxActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        if let Some(sessions) = self.subscribers.get_mut(&msg.user) {
            sessions.remove(&msg.session);
            if sessions.is_empty() {
                self.subscribers.remove(&msg.user);
            }
        }
    }
}

impl Handler<DropMailbox> for MailboxActor {
    type Result = ResponseActFuture<Self, Result<usize, StreamError>>;

    fn handle(&mut self, msg: DropMailbox, _: &mut Context<Self>) -> Self::Result {
        let ids: Vec<String> = self
            .boxes
            .get(&msg.user)
            .map(|bx| bx.entries.values().map(|e| e.id.clone()).collect())
            .unwrap_or_default();
        for id in &ids {
            if let Err(e) = self.remove_entry(&msg.user, id) {
                return Box::pin(actix::fut::ready(Err(e)));
            }
        }
        let count = ids.len();
        self.commit_then(move |_| Ok(count))
    }
}
