//! PresenceActor: who is online, on how many sessions, and who is idle.
//! Presence is per user across all of that user's sessions, on this node
//! and (with the PostgreSQL backend) on every other node: the actor keeps
//! this node's sessions, and what the other nodes report of theirs, and
//! derives from both how each user is shown. Every change of that is one
//! `StatusChange` for every other user's sessions here, encoded once and
//! queued as the same bytes everywhere. Changes of this node's sessions
//! are published to the other nodes through the [`ClusterLink`].
//!
//! Under load the fan-out is gathered ([`FanOut`]): a change that follows
//! another within the fan-out window waits for the window's end, and then
//! every session gets everything of that window as one queued entry, the
//! same bytes for all. A thousand sign-ons in a second then cost each
//! session a few queue entries and writes instead of a thousand. A change
//! after a quiet window goes out at once.
//!
//! Sessions may run on several threads; presence does not queue the fan-out
//! on each itself but hands it to the [`FanOutRelay`] of each thread once,
//! which queues it on its own sessions. Presence queues directly only
//! what one session needs (its sign-on snapshot) and what must not wait
//! behind a relay (a new user's `AddUser`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler, MessageResult, WrapFuture};
use bytes::Bytes;

use crate::cluster::{ClusterLink, NodeState, PresenceUpdate};
use crate::messages::{
    CloseAll, ListOnline, NodeGone, Register, RemotePresence, RemoteSnapshot, RepublishLocal,
    SessionId, SessionInfo, SetActive, SetIdle, Unregister, UserAdded, UserPresence, UserRemoved,
    UsersSnapshot,
};
use crate::metrics as metrics_names;
use crate::outbound::Outbound;
use crate::proto::{Packet, Status};
use crate::relay::{CaughtUp, RelayHandle, Window};
use crate::store::unix_now;

struct Link {
    outbound: Outbound,
    /// The relay of the session's thread, which queues its fan-out.
    relay: usize,
    peer: SocketAddr,
    connected_unix: u64,
    /// When the session reported idle, and how long it had been idle then.
    idle: Option<(Instant, u64)>,
}

impl Link {
    fn idle_secs(&self, now: Instant) -> Option<u64> {
        self.idle
            .map(|(at, before)| before.saturating_add(now.saturating_duration_since(at).as_secs()))
    }
}

struct OnlineUser {
    /// Changed only through the methods below, which keep `active`.
    sessions: HashMap<SessionId, Link>,
    /// Sessions not idle. While there is one the user is shown online, and
    /// the sign-on snapshot, which asks this of every user, learns it
    /// without visiting the sessions.
    active: usize,
    /// This user's `StatusChange ONLINE` frame, encoded once: every
    /// sign-on snapshot and the user's own `ONLINE` broadcast reuse it.
    online_frame: Bytes,
}

impl OnlineUser {
    /// Idle when every session is idle; then the idle time is that of the
    /// session that went idle last.
    fn idle_secs(&self, now: Instant) -> Option<u64> {
        debug_assert_eq!(
            self.active,
            self.sessions.values().filter(|l| l.idle.is_none()).count(),
            "the count of active sessions is kept by every change of the sessions"
        );
        if self.active > 0 {
            return None;
        }
        let mut shortest: Option<u64> = None;
        for link in self.sessions.values() {
            let secs = link.idle_secs(now)?;
            shortest = Some(shortest.map_or(secs, |s| s.min(secs)));
        }
        shortest
    }

    fn new(user: &str) -> OnlineUser {
        OnlineUser {
            sessions: HashMap::new(),
            active: 0,
            online_frame: Bytes::from(status(user, Status::Online, None).to_frame()),
        }
    }

    /// Adds a session; the link it replaced, if any.
    fn attach(&mut self, session: SessionId, link: Link) -> Option<Link> {
        self.active += usize::from(link.idle.is_none());
        let replaced = self.sessions.insert(session, link);
        if let Some(old) = &replaced {
            self.active -= usize::from(old.idle.is_none());
        }
        replaced
    }

    fn detach(&mut self, session: SessionId) -> Option<Link> {
        let link = self.sessions.remove(&session)?;
        self.active -= usize::from(link.idle.is_none());
        Some(link)
    }

    /// Marks a session idle (since `now`, idle `secs` before that) or, with
    /// `None`, active again.
    fn set_session_idle(&mut self, session: SessionId, idle: Option<(Instant, u64)>) {
        if let Some(link) = self.sessions.get_mut(&session) {
            self.active -= usize::from(link.idle.is_none());
            link.idle = idle;
            self.active += usize::from(link.idle.is_none());
        }
    }

    /// Keeps the sessions `keep` is true of.
    fn retain_sessions(&mut self, mut keep: impl FnMut(SessionId, &Link) -> bool) {
        self.sessions.retain(|session, link| keep(*session, link));
        self.active = self.sessions.values().filter(|l| l.idle.is_none()).count();
    }

    fn session_infos(&self) -> Vec<SessionInfo> {
        self.sessions
            .values()
            .map(|link| SessionInfo {
                peer: link.peer.to_string(),
                connected_unix: link.connected_unix,
                idle: link.idle.is_some(),
                node: None,
            })
            .collect()
    }
}

/// How a user is shown to the others, across every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Offline,
    Online,
    Idle(u64),
}

impl Shown {
    /// Online wins over idle; idle shows the shortest idle time.
    fn combine(self, other: Shown) -> Shown {
        match (self, other) {
            (Shown::Online, _) | (_, Shown::Online) => Shown::Online,
            (Shown::Idle(a), Shown::Idle(b)) => Shown::Idle(a.min(b)),
            (Shown::Idle(a), Shown::Offline) | (Shown::Offline, Shown::Idle(a)) => Shown::Idle(a),
            (Shown::Offline, Shown::Offline) => Shown::Offline,
        }
    }
}

/// Unix time in milliseconds, the clock nodes share idle times in.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the other nodes report of one user: per node, the newest version
/// seen and the state it carried (`None`: not signed on there).
type RemoteUser = HashMap<String, (i64, Option<NodeState>)>;

fn remote_shown(nodes: &RemoteUser, now_ms: i64) -> Shown {
    nodes
        .values()
        .fold(Shown::Offline, |shown, (_, state)| match state {
            None => shown,
            Some(NodeState::Active) => Shown::Online,
            Some(NodeState::Idle { since_ms }) => {
                shown.combine(Shown::Idle((now_ms - since_ms).max(0) as u64 / 1000))
            }
        })
}

fn status(user: &str, status: Status, idle_secs: Option<u64>) -> Packet {
    Packet::StatusChange {
        username: user.to_owned(),
        status,
        idle_secs,
    }
}

/// Owns online and idle state, and the registered-user list shown at
/// sign-on.
pub struct PresenceActor {
    users: BTreeSet<String>,
    /// Every `AddUser` frame, encoded once and reused until the list changes.
    user_list_frames: Option<Bytes>,
    /// This node's signed-on users.
    online: BTreeMap<String, OnlineUser>,
    /// Users signed on at other nodes, as those nodes report them.
    remote: BTreeMap<String, RemoteUser>,
    /// Where this node's changes go for the other nodes (none on sled).
    cluster: Option<ClusterLink>,
    /// Status frames gathered for every session under load.
    fan_out: FanOut,
    /// The relays of the threads that run sessions, by their number.
    relays: BTreeMap<usize, RelayHandle>,
}

/// The longest a fan-out window grows to with the sessions online.
const MAX_FAN_OUT_WINDOW: Duration = Duration::from_secs(1);

/// The most bytes one window gathers: past them it is sent at once, so
/// that a window stays small whatever the rate of changes (and so do the
/// copies made for the sessions of the users it is about).
const FAN_OUT_MAX_BYTES: usize = 64 * 1024;

/// The fan-out of one window: frames for every session but their
/// subject's, written to all at the window's end.
#[derive(Default)]
struct FanOut {
    /// Gather for at least this long after a fan-out; zero sends each at
    /// once.
    window: Duration,
    /// And for this long per session online: each fan-out costs a write
    /// to every session, so with many sessions fan-outs come less often,
    /// and the network threads' share of them stays bounded (up to
    /// [`MAX_FAN_OUT_WINDOW`]).
    per_session: Duration,
    /// Sessions online, all users together.
    sessions: usize,
    /// When the last fan-out went out.
    last_sent: Option<Instant>,
    /// Whether a send at the window's end is scheduled.
    scheduled: bool,
    /// The frames of this window, back to back.
    bytes: Vec<u8>,
    /// Where each frame starts in `bytes`, and whose sessions skip it.
    frames: Vec<(usize, String)>,
    /// Sessions that signed on during this window, and how much of
    /// `bytes` their sign-on snapshot already covers.
    joined: HashMap<SessionId, usize>,
}

impl FanOut {
    /// How long a window gathers with the sessions online now.
    fn window(&self) -> Duration {
        if self.window.is_zero() {
            return Duration::ZERO;
        }
        let grown = self
            .per_session
            .saturating_mul(u32::try_from(self.sessions).unwrap_or(u32::MAX));
        self.window.max(grown.min(MAX_FAN_OUT_WINDOW))
    }

    /// True if a frame now should wait for the window's end.
    fn gathering(&self, now: Instant) -> bool {
        !self.frames.is_empty()
            || self
                .last_sent
                .is_some_and(|sent| now.saturating_duration_since(sent) < self.window())
    }
}

impl PresenceActor {
    pub fn new(users: impl IntoIterator<Item = String>) -> Self {
        PresenceActor {
            users: users.into_iter().collect(),
            user_list_frames: None,
            online: BTreeMap::new(),
            remote: BTreeMap::new(),
            cluster: None,
            fan_out: FanOut::default(),
            relays: BTreeMap::new(),
        }
    }

    /// Gathers the fan-out of changes that follow each other within
    /// `window` (zero: every change is queued to every session at once).
    pub fn with_fan_out_window(mut self, window: Duration) -> Self {
        self.fan_out.window = window;
        self
    }

    /// Grows the fan-out window by `per_session` for each session online
    /// (up to a second); zero keeps it at the window given.
    pub fn with_fan_out_per_session(mut self, per_session: Duration) -> Self {
        self.fan_out.per_session = per_session;
        self
    }

    /// A presence that publishes this node's changes through `link`.
    pub fn clustered(users: impl IntoIterator<Item = String>, link: ClusterLink) -> Self {
        PresenceActor {
            cluster: Some(link),
            ..PresenceActor::new(users)
        }
    }

    fn local_shown(&self, user: &str, now: Instant) -> Shown {
        match self.online.get(user) {
            None => Shown::Offline,
            Some(online) => online.idle_secs(now).map_or(Shown::Online, Shown::Idle),
        }
    }

    fn shown(&self, user: &str, now: Instant) -> Shown {
        let local = self.local_shown(user, now);
        match self.remote.get(user) {
            Some(nodes) if local != Shown::Online => local.combine(remote_shown(nodes, unix_ms())),
            _ => local,
        }
    }

    /// Tells every other user's sessions how `user`'s presence changed.
    fn announce(&mut self, user: &str, before: Shown, after: Shown) {
        match (before, after) {
            (Shown::Offline, Shown::Offline) => {}
            (Shown::Offline, Shown::Online) => {
                let frame = match self.online.get(user) {
                    Some(online) => online.online_frame.clone(),
                    None => Bytes::from(status(user, Status::Online, None).to_frame()),
                };
                self.broadcast_frame_except(user, frame);
            }
            (Shown::Offline, Shown::Idle(secs)) => {
                let mut frames = status(user, Status::Online, None).to_frame();
                status(user, Status::Idle, Some(secs)).write_frame(&mut frames);
                self.broadcast_frame_except(user, Bytes::from(frames));
            }
            (_, Shown::Offline) => {
                self.broadcast_except(user, &status(user, Status::Offline, None));
            }
            (Shown::Online, Shown::Idle(secs)) => {
                self.broadcast_except(user, &status(user, Status::Idle, Some(secs)));
            }
            (Shown::Idle(_), Shown::Online) => {
                self.broadcast_except(user, &status(user, Status::Back, None));
            }
            (Shown::Online, Shown::Online) | (Shown::Idle(_), Shown::Idle(_)) => {}
        }
    }

    /// Hands this node's view of `user` to the other nodes.
    fn publish_local(&self, user: &str, now: Instant) {
        let Some(link) = &self.cluster else {
            return;
        };
        let (state, sessions) = match self.online.get(user) {
            None => (None, Vec::new()),
            Some(online) => {
                let state = match online.idle_secs(now) {
                    None => NodeState::Active,
                    Some(secs) => NodeState::Idle {
                        since_ms: unix_ms() - (secs as i64).saturating_mul(1000),
                    },
                };
                (Some(state), online.session_infos())
            }
        };
        link.publish(PresenceUpdate {
            user: user.to_owned(),
            state,
            sessions,
        });
    }

    /// Runs a change of `user`'s presence, then announces and publishes
    /// what it changed.
    fn change(&mut self, user: &str, local: bool, work: impl FnOnce(&mut Self, Instant)) {
        let now = Instant::now();
        let before = self.shown(user, now);
        work(self, now);
        let after = self.shown(user, now);
        self.announce(user, before, after);
        if local {
            self.publish_local(user, now);
        }
    }

    /// Applies one node's report of one user, unless an as new one was
    /// applied already.
    fn apply_remote(&mut self, node: &str, version: i64, user: &str, state: Option<NodeState>) {
        let known = self
            .remote
            .get(user)
            .and_then(|nodes| nodes.get(node))
            .map(|(v, _)| *v);
        if known.is_some_and(|v| v >= version) {
            return;
        }
        self.change(user, false, |actor, _| {
            actor
                .remote
                .entry(user.to_owned())
                .or_default()
                .insert(node.to_owned(), (version, state));
        });
    }

    /// Forgets everything a node reported.
    fn forget_node(&mut self, node: &str) {
        let users: Vec<String> = self
            .remote
            .iter()
            .filter(|(_, nodes)| nodes.contains_key(node))
            .map(|(user, _)| user.clone())
            .collect();
        for user in users {
            self.change(&user, false, |actor, _| {
                if let Some(nodes) = actor.remote.get_mut(&user) {
                    nodes.remove(node);
                    if nodes.is_empty() {
                        actor.remote.remove(&user);
                    }
                }
            });
        }
    }

    /// Every user shown online or idle, in name order, with how and the
    /// user's entry on this node if there is one: one pass over both sorted
    /// maps (this runs at every sign-on, so nothing is looked up again).
    fn shown_users(&self, now: Instant) -> Vec<(&str, Shown, Option<&OnlineUser>)> {
        use std::cmp::Ordering;
        let now_ms = unix_ms();
        let mut local = self.online.iter().peekable();
        let mut remote = self.remote.iter().peekable();
        let mut shown = Vec::with_capacity(self.online.len() + self.remote.len());
        loop {
            let order = match (local.peek(), remote.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((here, _)), Some((there, _))) => here.cmp(there),
            };
            let next = match order {
                Ordering::Less => local.next().map(|(u, o)| (u, Some(o), None)),
                Ordering::Greater => remote.next().map(|(u, r)| (u, None, Some(r))),
                Ordering::Equal => local
                    .next()
                    .zip(remote.next())
                    .map(|((u, o), (_, r))| (u, Some(o), Some(r))),
            };
            let Some((user, here, there)) = next else {
                break;
            };
            let mut how = here.map_or(Shown::Offline, |online| {
                online.idle_secs(now).map_or(Shown::Online, Shown::Idle)
            });
            if let (false, Some(nodes)) = (how == Shown::Online, there) {
                how = how.combine(remote_shown(nodes, now_ms));
            }
            if how != Shown::Offline {
                shown.push((user.as_str(), how, here));
            }
        }
        shown
    }

    fn user_list_frames(&mut self) -> Bytes {
        let users = &self.users;
        self.user_list_frames
            .get_or_insert_with(|| {
                let mut frames = Vec::with_capacity(users.len() * 32);
                for user in users {
                    Packet::AddUser {
                        username: user.clone(),
                    }
                    .write_frame(&mut frames);
                }
                Bytes::from(frames)
            })
            .clone()
    }

    /// Queues `packet` on every session of every user but `except`.
    fn broadcast_except(&mut self, except: &str, packet: &Packet) {
        self.broadcast_frame_except(except, Bytes::from(packet.to_frame()));
    }

    /// Queues an encoded frame on every session of every user but
    /// `except`: now, or at the end of the fan-out window when another
    /// fan-out went out within it.
    fn broadcast_frame_except(&mut self, except: &str, frame: Bytes) {
        let now = Instant::now();
        if self.fan_out.window().is_zero() || !self.fan_out.gathering(now) {
            self.fan_out.last_sent = Some(now);
            self.relay_everywhere_except(except, frame);
            return;
        }
        let fan_out = &mut self.fan_out;
        fan_out
            .frames
            .push((fan_out.bytes.len(), except.to_owned()));
        fan_out.bytes.extend_from_slice(&frame);
        if fan_out.bytes.len() >= FAN_OUT_MAX_BYTES {
            self.send_fan_out();
        }
    }

    /// Schedules the send of a gathering window, if one is needed; and
    /// while a relay is more than [`crate::relay::MAX_PENDING`] sends
    /// behind, handles nothing more until it has caught up.
    fn schedule_fan_out(&mut self, ctx: &mut Context<Self>) {
        // A relay whose thread stopped (shutdown) takes nothing more.
        self.relays.retain(|_, relay| relay.connected());
        for relay in self.relays.values().filter(|relay| relay.behind()) {
            let caught_up = relay.addr.send(CaughtUp);
            ctx.wait(
                async move {
                    let _ = caught_up.await;
                }
                .into_actor(self),
            );
        }
        if self.fan_out.frames.is_empty() || self.fan_out.scheduled {
            return;
        }
        self.fan_out.scheduled = true;
        let due = self.fan_out.last_sent.map_or(Duration::ZERO, |sent| {
            (sent + self.fan_out.window()).saturating_duration_since(Instant::now())
        });
        ctx.run_later(due, |actor, _| {
            actor.fan_out.scheduled = false;
            actor.send_fan_out();
        });
    }

    /// Hands what the window gathered to every relay, which queue it on
    /// their sessions (see [`Window::part_for`]).
    fn send_fan_out(&mut self) {
        if self.fan_out.frames.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.fan_out.bytes);
        let frames = std::mem::take(&mut self.fan_out.frames);
        let joined = std::mem::take(&mut self.fan_out.joined);
        self.fan_out.last_sent = Some(Instant::now());
        let window = std::sync::Arc::new(Window::new(Bytes::from(bytes), frames, joined));
        for relay in self.relays.values() {
            relay.broadcast(window.clone());
        }
    }

    /// Has every relay queue an encoded frame now on every session of
    /// every user but `except`.
    fn relay_everywhere_except(&self, except: &str, frame: Bytes) {
        for relay in self.relays.values() {
            relay.everywhere(except, frame.clone());
        }
    }

    /// Publishes how many users are online and idle, and on how many
    /// threads sessions run.
    fn publish(&self) {
        let now = Instant::now();
        let idle = self
            .online
            .values()
            .filter(|u| u.idle_secs(now).is_some())
            .count();
        metrics::gauge!(metrics_names::USERS_ONLINE).set(self.online.len() as f64);
        metrics::gauge!(metrics_names::USERS_IDLE).set(idle as f64);
        metrics::gauge!(metrics_names::SESSION_THREADS).set(self.relays.len() as f64);
    }
}

/// Tells the relay of `link` that `session` is gone.
fn detach(relays: &BTreeMap<usize, RelayHandle>, session: SessionId, link: &Link) {
    if let Some(relay) = relays.get(&link.relay) {
        relay.detach(session);
    }
}

/// Restarted by its supervisor after a contained panic. The sessions are
/// the truth about who is online, and they stay registered; what is
/// derived from them (the encoded user list) is rebuilt.
impl actix::Supervised for PresenceActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.user_list_frames = None;
        // The timer of a gathering window does not survive the restart.
        self.fan_out.scheduled = false;
        self.send_fan_out();
        let relays = &self.relays;
        self.online.retain(|_, user| {
            user.retain_sessions(|session, link| {
                let open = !link.outbound.is_closed();
                if !open {
                    detach(relays, session, link);
                }
                open
            });
            !user.sessions.is_empty()
        });
        self.fan_out.sessions = self.online.values().map(|u| u.sessions.len()).sum();
    }
}

impl Actor for PresenceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Counting idle users walks every online user: once a second, not
        // per event.
        ctx.run_interval(std::time::Duration::from_secs(1), |actor, _| {
            actor.publish()
        });
    }
}

/// The work of each handler. A handler runs it through [`crate::contain`],
/// so that a panic stops the actor for its supervisor to restart it.
impl PresenceActor {
    fn register(&mut self, msg: Register) {
        #[cfg(feature = "failpoints")]
        if msg.user == crate::FAILPOINT_REGISTER_USER {
            panic!("failpoint: presence actor panic injected in a sign-on");
        }
        let user = msg.user.clone();
        let outbound = msg.outbound.clone();
        // A user who signed on is registered, even if the news has not
        // reached presence yet (an admin's `UserAdded` still queued, or
        // another node's hint on its way): list and announce them now.
        if !self.users.contains(&user) {
            self.user_added(UserAdded { user: user.clone() });
        }
        self.change(&user, true, |actor, now| {
            let replaced = actor
                .online
                .entry(msg.user.clone())
                .or_insert_with(|| OnlineUser::new(&msg.user))
                .attach(
                    msg.session,
                    Link {
                        outbound: msg.outbound,
                        relay: msg.relay.id,
                        peer: msg.peer,
                        connected_unix: unix_now(),
                        idle: None,
                    },
                );
            if replaced.is_none() {
                actor.fan_out.sessions += 1;
            }
            actor.queue_snapshot(&outbound, now);
            // The snapshot covers what this window gathered so far.
            if !actor.fan_out.bytes.is_empty() {
                let covered = actor.fan_out.bytes.len();
                actor.fan_out.joined.insert(msg.session, covered);
            }
            // After the snapshot, in the relay's mailbox before any window
            // the session is to get.
            msg.relay.attach(msg.session, msg.user.clone(), outbound);
            actor.relays.insert(msg.relay.id, msg.relay);
        });
    }

    /// Queues the sign-on snapshot: every `AddUser`, then the status of
    /// every user shown online or idle. The user list is queued as the one
    /// encoding every session shares, not copied: when thousands sign on
    /// at once, each holds only its statuses until they are written.
    fn queue_snapshot(&mut self, outbound: &Outbound, now: Instant) {
        outbound.push(self.user_list_frames());
        let shown = self.shown_users(now);
        let mut snapshot = Vec::with_capacity(shown.len() * 40);
        for (user, how, here) in shown {
            match (how, here) {
                (Shown::Online, Some(online)) => snapshot.extend_from_slice(&online.online_frame),
                (Shown::Online, None) => {
                    status(user, Status::Online, None).write_frame(&mut snapshot)
                }
                (Shown::Idle(secs), _) => {
                    status(user, Status::Idle, Some(secs)).write_frame(&mut snapshot)
                }
                (Shown::Offline, _) => {}
            }
        }
        outbound.push(Bytes::from(snapshot));
    }

    fn unregister(&mut self, msg: Unregister) {
        let Some(online) = self.online.get(&msg.user) else {
            return;
        };
        if !online.sessions.contains_key(&msg.session) {
            return;
        }
        self.change(&msg.user, true, |actor, _| {
            if let Some(online) = actor.online.get_mut(&msg.user) {
                if let Some(link) = online.detach(msg.session) {
                    actor.fan_out.sessions = actor.fan_out.sessions.saturating_sub(1);
                    detach(&actor.relays, msg.session, &link);
                }
                if online.sessions.is_empty() {
                    actor.online.remove(&msg.user);
                }
            }
        });
    }

    fn set_idle(&mut self, msg: SetIdle) {
        #[cfg(feature = "failpoints")]
        if msg.idle_secs == crate::FAILPOINT_PRESENCE_IDLE_SECS {
            panic!("failpoint: presence actor panic injected");
        }
        let already_idle = self
            .online
            .get(&msg.user)
            .and_then(|online| online.sessions.get(&msg.session))
            .is_none_or(|link| link.idle.is_some());
        if already_idle {
            return;
        }
        self.change(&msg.user, true, |actor, now| {
            if let Some(online) = actor.online.get_mut(&msg.user) {
                online.set_session_idle(msg.session, Some((now, msg.idle_secs)));
            }
        });
    }

    fn set_active(&mut self, msg: SetActive) {
        let idle = self
            .online
            .get(&msg.user)
            .and_then(|online| online.sessions.get(&msg.session))
            .is_some_and(|link| link.idle.is_some());
        if !idle {
            return;
        }
        self.change(&msg.user, true, |actor, _| {
            if let Some(online) = actor.online.get_mut(&msg.user) {
                online.set_session_idle(msg.session, None);
            }
        });
    }

    fn user_added(&mut self, msg: UserAdded) {
        if self.users.insert(msg.user.clone()) {
            self.user_list_frames = None;
            // A new user is never held back: whatever follows (its
            // presence, a message from it) must find it listed. It is
            // queued here, ahead of the window the relays will queue (which
            // holds no change of the new user), and not through the relays,
            // since a message from the new user, whose notice the mailbox
            // queues directly, must not overtake it.
            let frame = Bytes::from(Packet::AddUser { username: msg.user }.to_frame());
            let mut queued = 0u64;
            for link in self
                .online
                .values()
                .flat_map(|online| online.sessions.values())
            {
                queued += u64::from(link.outbound.push(frame.clone()));
            }
            metrics::counter!(metrics_names::FANOUT_PACKETS).increment(queued);
        }
    }

    fn user_removed(&mut self, msg: UserRemoved) {
        if self.users.remove(&msg.user) {
            self.user_list_frames = None;
        }
        if let Some(online) = self.online.get(&msg.user) {
            for link in online.sessions.values() {
                link.outbound.close();
            }
        }
    }

    /// The user list as the database has it, to repair missed hints:
    /// users not known here are announced. Removals are left to their
    /// hints, since a snapshot read a moment ago may predate a new user.
    fn users_snapshot(&mut self, msg: UsersSnapshot) {
        for user in msg.users {
            if !self.users.contains(&user) {
                self.user_added(UserAdded { user });
            }
        }
    }

    fn remote_presence(&mut self, RemotePresence(row): RemotePresence) {
        self.apply_remote(&row.node, row.version, &row.user, row.state);
    }

    fn node_gone(&mut self, msg: NodeGone) {
        self.forget_node(&msg.node);
    }

    /// Repairs the view of the other nodes from the database: newer
    /// reports are applied, nodes no longer alive are forgotten.
    fn remote_snapshot(&mut self, msg: RemoteSnapshot) {
        let dead: BTreeSet<String> = self
            .remote
            .values()
            .flat_map(|nodes| nodes.keys())
            .filter(|node| !msg.live_nodes.contains(*node))
            .cloned()
            .collect();
        for node in dead {
            self.forget_node(&node);
        }
        for row in msg.rows {
            self.apply_remote(&row.node, row.version, &row.user, row.state);
        }
    }

    /// Publishes every local user again (this node's lease had run out,
    /// so the others forgot it).
    fn republish_local(&mut self, _: RepublishLocal) {
        let now = Instant::now();
        for user in self.online.keys() {
            self.publish_local(user, now);
        }
    }

    fn close_all(&mut self, _: CloseAll) -> usize {
        let mut closed = 0;
        for online in self.online.values() {
            for link in online.sessions.values() {
                link.outbound.close();
                closed += 1;
            }
        }
        closed
    }

    fn list_online(&self) -> Vec<UserPresence> {
        let now = Instant::now();
        self.online
            .iter()
            .map(|(user, online)| {
                let idle_secs = online.idle_secs(now);
                UserPresence {
                    user: user.clone(),
                    status: if idle_secs.is_some() {
                        Status::Idle
                    } else {
                        Status::Online
                    },
                    idle_secs,
                    sessions: online.session_infos(),
                }
            })
            .collect()
    }
}

const ACTOR: &str = "the presence actor";

impl Handler<Register> for PresenceActor {
    type Result = ();

    /// A sign-on that fails here is closed rather than left without its
    /// snapshot.
    fn handle(&mut self, msg: Register, ctx: &mut Context<Self>) {
        let outbound = msg.outbound.clone();
        crate::contain::<Self, _>(ctx, ACTOR, || self.register(msg), || outbound.close());
        self.schedule_fan_out(ctx);
    }
}

/// Handlers with nothing to do after a panic but let the actor restart.
macro_rules! contained_handler {
    ($message:ty => $work:ident, $result:ty, $fallback:expr) => {
        impl Handler<$message> for PresenceActor {
            type Result = $result;

            fn handle(&mut self, msg: $message, ctx: &mut Context<Self>) -> $result {
                let result = crate::contain::<Self, _>(ctx, ACTOR, || self.$work(msg), $fallback);
                self.schedule_fan_out(ctx);
                result
            }
        }
    };
}

contained_handler!(Unregister => unregister, (), || ());
contained_handler!(SetIdle => set_idle, (), || ());
contained_handler!(SetActive => set_active, (), || ());
contained_handler!(UserAdded => user_added, (), || ());
contained_handler!(UserRemoved => user_removed, (), || ());
contained_handler!(CloseAll => close_all, usize, || 0);
contained_handler!(UsersSnapshot => users_snapshot, (), || ());
contained_handler!(RemotePresence => remote_presence, (), || ());
contained_handler!(NodeGone => node_gone, (), || ());
contained_handler!(RemoteSnapshot => remote_snapshot, (), || ());
contained_handler!(RepublishLocal => republish_local, (), || ());

impl Handler<ListOnline> for PresenceActor {
    type Result = MessageResult<ListOnline>;

    fn handle(&mut self, _: ListOnline, ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(crate::contain::<Self, _>(
            ctx,
            ACTOR,
            || self.list_online(),
            Vec::new,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound;
    use crate::proto::frame::read_frame;
    use crate::proto::packet::Decoded;
    use actix::Actor;
    use std::time::Duration;

    /// An outbound queue whose frames the test reads back as packets.
    fn session() -> (Outbound, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(1 << 16);
        let (out, writer) = outbound::channel(server, 64, Duration::from_secs(5), 1 << 16);
        actix::spawn(async move {
            writer.await;
        });
        (out, client)
    }

    async fn packets(client: &mut tokio::io::DuplexStream, count: usize) -> Vec<Packet> {
        let mut seen = Vec::new();
        while seen.len() < count {
            let read = read_frame(client, 1 << 16, Duration::from_secs(5));
            let Ok(frame) = tokio::time::timeout(Duration::from_secs(5), read).await else {
                panic!("{} packets came, {count} expected: {seen:?}", seen.len());
            };
            let frame = frame.unwrap().unwrap();
            if let Ok(Decoded::Known(packet)) = Packet::decode(&frame) {
                seen.push(packet);
            }
        }
        seen
    }

    #[actix_rt::test]
    async fn a_user_signing_on_before_being_announced_is_listed_and_announced() {
        let presence = PresenceActor::new(["alice".to_string()]).start();
        let peer = "127.0.0.1:1".parse().unwrap();
        let (alice, mut alice_read) = session();
        presence
            .send(Register {
                user: "alice".into(),
                session: 1,
                outbound: alice,
                peer,
                relay: crate::relay::this_thread(),
            })
            .await
            .unwrap();
        packets(&mut alice_read, 2).await;
        // bob's UserAdded has not arrived: his sign-on still lists him.
        let (bob, mut bob_read) = session();
        presence
            .send(Register {
                user: "bob".into(),
                session: 2,
                outbound: bob,
                peer,
                relay: crate::relay::this_thread(),
            })
            .await
            .unwrap();
        let snapshot = packets(&mut bob_read, 4).await;
        let added: Vec<&Packet> = snapshot
            .iter()
            .filter(|p| matches!(p, Packet::AddUser { .. }))
            .collect();
        assert_eq!(
            added,
            [
                &Packet::AddUser {
                    username: "alice".into()
                },
                &Packet::AddUser {
                    username: "bob".into()
                }
            ]
        );
        assert_eq!(
            packets(&mut alice_read, 2).await,
            [
                Packet::AddUser {
                    username: "bob".into()
                },
                status("bob", Status::Online, None)
            ]
        );
        // The late UserAdded changes nothing.
        presence
            .send(UserAdded { user: "bob".into() })
            .await
            .unwrap();
        presence
            .send(SetIdle {
                user: "alice".into(),
                session: 1,
                idle_secs: 3,
            })
            .await
            .unwrap();
        let next = packets(&mut bob_read, 1).await;
        assert!(
            matches!(&next[0], Packet::StatusChange { username, status: Status::Idle, .. } if username == "alice"),
            "{next:?}"
        );
    }

    /// Nothing more arrives within `wait`.
    async fn silent(client: &mut tokio::io::DuplexStream, wait: Duration) -> bool {
        let read = read_frame(client, 1 << 16, Duration::from_secs(5));
        tokio::time::timeout(wait, read).await.is_err()
    }

    async fn register(
        presence: &actix::Addr<PresenceActor>,
        user: &str,
        id: SessionId,
    ) -> tokio::io::DuplexStream {
        register_with(presence, user, id, crate::relay::this_thread()).await
    }

    /// Signs a session on whose fan-out goes through `relay`.
    async fn register_with(
        presence: &actix::Addr<PresenceActor>,
        user: &str,
        id: SessionId,
        relay: crate::relay::RelayHandle,
    ) -> tokio::io::DuplexStream {
        let (outbound, read) = session();
        presence
            .send(Register {
                user: user.into(),
                session: id,
                outbound,
                peer: "127.0.0.1:1".parse().unwrap(),
                relay,
            })
            .await
            .unwrap();
        read
    }

    fn online(user: &str) -> Packet {
        status(user, Status::Online, None)
    }

    #[actix_rt::test]
    async fn the_fan_out_window_grows_with_the_sessions_online_up_to_a_second() {
        let users = ["alice", "bob", "carol"].map(String::from);
        // 1 ms alone, but 2 s per session: 6 s with three, held to 1 s.
        let presence = PresenceActor::new(users)
            .with_fan_out_window(Duration::from_millis(1))
            .with_fan_out_per_session(Duration::from_secs(2))
            .start();
        let mut alice = register(&presence, "alice", 1).await;
        assert_eq!(packets(&mut alice, 4).await[3], online("alice"));
        let started = std::time::Instant::now();
        let _bob = register(&presence, "bob", 2).await;
        let _carol = register(&presence, "carol", 3).await;
        // Held well past the 1 ms the window has with no session online.
        assert!(
            silent(&mut alice, Duration::from_millis(400)).await,
            "the window did not grow with the sessions online"
        );
        assert_eq!(
            packets(&mut alice, 2).await,
            [online("bob"), online("carol")]
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the window grew past a second: {:?}",
            started.elapsed()
        );
    }

    #[actix_rt::test]
    async fn changes_within_the_fan_out_window_go_out_together_once_each() {
        let users = ["alice", "bob", "carol", "dave"].map(String::from);
        let presence = PresenceActor::new(users)
            .with_fan_out_window(Duration::from_secs(1))
            .start();
        // After a quiet window, a change goes out at once.
        let mut alice = register(&presence, "alice", 1).await;
        assert_eq!(packets(&mut alice, 5).await[4], online("alice"));
        // Within the window: gathered.
        let mut bob = register(&presence, "bob", 2).await;
        let mut carol = register(&presence, "carol", 3).await;
        presence
            .send(SetIdle {
                user: "alice".into(),
                session: 1,
                idle_secs: 7,
            })
            .await
            .unwrap();
        assert!(
            silent(&mut alice, Duration::from_millis(300)).await,
            "bob's sign-on went out before the window ended"
        );
        // Snapshots are immediate and cover what was gathered before them.
        assert_eq!(
            packets(&mut bob, 6).await[4..],
            [online("alice"), online("bob")]
        );
        assert_eq!(
            packets(&mut carol, 7).await[4..],
            [online("alice"), online("bob"), online("carol")]
        );
        // At the window's end each session gets what it lacks, once: not
        // what its snapshot showed, not its own user's changes.
        let alice_idle = status("alice", Status::Idle, Some(7));
        assert_eq!(
            packets(&mut alice, 2).await,
            [online("bob"), online("carol")]
        );
        assert_eq!(
            packets(&mut bob, 2).await,
            [online("carol"), alice_idle.clone()]
        );
        assert_eq!(packets(&mut carol, 1).await, [alice_idle]);
        for read in [&mut alice, &mut bob, &mut carol] {
            assert!(
                silent(read, Duration::from_millis(200)).await,
                "a frame twice"
            );
        }

        // A new user is never held back: its AddUser is queued at once,
        // ahead of what the window still holds.
        let mut dave = register(&presence, "dave", 4).await;
        packets(&mut dave, 8).await;
        presence
            .send(UserAdded {
                user: "erin".into(),
            })
            .await
            .unwrap();
        let erin = Packet::AddUser {
            username: "erin".into(),
        };
        let quickly = tokio::time::timeout(Duration::from_millis(500), packets(&mut carol, 1));
        assert_eq!(quickly.await.expect("held back"), [erin.clone()]);
        assert_eq!(packets(&mut carol, 1).await, [online("dave")]);
        assert_eq!(packets(&mut dave, 1).await, [erin]);
        assert!(silent(&mut dave, Duration::from_millis(1200)).await);
    }

    /// A relay whose thread is stuck holds presence back once it is
    /// `MAX_PENDING` sends behind, instead of letting its mailbox grow; and
    /// once it runs again its sessions get every change.
    #[actix_rt::test]
    async fn presence_waits_for_a_relay_that_falls_behind() {
        use crate::relay::{RelayHandle, MAX_PENDING};
        let stuck = actix::Arbiter::new();
        let (tx, rx) = std::sync::mpsc::channel::<RelayHandle>();
        stuck.spawn_fn(move || {
            let _ = tx.send(crate::relay::this_thread());
        });
        let relay = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let users = ["alice", "bob"].map(String::from);
        let presence = PresenceActor::new(users).start();
        let mut alice = register_with(&presence, "alice", 1, relay.clone()).await;
        packets(&mut alice, 3).await;
        let _bob = register(&presence, "bob", 2).await;
        stuck.spawn_fn(|| std::thread::sleep(Duration::from_millis(1500)));
        // Every change goes out at once (no window): one send to the relay each.
        let changes = MAX_PENDING + 8;
        let flood = presence.clone();
        let flooding = actix::spawn(async move {
            for n in 0..changes {
                let _ = if n % 2 == 0 {
                    flood
                        .send(SetIdle {
                            user: "bob".into(),
                            session: 2,
                            idle_secs: 1,
                        })
                        .await
                } else {
                    flood
                        .send(SetActive {
                            user: "bob".into(),
                            session: 2,
                        })
                        .await
                };
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pending = relay.pending();
        assert!(
            pending <= MAX_PENDING + 1,
            "{pending} sends wait for the stuck relay"
        );
        flooding.await.unwrap();
        // bob's ONLINE (sent before the relay was stuck), then every change.
        assert_eq!(packets(&mut alice, 1 + changes).await.len(), 1 + changes);
        stuck.stop();
    }

    #[actix_rt::test]
    async fn a_window_that_gathers_its_limit_goes_out_before_its_end() {
        let users = ["alice", "bob"].map(String::from);
        let presence = PresenceActor::new(users)
            .with_fan_out_window(Duration::from_secs(60))
            .start();
        let mut alice = register(&presence, "alice", 1).await;
        packets(&mut alice, 3).await;
        // Every change from here on is within the minute-long window.
        let mut bob = register(&presence, "bob", 2).await;
        packets(&mut bob, 4).await;
        let idle = status("alice", Status::Idle, Some(1)).to_frame().len();
        let back = status("alice", Status::Back, None).to_frame().len();
        let toggles = 2 * FAN_OUT_MAX_BYTES / idle.min(back);
        for n in 0..toggles {
            if n % 2 == 0 {
                let idle = SetIdle {
                    user: "alice".into(),
                    session: 1,
                    idle_secs: 1,
                };
                presence.send(idle).await.unwrap();
            } else {
                let active = SetActive {
                    user: "alice".into(),
                    session: 1,
                };
                presence.send(active).await.unwrap();
            }
        }
        // Twice the limit was gathered: at least one full window arrives
        // now, not in a minute.
        let arrived = packets(&mut bob, FAN_OUT_MAX_BYTES / idle.max(back)).await;
        assert!(matches!(
            &arrived[0],
            Packet::StatusChange { username, status: Status::Idle, .. } if username == "alice"
        ));
    }
}
