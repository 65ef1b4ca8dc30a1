//! A csm client over the project's own protocol code: TLS connection, the
//! session stream (login, packets) and the message stream (send, receive).
//! The simulator and the integration tests use it; it is also the reference
//! for writing a client. `cmd` is the `csm client` command built on it.

pub mod cmd;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use csm_actors::proto::data::{read_data, DataLimits, ReadDataError};
use csm_actors::proto::frame::{read_frame_into, FrameError};
use csm_actors::proto::lines::{
    read_line, recipients_block, Action, Header, LineError, StreamError, DONE,
};
use csm_actors::proto::packet::{Decoded, PacketError};
use csm_actors::proto::Packet;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// What went wrong on the client side.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("server refused: {0}")]
    Refused(StreamError),
    #[error("login refused: {0}")]
    LoginRefused(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

impl From<PacketError> for ClientError {
    fn from(e: PacketError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

impl From<LineError> for ClientError {
    fn from(e: LineError) -> Self {
        match e {
            LineError::Io(e) => ClientError::Io(e),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// Largest frame the client accepts; the sign-on list of a big server is
/// sent as many frames, each small.
const CLIENT_FRAME_LIMIT: usize = 1 << 20;
/// The largest message the client takes in: well over what a server
/// accepts by default (16 MiB), so that any configured server's messages
/// fit, but not so much that a broken or hostile server can exhaust the
/// client's memory.
pub const RECEIVE_LIMITS: DataLimits = DataLimits {
    max_bytes: 1 << 30,
    max_attachments: 1 << 16,
};
/// How long the client waits on any one step.
const STEP: Duration = Duration::from_secs(30);

/// Opens TLS connections to one server.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    tls: TlsConnector,
    server_name: ServerName<'static>,
}

impl Connector {
    /// Connects to a server named `localhost` (what the development
    /// certificate and the tests' servers are).
    pub fn new(config: Arc<ClientConfig>) -> Connector {
        let localhost = ServerName::try_from("localhost").expect("localhost is a valid name");
        Connector::named(config, localhost)
    }

    /// Checks the certificate against `server_name`: a CA-based
    /// configuration needs the right name; a pinned one accepts its
    /// certificate whatever the name.
    pub fn named(config: Arc<ClientConfig>, server_name: ServerName<'static>) -> Connector {
        Connector {
            tls: TlsConnector::from(config.clone()),
            config,
            server_name,
        }
    }

    /// The same trust with a session cache of its own, as one real client
    /// has: its message streams resume each other's TLS sessions instead of
    /// competing for one shared cache's few tickets.
    pub fn with_own_session_cache(&self) -> Connector {
        let mut config = (*self.config).clone();
        config.resumption = rustls::client::Resumption::in_memory_sessions(32);
        Connector::new(Arc::new(config))
    }

    /// Pinned to the development certificate in a server's data directory.
    pub fn for_data_dir(data_dir: &Path) -> anyhow::Result<Connector> {
        let (cert, _) = crate::tls::dev_cert_paths(data_dir);
        Ok(Connector::new(crate::tls::pinned_client_config_from_pem(
            &cert,
        )?))
    }

    pub async fn connect(&self, addr: SocketAddr) -> Result<TlsStream<TcpStream>, ClientError> {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("TCP connect"))??;
        self.handshake(tcp).await
    }

    /// Connects from a chosen local address (to spread many connections
    /// over 127.0.0.x and so past one address's ephemeral ports).
    pub async fn connect_from(
        &self,
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        let Some(source) = source else {
            return self.connect(addr).await;
        };
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = tokio::time::timeout(STEP, socket.connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("TCP connect"))??;
        self.handshake(tcp).await
    }

    /// TLS over an already connected socket (one bound to a chosen source
    /// address, or with its own buffer sizes).
    pub async fn handshake(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, ClientError> {
        tcp.set_nodelay(true)?;
        tokio::time::timeout(STEP, self.tls.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| ClientError::Timeout("TLS handshake"))?
            .map_err(ClientError::Io)
    }
}

type Tls = TlsStream<TcpStream>;

/// Bytes a session reader takes from TLS at once. Session packets are tens
/// of bytes: read one at a time, each would cost two trips through the
/// split stream's lock and rustls; a burst of presence fills this once.
const SESSION_READ_BUFFER: usize = 8 * 1024;

/// The most a session reader keeps of a frame buffer between frames: a
/// rare larger frame's buffer is dropped once it is decoded.
const KEPT_FRAME_BUFFER: usize = 8 * 1024;

/// The read side of a session stream.
pub struct SessionReader {
    reader: BufReader<ReadHalf<Tls>>,
    /// The body of the frame being read, kept for the next one.
    body: Vec<u8>,
}

impl SessionReader {
    /// The next packet, or `None` when the server closed the stream.
    pub async fn recv(&mut self, wait: Duration) -> Result<Option<Decoded>, ClientError> {
        let read = tokio::time::timeout(
            wait,
            read_frame_into(&mut self.reader, CLIENT_FRAME_LIMIT, STEP, &mut self.body),
        )
        .await
        .map_err(|_| ClientError::Timeout("packet"))?;
        self.decoded(read)
    }

    /// The next packet, waiting as long as it takes (a session may be
    /// silent for hours); a frame once begun must still finish in time.
    /// Saves a timer per packet where a reader has nothing else to do.
    pub async fn recv_unbounded(&mut self) -> Result<Option<Decoded>, ClientError> {
        let read =
            read_frame_into(&mut self.reader, CLIENT_FRAME_LIMIT, STEP, &mut self.body).await;
        self.decoded(read)
    }

    fn decoded(&mut self, read: Result<bool, FrameError>) -> Result<Option<Decoded>, ClientError> {
        let decoded = match read {
            Ok(true) => Packet::decode(&self.body)
                .map(Some)
                .map_err(ClientError::from),
            Ok(false) => Ok(None),
            // A reset after the server's close counts as the close.
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(e.into()),
        };
        // A rare large frame does not stay with the reader.
        if self.body.capacity() > KEPT_FRAME_BUFFER {
            self.body = Vec::new();
        }
        decoded
    }

    /// The next known packet, skipping unknown types as a client must.
    pub async fn next_packet(&mut self, wait: Duration) -> Result<Option<Packet>, ClientError> {
        loop {
            match self.recv(wait).await? {
                Some(Decoded::Known(packet)) => return Ok(Some(packet)),
                Some(Decoded::Unknown(_)) => continue,
                None => return Ok(None),
            }
        }
    }
}

/// The write side of a session stream.
pub struct SessionWriter {
    writer: WriteHalf<Tls>,
}

impl SessionWriter {
    pub async fn send(&mut self, packet: &Packet) -> Result<(), ClientError> {
        self.send_raw(&packet.to_frame()).await
    }

    /// Writes raw bytes, for tests of malformed input.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        tokio::time::timeout(STEP, async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout("write"))??;
        Ok(())
    }

    /// Closes the stream cleanly.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(STEP, self.writer.shutdown()).await;
    }
}

/// One session stream.
pub struct SessionClient {
    reader: SessionReader,
    writer: SessionWriter,
}

impl SessionClient {
    /// Connects and signs on; fails with `LoginRefused` and the reason if the
    /// server says no.
    pub async fn login(
        connector: &Connector,
        addr: SocketAddr,
        username: &str,
        password: &str,
    ) -> Result<SessionClient, ClientError> {
        let client = SessionClient::connect(connector, addr).await?;
        client.sign_on(username, password).await
    }

    /// Sends `Login` and waits for the answer.
    pub async fn sign_on(
        mut self,
        username: &str,
        password: &str,
    ) -> Result<SessionClient, ClientError> {
        self.send(&Packet::Login {
            username: username.to_owned(),
            password: password.to_owned(),
        })
        .await?;
        match self.recv(STEP).await? {
            Some(Decoded::Known(Packet::LoginResponse { ok: true, .. })) => Ok(self),
            Some(Decoded::Known(Packet::LoginResponse { ok: false, reason })) => {
                Err(ClientError::LoginRefused(reason.unwrap_or_default()))
            }
            other => Err(ClientError::Protocol(format!(
                "expected LoginResponse, got {other:?}"
            ))),
        }
    }

    /// Connects without signing on.
    pub async fn connect(
        connector: &Connector,
        addr: SocketAddr,
    ) -> Result<SessionClient, ClientError> {
        Ok(SessionClient::over(connector.connect(addr).await?))
    }

    /// A session over an established TLS stream.
    pub fn over(stream: TlsStream<TcpStream>) -> SessionClient {
        let (reader, writer) = tokio::io::split(stream);
        SessionClient {
            reader: SessionReader {
                reader: BufReader::with_capacity(SESSION_READ_BUFFER, reader),
                body: Vec::new(),
            },
            writer: SessionWriter { writer },
        }
    }

    /// The two sides, to read and write from different tasks.
    pub fn split(self) -> (SessionReader, SessionWriter) {
        (self.reader, self.writer)
    }

    pub async fn send(&mut self, packet: &Packet) -> Result<(), ClientError> {
        self.writer.send(packet).await
    }

    /// Writes raw bytes, for tests of malformed input.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.send_raw(bytes).await
    }

    /// The next packet, or `None` when the server closed the stream.
    pub async fn recv(&mut self, wait: Duration) -> Result<Option<Decoded>, ClientError> {
        self.reader.recv(wait).await
    }

    /// The next known packet, skipping unknown types as a client must.
    pub async fn next_packet(&mut self, wait: Duration) -> Result<Option<Packet>, ClientError> {
        self.reader.next_packet(wait).await
    }

    /// Closes the stream cleanly.
    pub async fn close(self) {
        self.writer.close().await
    }
}

/// A message to send over a message stream.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub id: &'a str,
    pub recipients: &'a [String],
    pub data: &'a [u8],
}

/// Sends one message; `Ok` once the server said `done`.
pub async fn send_message(
    connector: &Connector,
    addr: SocketAddr,
    message: &Outgoing<'_>,
) -> Result<(), ClientError> {
    let stream = connector.connect(addr).await?;
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(reader);
    let mut request = Header {
        username: message.username.to_owned(),
        password: message.password.to_owned(),
        message_id: message.id.to_owned(),
        action: Action::Send,
    }
    .to_lines();
    request.extend_from_slice(&recipients_block(message.recipients));
    // The answer may come before all the data is written (an early error),
    // so write and read at once.
    let write = async {
        writer.write_all(&request).await?;
        writer.write_all(message.data).await?;
        writer.flush().await
    };
    let read = async { read_line(&mut reader, 1024).await };
    let (written, answer) = tokio::time::timeout(STEP * 4, async { tokio::join!(write, read) })
        .await
        .map_err(|_| ClientError::Timeout("send"))?;
    let answer = answer?;
    if answer == "done" {
        written?;
        let _ = writer.shutdown().await;
        return Ok(());
    }
    match StreamError::parse(&answer) {
        Some(error) => Err(ClientError::Refused(error)),
        None => Err(ClientError::Protocol(format!(
            "unexpected answer {answer:?}"
        ))),
    }
}

/// A message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub sender: String,
    pub id: String,
    pub recipients: Vec<String>,
    pub data: Vec<u8>,
}

/// Receives one message and acknowledges it; `Ok` once the server closed
/// the stream after the `done`, which means the removal is durable.
pub async fn receive_message(
    connector: &Connector,
    addr: SocketAddr,
    username: &str,
    password: &str,
    id: &str,
) -> Result<Received, ClientError> {
    fetch_message(connector, addr, username, password, id, true).await
}

/// Receives one message; acknowledges it with `done` only when `ack`.
pub async fn fetch_message(
    connector: &Connector,
    addr: SocketAddr,
    username: &str,
    password: &str,
    id: &str,
    ack: bool,
) -> Result<Received, ClientError> {
    let (received, exchange) = Receiving::open(connector, addr, username, password, id).await?;
    if ack {
        exchange.acknowledge().await?;
    }
    Ok(received)
}

/// A receive whose message has arrived and is not yet acknowledged: the
/// caller keeps the message [`Receiving::open`] handed over (writes it out,
/// shows it) and only then says `done`. Dropping it without
/// [`Receiving::acknowledge`] leaves the message in the mailbox.
pub struct Receiving {
    reader: BufReader<ReadHalf<Tls>>,
    writer: WriteHalf<Tls>,
}

impl Receiving {
    /// Asks for message `id` and reads it whole: the message, and the
    /// exchange that acknowledges it.
    pub async fn open(
        connector: &Connector,
        addr: SocketAddr,
        username: &str,
        password: &str,
        id: &str,
    ) -> Result<(Received, Receiving), ClientError> {
        let stream = connector.connect(addr).await?;
        let (reader, mut writer) = tokio::io::split(stream);
        let mut reader = BufReader::new(reader);
        let request = Header {
            username: username.to_owned(),
            password: password.to_owned(),
            message_id: id.to_owned(),
            action: Action::Receive,
        }
        .to_lines();
        let exchange = async {
            writer.write_all(&request).await?;
            writer.flush().await?;
            read_received(&mut reader).await
        };
        let received = tokio::time::timeout(STEP * 4, exchange)
            .await
            .map_err(|_| ClientError::Timeout("receive"))??;
        Ok((received, Receiving { reader, writer }))
    }

    /// Says `done` and waits for the server's close, which means the
    /// removal is durable.
    pub async fn acknowledge(mut self) -> Result<(), ClientError> {
        let exchange = async {
            self.writer.write_all(DONE).await?;
            self.writer.flush().await?;
            let mut rest = Vec::new();
            match (&mut self.reader).take(4096).read_to_end(&mut rest).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(e.into()),
            }
            if rest.is_empty() {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&rest).trim_end().to_owned();
            Err(match StreamError::parse(&text) {
                Some(error) => ClientError::Refused(error),
                None => ClientError::Protocol(format!("unexpected bytes after done: {text:?}")),
            })
        };
        tokio::time::timeout(STEP * 4, exchange)
            .await
            .map_err(|_| ClientError::Timeout("acknowledge"))?
    }
}

/// Reads the server's answer to a receive: the message in send form.
async fn read_received(reader: &mut BufReader<ReadHalf<Tls>>) -> Result<Received, ClientError> {
    let sender = read_line(reader, 1024).await?;
    if let Some(error) = StreamError::parse(&sender) {
        return Err(ClientError::Refused(error));
    }
    let password_line = read_line(reader, 1024).await?;
    let id = read_line(reader, 1024).await?;
    let action = read_line(reader, 1024).await?;
    if !password_line.is_empty() || action != "send" {
        return Err(ClientError::Protocol(
            "receive answer is not in send form".into(),
        ));
    }
    let mut recipients = Vec::new();
    loop {
        let line = read_line(reader, 1024).await?;
        if line.is_empty() {
            break;
        }
        recipients.push(line);
    }
    if reader.read_u8().await? != b'c' {
        return Err(ClientError::Protocol("missing c before the data".into()));
    }
    let data = read_data(reader, RECEIVE_LIMITS, STEP)
        .await
        .map_err(|e| match e {
            ReadDataError::Io(e) => ClientError::Io(e),
            other => ClientError::Protocol(other.to_string()),
        })?;
    Ok(Received {
        sender,
        id,
        recipients,
        data,
    })
}
