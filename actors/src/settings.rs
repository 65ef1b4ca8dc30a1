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
    /// Connections the kernel queues for each listener before the server
    /// accepts them (the kernel may hold fewer: `net.core.somaxconn`).
    /// Past it, a client's connect is dropped and retried a second later.
    pub listen_backlog: u32,
    /// Bytes a session's writer gathers into one write, and the most
    /// encrypted bytes its TLS layer holds before they reach the socket
    /// (the default is one TLS record: a peer that reads slowly holds
    /// about twice this in the server).
    pub write_coalesce_bytes: usize,
    /// Idle/NotIdle packets one session may send per second before it is
    /// closed (each one fans out to every other online user).
    pub presence_changes_per_sec: u32,
    /// Free bytes kept on the store's filesystem: a send that would leave
    /// less is answered `unavailable` before anything is written, so that
    /// receives, removals and the store itself keep working on a full disk.
    pub disk_reserve_bytes: u64,
    /// Writes waiting for a group commit at once; past it a send is
    /// answered `unavailable`.
    pub waiting_commits: usize,
    /// Memory sled may use for its page cache, in bytes.
    pub store_cache_bytes: u64,
    /// Failed logins of one account from one address before answers slow.
    pub login_free_failures: u32,
    /// Failed logins of one account from one address before it is locked
    /// out (for `timeouts.login_lockout_secs`).
    pub login_account_lockout: u32,
    /// Failed logins from one address, any accounts, before the address is
    /// locked out.
    pub login_address_lockout: u32,
    /// Entries each login-throttle table keeps; the oldest make room.
    pub login_throttle_entries: usize,
    /// Password checks (argon2) at once; 0 means one per core.
    pub password_checks: usize,
    /// Threads that run message streams (TLS and one message each), and
    /// session streams if `sessions_on_network_threads`; 0 means one per
    /// core.
    pub network_threads: usize,
    /// Whether session streams run on the network threads too, rather
    /// than on the main thread with presence. On: more sessions before a
    /// thread saturates (every session's TLS and writes are spread), at
    /// the price of waking threads across cores at each sign-on.
    pub sessions_on_network_threads: bool,
    /// Message data held in memory at once over all message streams
    /// (sends being read); at least `message_bytes`.
    pub bytes_in_flight: usize,
    /// Verified credentials remembered, so that a client's many message
    /// streams do not each cost an argon2 run.
    pub credential_cache_entries: usize,
    /// After an error answer, unread input drained (at most this much) so
    /// that the close does not become a reset that hides the error line.
    pub linger_bytes: u64,
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
            listen_backlog: 4096,
            write_coalesce_bytes: 16 * 1024,
            presence_changes_per_sec: 20,
            disk_reserve_bytes: 64 << 20,
            waiting_commits: 65_536,
            store_cache_bytes: 256 << 20,
            login_free_failures: 3,
            login_account_lockout: 10,
            login_address_lockout: 50,
            login_throttle_entries: 100_000,
            password_checks: 0,
            network_threads: 0,
            sessions_on_network_threads: false,
            bytes_in_flight: 256 << 20,
            credential_cache_entries: 100_000,
            linger_bytes: 32 << 20,
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
    /// Under load, milliseconds presence gathers status changes before it
    /// queues them on every session together (0: each at once). A change
    /// after a quiet window goes out at once.
    pub fan_out_window_millis: u64,
    /// Microseconds the fan-out window grows by per session online (up to
    /// one second): each fan-out writes to every session, so with many
    /// sessions they come less often, and under load presence makes at
    /// most one write per session every this many microseconds times the
    /// sessions (0: the window stays as set).
    pub fan_out_micros_per_session: u64,
    /// How long failed logins are remembered, and a lockout lasts.
    pub login_lockout_secs: u64,
    /// Longest delay before answering a failed login, in milliseconds.
    pub login_delay_max_ms: u64,
    /// How long a login waits for a free password check before it is
    /// answered "server busy".
    pub password_check_wait_secs: u64,
    /// After an error answer, how long unread input is drained.
    pub linger_secs: u64,
    /// How long a send waits for room in `limits.bytes_in_flight`.
    pub budget_wait_secs: u64,
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
            fan_out_window_millis: 10,
            fan_out_micros_per_session: 200,
            login_lockout_secs: 15 * 60,
            login_delay_max_ms: 4000,
            password_check_wait_secs: 10,
            linger_secs: 2,
            budget_wait_secs: 10,
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
    pub fn fan_out_window(&self) -> Duration {
        Duration::from_millis(self.fan_out_window_millis)
    }
    pub fn fan_out_per_session(&self) -> Duration {
        Duration::from_micros(self.fan_out_micros_per_session)
    }
    pub fn linger(&self) -> Duration {
        secs(self.linger_secs)
    }
}

impl Limits {
    /// The login throttle these settings describe.
    pub fn throttle(&self, timeouts: &Timeouts) -> crate::throttle::ThrottleSettings {
        crate::throttle::ThrottleSettings {
            free_failures: self.login_free_failures,
            account_lockout: self.login_account_lockout,
            address_lockout: self.login_address_lockout,
            window: secs(timeouts.login_lockout_secs),
            max_delay: Duration::from_millis(timeouts.login_delay_max_ms),
            max_entries: self.login_throttle_entries,
        }
    }

    /// The budget of message bytes in flight these settings describe.
    pub fn byte_budget(&self, timeouts: &Timeouts) -> crate::budget::ByteBudget {
        crate::budget::ByteBudget::new(self.bytes_in_flight, secs(timeouts.budget_wait_secs))
    }

    /// How many threads run connections.
    pub fn network_threads(&self) -> usize {
        match self.network_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// The authenticator these settings describe.
    pub fn auth(&self, timeouts: &Timeouts) -> crate::auth::AuthSettings {
        let defaults = crate::auth::AuthSettings::default();
        crate::auth::AuthSettings {
            parallel_hashes: match self.password_checks {
                0 => defaults.parallel_hashes,
                n => n,
            },
            queue_wait: secs(timeouts.password_check_wait_secs),
            cache_entries: self.credential_cache_entries,
        }
    }
}
