//! The server under test: one the simulator spawns on a temporary data
//! directory (`--spawn`), or an external one. Also creates the simulated
//! users, and reads a server process's CPU time and peak memory.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use csm_actors::auth::hash_password;
use csm_actors::store::{unix_now, SledStore, Store, StoreError, UserRecord};

use crate::admin::protocol::{Failure, FailureKind, Request};
use crate::config::store_dir;

/// A server started by the simulator; killed when dropped.
pub struct Spawned {
    child: Child,
    _dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub session_addr: SocketAddr,
    pub message_addr: SocketAddr,
}

impl Spawned {
    /// Creates `users` in a fresh data directory, then starts `csm serve`
    /// on it with free loopback ports and waits until it is ready.
    pub fn start(users: &[(String, String)], extra_args: &[String]) -> Result<Spawned> {
        let dir = tempfile::tempdir().context("creating a temporary data directory")?;
        let data_dir = dir.path().to_owned();
        add_users_offline(&data_dir, users)?;
        let session_addr = free_port()?;
        let message_addr = free_port()?;
        let exe = std::env::current_exe().context("finding the csm binary")?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--session-addr", &session_addr.to_string()])
            .args(["--message-addr", &message_addr.to_string()])
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("CSM_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .context("starting csm serve")?;
        let spawned = Spawned {
            child,
            _dir: dir,
            data_dir,
            session_addr,
            message_addr,
        };
        let started = Instant::now();
        while !spawned.data_dir.join("admin.sock").exists() {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the spawned server did not become ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(spawned)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGTERM first, for a clean shutdown; then make sure.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Creates users directly in a stopped server's store, hashing on every
/// core; users that exist are left as they are.
pub fn add_users_offline(data_dir: &Path, users: &[(String, String)]) -> Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let store = Arc::new(SledStore::open(&store_dir(data_dir))?);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = users.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                let store = store.clone();
                scope.spawn(move || -> Result<()> {
                    for (name, password) in part {
                        if store.get_user(name)?.is_some() {
                            continue;
                        }
                        let record = UserRecord {
                            password_hash: hash_password(password)?,
                            created_unix: unix_now(),
                        };
                        match store.add_user(name, &record) {
                            Ok(()) | Err(StoreError::UserExists(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a hashing thread panicked"))??;
        }
        Ok(())
    })?;
    store.flush()?;
    Ok(())
}

/// Creates users on a running server through its admin socket.
pub fn add_users_live(data_dir: &Path, users: &[(String, String)]) -> Result<()> {
    for (name, password) in users {
        let request = Request::UserAdd {
            name: name.clone(),
            password: password.clone(),
        };
        match crate::admin::execute(data_dir, request) {
            Ok(_) => {}
            Err(Failure {
                kind: FailureKind::Refused,
                message,
            }) if message.contains("already exists") => {}
            Err(e) => bail!("creating {name}: {e}"),
        }
    }
    Ok(())
}

/// CPU seconds and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcessUsage {
    pub cpu_secs: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

/// Reads a process's usage; `None` if it cannot be seen.
pub fn process_usage(pid: u32) -> Option<ProcessUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcessUsage {
        cpu_secs: (utime + stime) / ticks.max(1.0),
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// Raises this process's open-file limit to its hard limit (a spawned
/// server inherits it); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        limit.rlim_cur
    }
}
