//! Group commit: one thread owns every flush of the store. A writer asks
//! for a commit after its write; the thread takes every request that has
//! arrived, runs one flush, and answers them all. A burst of sends costs one
//! flush, and flushes never run concurrently (sled 0.34.7 can deadlock on
//! concurrent `flush_async`, sled #1308).
//!
//! A flush is two stages on two threads: the flusher writes a batch out to
//! the operating system ([`Store::write_out`]) and hands it to the syncer,
//! which makes it durable ([`Store::make_durable`], an fdatasync) and only
//! then answers its writers. While one batch is being synced the next is
//! gathered and written out, and the syncer covers every batch handed to
//! it meanwhile with one sync: a sync always starts after the write-out of
//! each batch it answers, so none is answered before it is durable.
//!
//! The flusher also reopens a store that failed a write
//! ([`GroupCommit::reopen`]), in its place in the queue: every commit asked
//! for before it is answered from the old handle (which fails it), every
//! one after from the new, so no write made on the old handle is answered
//! as durable by a flush of the new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;

use thiserror::Error;
use tokio::sync::oneshot;

use super::{Store, WrittenOut};

/// Batches written out and waiting for the syncer; past this the flusher
/// waits, which keeps the writers waiting in the bounded request queue.
const WRITTEN_WAITING: usize = 8;

/// A written-out batch on its way to the syncer.
struct Written {
    result: Result<WrittenOut, CommitError>,
    waiters: Vec<Waiter>,
}

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

/// What the flusher is asked for, in order.
enum Request {
    Commit(Waiter),
    Reopen(oneshot::Sender<Result<(), String>>),
}

/// Counters of the flusher, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub flushes: AtomicU64,
    pub commits: AtomicU64,
}

/// A handle to the flusher thread; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    requests: SyncSender<Request>,
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
        let (written, to_sync) = mpsc::sync_channel(WRITTEN_WAITING);
        let syncer_store = store.clone();
        let syncer = thread::Builder::new()
            .name("csm-syncer".into())
            .spawn(move || sync_batches(syncer_store, to_sync))?;
        let thread = thread::Builder::new()
            .name("csm-flusher".into())
            .spawn(move || {
                run(store, incoming, written, thread_stats, window);
                // The syncer ends once the flusher's sender is gone.
                let _ = syncer.join();
            })?;
        Ok((GroupCommit { requests, stats }, Flusher { thread }))
    }

    /// Resolves once every write made before this call is durable.
    pub async fn commit(&self) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        self.ask(Request::Commit(tx))?;
        rx.await.unwrap_or(Err(CommitError::Closed))
    }

    /// Reopens the store after it failed a write ([`Store::reopen`]), after
    /// every commit asked for so far and before every later one.
    pub async fn reopen(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.ask(Request::Reopen(tx)).map_err(|e| e.to_string())?;
        rx.await
            .unwrap_or_else(|_| Err(CommitError::Closed.to_string()))
    }

    fn ask(&self, request: Request) -> Result<(), CommitError> {
        match self.requests.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(CommitError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(CommitError::Closed),
        }
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
    incoming: Receiver<Request>,
    written: SyncSender<Written>,
    stats: Arc<CommitStats>,
    window: std::time::Duration,
) {
    let mut busy = false;
    let mut next = None;
    while let Some(request) = next.take().or_else(|| incoming.recv().ok()) {
        let first = match request {
            Request::Commit(waiter) => waiter,
            Request::Reopen(answer) => {
                let _ = answer.send(store.reopen().map_err(|e| e.to_string()));
                continue;
            }
        };
        let mut waiters = vec![first];
        if busy && !window.is_zero() {
            thread::sleep(window);
        }
        // A reopen ends the batch: what comes after it is flushed from the
        // reopened store.
        for request in incoming.try_iter() {
            match request {
                Request::Commit(waiter) => waiters.push(waiter),
                reopen => {
                    next = Some(reopen);
                    break;
                }
            }
        }
        busy = waiters.len() > 1;
        let started = std::time::Instant::now();
        let result = store
            .write_out()
            .map_err(|e| CommitError::Flush(e.to_string()));
        metrics::histogram!(crate::metrics::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::COMMIT_BATCH).record(waiters.len() as f64);
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .commits
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        if written.send(Written { result, waiters }).is_err() {
            log::error!("the store's syncer is gone; commits fail");
            return;
        }
    }
    // The last batch: everything written before the handles went away.
    let result = store
        .write_out()
        .map_err(|e| CommitError::Flush(e.to_string()));
    let _ = written.send(Written {
        result,
        waiters: Vec::new(),
    });
}

/// The second stage: one sync for every batch written out so far, then the
/// answers.
fn sync_batches(store: Arc<dyn Store>, to_sync: Receiver<Written>) {
    while let Ok(first) = to_sync.recv() {
        let mut batches = vec![first];
        batches.extend(to_sync.try_iter());
        let mut outs = Vec::with_capacity(batches.len());
        let mut answers = Vec::with_capacity(batches.len());
        for batch in batches {
            match batch.result {
                Ok(out) => {
                    outs.push(out);
                    answers.push((batch.waiters, None));
                }
                Err(e) => answers.push((batch.waiters, Some(e))),
            }
        }
        let synced = if outs.is_empty() {
            Ok(())
        } else {
            store
                .make_durable(outs)
                .map_err(|e| CommitError::Flush(e.to_string()))
        };
        for (waiters, failed) in answers {
            let result = match (failed, &synced) {
                (Some(e), _) => Err(e),
                (None, Err(e)) => Err(e.clone()),
                (None, Ok(())) => Ok(()),
            };
            if let Err(e) = &result {
                log::error!(
                    "store flush failed for {} waiting writes: {e}",
                    waiters.len()
                );
            }
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }
}
