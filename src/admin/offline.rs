//! The admin operations run directly on the store, when no server runs.

use std::path::Path;

use csm_actors::auth::hash_password;
use csm_actors::store::{unix_now, SledStore, Store, StoreError, UserRecord};

use super::protocol::{check_new_user, Failure, Outcome, Reply, Request, UserRow};
use crate::config::store_dir;

const LOCKED_MARK: &str = "store is locked";

/// True when the failure says another process holds the store.
pub fn is_locked(failure: &Failure) -> bool {
    failure.message.contains(LOCKED_MARK)
}

fn open(data_dir: &Path) -> Result<SledStore, Failure> {
    let dir = store_dir(data_dir);
    SledStore::open(&dir).map_err(|e| {
        if e.is_locked() {
            Failure::internal(format!("{LOCKED_MARK}: {e}"))
        } else {
            Failure::internal(format!("opening the store in {}: {e}", dir.display()))
        }
    })
}

/// Runs `request` on the store in `data_dir`.
pub fn execute(data_dir: &Path, request: Request) -> Outcome {
    match request {
        Request::UserAdd { name, password } => {
            check_new_user(&name, &password)?;
            let store = open(data_dir)?;
            let hash = hash_password(&password).map_err(Failure::internal)?;
            let record = UserRecord {
                password_hash: hash,
                created_unix: unix_now(),
            };
            match store.add_user(&name, &record) {
                Ok(()) => {}
                Err(StoreError::UserExists(_)) => {
                    return Err(Failure::refused(format!("user {name} already exists")))
                }
                Err(e) => return Err(Failure::internal(e)),
            }
            store.flush().map_err(Failure::internal)?;
            Ok(Reply::Done {
                message: format!("user {name} added"),
            })
        }
        Request::UserList => {
            let store = open(data_dir)?;
            let users = store
                .list_users()
                .map_err(Failure::internal)?
                .into_iter()
                .map(|name| UserRow {
                    name,
                    status: None,
                    idle_secs: None,
                    sessions: 0,
                })
                .collect();
            Ok(Reply::Users { live: false, users })
        }
    }
}
