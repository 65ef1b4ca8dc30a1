//! The PostgreSQL backend, on which several csm nodes act as one server.
//! The database holds users, mailboxes, retained ids and presence; nodes
//! tell each other what changed with `NOTIFY` on one channel ([`Hint`]),
//! sent inside the transaction that made the change, so a hint is only
//! ever about something committed. Hints are only hints: a node that lost
//! some (its listening connection dropped) rescans the tables.
//!
//! - `schema.rs`: tables and migrations, applied at start.
//! - `directory.rs`: the users ([`crate::store::Directory`]).
//! - `mail.rs`: mailboxes, with group commit over a pool of connections.
//! - `node.rs`: the node's lease, its presence publisher and the listener.

/// A statement prepared once per connection (deadpool's statement cache):
/// a query given as text would cost a round trip to prepare every time.
macro_rules! prepared {
    ($client:expr, $sql:expr) => {
        &$client.prepare_cached($sql).await.map_err(db_error)?
    };
}

mod directory;
mod hint;
mod mail;
mod node;
mod schema;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::store::StoreError;

pub use directory::PgDirectory;
pub use hint::{Hint, MailHint, NodeState, CHANNEL};
pub use mail::{Accepted, PgMail};
pub use node::{
    cluster_presence, cluster_sessions, ClusterLink, Node, NodeSessions, NodeTargets,
    PresenceUpdate,
};
pub use schema::SCHEMA_VERSION;

/// How to reach the database and how this node takes part.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/db` (libpq URL or key=value form).
    pub url: String,
    /// This node's name, unique among the nodes sharing the database.
    pub node: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// A node that has not renewed its lease for this long is taken for
    /// dead: its users go offline on every other node.
    pub lease: Duration,
    /// Longest wait for a connection, from the pool or to the server.
    pub connect_timeout: Duration,
}

/// A failed database call, as a store error: connection trouble, a
/// server shutting down and aborted transactions are `Unavailable` (a
/// retry may work); anything else is `Db`.
pub(crate) fn db_error(e: tokio_postgres::Error) -> StoreError {
    let transient = match e.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
        }
        None => e.is_closed() || e.as_db_error().is_none(),
    };
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Db(e.to_string())
    }
}

pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The connection settings of `url`, with the session settings csm needs.
pub(crate) fn pg_config(settings: &PgSettings) -> Result<tokio_postgres::Config, StoreError> {
    let mut config = tokio_postgres::Config::from_str(&settings.url)
        .map_err(|e| StoreError::Unavailable(format!("store.url is not a PostgreSQL URL: {e}")))?;
    // Durable before `done` means committed to disk on the server.
    config.options("-c synchronous_commit=on");
    config.application_name(format!("csm {}", settings.node));
    config.connect_timeout(settings.connect_timeout);
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    Ok(config)
}

/// Connects to the database and migrates its schema; the error names the
/// setting (`store.url`) when the database cannot be reached.
pub async fn open_pool(settings: &PgSettings) -> Result<Pool, StoreError> {
    let config = pg_config(settings)?;
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(settings.pool_size.max(2))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.connect_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(settings.connect_timeout))
        .build()
        .map_err(|e| StoreError::Db(format!("building the connection pool: {e}")))?;
    let mut client = pool.get().await.map_err(|e| {
        StoreError::Unavailable(format!(
            "store.url: cannot connect to the database at {}: {e}",
            redacted(&settings.url)
        ))
    })?;
    schema::migrate(&mut client).await?;
    Ok(pool)
}

/// `url` without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_are_left_out_of_messages() {
        assert_eq!(
            redacted("postgres://csm:secret@db:5432/csm"),
            "postgres://csm@db:5432/csm"
        );
        assert_eq!(redacted("postgres://db/csm"), "postgres://db/csm");
        assert_eq!(redacted("host=db user=csm"), "host=db user=csm");
    }
}
