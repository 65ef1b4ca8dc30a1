//! A full disk: on a small tmpfs that the test mounts, a send that cannot
//! be stored is answered with an error line, never `done`, and stores
//! nothing; everything acknowledged before is kept; the server exits with
//! status 1 for its service manager to restart it, and once space returns
//! the restarted server serves again. Needs root to mount; where that is
//! not allowed the test says so and does nothing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use csm::client::{receive_message, send_message, ClientError, Outgoing};
use csm_actors::proto::data::{Attachment, MessageData};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).ok()?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .ok()?;
    status.success().then(|| Mount(at.to_owned()))
}

fn big(n: usize) -> Vec<u8> {
    MessageData::new(
        &format!("filler {n}"),
        vec![Attachment::new("blob", vec![n as u8; 1 << 20])],
    )
    .encode()
    .unwrap()
}

#[tokio::test]
async fn a_full_disk_refuses_sends_and_recovers() {
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("small");
    let Some(_mount) = mount_tmpfs(&mnt, "64m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    // Space to give back later.
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![0u8; 24 << 20]).unwrap();
    let data_dir = mnt.join("data");
    let server = start_binary(&data_dir);
    let connector = csm::client::Connector::for_data_dir(&data_dir).unwrap();
    for user in ["alice", "bob"] {
        let request = csm::admin::protocol::Request::UserAdd {
            name: user.into(),
            password: password_of(user),
        };
        csm::admin::execute(&data_dir, request).unwrap();
    }
    let send = |id: String, data: Vec<u8>, addr| {
        let connector = connector.clone();
        async move {
            let recipients = vec!["bob".to_string()];
            let pw = password_of("alice");
            let outgoing = Outgoing {
                username: "alice",
                password: &pw,
                id: &id,
                recipients: &recipients,
                data: &data,
            };
            send_message(&connector, addr, &outgoing).await
        }
    };
    let receive = |id: String, addr| {
        let connector = connector.clone();
        async move { receive_message(&connector, addr, "bob", &password_of("bob"), &id).await }
    };
    let first = sample_data("before the disk filled");
    send("first".into(), first.clone(), server.message)
        .await
        .unwrap();

    let mut refused = None;
    for n in 0..200 {
        match send(format!("fill-{n}"), big(n), server.message).await {
            Ok(()) => continue,
            Err(ClientError::Refused(e)) => {
                refused = Some((n, e));
                break;
            }
            Err(e) => panic!("a full disk must be answered with an error line: {e}"),
        }
    }
    let (filled, error) = refused.expect("the disk filled up");
    eprintln!("disk full after {filled} messages of 1 MiB: {error}");

    // sled 0.34.7 stays failed after a write error until the store is
    // reopened, so the server exits with status 1 for its service manager
    // (systemd's Restart=on-failure) to start it again.
    let mut child = server.child;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server must exit after its store failed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    std::fs::remove_file(&ballast).unwrap();
    let server = start_binary(&data_dir);
    assert_eq!(
        receive("first".into(), server.message).await.unwrap().data,
        first,
        "acknowledged before the disk filled"
    );
    for n in 0..filled {
        let id = format!("fill-{n}");
        assert_eq!(
            receive(id.clone(), server.message).await.unwrap().data,
            big(n),
            "{id} was acknowledged, so it is kept"
        );
    }
    match receive(format!("fill-{filled}"), server.message).await {
        Err(ClientError::Refused(e)) => assert!(e.text.contains("no such message"), "{e}"),
        other => panic!("the refused send must not be stored: {other:?}"),
    }
    send("after".into(), sample_data("after"), server.message)
        .await
        .unwrap();
    assert_eq!(
        receive("after".into(), server.message).await.unwrap().data,
        sample_data("after")
    );
    server.kill();
}
