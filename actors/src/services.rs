//! What every connection handler needs, in one shared struct: settings, the
//! store, the authenticator and the actors' addresses.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::Addr;

use crate::auth::Authenticator;
use crate::mailbox::MailboxActor;
use crate::presence::PresenceActor;
use crate::settings::{Limits, Timeouts};
use crate::store::{GroupCommit, Store};

/// Shared by all connections of one server.
pub struct Services {
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub store: Arc<dyn Store>,
    pub commit: GroupCommit,
    pub auth: Arc<Authenticator>,
    pub presence: Addr<PresenceActor>,
    pub mailbox: Addr<MailboxActor>,
    /// Set at shutdown: new message streams are answered `unavailable`.
    pub shutting_down: AtomicBool,
    /// Message streams in flight, awaited at shutdown.
    pub exchanges: AtomicUsize,
    /// Open connections of both kinds.
    pub connections: AtomicUsize,
}

impl Services {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// Counts one unit in one of the server's counters for as long as it lives.
pub struct OwnedCountGuard(Arc<Services>, fn(&Services) -> &AtomicUsize);

impl OwnedCountGuard {
    pub fn new(services: Arc<Services>, counter: fn(&Services) -> &AtomicUsize) -> Self {
        counter(&services).fetch_add(1, Ordering::AcqRel);
        OwnedCountGuard(services, counter)
    }
}

impl Drop for OwnedCountGuard {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::AcqRel);
    }
}
