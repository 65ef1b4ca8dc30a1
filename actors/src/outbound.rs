//! A session's way out: a bounded queue of encoded frames and the writer
//! task that drains it into the TLS stream. Producers (presence fan-out,
//! mailbox notices, the session itself) never wait: when the queue is full
//! the reader on the other end is not keeping up, and the session is closed
//! rather than let server memory grow. The writer coalesces whatever is
//! queued into one buffer and one write, so a burst of small packets costs
//! one TLS record, and gives every write a deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// Why the writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd {
    /// Closed on purpose (session over, user removed, server stopping).
    Closed,
    /// The queue overflowed: the peer does not read.
    SlowReader,
    /// A write did not complete within the write timeout.
    WriteTimeout,
    /// The socket failed.
    Io,
}

struct Shared {
    close: Notify,
    closing: AtomicBool,
    overflowed: AtomicBool,
}

/// The producer side; cheap to clone, never blocks.
#[derive(Clone)]
pub struct Outbound {
    frames: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
}

impl Outbound {
    /// Queues encoded frames. False if the session is closed or closing;
    /// a full queue closes the session.
    pub fn push(&self, frames: Bytes) -> bool {
        match self.frames.try_send(frames) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.shared.overflowed.swap(true, Ordering::AcqRel) {
                    metrics::counter!(crate::metrics::SLOW_READER_CLOSES).increment(1);
                }
                self.close();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the writer to stop; it drops what is queued.
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.close.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire) || self.frames.is_closed()
    }
}

/// Creates a queue of `capacity` entries and its writer future, to be
/// spawned; the future resolves when the writer stops, saying why.
pub fn channel<W>(
    writer: W,
    capacity: usize,
    write_timeout: Duration,
    max_coalesce: usize,
) -> (Outbound, impl std::future::Future<Output = WriterEnd>)
where
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(Shared {
        close: Notify::new(),
        closing: AtomicBool::new(false),
        overflowed: AtomicBool::new(false),
    });
    let outbound = Outbound {
        frames: tx,
        shared: shared.clone(),
    };
    (
        outbound,
        run_writer(writer, rx, shared, write_timeout, max_coalesce),
    )
}

async fn run_writer<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    write_timeout: Duration,
    max_coalesce: usize,
) -> WriterEnd {
    let end = loop {
        let first = tokio::select! {
            biased;
            _ = shared.close.notified() => break WriterEnd::Closed,
            next = frames.recv() => match next {
                Some(frame) => frame,
                None => break WriterEnd::Closed,
            },
        };
        if shared.closing.load(Ordering::Acquire) {
            break WriterEnd::Closed;
        }
        // Gather what else is queued into one write; the batch is dropped
        // after it, so an idle session holds no buffer of its own.
        let mut batch: Option<Vec<u8>> = None;
        while batch.as_ref().map_or(first.len(), Vec::len) < max_coalesce {
            match frames.try_recv() {
                Ok(more) => batch
                    .get_or_insert_with(|| {
                        let mut joined =
                            Vec::with_capacity(max_coalesce.min(first.len() * 8 + more.len()));
                        joined.extend_from_slice(&first);
                        joined
                    })
                    .extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let bytes: &[u8] = batch.as_deref().unwrap_or(&first);
        let write = async {
            writer.write_all(bytes).await?;
            writer.flush().await
        };
        let outcome = tokio::select! {
            biased;
            _ = shared.close.notified() => break WriterEnd::Closed,
            outcome = tokio::time::timeout(write_timeout, write) => outcome,
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break WriterEnd::Io,
            Err(_) => break WriterEnd::WriteTimeout,
        }
    };
    let end = if shared.overflowed.load(Ordering::Acquire) {
        WriterEnd::SlowReader
    } else {
        end
    };
    shared.closing.store(true, Ordering::Release);
    frames.close();
    if end == WriterEnd::Closed {
        let _ = tokio::time::timeout(write_timeout, writer.shutdown()).await;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn coalesces_and_delivers_in_order() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let (out, writer) = channel(client, 16, Duration::from_secs(5), 1 << 16);
        let task = tokio::spawn(writer);
        assert!(out.push(Bytes::from_static(b"ab")));
        assert!(out.push(Bytes::from_static(b"cd")));
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd");
        out.close();
        assert_eq!(task.await.unwrap(), WriterEnd::Closed);
    }

    #[tokio::test]
    async fn a_reader_that_never_reads_is_closed_not_buffered() {
        let (client, _server_never_reads) = tokio::io::duplex(8);
        let (out, writer) = channel(client, 4, Duration::from_secs(30), 64);
        let task = tokio::spawn(writer);
        let mut accepted = 0;
        for _ in 0..100 {
            if out.push(Bytes::from_static(b"0123456789")) {
                accepted += 1;
            }
            tokio::task::yield_now().await;
        }
        assert!(accepted < 100, "queue must refuse once full");
        assert!(out.is_closed());
        assert_eq!(task.await.unwrap(), WriterEnd::SlowReader);
    }
}
