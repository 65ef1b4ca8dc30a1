//! `csm client`: try csm, script it and chat with it from a terminal. Each
//! subcommand is a thin layer over the client library in `crate::client`
//! (the one the simulator and the tests use): this module holds the
//! command line, where the server and the password come from, and how
//! failures read.

mod chat;
mod events;
mod inbox;
mod send;
mod watch;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::{Args, Subcommand};
use rustls_pki_types::ServerName;

use super::{ClientError, Connector, SessionClient};
use crate::config::DEFAULT_DATA_DIR;

/// `csm client` and its options shared by every subcommand.
#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// Where the server is, how to trust it, and where the password comes from.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server host name or address.
    #[arg(long, global = true, env = "CSM_SERVER", default_value = "localhost")]
    pub server: String,
    /// The server's session-stream port.
    #[arg(long, global = true, env = "CSM_SESSION_PORT", default_value_t = 4710)]
    pub session_port: u16,
    /// The server's message-stream port.
    #[arg(long, global = true, env = "CSM_MESSAGE_PORT", default_value_t = 4711)]
    pub message_port: u16,
    /// Trust the CA certificates in this PEM file; the server's certificate
    /// must name --server.
    #[arg(
        long,
        global = true,
        value_name = "PEM",
        conflicts_with = "fingerprint"
    )]
    pub ca: Option<PathBuf>,
    /// Trust only the certificate with this SHA-256 fingerprint, as the
    /// server logs it at start (colons optional).
    #[arg(long, global = true, value_name = "SHA256", env = "CSM_FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// Without --ca or --fingerprint, trust the certificate a server on
    /// this machine made in its data directory [default: ./csm-data].
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read the password from the first line of standard input (otherwise
    /// from CSM_PASSWORD, otherwise a prompt).
    #[arg(long, global = true)]
    pub password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Sign on and print presence and message notices as they come.
    Watch {
        user: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Also receive each message as it is announced, save it under DIR
        /// and only then acknowledge it.
        #[arg(long, value_name = "DIR")]
        receive: Option<PathBuf>,
    },
    /// Send a message; prints its id once the server has it on disk.
    Send {
        user: String,
        /// A recipient (repeat for several).
        #[arg(long = "to", value_name = "USER", required = true)]
        to: Vec<String>,
        /// The text of the message.
        #[arg(long, conflicts_with = "text_file")]
        text: Option<String>,
        /// Read the text from this file.
        #[arg(long, value_name = "FILE")]
        text_file: Option<PathBuf>,
        /// Attach a file, under its file name (repeat for several).
        #[arg(long, value_name = "FILE")]
        attach: Vec<PathBuf>,
        /// The message id [default: a new unique one]; sending again with
        /// the same id stores it once.
        #[arg(long)]
        id: Option<String>,
        /// How many times to try again, with the same id, when the
        /// connection fails or the server is unavailable.
        #[arg(long, default_value_t = 5)]
        retries: u32,
    },
    /// List the messages waiting for USER.
    Inbox {
        user: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// How long the sign-on list must be quiet to be complete.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Receive a waiting message (or every one), acknowledging each only
    /// after it is kept: printed, or saved with --save.
    Receive {
        user: String,
        /// The message id [default: every waiting message].
        id: Option<String>,
        /// Save each message in a directory of its own under DIR (needed
        /// for messages with attachments).
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
        /// One JSON object per message instead of text.
        #[arg(long)]
        json: bool,
        /// How long the sign-on list must be quiet to be complete.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// An interactive terminal view: users with live presence, and a
    /// conversation with one of them.
    Chat {
        user: String,
        /// Tell the others you are idle after this long without a key.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        idle_after: Duration,
        /// Save messages with attachments under DIR (without it they stay
        /// in the mailbox, for `csm client receive --save`).
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
    },
}

/// Runs a `csm client` command; 0 on success, 1 with one line on standard
/// error on failure.
pub fn run(args: ClientArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("csm client: starting: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("csm client: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(args: ClientArgs) -> Result<(), String> {
    let server = Server::resolve(&args.server).await?;
    let user = args.command.user();
    let account = Account::new(user, password(&args.server, user)?)?;
    match args.command {
        ClientCommand::Watch { json, receive, .. } => {
            watch::run(&server, &account, json, receive).await
        }
        ClientCommand::Send {
            to,
            text,
            text_file,
            attach,
            id,
            retries,
            ..
        } => {
            let message = send::compose(text, text_file, &attach, args.server.password_stdin)?;
            send::run(&server, &account, &to, &message, id, retries).await
        }
        ClientCommand::Inbox { json, wait, .. } => inbox::list(&server, &account, json, wait).await,
        ClientCommand::Receive {
            id,
            save,
            json,
            wait,
            ..
        } => inbox::receive(&server, &account, id, save, json, wait).await,
        ClientCommand::Chat {
            idle_after, save, ..
        } => chat::run(server, account, idle_after, save).await,
    }
}

impl ClientCommand {
    /// The user every subcommand signs on as.
    fn user(&self) -> &str {
        match self {
            ClientCommand::Watch { user, .. }
            | ClientCommand::Send { user, .. }
            | ClientCommand::Inbox { user, .. }
            | ClientCommand::Receive { user, .. }
            | ClientCommand::Chat { user, .. } => user,
        }
    }
}

fn password(args: &ServerArgs, user: &str) -> Result<String, String> {
    if args.password_stdin {
        return crate::password::from_stdin();
    }
    if let Ok(password) = std::env::var("CSM_PASSWORD") {
        return Ok(password);
    }
    crate::password::prompt(
        &format!("password for {user}: "),
        "use --password-stdin or set CSM_PASSWORD",
    )
}

/// Who is signing on.
#[derive(Debug, Clone)]
pub struct Account {
    pub user: String,
    pub password: String,
}

impl Account {
    fn new(user: &str, password: String) -> Result<Account, String> {
        if !csm_actors::proto::names::valid_username(user) {
            return Err(format!(
                "{user:?} is not a username (1-64 of A-Z a-z 0-9 . _ -)"
            ));
        }
        Ok(Account {
            user: user.to_owned(),
            password,
        })
    }
}

/// The server: its addresses for both protocols and how to trust it.
pub struct Server {
    host: String,
    connector: Connector,
    session: Endpoint,
    message: Endpoint,
}

impl Server {
    async fn resolve(args: &ServerArgs) -> Result<Server, String> {
        let config = if let Some(ca) = &args.ca {
            crate::tls::ca_client_config(ca).map_err(|e| format!("{e:#}"))?
        } else if let Some(fingerprint) = &args.fingerprint {
            crate::tls::fingerprint_client_config(fingerprint).map_err(|e| format!("{e:#}"))?
        } else {
            let data_dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            let (cert, _) = crate::tls::dev_cert_paths(&data_dir);
            if !cert.exists() {
                return Err(format!(
                    "no certificate to trust: give --fingerprint (the server logs it at start) \
                     or --ca FILE, or --data-dir of a server on this machine ({} does not exist)",
                    cert.display()
                ));
            }
            crate::tls::pinned_client_config_from_pem(&cert).map_err(|e| format!("{e:#}"))?
        };
        let name = ServerName::try_from(args.server.clone())
            .map_err(|_| format!("{:?} is not a host name or address", args.server))?;
        Ok(Server {
            host: args.server.clone(),
            connector: Connector::named(config, name),
            session: Endpoint::resolve(&args.server, args.session_port).await?,
            message: Endpoint::resolve(&args.server, args.message_port).await?,
        })
    }

    /// Connects a session stream and signs on.
    pub async fn sign_on(&self, account: &Account) -> Result<SessionClient, String> {
        self.session
            .attempt(|addr| {
                SessionClient::login(&self.connector, addr, &account.user, &account.password)
            })
            .await
            .map_err(|(addr, e)| describe(&e, &self.host, addr))
    }

    /// Runs one message-stream exchange against the message address.
    pub async fn on_message_stream<T, F, Fut>(&self, exchange: F) -> Result<T, String>
    where
        F: Fn(Connector, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        self.on_message_stream_raw(exchange)
            .await
            .map_err(|(addr, e)| describe(&e, &self.host, addr))
    }

    /// [`Server::on_message_stream`], keeping the error for the caller to
    /// judge (a send retries some).
    async fn on_message_stream_raw<T, F, Fut>(
        &self,
        exchange: F,
    ) -> Result<T, (SocketAddr, ClientError)>
    where
        F: Fn(Connector, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        self.message
            .attempt(|addr| exchange(self.connector.clone(), addr))
            .await
    }

    fn describe(&self, (addr, e): &(SocketAddr, ClientError)) -> String {
        describe(e, &self.host, *addr)
    }
}

/// The addresses a host name resolved to, tried in order until one takes
/// the connection; the one that did is tried first from then on (so
/// `localhost` finds a server listening on IPv4 only once, not every time).
struct Endpoint {
    addrs: Vec<SocketAddr>,
    preferred: AtomicUsize,
}

impl Endpoint {
    async fn resolve(host: &str, port: u16) -> Result<Endpoint, String> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{host} has no address"));
        }
        Ok(Endpoint {
            addrs,
            preferred: AtomicUsize::new(0),
        })
    }

    async fn attempt<T, F, Fut>(&self, connect: F) -> Result<T, (SocketAddr, ClientError)>
    where
        F: Fn(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let first = self.preferred.load(Ordering::Relaxed);
        let order = (0..self.addrs.len()).map(|i| (first + i) % self.addrs.len());
        let mut last = None;
        for index in order {
            let addr = self.addrs[index];
            match connect(addr).await {
                Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = Some((addr, ClientError::Io(e)));
                }
                Ok(value) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(e) => return Err((addr, e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            (
                self.addrs[0],
                ClientError::Protocol("no address to connect to".into()),
            )
        }))
    }
}

/// One readable line for a failure.
fn describe(error: &ClientError, host: &str, addr: SocketAddr) -> String {
    match error {
        ClientError::LoginRefused(reason) => format!("login refused: {reason}"),
        ClientError::Refused(refusal) => {
            format!("the server refused: {} ({})", refusal.text, refusal.code)
        }
        ClientError::Timeout(what) => {
            format!("{host} ({addr}) did not answer in time ({what})")
        }
        ClientError::Protocol(what) => format!("{host} ({addr}) broke the protocol: {what}"),
        ClientError::Io(e) => {
            if let Some(tls) = tls_error(e) {
                let why = match tls {
                    rustls::Error::General(why) => why.clone(),
                    other => other.to_string(),
                };
                return format!("cannot trust {host} ({addr}): {why}");
            }
            match e.kind() {
                io::ErrorKind::ConnectionRefused => {
                    format!("cannot connect to {host} ({addr}): connection refused; is the server running?")
                }
                _ => format!("{host} ({addr}): {e}"),
            }
        }
    }
}

/// The TLS refusal inside an i/o error, if that is what it is.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}
