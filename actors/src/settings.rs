//! Every limit and timeout of the server, each with its documented default.
//! The configuration file's `[limits]` and `[timeouts]` tables map onto
//! these structs; an unknown key is an error that names it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::data::{DataLimits, DEFAULT_MAX_ATTACHMENTS, DEFAULT_MAX_DATA};
use crate::proto::lines::DEFAULT_LINE_LIMIT;

/// Sizes and counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest session-stream frame body, in bytes.
    pub frame_bytes: usize,
    /// Longest message-stream line, counting every byte before the LF.
    pub line_bytes: usize,
    /// Largest message data, in bytes.
    pub message_bytes: usize,
    /// Most attachments in one message.
    pub attachments: usize,
    /// Most distinct recipients of one message.
    pub recipients: usize,
    /// Most messages waiting in one mailbox.
    pub mailbox_messages: usize,
    /// Most bytes of message data waiting in one mailbox.
    pub mailbox_bytes: u64,
    /// Entries in a session's outbound queue before a non-reading peer is
    /// closed (an entry is one packet or one batch, such as the sign-on list).
    pub session_queue: usize,
    /// Most open connections, both protocols together.
    pub connections: usize,
    /// Most open connections from one source address.
    pub connections_per_address: usize,
    /// Bytes a session's writer gathers into one write.
    pub write_coalesce_bytes: usize,
    /// Idle/NotIdle packets one session may send per second before it is
    /// closed (each one fans out to every other online user).
    pub presence_changes_per_sec: u32,
    /// Free bytes kept on the store's filesystem: a send that would leave
    /// less is answered `unavailable` before anything is written, so that
    /// receives, removals and the store itself keep working on a full disk.
    pub disk_reserve_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes: 64 * 1024,
            line_bytes: DEFAULT_LINE_LIMIT,
            message_bytes: DEFAULT_MAX_DATA,
            attachments: DEFAULT_MAX_ATTACHMENTS,
            recipients: 1000,
            mailbox_messages: 10_000,
            mailbox_bytes: 1 << 30,
            session_queue: 1024,
            connections: 60_000,
            connections_per_address: 4096,
            write_coalesce_bytes: 64 * 1024,
            presence_changes_per_sec: 20,
            disk_reserve_bytes: 64 << 20,
        }
    }
}

impl Limits {
    pub fn data(&self) -> DataLimits {
        DataLimits {
            max_bytes: self.message_bytes,
            max_attachments: self.attachments,
        }
    }
}

/// Waits, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// TLS handshake.
    pub handshake_secs: u64,
    /// From the end of the handshake to a complete `Login` frame.
    pub login_secs: u64,
    /// From the first byte of a session frame to its last.
    pub frame_secs: u64,
    /// One write to a peer (a session's coalesced batch, or a line).
    pub write_secs: u64,
    /// Each read of a message stream must bring bytes within this.
    pub read_secs: u64,
    /// A whole message stream, from handshake to close.
    pub exchange_secs: u64,
    /// How long shutdown waits for message streams in flight.
    pub shutdown_secs: u64,
    /// Idle seconds before TCP keepalive probes start.
    pub keepalive_secs: u64,
    /// How long an accepted message id is remembered for retries.
    pub id_retention_secs: u64,
    /// Under load, microseconds the flusher gathers writers before a flush.
    pub commit_window_micros: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake_secs: 10,
            login_secs: 10,
            frame_secs: 30,
            write_secs: 30,
            read_secs: 30,
            exchange_secs: 600,
            shutdown_secs: 10,
            keepalive_secs: 60,
            id_retention_secs: 24 * 3600,
            commit_window_micros: 1000,
        }
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

impl Timeouts {
    pub fn handshake(&self) -> Duration {
        secs(self.handshake_secs)
    }
    pub fn login(&self) -> Duration {
        secs(self.login_secs)
    }
    pub fn frame(&self) -> Duration {
        secs(self.frame_secs)
    }
    pub fn write(&self) -> Duration {
        secs(self.write_secs)
    }
    pub fn read(&self) -> Duration {
        secs(self.read_secs)
    }
    pub fn exchange(&self) -> Duration {
        secs(self.exchange_secs)
    }
    pub fn shutdown(&self) -> Duration {
        secs(self.shutdown_secs)
    }
    pub fn keepalive(&self) -> Duration {
        secs(self.keepalive_secs)
    }
    pub fn id_retention(&self) -> Duration {
        secs(self.id_retention_secs)
    }
    pub fn commit_window(&self) -> Duration {
        Duration::from_micros(self.commit_window_micros)
    }
}
