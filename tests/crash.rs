//! Crash safety: the server runs under a sending and receiving load and is
//! killed with SIGKILL at random moments, then restarted on the same data
//! directory. Afterwards every message that got `done` is either still
//! waiting or was received, none is there twice, every message whose
//! removal was confirmed is gone, and the users are intact.
//!
//! The test suite runs 5 cycles; `CSM_CRASH_CYCLES=20 cargo test --release
//! --test crash` runs the long form.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{password_of, sample_data, start_binary as start};
use csm_actors::proto::data::{Attachment, MessageData};

/// Data past the spool threshold, different for each id.
fn large_data(id: &str) -> Vec<u8> {
    let body: Vec<u8> = id.bytes().cycle().take(100 * 1024).collect();
    MessageData::new(id, vec![Attachment::new("large.bin", body)])
        .encode()
        .expect("encodable")
}
use csm::admin::protocol::{Reply, Request};
use csm::client::{fetch_message, send_message, Connector, Outgoing};
use rand::Rng;

#[derive(Default)]
struct Books {
    /// Data of every message sent, by id.
    sent: HashMap<String, Vec<u8>>,
    done: BTreeSet<String>,
    /// Read in full by bob at least once.
    seen: BTreeSet<String>,
    /// bob's `done` answered by the close: removal confirmed.
    removed: BTreeSet<String>,
}

#[test]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let cycles: usize = std::env::var("CSM_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let books = Arc::new(Mutex::new(Books::default()));
    let mut counter = 0u64;
    let mut rng = rand::thread_rng();
    for cycle in 0..cycles {
        let mut server = start(dir.path());
        if cycle == 0 {
            for user in ["alice", "bob"] {
                let request = Request::UserAdd {
                    name: user.into(),
                    password: password_of(user),
                };
                csm::admin::execute(dir.path(), request).unwrap();
            }
        }
        let connector = Connector::for_data_dir(dir.path()).unwrap();
        let kill_after = Duration::from_millis(rng.gen_range(200..900));
        let system = actix::System::new();
        let books_here = books.clone();
        let first = counter;
        let message_addr = server.message;
        counter = system.block_on(async move {
            let sender = {
                let books = books_here.clone();
                let connector = connector.clone();
                actix::spawn(async move {
                    let recipients = vec!["bob".to_string()];
                    let mut n = first;
                    loop {
                        let id = format!("crash-{n}");
                        // Every eighth is large enough to live in a spool file.
                        let data = if n % 8 == 0 {
                            large_data(&id)
                        } else {
                            sample_data(&id)
                        };
                        n += 1;
                        books.lock().unwrap().sent.insert(id.clone(), data.clone());
                        let outgoing = Outgoing {
                            username: "alice",
                            password: &password_of("alice"),
                            id: &id,
                            recipients: &recipients,
                            data: &data,
                        };
                        match send_message(&connector, message_addr, &outgoing).await {
                            Ok(()) => {
                                books.lock().unwrap().done.insert(id);
                            }
                            Err(_) => return n,
                        }
                    }
                })
            };
            let receiver = {
                let books = books_here.clone();
                actix::spawn(async move {
                    loop {
                        let pending: Vec<String> = {
                            let b = books.lock().unwrap();
                            b.done.difference(&b.removed).take(8).cloned().collect()
                        };
                        if pending.is_empty() {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        for id in pending {
                            let pw = password_of("bob");
                            if let Ok(got) =
                                fetch_message(&connector, message_addr, "bob", &pw, &id, false)
                                    .await
                            {
                                let mut b = books.lock().unwrap();
                                assert_eq!(
                                    b.sent.get(&id),
                                    Some(&got.data),
                                    "{id} came back changed"
                                );
                                b.seen.insert(id.clone());
                            }
                            if fetch_message(&connector, message_addr, "bob", &pw, &id, true)
                                .await
                                .is_ok()
                            {
                                books.lock().unwrap().removed.insert(id);
                            }
                        }
                    }
                })
            };
            tokio::time::sleep(kill_after).await;
            unsafe { libc::kill(server.child.id() as i32, libc::SIGKILL) };
            let _ = server.child.wait();
            receiver.abort();
            sender.await.unwrap_or(first)
        });
    }
    let b = books.lock().unwrap();
    assert!(
        b.done.len() >= cycles,
        "load ran: {} sends acknowledged",
        b.done.len()
    );

    // The last word: the store itself, read offline.
    let Reply::Mailbox { items } = csm::admin::execute(
        dir.path(),
        Request::MailboxList {
            user: Some("bob".into()),
        },
    )
    .unwrap() else {
        panic!()
    };
    let waiting: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
    let unique: BTreeSet<String> = waiting.iter().cloned().collect();
    assert_eq!(unique.len(), waiting.len(), "a message is waiting twice");
    for id in &b.done {
        assert!(
            unique.contains(id) || b.seen.contains(id),
            "{id} got done but is neither waiting nor received"
        );
    }
    for id in &b.removed {
        assert!(
            !unique.contains(id),
            "{id}: removal confirmed, yet it is still waiting"
        );
    }
    for item in &items {
        let Reply::Message { message } = csm::admin::execute(
            dir.path(),
            Request::MailboxShow {
                user: "bob".into(),
                id: item.id.clone(),
                with_data: false,
            },
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(message.size, b.sent[&item.id].len() as u64);
    }
    // Opening the store removed the files of messages removed or refused
    // around a kill: one spool file per large message still waiting.
    let large_waiting = items
        .iter()
        .filter(|i| i.size as usize >= csm_actors::store::SPOOL_FROM_BYTES)
        .count();
    let spool_files = std::fs::read_dir(csm::config::store_dir(dir.path()).join("spool"))
        .unwrap()
        .count();
    assert_eq!(spool_files, large_waiting, "spool files leaked or lost");
    let Reply::Users { users, .. } = csm::admin::execute(dir.path(), Request::UserList).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
        vec!["alice", "bob"]
    );
    println!(
        "{cycles} cycles: {} sent, {} done, {} received, {} removal confirmed, {} waiting",
        b.sent.len(),
        b.done.len(),
        b.seen.len(),
        b.removed.len(),
        waiting.len()
    );
}
