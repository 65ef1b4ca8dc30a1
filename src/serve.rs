//! `csm serve`: open the store, start the actors, listen on both addresses
//! and the admin socket, run until told to stop, then drain: stop
//! accepting, let message streams in flight finish (bounded), flush.
//!
//! The accept loops run on the main arbiter with presence. Each message
//! stream (a TLS handshake and one message, the bulk of the per-message
//! work) is handed to one of the [`Workers`] (one arbiter per core, as
//! actix-server does), so that every core does network work. Session
//! streams run on the main arbiter with presence, where presence's pushes
//! wake their writers without crossing threads; with
//! `limits.sessions_on_network_threads` they go to the workers too, for
//! servers whose sessions would saturate one thread. Either way presence
//! reaches the sessions of each thread through that thread's fan-out
//! relay (`csm_actors::relay`), once per window, not once per session.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use csm_actors::mailbox::MailboxSettings;
use csm_actors::messages::CloseAll;
use csm_actors::services::Services;
use csm_actors::store::Store;
use csm_actors::{courier, session};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::socket::AdminSocket;
use crate::backend::Opened;
use crate::config::{self, Config};
use crate::tls;

/// What a started server tells its caller.
#[derive(Debug, Clone)]
pub struct Ready {
    pub session_addr: SocketAddr,
    pub message_addr: SocketAddr,
    pub fingerprint: String,
}

/// Serves Prometheus metrics at `addr` (once per process: a second call,
/// as in tests that start several servers, keeps the first exporter).
fn install_metrics(addr: &str) -> Result<()> {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if INSTALLED.get().is_some() {
        log::warn!("metrics exporter already running; {addr} not used");
        return Ok(());
    }
    let socket: SocketAddr = addr
        .parse()
        .with_context(|| format!("metrics address {addr} is not HOST:PORT"))?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(socket)
        .install()
        .with_context(|| format!("starting the metrics exporter on {addr}"))?;
    let _ = INSTALLED.set(());
    log::info!("metrics at http://{socket}/metrics");
    Ok(())
}

/// The mailbox limits of a configuration.
pub fn mailbox_settings(config: &Config) -> MailboxSettings {
    MailboxSettings::new(&config.limits, &config.timeouts)
}

/// Binds both listeners from the configuration.
pub async fn bind(config: &Config) -> Result<(TcpListener, TcpListener)> {
    let backlog = config.limits.listen_backlog;
    let session = listen(&config.session_addr, backlog)
        .await
        .with_context(|| format!("binding the session address {}", config.session_addr))?;
    let message = listen(&config.message_addr, backlog)
        .await
        .with_context(|| format!("binding the message address {}", config.message_addr))?;
    Ok((session, message))
}

/// A listener on the first address `addr` resolves to that takes it, with
/// room for `backlog` connections waiting to be accepted. (The standard
/// library and tokio queue 128: a reconnect storm of a few thousand
/// clients would have most connects dropped and retried a second later.)
async fn listen(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    listen_first(tokio::net::lookup_host(addr).await?, backlog)
}

/// A listener on the first of `addrs` that takes it; the last address's
/// error if none does.
fn listen_first(
    addrs: impl IntoIterator<Item = SocketAddr>,
    backlog: u32,
) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in addrs {
        // A host without IPv6 cannot even create the socket of an IPv6
        // address a name resolves to: try the next address then too.
        let listening = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(backlog)
        });
        match listening {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
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
    log::info!(
        "csm {} starting; data directory {}",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display()
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    if let Some(addr) = &config.metrics_addr {
        install_metrics(addr)?;
    }
    let certs = tls::CertStore::new(load_identity(&config)?)?;
    let fingerprint = certs.fingerprint();
    let acceptor = TlsAcceptor::from(tls::server_config(certs.clone())?);

    let backend = Opened::open(&config, session_listener.local_addr()?.port()).await?;
    crate::trim::start();
    let services = Arc::new(Services::new(
        config.limits.clone(),
        config.timeouts.clone(),
        backend.backing.clone(),
    ));

    let admin = AdminSocket::bind(&config::admin_socket(&config.data_dir), services.clone())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers = Arc::new(Workers::start(config.limits.network_threads()));
    let session_addr = session_listener.local_addr()?;
    let message_addr = message_listener.local_addr()?;
    let accept_session = actix_rt::spawn(accept_loop(
        session_listener,
        Protocol::Session,
        acceptor.clone(),
        services.clone(),
        workers.clone(),
        stop_rx.clone(),
    ));
    let accept_message = actix_rt::spawn(accept_loop(
        message_listener,
        Protocol::Message,
        acceptor,
        services.clone(),
        workers.clone(),
        stop_rx.clone(),
    ));
    let admin_task = actix_rt::spawn(admin.serve(stop_rx.clone()));
    let reload_task = actix_rt::spawn(reload_on_sighup(config.clone(), certs, stop_rx));
    if let Some(store) = backend.sled_store() {
        let room = csm_actors::mailbox::room_to_reopen(config.limits.disk_reserve_bytes);
        actix_rt::spawn(exit_if_store_stays_failed(store, room));
    }
    log::info!("session stream listening on {session_addr}");
    log::info!("message stream listening on {message_addr}");
    log::info!("ready; certificate SHA-256 fingerprint {fingerprint}");
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    ready(Ready {
        session_addr,
        message_addr,
        fingerprint,
    });

    shutdown.await;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    log::info!("shutting down: no new connections");
    services.shutting_down.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = accept_session.await;
    let _ = accept_message.await;
    let _ = admin_task.await;
    let _ = reload_task.await;
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
    drop(services);
    workers.stop();
    let closed = backend.close().await;
    let _ = std::fs::remove_file(config::admin_socket(&config.data_dir));
    log::info!("stopped: closed {sessions} sessions; {closed}");
    Ok(())
}

fn load_identity(config: &Config) -> Result<tls::Identity> {
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => tls::load_identity(cert, key),
        _ => tls::dev_identity(&config.data_dir),
    }
}

/// Reloads the certificate and key on SIGHUP; a file that does not load
/// leaves the running certificate in place, and the log says why.
async fn reload_on_sighup(
    config: Config,
    certs: Arc<tls::CertStore>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            log::warn!("cannot watch SIGHUP, certificate reload is off: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = hangups.recv() => {}
        }
        match load_identity(&config).and_then(|identity| certs.replace(identity)) {
            Ok(fingerprint) => {
                log::info!("certificate reloaded; SHA-256 fingerprint {fingerprint}")
            }
            Err(e) => {
                log::error!("certificate reload failed, keeping the current certificate: {e:#}")
            }
        }
    }
}

/// How long a store that failed a write may stay failed with room on its
/// disk (so the mailbox actor could not reopen it) before the server exits.
const REOPEN_GRACE: Duration = Duration::from_secs(30);

/// A store that failed a write (a full disk, an I/O error) takes no more
/// writes until it is reopened, which the mailbox actor does in place once
/// the filesystem has room again; meanwhile the server serves what needs
/// no write (sign-ons, presence, the waiting lists, reading messages) and
/// answers sends `unavailable`. This watch is the last resort: if the
/// store stays failed for [`REOPEN_GRACE`] although there is room (the
/// reopen itself failed, or [`csm_actors::store::MAX_REOPENS`] is spent),
/// the server exits with status 1 for its service manager to start it
/// afresh. Everything acknowledged is on disk, which makes exiting safe.
async fn exit_if_store_stays_failed(store: Arc<dyn Store>, room: u64) {
    let mut failed_with_room_since: Option<std::time::Instant> = None;
    let mut reported = false;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(reason) = store.failed() else {
            if std::mem::take(&mut reported) {
                log::info!("the store was reopened and takes writes again");
                notify_systemd(&[sd_notify::NotifyState::Status("serving")]);
            }
            failed_with_room_since = None;
            continue;
        };
        if !std::mem::replace(&mut reported, true) {
            log::error!(
                "the store failed a write ({reason}): sends are refused, sign-ons and \
                 receives go on; it is reopened once {room} bytes are free"
            );
            notify_systemd(&[sd_notify::NotifyState::Status(&format!(
                "store failed: {reason}; waiting for {room} bytes free"
            ))]);
        }
        if store.free_space().is_some_and(|free| free < room) {
            failed_with_room_since = None;
            continue;
        }
        let since = *failed_with_room_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= REOPEN_GRACE {
            log::error!(
                "the store could not be reopened in place ({reason}); exiting with status 1 \
                 so that the service manager restarts csm"
            );
            notify_systemd(&[sd_notify::NotifyState::Stopping]);
            std::process::exit(1);
        }
    }
}

/// Tells systemd (Type=notify) about readiness and shutdown; a no-op when
/// not started by systemd.
fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, states) {
            log::warn!("could not notify systemd: {e}");
        }
    }
}

/// The arbiters that run connections, each on a thread of its own.
struct Workers {
    arbiters: Vec<actix::Arbiter>,
    next: std::sync::atomic::AtomicUsize,
}

impl Workers {
    fn start(count: usize) -> Workers {
        log::info!("{count} network threads");
        Workers {
            arbiters: (0..count.max(1)).map(|_| actix::Arbiter::new()).collect(),
            next: Default::default(),
        }
    }

    /// Runs `job` on the next worker in turn; false once they are stopped.
    fn run(&self, job: impl FnOnce() + Send + 'static) -> bool {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        self.arbiters[turn].spawn_fn(job)
    }

    /// Stops the workers, dropping whatever still runs on them; called once
    /// the connections are closed.
    fn stop(&self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
    acceptor: TlsAcceptor,
    services: Arc<Services>,
    workers: Arc<Workers>,
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
        let guard = match services.admit(peer.ip()) {
            Ok(guard) => guard,
            Err(why) => {
                log::warn!("{why}; closed {peer}");
                continue;
            }
        };
        tune_socket(&stream, &services);
        let acceptor = acceptor.clone();
        let services = services.clone();
        if let (Protocol::Session, false) = (protocol, services.limits.sessions_on_network_threads)
        {
            actix_rt::spawn(serve_connection(
                stream, peer, protocol, acceptor, services, guard,
            ));
            continue;
        }
        // A tokio socket belongs to the runtime that registered it: it
        // crosses to the worker as a plain socket and is registered there.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("could not hand over the connection from {peer}: {e}");
                continue;
            }
        };
        let started = workers.run(move || {
            actix_rt::spawn(async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        serve_connection(stream, peer, protocol, acceptor, services, guard).await
                    }
                    Err(e) => log::warn!("could not take over the connection from {peer}: {e}"),
                }
            });
        });
        if !started {
            log::warn!("no network thread takes connections; closed {peer}");
        }
    }
}

/// One connection, on its thread: the TLS handshake (bounded), then the
/// protocol of the port it came in on.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    acceptor: TlsAcceptor,
    services: Arc<Services>,
    guard: csm_actors::services::ConnectionGuard,
) {
    let _guard = guard;
    // The handshake and the protocol run in futures of their own on the
    // heap. This future is allocated at the size of its largest state and
    // lives as long as the connection: inline, the handshake (about 1.3 KiB)
    // and the two protocols would make every idle session carry several
    // KiB of states it is done with or never enters.
    let handshake = Box::pin(tokio::time::timeout(
        services.timeouts.handshake(),
        acceptor.accept(stream),
    ));
    let tls = match handshake.await {
        Ok(Ok(tls)) => {
            let kind = match tls.get_ref().1.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => "resumed",
                _ => "full",
            };
            metrics::counter!(csm_actors::metrics::HANDSHAKES, "kind" => kind).increment(1);
            tls
        }
        Ok(Err(e)) => {
            metrics::counter!(csm_actors::metrics::HANDSHAKE_FAILURES).increment(1);
            log::info!("TLS handshake with {peer} failed: {e}");
            return;
        }
        Err(_) => {
            metrics::counter!(csm_actors::metrics::HANDSHAKE_FAILURES).increment(1);
            log::info!("TLS handshake with {peer} timed out");
            return;
        }
    };
    // Built before it is awaited, so that no binding of the TLS stream
    // (over 1 KiB) is alive across the await and kept in this future.
    let connection: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> = match protocol {
        Protocol::Session => {
            // A session's writer hands over at most this much at a time; the
            // TLS layer need not hold more (its default is 64 KiB, which
            // thousands of sessions signing on at once would all fill).
            let mut tls = tls;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(services.limits.write_coalesce_bytes));
            Box::pin(session::serve(tls, peer, services))
        }
        Protocol::Message => Box::pin(courier::serve(tls, peer, services)),
    };
    connection.await
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context as TaskContext, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

    use super::*;

    /// A stream that carries 4 KiB beside its bytes, as a TLS stream
    /// carries its connection state: a future that keeps the stream it was
    /// given shows it in its size.
    struct Bulky {
        inner: DuplexStream,
        _state: [u8; 4096],
    }

    impl AsyncRead for Bulky {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Bulky {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A name may resolve to several addresses: the server listens on the
    /// first one it can bind, and reports the last failure if none.
    #[actix_rt::test]
    async fn listening_falls_back_to_the_next_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap();
        let free: SocketAddr = "127.0.0.1:0".parse().unwrap();

        let listener = listen_first([taken_addr, free], 16).unwrap();
        let bound = listener.local_addr().unwrap();
        assert_ne!(bound, taken_addr, "it took the next address");
        TcpStream::connect(bound).await.unwrap();

        let refused = listen_first([taken_addr, taken_addr], 16).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse);
        let nothing = listen_first([], 16).unwrap_err();
        assert_eq!(nothing.kind(), std::io::ErrorKind::InvalidInput);
    }

    /// Every idle session holds its connection's future and its session's
    /// future for as long as it is open, each allocated at the size of its
    /// largest state. The handshake, the sign-on and the message protocol
    /// are the largest states and are over (or never entered) by then: they
    /// must run in futures of their own, and the stream must not stay in
    /// the session's future beside the halves it was split into.
    #[actix_rt::test]
    async fn an_open_session_keeps_no_state_it_is_done_with() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let opened = Opened::open(&config, 0).await.unwrap();
        let services = Arc::new(Services::new(
            config.limits.clone(),
            config.timeouts.clone(),
            opened.backing.clone(),
        ));
        let certs = tls::CertStore::new(tls::dev_identity(dir.path()).unwrap()).unwrap();
        let acceptor = TlsAcceptor::from(tls::server_config(certs).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let guard = services.admit(peer.ip()).unwrap();

        let connection = serve_connection(
            stream,
            peer,
            Protocol::Session,
            acceptor,
            services.clone(),
            guard,
        );
        let connection_bytes = std::mem::size_of_val(&connection);
        assert!(
            connection_bytes <= 512,
            "a connection's future takes {connection_bytes} bytes"
        );

        let (bulky, _other_end) = tokio::io::duplex(64);
        let session = session::serve(
            Bulky {
                inner: bulky,
                _state: [0; 4096],
            },
            peer,
            services.clone(),
        );
        let session_bytes = std::mem::size_of_val(&session);
        assert!(
            session_bytes <= 1024,
            "a session's future takes {session_bytes} bytes with a stream of 4 KiB"
        );

        drop((connection, session, client, services));
        opened.close().await;
    }
}
