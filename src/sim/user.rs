//! One simulated user: an actix actor that behaves like a real client. It
//! keeps a session stream (sign-on, presence, `Idle`/`NotIdle`), receives
//! each announced message over a message stream and acknowledges it, and
//! sends messages when the driver tells it to. Everything it sees goes into
//! the ledger.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message, WrapFuture};
use csm_actors::proto::{Packet, Status};
use tokio::sync::{mpsc, Semaphore};

use super::content::{self, ContentSpec};
use super::ledger::{Count, Ledger, Metric};
use crate::client::{fetch_message, send_message, ClientError, Connector, Outgoing, SessionClient};

/// What every simulated user shares.
pub struct World {
    pub connector: Connector,
    pub session_addr: SocketAddr,
    pub message_addr: SocketAddr,
    pub ledger: Ledger,
    pub users: usize,
    pub content: ContentSpec,
    /// Message streams in flight, all users together.
    pub streams: Arc<Semaphore>,
    /// Local addresses to connect from (empty: let the system choose).
    pub sources: Vec<IpAddr>,
}

/// The password of a simulated user.
pub fn password_for(prefix: &str, name: &str) -> String {
    format!("{name}-{prefix}-secret")
}

/// One simulated user.
pub struct SimUser {
    name: String,
    password: String,
    index: usize,
    world: Arc<World>,
    out: Option<mpsc::Sender<Packet>>,
    idle: bool,
    users_seen: usize,
    own_status_seen: bool,
    login_started: Option<Instant>,
    receiving: HashSet<String>,
}

impl SimUser {
    pub fn new(name: String, password: String, index: usize, world: Arc<World>) -> SimUser {
        SimUser {
            name,
            password,
            index,
            world,
            out: None,
            idle: false,
            users_seen: 0,
            own_status_seen: false,
            login_started: None,
            receiving: HashSet::new(),
        }
    }

    fn source(&self) -> Option<IpAddr> {
        (!self.world.sources.is_empty())
            .then(|| self.world.sources[self.index % self.world.sources.len()])
    }

    fn snapshot_progress(&mut self) {
        if self.own_status_seen && self.users_seen >= self.world.users {
            if let Some(started) = self.login_started.take() {
                self.world
                    .ledger
                    .record(Metric::LoginToSnapshot, started.elapsed());
                self.world.ledger.count(Count::SignOns);
            }
        }
    }

    fn receive(&mut self, id: String, ctx: &mut Context<Self>) {
        if !self.receiving.insert(id.clone()) {
            return;
        }
        let world = self.world.clone();
        let (name, password) = (self.name.clone(), self.password.clone());
        ctx.spawn(
            async move {
                let _permit = world.streams.clone().acquire_owned().await;
                let started = Instant::now();
                match fetch_message(
                    &world.connector,
                    world.message_addr,
                    &name,
                    &password,
                    &id,
                    true,
                )
                .await
                {
                    Ok(got) => {
                        world.ledger.record(Metric::Receive, started.elapsed());
                        world
                            .ledger
                            .received(&id, &name, &got.sender, content::digest(&got.data));
                    }
                    Err(e) => {
                        log::debug!("{name}: receive {id} failed: {e}");
                        world.ledger.count(Count::ReceiveErrors);
                    }
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for SimUser {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        ctx.notify(SignOn);
    }
}

/// Connect and sign on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignOn;

/// A packet from the session stream (`None`: the stream ended).
#[derive(Message)]
#[rtype(result = "()")]
struct Inbound(Option<Packet>);

/// Send one message, scheduled at `scheduled`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendOne {
    pub id: String,
    pub recipients: Vec<String>,
    pub scheduled: Instant,
}

/// Go idle, or come back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ToggleIdle;

/// Sign off and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignOff;

impl Handler<SignOn> for SimUser {
    type Result = ();

    fn handle(&mut self, _: SignOn, ctx: &mut Context<Self>) {
        let world = self.world.clone();
        let (name, password, source) = (self.name.clone(), self.password.clone(), self.source());
        let addr = ctx.address();
        self.users_seen = 0;
        self.own_status_seen = false;
        let connecting = async move {
            let started = Instant::now();
            let stream = world
                .connector
                .connect_from(world.session_addr, source)
                .await?;
            world.ledger.record(Metric::TlsConnect, started.elapsed());
            let client = SessionClient::over(stream)
                .sign_on(&name, &password)
                .await?;
            Ok::<_, ClientError>((client, Instant::now()))
        };
        ctx.wait(
            connecting
                .into_actor(self)
                .map(move |result, actor, ctx| match result {
                    Ok((client, login_done)) => {
                        let (mut reader, mut writer) = client.split();
                        actor.login_started = Some(login_done);
                        actor.world.ledger.set_truth(&actor.name, true, false);
                        actor.idle = false;
                        let (tx, mut rx) = mpsc::channel::<Packet>(64);
                        actor.out = Some(tx);
                        actix::spawn(async move {
                            while let Some(packet) = rx.recv().await {
                                if writer.send(&packet).await.is_err() {
                                    break;
                                }
                            }
                            writer.close().await;
                        });
                        actix::spawn(async move {
                            loop {
                                let packet = reader
                                    .next_packet(Duration::from_secs(24 * 3600))
                                    .await
                                    .ok()
                                    .flatten();
                                let ended = packet.is_none();
                                if addr.send(Inbound(packet)).await.is_err() || ended {
                                    break;
                                }
                            }
                        });
                    }
                    Err(e) => {
                        log::warn!("{}: sign-on failed: {e}", actor.name);
                        actor.world.ledger.count(Count::SignOnFailures);
                        ctx.stop();
                    }
                }),
        );
    }
}

use actix::ActorFutureExt;

impl Handler<Inbound> for SimUser {
    type Result = ();

    fn handle(&mut self, msg: Inbound, ctx: &mut Context<Self>) {
        let ledger = &self.world.ledger;
        match msg.0 {
            Some(Packet::AddUser { .. }) => {
                self.users_seen += 1;
                self.snapshot_progress();
            }
            Some(Packet::StatusChange {
                username, status, ..
            }) => {
                ledger.count(Count::StatusPackets);
                if username == self.name {
                    self.own_status_seen = true;
                    self.snapshot_progress();
                    return;
                }
                let shown = match status {
                    Status::Online | Status::Back => Some(false),
                    Status::Idle => Some(true),
                    Status::Offline => None,
                };
                ledger.set_view(&self.name, &username, shown);
            }
            Some(Packet::MessageAvailable { id, .. }) => {
                ledger.available(&id, &self.name);
                self.receive(id, ctx);
            }
            Some(_) => {}
            None => {
                if self.out.take().is_some() {
                    log::warn!("{}: session closed by the server", self.name);
                    ledger.count(Count::Disconnects);
                    ledger.set_truth(&self.name, false, false);
                    ledger.clear_view(&self.name);
                }
            }
        }
    }
}

impl Handler<SendOne> for SimUser {
    type Result = ();

    fn handle(&mut self, msg: SendOne, ctx: &mut Context<Self>) {
        let world = self.world.clone();
        let (name, password) = (self.name.clone(), self.password.clone());
        ctx.spawn(
            async move {
                let data = content::message_for(&msg.id, &world.content);
                world.ledger.scheduled(
                    &msg.id,
                    &name,
                    &msg.recipients,
                    content::digest(&data),
                    msg.scheduled,
                );
                let _permit = world.streams.clone().acquire_owned().await;
                let outgoing = Outgoing {
                    username: &name,
                    password: &password,
                    id: &msg.id,
                    recipients: &msg.recipients,
                    data: &data,
                };
                match send_message(&world.connector, world.message_addr, &outgoing).await {
                    Ok(()) => world.ledger.done(&msg.id),
                    Err(e) => {
                        log::warn!("{name}: send {} failed: {e}", msg.id);
                        world.ledger.count(Count::SendErrors);
                    }
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<ToggleIdle> for SimUser {
    type Result = ();

    fn handle(&mut self, _: ToggleIdle, _: &mut Context<Self>) {
        let Some(out) = &self.out else { return };
        let packet = if self.idle {
            Packet::NotIdle {}
        } else {
            Packet::Idle { idle_secs: 0 }
        };
        if out.try_send(packet).is_ok() {
            self.idle = !self.idle;
            self.world.ledger.set_truth(&self.name, true, self.idle);
            self.world.ledger.count(Count::IdleToggles);
        }
    }
}

impl Handler<SignOff> for SimUser {
    type Result = ();

    fn handle(&mut self, _: SignOff, ctx: &mut Context<Self>) {
        self.out = None;
        self.world.ledger.set_truth(&self.name, false, false);
        self.world.ledger.clear_view(&self.name);
        ctx.stop();
    }
}
