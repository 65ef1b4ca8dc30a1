//! `csm client`: the bundled client, run as a user runs it (the binary,
//! against a real server over TLS), with every readable failure, and the
//! chat on a real pseudo-terminal.

mod common;
#[path = "common/pty.rs"]
mod pty;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use csm::client::ClientError;
use csm_actors::proto::lines::ErrorCode;
use csm_actors::proto::{Packet, Status};

/// `csm client` with `server`'s ports and certificate, as `user`.
fn client(server: &TestServer, user: &str) -> Command {
    client_trusting(server, user, &server.data_dir)
}

/// [`client`] trusting the certificate in `data_dir`.
fn client_trusting(server: &TestServer, user: &str, data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_csm"));
    command
        .arg("client")
        .arg("--data-dir")
        .arg(data_dir)
        .env("CSM_SESSION_PORT", server.session_addr.port().to_string())
        .env("CSM_MESSAGE_PORT", server.message_addr.port().to_string())
        .env("CSM_SERVER", "127.0.0.1")
        .env("CSM_PASSWORD", password_of(user))
        .env_remove("CSM_FINGERPRINT")
        .env_remove("RUST_LOG");
    command
}

fn run(mut command: Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .expect("run csm client")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit 0, and what it printed.
fn ok(command: Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "csm client failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A non-zero exit with one line on standard error; that line.
fn fails(command: Command) -> String {
    let output = run(command);
    assert!(!output.status.success(), "csm client succeeded: {output:?}");
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line of error, got {stderr:?}"
    );
    assert!(stderr.starts_with("csm client: "), "{stderr:?}");
    stderr
}

/// A running `csm client watch`, its standard output read line by line.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watch {
    fn start(mut command: Command) -> Watch {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start watch");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watch {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line that holds `part`, failing after [`WAIT`].
    fn expect(&mut self, part: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(part) {
                        return line;
                    }
                }
                Err(_) => panic!("watch never printed {part:?}; it printed {:?}", self.seen),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn users(server: &TestServer, names: &[&str]) {
    for name in names {
        server.add_user(name, &password_of(name));
    }
}

/// Whether `user`'s mailbox still holds `id`.
async fn waiting(server: &TestServer, user: &str, id: &str) -> bool {
    match csm::client::fetch_message(
        &server.connector,
        server.message_addr,
        user,
        &password_of(user),
        id,
        false,
    )
    .await
    {
        Ok(_) => true,
        Err(ClientError::Refused(e)) if e.code == ErrorCode::NoSuchMessage => false,
        Err(e) => panic!("checking {id}: {e}"),
    }
}

#[actix_rt::test]
async fn watch_prints_presence_and_notices_as_lines() {
    let server = TestServer::start();
    users(&server, &["alice", "bob"]);
    let mut watch = Watch::start({
        let mut c = client(&server, "bob");
        c.args(["watch", "bob"]);
        c
    });
    let line = watch.expect("signed on as bob");
    assert!(
        line.ends_with("signed on as bob; 2 users: alice, bob"),
        "{line}"
    );
    let clock = &line[..8];
    assert!(
        clock.chars().enumerate().all(|(i, c)| if i == 2 || i == 5 {
            c == ':'
        } else {
            c.is_ascii_digit()
        }),
        "{line}"
    );

    let mut alice = server.login("alice").await;
    assert!(watch.expect("alice is").ends_with(" alice is online"));
    alice.send(&Packet::Idle { idle_secs: 300 }).await.unwrap();
    assert!(watch.expect("alice is").ends_with(" alice is idle (5 min)"));
    alice.send(&Packet::NotIdle {}).await.unwrap();
    assert!(watch.expect("alice is").ends_with(" alice is back"));

    let sent = ok({
        let mut c = client(&server, "alice");
        c.args(["send", "alice", "--to", "bob", "--text", "hi bob"]);
        c
    });
    let id = sent.trim();
    assert!(
        !id.is_empty() && !id.contains('\n'),
        "one id printed: {sent:?}"
    );
    let notice = watch.expect("message");
    assert!(
        notice.ends_with(&format!(" message {id} from alice (12 B)")),
        "{notice}"
    );
    server.add_user("carol", &password_of("carol"));
    assert!(watch.expect("carol").ends_with(" carol was added"));
    alice.close().await;
    assert!(watch.expect("alice is").ends_with(" alice is offline"));
    // Watching does not receive: the message is still waiting.
    assert!(waiting(&server, "bob", id).await);
}

#[actix_rt::test]
async fn watch_receive_saves_each_message_before_acknowledging_it() {
    let server = TestServer::start();
    users(&server, &["alice", "bob"]);
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("inbox");
    let mut watch = Watch::start({
        let mut c = client(&server, "bob");
        c.args(["watch", "bob", "--json", "--receive"]).arg(&saved);
        c
    });
    let signed_on: serde_json::Value = serde_json::from_str(&watch.expect("signed-on")).unwrap();
    assert_eq!(signed_on["users"], serde_json::json!(["alice", "bob"]));

    let attachment = dir.path().join("../evil name.bin");
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    std::fs::write(&attachment, &bytes).unwrap();
    let id = ok({
        let mut c = client(&server, "alice");
        c.args([
            "send",
            "alice",
            "--to",
            "bob",
            "--text",
            "see attached",
            "--attach",
        ])
        .arg(&attachment);
        c
    });
    let id = id.trim();
    let notice: serde_json::Value = serde_json::from_str(&watch.expect("\"message\"")).unwrap();
    assert_eq!(notice["id"], id);
    assert_eq!(notice["from"], "alice");
    let done: serde_json::Value = serde_json::from_str(&watch.expect("\"saved\"")).unwrap();
    let path = Path::new(done["path"].as_str().unwrap());
    assert!(path.starts_with(&saved), "{path:?}");
    let message = std::fs::read_to_string(path.join("message.txt")).unwrap();
    assert!(
        message.starts_with(&format!("From: alice\nTo: bob\nId: {id}\n")),
        "{message}"
    );
    assert!(message.ends_with("\nsee attached\n"), "{message}");
    assert_eq!(std::fs::read(path.join("evil_name.bin")).unwrap(), bytes);
    // Saved, then acknowledged: gone from the mailbox.
    let deadline = Instant::now() + WAIT;
    while waiting(&server, "bob", id).await {
        assert!(
            Instant::now() < deadline,
            "the message was never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn inbox_lists_and_receive_keeps_each_message_before_its_done() {
    let server = TestServer::start();
    users(&server, &["alice", "bob"]);
    server
        .send("alice", "plain", &["bob"], &sample_text("just text"))
        .await
        .unwrap();
    server
        .send("alice", "with-files", &["bob"], &sample_data("files"))
        .await
        .unwrap();

    let listed = ok({
        let mut c = client(&server, "bob");
        c.args(["inbox", "bob"]);
        c
    });
    let rows: Vec<&str> = listed.lines().collect();
    assert_eq!(rows.len(), 3, "{listed}");
    assert!(rows[0].starts_with("ID") && rows[0].contains("FROM") && rows[0].ends_with("SIZE"));
    assert!(
        rows[1].starts_with("plain ") && rows[1].contains(" alice "),
        "{listed}"
    );
    assert!(
        rows[2].starts_with("with-files ") && rows[2].contains(" alice "),
        "{listed}"
    );
    let json = ok({
        let mut c = client(&server, "bob");
        c.args(["inbox", "bob", "--json"]);
        c
    });
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "plain");
    assert_eq!(first["size"], sample_text("just text").len());

    // Without --save the text is printed and acknowledged; the one with
    // attachments cannot be printed, so it stays.
    let output = run({
        let mut c = client(&server, "bob");
        c.args(["receive", "bob"]);
        c
    });
    assert!(!output.status.success());
    let stdout = text(&output.stdout);
    assert!(
        stdout.starts_with("From: alice\nTo: bob\nId: plain\n\njust text\n"),
        "{stdout}"
    );
    assert!(
        text(&output.stderr).contains("with-files: it has 2 attachment(s)"),
        "{output:?}"
    );
    assert!(!waiting(&server, "bob", "plain").await);
    assert!(waiting(&server, "bob", "with-files").await);

    let dir = tempfile::tempdir().unwrap();
    ok({
        let mut c = client(&server, "bob");
        c.args(["receive", "bob", "with-files", "--save"])
            .arg(dir.path());
        c
    });
    let kept = dir.path().join("with-files");
    assert_eq!(
        std::fs::read(kept.join("notes.txt")).unwrap(),
        b"line one\nline two\n"
    );
    assert_eq!(std::fs::read(kept.join("blob__.bin")).unwrap().len(), 5000);
    assert!(!waiting(&server, "bob", "with-files").await);
    let empty = ok({
        let mut c = client(&server, "bob");
        c.args(["inbox", "bob"]);
        c
    });
    assert_eq!(empty.trim(), "no messages waiting for bob");
}

fn sample_text(text: &str) -> Vec<u8> {
    csm_actors::proto::MessageData::new(text, Vec::new())
        .encode()
        .unwrap()
}

#[actix_rt::test]
async fn send_tries_again_with_the_same_id_until_done() {
    let dir = tempfile::tempdir().unwrap();
    // The first start makes the certificate; the server is then down while
    // the client begins.
    let first = start_binary(dir.path());
    for user in ["alice", "bob"] {
        let mut add = Command::new(env!("CARGO_BIN_EXE_csm"));
        add.args(["admin", "--data-dir"])
            .arg(dir.path())
            .args(["user", "add", user, "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        let mut child = add.spawn().unwrap();
        writeln!(child.stdin.take().unwrap(), "{}", password_of(user)).unwrap();
        assert!(child.wait().unwrap().success());
    }
    let (session, message) = (first.session, first.message);
    first.kill();

    let mut send = Command::new(env!("CARGO_BIN_EXE_csm"));
    send.arg("client")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--server", "127.0.0.1"])
        .args(["--session-port", &session.port().to_string()])
        .args(["--message-port", &message.port().to_string()])
        .env("CSM_PASSWORD", password_of("alice"))
        .args([
            "send",
            "alice",
            "--to",
            "bob",
            "--text",
            "late",
            "--id",
            "retry-1",
            "--retries",
            "8",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = send.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let mut server = serve_at(
        Command::new(env!("CARGO_BIN_EXE_csm")),
        dir.path(),
        session,
        message,
    );
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(text(&output.stdout), "retry-1\n");
    let stderr = text(&output.stderr);
    assert!(
        stderr
            .contains("connection refused; is the server running?; trying again with the same id"),
        "{stderr}"
    );

    // The same id again is the same message: done, and one copy.
    let as_user = |user: &str, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_csm"));
        c.arg("client")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--server", "127.0.0.1"])
            .args(["--session-port", &session.port().to_string()])
            .args(["--message-port", &message.port().to_string()])
            .env("CSM_PASSWORD", password_of(user))
            .args(args);
        run(c)
    };
    let again = as_user(
        "alice",
        &[
            "send", "alice", "--to", "bob", "--text", "late", "--id", "retry-1",
        ],
    );
    assert!(again.status.success(), "{again:?}");
    let inbox = as_user("bob", &["inbox", "bob", "--json"]);
    assert_eq!(text(&inbox.stdout).lines().count(), 1, "{inbox:?}");
    let _ = server.kill();
    let _ = server.wait();
}

#[actix_rt::test]
async fn every_failure_is_one_readable_line_and_a_non_zero_exit() {
    let server = TestServer::start_with(|config| config.limits.mailbox_messages = 1);
    users(&server, &["alice", "bob"]);
    let send = |user: &str, password: &str, to: &str| {
        let mut c = client(&server, user);
        c.env("CSM_PASSWORD", password).args([
            "send",
            user,
            "--to",
            to,
            "--text",
            "x",
            "--retries",
            "0",
        ]);
        c
    };

    let wrong = fails(send("alice", "not-her-password", "bob"));
    assert!(
        wrong.contains("the server refused: ") && wrong.contains("(auth)"),
        "{wrong}"
    );
    let login = fails({
        let mut c = client(&server, "bob");
        c.env("CSM_PASSWORD", "nope").args(["watch", "bob"]);
        c
    });
    assert_eq!(
        login,
        "csm client: login refused: unknown user or wrong password\n"
    );
    let unknown = fails(send("alice", &password_of("alice"), "nobody"));
    assert!(
        unknown.contains("(unknown-recipient)") && unknown.contains("nobody"),
        "{unknown}"
    );

    ok(send("alice", &password_of("alice"), "bob"));
    let quota = fails(send("alice", &password_of("alice"), "bob"));
    assert!(quota.contains("(quota)"), "{quota}");

    let fingerprint = "AB".repeat(32);
    let untrusted = fails({
        let mut c = client(&server, "bob");
        c.args(["--fingerprint", &fingerprint, "inbox", "bob"]);
        c
    });
    assert!(
        untrusted.contains("cannot trust 127.0.0.1")
            && untrusted.contains("is not the expected AB:AB:"),
        "{untrusted}"
    );
    let no_cert = fails({
        let mut c = client_trusting(&server, "bob", Path::new("/nonexistent"));
        c.args(["inbox", "bob"]);
        c
    });
    assert!(no_cert.contains("no certificate to trust"), "{no_cert}");
    let no_password = fails({
        let mut c = client(&server, "bob");
        c.env_remove("CSM_PASSWORD").args(["inbox", "bob"]);
        c
    });
    assert!(
        no_password.contains("--password-stdin or set CSM_PASSWORD"),
        "{no_password}"
    );

    let port = free_addr().port().to_string();
    let down = fails({
        let mut c = client(&server, "bob");
        c.env("CSM_SESSION_PORT", &port).args(["inbox", "bob"]);
        c
    });
    assert!(
        down.contains("connection refused; is the server running?"),
        "{down}"
    );
    // The server goes on serving the others.
    ok({
        let mut c = client(&server, "bob");
        c.args(["inbox", "bob"]);
        c
    });
}

#[actix_rt::test]
async fn chat_on_a_terminal_shows_presence_sends_receives_and_goes_idle() {
    let server = TestServer::start();
    users(&server, &["alice", "bob", "carol"]);
    let mut bob = server.login("bob").await;
    read_sign_on(&mut bob, 1, 0).await;

    let mut command = client(&server, "alice");
    command.args(["chat", "alice", "--idle-after", "3s"]);
    let mut chat = pty::Pty::spawn(command, 30, 100);
    chat.wait_for("bob online and carol offline", WAIT, |screen| {
        screen.contains("bob online") && screen.contains("carol offline")
    });
    assert_eq!(next_status(&mut bob).await.0, "alice");

    chat.type_bytes(b"hello bob\r");
    let (id, from) = match next(&mut bob).await {
        Packet::MessageAvailable { id, from, .. } => (id, from),
        other => panic!("expected a notice, got {other:?}"),
    };
    assert_eq!(from, "alice");
    let got = server.receive("bob", &id).await.unwrap();
    let data = csm_actors::proto::MessageData::parse(&got.data, Default::default()).unwrap();
    assert_eq!(data.text(), "hello bob");
    assert_eq!(got.recipients, ["bob"]);
    chat.wait_for("the send marked done", WAIT, |screen| {
        screen.contains("you: hello bob ✓")
    });

    server
        .send("bob", "to-alice", &["alice"], &sample_text("hi alice"))
        .await
        .unwrap();
    chat.wait_for("bob's message", WAIT, |screen| {
        screen.contains("bob: hi alice")
    });
    let deadline = Instant::now() + WAIT;
    while waiting(&server, "alice", "to-alice").await {
        assert!(
            Instant::now() < deadline,
            "the shown message was never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // No key for three seconds: bob hears alice is idle; a key brings her back.
    let (user, status, _) = next_status(&mut bob).await;
    assert_eq!((user.as_str(), status), ("alice", Status::Idle));
    chat.type_bytes(b"\x1b[B");
    let (user, status, _) = next_status(&mut bob).await;
    assert_eq!((user.as_str(), status), ("alice", Status::Back));
    chat.wait_for("carol chosen", WAIT, |screen| {
        screen.contains("Message to carol")
    });

    let mut carol = server.login("carol").await;
    read_sign_on(&mut carol, 2, 0).await;
    assert_eq!(next_status(&mut bob).await.0, "carol");
    chat.wait_for("carol online", WAIT, |screen| {
        screen.contains("carol online")
    });
    bob.send(&Packet::Idle { idle_secs: 600 }).await.unwrap();
    chat.wait_for("bob idle", WAIT, |screen| {
        screen.contains("bob idle (10 min)")
    });

    chat.type_bytes(b"\x1b");
    let status = chat.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    let (user, status, _) = next_status(&mut bob).await;
    assert_eq!((user.as_str(), status), ("alice", Status::Offline));
}
