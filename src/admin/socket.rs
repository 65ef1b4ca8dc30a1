//! The server's side of the admin socket: a Unix socket in the data
//! directory, owner-only, taking one request per connection and answering
//! through the running actors, so changes take effect live.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use std::collections::HashMap;

use csm_actors::messages::{
    Backup, DropMailbox, Fetch, ListMailbox, ListOnline, MailboxStatsRequest, Purge, Remove,
    UserAdded, UserPresence, UserRemoved,
};
use csm_actors::proto::lines::read_line;
use csm_actors::proto::Status;
use csm_actors::services::Services;
use csm_actors::store::{unix_now, StoreError, UserRecord};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::protocol::{
    backup_target, backup_tls, check_new_user, check_password, cutoff, Failure, MessageView,
    Outcome, Reply, Request, SessionRow, UserRow, MAX_LINE,
};

/// How long one admin connection may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The listening admin socket.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    services: Arc<Services>,
}

impl AdminSocket {
    /// Binds the socket at `path` (replacing a stale one) with mode 0600.
    pub fn bind(path: &Path, services: Arc<Services>) -> Result<AdminSocket> {
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale admin socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the admin socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        log::info!("admin socket listening on {}", path.display());
        Ok(AdminSocket {
            listener,
            path: path.to_owned(),
            services,
        })
    }

    /// Serves admin connections until `stop` turns true.
    pub async fn serve(self, mut stop: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                _ = stop.changed() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let services = self.services.clone();
                    let data_dir = self.path.parent().map(Path::to_owned).unwrap_or_default();
                    actix_rt::spawn(async move {
                        if tokio::time::timeout(ADMIN_TIMEOUT, handle(stream, services, data_dir))
                            .await
                            .is_err()
                        {
                            log::warn!("admin connection timed out");
                        }
                    });
                }
                Err(e) => {
                    log::warn!("admin socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        log::debug!("admin socket {} closed", self.path.display());
    }
}

async fn handle(stream: UnixStream, services: Arc<Services>, data_dir: PathBuf) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let outcome: Outcome = match read_line(&mut reader, MAX_LINE).await {
        Ok(line) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => execute(request, &services, &data_dir).await,
            Err(e) => Err(Failure::refused(format!("bad request: {e}"))),
        },
        Err(e) => Err(Failure::refused(format!("bad request line: {e}"))),
    };
    let mut line = serde_json::to_vec(&outcome).unwrap_or_else(|e| {
        format!("{{\"Err\":{{\"kind\":\"internal\",\"message\":\"{e}\"}}}}").into_bytes()
    });
    line.push(b'\n');
    let _ = writer.write_all(&line).await;
    let _ = writer.shutdown().await;
}

pub async fn execute(request: Request, services: &Services, data_dir: &Path) -> Outcome {
    let mailbox = &services.mailbox;
    let unreachable = |e: actix::MailboxError| Failure::internal(format!("mailbox actor: {e}"));
    match request {
        Request::UserAdd { name, password } => {
            check_new_user(&name, &password)?;
            // Refuse a taken name before paying for a hash.
            if services
                .users
                .get_user(&name)
                .await
                .map_err(Failure::internal)?
                .is_some()
            {
                return Err(Failure::refused(format!("user {name} already exists")));
            }
            let hash = services
                .auth
                .hash(&password)
                .await
                .map_err(Failure::from_auth)?;
            let record = UserRecord {
                password_hash: hash,
                created_unix: unix_now(),
            };
            match services.users.add_user(&name, &record).await {
                Ok(()) => {}
                Err(StoreError::UserExists(_)) => {
                    return Err(Failure::refused(format!("user {name} already exists")))
                }
                Err(e) => return Err(Failure::internal(e)),
            }
            services.presence.do_send(UserAdded { user: name.clone() });
            log::info!("admin: user {name} added");
            done(format!("user {name} added"))
        }
        Request::UserRemove { name } => {
            let Some(with_user) = services
                .users
                .remove_user(&name)
                .await
                .map_err(Failure::internal)?
            else {
                return Err(Failure::not_found(format!("no user {name}")));
            };
            services.auth.forget(&name);
            services
                .presence
                .do_send(UserRemoved { user: name.clone() });
            // The user is gone first, so a send that checked the name
            // before cannot store after the mailbox is dropped: the mailbox
            // checks each recipient again.
            let dropped = with_user
                + mailbox
                    .send(DropMailbox { user: name.clone() })
                    .await
                    .map_err(unreachable)?
                    .map_err(Failure::from_stream)?;
            metrics::counter!(csm_actors::metrics::MESSAGES_DELETED).increment(dropped as u64);
            log::info!("admin: user {name} removed with {dropped} waiting messages");
            done(format!(
                "user {name} removed ({dropped} waiting messages deleted)"
            ))
        }
        Request::UserPasswd { name, password } => {
            check_password(&password)?;
            let Some(mut record) = services
                .users
                .get_user(&name)
                .await
                .map_err(Failure::internal)?
            else {
                return Err(Failure::not_found(format!("no user {name}")));
            };
            record.password_hash = services
                .auth
                .hash(&password)
                .await
                .map_err(Failure::from_auth)?;
            if !services
                .users
                .update_user(&name, &record)
                .await
                .map_err(Failure::internal)?
            {
                return Err(Failure::not_found(format!("no user {name}")));
            }
            services.auth.forget(&name);
            log::info!("admin: password of {name} changed");
            done(format!("password of {name} changed"))
        }
        Request::UserList => {
            let names = services
                .users
                .list_users()
                .await
                .map_err(Failure::internal)?;
            let online = online_users(services).await?;
            let mut online: HashMap<_, _> =
                online.into_iter().map(|p| (p.user.clone(), p)).collect();
            let users = names
                .into_iter()
                .map(|name| match online.remove(&name) {
                    Some(p) => UserRow {
                        name,
                        status: Some(p.status),
                        idle_secs: p.idle_secs,
                        sessions: p.sessions.len(),
                    },
                    None => UserRow {
                        name,
                        status: Some(Status::Offline),
                        idle_secs: None,
                        sessions: 0,
                    },
                })
                .collect();
            Ok(Reply::Users { live: true, users })
        }
        Request::MailboxList { user } => {
            let items = mailbox
                .send(ListMailbox { user })
                .await
                .map_err(unreachable)?
                .map_err(Failure::from_stream)?;
            Ok(Reply::Mailbox { items })
        }
        Request::MailboxShow {
            user,
            id,
            with_data,
        } => {
            let fetched = mailbox
                .send(Fetch { user, id })
                .await
                .map_err(unreachable)?
                .map_err(Failure::from_stream)?;
            Ok(Reply::Message {
                message: MessageView::new(fetched, with_data)?,
            })
        }
        Request::MailboxDelete { user, id } => {
            let removed = mailbox
                .send(Remove {
                    user: user.clone(),
                    id: id.clone(),
                })
                .await
                .map_err(unreachable)?
                .map_err(Failure::from_stream)?;
            if !removed {
                return Err(Failure::not_found(format!(
                    "no message {id} in the mailbox of {user}"
                )));
            }
            metrics::counter!(csm_actors::metrics::MESSAGES_DELETED).increment(1);
            log::info!("admin: message {id} deleted from the mailbox of {user}");
            done(format!("message {id} deleted from the mailbox of {user}"))
        }
        Request::MailboxPurge {
            user,
            older_than_secs,
        } => {
            let purged = mailbox
                .send(Purge {
                    user: user.clone(),
                    older_than_unix: cutoff(older_than_secs),
                })
                .await
                .map_err(unreachable)?
                .map_err(Failure::from_stream)?;
            metrics::counter!(csm_actors::metrics::MESSAGES_DELETED).increment(purged as u64);
            log::info!("admin: {purged} messages purged from the mailbox of {user}");
            done(format!(
                "{purged} messages purged from the mailbox of {user}"
            ))
        }
        Request::MailboxStats => {
            let stats = mailbox
                .send(MailboxStatsRequest)
                .await
                .map_err(unreachable)?;
            Ok(Reply::stats(stats))
        }
        Request::Backup { dir } => {
            let target = backup_target(&dir)?;
            mailbox
                .send(Backup { dir: target })
                .await
                .map_err(unreachable)?
                .map_err(Failure::from_stream)?;
            backup_tls(data_dir, &dir)?;
            log::info!("admin: store backed up to {dir}");
            done(format!("backup written to {dir}"))
        }
        Request::Sessions => {
            let online = online_users(services).await?;
            let sessions = online
                .into_iter()
                .flat_map(|p| {
                    let count = p.sessions.len();
                    p.sessions.into_iter().map(move |s| SessionRow {
                        user: p.user.clone(),
                        status: p.status,
                        idle_secs: p.idle_secs,
                        session_count: count,
                        peer: s.peer,
                        connected_unix: s.connected_unix,
                        node: s.node,
                    })
                })
                .collect();
            Ok(Reply::Sessions { sessions })
        }
    }
}

/// Every signed-on user with their sessions: this server's, or with a
/// shared database every node's.
async fn online_users(services: &Services) -> Result<Vec<UserPresence>, Failure> {
    match &services.shared_db {
        Some(pool) => csm_actors::cluster::cluster_presence(pool)
            .await
            .map_err(Failure::internal),
        None => services
            .presence
            .send(ListOnline)
            .await
            .map_err(Failure::internal),
    }
}

fn done(message: String) -> Outcome {
    Ok(Reply::Done { message })
}
