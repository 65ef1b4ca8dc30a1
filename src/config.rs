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
        if l.presence_changes_per_sec == 0 {
            bail!("limits.presence_changes_per_sec must be at least 1");
        }
        if l.frame_bytes > u32::MAX as usize {
            bail!("limits.frame_bytes must fit in the 4-byte length prefix");
        }
        if l.message_bytes > i32::MAX as usize {
            bail!("limits.message_bytes must be below 2 GiB");
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
        for key in ["cert", "key", "metrics_addr"] {
            assert!(
                text.contains(&format!("# {key} = ")),
                "{key} missing from csm.example.toml"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[limits]\nframe_byte = 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("frame_byte"), "{err:#}");
    }
}
