//! Group commit: one thread owns every flush of the store. A writer asks
//! for a commit after its write; the thread takes every request that has
//! arrived, runs one flush, and answers them all. A burst of sends costs one
//! flush, and flushes never run concurrently (sled 0.34.7 can deadlock on
//! concurrent `flush_async`, sled #1308).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;

use thiserror::Error;
use tokio::sync::oneshot;

use super::Store;

/// Why a commit did not happen.
#[derive(Debug, Clone, Error)]
pub enum CommitError {
    #[error("flush failed: {0}")]
    Flush(String),
    #[error("too many commits waiting")]
    Overloaded,
    #[error("the store is closed")]
    Closed,
}

type Waiter = oneshot::Sender<Result<(), CommitError>>;

/// Counters of the flusher, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub flushes: AtomicU64,
    pub commits: AtomicU64,
}

/// A handle to the flusher thread; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    requests: SyncSender<Waiter>,
    stats: Arc<CommitStats>,
}

impl GroupCommit {
    /// Starts the flusher thread for `store`; at most `max_waiting` commit
    /// requests may wait at once. The thread makes a last flush and ends
    /// when every handle is gone; [`Flusher::join`] waits for that.
    ///
    /// `window`: under load (the previous flush served more than one
    /// writer), how long to gather more writers before flushing. Each flush
    /// costs the store real work, so a millisecond of waiting can halve the
    /// flushes at a few hundred messages per second and up.
    pub fn start(
        store: Arc<dyn Store>,
        max_waiting: usize,
        window: std::time::Duration,
    ) -> std::io::Result<(GroupCommit, Flusher)> {
        let (requests, incoming) = mpsc::sync_channel(max_waiting);
        let stats = Arc::new(CommitStats::default());
        let thread_stats = stats.clone();
        let thread = thread::Builder::new()
            .name("csm-flusher".into())
            .spawn(move || run(store, incoming, thread_stats, window))?;
        Ok((GroupCommit { requests, stats }, Flusher { thread }))
    }

    /// Resolves once every write made before this call is durable.
    pub async fn commit(&self) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        match self.requests.try_send(tx) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(CommitError::Overloaded),
            Err(TrySendError::Disconnected(_)) => return Err(CommitError::Closed),
        }
        rx.await.unwrap_or(Err(CommitError::Closed))
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }
}

/// The flusher thread, to wait for at shutdown.
pub struct Flusher {
    thread: thread::JoinHandle<()>,
}

impl Flusher {
    /// Waits up to `limit` for the thread to make its last flush and end
    /// (it ends once every [`GroupCommit`] handle is dropped). True if it did.
    pub fn join(self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while !self.thread.is_finished() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(std::time::Duration::from_millis(5));
        }
        self.thread.join().is_ok()
    }
}

fn run(
    store: Arc<dyn Store>,
    incoming: Receiver<Waiter>,
    stats: Arc<CommitStats>,
    window: std::time::Duration,
) {
    let mut busy = false;
    while let Ok(first) = incoming.recv() {
        let mut batch = vec![first];
        if busy && !window.is_zero() {
            thread::sleep(window);
        }
        batch.extend(incoming.try_iter());
        busy = batch.len() > 1;
        let started = std::time::Instant::now();
        let result = store.flush().map_err(|e| CommitError::Flush(e.to_string()));
        metrics::histogram!(crate::metrics::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::COMMIT_BATCH).record(batch.len() as f64);
        if let Err(e) = &result {
            log::error!("store flush failed for {} waiting writes: {e}", batch.len());
        }
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .commits
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
    if let Err(e) = store.flush() {
        log::error!("final store flush failed: {e}");
    }
}
