//! Server settings: defaults, then the TOML file (`--config`), then flags.
//! An unknown key in the file is an error that names it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use csm_actors::settings::{Limits, Timeouts};
use serde::{Deserialize, Serialize};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./csm-data";
/// Default session-stream address.
pub const DEFAULT_SESSION_ADDR: &str = "0.0.0.0:4710";
/// Default message-stream address.
pub const DEFAULT_MESSAGE_ADDR: &str = "0.0.0.0:4711";

/// Everything `csm serve` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the store, the development certificate and the admin socket live.
    pub data_dir: PathBuf,
    /// Session-stream listen address.
    pub session_addr: String,
    /// Message-stream listen address.
    pub message_addr: String,
    /// PEM certificate chain; without it a development certificate is used.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Prometheus metrics listen address; off when unset.
    pub metrics_addr: Option<String>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub store: StoreConfig,
}

/// Which database holds users and mailboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded sled database in the data directory (one node).
    #[default]
    Sled,
    /// A PostgreSQL database shared by every node.
    Postgres,
}

/// The `[store]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: Backend,
    /// PostgreSQL URL (`postgres://user:password@host:port/database`).
    pub url: Option<String>,
    /// This node's name among the nodes sharing the database
    /// [default: host name and session port].
    pub node: Option<String>,
    /// Connections to the database.
    pub pool_size: usize,
    /// Tasks that group sends into transactions.
    pub committers: usize,
    /// Seconds a node's lease lasts: a node that stops renewing it (it
    /// renews every third of it) is taken for dead by the others.
    pub lease_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sled,
            url: None,
            node: None,
            pool_size: 12,
            committers: 4,
            lease_secs: 10,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            session_addr: DEFAULT_SESSION_ADDR.to_owned(),
            message_addr: DEFAULT_MESSAGE_ADDR.to_owned(),
            cert: None,
            key: None,
            metrics_addr: None,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            store: StoreConfig::default(),
        }
    }
}

/// Values given on the command line, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub session_addr: Option<String>,
    pub message_addr: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub metrics_addr: Option<String>,
    /// A PostgreSQL URL: implies `store.backend = "postgres"`.
    pub store_url: Option<String>,
    pub node: Option<String>,
}

impl Config {
    /// Parses a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Config> {
        Ok(toml::from_str(text)?)
    }

    /// Defaults, then `file` if given, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Config::from_toml(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(dir) = overrides.data_dir {
            config.data_dir = dir;
        }
        if let Some(addr) = overrides.session_addr {
            config.session_addr = addr;
        }
        if let Some(addr) = overrides.message_addr {
            config.message_addr = addr;
        }
        if let Some(addr) = overrides.metrics_addr {
            config.metrics_addr = Some(addr);
        }
        if let Some(url) = overrides.store_url {
            config.store.backend = Backend::Postgres;
            config.store.url = Some(url);
        }
        if let Some(node) = overrides.node {
            config.store.node = Some(node);
        }
        if overrides.cert.is_some() || overrides.key.is_some() {
            config.cert = overrides.cert;
            config.key = overrides.key;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("--cert and --key go together");
        }
        let l = &self.limits;
        for (name, value) in [
            ("limits.frame_bytes", l.frame_bytes),
            ("limits.line_bytes", l.line_bytes),
            ("limits.message_bytes", l.message_bytes),
            ("limits.recipients", l.recipients),
            ("limits.mailbox_messages", l.mailbox_messages),
            ("limits.session_queue", l.session_queue),
            ("limits.connections", l.connections),
            ("limits.connections_per_address", l.connections_per_address),
            ("limits.write_coalesce_bytes", l.write_coalesce_bytes),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        let store = &self.store;
        if store.backend == Backend::Postgres && store.url.is_none() {
            bail!("store.url (or --store-url) is required with store.backend = \"postgres\"");
        }
        for (name, value) in [
            ("store.pool_size", store.pool_size as u64),
            ("store.committers", store.committers as u64),
            ("store.lease_secs", store.lease_secs),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if store.committers >= store.pool_size {
            bail!("store.committers must be below store.pool_size (the rest serve reads)");
        }
        if let Some(node) = &store.node {
            if node.is_empty() || node.contains(['\t', '\n']) || node.len() > 200 {
                bail!("store.node must be 1-200 characters without tabs or newlines");
            }
        }
        if l.presence_changes_per_sec == 0 {
            bail!("limits.presence_changes_per_sec must be at least 1");
        }
        if l.frame_bytes > u32::MAX as usize {
            bail!("limits.frame_bytes must fit in the 4-byte length prefix");
        }
        if l.message_bytes > i32::MAX as usize {
            bail!("limits.message_bytes must be below 2 GiB");
        }
        if l.bytes_in_flight < l.message_bytes {
            bail!("limits.bytes_in_flight must be at least limits.message_bytes");
        }
        Ok(())
    }

    /// Path of the sled database.
    pub fn store_dir(&self) -> PathBuf {
        store_dir(&self.data_dir)
    }
}

/// Path of the sled database in a data directory.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}

/// Path of the admin socket in a data directory.
pub fn admin_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contracts_defaults_are_the_defaults() {
        let config = Config::default();
        assert_eq!(config.data_dir, PathBuf::from("./csm-data"));
        assert!(config.session_addr.ends_with(":4710"));
        assert!(config.message_addr.ends_with(":4711"));
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn file_sets_limits_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csm.toml");
        std::fs::write(
            &path,
            "session_addr = \"127.0.0.1:1\"\n[limits]\nrecipients = 5\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            Overrides {
                session_addr: Some("127.0.0.1:2".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.limits.recipients, 5);
        assert_eq!(config.session_addr, "127.0.0.1:2");
    }

    #[test]
    fn the_example_file_is_every_default() {
        let text = include_str!("../deploy/csm.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
        // Every setting appears in it, commented or not.
        let defaults = toml::to_string(&Config::default()).unwrap();
        for line in defaults.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(
                text.contains(&format!("{key} = ")),
                "{key} missing from csm.example.toml"
            );
        }
        for key in ["cert", "key", "metrics_addr", "url", "node"] {
            assert!(
                text.contains(&format!("# {key} = ")),
                "{key} missing from csm.example.toml"
            );
        }
    }

    #[test]
    fn a_store_url_chooses_postgres_and_postgres_needs_one() {
        let config = Config::load(
            None,
            Overrides {
                store_url: Some("postgres://db/csm".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.store.backend, Backend::Postgres);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csm.toml");
        std::fs::write(&path, "[store]\nbackend = \"postgres\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("store.url"), "{err:#}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[limits]\nframe_byte = 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("frame_byte"), "{err:#}");
    }
}
