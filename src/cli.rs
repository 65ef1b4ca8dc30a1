//! The command line: `csm serve | admin | sim | client`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::admin::AdminArgs;
use crate::client::cmd::ClientArgs;
use crate::config::Overrides;
use crate::sim::SimArgs;

/// Presence and store-and-forward messaging server.
#[derive(Debug, Parser)]
#[command(name = "csm", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Manage users, live through the admin socket or offline on the store.
    Admin(AdminArgs),
    /// Load-test a server with simulated users, and check what it delivers.
    Sim(Box<SimArgs>),
    /// A client: watch presence, send, list and receive messages, chat.
    Client(Box<ClientArgs>),
}

/// `csm serve` options; each overrides the configuration file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./csm-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Session-stream address [default: 0.0.0.0:4710].
    #[arg(long, value_name = "HOST:PORT", env = "CSM_SESSION_ADDR")]
    pub session_addr: Option<String>,
    /// Message-stream address [default: 0.0.0.0:4711].
    #[arg(long, value_name = "HOST:PORT", env = "CSM_MESSAGE_ADDR")]
    pub message_addr: Option<String>,
    /// PEM certificate chain (with --key); without it a self-signed
    /// certificate is created in the data directory.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key (with --cert).
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Keep users and mailboxes in this PostgreSQL database, shared with
    /// every other node given the same URL (store.backend = "postgres").
    #[arg(long, value_name = "URL", env = "CSM_STORE_URL")]
    pub store_url: Option<String>,
    /// This node's name among the nodes sharing the database
    /// [default: host name and session port].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

impl ServeArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            session_addr: self.session_addr.clone(),
            message_addr: self.message_addr.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            metrics_addr: self.metrics_addr.clone(),
            store_url: self.store_url.clone(),
            node: self.node.clone(),
        }
    }
}
