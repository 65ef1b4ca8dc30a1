//! Test harness: a real server (real TLS, real sled in a temp directory or
//! a real PostgreSQL started by the tests) on its own thread and actix
//! system, bound to 127.0.0.1:0, plus helpers that speak the protocols
//! through the project's client code.

#![allow(dead_code)]

#[cfg(csm_postgres)]
pub mod postgres;

/// The contract suite file `$suite` (under `tests/contract/`, the path
/// taken from the calling test file), once per
/// backend: modules `sled`, and `postgres` when PostgreSQL's programs are
/// installed (otherwise a test says the PostgreSQL half was left out);
/// with `also_with_sessions_on_network_threads`, once more on sled with
/// session streams on the network threads (module
/// `sled_sessions_on_network_threads`). The suite calls `start()`,
/// `start_with(tweak)` and `start_in(dir, tweak)`, which this binds to the
/// module's backend and settings.
#[macro_export]
macro_rules! contract_suite {
    ($suite:literal, also_with_sessions_on_network_threads) => {
        $crate::contract_suite!($suite);
        $crate::contract_suite!(
            @on sled_sessions_on_network_threads,
            $crate::common::Backend::Sled,
            |c| c.limits.sessions_on_network_threads = true,
            $suite
        );
    };
    ($suite:literal) => {
        $crate::contract_suite!(@on sled, $crate::common::Backend::Sled, |_| {}, $suite);
        #[cfg(csm_postgres)]
        $crate::contract_suite!(@on postgres, $crate::common::Backend::Postgres, |_| {}, $suite);

        #[cfg(not(csm_postgres))]
        #[test]
        fn postgres_suite_needs_postgresql_installed() {
            eprintln!(
                "PostgreSQL's server programs were not found when this was built: the suite \
                 ran on sled only. Install PostgreSQL (or set CSM_PG_BINDIR) to run it on \
                 PostgreSQL too."
            );
        }
    };
    (@on $module:ident, $backend:expr, $base:expr, $suite:literal) => {
        mod $module {
            use $crate::common;
            use std::path::Path;

            const BACKEND: common::Backend = $backend;

            /// The settings every server of this module starts from.
            fn base(config: &mut csm::config::Config) {
                let base: fn(&mut csm::config::Config) = $base;
                base(config)
            }

            #[allow(dead_code)]
            fn start() -> common::TestServer {
                common::TestServer::start_on(BACKEND, base)
            }

            #[allow(dead_code)]
            fn start_with(tweak: impl FnOnce(&mut csm::config::Config)) -> common::TestServer {
                common::TestServer::start_on(BACKEND, |c| {
                    base(c);
                    tweak(c)
                })
            }

            #[allow(dead_code)]
            fn start_in(
                dir: &Path,
                tweak: impl FnOnce(&mut csm::config::Config),
            ) -> common::TestServer {
                common::TestServer::start_in_on(BACKEND, dir, |c| {
                    base(c);
                    tweak(c)
                })
            }

            include!(concat!("contract/", $suite));
        }
    };
}

/// Which store a test server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sled,
    /// A database of this test binary's PostgreSQL cluster.
    #[cfg(csm_postgres)]
    Postgres,
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use csm::admin::protocol::{Reply, Request};
use csm::client::{send_message, ClientError, Connector, Outgoing, SessionClient};
use csm::config::Config;
use csm_actors::proto::data::{Attachment, MessageData};
use csm_actors::proto::{Packet, Status};
use tokio::sync::oneshot;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub session_addr: SocketAddr,
    pub message_addr: SocketAddr,
    pub connector: Connector,
    /// The PostgreSQL database, on that backend.
    pub store_url: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<ServerThread>,
}

type ServerThread = JoinHandle<anyhow::Result<()>>;

/// Starts a server thread and waits for it to be ready; the error of one
/// that did not start, as text.
fn spawn_server(
    config: Config,
) -> Result<(csm::serve::Ready, oneshot::Sender<()>, ServerThread), String> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let system = actix::System::new();
        system.block_on(async move {
            let (session, message) = csm::serve::bind(&config).await?;
            csm::serve::run(
                config,
                session,
                message,
                move |ready| {
                    let _ = ready_tx.send(ready);
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await
        })
    });
    match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(ready) => Ok((ready, stop_tx, thread)),
        Err(_) => Err(format!("{:?}", thread.join())),
    }
}

impl TestServer {
    /// A server on a fresh temp directory with default settings.
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    /// A server on a fresh temp directory, settings adjusted by `tweak`.
    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = TestServer::start_in(temp.path(), tweak);
        server._temp = Some(temp);
        server
    }

    /// A server on `dir` (kept after the server stops).
    pub fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_in_on(Backend::Sled, dir, tweak)
    }

    /// A server on `backend` with a fresh temp directory.
    pub fn start_on(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = TestServer::start_in_on(backend, temp.path(), tweak);
        server._temp = Some(temp);
        server
    }

    /// A server on `backend` with data directory `dir`; on PostgreSQL the
    /// database is named after `dir`, so a restart in `dir` finds it.
    pub fn start_in_on(
        backend: Backend,
        dir: &Path,
        tweak: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = Config {
            data_dir: dir.to_owned(),
            session_addr: "127.0.0.1:0".into(),
            message_addr: "127.0.0.1:0".into(),
            ..Config::default()
        };
        match backend {
            Backend::Sled => {}
            #[cfg(csm_postgres)]
            Backend::Postgres => {
                let cluster = postgres::Postgres::shared();
                config.store.backend = csm::config::Backend::Postgres;
                config.store.url = Some(cluster.database_for(dir));
                config.store.pool_size = 6;
                config.store.committers = 2;
            }
        }
        tweak(&mut config);
        let store_url = config.store.url.clone();
        let pinned = config
            .cert
            .clone()
            .unwrap_or_else(|| csm::tls::dev_cert_paths(dir).0);
        // sled lets go of its lock file when its last background write of
        // the previous server in this process ends, which on a loaded
        // machine can be a moment after that server returned: retry a
        // locked store briefly (a separate process would have exited).
        let started = std::time::Instant::now();
        let (ready, stop_tx, thread) = loop {
            match spawn_server(config.clone()) {
                Ok(running) => break running,
                Err(e) if e.contains("could not acquire lock") && started.elapsed() < WAIT => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("server did not start: {e}"),
            }
        };
        TestServer {
            data_dir: dir.to_owned(),
            _temp: None,
            session_addr: ready.session_addr,
            message_addr: ready.message_addr,
            connector: Connector::new(
                csm::tls::pinned_client_config_from_pem(&pinned).expect("connector"),
            ),
            store_url,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Asks the server to shut down without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the server gracefully and waits until it has released the store.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.begin_stop();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("server thread").expect("server run");
        }
    }

    /// Creates a user through the live admin socket.
    pub fn add_user(&self, name: &str, password: &str) {
        let request = Request::UserAdd {
            name: name.into(),
            password: password.into(),
        };
        match csm::admin::execute(&self.data_dir, request) {
            Ok(Reply::Done { .. }) => {}
            other => panic!("adding {name}: {other:?}"),
        }
    }

    pub async fn login(&self, user: &str) -> SessionClient {
        SessionClient::login(&self.connector, self.session_addr, user, &password_of(user))
            .await
            .unwrap_or_else(|e| panic!("login {user}: {e}"))
    }

    /// Signs on and reads the sign-on packets up to the given count of
    /// StatusChange packets plus messages; returns them.
    pub async fn send(
        &self,
        from: &str,
        id: &str,
        to: &[&str],
        data: &[u8],
    ) -> Result<(), ClientError> {
        let recipients: Vec<String> = to.iter().map(|s| s.to_string()).collect();
        send_message(
            &self.connector,
            self.message_addr,
            &Outgoing {
                username: from,
                password: &password_of(from),
                id,
                recipients: &recipients,
                data,
            },
        )
        .await
    }

    pub async fn receive(
        &self,
        user: &str,
        id: &str,
    ) -> Result<csm::client::Received, ClientError> {
        csm::client::receive_message(
            &self.connector,
            self.message_addr,
            user,
            &password_of(user),
            id,
        )
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Each test user's password is derived from the name.
pub fn password_of(user: &str) -> String {
    format!("pw-{user}-ü")
}

/// Message data with text and two attachments, one binary.
pub fn sample_data(text: &str) -> Vec<u8> {
    MessageData::new(
        text,
        vec![
            Attachment::new("notes.txt", b"line one\nline two\n".to_vec()),
            Attachment::new("blob\0😀.bin", (0..=255u8).cycle().take(5000).collect()),
        ],
    )
    .encode()
    .expect("encodable")
}

/// The next known packet, failing the test on timeout or close.
pub async fn next(client: &mut SessionClient) -> Packet {
    match client.next_packet(WAIT).await {
        Ok(Some(packet)) => packet,
        other => panic!("expected a packet, got {other:?}"),
    }
}

/// The next StatusChange, as (user, status, idle_secs).
pub async fn next_status(client: &mut SessionClient) -> (String, Status, Option<u64>) {
    match next(client).await {
        Packet::StatusChange {
            username,
            status,
            idle_secs,
        } => (username, status, idle_secs),
        other => panic!("expected StatusChange, got {other:?}"),
    }
}

/// Reads packets until `count` StatusChange packets arrived after the sign-on
/// user list; returns (users added, statuses, messages available) in order.
pub async fn read_sign_on(
    client: &mut SessionClient,
    statuses: usize,
    messages: usize,
) -> (
    Vec<String>,
    Vec<(String, Status, Option<u64>)>,
    Vec<(String, String, u64)>,
) {
    let mut users = Vec::new();
    let mut seen_status = Vec::new();
    let mut seen_messages = Vec::new();
    while seen_status.len() < statuses || seen_messages.len() < messages {
        match next(client).await {
            Packet::AddUser { username } => {
                assert!(seen_status.is_empty(), "AddUser after StatusChange");
                users.push(username);
            }
            Packet::StatusChange {
                username,
                status,
                idle_secs,
            } => {
                assert!(
                    seen_messages.is_empty(),
                    "StatusChange after MessageAvailable"
                );
                seen_status.push((username, status, idle_secs));
            }
            Packet::MessageAvailable { id, from, size } => seen_messages.push((id, from, size)),
            other => panic!("unexpected packet in sign-on: {other:?}"),
        }
    }
    (users, seen_status, seen_messages)
}

/// Asserts the stream is closed by the server (EOF or reset) within WAIT.
pub async fn assert_closed(client: &mut SessionClient) {
    loop {
        match client.recv(WAIT).await {
            Ok(None) => return,
            Ok(Some(_)) => continue,
            Err(ClientError::Io(_)) | Err(ClientError::Protocol(_)) => return,
            Err(e) => panic!("expected the server to close, got {e}"),
        }
    }
}

/// Writes `bytes` on a fresh message stream (half-closing after them when
/// `eof`), then returns everything the server sends until it closes.
pub async fn raw_exchange(server: &TestServer, bytes: &[u8], eof: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = server
        .connector
        .connect(server.message_addr)
        .await
        .expect("connect");
    let (mut reader, mut writer) = tokio::io::split(stream);
    writer.write_all(bytes).await.expect("write");
    writer.flush().await.expect("flush");
    if eof {
        writer.shutdown().await.expect("shutdown");
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT * 2, reader.read_to_end(&mut answer)).await;
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("reading the answer: {e}"),
        Err(_) => panic!(
            "server did not close; got so far {:?}",
            String::from_utf8_lossy(&answer)
        ),
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The start of a send request: header lines, recipients, empty line, `c`.
pub fn send_request(from: &str, id: &str, to: &[&str]) -> Vec<u8> {
    let mut bytes = format!("{from}\n{}\n{id}\nsend\n", password_of(from)).into_bytes();
    for recipient in to {
        bytes.extend_from_slice(recipient.as_bytes());
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(b"\nc");
    bytes
}

/// Asserts an answer is one error line with `code`.
pub fn assert_error(answer: &str, code: &str) {
    let prefix = format!("error {code} ");
    assert!(
        answer.starts_with(&prefix) && answer.ends_with('\n') && answer.matches('\n').count() == 1,
        "expected one `error {code} …` line, got {answer:?}"
    );
}

/// A `csm` binary serving `dir` on free loopback ports.
pub struct BinaryServer {
    pub child: std::process::Child,
    pub session: SocketAddr,
    pub message: SocketAddr,
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts the binary and waits until its admin socket answers (a killed
/// server leaves its socket file behind, so existence is not enough).
pub fn start_binary(dir: &Path) -> BinaryServer {
    start_binary_with(dir, &[])
}

/// [`start_binary`] with more `csm serve` arguments.
pub fn start_binary_with(dir: &Path, args: &[&std::ffi::OsStr]) -> BinaryServer {
    let (session, message) = (free_addr(), free_addr());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_csm"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--session-addr",
            &session.to_string(),
            "--message-addr",
            &message.to_string(),
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(server_log())
        .spawn()
        .unwrap();
    wait_for_admin_socket(dir);
    BinaryServer {
        child,
        session,
        message,
    }
}

/// Where a spawned server's log goes: nowhere, or to the test's standard
/// error with `CSM_TEST_SERVER_LOG=1` (for looking into a failing test).
pub fn server_log() -> std::process::Stdio {
    match std::env::var_os("CSM_TEST_SERVER_LOG") {
        Some(_) => std::process::Stdio::inherit(),
        None => std::process::Stdio::null(),
    }
}

/// Waits until the admin socket of a server on `dir` answers (a killed
/// server leaves its socket file behind, so existence is not enough).
pub fn wait_for_admin_socket(dir: &Path) {
    let started = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(dir.join("admin.sock")).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Appends `serve` on `dir` at the given addresses to `command` (the
/// binary, or a wrapper such as strace with the binary after it), starts
/// it, and returns once its admin socket answers.
pub fn serve_at(
    mut command: std::process::Command,
    dir: &Path,
    session: SocketAddr,
    message: SocketAddr,
) -> std::process::Child {
    let child = command
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--session-addr", &session.to_string()])
        .args(["--message-addr", &message.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start csm serve");
    wait_for_admin_socket(dir);
    child
}

impl BinaryServer {
    pub fn kill(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Signs on alice and bob; bob watches alice; returns (alice, bob).
pub async fn pair(server: &TestServer) -> (SessionClient, SessionClient) {
    for user in ["alice", "bob"] {
        server.add_user(user, &password_of(user));
    }
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;
    let mut alice = server.login("alice").await;
    read_sign_on(&mut alice, 2, 0).await;
    assert_eq!(next_status(&mut bob).await.0, "alice");
    (alice, bob)
}
