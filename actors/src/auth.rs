//! Password checks: argon2id (PHC strings) on a bounded blocking pool, and
//! a cache of verified credentials so that message streams, which carry the
//! password every time, pay for argon2 once. The cache holds an HMAC of
//! user and password under a key made at start, never the password; it is
//! dropped for a user whose password changes or who is removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::hmac;
use thiserror::Error;
use tokio::sync::Semaphore;

use crate::store::{Store, StoreError};

/// Why a credential check could not be made (a wrong password is not an
/// error: `verify` answers false).
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("too many password checks waiting")]
    Busy,
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Settings of the authenticator.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// argon2 runs at once (the blocking pool's share for argon2).
    pub parallel_hashes: usize,
    /// How long a check may wait for a place on the pool.
    pub queue_wait: Duration,
    /// Most cached credentials.
    pub cache_entries: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            parallel_hashes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_wait: Duration::from_secs(10),
            cache_entries: 100_000,
        }
    }
}

/// Checks credentials against the store; shared by every connection.
pub struct Authenticator {
    store: Arc<dyn Store>,
    settings: AuthSettings,
    key: hmac::Key,
    cache: Mutex<HashMap<String, hmac::Tag>>,
    /// Bumped by every `forget`, so a check that started before a password
    /// change cannot cache the old password after it.
    generation: AtomicU64,
    permits: Arc<Semaphore>,
    /// Verified against when the user does not exist, so an unknown user
    /// costs the same time as a wrong password.
    dummy_hash: String,
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>, settings: AuthSettings) -> Result<Authenticator, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| AuthError::Hash("no system randomness".into()))?;
        let dummy_hash = hash_password("csm-dummy-password-for-unknown-users")?;
        Ok(Authenticator {
            store,
            permits: Arc::new(Semaphore::new(settings.parallel_hashes.max(1))),
            settings,
            key,
            cache: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            dummy_hash,
        })
    }

    fn tag_input(user: &str, password: &str) -> Vec<u8> {
        let mut input = Vec::with_capacity(user.len() + 1 + password.len());
        input.extend_from_slice(user.as_bytes());
        input.push(0);
        input.extend_from_slice(password.as_bytes());
        input
    }

    /// True when `user` exists and `password` is theirs.
    pub async fn verify(&self, user: &str, password: &str) -> Result<bool, AuthError> {
        let input = Self::tag_input(user, password);
        if let Some(tag) = self.cache_lock().get(user) {
            if hmac::verify(&self.key, &input, tag.as_ref()).is_ok() {
                return Ok(true);
            }
        }
        let generation = self.generation.load(Ordering::Acquire);
        let record = self.store.get_user(user)?;
        let exists = record.is_some();
        let hash = record.map_or_else(|| self.dummy_hash.clone(), |r| r.password_hash);
        let ok = self.run_argon2(hash, password.to_owned()).await? && exists;
        if ok {
            let mut cache = self.cache_lock();
            if self.generation.load(Ordering::Acquire) == generation {
                if cache.len() >= self.settings.cache_entries {
                    if let Some(victim) = cache.keys().next().cloned() {
                        cache.remove(&victim);
                    }
                }
                cache.insert(user.to_owned(), hmac::sign(&self.key, &input));
            }
        }
        Ok(ok)
    }

    /// Drops the cached credentials of `user` (password change, removal).
    pub fn forget(&self, user: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache_lock().remove(user);
    }

    /// Hashes a new password on the pool.
    pub async fn hash(&self, password: &str) -> Result<String, AuthError> {
        let _permit = self.permit().await?;
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| AuthError::Hash(e.to_string()))?
    }

    async fn run_argon2(&self, hash: String, password: String) -> Result<bool, AuthError> {
        let _permit = self.permit().await?;
        tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .map_err(|e| AuthError::Hash(e.to_string()))?
    }

    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, AuthError> {
        tokio::time::timeout(
            self.settings.queue_wait,
            self.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| AuthError::Busy)?
        .map_err(|_| AuthError::Busy)
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, hmac::Tag>> {
        // The map stays consistent even if a holder panicked mid-insert.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// argon2id with the crate's default parameters (19 MiB, 2 passes), as a
/// PHC string. Blocking: call off the event loop.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Checks a password against a PHC string. Blocking.
pub fn verify_password(phc: &str, password: &str) -> Result<bool, AuthError> {
    let parsed = PasswordHash::new(phc).map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SledStore, UserRecord};

    #[tokio::test]
    async fn verifies_caches_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let hash = hash_password("secret").unwrap();
        store
            .add_user(
                "alice",
                &UserRecord {
                    password_hash: hash,
                    created_unix: 0,
                },
            )
            .unwrap();
        let auth = Authenticator::new(store.clone(), AuthSettings::default()).unwrap();
        assert!(auth.verify("alice", "secret").await.unwrap());
        assert!(auth.cache_lock().contains_key("alice"));
        assert!(!auth.verify("alice", "wrong").await.unwrap());
        assert!(!auth.verify("nobody", "secret").await.unwrap());
        let new_hash = hash_password("changed").unwrap();
        store
            .update_user(
                "alice",
                &UserRecord {
                    password_hash: new_hash,
                    created_unix: 0,
                },
            )
            .unwrap();
        auth.forget("alice");
        assert!(!auth.verify("alice", "secret").await.unwrap());
        assert!(auth.verify("alice", "changed").await.unwrap());
    }
}
