//! The admin requests and replies, shared by the admin client, the server's
//! admin socket and the offline mode: one JSON object per line each way.

use base64::Engine;
use csm_actors::mailbox::{MailboxItem, MailboxStats};
use csm_actors::messages::Fetched;
use csm_actors::proto::data::{DataLimits, MessageData};
use csm_actors::proto::names::{valid_password, valid_username};
use csm_actors::proto::Status;
use serde::{Deserialize, Serialize};

/// Longest request or reply line on the admin socket (a 16 MiB message
/// with its attachments in base64 fits).
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// One admin operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    UserAdd {
        name: String,
        password: String,
    },
    UserRemove {
        name: String,
    },
    UserPasswd {
        name: String,
        password: String,
    },
    UserList,
    MailboxList {
        user: Option<String>,
    },
    MailboxShow {
        user: String,
        id: String,
        with_data: bool,
    },
    MailboxDelete {
        user: String,
        id: String,
    },
    MailboxPurge {
        user: String,
        older_than_secs: Option<u64>,
    },
    MailboxStats,
    Sessions,
    /// Copy the store (and the TLS files) into a new directory `dir`,
    /// which then works as a data directory.
    Backup {
        dir: String,
    },
}

/// How an operation failed; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The thing named does not exist.
    NotFound,
    /// The request cannot be done as asked (exists already, bad name…).
    Refused,
    /// The server or store failed.
    Internal,
    /// Every password check was taken for the configured wait: the same
    /// request may succeed later.
    Busy,
}

/// A failed operation.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn refused(message: impl Into<String>) -> Failure {
        Failure {
            kind: FailureKind::Refused,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Failure {
        Failure {
            kind: FailureKind::NotFound,
            message: message.into(),
        }
    }

    /// A mailbox error as the admin reports it.
    pub fn from_stream(e: csm_actors::proto::lines::StreamError) -> Failure {
        match e.code {
            csm_actors::proto::lines::ErrorCode::NoSuchMessage => Failure::not_found(e.text),
            _ => Failure::internal(e),
        }
    }

    /// A password hashing error as the admin reports it: a full pool is
    /// the server's busy answer, as a login gets it, not an internal error.
    pub fn from_auth(e: csm_actors::auth::AuthError) -> Failure {
        match e {
            csm_actors::auth::AuthError::Busy => Failure {
                kind: FailureKind::Busy,
                message: csm_actors::services::SERVER_BUSY.to_owned(),
            },
            e => Failure::internal(e),
        }
    }

    pub fn internal(message: impl std::fmt::Display) -> Failure {
        Failure {
            kind: FailureKind::Internal,
            message: message.to_string(),
        }
    }
}

/// One row of `user list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    pub name: String,
    /// Present when a server is running: ONLINE, IDLE or OFFLINE.
    pub status: Option<Status>,
    pub idle_secs: Option<u64>,
    pub sessions: usize,
}

/// One row of `sessions`: one open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    pub user: String,
    pub status: Status,
    pub idle_secs: Option<u64>,
    /// The user's open sessions, this one included.
    pub session_count: usize,
    pub peer: String,
    pub connected_unix: u64,
    /// The node serving the session, when several share a database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One attachment of a shown message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub name: String,
    pub size: u64,
    /// The bytes in standard base64, when asked for.
    pub data_base64: Option<String>,
}

/// A shown message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: u64,
    pub stored_unix: u64,
    /// The text, decoded from modified UTF-8 (a lone surrogate shows as U+FFFD).
    pub text: String,
    pub attachments: Vec<AttachmentView>,
}

impl MessageView {
    /// Decodes a stored message for display.
    pub fn new(fetched: Fetched, with_data: bool) -> Result<MessageView, Failure> {
        let limits = DataLimits {
            max_bytes: usize::MAX,
            max_attachments: usize::MAX,
        };
        let bytes = fetched
            .data
            .into_bytes()
            .map_err(|e| Failure::internal(format!("reading the stored data: {e}")))?;
        let data = MessageData::parse(&bytes, limits)
            .map_err(|e| Failure::internal(format!("stored data does not parse: {e}")))?;
        let engine = base64::engine::general_purpose::STANDARD;
        Ok(MessageView {
            id: fetched.header.id,
            sender: fetched.header.sender,
            recipients: fetched.header.recipients,
            size: fetched.header.size,
            stored_unix: fetched.header.stored_unix,
            text: data.text(),
            attachments: data
                .attachments
                .iter()
                .map(|a| AttachmentView {
                    name: a.name(),
                    size: a.data.len() as u64,
                    data_base64: with_data.then(|| engine.encode(&a.data)),
                })
                .collect(),
        })
    }
}

/// A successful operation's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Done {
        message: String,
    },
    Users {
        live: bool,
        users: Vec<UserRow>,
    },
    Mailbox {
        items: Vec<MailboxItem>,
    },
    Message {
        message: MessageView,
    },
    Stats {
        users: Vec<MailboxStats>,
        total_messages: usize,
        total_bytes: u64,
    },
    Sessions {
        sessions: Vec<SessionRow>,
    },
}

impl Reply {
    pub fn stats(users: Vec<MailboxStats>) -> Reply {
        Reply::Stats {
            total_messages: users.iter().map(|u| u.messages).sum(),
            total_bytes: users.iter().map(|u| u.bytes).sum(),
            users,
        }
    }
}

/// What the socket carries back.
pub type Outcome = Result<Reply, Failure>;

/// Checks a new user's name and password.
pub fn check_new_user(name: &str, password: &str) -> Result<(), Failure> {
    if !valid_username(name) {
        return Err(Failure::refused(format!(
            "invalid username {name:?}: 1-64 characters from A-Z a-z 0-9 . _ -"
        )));
    }
    check_password(password)
}

/// Checks a password.
pub fn check_password(password: &str) -> Result<(), Failure> {
    if !valid_password(password) {
        return Err(Failure::refused(
            "invalid password: 1-1024 bytes, no CR or LF",
        ));
    }
    Ok(())
}

/// Prepares a backup: `dir` must be absolute and must not exist yet.
/// Returns where the store copy goes.
pub fn backup_target(dir: &str) -> Result<std::path::PathBuf, Failure> {
    let dir = std::path::Path::new(dir);
    if !dir.is_absolute() {
        return Err(Failure::refused(
            "the backup directory must be an absolute path",
        ));
    }
    if dir.exists() {
        return Err(Failure::refused(format!(
            "{} already exists; give a new directory",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::internal(format!("creating {}: {e}", dir.display())))?;
    Ok(crate::config::store_dir(dir))
}

/// Copies the TLS files of `data_dir` (if any) next to a backup's store.
pub fn backup_tls(data_dir: &std::path::Path, backup: &str) -> Result<(), Failure> {
    let (cert, key) = crate::tls::dev_cert_paths(data_dir);
    let (to_cert, to_key) = crate::tls::dev_cert_paths(std::path::Path::new(backup));
    if cert.exists() && key.exists() {
        let copy = |from: &std::path::Path, to: &std::path::Path| {
            std::fs::copy(from, to)
                .map_err(|e| Failure::internal(format!("copying {}: {e}", from.display())))
        };
        if let Some(parent) = to_cert.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Failure::internal(e.to_string()))?;
        }
        copy(&cert, &to_cert)?;
        copy(&key, &to_key)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&to_key, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// The cutoff time for "older than `secs`".
pub fn cutoff(older_than_secs: Option<u64>) -> Option<u64> {
    older_than_secs.map(|secs| csm_actors::store::unix_now().saturating_sub(secs))
}
