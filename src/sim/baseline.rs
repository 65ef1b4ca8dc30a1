//! The ceiling of this machine, measured in the same run as a scenario:
//! the rate of bare TLS exchanges (connect, handshake, one byte each way,
//! close — what a message stream costs before csm does anything) against a
//! server with the same TLS settings as csm, and the rate of argon2id
//! verifications with csm's parameters on every core.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::client::Connector;

/// What the machine can do at most.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// Bare TLS exchanges per second (client and server in this process).
    pub tls_exchanges_per_sec: f64,
    /// argon2id verifications per second on all cores.
    pub argon2_verifies_per_sec: f64,
    pub tls_concurrency: usize,
    pub seconds: f64,
}

/// Measures both rates for `duration` each.
pub fn measure(duration: Duration, concurrency: usize) -> Result<Baseline> {
    let argon2 = argon2_rate(duration)?;
    let tls = tls_rate(duration, concurrency)?;
    Ok(Baseline {
        tls_exchanges_per_sec: tls,
        argon2_verifies_per_sec: argon2,
        tls_concurrency: concurrency,
        seconds: duration.as_secs_f64(),
    })
}

fn argon2_rate(duration: Duration) -> Result<f64> {
    let hash = csm_actors::auth::hash_password("baseline-password")?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while start.elapsed() < duration {
                    let _ = csm_actors::auth::verify_password(&hash, "baseline-password");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

fn tls_rate(duration: Duration, concurrency: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let identity = crate::tls::dev_identity(dir.path())?;
    let acceptor = TlsAcceptor::from(crate::tls::server_config(crate::tls::CertStore::new(
        identity,
    )?)?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = std::thread::spawn(move || {
        let system = actix::System::new();
        system.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while !server_stop.load(Ordering::Relaxed) {
                let accepted =
                    tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
                let Ok(Ok((stream, _))) = accepted else {
                    continue;
                };
                let acceptor = acceptor.clone();
                actix::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        let mut byte = [0u8; 1];
                        if tls.read_exact(&mut byte).await.is_ok() {
                            let _ = tls.write_all(&byte).await;
                        }
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
    });
    let connector = Connector::for_data_dir(dir.path())?;
    let system = actix::System::new();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    system.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let connector = connector.clone();
            let done = done.clone();
            tasks.push(actix::spawn(async move {
                while start.elapsed() < duration {
                    if let Ok(mut tls) = connector.connect(addr).await {
                        let mut byte = [0u8; 1];
                        if tls.write_all(b"x").await.is_ok()
                            && tls.read_exact(&mut byte).await.is_ok()
                        {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("baseline server panicked"))
        .context("TLS baseline")?;
    Ok(rate)
}
