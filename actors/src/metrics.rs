//! The names of the server's metrics, in one place. The server records
//! them through the `metrics` facade; `csm serve --metrics-addr` exposes
//! them for Prometheus. Without an exporter, recording costs next to nothing.

/// Gauge: session streams signed on.
pub const SESSIONS_OPEN: &str = "csm_sessions_open";
/// Gauge: users with at least one session.
pub const USERS_ONLINE: &str = "csm_users_online";
/// Gauge: online users shown idle.
pub const USERS_IDLE: &str = "csm_users_idle";
/// Gauge: threads that have run signed-on sessions, each reached by
/// presence through a fan-out relay of its own: 1 when sessions run with
/// presence, up to `limits.network_threads` with
/// `limits.sessions_on_network_threads`.
pub const SESSION_THREADS: &str = "csm_session_threads";
/// Counter: successful sign-ons.
pub const SIGN_ONS: &str = "csm_sign_ons_total";
/// Counter: refused sign-ons (wrong credentials, busy).
pub const SIGN_ON_FAILURES: &str = "csm_sign_on_failures_total";
/// Counter: messages stored (acknowledged with `done`).
pub const MESSAGES_STORED: &str = "csm_messages_stored_total";
/// Counter: messages received and acknowledged by a recipient.
pub const MESSAGES_DELIVERED: &str = "csm_messages_delivered_total";
/// Counter: mailbox entries deleted by the admin (delete, purge, user removal).
pub const MESSAGES_DELETED: &str = "csm_messages_deleted_total";
/// Gauge: messages waiting, all mailboxes.
pub const MAILBOX_MESSAGES: &str = "csm_mailbox_messages";
/// Gauge: bytes of message data waiting, all mailboxes (counted per mailbox).
pub const MAILBOX_BYTES: &str = "csm_mailbox_bytes";
/// Histogram: seconds per store flush.
pub const FLUSH_SECONDS: &str = "csm_flush_seconds";
/// Histogram: writers served by one flush.
pub const COMMIT_BATCH: &str = "csm_commit_batch_size";
/// Counter: packets queued to sessions by presence fan-out.
pub const FANOUT_PACKETS: &str = "csm_fanout_packets_total";
/// Counter: sessions closed because their peer did not read.
pub const SLOW_READER_CLOSES: &str = "csm_slow_reader_disconnects_total";
/// Counter: TLS handshakes that failed or timed out.
pub const HANDSHAKE_FAILURES: &str = "csm_handshake_failures_total";
/// Counter: TLS handshakes completed, by `kind`: `full`, or `resumed`
/// from a ticket or the session cache (no certificate, no signature). A
/// low share of resumed ones means clients do not keep their tickets.
pub const HANDSHAKES: &str = "csm_tls_handshakes_total";
/// Counter: message streams answered with an error line, by `code`.
pub const STREAM_ERRORS: &str = "csm_message_stream_errors_total";
/// Counter: sends refused because the store's disk is down to its reserve.
pub const SENDS_REFUSED_DISK_LOW: &str = "csm_sends_refused_disk_low_total";
/// Counter: sends refused because the budget of message bytes in flight
/// had no room for them.
pub const SENDS_REFUSED_BUDGET: &str = "csm_sends_refused_budget_total";
/// Gauge: free bytes on the store's filesystem, at each send and every 10 s.
pub const DISK_FREE_BYTES: &str = "csm_disk_free_bytes";
