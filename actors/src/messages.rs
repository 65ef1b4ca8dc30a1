//! The typed messages the actors exchange. Presence and mailbox notices end
//! up as packets on sessions' outbound queues, encoded once per event.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::Message;

use crate::cluster::{MailHint, NodeState};
use crate::mailbox::{MailboxItem, MailboxStats};
use crate::outbound::Outbound;
use crate::proto::lines::StreamError;
use crate::proto::Status;

/// Identifies one session stream for the life of the process.
pub type SessionId = u64;

/// A fresh session id.
pub fn next_session_id() -> SessionId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A signed-on session joins presence. Presence queues the sign-on snapshot
/// (every `AddUser`, then every online user's `StatusChange`) before it
/// answers, and tells the others if the user just came online or back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub user: String,
    pub session: SessionId,
    pub outbound: Outbound,
    pub peer: SocketAddr,
    /// The fan-out relay of the thread the session runs on.
    pub relay: crate::relay::RelayHandle,
}

/// A session ended; the others hear `OFFLINE` or `IDLE` if that changes
/// how the user is shown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub user: String,
    pub session: SessionId,
}

/// The session's user has been idle for `idle_secs` (an `Idle` packet).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetIdle {
    pub user: String,
    pub session: SessionId,
    pub idle_secs: u64,
}

/// The session is in use again (a `NotIdle` packet).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetActive {
    pub user: String,
    pub session: SessionId,
}

/// A user was created: everyone online hears `AddUser`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UserAdded {
    pub user: String,
}

/// A user was removed: their sessions close and the user leaves the list.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UserRemoved {
    pub user: String,
}

/// The server is stopping: close every session.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll;

/// One user's presence, for the admin client.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UserPresence {
    pub user: String,
    pub status: Status,
    pub idle_secs: Option<u64>,
    pub sessions: Vec<SessionInfo>,
}

/// One open session, for the admin client.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    pub peer: String,
    pub connected_unix: u64,
    pub idle: bool,
    /// The node serving it, when several share a database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Asks presence for every online user.
#[derive(Message)]
#[rtype(result = "Vec<UserPresence>")]
pub struct ListOnline;

/// Stores a message for its recipients, durably; answers once it is on
/// disk (or once an identical earlier send is) with the `MessageAvailable`
/// frames queued for the recipients' sessions, or with the error to send.
#[derive(Message)]
#[rtype(result = "Result<crate::outbound::Queued, StreamError>")]
pub struct Deliver {
    pub sender: String,
    pub id: String,
    /// Repeats already removed, in the order first named.
    pub recipients: Vec<String>,
    /// Large data is staged into the embedded store's spool by the
    /// courier ([`crate::mailbox::Stager`]).
    pub data: crate::store::NewData,
    /// [`crate::mailbox::digest`] of the recipients and the data, made by
    /// the courier on its own thread: what tells a retry from a conflict.
    pub digest: Vec<u8>,
}

pub use crate::store::Fetched;

/// Reads a message from a user's mailbox.
#[derive(Message)]
#[rtype(result = "Result<Fetched, StreamError>")]
pub struct Fetch {
    pub user: String,
    pub id: String,
}

/// Removes a message from a user's mailbox, durably (the receiver's `done`,
/// or the admin); answers whether it was there.
#[derive(Message)]
#[rtype(result = "Result<bool, StreamError>")]
pub struct Remove {
    pub user: String,
    pub id: String,
}

/// A signed-on session wants `MessageAvailable` notices: the mailbox queues
/// one per waiting message, oldest first, then one per new message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub user: String,
    pub session: SessionId,
    pub outbound: Outbound,
}

/// A session ended; no more notices for it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub user: String,
    pub session: SessionId,
}

/// Removes a user's messages stored before a time (all when `None`),
/// durably; answers how many.
#[derive(Message)]
#[rtype(result = "Result<usize, StreamError>")]
pub struct Purge {
    pub user: String,
    pub older_than_unix: Option<u64>,
}

/// Lists one mailbox, or all.
#[derive(Message)]
#[rtype(result = "Result<Vec<MailboxItem>, StreamError>")]
pub struct ListMailbox {
    pub user: Option<String>,
}

/// Asks for messages and bytes per user.
#[derive(Message)]
#[rtype(result = "Vec<MailboxStats>")]
pub struct MailboxStatsRequest;

/// Copies the store to a new directory, between two mailbox writes.
#[derive(Message)]
#[rtype(result = "Result<(), StreamError>")]
pub struct Backup {
    pub dir: std::path::PathBuf,
}

/// A user was removed: drop their mailbox.
#[derive(Message)]
#[rtype(result = "Result<usize, StreamError>")]
pub struct DropMailbox {
    pub user: String,
}

/// The registered users as the shared database has them, to repair a
/// user list that missed hints.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UsersSnapshot {
    pub users: Vec<String>,
}

/// Another node's report of one of its users (a hint).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemotePresence(pub RemoteRow);

/// Another node is gone (stopped, or its lease ran out).
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeGone {
    pub node: String,
}

/// One node's report of one user: a row of the presence table, or a hint.
#[derive(Debug, Clone)]
pub struct RemoteRow {
    pub node: String,
    pub version: i64,
    pub user: String,
    pub state: Option<NodeState>,
}

/// What the database says of the other live nodes' users.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteSnapshot {
    pub live_nodes: std::collections::HashSet<String>,
    pub rows: Vec<RemoteRow>,
}

/// This node's lease had run out: publish every local user again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RepublishLocal;

/// A message stored at another node (a hint): its recipients signed on
/// here hear `MessageAvailable`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MailNotice(pub MailHint);

/// Reread the mailboxes of users signed on here: announce what their
/// sessions have not heard of, and forget notices of messages no longer
/// waiting. `all`: every such user (hints may have been lost); otherwise
/// only users whose sessions remember many notices (pruning memory).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Rescan {
    pub all: bool,
}
