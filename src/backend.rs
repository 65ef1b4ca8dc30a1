//! Opening the store a configuration names, and closing it: the embedded
//! sled database (its group-commit flusher and the mailbox actor's own
//! thread) or a PostgreSQL database shared with other nodes (the pool, this
//! node's place in the cluster and the shared mailbox actor). Everything
//! after this sees only the [`Directory`] and the [`MailboxHandle`].

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Arbiter};
use anyhow::{Context, Result};
use csm_actors::auth::Authenticator;
use csm_actors::cluster::{self, ClusterLink, Node, NodeTargets, PgDirectory, PgMail, PgSettings};
use csm_actors::mailbox::MailboxActor;
use csm_actors::mailbox::{Mailboxes, Stager};
use csm_actors::mailbox_handle::MailboxHandle;
use csm_actors::presence::PresenceActor;
use csm_actors::services::Backing;
use csm_actors::shared_mailbox::SharedMailboxActor;
use csm_actors::store::{Directory, Flusher, GroupCommit, SledDirectory, SledStore, Store};

use crate::config::{Backend, Config};
use crate::serve::mailbox_settings;

/// An open store with the actors that serve it.
pub struct Opened {
    pub backing: Backing,
    running: Running,
}

enum Running {
    Sled {
        store: Arc<dyn Store>,
        commit: GroupCommit,
        flusher: Flusher,
        arbiter: Arbiter,
    },
    Postgres {
        node: Arc<Node>,
    },
}

/// The PostgreSQL settings of a configuration; `session_port` names the
/// node when the configuration does not.
pub fn pg_settings(config: &Config, session_port: u16) -> Result<PgSettings> {
    let url = config
        .store
        .url
        .clone()
        .context("store.url is required with store.backend = \"postgres\"")?;
    let node = config
        .store
        .node
        .clone()
        .unwrap_or_else(|| format!("{}:{session_port}", host_name()));
    Ok(PgSettings {
        url,
        node,
        pool_size: config.store.pool_size,
        lease: Duration::from_secs(config.store.lease_secs),
        connect_timeout: Duration::from_secs(5),
    })
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match (rc, std::str::from_utf8(&buf[..end])) {
        (0, Ok(name)) if !name.is_empty() => name.replace(['\t', '\n'], "_"),
        _ => "csm".to_owned(),
    }
}

impl Opened {
    /// Opens the configured store and starts the actors on it.
    pub async fn open(config: &Config, session_port: u16) -> Result<Opened> {
        match config.store.backend {
            Backend::Sled => Opened::open_sled(config),
            Backend::Postgres => Opened::open_postgres(config, session_port).await,
        }
    }

    fn open_sled(config: &Config) -> Result<Opened> {
        let store_dir = config.store_dir();
        let cache = config.limits.store_cache_bytes;
        let store: Arc<dyn Store> = Arc::new(
            SledStore::open_with_cache(&store_dir, cache).with_context(|| {
                format!(
                    "opening the store in {} (is another server using it?)",
                    store_dir.display()
                )
            })?,
        );
        let (commit, flusher) = GroupCommit::start(
            store.clone(),
            config.limits.waiting_commits,
            config.timeouts.commit_window(),
        )
        .context("starting the flusher")?;
        let users: Arc<dyn Directory> =
            Arc::new(SledDirectory::new(store.clone(), commit.clone())?);
        let auth = Arc::new(Authenticator::new(
            users.clone(),
            config.limits.auth(&config.timeouts),
        )?);
        let names = store.list_users()?;
        log::info!(
            "store opened in {}: {} users",
            store_dir.display(),
            names.len()
        );
        let (fan_out_window, per_session) = (
            config.timeouts.fan_out_window(),
            config.timeouts.fan_out_per_session(),
        );
        let presence = actix::Supervisor::start(move |_| {
            PresenceActor::new(names)
                .with_fan_out_window(fan_out_window)
                .with_fan_out_per_session(per_session)
        });
        let mailboxes = Mailboxes::load(store.clone(), mailbox_settings(config))?;
        let mailbox_actor = MailboxActor::new(mailboxes, commit.clone());
        let arbiter = Arbiter::new();
        let mailbox =
            actix::Supervisor::start_in_arbiter(&arbiter.handle(), move |_| mailbox_actor);
        Ok(Opened {
            backing: Backing {
                users,
                auth,
                presence,
                mailbox: MailboxHandle::of(&mailbox),
                // Large data is written by the courier that read it.
                stager: Some(Arc::new(Stager::new(
                    store.clone(),
                    config.limits.disk_reserve_bytes,
                ))),
                shared_db: None,
            },
            running: Running::Sled {
                store,
                commit,
                flusher,
                arbiter,
            },
        })
    }

    async fn open_postgres(config: &Config, session_port: u16) -> Result<Opened> {
        let settings = pg_settings(config, session_port)?;
        let pool = cluster::open_pool(&settings).await.with_context(|| {
            format!(
                "opening the PostgreSQL store (store.url = {})",
                cluster::redacted(&settings.url)
            )
        })?;
        let directory = PgDirectory::new(pool.clone());
        let names = directory
            .list_users()
            .await
            .context("reading the users from PostgreSQL")?;
        let users: Arc<dyn Directory> = Arc::new(directory);
        let auth = Arc::new(Authenticator::new(
            users.clone(),
            config.limits.auth(&config.timeouts),
        )?);
        log::info!(
            "PostgreSQL store opened at {}: {} users",
            cluster::redacted(&settings.url),
            names.len()
        );
        let link = ClusterLink::new();
        let presence_link = link.clone();
        let (fan_out_window, per_session) = (
            config.timeouts.fan_out_window(),
            config.timeouts.fan_out_per_session(),
        );
        let presence = actix::Supervisor::start(move |_| {
            PresenceActor::clustered(names, presence_link)
                .with_fan_out_window(fan_out_window)
                .with_fan_out_per_session(per_session)
        });
        let node = Arc::new(
            Node::join(pool.clone(), settings.clone())
                .await
                .context("joining the cluster")?,
        );
        let mail = PgMail::start(
            pool.clone(),
            node.name().to_owned(),
            mailbox_settings(config),
            config.store.committers,
            config.limits.waiting_commits,
        );
        let mailbox = SharedMailboxActor::new(mail).start();
        node.start(
            link,
            NodeTargets {
                presence: presence.clone(),
                mail: mailbox.clone().recipient(),
                rescan: mailbox.clone().recipient(),
                auth: auth.clone(),
            },
        );
        Ok(Opened {
            backing: Backing {
                users,
                auth,
                presence,
                mailbox: MailboxHandle::of(&mailbox),
                stager: None,
                shared_db: Some(pool),
            },
            running: Running::Postgres { node },
        })
    }

    /// The embedded store, to watch for a failed write.
    pub fn sled_store(&self) -> Option<Arc<dyn Store>> {
        match &self.running {
            Running::Sled { store, .. } => Some(store.clone()),
            Running::Postgres { .. } => None,
        }
    }

    /// Makes everything durable and stops what the store started; call it
    /// once the connections are gone.
    pub async fn close(self) -> String {
        match self.running {
            Running::Sled {
                store,
                commit,
                flusher,
                arbiter,
            } => {
                if let Err(e) = commit.commit().await {
                    log::error!("final flush failed: {e}");
                }
                let flushes = commit
                    .stats()
                    .flushes
                    .load(std::sync::atomic::Ordering::Relaxed);
                let commits = commit
                    .stats()
                    .commits
                    .load(std::sync::atomic::Ordering::Relaxed);
                drop((commit, self.backing));
                arbiter.stop();
                if arbiter.join().is_err() {
                    log::warn!("the mailbox thread did not stop cleanly");
                }
                if !flusher.join(Duration::from_secs(10)) {
                    log::warn!("the store flusher did not stop in time");
                }
                drop(store);
                format!("{commits} durable writes in {flushes} flushes; store flushed")
            }
            Running::Postgres { node } => {
                node.leave().await;
                "left the cluster".to_owned()
            }
        }
    }
}
