//! `csm serve`: open the store, start the actors, listen on both addresses
//! and the admin socket, run until told to stop, then drain: stop
//! accepting, let message streams in flight finish (bounded), flush.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Arbiter};
use anyhow::{Context, Result};
use csm_actors::auth::{AuthSettings, Authenticator};
use csm_actors::mailbox::{MailboxActor, MailboxSettings};
use csm_actors::mailboxes::Mailboxes;
use csm_actors::messages::CloseAll;
use csm_actors::presence::PresenceActor;
use csm_actors::services::{OwnedCountGuard, Services};
use csm_actors::store::{GroupCommit, SledStore, Store};
use csm_actors::{courier, session};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::socket::AdminSocket;
use crate::config::{self, Config};
use crate::tls;

/// Most group-commit requests waiting at once; past it sends are answered
/// `unavailable`.
const MAX_WAITING_COMMITS: usize = 65_536;

/// What a started server tells its caller.
#[derive(Debug, Clone)]
pub struct Ready {
    pub session_addr: SocketAddr,
    pub message_addr: SocketAddr,
    pub fingerprint: String,
}

/// The mailbox limits of a configuration.
pub fn mailbox_settings(config: &Config) -> MailboxSettings {
    MailboxSettings {
        max_messages: config.limits.mailbox_messages,
        max_bytes: config.limits.mailbox_bytes,
        id_retention: config.timeouts.id_retention(),
    }
}

/// Binds both listeners from the configuration.
pub async fn bind(config: &Config) -> Result<(TcpListener, TcpListener)> {
    let session = TcpListener::bind(&config.session_addr)
        .await
        .with_context(|| format!("binding the session address {}", config.session_addr))?;
    let message = TcpListener::bind(&config.message_addr)
        .await
        .with_context(|| format!("binding the message address {}", config.message_addr))?;
    Ok((session, message))
}

#[derive(Clone, Copy)]
enum Protocol {
    Session,
    Message,
}

/// Runs the server inside the current actix system on already-bound
/// listeners until `shutdown` resolves. `ready` is called once everything
/// listens.
pub async fn run(
    config: Config,
    session_listener: TcpListener,
    message_listener: TcpListener,
    ready: impl FnOnce(Ready),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let identity = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => tls::load_identity(cert, key)?,
        _ => tls::dev_identity(&config.data_dir)?,
    };
    let fingerprint = identity.fingerprint();
    let acceptor = TlsAcceptor::from(tls::server_config(identity)?);

    let store_dir = config.store_dir();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&store_dir).with_context(|| {
        format!(
            "opening the store in {} (is another server using it?)",
            store_dir.display()
        )
    })?);
    let (commit, flusher) = GroupCommit::start(
        store.clone(),
        MAX_WAITING_COMMITS,
        config.timeouts.commit_window(),
    )
    .context("starting the flusher")?;
    let auth = Arc::new(Authenticator::new(store.clone(), AuthSettings::default())?);
    let users = store.list_users()?;
    log::info!(
        "store opened in {}: {} users",
        store_dir.display(),
        users.len()
    );
    let presence = PresenceActor::new(users).start();
    let mailboxes = Mailboxes::load(store.clone(), mailbox_settings(&config))?;
    let mailbox_actor = MailboxActor::new(mailboxes, commit.clone());
    let mailbox_arbiter = Arbiter::new();
    let mailbox = MailboxActor::start_in_arbiter(&mailbox_arbiter.handle(), move |_| mailbox_actor);

    let services = Arc::new(Services {
        limits: config.limits.clone(),
        timeouts: config.timeouts.clone(),
        store,
        commit: commit.clone(),
        auth,
        presence,
        mailbox,
        shutting_down: AtomicBool::new(false),
        exchanges: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
    });

    let admin = AdminSocket::bind(&config::admin_socket(&config.data_dir), services.clone())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let session_addr = session_listener.local_addr()?;
    let message_addr = message_listener.local_addr()?;
    let accept_session = actix_rt::spawn(accept_loop(
        session_listener,
        Protocol::Session,
        acceptor.clone(),
        services.clone(),
        stop_rx.clone(),
    ));
    let accept_message = actix_rt::spawn(accept_loop(
        message_listener,
        Protocol::Message,
        acceptor,
        services.clone(),
        stop_rx.clone(),
    ));
    let admin_task = actix_rt::spawn(admin.serve(stop_rx));
    log::info!("session stream listening on {session_addr}");
    log::info!("message stream listening on {message_addr}");
    log::info!("ready; certificate SHA-256 fingerprint {fingerprint}");
    ready(Ready {
        session_addr,
        message_addr,
        fingerprint,
    });

    shutdown.await;
    log::info!("shutting down: no new connections");
    services.shutting_down.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = accept_session.await;
    let _ = accept_message.await;
    let _ = admin_task.await;
    let deadline = Instant::now() + config.timeouts.shutdown();
    while services.exchanges.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unfinished = services.exchanges.load(Ordering::Acquire);
    if unfinished > 0 {
        log::warn!(
            "{unfinished} message streams still open at the shutdown deadline; closing them"
        );
    }
    let sessions = services.presence.send(CloseAll).await.unwrap_or(0);
    // Connection tasks hold the services; wait (bounded) for them to end so
    // that the store is released when `run` returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&services) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Err(e) = commit.commit().await {
        log::error!("final flush failed: {e}");
    }
    let flushes = commit.stats().flushes.load(Ordering::Relaxed);
    let commits = commit.stats().commits.load(Ordering::Relaxed);
    drop(services);
    drop(commit);
    mailbox_arbiter.stop();
    if mailbox_arbiter.join().is_err() {
        log::warn!("the mailbox thread did not stop cleanly");
    }
    if !flusher.join(Duration::from_secs(10)) {
        log::warn!("the store flusher did not stop in time");
    }
    let _ = std::fs::remove_file(config::admin_socket(&config.data_dir));
    log::info!(
        "stopped: closed {sessions} sessions; {commits} durable writes in {flushes} flushes; store flushed"
    );
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
    acceptor: TlsAcceptor,
    services: Arc<Services>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if services.connections.load(Ordering::Acquire) >= services.limits.connections {
            log::warn!(
                "connection limit {} reached; closed {peer}",
                services.limits.connections
            );
            continue;
        }
        let guard = OwnedCountGuard::new(services.clone(), |s| &s.connections);
        let acceptor = acceptor.clone();
        let services = services.clone();
        actix_rt::spawn(async move {
            let _guard = guard;
            tune_socket(&stream, &services);
            let handshake =
                tokio::time::timeout(services.timeouts.handshake(), acceptor.accept(stream));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    log::info!("TLS handshake with {peer} failed: {e}");
                    return;
                }
                Err(_) => {
                    log::info!("TLS handshake with {peer} timed out");
                    return;
                }
            };
            match protocol {
                Protocol::Session => session::serve(tls, peer, services).await,
                Protocol::Message => courier::serve(tls, peer, services).await,
            }
        });
    }
}

/// No Nagle delay (packets are small and already coalesced), and TCP
/// keepalive so that dead peers of silent sessions are found.
fn tune_socket(stream: &TcpStream, services: &Services) {
    let _ = stream.set_nodelay(true);
    let idle = services.timeouts.keepalive();
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        log::debug!("could not enable TCP keepalive: {e}");
    }
}
