//! The PostgreSQL schema and its migrations. csm creates and migrates the
//! schema itself at start, under an advisory lock so that nodes starting
//! together do not race; a database whose schema is newer than this build
//! is refused with a message that says so. Each migration is a list of
//! statements applied in one transaction with the version bump.
//!
//! | table | holds |
//! |---|---|
//! | `users` | name, argon2 PHC hash, and the mailbox's message and byte counts (the quota, kept in the same transaction as every insert and removal) |
//! | `messages` | one row per stored message: header, data, and how many mailboxes still hold it |
//! | `mailbox` | one row per waiting (user, message) |
//! | `message_ids` | accepted ids, for idempotent retries across nodes and restarts |
//! | `nodes` | one row per live node with its lease |
//! | `presence` | one row per (node, user) that node has published: state, version, sessions |

use deadpool_postgres::Client;

use crate::store::StoreError;

use super::db_error;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = 1;

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x6373_6d00_0001;

const MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE users (
        name text PRIMARY KEY,
        password_hash text NOT NULL,
        created_unix bigint NOT NULL,
        box_messages bigint NOT NULL DEFAULT 0,
        box_bytes bigint NOT NULL DEFAULT 0
    )",
    "CREATE SEQUENCE message_seq",
    "CREATE TABLE messages (
        seq bigint PRIMARY KEY,
        id bytea NOT NULL,
        sender text NOT NULL,
        recipients text[] NOT NULL,
        size bigint NOT NULL,
        stored_unix bigint NOT NULL,
        holders bigint NOT NULL,
        data bytea NOT NULL
    )",
    // Message data is mostly compressed already (or small); skip pglz.
    "ALTER TABLE messages ALTER COLUMN data SET STORAGE EXTERNAL",
    "CREATE INDEX messages_id ON messages (id)",
    "CREATE TABLE mailbox (
        username text NOT NULL REFERENCES users (name),
        seq bigint NOT NULL REFERENCES messages (seq),
        PRIMARY KEY (username, seq)
    )",
    "CREATE INDEX mailbox_seq ON mailbox (seq)",
    "CREATE TABLE message_ids (
        id bytea PRIMARY KEY,
        sender text NOT NULL,
        digest bytea NOT NULL,
        seq bigint NOT NULL,
        accepted_unix bigint NOT NULL
    )",
    "CREATE INDEX message_ids_accepted ON message_ids (accepted_unix)",
    "CREATE TABLE nodes (
        name text PRIMARY KEY,
        lease_until timestamptz NOT NULL,
        started_unix bigint NOT NULL
    )",
    "CREATE TABLE presence (
        node text NOT NULL,
        username text NOT NULL,
        version bigint NOT NULL,
        state text NOT NULL,
        idle_since_ms bigint,
        sessions text NOT NULL,
        PRIMARY KEY (node, username)
    )",
]];

/// Brings the schema to [`SCHEMA_VERSION`], or explains why it cannot.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS csm_schema (version integer NOT NULL)")
        .await
        .map_err(db_error)?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM csm_schema", &[])
        .await
        .map_err(db_error)?
        .and_then(|row| row.get(0));
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the database has csm schema version {found}, newer than this csm's \
             {SCHEMA_VERSION}; run a newer csm"
        )));
    }
    for (index, statements) in MIGRATIONS.iter().enumerate() {
        let version = index as i32 + 1;
        if version <= found {
            continue;
        }
        for statement in *statements {
            tx.batch_execute(statement).await.map_err(db_error)?;
        }
        log::info!("database schema migrated to version {version}");
    }
    if found < SCHEMA_VERSION {
        tx.execute("DELETE FROM csm_schema", &[])
            .await
            .map_err(db_error)?;
        tx.execute(
            "INSERT INTO csm_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)
}
