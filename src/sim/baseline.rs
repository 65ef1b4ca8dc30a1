//! The ceiling of this machine, measured in the same run as a scenario:
//! the rate of bare TLS exchanges (connect, handshake, one byte each way,
//! close — what a message stream costs before csm does anything) against a
//! server with the same TLS settings as csm, and the rate of argon2id
//! verifications with csm's parameters on every core.
//!
//! The TLS server runs on a thread of its own, which reads its own CPU time:
//! that gives what the server side of one bare exchange costs, the floor
//! under any message stream of csm's (W3 pays it twice per message).

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
    /// CPU of the TLS server's thread per exchange it served, in µs: the
    /// handshake, the byte each way and the close, with the kernel's work
    /// done in that thread's system calls.
    pub tls_server_cpu_us_per_exchange: Option<f64>,
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
        tls_exchanges_per_sec: tls.exchanges_per_sec,
        tls_server_cpu_us_per_exchange: tls.server_cpu_us_per_exchange,
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

/// What the bare TLS exchanges measured.
struct TlsRate {
    exchanges_per_sec: f64,
    server_cpu_us_per_exchange: Option<f64>,
}

/// The CPU time of the calling thread.
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill in.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (status == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

fn tls_rate(duration: Duration, concurrency: usize) -> Result<TlsRate> {
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
    let served = Arc::new(AtomicU64::new(0));
    let server_served = served.clone();
    let server = std::thread::spawn(move || {
        let cpu_at_start = thread_cpu_time();
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
                let served = server_served.clone();
                actix::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        let mut byte = [0u8; 1];
                        if tls.read_exact(&mut byte).await.is_ok()
                            && tls.write_all(&byte).await.is_ok()
                        {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        thread_cpu_time()
            .zip(cpu_at_start)
            .map(|(end, start)| end.saturating_sub(start))
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
    let server_cpu = server
        .join()
        .map_err(|_| anyhow::anyhow!("baseline server panicked"))
        .context("TLS baseline")?;
    let served = served.load(Ordering::Relaxed);
    Ok(TlsRate {
        exchanges_per_sec: rate,
        server_cpu_us_per_exchange: server_cpu
            .filter(|_| served > 0)
            .map(|cpu| cpu.as_secs_f64() * 1e6 / served as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_servers_cpu_per_exchange_is_measured() {
        let measured = tls_rate(Duration::from_millis(300), 4).expect("baseline runs");
        assert!(measured.exchanges_per_sec > 0.0);
        let cpu = measured
            .server_cpu_us_per_exchange
            .expect("the server thread's CPU is read");
        // A TLS 1.3 handshake's key exchange alone takes tens of µs; a
        // whole second per exchange would mean the count or the clock is
        // wrong.
        assert!(cpu > 1.0 && cpu < 1e6, "{cpu} µs per exchange");
    }
}
