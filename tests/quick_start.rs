//! README's quick start, run step by step as written: every command line
//! of its `sh` blocks, with `cargo run --release --` standing for the
//! built binary, in a fresh directory. Ports come from the environment
//! (`CSM_SESSION_ADDR` and friends) so that the lines stay the README's.

mod common;
#[path = "common/pty.rs"]
mod pty;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::{free_addr, wait_for_admin_socket, WAIT};

/// Every command line of the quick start's `sh` blocks, in order.
fn quick_start_steps() -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("\n## Quick start")
        .expect("README has a quick start");
    let section = &readme[start + 1..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut steps = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        match (in_block, line.trim()) {
            (false, "```sh") => in_block = true,
            (true, "```") => in_block = false,
            (true, "") => {}
            (true, command) => steps.push(command.to_owned()),
            _ => {}
        }
    }
    steps
}

struct Shell {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Shell {
    fn command(&self, line: &str) -> Command {
        let line = line.replace("cargo run --release --", "\"$CSM\"");
        let mut command = Command::new("sh");
        command
            .args(["-c", &line])
            .current_dir(self.dir.path())
            .env("CSM", env!("CARGO_BIN_EXE_csm"))
            .env_remove("CSM_PASSWORD")
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }
}

/// Commands left running (the server, the watch), each a process group
/// of its own: `sh` and what it started are killed together, also when
/// the test fails.
struct Background(Vec<Child>);

impl Background {
    fn spawn(&mut self, mut command: Command) -> &mut Child {
        self.0
            .push(command.process_group(0).spawn().expect("spawn"));
        self.0.last_mut().expect("just pushed")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SAFETY: kill has no memory effects; the group is the child's.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn expect_line(lines: &mpsc::Receiver<String>, part: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(part) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("never printed {part:?}; printed {seen:?}"),
        }
    }
}

#[test]
fn every_step_of_the_readme_quick_start_works() {
    let steps = quick_start_steps();
    let (session, message) = (free_addr(), free_addr());
    let shell = Shell {
        dir: tempfile::tempdir().unwrap(),
        env: vec![
            ("CSM_SESSION_ADDR".into(), session.to_string()),
            ("CSM_MESSAGE_ADDR".into(), message.to_string()),
            ("CSM_SESSION_PORT".into(), session.port().to_string()),
            ("CSM_MESSAGE_PORT".into(), message.port().to_string()),
        ],
    };
    let mut background = Background(Vec::new());
    let mut watch = None;
    let mut sent_id = None;
    let mut kinds = Vec::new();
    for step in &steps {
        if step.ends_with("-- serve") {
            kinds.push("serve");
            let mut command = shell.command(step);
            command.stdout(Stdio::null()).stderr(Stdio::null());
            background.spawn(command);
            wait_for_admin_socket(&shell.dir.path().join("csm-data"));
        } else if step.contains(" client watch ") {
            kinds.push("watch");
            let mut command = shell.command(step);
            command.stdout(Stdio::piped());
            let lines = lines_of(background.spawn(command));
            let line = expect_line(&lines, "signed on as bob");
            assert!(
                line.ends_with("signed on as bob; 2 users: alice, bob"),
                "{line}"
            );
            watch = Some(lines);
        } else if step.contains(" client chat ") {
            kinds.push("chat");
            let mut chat = pty::Pty::spawn(shell.command(step), 24, 100);
            chat.wait_for("the password prompt", WAIT, |s| {
                s.contains("password for alice")
            });
            chat.type_bytes(b"alice-password\r");
            chat.wait_for("bob online", WAIT, |s| s.contains("bob online"));
            chat.type_bytes(b"\x1b");
            assert!(chat.wait_exit(WAIT).success());
        } else {
            let output = shell.command(step).output().unwrap();
            assert!(output.status.success(), "{step}: {output:?}");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            if step.contains(" client send ") {
                kinds.push("send");
                let id = stdout.trim().to_owned();
                let lines = watch.as_ref().expect("the watch runs before the send");
                let notice = expect_line(lines, "message");
                assert!(
                    notice.ends_with(&format!("message {id} from alice (16 B)")),
                    "{notice}"
                );
                sent_id = Some(id);
            } else if step.contains(" client inbox ") {
                kinds.push("inbox");
                let id = sent_id.as_deref().expect("sent before");
                assert!(stdout.lines().any(|l| l.starts_with(id)), "{stdout}");
            } else if step.contains(" client receive ") {
                kinds.push("receive");
                let id = sent_id.as_deref().expect("sent before");
                assert_eq!(
                    stdout,
                    format!("From: alice\nTo: bob\nId: {id}\n\nHello, Bob\n\n"),
                );
            } else if step.contains(" admin user add ") {
                kinds.push("add");
            } else {
                panic!("a quick start step this test does not know: {step}");
            }
        }
    }
    assert_eq!(
        kinds,
        ["serve", "add", "add", "watch", "send", "inbox", "receive", "chat"],
        "the quick start's steps: {steps:#?}"
    );
}
