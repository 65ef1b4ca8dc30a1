//! One node's part in the cluster, as three tasks:
//! - the **publisher** writes this node's presence changes to the
//!   `presence` table with their hint, a batch per transaction; changes
//!   wait in a map keyed by user, so a storm of sign-ons costs one row per
//!   user, not one per event, and a failed write is retried;
//! - the **lease keeper** renews this node's lease and expires the nodes
//!   that stopped renewing theirs (their rows go, and every node hears
//!   that their users are gone);
//! - the **listener** holds a dedicated connection that `LISTEN`s for
//!   hints and hands them to the actors. After every (re)connect, and when
//!   hints came faster than they were handled, it rereads users, presence
//!   and the local users' mailboxes, so lost or duplicated hints do no
//!   lasting harm. (While it is connected PostgreSQL delivers every hint
//!   of a committed transaction; a `NOTIFY` that cannot be queued fails
//!   its transaction instead.)

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Addr, Recipient};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::AsyncMessage;

use crate::auth::Authenticator;
use crate::messages::{
    MailNotice, NodeGone, RemotePresence, RemoteRow, RemoteSnapshot, RepublishLocal, Rescan,
    SessionInfo, UserAdded, UserPresence, UserRemoved, UsersSnapshot,
};
use crate::presence::PresenceActor;
use crate::proto::Status;
use crate::store::{unix_now, StoreError};

use super::{db_error, pg_config, pool_error, Hint, NodeState, PgSettings, CHANNEL};

/// Users written per presence transaction.
const PUBLISH_BATCH: usize = 500;
/// Hints waiting for the actors; past it they count as lost (and a rescan
/// repairs what they would have said).
const HINT_QUEUE: usize = 65_536;

/// This node's view of one of its users, for the other nodes.
#[derive(Debug, Clone)]
pub struct PresenceUpdate {
    pub user: String,
    /// `None`: no session of the user here any more.
    pub state: Option<NodeState>,
    pub sessions: Vec<SessionInfo>,
}

#[derive(Default)]
struct LinkShared {
    pending: Mutex<HashMap<String, PresenceUpdate>>,
    wake: Notify,
}

/// Where the presence actor leaves this node's changes for the publisher;
/// the newest change per user replaces any older one still waiting.
#[derive(Clone, Default)]
pub struct ClusterLink {
    shared: Arc<LinkShared>,
}

impl ClusterLink {
    pub fn new() -> ClusterLink {
        ClusterLink::default()
    }

    pub fn publish(&self, update: PresenceUpdate) {
        self.lock().insert(update.user.clone(), update);
        self.shared.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PresenceUpdate>> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, max: usize) -> Vec<PresenceUpdate> {
        let mut pending = self.lock();
        let users: Vec<String> = pending.keys().take(max).cloned().collect();
        users
            .into_iter()
            .filter_map(|user| pending.remove(&user))
            .collect()
    }

    /// Returns updates whose write failed, unless newer ones came meanwhile.
    fn put_back(&self, updates: Vec<PresenceUpdate>) {
        let mut pending = self.lock();
        for update in updates {
            pending.entry(update.user.clone()).or_insert(update);
        }
    }
}

/// The actors and caches hints are for.
#[derive(Clone)]
pub struct NodeTargets {
    pub presence: Addr<PresenceActor>,
    pub mail: Recipient<MailNotice>,
    pub rescan: Recipient<Rescan>,
    pub auth: Arc<Authenticator>,
}

/// The sessions one node serves for one user, for `admin sessions`.
#[derive(Debug, Clone)]
pub struct NodeSessions {
    pub node: String,
    pub user: String,
    pub state: NodeState,
    pub sessions: Vec<SessionInfo>,
}

/// This node in the cluster; see the module doc.
pub struct Node {
    name: String,
    pool: Pool,
    settings: PgSettings,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Node {
    /// Registers this node (taking over rows a previous run under the
    /// same name left) and tells the others.
    pub async fn join(pool: Pool, settings: PgSettings) -> Result<Node, StoreError> {
        let name = settings.node.clone();
        let mut client = pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute(
            "INSERT INTO nodes (name, lease_until, started_unix)
             VALUES ($1, now() + make_interval(secs => $2), $3)
             ON CONFLICT (name) DO UPDATE
             SET lease_until = EXCLUDED.lease_until, started_unix = EXCLUDED.started_unix",
            &[&name, &settings.lease.as_secs_f64(), &(unix_now() as i64)],
        )
        .await
        .map_err(db_error)?;
        tx.execute("DELETE FROM presence WHERE node = $1", &[&name])
            .await
            .map_err(db_error)?;
        for hint in [
            Hint::NodeGone { node: name.clone() },
            Hint::NodeUp { node: name.clone() },
        ] {
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &hint.payload()])
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        drop(client);
        log::info!("joined the cluster as node {name}");
        let (stop, _) = watch::channel(false);
        Ok(Node {
            name,
            pool,
            settings,
            stop,
            tasks: Mutex::new(Vec::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the publisher, the lease keeper and the listener on the
    /// current runtime.
    pub fn start(&self, link: ClusterLink, targets: NodeTargets) {
        let versions = Arc::new(AtomicI64::new(unix_micros()));
        let tasks = [
            tokio::spawn(publisher(
                self.pool.clone(),
                self.name.clone(),
                link,
                versions,
                self.stop.subscribe(),
            )),
            tokio::spawn(lease_keeper(
                self.pool.clone(),
                self.settings.clone(),
                targets.presence.clone(),
                self.stop.subscribe(),
            )),
            tokio::spawn(listener(
                self.pool.clone(),
                self.settings.clone(),
                targets,
                self.stop.subscribe(),
            )),
        ];
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(tasks);
    }

    /// Stops the tasks (the publisher writes what waits first) and leaves
    /// the cluster: the others see this node's users go offline at once
    /// instead of after the lease.
    pub async fn leave(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let left = async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(db_error)?;
            tx.execute("DELETE FROM nodes WHERE name = $1", &[&self.name])
                .await
                .map_err(db_error)?;
            tx.execute("DELETE FROM presence WHERE node = $1", &[&self.name])
                .await
                .map_err(db_error)?;
            let gone = Hint::NodeGone {
                node: self.name.clone(),
            };
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &gone.payload()])
                .await
                .map_err(db_error)?;
            tx.commit().await.map_err(db_error)
        };
        match left.await {
            Ok(()) => log::info!("left the cluster"),
            Err(e) => log::warn!("could not leave the cluster cleanly (the lease will): {e}"),
        }
    }
}

/// The sessions of every live node, for `admin sessions`.
pub async fn cluster_sessions(pool: &Pool) -> Result<Vec<NodeSessions>, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let rows = client
        .query(
            "SELECT p.node, p.username, p.state, p.idle_since_ms, p.sessions
             FROM presence p JOIN nodes n ON n.name = p.node
             WHERE n.lease_until > now() AND p.state <> 'O'
             ORDER BY p.username COLLATE \"C\", p.node",
            &[],
        )
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let node: String = row.get(0);
            let state = node_state(row.get(2), row.get(3))?;
            let sessions = decode_sessions(row.get(4), &node);
            Some(NodeSessions {
                node,
                user: row.get(1),
                state,
                sessions,
            })
        })
        .collect())
}

/// Every user signed on at any live node, with every session, as the
/// admin shows them: idle when idle on every node, for the shortest time.
pub async fn cluster_presence(pool: &Pool) -> Result<Vec<UserPresence>, StoreError> {
    let now_ms = unix_micros() / 1000;
    let mut users: Vec<UserPresence> = Vec::new();
    for row in cluster_sessions(pool).await? {
        let idle_secs = match row.state {
            NodeState::Active => None,
            NodeState::Idle { since_ms } => Some((now_ms - since_ms).max(0) as u64 / 1000),
        };
        match users.last_mut() {
            Some(user) if user.user == row.user => {
                user.idle_secs = match (user.idle_secs, idle_secs) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    _ => None,
                };
                user.sessions.extend(row.sessions);
            }
            _ => users.push(UserPresence {
                user: row.user,
                status: Status::Online,
                idle_secs,
                sessions: row.sessions,
            }),
        }
    }
    for user in &mut users {
        if user.idle_secs.is_some() {
            user.status = Status::Idle;
        }
    }
    Ok(users)
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A version newer than every one this node has used (also across
/// restarts, since it follows the clock).
fn next_version(versions: &AtomicI64) -> i64 {
    let now = unix_micros();
    let previous = versions
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(v.saturating_add(1).max(now))
        })
        .unwrap_or(now);
    previous.saturating_add(1).max(now)
}

fn state_columns(state: Option<NodeState>) -> (&'static str, Option<i64>) {
    match state {
        None => ("O", None),
        Some(NodeState::Active) => ("A", None),
        Some(NodeState::Idle { since_ms }) => ("I", Some(since_ms)),
    }
}

fn node_state(state: &str, idle_since_ms: Option<i64>) -> Option<NodeState> {
    match (state, idle_since_ms) {
        ("A", _) => Some(NodeState::Active),
        ("I", Some(since_ms)) => Some(NodeState::Idle { since_ms }),
        _ => None,
    }
}

fn encode_sessions(sessions: &[SessionInfo]) -> String {
    sessions
        .iter()
        .map(|s| format!("{}\t{}\t{}", s.peer, s.connected_unix, u8::from(s.idle)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn decode_sessions(text: &str, node: &str) -> Vec<SessionInfo> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            Some(SessionInfo {
                peer: fields.next()?.to_owned(),
                connected_unix: fields.next()?.parse().ok()?,
                idle: fields.next()? == "1",
                node: Some(node.to_owned()),
            })
        })
        .collect()
}

async fn publisher(
    pool: Pool,
    node: String,
    link: ClusterLink,
    versions: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stopping = tokio::select! {
            _ = link.shared.wake.notified() => false,
            _ = stop.changed() => true,
        };
        loop {
            let batch = link.take(PUBLISH_BATCH);
            if batch.is_empty() {
                break;
            }
            if let Err(e) = write_presence(&pool, &node, &batch, &versions).await {
                log::warn!("publishing presence of {} users failed: {e}", batch.len());
                link.put_back(batch);
                if stopping {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        if stopping {
            return;
        }
    }
}

async fn write_presence(
    pool: &Pool,
    node: &str,
    batch: &[PresenceUpdate],
    versions: &AtomicI64,
) -> Result<(), StoreError> {
    let mut users = Vec::with_capacity(batch.len());
    let mut version_list = Vec::with_capacity(batch.len());
    let mut states = Vec::with_capacity(batch.len());
    let mut idle_since = Vec::with_capacity(batch.len());
    let mut sessions = Vec::with_capacity(batch.len());
    let mut payloads = Vec::with_capacity(batch.len());
    for update in batch {
        let version = next_version(versions);
        let (state, since) = state_columns(update.state);
        users.push(update.user.as_str());
        version_list.push(version);
        states.push(state);
        idle_since.push(since);
        sessions.push(encode_sessions(&update.sessions));
        payloads.push(
            Hint::Presence {
                node: node.to_owned(),
                version,
                user: update.user.clone(),
                state: update.state,
            }
            .payload(),
        );
    }
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute(
        "INSERT INTO presence (node, username, version, state, idle_since_ms, sessions)
         SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[])
         ON CONFLICT (node, username) DO UPDATE SET version = EXCLUDED.version,
           state = EXCLUDED.state, idle_since_ms = EXCLUDED.idle_since_ms,
           sessions = EXCLUDED.sessions",
        &[
            &node,
            &users,
            &version_list,
            &states,
            &idle_since,
            &sessions,
        ],
    )
    .await
    .map_err(db_error)?;
    tx.execute(
        "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload",
        &[&CHANNEL, &payloads],
    )
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)
}

async fn lease_keeper(
    pool: Pool,
    settings: PgSettings,
    presence: Addr<PresenceActor>,
    mut stop: watch::Receiver<bool>,
) {
    let period = (settings.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        match renew(&pool, &settings).await {
            Ok(true) => {}
            Ok(false) => {
                log::warn!(
                    "this node's lease had run out and the others dropped its users; rejoined"
                );
                presence.do_send(RepublishLocal);
            }
            Err(e) => log::warn!("renewing this node's lease failed: {e}"),
        }
        match expire(&pool).await {
            Ok(gone) => {
                for node in gone {
                    log::warn!("node {node} did not renew its lease; its users are offline");
                }
            }
            Err(e) => log::warn!("expiring other nodes' leases failed: {e}"),
        }
    }
}

/// Renews the lease; false if it had run out (the row was gone), in which
/// case the node is registered again.
async fn renew(pool: &Pool, settings: &PgSettings) -> Result<bool, StoreError> {
    let lease = settings.lease.as_secs_f64();
    let mut client = pool.get().await.map_err(pool_error)?;
    let renewed = client
        .execute(
            "UPDATE nodes SET lease_until = now() + make_interval(secs => $2) WHERE name = $1",
            &[&settings.node, &lease],
        )
        .await
        .map_err(db_error)?;
    if renewed > 0 {
        return Ok(true);
    }
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute(
        "INSERT INTO nodes (name, lease_until, started_unix)
         VALUES ($1, now() + make_interval(secs => $2), $3)
         ON CONFLICT (name) DO UPDATE SET lease_until = EXCLUDED.lease_until",
        &[&settings.node, &lease, &(unix_now() as i64)],
    )
    .await
    .map_err(db_error)?;
    let up = Hint::NodeUp {
        node: settings.node.clone(),
    };
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &up.payload()])
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(false)
}

/// Removes the nodes whose lease ran out, with their presence rows, and
/// tells everyone; the names removed.
async fn expire(pool: &Pool) -> Result<Vec<String>, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    let gone: Vec<String> = tx
        .query(
            "DELETE FROM nodes WHERE lease_until < now() RETURNING name",
            &[],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if gone.is_empty() {
        return Ok(gone);
    }
    tx.execute("DELETE FROM presence WHERE node = ANY($1)", &[&gone])
        .await
        .map_err(db_error)?;
    let payloads: Vec<String> = gone
        .iter()
        .map(|node| Hint::NodeGone { node: node.clone() }.payload())
        .collect();
    tx.execute(
        "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload",
        &[&CHANNEL, &payloads],
    )
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(gone)
}

async fn listener(
    pool: Pool,
    settings: PgSettings,
    targets: NodeTargets,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen(&pool, &settings, &targets, &mut stop).await {
            Ok(()) => return,
            Err(e) => log::warn!("the hint listener lost the database ({e}); reconnecting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Listens until stopped (`Ok`) or until the connection fails.
async fn listen(
    pool: &Pool,
    settings: &PgSettings,
    targets: &NodeTargets,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let config = pg_config(settings)?;
    let (client, mut connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(db_error)?;
    let (hints, mut incoming) = mpsc::channel::<String>(HINT_QUEUE);
    let lost = Arc::new(AtomicBool::new(false));
    let lost_in_driver = lost.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if hints.try_send(n.payload().to_owned()).is_err() {
                        lost_in_driver.store(true, Ordering::Release);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    log::warn!("hint connection: {e}");
                    break;
                }
            }
        }
    });
    let listening = client.batch_execute(&format!("LISTEN {CHANNEL}")).await;
    if let Err(e) = listening {
        driver.abort();
        return Err(db_error(e));
    }
    log::info!("listening for hints from the other nodes");
    // Whatever was said before LISTEN is in the tables.
    resync(pool, settings, targets).await;
    let mut rescan = tokio::time::interval(settings.lease * 3);
    rescan.tick().await;
    let outcome = loop {
        tokio::select! {
            hint = incoming.recv() => match hint {
                Some(payload) => dispatch(&payload, &settings.node, targets),
                None => break Err(StoreError::Unavailable("the hint connection closed".into())),
            },
            // Connected, NOTIFY loses nothing committed: the periodic pass
            // only keeps the sessions' memory of notices small.
            _ = rescan.tick() => targets.rescan.do_send(Rescan { all: false }),
            _ = stop.changed() => break Ok(()),
        }
        if lost.swap(false, Ordering::AcqRel) {
            log::warn!("hints arrived faster than they were handled; rescanning");
            resync(pool, settings, targets).await;
        }
    };
    driver.abort();
    outcome
}

fn dispatch(payload: &str, me: &str, targets: &NodeTargets) {
    match Hint::parse(payload) {
        Some(Hint::Mail(mail)) if mail.origin != me => targets.mail.do_send(MailNotice(mail)),
        Some(Hint::Presence {
            node,
            version,
            user,
            state,
        }) if node != me => targets.presence.do_send(RemotePresence(RemoteRow {
            node,
            version,
            user,
            state,
        })),
        Some(Hint::NodeGone { node }) if node != me => targets.presence.do_send(NodeGone { node }),
        Some(Hint::UserAdded { user }) => targets.presence.do_send(UserAdded { user }),
        Some(Hint::UserRemoved { user }) => {
            targets.auth.forget(&user);
            targets.presence.do_send(UserRemoved { user });
        }
        Some(Hint::PasswordChanged { user }) => targets.auth.forget(&user),
        Some(_) => {}
        None => log::debug!("ignored a hint this build does not know: {payload:?}"),
    }
}

/// Rereads users and presence from the tables and asks the mailbox to
/// rescan; a failure is logged and repaired by the next rescan.
async fn resync(pool: &Pool, settings: &PgSettings, targets: &NodeTargets) {
    match read_snapshot(pool, &settings.node).await {
        Ok((users, snapshot)) => {
            targets.presence.do_send(UsersSnapshot { users });
            targets.presence.do_send(snapshot);
        }
        Err(e) => log::warn!("rereading presence from the database failed: {e}"),
    }
    targets.rescan.do_send(Rescan { all: true });
}

async fn read_snapshot(pool: &Pool, me: &str) -> Result<(Vec<String>, RemoteSnapshot), StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let users = client
        .query("SELECT name FROM users", &[])
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let live_nodes: HashSet<String> = client
        .query(
            "SELECT name FROM nodes WHERE lease_until > now() AND name <> $1",
            &[&me],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let live: Vec<&str> = live_nodes.iter().map(String::as_str).collect();
    let rows = client
        .query(
            "SELECT node, username, version, state, idle_since_ms FROM presence
             WHERE node = ANY($1)",
            &[&live],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| RemoteRow {
            node: row.get(0),
            user: row.get(1),
            version: row.get(2),
            state: node_state(row.get(3), row.get(4)),
        })
        .collect();
    Ok((users, RemoteSnapshot { live_nodes, rows }))
}
