//! The users in PostgreSQL. Every change commits with its hint, so every
//! node hears of a new user (`AddUser`), a removed one (its sessions
//! close) and a changed password (its cached credentials are dropped).
//! Removing a user removes their mailbox in the same transaction, so a
//! send racing the removal either lands before it (and is removed with
//! it) or finds no such recipient.

use std::collections::HashSet;
use std::sync::Mutex;

use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use crate::store::{Directory, StoreError, UserRecord};

use super::mail::remove_entries;
use super::{db_error, pool_error, Hint, CHANNEL};

/// The users of every node sharing the database.
pub struct PgDirectory {
    pool: Pool,
    /// Names known to be users, so that recipient checks do not ask the
    /// database each time; at most one entry per registered user, dropped
    /// on removal (here or, through its hint, at another node).
    known: Mutex<HashSet<String>>,
}

impl PgDirectory {
    pub fn new(pool: Pool) -> PgDirectory {
        PgDirectory {
            pool,
            known: Mutex::new(HashSet::new()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        if self.known().contains(name) {
            return Ok(true);
        }
        let exists = self.get(name).await?.is_some();
        if exists {
            self.known().insert(name.to_owned());
        }
        Ok(exists)
    }

    async fn get(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                prepared!(
                    client,
                    "SELECT password_hash, created_unix FROM users WHERE name = $1"
                ),
                &[&name],
            )
            .await
            .map_err(db_error)?;
        Ok(row.map(|row| UserRecord {
            password_hash: row.get(0),
            created_unix: row.get::<_, i64>(1) as u64,
        }))
    }

    async fn add(&self, name: &str, record: &UserRecord) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        let inserted = tx
            .execute(
                prepared!(
                    tx,
                    "INSERT INTO users (name, password_hash, created_unix) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING"
                ),
                &[&name, &record.password_hash, &(record.created_unix as i64)],
            )
            .await
            .map_err(db_error)?;
        if inserted == 0 {
            return Err(StoreError::UserExists(name.to_owned()));
        }
        notify(&tx, &Hint::UserAdded { user: name.into() }).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn update(&self, name: &str, record: &UserRecord) -> Result<bool, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        let updated = tx
            .execute(
                prepared!(tx, "UPDATE users SET password_hash = $2 WHERE name = $1"),
                &[&name, &record.password_hash],
            )
            .await
            .map_err(db_error)?;
        if updated == 0 {
            return Ok(false);
        }
        notify(&tx, &Hint::PasswordChanged { user: name.into() }).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    async fn remove(&self, name: &str) -> Result<Option<usize>, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        let locked = tx
            .query_opt(
                prepared!(tx, "SELECT 1 FROM users WHERE name = $1 FOR UPDATE"),
                &[&name],
            )
            .await
            .map_err(db_error)?;
        if locked.is_none() {
            return Ok(None);
        }
        let seqs: Vec<i64> = tx
            .query(
                prepared!(tx, "SELECT seq FROM mailbox WHERE username = $1"),
                &[&name],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        self.known().remove(name);
        let removed = remove_entries(&tx, name, &seqs).await?.len();
        tx.execute(prepared!(tx, "DELETE FROM users WHERE name = $1"), &[&name])
            .await
            .map_err(db_error)?;
        notify(&tx, &Hint::UserRemoved { user: name.into() }).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(removed))
    }

    async fn list(&self) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                prepared!(client, "SELECT name FROM users ORDER BY name COLLATE \"C\""),
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// Sends `hint` when the transaction commits.
pub(crate) async fn notify(
    tx: &deadpool_postgres::Transaction<'_>,
    hint: &Hint,
) -> Result<(), StoreError> {
    tx.execute(
        prepared!(tx, "SELECT pg_notify($1, $2)"),
        &[&CHANNEL, &hint.payload()],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

impl Directory for PgDirectory {
    fn get_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserRecord>, StoreError>> {
        self.get(name).boxed()
    }

    fn add_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.add(name, record).boxed()
    }

    fn update_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.update(name, record).boxed()
    }

    fn remove_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<usize>, StoreError>> {
        self.remove(name).boxed()
    }

    fn list_users(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        self.list().boxed()
    }

    fn user_exists<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.exists(name).boxed()
    }

    fn forget(&self, name: &str) {
        self.known().remove(name);
    }
}
