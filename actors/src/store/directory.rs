//! The registered users, as every backend serves them. The calls are
//! asynchronous because a shared database answers over the network; each
//! change is durable when its future resolves, so a caller can announce it
//! at once. [`SledDirectory`] serves it from the embedded store, committing
//! through the group-commit thread.

use std::sync::Arc;

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
pub struct SledDirectory {
    store: Arc<dyn Store>,
    commit: GroupCommit,
}

impl SledDirectory {
    pub fn new(store: Arc<dyn Store>, commit: GroupCommit) -> SledDirectory {
        SledDirectory { store, commit }
    }

    async fn committed<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let value = result?;
        self.commit
            .commit()
            .await
            .map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(value)
    }
}

impl Directory for SledDirectory {
    fn get_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserRecord>, StoreError>> {
        futures_util::future::ready(self.store.get_user(name)).boxed()
    }

    fn add_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.committed(self.store.add_user(name, record)).boxed()
    }

    fn update_user<'a>(
        &'a self,
        name: &'a str,
        record: &'a UserRecord,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.committed(self.store.update_user(name, record)).boxed()
    }

    fn remove_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<usize>, StoreError>> {
        // The mailbox actor drops the mailbox.
        let removed = self.store.remove_user(name).map(|gone| gone.then_some(0));
        self.committed(removed).boxed()
    }

    fn list_users(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        futures_util::future::ready(self.store.list_users()).boxed()
    }
}
