//! Durable to the platter, not only to the page cache: a server run under
//! `strace` must answer every `done` (of a send and of a receive) after an
//! `fdatasync`/`fsync` of the database log that holds it, and sync every
//! file sled writes beside it. sled 0.34.7's own flush ends in
//! `sync_file_range`, which survives a killed process but not a power cut.
//! Needs `strace` (`.ci/run` installs it and sets CSM_REQUIRE_STRACE=1).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use csm::client::{receive_message, send_message, Connector, Outgoing};

/// How many sends, and then receives, one after another.
const ROUNDS: usize = 20;

fn strace_available() -> bool {
    let found = Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CSM_REQUIRE_STRACE").is_none(),
            "strace is required (CSM_REQUIRE_STRACE is set) but not installed"
        );
        eprintln!("strace is not installed: the platter-durability test is left out");
    }
    found
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One traced call: when, on which thread, what, on which path.
struct Call {
    at: f64,
    thread: String,
    name: String,
    path: String,
}

/// Lines like `123 1796234166.689567 fdatasync(12</tmp/x/store/db>) = 0`.
/// With several threads, strace splits a call into `fsync(12</x>
/// <unfinished ...>` and, later, `<... fsync resumed>) = 0` on the same
/// pid: the call is taken at its start, with the path of its first half.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut unfinished: std::collections::HashMap<String, Call> = Default::default();
    let mut calls = Vec::new();
    for line in text.lines() {
        // strace pads the pid column: split on runs of spaces.
        let Some((pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((at, call)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(at) = at.parse::<f64>() else {
            continue;
        };
        if call.starts_with("<... ") {
            if let Some(started) = unfinished.remove(pid) {
                if call.ends_with("= 0") {
                    calls.push(started);
                }
            }
            continue;
        }
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        let Some(path) = args
            .split_once('<')
            .and_then(|(_, p)| p.split_once('>'))
            .map(|(p, _)| p.to_owned())
        else {
            continue;
        };
        let parsed = Call {
            at,
            thread: pid.to_owned(),
            name: name.to_owned(),
            path,
        };
        if call.ends_with("<unfinished ...>") {
            unfinished.insert(pid.to_owned(), parsed);
        } else if call.ends_with("= 0") {
            calls.push(parsed);
        }
    }
    calls
}

fn serve_traced(dir: &Path, trace: &Path, session: SocketAddr, message: SocketAddr) -> Child {
    let mut strace = Command::new("strace");
    strace
        .args([
            "-f",
            "-y",
            "-ttt",
            "-e",
            "trace=fsync,fdatasync,sync_file_range,openat",
            "-o",
        ])
        .arg(trace)
        .arg(env!("CARGO_BIN_EXE_csm"));
    serve_at(strace, dir, session, message)
}

/// The server under strace: the traced child of `strace`.
fn server_pid(strace: &Child) -> i32 {
    let pid = Command::new("pgrep")
        .args(["-P", &strace.id().to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&pid.stdout)
        .trim()
        .parse()
        .expect("server pid")
}

/// Thread id to thread name (as the kernel keeps it, 15 bytes at most).
fn thread_names(pid: i32) -> std::collections::HashMap<String, String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the server's threads")
        .filter_map(|task| {
            let tid = task.ok()?.file_name().into_string().ok()?;
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            Some((tid, name.trim_end().to_owned()))
        })
        .collect()
}

#[actix_rt::test]
async fn every_done_rests_on_an_fsync_of_what_holds_it() {
    if !strace_available() {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let trace = temp.path().join("trace.txt");
    let (session, message) = (free_addr(), free_addr());
    let mut server = serve_traced(&dir, &trace, session, message);
    for user in ["alice", "bob"] {
        let request = csm::admin::protocol::Request::UserAdd {
            name: user.into(),
            password: password_of(user),
        };
        csm::admin::execute(&dir, request).expect("add user");
    }
    let connector = Connector::for_data_dir(&dir).unwrap();
    // Small messages stay in the database; every fourth is large and goes
    // to a spool file of its own.
    let data = |round: usize| {
        let size = if round % 4 == 3 { 100_000 } else { 30_000 };
        let text: String = "x".repeat(1000);
        let attachment = vec![round as u8; size];
        csm_actors::proto::MessageData::new(
            &text,
            vec![csm_actors::proto::Attachment::new("a", attachment)],
        )
        .encode()
        .unwrap()
    };

    let mut dones = Vec::new();
    let recipients = vec!["bob".to_owned()];
    for round in 0..ROUNDS {
        let id = format!("m{round}");
        let bytes = data(round);
        let begun = now_secs();
        send_message(
            &connector,
            message,
            &Outgoing {
                username: "alice",
                password: &password_of("alice"),
                id: &id,
                recipients: &recipients,
                data: &bytes,
            },
        )
        .await
        .expect("send");
        dones.push(("send", round, begun, now_secs()));
    }
    // The names of the server's threads, while those that synced the large
    // sends' files are still there.
    let threads = thread_names(server_pid(&server));
    for round in 0..ROUNDS {
        let begun = now_secs();
        let got = receive_message(
            &connector,
            message,
            "bob",
            &password_of("bob"),
            &format!("m{round}"),
        )
        .await
        .expect("receive");
        assert_eq!(got.data, data(round));
        dones.push(("receive", round, begun, now_secs()));
    }
    // SIGTERM: the server drains and exits, and strace with it.
    unsafe { libc::kill(server_pid(&server), libc::SIGTERM) };
    assert!(server.wait().unwrap().success());

    let calls = parse_trace(&std::fs::read_to_string(&trace).unwrap());
    let store = dir.join("store");
    let log = store.join("db").display().to_string();
    let is_sync = |c: &Call| c.name == "fsync" || c.name == "fdatasync";
    // Each exchange ran alone, so the one sync that made it durable lies
    // between its start and its done.
    for (what, round, begun, done) in &dones {
        let synced = calls
            .iter()
            .any(|c| is_sync(c) && c.path == log && c.at >= *begun && c.at <= *done);
        assert!(
            synced,
            "{what} {round}: no fsync/fdatasync of {log} before its done; syncs seen: {:?}",
            calls
                .iter()
                .filter(|c| c.at >= *begun && c.at <= *done)
                .map(|c| format!("{} {}", c.name, c.path))
                .collect::<Vec<_>>()
        );
    }
    // Every large send synced its spool file and the spool directory.
    let spool = store.join("spool").display().to_string();
    for (what, round, begun, done) in dones.iter().filter(|d| d.0 == "send" && d.1 % 4 == 3) {
        let in_window = |path: &dyn Fn(&str) -> bool| {
            calls
                .iter()
                .any(|c| is_sync(c) && path(&c.path) && c.at >= *begun && c.at <= *done)
        };
        assert!(
            in_window(&|p| p.starts_with(&format!("{spool}/"))),
            "{what} {round}: spool file not synced"
        );
        assert!(
            in_window(&|p| p == spool),
            "{what} {round}: spool directory not synced"
        );
    }
    // Those syncs ran on the blocking pool: an event loop, or the mailbox
    // actor's thread that records every send, would stop everything it
    // serves for as long as a large file takes to reach the disk.
    let spool_syncs: Vec<&Call> = calls
        .iter()
        .filter(|c| is_sync(c) && c.path.starts_with(&format!("{spool}/")))
        .collect();
    assert!(!spool_syncs.is_empty(), "no spool file was synced");
    for call in spool_syncs {
        let name = threads
            .get(&call.thread)
            .unwrap_or_else(|| panic!("thread {} of a spool sync is gone", call.thread));
        assert!(
            !name.starts_with("actix-rt") && name != "csm",
            "a spool file was synced on the event loop or actor thread {name:?}"
        );
    }
    // Every file sled wrote beside its log (a blob: a page too big for the
    // log) was synced, and its directory with it.
    let text = std::fs::read_to_string(&trace).unwrap();
    let blobs = format!("{}/", store.join("blobs").display());
    let created: Vec<String> = text
        .lines()
        .filter(|l| l.contains("openat(") && l.contains("O_CREAT") && l.contains(&blobs))
        .filter_map(|l| Some(l.split_once('"')?.1.split_once('"')?.0.to_owned()))
        .collect();
    for blob in &created {
        assert!(
            calls.iter().any(|c| is_sync(c) && c.path == *blob),
            "blob {blob} was never synced"
        );
    }
    eprintln!(
        "{} syncs of the log for {} exchanges; {} blobs written, each synced",
        calls.iter().filter(|c| is_sync(c) && c.path == log).count(),
        dones.len(),
        created.len()
    );
}
