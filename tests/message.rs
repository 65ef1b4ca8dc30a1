//! The message stream, end to end over TLS: send, receive, `done` both
//! ways, idempotent retries, every error code, and durability across a
//! restart.
//!
//! The suite is in `contract/message.rs` and runs once per backend: on the
//! embedded sled store, and on a PostgreSQL that the tests start
//! themselves (module `postgres`, built when PostgreSQL's programs are
//! installed; CI requires them).

#[macro_use]
mod common;

contract_suite!("message.rs");
