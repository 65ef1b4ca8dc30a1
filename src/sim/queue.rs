//! The offline queue phase (workload W3): messages wait in the mailboxes of
//! users who are offline and are delivered when they come back. The
//! server's CPU is read before, between and after, so that the cost of
//! storing a message and the cost of delivering it are reported apart.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use super::ledger::Count;
use super::target::process_usage;
use super::user::SendOne;
use super::{cpu_between, id_nonce, Driver};

/// What the offline queue phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    /// Messages sent to offline users.
    pub queued: u64,
    /// Of those, acknowledged with `done`.
    pub stored: u64,
    /// Received by their recipients once back online.
    pub delivered: u64,
    pub store_secs: f64,
    pub deliver_secs: f64,
    /// The server's CPU while the messages were sent and stored.
    pub store_cpu_secs: Option<f64>,
    /// The server's CPU from the recipients' sign-on until the last
    /// message was received and acknowledged.
    pub deliver_cpu_secs: Option<f64>,
}

/// Signs the second half of the users off, has the first half send them
/// `scenario.queued` messages in turn (as fast as the stream limit lets
/// them), then signs the second half on again and waits until every
/// acknowledged message is received. The recipients signed on before, so
/// their return is a warm sign-on.
pub(super) async fn offline_queue(driver: &mut Driver, pids: &[u32]) -> Result<QueueReport> {
    let users = driver.scenario.users;
    let queued = driver.scenario.queued;
    if users < 2 {
        bail!("queueing messages needs at least 2 users");
    }
    let senders = users / 2;
    let ledger = driver.world.ledger.clone();
    driver.sign_off_where(|index| index >= senders).await;
    driver
        .settle(Duration::from_millis(500), Duration::from_secs(30))
        .await;
    if driver.online.is_empty() {
        bail!("no sender is signed on");
    }

    let before = process_usage(pids);
    let started = Instant::now();
    let counted = |a: Count, b: Count| ledger.get(a) + ledger.get(b);
    let acknowledged_before = ledger.get(Count::Sent);
    let sent_before = counted(Count::Sent, Count::SendErrors);
    let nonce = id_nonce();
    for n in 0..queued {
        let (_, sender) = &driver.online[n % driver.online.len()];
        let recipient = senders + n % (users - senders);
        sender.do_send(SendOne {
            id: format!("{}-q{nonce}-{n}", driver.scenario.prefix),
            recipients: vec![driver.credentials[recipient].0.clone()],
            scheduled: Instant::now(),
        });
    }
    let limit = Duration::from_secs(60) + Duration::from_millis(10 * queued as u64);
    while counted(Count::Sent, Count::SendErrors) < sent_before + queued as u64 {
        if started.elapsed() > limit {
            bail!("the queued sends did not finish within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let store_secs = started.elapsed().as_secs_f64();
    let stored_at = process_usage(pids);
    let stored = ledger.get(Count::Sent) - acknowledged_before;

    let back = Instant::now();
    let received_before = ledger.get(Count::Received);
    let tried_before = counted(Count::Received, Count::ReceiveErrors);
    for index in senders..users {
        driver.start_user(index);
    }
    // A failed receive is not retried: the verdict reports it as lost.
    while counted(Count::Received, Count::ReceiveErrors) < tried_before + stored {
        if back.elapsed() > limit {
            bail!("the queued messages were not all delivered within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered_at = process_usage(pids);
    Ok(QueueReport {
        queued: queued as u64,
        stored,
        delivered: ledger.get(Count::Received).saturating_sub(received_before),
        store_secs,
        deliver_secs: back.elapsed().as_secs_f64(),
        store_cpu_secs: cpu_between(before, stored_at),
        deliver_cpu_secs: cpu_between(stored_at, delivered_at),
    })
}
