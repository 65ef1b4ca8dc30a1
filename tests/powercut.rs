//! A simulated power cut right after the last `done`: the server runs with
//! `tests/powercut/shim.c` preloaded, which keeps each store file's content
//! as of its last fsync/fdatasync. After SIGKILL the test puts those copies
//! back and drops every store file that was never synced. That is what a
//! disk holds after losing power: every write that no sync covered is
//! gone. Every message acknowledged with `done` must then still be there,
//! byte for byte, and every receive confirmed by the close after `done`
//! must stay removed.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use csm::client::{receive_message, send_message, Connector, Outgoing, SessionClient};
use csm_actors::proto::packet::Decoded;
use csm_actors::proto::Packet;

const SENDS: usize = 40;
const RECEIVED: usize = 10;

/// Builds the shim with the C compiler every Rust toolchain links with.
fn build_shim(dir: &Path) -> PathBuf {
    let out = dir.join("shim.so");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/powercut/shim.c"
        ))
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(status.success(), "building the power-cut shim");
    out
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// The disk after the power cut: synced copies back, unsynced files gone.
fn cut_power(data: &Path, shadow: &Path) -> (usize, Vec<PathBuf>) {
    let mut restored = 0;
    for copy in files_under(shadow) {
        if copy.extension().is_some_and(|e| e == "part") {
            continue;
        }
        let relative = copy.strip_prefix(shadow).unwrap();
        std::fs::copy(&copy, data.join(relative)).unwrap();
        restored += 1;
    }
    let mut dropped = Vec::new();
    for file in files_under(&data.join("store")) {
        let relative = file.strip_prefix(data).unwrap();
        if !shadow.join(relative).exists() {
            std::fs::remove_file(&file).unwrap();
            dropped.push(relative.to_owned());
        }
    }
    (restored, dropped)
}

fn message(n: usize) -> Vec<u8> {
    let attachment = if n % 5 == 4 { 100_000 } else { 2_000 };
    csm_actors::proto::MessageData::new(
        &format!("message {n}"),
        vec![csm_actors::proto::Attachment::new(
            "a",
            vec![n as u8; attachment],
        )],
    )
    .encode()
    .unwrap()
}

#[actix_rt::test]
async fn a_power_cut_right_after_done_loses_nothing_acknowledged() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().canonicalize().unwrap();
    let (data, shadow) = (root.join("data"), root.join("shadow"));
    std::fs::create_dir_all(&data).unwrap();
    let shim = build_shim(&root);
    let (session, message_addr) = (free_addr(), free_addr());
    let mut preloaded = Command::new(env!("CARGO_BIN_EXE_csm"));
    preloaded
        .env("LD_PRELOAD", &shim)
        .env("CSM_SHADOW_ROOT", &data)
        .env("CSM_SHADOW_DIR", &shadow);
    let mut server = serve_at(preloaded, &data, session, message_addr);
    // Through the live server, so that its syncs cover the users too.
    for user in ["alice", "bob"] {
        let request = csm::admin::protocol::Request::UserAdd {
            name: user.into(),
            password: password_of(user),
        };
        csm::admin::execute(&data, request).unwrap();
    }
    let connector = Connector::for_data_dir(&data).unwrap();
    let recipients = vec!["bob".to_owned()];
    for n in 0..SENDS {
        let bytes = message(n);
        send_message(
            &connector,
            message_addr,
            &Outgoing {
                username: "alice",
                password: &password_of("alice"),
                id: &format!("m{n}"),
                recipients: &recipients,
                data: &bytes,
            },
        )
        .await
        .expect("send");
    }
    for n in 0..RECEIVED {
        let got = receive_message(
            &connector,
            message_addr,
            "bob",
            &password_of("bob"),
            &format!("m{n}"),
        )
        .await
        .expect("receive");
        assert_eq!(got.data, message(n));
    }
    // The power goes the moment the last removal was confirmed.
    unsafe { libc::kill(server.id() as i32, libc::SIGKILL) };
    let _ = server.wait();
    let (restored, dropped) = cut_power(&data, &shadow);
    eprintln!(
        "power cut: {restored} files back as last synced; never synced, dropped: {dropped:?}"
    );

    let server = start_binary(&data);
    let mut bob = SessionClient::login(&connector, server.session, "bob", &password_of("bob"))
        .await
        .unwrap();
    let mut waiting = BTreeSet::new();
    loop {
        match bob.recv(Duration::from_secs(1)).await {
            Ok(Some(Decoded::Known(Packet::MessageAvailable { id, .. }))) => {
                waiting.insert(id);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let expected: BTreeSet<String> = (RECEIVED..SENDS).map(|n| format!("m{n}")).collect();
    let lost: Vec<_> = expected.difference(&waiting).collect();
    let back: Vec<_> = waiting.difference(&expected).collect();
    assert!(
        lost.is_empty(),
        "acknowledged and lost in the power cut: {lost:?}"
    );
    assert!(
        back.is_empty(),
        "confirmed removals undone by the power cut: {back:?}"
    );
    for n in RECEIVED..SENDS {
        let got = receive_message(
            &connector,
            server.message,
            "bob",
            &password_of("bob"),
            &format!("m{n}"),
        )
        .await
        .expect("receive after the power cut");
        assert_eq!(got.data, message(n), "m{n} byte for byte");
    }
    server.kill();
}
