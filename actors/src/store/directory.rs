//! The registered users, as every backend serves them. The calls are
//! asynchronous because a shared database answers over the network; each
//! change is durable when its future resolves, so a caller can announce it
//! at once. [`SledDirectory`] serves it from the embedded store, committing
//! through the group-commit thread.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::{GroupCommit, Store, StoreError, UserRecord};

/// The user list of one server (or of every node sharing a database).
pub trait Directory: Send + Sync + 'static {
    fn get_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserRecord>, StoreError>>;
    /// Creates a user, durably; fails with `UserExists` if the name is taken.
    fn add_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Replaces a user's record, durably; false if there is no such user.
    fn update_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Removes a user, durably, with whatever of their mailbox the backend
    /// removes in the same step; how many waiting messages went with them
    /// (`None`: no such user). What is left is the mailbox actor's to drop.
    fn remove_user<'a>(&'a self, name: &'a str)
        -> BoxFuture<'a, Result<Option<usize>, StoreError>>;
    /// All usernames, sorted.
    fn list_users(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// Whether `name` is a user. A backend may answer from a cache of
    /// users seen: a user removed meanwhile is caught again where it
    /// matters (the storing transaction checks each recipient under lock).
    fn user_exists<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move { Ok(self.get_user(name).await?.is_some()) }.boxed()
    }

    /// Drops whatever is cached about `name` (removed, or changed).
    fn forget(&self, _name: &str) {}
}

/// The embedded store's users; writes are made durable by group commit.
/// Every call that reads or writes the store runs on the blocking pool: a
/// read that misses sled's cache waits for the disk, and the callers are
/// event loops that serve thousands of connections.
pub struct SledDirectory {
    store: Arc<dyn Store>,
    commit: GroupCommit,
    /// Every user's name, so that a courier checks each recipient of each
    /// message in memory ([`Directory::user_exists`]). This directory makes
    /// every change to the users while the server holds the store.
    names: RwLock<HashSet<String>>,
}

impl SledDirectory {
    /// The directory of `store`, with its user names read once.
    pub fn new(store: Arc<dyn Store>, commit: GroupCommit) -> Result<SledDirectory, StoreError> {
        let names = store.list_users()?.into_iter().collect();
        Ok(SledDirectory {
            store,
            commit,
            names: RwLock::new(names),
        })
    }

    /// Runs `call` on the store, on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&*store))
            .await
            .map_err(|e| StoreError::Db(format!("a store call failed: {e}")))?
    }

    async fn committed<T>(&self, value: T) -> Result<T, StoreError> {
        self.commit
            .commit()
            .await
            .map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(value)
    }

    fn names_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<String>> {
        self.names.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Directory for SledDirectory {
    fn get_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserRecord>, StoreError>> {
        let name = name.to_owned();
        self.blocking(move |store| store.get_user(&name)).boxed()
    }

    fn add_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let (owned, record) = (name.to_owned(), record.clone());
            self.blocking(move |store| store.add_user(&owned, &record))
                .await?;
            // Known from the moment the store holds the user, as the store
            // sees it: were the commit to fail, the user would still be
            // there (a later `user add` says it exists), and messages to
            // them must not be refused meanwhile. A message stored now is
            // in the same log after the user, so it is never durable
            // without them.
            self.names_mut().insert(name.to_owned());
            self.committed(()).await
        }
        .boxed()
    }

    fn update_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            let (name, record) = (name.to_owned(), record.clone());
            let updated = self
                .blocking(move |store| store.update_user(&name, &record))
                .await?;
            self.committed(updated).await
        }
        .boxed()
    }

    fn remove_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<usize>, StoreError>> {
        async move {
            // Gone for every later message before the store hears of it;
            // a send already past this check is caught by the mailbox,
            // which checks each recipient again as it stores.
            let known = self.names_mut().remove(name);
            let owned = name.to_owned();
            let removed = self.blocking(move |store| store.remove_user(&owned)).await;
            let removed = match removed {
                Ok(removed) => removed,
                Err(e) => {
                    if known {
                        self.names_mut().insert(name.to_owned());
                    }
                    return Err(e);
                }
            };
            // The mailbox actor drops the mailbox.
            self.committed(removed.then_some(0)).await
        }
        .boxed()
    }

    fn list_users(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        self.blocking(|store| store.list_users()).boxed()
    }

    fn user_exists<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let known = self
            .names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name);
        futures_util::future::ready(Ok(known)).boxed()
    }
}
