//! The admin requests and replies, shared by the admin client, the server's
//! admin socket and the offline mode: one JSON object per line each way.

use csm_actors::proto::names::{valid_password, valid_username};
use csm_actors::proto::Status;
use serde::{Deserialize, Serialize};

/// Longest request or reply line on the admin socket.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// One admin operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    UserAdd { name: String, password: String },
    UserList,
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

/// A successful operation's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Done { message: String },
    Users { live: bool, users: Vec<UserRow> },
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
    if !valid_password(password) {
        return Err(Failure::refused(
            "invalid password: 1-1024 bytes, no CR or LF",
        ));
    }
    Ok(())
}
