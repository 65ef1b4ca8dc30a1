//! `csm admin`: manage users against a running server (through the admin
//! socket in the data directory) or, when none runs, directly on the store.

pub mod direct;
pub mod offline;
pub mod output;
pub mod protocol;
pub mod socket;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::config::{admin_socket, DEFAULT_DATA_DIR};
use protocol::{Failure, FailureKind, Outcome, Reply, Request, MAX_LINE};

/// `csm admin` and its options.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The server's data directory.
    #[arg(long, default_value = DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The PostgreSQL database of a cluster: used directly when no server
    /// answers on the data directory's admin socket.
    #[arg(long, value_name = "URL", env = "CSM_STORE_URL", global = true)]
    pub store_url: Option<String>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect and clean mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Open sessions: user, status, idle time, peer, connected since.
    Sessions,
    /// Write a consistent copy of the store (and TLS files) into a new
    /// directory, which then serves as a data directory.
    Backup { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is prompted for, or read from stdin.
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a user and their mailbox; their sessions close.
    Remove { name: String },
    /// Change a user's password; cached credentials are dropped at once.
    Passwd {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users, with presence when the server runs.
    List,
}

#[derive(Debug, Subcommand)]
pub enum MailboxCommand {
    /// Messages waiting, for one user or all.
    List { user: Option<String> },
    /// One message: its text and attachments.
    Show {
        user: String,
        id: String,
        /// Write the attachments into this directory (names made safe).
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
    },
    /// Delete one message from a user's mailbox.
    Delete { user: String, id: String },
    /// Delete a user's messages, all or those older than a duration (`7d`, `12h`).
    Purge {
        user: String,
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        older_than: Option<Duration>,
    },
    /// Messages and bytes per user and in total.
    Stats,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 90s, 30m, 12h, 7d)"))
}

/// Runs one admin command; exit 0 done, 1 not found or refused.
pub fn run(args: AdminArgs) -> ExitCode {
    let request = match build_request(&args.command) {
        Ok(request) => request,
        Err(message) => {
            eprintln!("csm admin: {message}");
            return ExitCode::from(2);
        }
    };
    match execute_on(&args.data_dir, args.store_url.as_deref(), request) {
        Ok(reply) => {
            if let (
                AdminCommand::Mailbox(MailboxCommand::Show {
                    save: Some(dir), ..
                }),
                Reply::Message { message },
            ) = (&args.command, &reply)
            {
                if let Err(e) = output::save_attachments(message, dir, args.json) {
                    eprintln!("csm admin: saving attachments: {e}");
                    return ExitCode::from(1);
                }
            }
            output::print_reply(&reply, args.json);
            ExitCode::SUCCESS
        }
        Err(failure) => {
            if args.json {
                println!("{}", serde_json::json!({ "error": failure }));
            }
            eprintln!("csm admin: {}", failure.message);
            ExitCode::from(1)
        }
    }
}

fn read_password(name: &str, from_stdin: bool) -> Result<String, String> {
    if from_stdin {
        return crate::password::from_stdin();
    }
    let hint = "use --password-stdin";
    let first = crate::password::prompt(&format!("password for {name}: "), hint)?;
    let again = crate::password::prompt("again: ", hint)?;
    if first != again {
        return Err("the passwords differ".into());
    }
    Ok(first)
}

fn build_request(command: &AdminCommand) -> Result<Request, String> {
    Ok(match command {
        AdminCommand::User(UserCommand::Add {
            name,
            password_stdin,
        }) => Request::UserAdd {
            name: name.clone(),
            password: read_password(name, *password_stdin)?,
        },
        AdminCommand::User(UserCommand::Remove { name }) => {
            Request::UserRemove { name: name.clone() }
        }
        AdminCommand::User(UserCommand::Passwd {
            name,
            password_stdin,
        }) => Request::UserPasswd {
            name: name.clone(),
            password: read_password(name, *password_stdin)?,
        },
        AdminCommand::User(UserCommand::List) => Request::UserList,
        AdminCommand::Mailbox(MailboxCommand::List { user }) => {
            Request::MailboxList { user: user.clone() }
        }
        AdminCommand::Mailbox(MailboxCommand::Show { user, id, save }) => Request::MailboxShow {
            user: user.clone(),
            id: id.clone(),
            with_data: save.is_some(),
        },
        AdminCommand::Mailbox(MailboxCommand::Delete { user, id }) => Request::MailboxDelete {
            user: user.clone(),
            id: id.clone(),
        },
        AdminCommand::Mailbox(MailboxCommand::Purge { user, older_than }) => {
            Request::MailboxPurge {
                user: user.clone(),
                older_than_secs: older_than.map(|d| d.as_secs()),
            }
        }
        AdminCommand::Mailbox(MailboxCommand::Stats) => Request::MailboxStats,
        AdminCommand::Sessions => Request::Sessions,
        AdminCommand::Backup { dir } => {
            let dir = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Request::Backup {
                dir: dir.display().to_string(),
            }
        }
    })
}

/// Sends `request` to the running server, or runs it on the store when no
/// server answers.
pub fn execute(data_dir: &Path, request: Request) -> Outcome {
    execute_on(data_dir, None, request)
}

/// Sends `request` to the server running on `data_dir`, or when none
/// answers runs it on the PostgreSQL database at `store_url` if given, or
/// on the embedded store in `data_dir`.
pub fn execute_on(data_dir: &Path, store_url: Option<&str>, request: Request) -> Outcome {
    let socket = admin_socket(data_dir);
    match (UnixStream::connect(&socket), store_url) {
        (Ok(stream), _) => over_socket(stream, &request),
        (Err(_), Some(url)) => direct::execute(url, data_dir, request),
        (Err(socket_error), None) => offline::execute(data_dir, request).map_err(|failure| {
            if failure.kind == FailureKind::Internal && offline::is_locked(&failure) {
                Failure::internal(format!(
                    "the store in {} is locked by another process, and no server answers on {} ({socket_error})",
                    data_dir.display(),
                    socket.display()
                ))
            } else {
                failure
            }
        }),
    }
}

fn over_socket(mut stream: UnixStream, request: &Request) -> Outcome {
    let timeout = Some(Duration::from_secs(120));
    let io = |e: std::io::Error| Failure::internal(format!("admin socket: {e}"));
    stream.set_read_timeout(timeout).map_err(io)?;
    stream.set_write_timeout(timeout).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(Failure::internal)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_LINE as u64))
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str::<Outcome>(&answer)
        .map_err(|e| Failure::internal(format!("bad answer from the server: {e}")))?
}
