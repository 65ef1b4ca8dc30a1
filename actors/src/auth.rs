//! Password checks: argon2id (PHC strings) on a small pool of its own, and
//! a cache of verified credentials so that message streams, which carry the
//! password every time, pay for argon2 once. The cache holds an HMAC of
//! user and password under a key made at start, never the password; it is
//! dropped for a user whose password changes or who is removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use aws_lc_rs::hmac;
use thiserror::Error;
use tokio::sync::Semaphore;

use crate::store::{Directory, StoreError};

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
    store: Arc<dyn Directory>,
    settings: AuthSettings,
    key: hmac::Key,
    cache: Mutex<HashMap<String, hmac::Tag>>,
    /// Users with a password check under way; at most one per user.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pool: HashPool,
    /// Bumped by every `forget`, so a check that started before a password
    /// change cannot cache the old password after it.
    generation: AtomicU64,
    permits: Arc<Semaphore>,
    /// Verified against when the user does not exist, so an unknown user
    /// costs the same time as a wrong password.
    dummy_hash: String,
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Directory>,
        settings: AuthSettings,
    ) -> Result<Authenticator, AuthError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| AuthError::Hash("no system randomness".into()))?;
        let pool = HashPool::start(settings.parallel_hashes.max(1))?;
        let dummy_hash =
            pool.run_blocking(|| hash_password("csm-dummy-password-for-unknown-users"))??;
        Ok(Authenticator {
            store,
            pool,
            permits: Arc::new(Semaphore::new(settings.parallel_hashes.max(1))),
            settings,
            key,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
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

    fn cached(&self, user: &str, input: &[u8]) -> bool {
        self.cache_lock()
            .get(user)
            .is_some_and(|tag| hmac::verify(&self.key, input, tag.as_ref()).is_ok())
    }

    /// True when `user` exists and `password` is theirs.
    pub async fn verify(&self, user: &str, password: &str) -> Result<bool, AuthError> {
        let input = Self::tag_input(user, password);
        if self.cached(user, &input) {
            return Ok(true);
        }
        // One argon2 at a time per user: a burst of streams of one user
        // that is not cached yet (a client's first messages, or a node that
        // has not seen the user) costs one hash, not one per stream.
        let gate = self
            .in_flight_lock()
            .entry(user.to_owned())
            .or_default()
            .clone();
        let verdict = {
            let _turn = gate.lock().await;
            if self.cached(user, &input) {
                Ok(true)
            } else {
                self.verify_uncached(user, password, &input).await
            }
        };
        let mut in_flight = self.in_flight_lock();
        // Ours and the map's: nobody else waits on this gate.
        if Arc::strong_count(&gate) <= 2 {
            in_flight.remove(user);
        }
        verdict
    }

    fn in_flight_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn verify_uncached(
        &self,
        user: &str,
        password: &str,
        input: &[u8],
    ) -> Result<bool, AuthError> {
        let generation = self.generation.load(Ordering::Acquire);
        let record = self.store.get_user(user).await?;
        let exists = record.is_some();
        let hash = record.map_or_else(|| self.dummy_hash.clone(), |r| r.password_hash);
        let mut ok = self.run_argon2(hash.clone(), password.to_owned()).await? && exists;
        if ok && self.generation.load(Ordering::Acquire) != generation {
            // Someone's password changed or someone was removed while argon2
            // ran: the answer stands only if this user's record still holds
            // the hash just checked.
            let now = self.store.get_user(user).await?;
            ok = now.is_some_and(|record| record.password_hash == hash);
        }
        if ok {
            let mut cache = self.cache_lock();
            if self.generation.load(Ordering::Acquire) == generation {
                if cache.len() >= self.settings.cache_entries {
                    if let Some(victim) = cache.keys().next().cloned() {
                        cache.remove(&victim);
                    }
                }
                cache.insert(user.to_owned(), hmac::sign(&self.key, input));
            }
        }
        Ok(ok)
    }

    /// Drops the cached credentials of `user` (password change, removal),
    /// and what the directory caches of them.
    pub fn forget(&self, user: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache_lock().remove(user);
        self.store.forget(user);
    }

    /// Hashes a new password on the pool.
    pub async fn hash(&self, password: &str) -> Result<String, AuthError> {
        let _permit = self.permit().await?;
        let password = password.to_owned();
        self.pool.run(move || hash_password(&password)).await?
    }

    async fn run_argon2(&self, hash: String, password: String) -> Result<bool, AuthError> {
        let _permit = self.permit().await?;
        self.pool
            .run(move || verify_password(&hash, &password))
            .await?
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

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads for argon2. Each run needs 19 MiB; on a few
/// long-lived threads that memory is reused, where a general blocking pool
/// would leave a copy in the allocator of every thread it ever used.
struct HashPool {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

impl HashPool {
    fn start(threads: usize) -> Result<HashPool, AuthError> {
        // The semaphore in front admits at most `threads` jobs at once.
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(threads);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("csm-argon2-{n}"))
                .spawn(move || loop {
                    // Take the working memory now, so the server's footprint
                    // is known from the start rather than at the first login.
                    BLOCKS.with(|blocks| {
                        let mut blocks = blocks.borrow_mut();
                        let needed = Params::default().block_count();
                        if blocks.len() < needed {
                            blocks.resize(needed, argon2::Block::default());
                        }
                    });
                    let job = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .map_err(|e| AuthError::Hash(format!("starting the argon2 pool: {e}")))?;
        }
        Ok(HashPool { jobs })
    }

    /// Runs `work` on the pool and waits for it, from a thread that is not
    /// an event loop (start-up).
    fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(work());
        });
        self.jobs
            .send(job)
            .map_err(|_| AuthError::Hash("argon2 pool stopped".into()))?;
        rx.recv()
            .map_err(|_| AuthError::Hash("argon2 worker stopped".into()))
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(work());
        });
        self.jobs.try_send(job).map_err(|_| AuthError::Busy)?;
        rx.await
            .map_err(|_| AuthError::Hash("argon2 worker stopped".into()))
    }
}

thread_local! {
    /// argon2's working memory (19 MiB with the default parameters), kept
    /// per thread and reused, so that hashing never churns the allocator.
    static BLOCKS: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs argon2 over this thread's reusable memory.
fn argon2_into(
    argon: &Argon2<'_>,
    params: &Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), AuthError> {
    BLOCKS.with(|blocks| {
        let mut blocks = blocks.borrow_mut();
        let needed = params.block_count();
        if blocks.len() < needed {
            blocks.resize(needed, argon2::Block::default());
        }
        argon
            .hash_password_into_with_memory(password, salt, out, &mut blocks[..needed])
            .map_err(|e| AuthError::Hash(e.to_string()))
    })
}

fn hash_error(e: impl std::fmt::Display) -> AuthError {
    AuthError::Hash(e.to_string())
}

/// argon2id with the crate's default parameters (19 MiB, 2 passes), as a
/// PHC string. Blocking: call off the event loop.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    let params = Params::default();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt
        .as_salt()
        .decode_b64(&mut salt_bytes)
        .map_err(hash_error)?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon2_into(&argon, &params, password.as_bytes(), salt_raw, &mut out)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(hash_error)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(hash_error)?),
    };
    Ok(phc.to_string())
}

/// Checks a password against a PHC string (any argon2 variant and
/// parameters it names). Blocking.
pub fn verify_password(phc: &str, password: &str) -> Result<bool, AuthError> {
    let parsed = PasswordHash::new(phc).map_err(hash_error)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(hash_error)?;
    let version = parsed
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(hash_error)?
        .unwrap_or_default();
    let params = Params::try_from(&parsed).map_err(hash_error)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(AuthError::Hash("PHC string lacks salt or hash".into()));
    };
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt.decode_b64(&mut salt_bytes).map_err(hash_error)?;
    let argon = Argon2::new(algorithm, version, params.clone());
    let mut out = vec![0u8; expected.len()];
    argon2_into(&argon, &params, password.as_bytes(), salt_raw, &mut out)?;
    // Output's equality is constant-time.
    Ok(Output::new(&out).map_err(hash_error)? == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{GroupCommit, SledDirectory, SledStore, Store, UserRecord};

    #[test]
    fn phc_strings_interoperate_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let ours = hash_password("pässword").unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password("pässword".as_bytes(), &parsed)
            .is_ok());
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"other", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password(&theirs, "other").unwrap());
        assert!(!verify_password(&theirs, "Other").unwrap());
        assert!(verify_password("not a phc string", "x").is_err());
    }

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
        let (commit, _flusher) =
            GroupCommit::start(store.clone(), 16, std::time::Duration::ZERO).unwrap();
        let users = Arc::new(SledDirectory::new(store.clone(), commit).unwrap());
        let auth = Authenticator::new(users, AuthSettings::default()).unwrap();
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

    #[tokio::test]
    async fn a_removal_during_the_check_refuses_the_login() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let record = UserRecord {
            password_hash: hash_password("secret").unwrap(),
            created_unix: 0,
        };
        store.add_user("bob", &record).unwrap();
        let (commit, _flusher) =
            GroupCommit::start(store.clone(), 16, std::time::Duration::ZERO).unwrap();
        let users = Arc::new(SledDirectory::new(store.clone(), commit).unwrap());
        let auth = Arc::new(Authenticator::new(users, AuthSettings::default()).unwrap());
        let checking = tokio::spawn({
            let auth = auth.clone();
            async move { auth.verify("bob", "secret").await.unwrap() }
        });
        // argon2 takes tens of milliseconds: remove bob while it runs.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        store.remove_user("bob").unwrap();
        auth.forget("bob");
        assert!(!checking.await.unwrap(), "a removed user signed on");
        assert!(!auth.cache_lock().contains_key("bob"));
    }
}
