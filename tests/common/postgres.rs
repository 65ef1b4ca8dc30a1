//! A throwaway PostgreSQL for the tests: one cluster per test binary (a
//! database per test server), initialised in a temp directory, listening on
//! a free loopback port, run as the `postgres` user when the tests run as
//! root (PostgreSQL refuses root), and stopped when the binary exits.
//! Tests that restart the database make a cluster of their own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The server programs, found by the build script.
fn bindir() -> PathBuf {
    PathBuf::from(env!("CSM_PG_BINDIR"))
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL program as the user that may run it.
fn pg_command(program: &str) -> Command {
    let path = bindir().join(program);
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn run(mut command: Command, what: &str) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One running PostgreSQL cluster.
pub struct Postgres {
    dir: PathBuf,
    pub port: u16,
    _temp: tempfile::TempDir,
}

/// Clusters to stop when the test binary exits.
static RUNNING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn stop_all() {
    let dirs = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|p| p.into_inner()));
    for data in dirs {
        let mut stop = pg_command("pg_ctl");
        stop.arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-s", "stop"]);
        let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(temp) = data.parent() {
            let _ = std::fs::remove_dir_all(temp);
        }
    }
}

impl Postgres {
    /// Initialises and starts a new cluster.
    pub fn start() -> Postgres {
        let temp = tempfile::Builder::new()
            .prefix("csm-pg-")
            .tempdir()
            .expect("temp dir");
        let dir = temp.path().to_owned();
        if running_as_root() {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown of {} failed", dir.display());
        }
        let mut initdb = pg_command("initdb");
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"]);
        run(initdb, "initdb").expect("initdb");
        static AT_EXIT: OnceLock<()> = OnceLock::new();
        AT_EXIT.get_or_init(|| {
            // SAFETY: registers a plain function to run at exit.
            unsafe { libc::atexit(stop_all) };
        });
        // A free port can be taken between the check and the start: retry.
        let mut last_error = String::new();
        for _ in 0..10 {
            let port = super::free_addr().port();
            let mut start = pg_command("pg_ctl");
            start
                .arg("-D")
                .arg(dir.join("data"))
                .arg("-l")
                .arg(dir.join("log"))
                .args(["-w", "-s", "-t", "60", "-o"])
                .arg(format!(
                    "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=300 \
                     -c fsync=on -c synchronous_commit=on",
                    dir.display()
                ))
                .arg("start");
            match run(start, "pg_ctl start") {
                Ok(()) => {
                    RUNNING
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(dir.join("data"));
                    return Postgres {
                        dir,
                        port,
                        _temp: temp,
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!(
            "PostgreSQL did not start: {last_error}\n{}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
    }

    /// The cluster shared by this test binary.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    /// The URL of database `name`, created if it does not exist.
    pub fn database(&self, name: &str) -> String {
        let mut psql = pg_command("psql");
        psql.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-q", "-c"])
            .arg(format!("CREATE DATABASE \"{name}\""));
        if let Err(e) = run(psql, "createdb") {
            assert!(e.contains("already exists"), "{e}");
        }
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// A database name for a data directory: the same directory (a
    /// restart) finds the same database.
    pub fn database_for(&self, data_dir: &Path) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        data_dir.hash(&mut hasher);
        self.database(&format!("csm_{:016x}", hasher.finish()))
    }

    /// Runs SQL on database `name`; its output, unaligned.
    pub fn sql(&self, name: &str, sql: &str) -> String {
        let out = pg_command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", name, "-At", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        let mut stop = pg_command("pg_ctl");
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "-s", "stop"]);
        run(stop, "pg_ctl stop").expect("stop");
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) {
        let mut start = pg_command("pg_ctl");
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-s", "-t", "60", "-o"])
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=300",
                self.port,
                self.dir.display()
            ))
            .arg("start");
        for _ in 0..50 {
            if run(start_clone(&start), "pg_ctl start").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        run(start, "pg_ctl start").expect("restart");
    }
}

fn start_clone(command: &Command) -> Command {
    let mut copy = Command::new(command.get_program());
    copy.args(command.get_args());
    copy
}
