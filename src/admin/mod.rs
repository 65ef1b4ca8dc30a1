//! `csm admin`: manage users against a running server (through the admin
//! socket in the data directory) or, when none runs, directly on the store.

pub mod offline;
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
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
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
    /// List users, with presence when the server runs.
    List,
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
    match execute(&args.data_dir, request) {
        Ok(reply) => {
            print_reply(&reply, args.json);
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

fn build_request(command: &AdminCommand) -> Result<Request, String> {
    match command {
        AdminCommand::User(UserCommand::Add {
            name,
            password_stdin,
        }) => {
            let password = if *password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .take(4096)
                    .read_line(&mut line)
                    .map_err(|e| format!("reading the password from stdin: {e}"))?;
                line.trim_end_matches(['\n', '\r']).to_owned()
            } else {
                let first = rpassword::prompt_password(format!("password for {name}: "))
                    .map_err(|e| format!("reading the password: {e}"))?;
                let again = rpassword::prompt_password("again: ")
                    .map_err(|e| format!("reading the password: {e}"))?;
                if first != again {
                    return Err("the passwords differ".into());
                }
                first
            };
            Ok(Request::UserAdd {
                name: name.clone(),
                password,
            })
        }
        AdminCommand::User(UserCommand::List) => Ok(Request::UserList),
    }
}

/// Sends `request` to the running server, or runs it on the store when no
/// server answers.
pub fn execute(data_dir: &Path, request: Request) -> Outcome {
    let socket = admin_socket(data_dir);
    match UnixStream::connect(&socket) {
        Ok(stream) => over_socket(stream, &request),
        Err(socket_error) => offline::execute(data_dir, request).map_err(|failure| {
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

fn print_reply(reply: &Reply, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(reply).unwrap_or_default()
        );
        return;
    }
    match reply {
        Reply::Done { message } => println!("{message}"),
        Reply::Users { live, users } => {
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        u.status
                            .map_or_else(|| "-".into(), |s| format!("{s:?}").to_uppercase()),
                        u.idle_secs.map_or_else(|| "-".into(), format_secs),
                        if *live {
                            u.sessions.to_string()
                        } else {
                            "-".into()
                        },
                    ]
                })
                .collect();
            print_table(&["USER", "STATUS", "IDLE", "SESSIONS"], &rows);
            if !live {
                println!("(no server running: presence unknown)");
            }
        }
    }
}

/// `90` → `1m30s`.
pub fn format_secs(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// Prints rows under headers, columns aligned.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
