//! PresenceActor: who is online, on how many sessions, and who is idle.
//! Presence is per user across all of that user's sessions; the actor turns
//! changes into `StatusChange` packets for every other user's sessions,
//! encoding each packet once and queueing the same bytes everywhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use actix::{Actor, AsyncContext, Context, Handler, MessageResult};
use bytes::Bytes;

use crate::messages::{
    CloseAll, ListOnline, Register, SessionId, SessionInfo, SetActive, SetIdle, Unregister,
    UserAdded, UserPresence, UserRemoved,
};
use crate::metrics as metrics_names;
use crate::outbound::Outbound;
use crate::proto::{Packet, Status};
use crate::store::unix_now;

struct Link {
    outbound: Outbound,
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
    sessions: HashMap<SessionId, Link>,
    /// This user's `StatusChange ONLINE` frame, encoded once: every
    /// sign-on snapshot and the user's own `ONLINE` broadcast reuse it.
    online_frame: Bytes,
}

impl OnlineUser {
    /// Idle when every session is idle; then the idle time is that of the
    /// session that went idle last.
    fn idle_secs(&self, now: Instant) -> Option<u64> {
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
            online_frame: Bytes::from(status(user, Status::Online, None).to_frame()),
        }
    }

    /// Appends this user's current status frame; only an idle user's,
    /// whose idle time moves, is encoded afresh.
    fn write_status(&self, user: &str, now: Instant, out: &mut Vec<u8>) {
        match self.idle_secs(now) {
            Some(secs) => status(user, Status::Idle, Some(secs)).write_frame(out),
            None => out.extend_from_slice(&self.online_frame),
        }
    }
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
    online: BTreeMap<String, OnlineUser>,
}

impl PresenceActor {
    pub fn new(users: impl IntoIterator<Item = String>) -> Self {
        PresenceActor {
            users: users.into_iter().collect(),
            user_list_frames: None,
            online: BTreeMap::new(),
        }
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
    fn broadcast_except(&self, except: &str, packet: &Packet) {
        self.broadcast_frame_except(except, Bytes::from(packet.to_frame()));
    }

    /// Queues an encoded frame on every session of every user but `except`.
    fn broadcast_frame_except(&self, except: &str, frame: Bytes) {
        let mut queued = 0u64;
        for (user, online) in &self.online {
            if user != except {
                for link in online.sessions.values() {
                    link.outbound.push(frame.clone());
                    queued += 1;
                }
            }
        }
        metrics::counter!(metrics_names::FANOUT_PACKETS).increment(queued);
    }

    /// Publishes how many users are online and idle.
    fn publish(&self) {
        let now = Instant::now();
        let idle = self
            .online
            .values()
            .filter(|u| u.idle_secs(now).is_some())
            .count();
        metrics::gauge!(metrics_names::USERS_ONLINE).set(self.online.len() as f64);
        metrics::gauge!(metrics_names::USERS_IDLE).set(idle as f64);
    }
}

/// Restarted by its supervisor after a contained panic. The sessions are
/// the truth about who is online, and they stay registered; what is
/// derived from them (the encoded user list) is rebuilt.
impl actix::Supervised for PresenceActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.user_list_frames = None;
        self.online.retain(|_, user| {
            user.sessions.retain(|_, link| !link.outbound.is_closed());
            !user.sessions.is_empty()
        });
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
        let now = Instant::now();
        let user_list = self.user_list_frames();
        let online = self
            .online
            .entry(msg.user.clone())
            .or_insert_with(|| OnlineUser::new(&msg.user));
        let first = online.sessions.is_empty();
        let was_idle = online.idle_secs(now).is_some();
        online.sessions.insert(
            msg.session,
            Link {
                outbound: msg.outbound.clone(),
                peer: msg.peer,
                connected_unix: unix_now(),
                idle: None,
            },
        );
        let mut snapshot = Vec::with_capacity(user_list.len() + self.online.len() * 40);
        snapshot.extend_from_slice(&user_list);
        for (user, online) in &self.online {
            online.write_status(user, now, &mut snapshot);
        }
        msg.outbound.push(Bytes::from(snapshot));
        if first {
            let frame = self.online[&msg.user].online_frame.clone();
            self.broadcast_frame_except(&msg.user, frame);
        } else if was_idle {
            self.broadcast_except(&msg.user, &status(&msg.user, Status::Back, None));
        }
    }

    fn unregister(&mut self, msg: Unregister) {
        let now = Instant::now();
        let Some(online) = self.online.get_mut(&msg.user) else {
            return;
        };
        let was_idle = online.idle_secs(now).is_some();
        if online.sessions.remove(&msg.session).is_none() {
            return;
        }
        if online.sessions.is_empty() {
            self.online.remove(&msg.user);
            self.broadcast_except(&msg.user, &status(&msg.user, Status::Offline, None));
        } else if let (false, Some(secs)) = (was_idle, online.idle_secs(now)) {
            self.broadcast_except(&msg.user, &status(&msg.user, Status::Idle, Some(secs)));
        }
    }

    fn set_idle(&mut self, msg: SetIdle) {
        #[cfg(feature = "failpoints")]
        if msg.idle_secs == crate::FAILPOINT_PRESENCE_IDLE_SECS {
            panic!("failpoint: presence actor panic injected");
        }
        let now = Instant::now();
        let Some(online) = self.online.get_mut(&msg.user) else {
            return;
        };
        let was_idle = online.idle_secs(now).is_some();
        let Some(link) = online.sessions.get_mut(&msg.session) else {
            return;
        };
        if link.idle.is_some() {
            return;
        }
        link.idle = Some((now, msg.idle_secs));
        if let (false, Some(secs)) = (was_idle, online.idle_secs(now)) {
            self.broadcast_except(&msg.user, &status(&msg.user, Status::Idle, Some(secs)));
        }
    }

    fn set_active(&mut self, msg: SetActive) {
        let now = Instant::now();
        let Some(online) = self.online.get_mut(&msg.user) else {
            return;
        };
        let was_idle = online.idle_secs(now).is_some();
        let Some(link) = online.sessions.get_mut(&msg.session) else {
            return;
        };
        if link.idle.take().is_some() && was_idle {
            self.broadcast_except(&msg.user, &status(&msg.user, Status::Back, None));
        }
    }

    fn user_added(&mut self, msg: UserAdded) {
        if self.users.insert(msg.user.clone()) {
            self.user_list_frames = None;
            self.broadcast_except("", &Packet::AddUser { username: msg.user });
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
        let list = self
            .online
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
                    sessions: online
                        .sessions
                        .values()
                        .map(|link| SessionInfo {
                            peer: link.peer.to_string(),
                            connected_unix: link.connected_unix,
                            idle: link.idle.is_some(),
                        })
                        .collect(),
                }
            })
            .collect();
        list
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
    }
}

/// Handlers with nothing to do after a panic but let the actor restart.
macro_rules! contained_handler {
    ($message:ty => $work:ident, $result:ty, $fallback:expr) => {
        impl Handler<$message> for PresenceActor {
            type Result = $result;

            fn handle(&mut self, msg: $message, ctx: &mut Context<Self>) -> $result {
                crate::contain::<Self, _>(ctx, ACTOR, || self.$work(msg), $fallback)
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
