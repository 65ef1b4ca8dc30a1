//! The session stream: sign-on (a `Login` within the login timeout, checked
//! by the authenticator), then one SessionActor per signed-on session. The
//! actor reads packets as a stream, turns `Idle`/`NotIdle` into presence
//! messages, and owns the session's outbound queue, through which presence
//! and the mailbox reach the peer.

use std::net::SocketAddr;
use std::sync::Arc;

use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, StreamHandler, WrapFuture,
};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::messages::{
    next_session_id, Register, SessionId, SetActive, SetIdle, Subscribe, Unregister, Unsubscribe,
};
use crate::outbound::{self, Outbound, WriterEnd};
use crate::proto::frame::{read_frame, FrameError};
use crate::proto::packet::Decoded;
use crate::proto::Packet;
use crate::services::{LoginOutcome, Services};

/// The one answer for an unknown user and a wrong password.
pub const LOGIN_REFUSED: &str = "unknown user or wrong password";

/// Serves one session stream, from its first byte to its close.
///
/// The stream is split before the future is made: an async function keeps
/// its arguments in its future for as long as it runs, and the TLS stream
/// (over 1 KiB) would stay there beside the two halves it was split into.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    services: Arc<Services>,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    serve_halves(reader, writer, peer, services)
}

async fn serve_halves<S>(
    mut reader: ReadHalf<S>,
    mut writer: WriteHalf<S>,
    peer: SocketAddr,
    services: Arc<Services>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    // The sign-on runs in a future of its own on the heap: this future is
    // allocated at the size of its largest state and lives as long as the
    // session, and the sign-on's states (the first frame, the password
    // check) are the largest but last only until the login is answered.
    let Some(username) = Box::pin(sign_on(&mut reader, &mut writer, peer, &services)).await else {
        return;
    };
    let limits = &services.limits;
    let timeouts = &services.timeouts;
    #[cfg(feature = "failpoints")]
    let writer = outbound::SlowWriter::new(
        writer,
        if username == crate::FAILPOINT_SLOW_WRITER_USER {
            std::time::Duration::from_millis(30)
        } else {
            std::time::Duration::ZERO
        },
    );
    let (outbound, writer_task) = outbound::channel(
        writer,
        limits.session_queue,
        timeouts.write(),
        limits.write_coalesce_bytes,
    );
    let session = next_session_id();
    log::debug!("session {session}: {username} signed on from {peer}");
    let frames = frame_stream(reader, limits.frame_bytes, timeouts.frame());
    let services_for_actor = services.clone();
    let addr = SessionActor::create(move |ctx| {
        ctx.add_stream(frames);
        SessionActor {
            user: username,
            session,
            peer,
            outbound,
            services: services_for_actor,
            presence_window: (std::time::Instant::now(), 0),
        }
    });
    let end = writer_task.await;
    if end != WriterEnd::Closed {
        log::info!("session {session} from {peer}: writer stopped: {end:?}");
    }
    addr.do_send(Close);
}

/// Reads the `Login` (within the login timeout) and checks it. The user's
/// name if it was accepted; otherwise the refusal was written, the stream
/// shut down, and `None`.
async fn sign_on<S>(
    reader: &mut ReadHalf<S>,
    writer: &mut WriteHalf<S>,
    peer: SocketAddr,
    services: &Services,
) -> Option<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &services.limits;
    let timeouts = &services.timeouts;
    let first = tokio::time::timeout(
        timeouts.login(),
        read_frame(reader, limits.frame_bytes, timeouts.frame()),
    )
    .await;
    let (username, password) = match first {
        Ok(Ok(Some(body))) => match Packet::decode(&body) {
            Ok(Decoded::Known(Packet::Login { username, password })) => (username, password),
            other => {
                log::info!("session from {peer}: first packet is not Login ({other:?}); closed");
                return None;
            }
        },
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            log::info!("session from {peer}: {e}; closed before login");
            return None;
        }
        Err(_) => {
            log::info!(
                "session from {peer}: no Login within {:?}; closed",
                timeouts.login()
            );
            return None;
        }
    };
    let refusal = match services.check_login(&username, &password, peer.ip()).await {
        LoginOutcome::Accepted => None,
        LoginOutcome::WrongCredentials => Some(LOGIN_REFUSED.to_owned()),
        LoginOutcome::Throttled(reason) => Some(reason),
        LoginOutcome::Unavailable(reason) => Some(reason),
        LoginOutcome::Failed(e) => {
            log::error!("login check for {username} failed: {e}");
            Some("internal error; try again later".to_owned())
        }
    };
    if let Some(reason) = refusal {
        metrics::counter!(crate::metrics::SIGN_ON_FAILURES).increment(1);
        log::info!("session from {peer}: login refused for {username:?}: {reason}");
        let frame = Packet::LoginResponse {
            ok: false,
            reason: Some(reason),
        }
        .to_frame();
        let _ = tokio::time::timeout(timeouts.write(), async {
            writer.write_all(&frame).await?;
            writer.shutdown().await
        })
        .await;
        return None;
    }
    Some(username)
}

/// One item from the reader: a frame body, or why reading stopped.
enum Inbound {
    Frame(Vec<u8>),
    Failed(FrameError),
}

fn frame_stream<R: AsyncRead + Unpin + 'static>(
    reader: ReadHalf<R>,
    limit: usize,
    frame_timeout: std::time::Duration,
) -> impl futures_util::Stream<Item = Inbound> {
    futures_util::stream::unfold(Some(reader), move |state| async move {
        let mut reader = state?;
        match read_frame(&mut reader, limit, frame_timeout).await {
            Ok(Some(body)) => Some((Inbound::Frame(body), Some(reader))),
            Ok(None) => None,
            Err(e) => Some((Inbound::Failed(e), None)),
        }
    })
}

/// Ends the session (writer gone, or asked to).
#[derive(Message)]
#[rtype(result = "()")]
struct Close;

/// One signed-on session.
pub struct SessionActor {
    user: String,
    session: SessionId,
    peer: SocketAddr,
    outbound: Outbound,
    services: Arc<Services>,
    /// Start of the current second and the Idle/NotIdle packets in it.
    presence_window: (std::time::Instant, u32),
}

impl SessionActor {
    /// Each Idle/NotIdle fans out to every other user, so one client
    /// toggling in a loop would multiply its traffic by the user count:
    /// past the per-second limit the session is closed. False if it was.
    fn within_presence_rate(&mut self, ctx: &mut Context<Self>) -> bool {
        let now = std::time::Instant::now();
        let (start, count) = &mut self.presence_window;
        if now.duration_since(*start) >= std::time::Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count > self.services.limits.presence_changes_per_sec {
            self.protocol_error(ctx, "Idle/NotIdle packets faster than the limit");
            return false;
        }
        true
    }

    fn protocol_error(&mut self, ctx: &mut Context<Self>, what: &str) {
        log::info!(
            "session {} ({} from {}): {what}; closed",
            self.session,
            self.user,
            self.peer
        );
        ctx.stop();
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::counter!(crate::metrics::SIGN_ONS).increment(1);
        metrics::gauge!(crate::metrics::SESSIONS_OPEN).increment(1.0);
        let ok = Packet::LoginResponse {
            ok: true,
            reason: None,
        }
        .to_frame();
        self.outbound.push(Bytes::from(ok));
        let register = self.services.presence.send(Register {
            user: self.user.clone(),
            session: self.session,
            outbound: self.outbound.clone(),
            peer: self.peer,
            relay: crate::relay::this_thread(),
        });
        let subscribe = Subscribe {
            user: self.user.clone(),
            session: self.session,
            outbound: self.outbound.clone(),
        };
        let mailbox = self.services.mailbox.clone();
        // `send` queues at once, so the mailbox is asked only after presence
        // has queued the snapshot; packets from the peer wait until both
        // are done, so that the sign-on packets always come first.
        ctx.wait(
            async move {
                if register.await.is_ok() {
                    let _ = mailbox.send(subscribe).await;
                }
            }
            .into_actor(self),
        );
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics::gauge!(crate::metrics::SESSIONS_OPEN).decrement(1.0);
        self.outbound.close();
        self.services.presence.do_send(Unregister {
            user: self.user.clone(),
            session: self.session,
        });
        self.services.mailbox.do_send(Unsubscribe {
            user: self.user.clone(),
            session: self.session,
        });
        log::debug!("session {}: {} signed off", self.session, self.user);
    }
}

impl StreamHandler<Inbound> for SessionActor {
    fn handle(&mut self, item: Inbound, ctx: &mut Context<Self>) {
        // A bug met while handling one session's packet must end that
        // session only, and cleanly: presence hears it went away.
        let handled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.on_inbound(item, ctx)));
        if handled.is_err() {
            log::error!(
                "session {} ({}): handler panicked; closed",
                self.session,
                self.user
            );
            ctx.stop();
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl SessionActor {
    fn on_inbound(&mut self, item: Inbound, ctx: &mut Context<Self>) {
        let body = match item {
            Inbound::Frame(body) => body,
            Inbound::Failed(FrameError::Io(e)) => {
                return self.protocol_error(ctx, &format!("read failed: {e}"))
            }
            Inbound::Failed(e) => return self.protocol_error(ctx, &e.to_string()),
        };
        match Packet::decode(&body) {
            Ok(Decoded::Known(Packet::Idle { .. } | Packet::NotIdle {}))
                if !self.within_presence_rate(ctx) => {}
            Ok(Decoded::Known(Packet::Idle { idle_secs })) => {
                #[cfg(feature = "failpoints")]
                if idle_secs == crate::FAILPOINT_IDLE_SECS {
                    panic!("failpoint: session handler panic injected");
                }
                let update = self.services.presence.send(SetIdle {
                    user: self.user.clone(),
                    session: self.session,
                    idle_secs,
                });
                ctx.wait(
                    async move {
                        let _ = update.await;
                    }
                    .into_actor(self),
                );
            }
            Ok(Decoded::Known(Packet::NotIdle {})) => {
                let update = self.services.presence.send(SetActive {
                    user: self.user.clone(),
                    session: self.session,
                });
                ctx.wait(
                    async move {
                        let _ = update.await;
                    }
                    .into_actor(self),
                );
            }
            Ok(Decoded::Known(other)) => {
                let what = format!("unexpected {} packet from a client", other.kind());
                self.protocol_error(ctx, &what)
            }
            Ok(Decoded::Unknown(kind)) => {
                log::debug!(
                    "session {}: ignored unknown packet type {kind:?}",
                    self.session
                );
            }
            Err(e) => self.protocol_error(ctx, &e.to_string()),
        }
    }
}

impl Handler<Close> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
