//! The core of csm: wire formats, the store, authentication and the actors
//! (sessions, presence, mailboxes, message-stream couriers).

pub mod auth;
pub mod budget;
pub mod cluster;
pub mod courier;
pub mod mailbox;
pub mod mailbox_handle;
pub mod messages;
pub mod metrics;
pub mod outbound;
pub mod presence;
pub mod proto;
pub mod relay;
pub mod services;
pub mod session;
pub mod settings;
pub mod shared_mailbox;
pub mod store;
pub mod throttle;

/// Failpoints for tests (feature `failpoints`, never in a release build):
/// an `Idle` packet with this `idle_secs` panics its session's handler.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_IDLE_SECS: u64 = u64::MAX - 7;

/// Failpoint: a message stream with this id panics its handler.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_MESSAGE_ID: &str = "failpoint:panic";

/// Failpoint: a message with this id panics the mailbox actor.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_MAILBOX_ID: &str = "failpoint:mailbox-panic";

/// Failpoint: a message with this id is written, and then the mailbox
/// actor panics before it is committed.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_STORED_THEN_PANIC: &str = "failpoint:stored-then-panic";

/// Failpoint: receiving the message with this id panics the mailbox actor.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_FETCH_ID: &str = "failpoint:fetch-panic";

/// Failpoint: signing on as this user panics the presence actor.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_REGISTER_USER: &str = "failpoint.register";

/// Failpoint: the session writer of this user waits 30 ms before each
/// write, as a writer on a busy thread would.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_SLOW_WRITER_USER: &str = "failpoint.slow-writer";

/// Failpoint: an `Idle` with this `idle_secs` panics the presence actor.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_PRESENCE_IDLE_SECS: u64 = u64::MAX - 9;

/// Runs `work` for an actor; a panic inside it stops the actor, so that its
/// supervisor restarts it with rebuilt state, and yields `fallback`.
pub(crate) fn contain<A, T>(
    ctx: &mut A::Context,
    what: &str,
    work: impl FnOnce() -> T,
    fallback: impl FnOnce() -> T,
) -> T
where
    A: actix::Actor<Context = actix::Context<A>>,
{
    use actix::ActorContext;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(value) => value,
        Err(_) => {
            log::error!("{what} panicked; the actor restarts with its state rebuilt");
            ctx.stop();
            fallback()
        }
    }
}
