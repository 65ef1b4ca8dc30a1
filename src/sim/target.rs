//! The server under test: one the simulator spawns on a temporary data
//! directory (`--spawn`), or an external one. Also creates the simulated
//! users, and reads a server process's CPU time and peak memory.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use csm_actors::auth::hash_password;
use csm_actors::store::{unix_now, Directory, SledStore, Store, StoreError, UserRecord};

use crate::admin::protocol::{Failure, FailureKind, Request};
use crate::config::store_dir;

/// Where one node of the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddrs {
    pub session: SocketAddr,
    pub message: SocketAddr,
}

/// One spawned `csm serve` process.
struct Node {
    child: Child,
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    addrs: NodeAddrs,
}

/// A server started by the simulator (one node, or several on one
/// PostgreSQL database); killed when dropped.
pub struct Spawned {
    nodes: Vec<Node>,
}

impl Spawned {
    /// Creates `users` (in a fresh data directory, or in the database at
    /// `store_url`), then starts `nodes` `csm serve` processes with free
    /// loopback ports and waits until each is ready. The first node makes
    /// the certificate; the others serve the same one, as nodes behind one
    /// name do.
    pub fn start(
        users: &[(String, String)],
        extra_args: &[String],
        store_url: Option<&str>,
        nodes: usize,
    ) -> Result<Spawned> {
        let mut spawned = Spawned { nodes: Vec::new() };
        for index in 0..nodes.max(1) {
            let dir = tempfile::tempdir().context("creating a temporary data directory")?;
            let data_dir = dir.path().to_owned();
            let mut args = extra_args.to_vec();
            match (index, store_url) {
                (0, None) => add_users_offline(&data_dir, users)?,
                (0, Some(url)) => add_users_to_database(url, users)?,
                _ => {
                    let (cert, key) = crate::tls::dev_cert_paths(&spawned.nodes[0].data_dir);
                    args.extend([
                        "--cert".into(),
                        cert.display().to_string(),
                        "--key".into(),
                        key.display().to_string(),
                    ]);
                }
            }
            let (child, addrs) = start_ready(&data_dir, &args, index)?;
            spawned.nodes.push(Node {
                child,
                _dir: dir,
                data_dir,
                addrs,
            });
        }
        Ok(spawned)
    }

    pub fn first_data_dir(&self) -> &Path {
        &self.nodes[0].data_dir
    }

    pub fn nodes(&self) -> Vec<NodeAddrs> {
        self.nodes.iter().map(|node| node.addrs).collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|node| node.child.id()).collect()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGTERM first, for a clean shutdown; then make sure.
        for node in &self.nodes {
            unsafe {
                libc::kill(node.child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for node in &mut self.nodes {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = node.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

/// Starts `csm serve` on `data_dir` with free loopback ports and waits
/// until it is ready. Another process can take a free port between the
/// probe and the server's bind: a node that exits before it is ready is
/// started again on other ports, three times at most.
fn start_ready(data_dir: &Path, args: &[String], index: usize) -> Result<(Child, NodeAddrs)> {
    let exe = std::env::current_exe().context("finding the csm binary")?;
    for attempt in 1..=3 {
        let addrs = NodeAddrs {
            session: free_port()?,
            message: free_port()?,
        };
        let mut child = Command::new(&exe)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--session-addr", &addrs.session.to_string()])
            .args(["--message-addr", &addrs.message.to_string()])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("CSM_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .context("starting csm serve")?;
        let started = Instant::now();
        loop {
            if data_dir.join("admin.sock").exists() {
                return Ok((child, addrs));
            }
            if let Some(status) = child.try_wait()? {
                log::warn!(
                    "spawned node {index} exited before it was ready ({status}); try {attempt} of 3"
                );
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("spawned node {index} did not become ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    bail!("spawned node {index} exited before it was ready, three times")
}

fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// The records of `users`, hashed on every core.
fn hash_users(users: &[(String, String)]) -> Result<Vec<(String, UserRecord)>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = users.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || -> Result<Vec<(String, UserRecord)>> {
                    part.iter()
                        .map(|(name, password)| {
                            Ok((
                                name.clone(),
                                UserRecord {
                                    password_hash: hash_password(password)?,
                                    created_unix: unix_now(),
                                },
                            ))
                        })
                        .collect()
                })
            })
            .collect();
        let mut records = Vec::with_capacity(users.len());
        for handle in handles {
            records.extend(
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("a hashing thread panicked"))??,
            );
        }
        Ok(records)
    })
}

/// Creates users directly in a stopped server's store; users that exist
/// are left as they are.
pub fn add_users_offline(data_dir: &Path, users: &[(String, String)]) -> Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let store = SledStore::open(&store_dir(data_dir))?;
    let missing: Vec<(String, String)> = users
        .iter()
        .filter(|(name, _)| !matches!(store.get_user(name), Ok(Some(_))))
        .cloned()
        .collect();
    for (name, record) in hash_users(&missing)? {
        match store.add_user(&name, &record) {
            Ok(()) | Err(StoreError::UserExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    store.flush()?;
    Ok(())
}

/// Creates users directly in a PostgreSQL database (migrating its schema
/// if it is new); users that exist are left as they are.
pub fn add_users_to_database(url: &str, users: &[(String, String)]) -> Result<()> {
    let settings = csm_actors::cluster::PgSettings {
        url: url.to_owned(),
        node: "csm-sim".into(),
        pool_size: 2,
        lease: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pool = csm_actors::cluster::open_pool(&settings).await?;
        let directory = csm_actors::cluster::PgDirectory::new(pool);
        let existing: std::collections::HashSet<String> =
            directory.list_users().await?.into_iter().collect();
        let missing: Vec<(String, String)> = users
            .iter()
            .filter(|(name, _)| !existing.contains(name))
            .cloned()
            .collect();
        for (name, record) in hash_users(&missing)? {
            match directory.add_user(&name, &record).await {
                Ok(()) | Err(StoreError::UserExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
}

/// Creates users on a running server through its admin socket.
pub fn add_users_live(data_dir: &Path, users: &[(String, String)]) -> Result<()> {
    for (name, password) in users {
        let request = Request::UserAdd {
            name: name.clone(),
            password: password.clone(),
        };
        // Hashing a password waits for argon2 behind the logins under way
        // (another simulator's wave): a busy server is asked again.
        let busy = csm_actors::auth::AuthError::Busy.to_string();
        let mut attempts = 0u32;
        loop {
            match crate::admin::execute(data_dir, request.clone()) {
                Ok(_) => break,
                Err(Failure {
                    kind: FailureKind::Refused,
                    message,
                }) if message.contains("already exists") => break,
                Err(e) if e.message.contains(&busy) && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => bail!("creating {name}: {e}"),
            }
        }
    }
    Ok(())
}

/// CPU seconds and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcessUsage {
    pub cpu_secs: f64,
    /// The part of `cpu_secs` spent on the server's argon2 threads.
    pub argon2_cpu_secs: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

/// The usage of several processes added up; `None` if there are none or
/// one cannot be seen.
pub fn process_usage(pids: &[u32]) -> Option<ProcessUsage> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(ProcessUsage::default(), |sum, &pid| {
        let one = one_process_usage(pid)?;
        Some(ProcessUsage {
            cpu_secs: sum.cpu_secs + one.cpu_secs,
            argon2_cpu_secs: sum.argon2_cpu_secs + one.argon2_cpu_secs,
            rss_kib: sum.rss_kib + one.rss_kib,
            peak_rss_kib: sum.peak_rss_kib + one.peak_rss_kib,
        })
    })
}

/// Reads a process's usage; `None` if it cannot be seen.
fn one_process_usage(pid: u32) -> Option<ProcessUsage> {
    let (_, cpu_secs) = task_cpu(&format!("/proc/{pid}/stat"))?;
    // The argon2 threads are named by the server's pool (`csm-argon2-N`)
    // and live as long as it, so their counters are never folded away.
    let argon2_cpu_secs = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| task_cpu(&task.path().join("stat").to_string_lossy()))
        .filter(|(name, _)| name.starts_with("csm-argon2"))
        .map(|(_, secs)| secs)
        .sum();
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
        cpu_secs,
        argon2_cpu_secs,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// This process's CPU seconds (user + system), all threads.
pub fn own_cpu_secs() -> Option<f64> {
    task_cpu("/proc/self/stat").map(|(_, secs)| secs)
}

/// The name and the CPU seconds (user + system) of a process or thread,
/// from its `stat` file.
fn task_cpu(stat_path: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The name is in parentheses and may itself hold spaces or ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((name, (utime + stime) / ticks.max(1.0)))
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
