//! What every connection handler needs, in one shared struct: settings, the
//! store, the authenticator and the actors' addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix::Addr;

use crate::auth::AuthError;
use crate::auth::Authenticator;
use crate::mailbox::Stager;
use crate::mailbox_handle::MailboxHandle;
use crate::presence::PresenceActor;
use crate::proto::names::{valid_password, valid_username};
use crate::settings::{Limits, Timeouts};
use crate::store::Directory;
use crate::throttle::{Gate, LoginThrottle};

/// Shared by all connections of one server.
pub struct Services {
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// The registered users, in whichever backend holds them.
    pub users: Arc<dyn Directory>,
    pub auth: Arc<Authenticator>,
    pub presence: Addr<PresenceActor>,
    pub mailbox: MailboxHandle,
    /// Writes large message data to the embedded store's spool before the
    /// mailbox gets it; `None` where the database keeps all data.
    pub stager: Option<Arc<Stager>>,
    /// The shared database, when several nodes share one (for the views
    /// of every node, such as `admin sessions`).
    pub shared_db: Option<deadpool_postgres::Pool>,
    /// Set at shutdown: new message streams are answered `unavailable`.
    pub shutting_down: AtomicBool,
    /// Message streams in flight, awaited at shutdown.
    pub exchanges: AtomicUsize,
    /// Open connections of both kinds.
    pub connections: AtomicUsize,
    /// Open connections per source address.
    pub per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Failed-login throttling, both protocols.
    pub throttle: LoginThrottle,
    /// Message bytes in flight over every message stream.
    pub budget: crate::budget::ByteBudget,
}

/// What an open store gives the connection handlers.
#[derive(Clone)]
pub struct Backing {
    pub users: Arc<dyn Directory>,
    pub auth: Arc<Authenticator>,
    pub presence: Addr<PresenceActor>,
    pub mailbox: MailboxHandle,
    pub stager: Option<Arc<Stager>>,
    pub shared_db: Option<deadpool_postgres::Pool>,
}

impl Services {
    /// The services of a server on `backing`, with nothing open yet.
    pub fn new(limits: Limits, timeouts: Timeouts, backing: Backing) -> Services {
        let Backing {
            users,
            auth,
            presence,
            mailbox,
            stager,
            shared_db,
        } = backing;
        let throttle = LoginThrottle::new(limits.throttle(&timeouts));
        let budget = limits.byte_budget(&timeouts);
        Services {
            limits,
            timeouts,
            users,
            auth,
            presence,
            mailbox,
            stager,
            shared_db,
            shutting_down: AtomicBool::new(false),
            exchanges: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            per_address: Default::default(),
            throttle,
            budget,
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Admits a new connection from `addr` within the total and
    /// per-address limits; the guard gives its place back when dropped.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Result<ConnectionGuard, &'static str> {
        if self.connections.load(Ordering::Acquire) >= self.limits.connections {
            return Err("connection limit reached");
        }
        // An IPv6 host is limited by its /64, as the login throttle counts.
        let addr = crate::throttle::address_block(addr);
        let mut per_address = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        let open = per_address.entry(addr).or_default();
        if *open >= self.limits.connections_per_address {
            return Err("connection limit for this address reached");
        }
        *open += 1;
        self.connections.fetch_add(1, Ordering::AcqRel);
        Ok(ConnectionGuard {
            services: self.clone(),
            addr,
        })
    }
}

/// The answer to a login that found every password check taken for
/// `timeouts.password_check_wait_secs`, on both protocols.
pub const SERVER_BUSY: &str = "server busy; try again later";

/// The result of a credential check, for either protocol to phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    Accepted,
    /// Unknown user, wrong password, or a name or password that breaks the
    /// syntax rules: one outcome for all, after the same work.
    WrongCredentials,
    /// Too many failures from this address; the text says so.
    Throttled(String),
    /// The password checks are saturated, or the store cannot be reached;
    /// the text says which. Worth a retry.
    Unavailable(String),
    Failed(String),
}

impl Services {
    /// Checks credentials through the throttle: a refused address is not
    /// checked at all, and a failure is answered only after its delay.
    pub async fn check_login(&self, user: &str, password: &str, addr: IpAddr) -> LoginOutcome {
        if let Gate::Refuse(reason) = self.throttle.gate(user, addr) {
            return LoginOutcome::Throttled(reason);
        }
        let verdict = if valid_username(user) && valid_password(password) {
            self.auth.verify(user, password).await
        } else {
            // Same cost as a real check, so syntax does not leak existence.
            self.auth.verify("", password).await.map(|_| false)
        };
        match verdict {
            Ok(true) => {
                self.throttle.succeeded(user, addr);
                LoginOutcome::Accepted
            }
            Ok(false) => {
                let delay = self.throttle.failed(user, addr);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                LoginOutcome::WrongCredentials
            }
            Err(AuthError::Busy) => LoginOutcome::Unavailable(SERVER_BUSY.into()),
            Err(AuthError::Store(e)) if e.is_transient() => {
                LoginOutcome::Unavailable(format!("{e}; try again"))
            }
            Err(e) => LoginOutcome::Failed(e.to_string()),
        }
    }
}

/// One admitted connection; see [`Services::admit`].
pub struct ConnectionGuard {
    services: Arc<Services>,
    addr: IpAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.services.connections.fetch_sub(1, Ordering::AcqRel);
        let mut per_address = self
            .services
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(open) = per_address.get_mut(&self.addr) {
            *open -= 1;
            if *open == 0 {
                per_address.remove(&self.addr);
            }
        }
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
