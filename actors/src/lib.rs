//! The core of csm: wire formats, the store, authentication and the actors
//! (sessions, presence, mailboxes, message-stream couriers).

pub mod auth;
pub mod courier;
pub mod mailbox;
pub mod mailboxes;
pub mod messages;
pub mod metrics;
pub mod outbound;
pub mod presence;
pub mod proto;
pub mod services;
pub mod session;
pub mod settings;
pub mod store;
pub mod throttle;

/// Failpoints for tests (feature `failpoints`, never in a release build):
/// an `Idle` packet with this `idle_secs` panics its session's handler.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_IDLE_SECS: u64 = u64::MAX - 7;

/// Failpoint: a message stream with this id panics its handler.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_MESSAGE_ID: &str = "failpoint:panic";
