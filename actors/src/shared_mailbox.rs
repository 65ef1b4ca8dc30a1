//! SharedMailboxActor: the mailboxes at run time on the PostgreSQL backend,
//! taking the same messages as the embedded [`crate::mailbox::MailboxActor`].
//! The database is the truth (quota, ids, entries); this actor keeps only
//! the sessions signed on here that want `MessageAvailable`, and which
//! messages each has been told of. A notice comes from a send stored by
//! this node (queued before the sender hears `done`), from another node's
//! hint, or from a rescan; each session hears of each message once,
//! whichever arrives first, and notices that arrive while a session's
//! sign-on list is being read wait for it and are dropped if the list had
//! them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, ResponseActFuture, WrapFuture};
use bytes::Bytes;

use crate::cluster::{MailHint, PgMail};
use crate::mailbox::{notice_frame, queue_notices, Entry, MailboxItem, MailboxStats};
use crate::messages::{
    Backup, Deliver, DropMailbox, Fetch, Fetched, ListMailbox, MailNotice, MailboxStatsRequest,
    Purge, Remove, Rescan, SessionId, Subscribe, Unsubscribe,
};
use crate::outbound::{Outbound, Queued};
use crate::proto::lines::{ErrorCode, StreamError};

/// Past this many remembered notices a session's memory of them is
/// cleared (at worst a later duplicate notice). Rescans keep it near
/// [`PRUNE_FROM`] or the mailbox's size long before that.
const MAX_REMEMBERED: usize = 100_000;

/// The periodic rescan rereads only users whose sessions remember more
/// notices than this.
const PRUNE_FROM: usize = 1_000;

struct Subscriber {
    outbound: Outbound,
    /// Messages this session has been told of, and when. A rescan drops
    /// the ones told before it started that no longer wait (received,
    /// perhaps at another node); the periodic one runs for sessions past
    /// [`PRUNE_FROM`], so this stays about the mailbox's size or below.
    announced: HashMap<u64, Instant>,
    /// Notices held while the sign-on list is read (`None` once sent).
    held: Option<Vec<(u64, Bytes)>>,
}

impl Subscriber {
    /// Queues the notice unless this session heard of it. With `queued`
    /// (a send stored here, whose sender waits for it), what is queued now,
    /// not held for the sign-on list, comes with a receipt there.
    fn tell(&mut self, seq: u64, frame: &Bytes, queued: Option<&mut Queued>) {
        match &mut self.held {
            Some(held) => held.push((seq, frame.clone())),
            None => {
                if self.announced.len() >= MAX_REMEMBERED {
                    self.announced.clear();
                }
                if let std::collections::hash_map::Entry::Vacant(entry) = self.announced.entry(seq)
                {
                    entry.insert(Instant::now());
                    Queued::push_to(queued, &self.outbound, frame.clone());
                }
            }
        }
    }
}

/// Owns this node's mailbox subscriptions; see the module doc.
pub struct SharedMailboxActor {
    mail: PgMail,
    subscribers: HashMap<String, HashMap<SessionId, Subscriber>>,
}

impl SharedMailboxActor {
    pub fn new(mail: PgMail) -> SharedMailboxActor {
        SharedMailboxActor {
            mail,
            subscribers: HashMap::new(),
        }
    }

    /// Tells the sessions of `recipients` of a message; receipts go into
    /// `queued` when a sender waits for them.
    fn announce(
        &mut self,
        seq: u64,
        id: &str,
        from: &str,
        size: u64,
        recipients: &[String],
        mut queued: Option<&mut Queued>,
    ) {
        let mut frame = None;
        for recipient in recipients {
            let Some(sessions) = self.subscribers.get_mut(recipient) else {
                continue;
            };
            let frame = frame.get_or_insert_with(|| notice_frame(id, from, size));
            for subscriber in sessions.values_mut() {
                subscriber.tell(seq, frame, queued.as_deref_mut());
            }
        }
    }

    /// Tells the sessions of `user` of every listed message they have not
    /// heard of.
    fn announce_waiting(&mut self, user: &str, waiting: &[(u64, Entry)]) {
        let Some(sessions) = self.subscribers.get_mut(user) else {
            return;
        };
        for (seq, entry) in waiting {
            let frame = entry.notice();
            for subscriber in sessions.values_mut() {
                subscriber.tell(*seq, &frame, None);
            }
        }
    }

    /// Forgets the notices told before `started` of messages no longer
    /// waiting: each message has a number of its own, so they never come
    /// back.
    fn forget_gone(&mut self, waiting: &HashMap<String, Vec<(u64, Entry)>>, started: Instant) {
        for (user, sessions) in &mut self.subscribers {
            let still: HashSet<u64> = waiting
                .get(user)
                .map(|entries| entries.iter().map(|(seq, _)| *seq).collect())
                .unwrap_or_default();
            for subscriber in sessions.values_mut() {
                subscriber
                    .announced
                    .retain(|seq, told| *told >= started || still.contains(seq));
            }
        }
    }

    fn forget(&mut self, user: &str, seq: u64) {
        if let Some(sessions) = self.subscribers.get_mut(user) {
            for subscriber in sessions.values_mut() {
                subscriber.announced.remove(&seq);
            }
        }
    }

    /// Runs a database call and answers with its result.
    fn ask<T: 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T, StreamError>> + 'static,
    ) -> ResponseActFuture<Self, Result<T, StreamError>> {
        Box::pin(call.into_actor(self))
    }
}

impl Actor for SharedMailboxActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = (self.mail.settings().id_retention / 24).max(Duration::from_secs(60));
        ctx.run_interval(every, |actor, ctx| {
            let mail = actor.mail.clone();
            ctx.spawn(
                async move {
                    match mail.prune_ids().await {
                        Ok(0) => {}
                        Ok(pruned) => log::info!("pruned {pruned} expired message ids"),
                        Err(e) => log::warn!("pruning message ids failed: {e}"),
                    }
                }
                .into_actor(actor),
            );
        });
    }
}

impl Handler<Deliver> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, Result<Queued, StreamError>>;

    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) -> Self::Result {
        let mail = self.mail.clone();
        let (id, from, size, recipients) = (
            msg.id.clone(),
            msg.sender.clone(),
            msg.data.size(),
            msg.recipients.clone(),
        );
        Box::pin(async move { mail.deliver(msg).await }.into_actor(self).map(
            move |stored, actor, _| {
                let accepted = stored?;
                if accepted.new {
                    metrics::counter!(crate::metrics::MESSAGES_STORED).increment(1);
                }
                // Queued before the courier writes `done`. A retry
                // announces too: a session told already is skipped.
                let mut queued = Queued::default();
                actor.announce(
                    accepted.seq,
                    &id,
                    &from,
                    size,
                    &recipients,
                    Some(&mut queued),
                );
                Ok(queued)
            },
        ))
    }
}

impl Handler<MailNotice> for SharedMailboxActor {
    type Result = ();

    fn handle(&mut self, MailNotice(hint): MailNotice, _: &mut Context<Self>) {
        let MailHint {
            seq,
            size,
            from,
            recipients,
            id,
            ..
        } = hint;
        self.announce(seq, &id, &from, size, &recipients, None);
    }
}

impl Handler<Rescan> for SharedMailboxActor {
    type Result = ();

    fn handle(&mut self, msg: Rescan, ctx: &mut Context<Self>) {
        let users: Vec<String> = self
            .subscribers
            .iter()
            .filter(|(_, sessions)| {
                msg.all || sessions.values().any(|s| s.announced.len() > PRUNE_FROM)
            })
            .map(|(user, _)| user.clone())
            .collect();
        if users.is_empty() {
            return;
        }
        let started = Instant::now();
        let mail = self.mail.clone();
        ctx.spawn(
            async move { mail.waiting_for(&users).await }
                .into_actor(self)
                .map(move |waiting, actor, _| match waiting {
                    Ok(waiting) => {
                        let waiting: HashMap<String, Vec<(u64, Entry)>> =
                            waiting.into_iter().collect();
                        actor.forget_gone(&waiting, started);
                        for (user, entries) in &waiting {
                            actor.announce_waiting(user, entries);
                        }
                    }
                    Err(e) => log::warn!("rescanning the mailboxes failed: {e}"),
                }),
        );
    }
}

impl Handler<Fetch> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, Result<Fetched, StreamError>>;

    fn handle(&mut self, msg: Fetch, _: &mut Context<Self>) -> Self::Result {
        let mail = self.mail.clone();
        self.ask(async move { mail.fetch(&msg.user, &msg.id).await })
    }
}

impl Handler<Remove> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, Result<bool, StreamError>>;

    fn handle(&mut self, msg: Remove, _: &mut Context<Self>) -> Self::Result {
        let mail = self.mail.clone();
        let user = msg.user.clone();
        Box::pin(
            async move { mail.remove(&msg.user, &msg.id).await }
                .into_actor(self)
                .map(move |removed, actor, _| {
                    let removed = removed?;
                    if let Some(seq) = removed {
                        actor.forget(&user, seq);
                    }
                    Ok(removed.is_some())
                }),
        )
    }
}

impl Handler<Purge> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, Result<usize, StreamError>>;

    fn handle(&mut self, msg: Purge, _: &mut Context<Self>) -> Self::Result {
        let mail = self.mail.clone();
        self.ask(async move { mail.purge(&msg.user, msg.older_than_unix).await })
    }
}

impl Handler<DropMailbox> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, Result<usize, StreamError>>;

    fn handle(&mut self, msg: DropMailbox, _: &mut Context<Self>) -> Self::Result {
        self.subscribers.remove(&msg.user);
        let mail = self.mail.clone();
        self.ask(async move { mail.purge(&msg.user, None).await })
    }
}

impl Handler<Backup> for SharedMailboxActor {
    type Result = Result<(), StreamError>;

    fn handle(&mut self, _: Backup, _: &mut Context<Self>) -> Self::Result {
        Err(StreamError::new(
            ErrorCode::Internal,
            "the PostgreSQL backend is backed up with PostgreSQL's own tools (pg_dump, \
             pg_basebackup), not with csm admin backup",
        ))
    }
}

impl Handler<ListMailbox> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, Result<Vec<MailboxItem>, StreamError>>;

    fn handle(&mut self, msg: ListMailbox, _: &mut Context<Self>) -> Self::Result {
        let mail = self.mail.clone();
        self.ask(async move { mail.list(msg.user.as_deref()).await })
    }
}

impl Handler<MailboxStatsRequest> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, Vec<MailboxStats>>;

    fn handle(&mut self, _: MailboxStatsRequest, _: &mut Context<Self>) -> Self::Result {
        let mail = self.mail.clone();
        Box::pin(
            async move {
                mail.stats().await.unwrap_or_else(|e| {
                    log::warn!("reading mailbox statistics failed: {e}");
                    Vec::new()
                })
            }
            .into_actor(self),
        )
    }
}

impl Handler<Subscribe> for SharedMailboxActor {
    type Result = ResponseActFuture<Self, ()>;

    /// Answers once the session's waiting messages are queued, so that its
    /// sign-on packets stay in order.
    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        self.subscribers
            .entry(msg.user.clone())
            .or_default()
            .insert(
                msg.session,
                Subscriber {
                    outbound: msg.outbound,
                    announced: HashMap::new(),
                    held: Some(Vec::new()),
                },
            );
        let mail = self.mail.clone();
        let (user, session) = (msg.user, msg.session);
        Box::pin(
            async move {
                let waiting = mail.waiting(&user).await;
                (user, waiting)
            }
            .into_actor(self)
            .map(move |(user, waiting), actor, _| {
                let Some(subscriber) = actor
                    .subscribers
                    .get_mut(&user)
                    .and_then(|sessions| sessions.get_mut(&session))
                else {
                    return;
                };
                let waiting = match waiting {
                    Ok(waiting) => waiting,
                    Err(e) => {
                        // Closed rather than left believing nothing waits.
                        log::warn!("listing the mailbox of {user} failed: {e}; session closed");
                        subscriber.outbound.close();
                        return;
                    }
                };
                let now = Instant::now();
                subscriber
                    .announced
                    .extend(waiting.iter().map(|(seq, _)| (*seq, now)));
                queue_notices(&subscriber.outbound, waiting.iter().map(|(_, entry)| entry));
                for (seq, frame) in subscriber.held.take().unwrap_or_default() {
                    subscriber.tell(seq, &frame, None);
                }
            }),
        )
    }
}

impl Handler<Unsubscribe> for SharedMailboxActor {
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
