//! The admin operations run directly on the store, when no server runs.
//! Mailboxes change through the same `Mailboxes` code the server uses.

use std::path::Path;
use std::sync::Arc;

use csm_actors::auth::hash_password;
use csm_actors::mailboxes::{MailboxSettings, Mailboxes};
use csm_actors::store::{unix_now, SledStore, Store, StoreError, UserRecord};

use super::protocol::{
    backup_target, backup_tls, check_new_user, check_password, cutoff, Failure, MessageView,
    Outcome, Reply, Request, UserRow,
};
use crate::config::store_dir;

const LOCKED_MARK: &str = "store is locked";

/// True when the failure says another process holds the store.
pub fn is_locked(failure: &Failure) -> bool {
    failure.message.contains(LOCKED_MARK)
}

fn open(data_dir: &Path) -> Result<Arc<SledStore>, Failure> {
    let dir = store_dir(data_dir);
    SledStore::open(&dir).map(Arc::new).map_err(|e| {
        if e.is_locked() {
            Failure::internal(format!("{LOCKED_MARK}: {e}"))
        } else {
            Failure::internal(format!("opening the store in {}: {e}", dir.display()))
        }
    })
}

fn mailboxes(store: &Arc<SledStore>) -> Result<Mailboxes, Failure> {
    // Quotas do not matter here: the offline admin only reads and deletes.
    Mailboxes::load(store.clone(), MailboxSettings::default()).map_err(Failure::internal)
}

fn flushed(store: &SledStore, message: String) -> Outcome {
    store.flush().map_err(Failure::internal)?;
    Ok(Reply::Done { message })
}

/// Runs `request` on the store in `data_dir`.
pub fn execute(data_dir: &Path, request: Request) -> Outcome {
    let store = match request {
        Request::Sessions => {
            return Err(Failure::refused(
                "no server is running, so there are no sessions",
            ))
        }
        _ => open(data_dir)?,
    };
    match request {
        Request::UserAdd { name, password } => {
            check_new_user(&name, &password)?;
            if store.get_user(&name).map_err(Failure::internal)?.is_some() {
                return Err(Failure::refused(format!("user {name} already exists")));
            }
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
            flushed(&store, format!("user {name} added"))
        }
        Request::UserRemove { name } => {
            if !store.remove_user(&name).map_err(Failure::internal)? {
                return Err(Failure::not_found(format!("no user {name}")));
            }
            let dropped = mailboxes(&store)?
                .purge(&name, None)
                .map_err(Failure::from_stream)?;
            flushed(
                &store,
                format!("user {name} removed ({dropped} waiting messages deleted)"),
            )
        }
        Request::UserPasswd { name, password } => {
            check_password(&password)?;
            let Some(mut record) = store.get_user(&name).map_err(Failure::internal)? else {
                return Err(Failure::not_found(format!("no user {name}")));
            };
            record.password_hash = hash_password(&password).map_err(Failure::internal)?;
            store
                .update_user(&name, &record)
                .map_err(Failure::internal)?;
            flushed(&store, format!("password of {name} changed"))
        }
        Request::UserList => {
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
        Request::MailboxList { user } => {
            let items = mailboxes(&store)?
                .list(user.as_deref())
                .map_err(Failure::from_stream)?;
            Ok(Reply::Mailbox { items })
        }
        Request::MailboxShow {
            user,
            id,
            with_data,
        } => {
            let fetched = mailboxes(&store)?
                .fetch(&user, &id)
                .map_err(Failure::from_stream)?;
            Ok(Reply::Message {
                message: MessageView::new(fetched, with_data)?,
            })
        }
        Request::MailboxDelete { user, id } => {
            if !mailboxes(&store)?
                .remove(&user, &id)
                .map_err(Failure::from_stream)?
            {
                return Err(Failure::not_found(format!(
                    "no message {id} in the mailbox of {user}"
                )));
            }
            flushed(
                &store,
                format!("message {id} deleted from the mailbox of {user}"),
            )
        }
        Request::MailboxPurge {
            user,
            older_than_secs,
        } => {
            let purged = mailboxes(&store)?
                .purge(&user, cutoff(older_than_secs))
                .map_err(Failure::from_stream)?;
            flushed(
                &store,
                format!("{purged} messages purged from the mailbox of {user}"),
            )
        }
        Request::MailboxStats => Ok(Reply::stats(mailboxes(&store)?.stats())),
        Request::Backup { dir } => {
            let target = backup_target(&dir)?;
            store.backup(&target).map_err(Failure::internal)?;
            backup_tls(data_dir, &dir)?;
            Ok(Reply::Done {
                message: format!("backup written to {dir}"),
            })
        }
        Request::Sessions => Err(Failure::refused("no server is running")),
    }
}
