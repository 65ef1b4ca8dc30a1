//! The admin operations run directly on the embedded store, when no server
//! runs: the store is opened in this process with the same actors a server
//! starts on it (`crate::backend`), and the request goes through the same
//! dispatch the admin socket uses, so both answer alike.

use std::path::Path;

use csm_actors::services::Services;
use csm_actors::store::StoreError;

use super::protocol::{Failure, Outcome, Reply, Request, UserRow};
use crate::backend::Opened;
use crate::config::Config;

const LOCKED_MARK: &str = "store is locked";

/// True when the failure says another process holds the store.
pub fn is_locked(failure: &Failure) -> bool {
    failure.message.contains(LOCKED_MARK)
}

/// Runs `request` on the store in `data_dir`, on an actix system of its
/// own (on a thread of its own, so that it may be called from inside
/// another runtime too).
pub fn execute(data_dir: &Path, request: Request) -> Outcome {
    if let Request::Sessions = request {
        return Err(Failure::refused(
            "no server is running, so there are no sessions",
        ));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| actix::System::new().block_on(run(data_dir, request)))
            .join()
            .unwrap_or_else(|_| Err(Failure::internal("the admin thread panicked")))
    })
}

async fn run(data_dir: &Path, request: Request) -> Outcome {
    let mut config = Config {
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    // One password to hash at most: one argon2 thread is enough.
    config.limits.password_checks = 1;
    let opened =
        Opened::open(&config, 0)
            .await
            .map_err(|e| match e.downcast_ref::<StoreError>() {
                Some(store) if store.is_locked() => {
                    Failure::internal(format!("{LOCKED_MARK}: {e:#}"))
                }
                _ => Failure::internal(format!("{e:#}")),
            })?;
    let services = Services::new(
        config.limits.clone(),
        config.timeouts.clone(),
        opened.backing.clone(),
    );
    let outcome = super::socket::execute(request, &services, data_dir).await;
    drop(services);
    opened.close().await;
    outcome.map(without_presence)
}

/// No server runs, so the user list says nothing of presence.
fn without_presence(reply: Reply) -> Reply {
    match reply {
        Reply::Users { users, .. } => Reply::Users {
            live: false,
            users: users
                .into_iter()
                .map(|row| UserRow {
                    status: None,
                    idle_secs: None,
                    sessions: 0,
                    ..row
                })
                .collect(),
        },
        other => other,
    }
}
