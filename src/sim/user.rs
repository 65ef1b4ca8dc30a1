//! One simulated user: an actix actor that behaves like a real client. It
//! keeps a session stream (sign-on, presence, `Idle`/`NotIdle`), receives
//! each announced message over a message stream and acknowledges it, and
//! sends messages when the driver tells it to. Everything it sees goes into
//! the ledger.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message, WrapFuture};
use csm_actors::proto::packet::Decoded;
use csm_actors::proto::{Packet, Status};
use tokio::sync::{mpsc, Semaphore};

use super::content::{self, ContentSpec};
use super::ledger::{Count, Ledger, Metric, View};
use super::target::NodeAddrs;
use crate::client::{
    fetch_message, send_message, ClientError, Connector, Outgoing, SessionClient, SessionReader,
};

/// What every simulated user shares.
pub struct World {
    pub connector: Connector,
    /// The server's nodes; user `i` signs on and sends at node `i mod n`
    /// and receives at the next one, so that with several nodes every
    /// message crosses from one node to another.
    pub nodes: Vec<NodeAddrs>,
    pub ledger: Ledger,
    pub users: usize,
    /// Whether each user keeps a view of everyone's presence, to check
    /// it: a map per user of every other user, so off when only holding
    /// sessions (20,000 users would make 400 million entries).
    pub track_presence: bool,
    pub content: ContentSpec,
    /// Message streams in flight, all users together.
    pub streams: Arc<Semaphore>,
    /// Local addresses to connect from (empty: let the system choose).
    pub sources: Vec<IpAddr>,
    /// While set, announced messages are noted and fetched later.
    pub defer_receive: std::sync::atomic::AtomicBool,
}

impl World {
    fn home(&self, index: usize) -> &NodeAddrs {
        &self.nodes[index % self.nodes.len()]
    }

    fn receiving_node(&self, index: usize) -> &NodeAddrs {
        &self.nodes[(index + 1) % self.nodes.len()]
    }
}

/// The password of a simulated user.
pub fn password_for(prefix: &str, name: &str) -> String {
    format!("{name}-{prefix}-secret")
}

/// One simulated user.
pub struct SimUser {
    /// This user's own TLS session cache, as a real client would have.
    connector: Connector,
    name: String,
    password: String,
    index: usize,
    world: Arc<World>,
    out: Option<mpsc::Sender<Packet>>,
    idle: bool,
    receiving: HashSet<String>,
    pending: Vec<String>,
}

impl SimUser {
    pub fn new(name: String, password: String, index: usize, world: Arc<World>) -> SimUser {
        SimUser {
            connector: world.connector.with_own_session_cache(),
            name,
            password,
            index,
            world,
            out: None,
            idle: false,
            receiving: HashSet::new(),
            pending: Vec::new(),
        }
    }

    fn source(&self) -> Option<IpAddr> {
        (!self.world.sources.is_empty())
            .then(|| self.world.sources[self.index % self.world.sources.len()])
    }

    fn receive(&mut self, id: String) {
        if !self.receiving.insert(id.clone()) {
            return;
        }
        let world = self.world.clone();
        let connector = self.connector.clone();
        let (name, password) = (self.name.clone(), self.password.clone());
        let addr = world.receiving_node(self.index).message;
        // A task of its own, not a future of the actor's context: actix
        // polls every future of a context at each wake-up of any of them,
        // and a user may have hundreds of streams waiting for a permit.
        actix::spawn(async move {
            let _permit = world.streams.clone().acquire_owned().await;
            let started = Instant::now();
            match fetch_message(&connector, addr, &name, &password, &id, true).await {
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
        });
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

/// What the reader hands the actor: a message to fetch, or the end.
#[derive(Message)]
#[rtype(result = "()")]
enum Inbound {
    Available(String),
    Ended,
}

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

/// Fetch the messages noted while receiving was deferred.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FetchPending;

impl Handler<FetchPending> for SimUser {
    type Result = ();

    fn handle(&mut self, _: FetchPending, _: &mut Context<Self>) {
        for id in std::mem::take(&mut self.pending) {
            self.receive(id);
        }
    }
}

/// Sign off and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignOff;

impl Handler<SignOn> for SimUser {
    type Result = ();

    fn handle(&mut self, _: SignOn, ctx: &mut Context<Self>) {
        let world = self.world.clone();
        let connector = self.connector.clone();
        let (name, password, source) = (self.name.clone(), self.password.clone(), self.source());
        let session_addr = self.world.home(self.index).session;
        let addr = ctx.address();
        let connecting = async move {
            // A client told "busy" comes back a little later, as real ones do.
            let mut attempt = 0u32;
            loop {
                let started = Instant::now();
                let stream = connector.connect_from(session_addr, source).await?;
                world.ledger.record(Metric::TlsConnect, started.elapsed());
                match SessionClient::over(stream).sign_on(&name, &password).await {
                    Ok(client) => return Ok::<_, ClientError>((client, Instant::now())),
                    Err(ClientError::LoginRefused(reason))
                        if reason.contains("busy") && attempt < 60 =>
                    {
                        attempt += 1;
                        world.ledger.count(Count::LoginRetries);
                        tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8))))
                            .await;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        ctx.wait(
            connecting
                .into_actor(self)
                .map(move |result, actor, ctx| match result {
                    Ok((client, login_done)) => {
                        let (reader, mut writer) = client.split();
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
                        let view = actor.world.ledger.new_view(&actor.name);
                        let (world, name) = (actor.world.clone(), actor.name.clone());
                        actix::spawn(read_session(
                            reader,
                            world,
                            name,
                            view,
                            login_done,
                            addr.clone(),
                        ));
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

/// Reads one session stream: counts and applies presence to the user's
/// view right here (the hot path: up to a packet per user per event), and
/// hands the actor only what it acts on.
async fn read_session(
    mut reader: SessionReader,
    world: Arc<World>,
    name: String,
    view: View,
    login_done: Instant,
    actor: actix::Addr<SimUser>,
) {
    let (mut users_seen, mut own_seen, mut snapshot_done) = (0usize, false, false);
    let mut statuses = 0u64;
    loop {
        let packet = match reader.recv_unbounded().await {
            Ok(Some(Decoded::Known(packet))) => Some(packet),
            Ok(Some(Decoded::Unknown(_))) => continue,
            Ok(None) | Err(_) => None,
        };
        match packet {
            Some(Packet::AddUser { .. }) => users_seen += 1,
            Some(Packet::StatusChange {
                username, status, ..
            }) => {
                statuses += 1;
                if statuses % 256 == 0 {
                    world.ledger.status_packets(256);
                    world.ledger.touch();
                }
                if username == name {
                    own_seen = true;
                } else if world.track_presence {
                    let shown = match status {
                        Status::Online | Status::Back => Some(false),
                        Status::Idle => Some(true),
                        Status::Offline => None,
                    };
                    let mut view = view.lock().unwrap_or_else(|p| p.into_inner());
                    world.ledger.roster().show(&mut view, &username, shown);
                }
            }
            Some(Packet::MessageAvailable { id, .. }) => {
                world.ledger.available(&id, &name);
                if actor.send(Inbound::Available(id)).await.is_err() {
                    break;
                }
            }
            Some(_) => {}
            None => {
                let _ = actor.send(Inbound::Ended).await;
                break;
            }
        }
        if !snapshot_done && own_seen && users_seen >= world.users {
            snapshot_done = true;
            world
                .ledger
                .record(Metric::LoginToSnapshot, login_done.elapsed());
            world.ledger.count(Count::SignOns);
        }
    }
    world.ledger.status_packets(statuses % 256);
    world.ledger.touch();
}

impl Handler<Inbound> for SimUser {
    type Result = ();

    fn handle(&mut self, msg: Inbound, _: &mut Context<Self>) {
        match msg {
            Inbound::Available(id) => {
                if self
                    .world
                    .defer_receive
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    self.pending.push(id);
                } else {
                    self.receive(id);
                }
            }
            Inbound::Ended => {
                if self.out.take().is_some() {
                    log::warn!("{}: session closed by the server", self.name);
                    self.world.ledger.count(Count::Disconnects);
                    self.world.ledger.set_truth(&self.name, false, false);
                    self.world.ledger.clear_view(&self.name);
                }
            }
        }
    }
}

impl Handler<SendOne> for SimUser {
    type Result = ();

    fn handle(&mut self, msg: SendOne, _: &mut Context<Self>) {
        let world = self.world.clone();
        let connector = self.connector.clone();
        let (name, password) = (self.name.clone(), self.password.clone());
        let message_addr = world.home(self.index).message;
        // Its own task, as for a receive. The data is made once the send
        // has a stream: a backlog of sends waiting for one holds no data.
        actix::spawn(async move {
            let _permit = world.streams.clone().acquire_owned().await;
            let data = content::message_for(&msg.id, &world.content);
            world.ledger.scheduled(
                &msg.id,
                &name,
                &msg.recipients,
                content::digest(&data),
                msg.scheduled,
            );
            let outgoing = Outgoing {
                username: &name,
                password: &password,
                id: &msg.id,
                recipients: &msg.recipients,
                data: &data,
            };
            match send_message(&connector, message_addr, &outgoing).await {
                Ok(()) => world.ledger.done(&msg.id),
                Err(e) => {
                    log::warn!("{name}: send {} failed: {e}", msg.id);
                    world.ledger.count(Count::SendErrors);
                }
            }
        });
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
