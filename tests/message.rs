//! The message stream, end to end over TLS: send, receive, `done` both
//! ways, idempotent retries, every error code, and durability across a
//! restart.
//!
//! The suite is in `contract/message.rs` and runs once per backend: on the
//! embedded sled store, and on a PostgreSQL that the tests start
//! themselves (module `postgres`, built when PostgreSQL's programs are
//! installed; CI requires them).

mod common;

/// The constructors the suite calls, bound to one backend.
macro_rules! on_backend {
    ($backend:expr) => {
        use crate::common;
        use std::path::Path;

        const BACKEND: common::Backend = $backend;

        #[allow(dead_code)]
        fn start() -> common::TestServer {
            common::TestServer::start_on(BACKEND, |_| {})
        }

        #[allow(dead_code)]
        fn start_with(tweak: impl FnOnce(&mut csm::config::Config)) -> common::TestServer {
            common::TestServer::start_on(BACKEND, tweak)
        }

        #[allow(dead_code)]
        fn start_in(
            dir: &Path,
            tweak: impl FnOnce(&mut csm::config::Config),
        ) -> common::TestServer {
            common::TestServer::start_in_on(BACKEND, dir, tweak)
        }
    };
}

mod sled {
    on_backend!(common::Backend::Sled);
    include!("contract/message.rs");
}

#[cfg(csm_postgres)]
mod postgres {
    on_backend!(common::Backend::Postgres);
    include!("contract/message.rs");
}

#[cfg(not(csm_postgres))]
#[test]
fn postgres_suite_needs_postgresql_installed() {
    eprintln!(
        "PostgreSQL's server programs were not found when this was built: the suite ran on sled \
         only. Install PostgreSQL (or set CSM_PG_BINDIR) to run it on PostgreSQL too."
    );
}
