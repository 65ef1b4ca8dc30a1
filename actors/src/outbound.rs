//! A session's way out: a bounded queue of encoded frames and the writer
//! task that drains it into the TLS stream. Producers (presence fan-out,
//! mailbox notices, the session itself) never wait: when the queue is full
//! the reader on the other end is not keeping up, and the session is closed
//! rather than let server memory grow. The writer coalesces whatever is
//! queued into one buffer and one write, so a burst of small packets costs
//! one TLS record, and gives every write a deadline.
//!
//! A producer may ask to hear when its frames are written
//! ([`Outbound::push_tracked`]): a sender's `done` waits for its
//! recipients' `MessageAvailable`, whichever threads the two run on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

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

/// Encoded frames, and whom to tell once they are handed to the socket.
struct Queue {
    bytes: Bytes,
    written: Option<oneshot::Sender<()>>,
}

/// The producer side; cheap to clone, never blocks.
#[derive(Clone)]
pub struct Outbound {
    frames: mpsc::Sender<Queue>,
    shared: Arc<Shared>,
}

impl Outbound {
    /// Queues encoded frames. False if the session is closed or closing;
    /// a full queue closes the session.
    pub fn push(&self, frames: Bytes) -> bool {
        self.queue(Queue {
            bytes: frames,
            written: None,
        })
    }

    /// [`Outbound::push`], and a receiver that resolves once the frames
    /// are handed to the socket (or fails when the session ends first).
    pub fn push_tracked(&self, frames: Bytes) -> Option<oneshot::Receiver<()>> {
        let (tell, written) = oneshot::channel();
        self.queue(Queue {
            bytes: frames,
            written: Some(tell),
        })
        .then_some(written)
    }

    fn queue(&self, queue: Queue) -> bool {
        match self.frames.try_send(queue) {
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

/// Frames queued for sessions, to wait until all are written.
#[derive(Default)]
pub struct Queued(Vec<oneshot::Receiver<()>>);

impl Queued {
    /// Queues `frames` on `outbound` and remembers it.
    pub fn push(&mut self, outbound: &Outbound, frames: Bytes) {
        if let Some(written) = outbound.push_tracked(frames) {
            self.0.push(written);
        }
    }

    /// Queues `frames` on `outbound`, with a receipt here when there is a
    /// `Queued` to keep it (a sender waits), plainly otherwise.
    pub fn push_to(queued: Option<&mut Queued>, outbound: &Outbound, frames: Bytes) {
        match queued {
            Some(queued) => queued.push(outbound, frames),
            None => {
                outbound.push(frames);
            }
        }
    }

    /// Waits until every frame is written (or its session ended), at most
    /// `limit`: a session whose peer does not read is not waited for
    /// longer. True if all were written in time.
    pub async fn written(self, limit: Duration) -> bool {
        let all = futures_util::future::join_all(self.0);
        tokio::time::timeout(limit, all).await.is_ok()
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
    mut frames: mpsc::Receiver<Queue>,
    shared: Arc<Shared>,
    write_timeout: Duration,
    max_coalesce: usize,
) -> WriterEnd {
    let end = loop {
        let Queue {
            bytes: first,
            written,
        } = tokio::select! {
            biased;
            _ = shared.close.notified() => break WriterEnd::Closed,
            next = frames.recv() => match next {
                Some(frame) => frame,
                None => break WriterEnd::Closed,
            },
        };
        // Who waits for this batch to be written.
        let mut waiting: Vec<oneshot::Sender<()>> = written.into_iter().collect();
        if shared.closing.load(Ordering::Acquire) {
            break WriterEnd::Closed;
        }
        // Gather what else is queued into one write; the batch is dropped
        // after it, so an idle session holds no buffer of its own.
        let mut batch: Option<Vec<u8>> = None;
        while batch.as_ref().map_or(first.len(), Vec::len) < max_coalesce {
            match frames.try_recv() {
                Ok(Queue {
                    bytes: more,
                    written,
                }) => {
                    waiting.extend(written);
                    batch
                        .get_or_insert_with(|| {
                            let mut joined =
                                Vec::with_capacity(max_coalesce.min(first.len() * 8 + more.len()));
                            joined.extend_from_slice(&first);
                            joined
                        })
                        .extend_from_slice(&more)
                }
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
            Ok(Ok(())) => {
                for tell in waiting {
                    let _ = tell.send(());
                }
            }
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

/// A writer that waits before each write (the failpoints build only): a
/// session writer on a busy thread, for the tests of ordering.
#[cfg(feature = "failpoints")]
pub struct SlowWriter<W> {
    inner: W,
    delay: Duration,
    waiting: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

#[cfg(feature = "failpoints")]
impl<W> SlowWriter<W> {
    pub fn new(inner: W, delay: Duration) -> SlowWriter<W> {
        SlowWriter {
            inner,
            delay,
            waiting: None,
        }
    }
}

#[cfg(feature = "failpoints")]
impl<W: AsyncWrite + Unpin> AsyncWrite for SlowWriter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !self.delay.is_zero() {
            let delay = self.delay;
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            std::task::ready!(std::future::Future::poll(waiting.as_mut(), cx));
            self.waiting = None;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
    async fn a_tracked_frame_is_reported_once_written_and_never_before() {
        let (client, mut server) = tokio::io::duplex(4);
        let (out, writer) = channel(client, 16, Duration::from_secs(5), 1 << 16);
        let task = tokio::spawn(writer);
        assert!(out.push(Bytes::from_static(b"12345678")));
        let mut receipt = out.push_tracked(Bytes::from_static(b"ab")).unwrap();
        // The pipe holds 4 bytes and nobody reads: not written yet.
        let early = tokio::time::timeout(Duration::from_millis(50), &mut receipt).await;
        assert!(early.is_err(), "reported before it was written");
        let mut got = [0u8; 10];
        let reading = tokio::spawn(async move {
            server.read_exact(&mut got).await.unwrap();
            got
        });
        let written = tokio::time::timeout(Duration::from_secs(5), receipt).await;
        assert!(matches!(written, Ok(Ok(()))));
        assert_eq!(&reading.await.unwrap(), b"12345678ab");

        // A session that ends first does not keep its waiter waiting.
        let (client, _never_reads) = tokio::io::duplex(1);
        let (out, writer) = channel(client, 16, Duration::from_secs(5), 1 << 16);
        let task2 = tokio::spawn(writer);
        let mut queued = Queued::default();
        queued.push(&out, Bytes::from_static(b"never written"));
        out.close();
        assert!(queued.written(Duration::from_secs(5)).await);
        assert_eq!(task2.await.unwrap(), WriterEnd::Closed);
        drop(task);
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
