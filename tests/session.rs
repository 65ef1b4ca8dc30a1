//! The session stream, end to end over TLS: sign-on order and contents,
//! presence across users and sessions, and what closes a session.
//!
//! The suite is in `contract/session.rs` and runs once per backend: on the
//! embedded sled store, and on a PostgreSQL that the tests start
//! themselves (module `postgres`, built when PostgreSQL's programs are
//! installed; CI requires them), and once more on sled with the session
//! streams on the network threads rather than with presence.

#[macro_use]
mod common;

contract_suite!("session.rs", also_with_sessions_on_network_threads);
