//! MailboxActor: the durable mailboxes at run time. It stores a message
//! (through [`Mailboxes`]) once for all its recipients, makes it durable
//! through group commit before the sender hears `done`, and only then tells
//! the recipients' sessions with `MessageAvailable`. It is the one ordering
//! point for mailbox notices: a session that subscribes gets every committed
//! message once, either in its sign-on list or as a notice, never both and
//! never neither.

use std::collections::HashMap;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, MessageResult, ResponseActFuture,
    ResponseFuture, WrapFuture,
};

use super::{internal, IdPruning, Mailboxes, NewMessage, Stored, Uncommitted};
use crate::messages::{
    Backup, Deliver, DropMailbox, Fetch, Fetched, ListMailbox, MailboxStatsRequest, Purge, Remove,
    SessionId, Subscribe, Unsubscribe,
};
use crate::outbound::{Outbound, Queued};
use crate::proto::lines::{ErrorCode, StreamError};
use crate::store::{CommitError, GroupCommit};

fn commit_error(e: CommitError) -> StreamError {
    match e {
        CommitError::Overloaded | CommitError::Closed => {
            StreamError::new(ErrorCode::Unavailable, format!("{e}; try again"))
        }
        CommitError::Flush(reason) => super::cannot_write(reason),
    }
}

const ACTOR: &str = "the mailbox actor";

/// The wait after a first failed reopen of the store, doubled after each
/// further one up to the last.
const FIRST_REOPEN_WAIT: Duration = Duration::from_millis(500);
const LAST_REOPEN_WAIT: Duration = Duration::from_secs(30);

/// The answer to a request whose handling panicked: the actor restarts with
/// its index reloaded from the store, and nothing of the request is kept
/// unless it was already durable.
fn failed_here() -> StreamError {
    internal("the mailbox failed on this request; it restarts, try again")
}

/// Owns the mailboxes at run time; see the module doc.
pub struct MailboxActor {
    mailboxes: Mailboxes,
    commit: GroupCommit,
    subscribers: HashMap<String, HashMap<SessionId, Outbound>>,
    /// Entries found written but not committed when the actor restarted;
    /// committed and announced once it has started again.
    unannounced: Uncommitted,
    /// A pruning pass over the retained ids is under way.
    pruning: bool,
    /// When a reopen of a failed store may next be tried, and how long to
    /// wait after that one if it fails too.
    next_reopen: (std::time::Instant, Duration),
}

impl MailboxActor {
    pub fn new(mailboxes: Mailboxes, commit: GroupCommit) -> MailboxActor {
        MailboxActor {
            mailboxes,
            commit,
            subscribers: HashMap::new(),
            unannounced: Vec::new(),
            pruning: false,
            next_reopen: (std::time::Instant::now(), FIRST_REOPEN_WAIT),
        }
    }

    /// Commits the entries found written but not committed (after a restart
    /// or a reopen of the store), then announces them once.
    fn commit_and_announce(&mut self, unannounced: Uncommitted, ctx: &mut Context<Self>) {
        if unannounced.is_empty() {
            return;
        }
        log::info!(
            "committing {} messages written before the store was reloaded",
            unannounced.len()
        );
        let announce = self.commit_then(move |actor| {
            for (seq, recipients) in &unannounced {
                actor.announce(*seq, recipients, None);
            }
            Ok(())
        });
        ctx.spawn(announce.map(|result, _, _| {
            if let Err(e) = result {
                log::error!("committing the messages written before the reload: {e}");
            }
        }));
    }

    /// Reopens the store once it failed a write and there is room again.
    /// The actor takes no other message meanwhile, so nothing is written
    /// between the reopen and the reload of the index; the index is then
    /// rebuilt from the reopened store, which holds the truth, and what it
    /// holds that was not committed here is committed and announced.
    /// Sessions stay signed on throughout.
    fn reopen_if_due(&mut self, ctx: &mut Context<Self>) {
        let Some(reason) = self.mailboxes.due_for_reopen() else {
            return;
        };
        // After a failed attempt, wait twice as long as last time.
        let (when, wait) = self.next_reopen;
        if std::time::Instant::now() < when {
            return;
        }
        self.next_reopen = (
            std::time::Instant::now() + wait,
            (wait * 2).min(LAST_REOPEN_WAIT),
        );
        log::warn!("the store failed a write ({reason}) and there is room again: reopening it");
        let commit = self.commit.clone();
        ctx.wait(async move { commit.reopen().await }.into_actor(self).map(
            |reopened, actor, ctx| {
                if let Err(e) = reopened {
                    log::error!("reopening the store failed: {e}; sends stay refused");
                    return;
                }
                match actor.mailboxes.reload_after_failure() {
                    Ok((mailboxes, unannounced)) => {
                        actor.next_reopen = (std::time::Instant::now(), FIRST_REOPEN_WAIT);
                        actor.mailboxes = mailboxes;
                        actor.publish();
                        actor.commit_and_announce(unannounced, ctx);
                        log::info!("the store takes sends again");
                    }
                    Err(e) => log::error!("reloading the mailboxes after a reopen failed: {e}"),
                }
            },
        ));
    }

    /// After the flush: make the entries receivable and tell the sessions,
    /// with one encoded frame for all of them; receipts go into `queued`
    /// when a sender waits for them.
    fn announce(&mut self, seq: u64, recipients: &[String], mut queued: Option<&mut Queued>) {
        let Some((entry, newly)) = self.mailboxes.mark_committed(seq, recipients) else {
            return;
        };
        let frame = entry.notice();
        for recipient in newly {
            for outbound in self
                .subscribers
                .get(&recipient)
                .into_iter()
                .flat_map(|s| s.values())
            {
                Queued::push_to(queued.as_deref_mut(), outbound, frame.clone());
            }
        }
    }

    /// Starts a pass over the retained ids unless one is running. Each
    /// chunk is one turn of the actor, so sends and receives go on between
    /// them.
    fn start_pruning(&mut self, ctx: &mut Context<Self>) {
        if !std::mem::replace(&mut self.pruning, true) {
            let pass = self.mailboxes.start_id_pruning();
            self.prune_step(pass, ctx);
        }
    }

    fn prune_step(&mut self, mut pass: IdPruning, ctx: &mut Context<Self>) {
        if self.mailboxes.prune_id_chunk(&mut pass) {
            ctx.run_later(Duration::ZERO, move |actor, ctx| {
                actor.prune_step(pass, ctx)
            });
        } else {
            self.pruning = false;
        }
    }

    fn publish(&self) {
        let (messages, bytes) = self.mailboxes.totals();
        metrics::gauge!(crate::metrics::MAILBOX_MESSAGES).set(messages as f64);
        metrics::gauge!(crate::metrics::MAILBOX_BYTES).set(bytes as f64);
    }

    /// Answers after the next flush has made every write so far durable.
    fn commit_then<T: 'static>(
        &self,
        then: impl FnOnce(&mut Self) -> Result<T, StreamError> + 'static,
    ) -> ResponseActFuture<Self, Result<T, StreamError>> {
        let commit = self.commit.clone();
        Box::pin(
            async move { commit.commit().await.map_err(commit_error) }
                .into_actor(self)
                .map(move |result, actor, ctx| {
                    crate::contain::<Self, _>(
                        ctx,
                        ACTOR,
                        || {
                            actor.publish();
                            result.and_then(|()| then(actor))
                        },
                        || Err(failed_here()),
                    )
                }),
        )
    }

    /// Runs a change now, then answers once it is durable; a panic in the
    /// change restarts the actor and answers `internal`.
    fn contained_change<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        change: impl FnOnce(&mut Mailboxes) -> Result<T, StreamError>,
    ) -> ResponseActFuture<Self, Result<T, StreamError>> {
        let mailboxes = &mut self.mailboxes;
        let changed =
            crate::contain::<Self, _>(ctx, ACTOR, || change(mailboxes), || Err(failed_here()));
        match changed {
            Ok(value) => self.commit_then(move |_| Ok(value)),
            Err(e) => Box::pin(actix::fut::ready(Err(e))),
        }
    }
}

/// Restarted by its supervisor after a contained panic: the index is
/// reloaded from the store, which holds the truth; subscriptions stay. The
/// restart drops the commits the actor was waiting for, so entries written
/// but not yet committed are kept invisible and committed (then announced)
/// again once it has started.
impl actix::Supervised for MailboxActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // `started` begins a fresh pass.
        self.pruning = false;
        match self.mailboxes.reload_after_failure() {
            Ok((mailboxes, unannounced)) => {
                self.mailboxes = mailboxes;
                self.unannounced = unannounced;
            }
            Err(e) => log::error!("reloading the mailboxes after a restart failed: {e}"),
        }
    }
}

impl Actor for MailboxActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let unannounced = std::mem::take(&mut self.unannounced);
        self.commit_and_announce(unannounced, ctx);
        let (messages, bytes) = self.mailboxes.totals();
        log::info!("mailboxes loaded: {messages} messages, {bytes} bytes waiting");
        self.publish();
        self.start_pruning(ctx);
        let every = (self.mailboxes.settings().id_retention / 24).max(Duration::from_secs(60));
        ctx.run_interval(every, |actor, ctx| actor.start_pruning(ctx));
        self.mailboxes.publish_disk_free();
        ctx.run_interval(Duration::from_secs(10), |actor, _| {
            actor.mailboxes.publish_disk_free()
        });
        ctx.run_interval(Duration::from_millis(500), |actor, ctx| {
            actor.reopen_if_due(ctx)
        });
    }
}

impl Handler<Deliver> for MailboxActor {
    type Result = ResponseActFuture<Self, Result<Queued, StreamError>>;

    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) -> Self::Result {
        let mailboxes = &mut self.mailboxes;
        let stored = crate::contain::<Self, _>(
            ctx,
            ACTOR,
            || {
                #[cfg(feature = "failpoints")]
                if msg.id == crate::FAILPOINT_MAILBOX_ID {
                    panic!("failpoint: mailbox actor panic injected");
                }
                mailboxes.store_message(NewMessage {
                    sender: &msg.sender,
                    id: &msg.id,
                    recipients: &msg.recipients,
                    // Staged data not recorded here is unlinked when `msg`
                    // is dropped at the end of this handler.
                    data: &msg.data,
                    digest: &msg.digest,
                })
            },
            || Err(failed_here()),
        );
        let seq = match stored {
            Ok(Stored::New(seq)) => {
                metrics::counter!(crate::metrics::MESSAGES_STORED).increment(1);
                seq
            }
            Ok(Stored::Retry(seq)) => seq,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let recipients = msg.recipients;
        // A retry also waits for a flush and re-announces, so that a first
        // attempt whose flush failed becomes visible once one succeeds.
        self.commit_then(move |actor| {
            let mut queued = Queued::default();
            actor.announce(seq, &recipients, Some(&mut queued));
            Ok(queued)
        })
    }
}

impl Handler<Fetch> for MailboxActor {
    type Result = Result<Fetched, StreamError>;

    fn handle(&mut self, msg: Fetch, ctx: &mut Context<Self>) -> Self::Result {
        let mailboxes = &self.mailboxes;
        crate::contain::<Self, _>(
            ctx,
            ACTOR,
            || {
                #[cfg(feature = "failpoints")]
                if msg.id == crate::FAILPOINT_FETCH_ID {
                    panic!("failpoint: mailbox actor panic injected in a receive");
                }
                mailboxes.fetch(&msg.user, &msg.id)
            },
            || Err(failed_here()),
        )
    }
}

impl Handler<Remove> for MailboxActor {
    type Result = ResponseActFuture<Self, Result<bool, StreamError>>;

    fn handle(&mut self, msg: Remove, ctx: &mut Context<Self>) -> Self::Result {
        self.contained_change(ctx, |m| m.remove(&msg.user, &msg.id))
    }
}

impl Handler<Purge> for MailboxActor {
    type Result = ResponseActFuture<Self, Result<usize, StreamError>>;

    fn handle(&mut self, msg: Purge, ctx: &mut Context<Self>) -> Self::Result {
        self.contained_change(ctx, |m| m.purge(&msg.user, msg.older_than_unix))
    }
}

impl Handler<DropMailbox> for MailboxActor {
    type Result = ResponseActFuture<Self, Result<usize, StreamError>>;

    fn handle(&mut self, msg: DropMailbox, ctx: &mut Context<Self>) -> Self::Result {
        self.subscribers.remove(&msg.user);
        self.contained_change(ctx, |m| m.purge(&msg.user, None))
    }
}

/// The records are copied here, between two mailbox writes, so that the
/// copy holds no half-stored message; the message files, which may be
/// gigabytes, are copied on the blocking pool while sends go on.
impl Handler<Backup> for MailboxActor {
    type Result = ResponseFuture<Result<(), StreamError>>;

    fn handle(&mut self, msg: Backup, ctx: &mut Context<Self>) -> Self::Result {
        let mailboxes = &self.mailboxes;
        let records = crate::contain::<Self, _>(
            ctx,
            ACTOR,
            || mailboxes.backup(&msg.dir),
            || Err(failed_here()),
        );
        Box::pin(async move {
            let pending = records?;
            tokio::task::spawn_blocking(move || pending.finish())
                .await
                .map_err(super::internal)?
                .map_err(super::internal)
        })
    }
}

impl Handler<ListMailbox> for MailboxActor {
    type Result = Result<Vec<super::MailboxItem>, StreamError>;

    fn handle(&mut self, msg: ListMailbox, ctx: &mut Context<Self>) -> Self::Result {
        let mailboxes = &self.mailboxes;
        crate::contain::<Self, _>(
            ctx,
            ACTOR,
            || mailboxes.list(msg.user.as_deref()),
            || Err(failed_here()),
        )
    }
}

impl Handler<MailboxStatsRequest> for MailboxActor {
    type Result = MessageResult<MailboxStatsRequest>;

    fn handle(&mut self, _: MailboxStatsRequest, ctx: &mut Context<Self>) -> Self::Result {
        let mailboxes = &self.mailboxes;
        MessageResult(crate::contain::<Self, _>(
            ctx,
            ACTOR,
            || mailboxes.stats(),
            Vec::new,
        ))
    }
}

impl Handler<Subscribe> for MailboxActor {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        let outbound = msg.outbound.clone();
        // A session that cannot be told its waiting messages is closed
        // rather than left believing there are none.
        crate::contain::<Self, _>(ctx, ACTOR, || self.subscribe(msg), || outbound.close());
    }
}

impl MailboxActor {
    fn subscribe(&mut self, msg: Subscribe) {
        super::queue_notices(&msg.outbound, self.mailboxes.committed(&msg.user));
        self.subscribers
            .entry(msg.user)
            .or_default()
            .insert(msg.session, msg.outbound);
    }
}

impl Handler<Unsubscribe> for MailboxActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) {
        let subscribers = &mut self.subscribers;
        let unsubscribe = || {
            if let Some(sessions) = subscribers.get_mut(&msg.user) {
                sessions.remove(&msg.session);
                if sessions.is_empty() {
                    subscribers.remove(&msg.user);
                }
            }
        };
        crate::contain::<Self, _>(ctx, ACTOR, unsubscribe, || ());
    }
}
