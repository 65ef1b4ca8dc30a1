//! FanOutRelay: one actor per thread that runs sessions, which queues
//! presence's fan-out on the sessions of its thread.
//!
//! Sessions may run on several network threads
//! (`limits.sessions_on_network_threads`), presence on one. Were presence
//! to queue a window's frames on every session itself, each queue would
//! wake its writer across threads: a lock and a futex per session, every
//! window. Instead presence sends each relay the window once, and the
//! relay queues it on its own sessions, where waking a writer costs
//! neither. Presence tells a relay of its sessions (`Attach`, `Detach`) in
//! the same mailbox as the windows, so a relay knows a session from the
//! first window after its sign-on snapshot, and never before it.
//!
//! A relay's mailbox is bounded by presence: past [`MAX_PENDING`] sends
//! (windows, status changes, attaches and detaches) not yet handled by a
//! relay, presence waits for that relay to catch up before it handles
//! anything more, and the sessions that feed it wait in turn.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::{Actor, Addr, Context, Handler, Message};
use bytes::Bytes;

use crate::messages::SessionId;
use crate::metrics as metrics_names;
use crate::outbound::Outbound;

/// Most sends to a relay not yet handled by it (a window is at most 64 KiB)
/// before presence waits for it.
pub const MAX_PENDING: usize = 32;

/// A relay's address, with the number that tells relays apart and the
/// count of what was sent to it and not yet queued.
#[derive(Clone)]
pub struct RelayHandle {
    pub id: usize,
    pub addr: Addr<FanOutRelay>,
    pending: Arc<AtomicUsize>,
}

impl RelayHandle {
    /// Sends the relay a window to queue on its sessions.
    pub fn broadcast(&self, window: Arc<Window>) {
        self.send(Broadcast(window));
    }

    /// Sends the relay a frame to queue on every session but `except`'s.
    pub fn everywhere(&self, except: &str, frame: Bytes) {
        self.send(Everywhere {
            except: except.to_owned(),
            frame,
        });
    }

    /// Tells the relay of a session that signed on: its snapshot is
    /// queued, windows after it are its.
    pub fn attach(&self, session: SessionId, user: String, outbound: Outbound) {
        self.send(Attach {
            session,
            user,
            outbound,
        });
    }

    /// Tells the relay a session is gone.
    pub fn detach(&self, session: SessionId) {
        self.send(Detach { session });
    }

    /// Every send is counted until the relay has handled it.
    fn send<M>(&self, message: M)
    where
        M: Message<Result = ()> + Send + 'static,
        FanOutRelay: Handler<M>,
    {
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.addr.do_send(message);
    }

    /// False once the relay's thread has stopped.
    pub fn connected(&self) -> bool {
        self.addr.connected()
    }

    /// Sends not yet handled by the relay.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// True when more than [`MAX_PENDING`] sends wait in its mailbox.
    pub fn behind(&self) -> bool {
        self.pending() > MAX_PENDING
    }
}

thread_local! {
    static THIS_THREAD: RefCell<Option<RelayHandle>> = const { RefCell::new(None) };
}

/// The relay of the calling thread, started on its arbiter the first time
/// a session there asks. Must be called from within an actix arbiter.
pub fn this_thread() -> RelayHandle {
    static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
    THIS_THREAD.with(|relay| {
        let mut relay = relay.borrow_mut();
        match relay.as_ref() {
            Some(handle) if handle.addr.connected() => handle.clone(),
            _ => {
                let pending = Arc::new(AtomicUsize::new(0));
                let actor = FanOutRelay {
                    sessions: HashMap::new(),
                    pending: pending.clone(),
                };
                let handle = RelayHandle {
                    id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                    addr: actor.start(),
                    pending,
                };
                *relay = Some(handle.clone());
                handle
            }
        }
    })
}

/// One gathered window of status frames, shared by every relay.
pub struct Window {
    /// The frames, back to back.
    bytes: Bytes,
    /// Where each frame starts in `bytes`, and whose sessions skip it.
    frames: Vec<(usize, String)>,
    /// Sessions that signed on during the window, and how much of `bytes`
    /// their sign-on snapshot already covers.
    joined: HashMap<SessionId, usize>,
    /// The users the frames are about.
    subjects: HashSet<String>,
}

impl Window {
    pub fn new(
        bytes: Bytes,
        frames: Vec<(usize, String)>,
        joined: HashMap<SessionId, usize>,
    ) -> Window {
        let subjects = frames.iter().map(|(_, subject)| subject.clone()).collect();
        Window {
            bytes,
            frames,
            joined,
            subjects,
        }
    }

    /// What `session` of `user` gets of this window, and how many frames
    /// that is: the same bytes as everyone, but for a session that signed
    /// on during the window (only what came after its snapshot) or whose
    /// user a frame is about (all but that frame).
    pub fn part_for(&self, user: &str, session: SessionId) -> Option<(Bytes, usize)> {
        let from = self.joined.get(&session).copied().unwrap_or(0);
        let first = self.frames.partition_point(|(start, _)| *start < from);
        let wanted = &self.frames[first..];
        if wanted.is_empty() {
            return None;
        }
        if !self.subjects.contains(user) {
            return Some((self.bytes.slice(from..), wanted.len()));
        }
        let mut own = Vec::with_capacity(self.bytes.len() - from);
        let mut count = 0;
        for (n, (start, subject)) in wanted.iter().enumerate() {
            let end = wanted
                .get(n + 1)
                .map_or(self.bytes.len(), |(next, _)| *next);
            if subject != user {
                own.extend_from_slice(&self.bytes[*start..end]);
                count += 1;
            }
        }
        (count > 0).then(|| (Bytes::from(own), count))
    }
}

/// The sessions of one thread, as presence registered them.
pub struct FanOutRelay {
    sessions: HashMap<SessionId, (String, Outbound)>,
    /// Shared with the handle: sends not yet handled.
    pending: Arc<AtomicUsize>,
}

impl Actor for FanOutRelay {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct Attach {
    session: SessionId,
    user: String,
    outbound: Outbound,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Detach {
    session: SessionId,
}

/// Queue a window on every session of the thread.
#[derive(Message)]
#[rtype(result = "()")]
struct Broadcast(Arc<Window>);

/// Queue one frame on every session of the thread but those of `except`.
#[derive(Message)]
#[rtype(result = "()")]
struct Everywhere {
    except: String,
    frame: Bytes,
}

/// Answered once everything sent before it is handled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CaughtUp;

impl Handler<CaughtUp> for FanOutRelay {
    type Result = ();

    fn handle(&mut self, _: CaughtUp, _: &mut Context<Self>) {}
}

impl Handler<Attach> for FanOutRelay {
    type Result = ();

    fn handle(&mut self, msg: Attach, _: &mut Context<Self>) {
        self.sessions.insert(msg.session, (msg.user, msg.outbound));
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handler<Detach> for FanOutRelay {
    type Result = ();

    fn handle(&mut self, msg: Detach, _: &mut Context<Self>) {
        self.sessions.remove(&msg.session);
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handler<Broadcast> for FanOutRelay {
    type Result = ();

    fn handle(&mut self, Broadcast(window): Broadcast, _: &mut Context<Self>) {
        let mut queued = 0u64;
        contained("a window", || {
            // A session whose queue is closed is gone, Detach or not.
            self.sessions.retain(|session, (user, outbound)| {
                if let Some((part, frames)) = window.part_for(user, *session) {
                    if outbound.push(part) {
                        queued += frames as u64;
                    }
                }
                !outbound.is_closed()
            })
        });
        self.pending.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(metrics_names::FANOUT_PACKETS).increment(queued);
    }
}

impl Handler<Everywhere> for FanOutRelay {
    type Result = ();

    fn handle(&mut self, msg: Everywhere, _: &mut Context<Self>) {
        let mut queued = 0u64;
        contained("a status change", || {
            self.sessions.retain(|_, (user, outbound)| {
                if *user != msg.except && outbound.push(msg.frame.clone()) {
                    queued += 1;
                }
                !outbound.is_closed()
            })
        });
        self.pending.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(metrics_names::FANOUT_PACKETS).increment(queued);
    }
}

/// Runs a relay's work; a panic inside it (a bug) is logged and the relay
/// goes on. Were it to stop instead, its sessions would silently get no
/// presence again; its map stays whole whatever `retain` was doing.
fn contained(what: &str, work: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
        log::error!("the fan-out relay panicked while queuing {what}; it goes on");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        // Three frames: about alice, bob, alice.
        let bytes = Bytes::from_static(b"AAAbbbCCC");
        let frames = vec![(0, "alice".into()), (3, "bob".into()), (6, "alice".into())];
        let joined = HashMap::from([(7, 3), (8, 9)]);
        Window::new(bytes, frames, joined)
    }

    #[test]
    fn a_window_skips_its_subjects_own_frames_and_what_a_snapshot_covered() {
        let window = window();
        // Session 7 signed on after the first frame, session 8 after all.
        let expected: [(&str, SessionId, Option<(&'static [u8], usize)>); 6] = [
            ("carol", 1, Some((b"AAAbbbCCC", 3))),
            ("alice", 2, Some((b"bbb", 1))),
            ("bob", 3, Some((b"AAACCC", 2))),
            ("carol", 7, Some((b"bbbCCC", 2))),
            ("carol", 8, None),
            ("bob", 7, Some((b"CCC", 1))),
        ];
        for (user, session, part) in expected {
            assert_eq!(
                window.part_for(user, session),
                part.map(|(bytes, frames)| (Bytes::from_static(bytes), frames)),
                "{user}, session {session}"
            );
        }
    }
}
