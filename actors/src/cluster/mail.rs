//! Mailboxes in PostgreSQL, with group commit: sends wait in one bounded
//! queue, and each of a few committer tasks takes every send waiting
//! (up to a count and a byte budget) into one transaction, so that a burst
//! costs one commit per committer instead of one per message. A send is
//! answered only after that transaction has committed (with
//! `synchronous_commit = on`); if the commit fails, every send in it is
//! answered `unavailable`, never `done`.
//!
//! Correct when several nodes write the same mailbox: the quota lives in
//! the user's row and is checked and counted under that row's lock in the
//! storing transaction (the rows of a batch are locked in name order, so
//! committers never deadlock on them); an id is claimed with
//! `INSERT … ON CONFLICT DO NOTHING`, so a retry that reaches another node
//! finds the first copy; the last removal of a message deletes its data in
//! the same transaction.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::{Pool, Transaction};
use futures_util::future::{try_join, try_join4};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::mailbox::{no_such_message, Entry, MailboxItem, MailboxSettings, MailboxStats};
use crate::messages::{Deliver, Fetched};
use crate::proto::data::{DataLimits, MessageData};
use crate::proto::lines::{ErrorCode, StreamError};
use crate::store::{unix_now, MessageHeader, StoreError};

use super::{db_error, pool_error, MailHint};

/// Most sends in one transaction.
const MAX_BATCH: usize = 64;
/// Once a batch holds this many bytes of data it takes no more.
const MAX_BATCH_BYTES: usize = 32 << 20;
/// Ids pruned per statement.
const PRUNE_CHUNK: i64 = 5_000;

/// A send the database took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub seq: u64,
    /// False for an exact retry of a message stored before.
    pub new: bool,
}

/// A message to store, its data in memory: rows hold the data here.
struct Incoming {
    sender: String,
    id: String,
    recipients: Vec<String>,
    data: Vec<u8>,
    digest: Vec<u8>,
}

/// A send waiting for a committer.
struct Job {
    msg: Incoming,
    reply: oneshot::Sender<Result<Accepted, StreamError>>,
}

/// A receiver's `done` waiting for a committer.
struct Removal {
    user: String,
    id: String,
    reply: oneshot::Sender<Result<Option<u64>, StreamError>>,
}

/// What the committers take, in arrival order.
enum Work {
    Deliver(Job),
    Remove(Removal),
}

impl Work {
    fn bytes(&self) -> usize {
        match self {
            Work::Deliver(job) => job.msg.data.len(),
            Work::Remove(_) => 0,
        }
    }
}

/// The mailboxes of every node sharing the database.
#[derive(Clone)]
pub struct PgMail {
    pool: Pool,
    jobs: mpsc::Sender<Work>,
    settings: Arc<MailboxSettings>,
}

impl From<StoreError> for StreamError {
    fn from(e: StoreError) -> Self {
        stream_error(e)
    }
}

/// A database failure as the message stream reports it.
pub fn stream_error(e: StoreError) -> StreamError {
    match e {
        StoreError::Unavailable(why) => StreamError::new(
            ErrorCode::Unavailable,
            format!("the database is unavailable ({why}); try again"),
        ),
        other => crate::mailbox::internal(other),
    }
}

impl PgMail {
    /// Starts `committers` committer tasks on the current runtime; at most
    /// `max_waiting` sends wait for them, past that sends are refused
    /// `unavailable`.
    pub fn start(
        pool: Pool,
        node: String,
        settings: MailboxSettings,
        committers: usize,
        max_waiting: usize,
    ) -> PgMail {
        let (jobs, queue) = mpsc::channel(max_waiting.max(1));
        let queue = Arc::new(Mutex::new(queue));
        let settings = Arc::new(settings);
        let node = Arc::new(node);
        for _ in 0..committers.max(1) {
            tokio::spawn(committer(
                pool.clone(),
                queue.clone(),
                settings.clone(),
                node.clone(),
            ));
        }
        PgMail {
            pool,
            jobs,
            settings,
        }
    }

    pub fn settings(&self) -> &MailboxSettings {
        &self.settings
    }

    /// Stores a message for its recipients; resolves once committed.
    pub async fn deliver(&self, msg: Deliver) -> Result<Accepted, StreamError> {
        // This backend has no spool, so its couriers stage nothing; data
        // staged all the same is read back rather than refused.
        let data = msg
            .data
            .into_bytes()
            .map_err(|e| crate::mailbox::internal(format!("reading staged data: {e}")))?;
        let msg = Incoming {
            sender: msg.sender,
            id: msg.id,
            recipients: msg.recipients,
            data,
            digest: msg.digest,
        };
        let (reply, answer) = oneshot::channel();
        self.queue(Work::Deliver(Job { msg, reply }))?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Removes a message from one mailbox, durably (a receiver's `done`,
    /// committed with whatever else waits); the number of the message
    /// removed, `None` if it was not there.
    pub async fn remove(&self, user: &str, id: &str) -> Result<Option<u64>, StreamError> {
        let (reply, answer) = oneshot::channel();
        self.queue(Work::Remove(Removal {
            user: user.to_owned(),
            id: id.to_owned(),
            reply,
        }))?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    fn queue(&self, work: Work) -> Result<(), StreamError> {
        self.jobs.try_send(work).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StreamError::new(
                ErrorCode::Unavailable,
                "too many writes waiting for the database; try again",
            ),
            mpsc::error::TrySendError::Closed(_) => closed(),
        })
    }

    /// The messages waiting for `user`, oldest first, with their numbers.
    pub async fn waiting(&self, user: &str) -> Result<Vec<(u64, Entry)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                prepared!(
                    client,
                    "SELECT m.seq, m.id, m.sender, m.size, m.stored_unix
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE b.username = $1 ORDER BY b.seq"
                ),
                &[&user],
            )
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.get::<_, i64>(0) as u64,
                    Entry {
                        id: id_text(row.get(1))?,
                        from: row.get(2),
                        size: row.get::<_, i64>(3) as u64,
                        stored_unix: row.get::<_, i64>(4) as u64,
                        committed: true,
                    },
                ))
            })
            .collect()
    }

    /// The messages waiting for each of `users` that has any, oldest
    /// first, in one query.
    pub async fn waiting_for(
        &self,
        users: &[String],
    ) -> Result<Vec<(String, Vec<(u64, Entry)>)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                prepared!(
                    client,
                    "SELECT b.username, m.seq, m.id, m.sender, m.size, m.stored_unix
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE b.username = ANY($1) ORDER BY b.username, b.seq"
                ),
                &[&users],
            )
            .await
            .map_err(db_error)?;
        let mut waiting: Vec<(String, Vec<(u64, Entry)>)> = Vec::new();
        for row in &rows {
            let user: String = row.get(0);
            let entry = (
                row.get::<_, i64>(1) as u64,
                Entry {
                    id: id_text(row.get(2))?,
                    from: row.get(3),
                    size: row.get::<_, i64>(4) as u64,
                    stored_unix: row.get::<_, i64>(5) as u64,
                    committed: true,
                },
            );
            match waiting.last_mut() {
                Some((last, entries)) if *last == user => entries.push(entry),
                _ => waiting.push((user, vec![entry])),
            }
        }
        Ok(waiting)
    }

    /// A message of `user`'s mailbox, header and data.
    pub async fn fetch(&self, user: &str, id: &str) -> Result<Fetched, StreamError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| stream_error(pool_error(e)))?;
        let row = client
            .query_opt(
                prepared!(
                    client,
                    "SELECT m.sender, m.recipients, m.size, m.stored_unix, m.data
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE b.username = $1 AND m.id = $2"
                ),
                &[&user, &id.as_bytes()],
            )
            .await
            .map_err(|e| stream_error(db_error(e)))?
            .ok_or_else(no_such_message)?;
        Ok(Fetched {
            header: MessageHeader {
                id: id.to_owned(),
                sender: row.get(0),
                recipients: row.get(1),
                size: row.get::<_, i64>(2) as u64,
                stored_unix: row.get::<_, i64>(3) as u64,
            },
            data: crate::store::MessageBody::Bytes(row.get(4)),
        })
    }

    /// Removes the messages of `user` stored before `older_than_unix` (all
    /// when `None`), durably; how many.
    pub async fn purge(
        &self,
        user: &str,
        older_than_unix: Option<u64>,
    ) -> Result<usize, StreamError> {
        self.remove_where(user, None, older_than_unix)
            .await
            .map(|removed| removed.len())
            .map_err(stream_error)
    }

    /// Removes `user`'s entries with id `id` (any when `None`) stored
    /// before `older_than_unix` (any time when `None`) in one transaction.
    async fn remove_where(
        &self,
        user: &str,
        id: Option<&str>,
        older_than_unix: Option<u64>,
    ) -> Result<Vec<i64>, StoreError> {
        let id = id.map(str::as_bytes);
        let cutoff = older_than_unix.map(|t| t as i64);
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        let gone = tx
            .query(
                prepared!(
                    tx,
                    "DELETE FROM mailbox b USING messages m
                 WHERE m.seq = b.seq AND b.username = $1 AND ($2::bytea IS NULL OR m.id = $2)
                   AND ($3::bigint IS NULL OR m.stored_unix < $3)
                 RETURNING b.seq, m.size"
                ),
                &[&user, &id, &cutoff],
            )
            .await
            .map_err(db_error)?;
        let removed: Vec<(i64, i64)> = gone.iter().map(|row| (row.get(0), row.get(1))).collect();
        release(&tx, user, &removed).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(removed.into_iter().map(|(seq, _)| seq).collect())
    }

    /// The waiting messages of one mailbox or all, oldest first per user,
    /// with their attachments' names and sizes.
    pub async fn list(&self, user: Option<&str>) -> Result<Vec<MailboxItem>, StreamError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| stream_error(pool_error(e)))?;
        let rows = client
            .query(
                prepared!(
                    client,
                    "SELECT b.username, m.id, m.sender, m.recipients, m.size, m.stored_unix, m.data
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE $1::text IS NULL OR b.username = $1
                 ORDER BY b.username COLLATE \"C\", b.seq"
                ),
                &[&user],
            )
            .await
            .map_err(|e| stream_error(db_error(e)))?;
        let limits = DataLimits {
            max_bytes: usize::MAX,
            max_attachments: usize::MAX,
        };
        rows.iter()
            .map(|row| {
                let data: &[u8] = row.get(6);
                let attachments = MessageData::parse(data, limits)
                    .map(|parsed| {
                        parsed
                            .attachments
                            .iter()
                            .map(|a| (a.name(), a.data.len() as u64))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(MailboxItem {
                    user: row.get(0),
                    id: id_text(row.get(1)).map_err(stream_error)?,
                    sender: row.get(2),
                    recipients: row.get(3),
                    size: row.get::<_, i64>(4) as u64,
                    stored_unix: row.get::<_, i64>(5) as u64,
                    attachments,
                })
            })
            .collect()
    }

    /// Messages and bytes per user with any waiting, users in name order.
    pub async fn stats(&self) -> Result<Vec<MailboxStats>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                prepared!(
                    client,
                    "SELECT name, box_messages, box_bytes FROM users WHERE box_messages > 0
                 ORDER BY name COLLATE \"C\""
                ),
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|row| MailboxStats {
                user: row.get(0),
                messages: row.get::<_, i64>(1) as usize,
                bytes: row.get::<_, i64>(2) as u64,
            })
            .collect())
    }

    /// Forgets accepted ids past their retention whose message is gone, a
    /// bounded chunk per statement (in acceptance order, by index).
    pub async fn prune_ids(&self) -> Result<u64, StoreError> {
        let cutoff = unix_now().saturating_sub(self.settings.id_retention.as_secs()) as i64;
        let client = self.pool.get().await.map_err(pool_error)?;
        let mut pruned = 0;
        loop {
            let deleted = client
                .execute(
                    prepared!(
                        client,
                        "DELETE FROM message_ids WHERE id IN (
                        SELECT i.id FROM message_ids i
                        WHERE i.accepted_unix < $1
                          AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.seq = i.seq)
                        ORDER BY i.accepted_unix LIMIT $2)"
                    ),
                    &[&cutoff, &PRUNE_CHUNK],
                )
                .await
                .map_err(db_error)?;
            pruned += deleted;
            if deleted < PRUNE_CHUNK as u64 {
                return Ok(pruned);
            }
        }
    }
}

fn closed() -> StreamError {
    StreamError::new(ErrorCode::Unavailable, "the store is closed; try again")
}

fn id_text(bytes: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|e| StoreError::Corrupt {
        key: "messages.id".into(),
        detail: e.to_string(),
    })
}

/// Removes `user`'s entries for `seqs`, each message with its last holder,
/// and takes them off the user's counts; the numbers actually removed.
pub(crate) async fn remove_entries(
    tx: &Transaction<'_>,
    user: &str,
    seqs: &[i64],
) -> Result<Vec<i64>, StoreError> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let gone = tx
        .query(
            prepared!(
                tx,
                "DELETE FROM mailbox b USING messages m
             WHERE m.seq = b.seq AND b.username = $1 AND b.seq = ANY($2)
             RETURNING b.seq, m.size"
            ),
            &[&user, &seqs],
        )
        .await
        .map_err(db_error)?;
    let removed: Vec<(i64, i64)> = gone.iter().map(|row| (row.get(0), row.get(1))).collect();
    release(tx, user, &removed).await?;
    Ok(removed.into_iter().map(|(seq, _)| seq).collect())
}

/// After `user`'s entries for `removed` (number, size) are deleted: each
/// message loses a holder and goes with its last, and the user's counts
/// drop. Separate statements, so that each sees what a concurrent removal
/// of another holder committed.
async fn release(
    tx: &Transaction<'_>,
    user: &str,
    removed: &[(i64, i64)],
) -> Result<(), StoreError> {
    if removed.is_empty() {
        return Ok(());
    }
    release_messages(tx, removed).await?;
    let seqs = removed.len();
    let bytes: i64 = removed.iter().map(|(_, size)| size).sum();
    tx.execute(
        prepared!(
            tx,
            "UPDATE users SET box_messages = box_messages - $2, box_bytes = box_bytes - $3
         WHERE name = $1"
        ),
        &[&user, &(seqs as i64), &bytes],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Each removed entry (number, size) takes one holder off its message,
/// and a message goes with its last holder.
async fn release_messages(tx: &Transaction<'_>, removed: &[(i64, i64)]) -> Result<(), StoreError> {
    if removed.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = removed.iter().map(|(seq, _)| *seq).collect();
    // Message rows in number order, so that removals never deadlock.
    let unhold = tx
        .prepare_cached(
            "WITH gone AS (SELECT seq, count(*) AS n FROM unnest($1::bigint[]) AS seq GROUP BY seq),
              locked AS (SELECT m.seq FROM messages m JOIN gone ON gone.seq = m.seq
                         ORDER BY m.seq FOR NO KEY UPDATE OF m)
         UPDATE messages m SET holders = m.holders - gone.n FROM gone, locked
         WHERE m.seq = gone.seq AND locked.seq = gone.seq",
        )
        .await
        .map_err(db_error)?;
    let drop_unheld = tx
        .prepare_cached("DELETE FROM messages WHERE seq = ANY($1) AND holders <= 0")
        .await
        .map_err(db_error)?;
    // Sent together, run in order.
    try_join(
        tx.execute(&unhold, &[&seqs]),
        tx.execute(&drop_unheld, &[&seqs]),
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn committer(
    pool: Pool,
    queue: Arc<Mutex<mpsc::Receiver<Work>>>,
    settings: Arc<MailboxSettings>,
    node: Arc<String>,
) {
    loop {
        let (sends, removals) = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut bytes = first.bytes();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match queue.try_recv() {
                    Ok(work) => {
                        bytes += work.bytes();
                        batch.push(work);
                    }
                    Err(_) => break,
                }
            }
            let mut sends = Vec::new();
            let mut removals = Vec::new();
            for work in batch {
                match work {
                    Work::Deliver(job) => sends.push(job),
                    Work::Remove(removal) => removals.push(removal),
                }
            }
            (sends, removals)
        };
        let started = std::time::Instant::now();
        let outcome = commit_batch(&pool, &sends, &removals, &settings, &node).await;
        metrics::histogram!(crate::metrics::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::COMMIT_BATCH)
            .record((sends.len() + removals.len()) as f64);
        match outcome {
            Ok((stored, removed)) => {
                for (job, answer) in sends.into_iter().zip(stored) {
                    let _ = job.reply.send(answer);
                }
                for (removal, answer) in removals.into_iter().zip(removed) {
                    let _ = removal.reply.send(Ok(answer));
                }
            }
            Err(e) => {
                log::error!(
                    "storing {} messages and {} removals failed: {e}",
                    sends.len(),
                    removals.len()
                );
                let error = stream_error(e);
                for job in sends {
                    let _ = job.reply.send(Err(error.clone()));
                }
                for removal in removals {
                    let _ = removal.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// How one send of a batch was decided.
enum Decision {
    /// Answered already (an exact retry, or refused).
    Answered(Result<Accepted, StreamError>),
    /// To be stored, if its id can still be claimed.
    Store,
    /// The same message as an earlier send of this batch.
    SameAs(usize),
}

/// Answers of one batch: per send, per removal.
type BatchAnswers = (Vec<Result<Accepted, StreamError>>, Vec<Option<u64>>);

/// One transaction for the whole batch (removals first, then sends), in a
/// fixed number of statements whatever its size; the answer of each, or
/// the failure that leaves every one of them undone.
async fn commit_batch(
    pool: &Pool,
    batch: &[Job],
    removals: &[Removal],
    settings: &MailboxSettings,
    node: &str,
) -> Result<BatchAnswers, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    let mut names: Vec<&str> = batch
        .iter()
        .flat_map(|job| job.msg.recipients.iter().map(String::as_str))
        .chain(removals.iter().map(|removal| removal.user.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    // The quota rows, locked in name order so that committers never
    // deadlock on them.
    let lock = tx
        .prepare_cached(
            "SELECT name, box_messages, box_bytes FROM users WHERE name = ANY($1)
             ORDER BY name COLLATE \"C\" FOR NO KEY UPDATE",
        )
        .await
        .map_err(db_error)?;
    let ids: Vec<&[u8]> = batch.iter().map(|job| job.msg.id.as_bytes()).collect();
    let (rows, earlier) = try_join(
        async { tx.query(&lock, &[&names]).await.map_err(db_error) },
        known_ids(&tx, &ids),
    )
    .await?;
    let mut usage: HashMap<String, (i64, i64)> = rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let removed = remove_batch(&tx, removals, &mut usage).await?;

    let mut decisions = Vec::with_capacity(batch.len());
    let mut first_with_id: HashMap<&[u8], usize> = HashMap::new();
    for (index, job) in batch.iter().enumerate() {
        let id = job.msg.id.as_bytes();
        let decision = match first_with_id.get(id) {
            Some(&first) if same_message(&batch[first], job) => Decision::SameAs(first),
            Some(_) => Decision::Answered(Err(duplicate())),
            None => decide(job, earlier.get(id), &mut usage, settings),
        };
        if matches!(decision, Decision::Store) {
            first_with_id.insert(id, index);
        }
        decisions.push(decision);
    }

    // Claim the ids; one another transaction took meanwhile (perhaps at
    // another node, which we waited for) is a retry or a duplicate.
    let to_claim: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(decisions[i], Decision::Store))
        .collect();
    let claimed = claim_ids(&tx, batch, &to_claim).await?;
    let lost: Vec<&[u8]> = to_claim
        .iter()
        .map(|&i| batch[i].msg.id.as_bytes())
        .filter(|id| !claimed.contains_key(*id))
        .collect();
    let taken = if lost.is_empty() {
        HashMap::new()
    } else {
        known_ids(&tx, &lost).await?
    };
    let mut stored: Vec<(usize, i64)> = Vec::new();
    for &i in &to_claim {
        let id = batch[i].msg.id.as_bytes();
        match claimed.get(id) {
            Some(&seq) => stored.push((i, seq)),
            None => {
                decisions[i] = Decision::Answered(match taken.get(id) {
                    Some(record) if record.matches(&batch[i]) => Ok(Accepted {
                        seq: record.seq as u64,
                        new: false,
                    }),
                    _ => Err(duplicate()),
                })
            }
        }
    }
    write_messages(&tx, batch, &stored, node).await?;
    tx.commit().await.map_err(db_error)?;

    let seq_of: HashMap<usize, i64> = stored.into_iter().collect();
    let mut answers: Vec<Result<Accepted, StreamError>> = Vec::with_capacity(batch.len());
    for (index, decision) in decisions.into_iter().enumerate() {
        let answer = match decision {
            Decision::Answered(answer) => answer,
            Decision::Store => Ok(Accepted {
                seq: seq_of.get(&index).copied().unwrap_or_default() as u64,
                new: true,
            }),
            Decision::SameAs(first) => match &answers[first] {
                Ok(accepted) => Ok(Accepted {
                    seq: accepted.seq,
                    new: false,
                }),
                Err(e) => Err(e.clone()),
            },
        };
        answers.push(answer);
    }
    Ok((answers, removed))
}

/// Removes the entries the removals name (the user rows are locked
/// already); per removal the number of the message removed, if it was
/// there. `usage` loses what they held, for the sends of the batch.
async fn remove_batch(
    tx: &Transaction<'_>,
    removals: &[Removal],
    usage: &mut HashMap<String, (i64, i64)>,
) -> Result<Vec<Option<u64>>, StoreError> {
    if removals.is_empty() {
        return Ok(Vec::new());
    }
    let users: Vec<&str> = removals.iter().map(|r| r.user.as_str()).collect();
    let ids: Vec<&[u8]> = removals.iter().map(|r| r.id.as_bytes()).collect();
    let rows = tx
        .query(
            prepared!(
                tx,
                "DELETE FROM mailbox b USING messages m,
                 unnest($1::text[], $2::bytea[]) AS r (username, id)
             WHERE m.seq = b.seq AND b.username = r.username AND m.id = r.id
             RETURNING b.username, m.id, b.seq, m.size"
            ),
            &[&users, &ids],
        )
        .await
        .map_err(db_error)?;
    let mut gone: HashMap<(String, Vec<u8>), u64> = HashMap::new();
    let mut per_user: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for row in &rows {
        let (user, id, seq, size): (String, Vec<u8>, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        gone.insert((user.clone(), id), seq as u64);
        if let Some(entry) = usage.get_mut(&user) {
            entry.0 -= 1;
            entry.1 -= size;
        }
        per_user.entry(user).or_default().push((seq, size));
    }
    let all: Vec<(i64, i64)> = per_user.values().flatten().copied().collect();
    let (names, counts): (Vec<&str>, Vec<(i64, i64)>) = per_user
        .iter()
        .map(|(user, entries)| {
            (
                user.as_str(),
                (
                    entries.len() as i64,
                    entries.iter().map(|(_, size)| size).sum(),
                ),
            )
        })
        .unzip();
    let (messages, bytes): (Vec<i64>, Vec<i64>) = counts.into_iter().unzip();
    let uncount = tx
        .prepare_cached(
            "UPDATE users u SET box_messages = u.box_messages - d.messages,
                            box_bytes = u.box_bytes - d.bytes
         FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS d (name, messages, bytes)
         WHERE u.name = d.name",
        )
        .await
        .map_err(db_error)?;
    try_join(release_messages(tx, &all), async {
        tx.execute(&uncount, &[&names, &messages, &bytes])
            .await
            .map_err(db_error)
    })
    .await?;
    Ok(removals
        .iter()
        .map(|r| gone.remove(&(r.user.clone(), r.id.as_bytes().to_vec())))
        .collect())
}

fn duplicate() -> StreamError {
    StreamError::new(
        ErrorCode::Duplicate,
        "message id already used for another message",
    )
}

/// An accepted id as the database has it.
struct IdRecord {
    sender: String,
    digest: Vec<u8>,
    seq: i64,
}

impl IdRecord {
    fn matches(&self, job: &Job) -> bool {
        self.sender == job.msg.sender && self.digest == job.msg.digest
    }
}

fn same_message(first: &Job, job: &Job) -> bool {
    first.msg.sender == job.msg.sender && first.msg.digest == job.msg.digest
}

async fn known_ids(
    tx: &Transaction<'_>,
    ids: &[&[u8]],
) -> Result<HashMap<Vec<u8>, IdRecord>, StoreError> {
    let rows = tx
        .query(
            prepared!(
                tx,
                "SELECT id, sender, digest, seq FROM message_ids WHERE id = ANY($1)"
            ),
            &[&ids],
        )
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|row| {
            (
                row.get(0),
                IdRecord {
                    sender: row.get(1),
                    digest: row.get(2),
                    seq: row.get(3),
                },
            )
        })
        .collect())
}

/// The checks of one send, in the contract's order after the data: an
/// exact retry is `done` at once, then the quota, then the id.
fn decide(
    job: &Job,
    earlier: Option<&IdRecord>,
    usage: &mut HashMap<String, (i64, i64)>,
    settings: &MailboxSettings,
) -> Decision {
    if let Some(record) = earlier.filter(|record| record.matches(job)) {
        return Decision::Answered(Ok(Accepted {
            seq: record.seq as u64,
            new: false,
        }));
    }
    let size = job.msg.data.len() as i64;
    for recipient in &job.msg.recipients {
        let Some(&(count, bytes)) = usage.get(recipient) else {
            return Decision::Answered(Err(StreamError::new(
                ErrorCode::UnknownRecipient,
                format!("no user {recipient}"),
            )));
        };
        if count + 1 > settings.max_messages as i64 || bytes + size > settings.max_bytes as i64 {
            return Decision::Answered(Err(StreamError::new(
                ErrorCode::Quota,
                format!("mailbox of {recipient} is full"),
            )));
        }
    }
    if earlier.is_some() {
        return Decision::Answered(Err(duplicate()));
    }
    for recipient in &job.msg.recipients {
        if let Some(entry) = usage.get_mut(recipient) {
            entry.0 += 1;
            entry.1 += size;
        }
    }
    Decision::Store
}

/// Claims the ids of the sends at `indexes`; the sequence number of each
/// id claimed (an id another transaction holds is left out).
async fn claim_ids(
    tx: &Transaction<'_>,
    batch: &[Job],
    indexes: &[usize],
) -> Result<HashMap<Vec<u8>, i64>, StoreError> {
    if indexes.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&[u8]> = indexes
        .iter()
        .map(|&i| batch[i].msg.id.as_bytes())
        .collect();
    let senders: Vec<&str> = indexes
        .iter()
        .map(|&i| batch[i].msg.sender.as_str())
        .collect();
    let digests: Vec<&[u8]> = indexes
        .iter()
        .map(|&i| batch[i].msg.digest.as_slice())
        .collect();
    let rows = tx
        .query(
            prepared!(
                tx,
                "INSERT INTO message_ids (id, sender, digest, seq, accepted_unix)
             SELECT id, sender, digest, nextval('message_seq'), $4
             FROM unnest($1::bytea[], $2::text[], $3::bytea[]) AS t (id, sender, digest)
             ON CONFLICT (id) DO NOTHING RETURNING id, seq"
            ),
            &[&ids, &senders, &digests, &(unix_now() as i64)],
        )
        .await
        .map_err(db_error)?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Writes the messages, their mailbox entries, the quota counts and the
/// hints for the other nodes.
async fn write_messages(
    tx: &Transaction<'_>,
    batch: &[Job],
    stored: &[(usize, i64)],
    node: &str,
) -> Result<(), StoreError> {
    if stored.is_empty() {
        return Ok(());
    }
    let now = unix_now() as i64;
    let mut seqs = Vec::with_capacity(stored.len());
    let mut ids = Vec::with_capacity(stored.len());
    let mut senders = Vec::with_capacity(stored.len());
    let mut recipient_lines = Vec::with_capacity(stored.len());
    let mut sizes = Vec::with_capacity(stored.len());
    let mut holders = Vec::with_capacity(stored.len());
    let mut data = Vec::with_capacity(stored.len());
    let mut entry_users = Vec::new();
    let mut entry_seqs = Vec::new();
    let mut added: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut hints = Vec::new();
    for &(i, seq) in stored {
        let msg = &batch[i].msg;
        seqs.push(seq);
        ids.push(msg.id.as_bytes());
        senders.push(msg.sender.as_str());
        // Usernames hold no newline.
        recipient_lines.push(msg.recipients.join("\n"));
        sizes.push(msg.data.len() as i64);
        holders.push(msg.recipients.len() as i64);
        data.push(msg.data.as_slice());
        for recipient in &msg.recipients {
            entry_users.push(recipient.as_str());
            entry_seqs.push(seq);
            let counts = added.entry(recipient.as_str()).or_default();
            counts.0 += 1;
            counts.1 += msg.data.len() as i64;
        }
        let hint = MailHint {
            origin: node.to_owned(),
            seq: seq as u64,
            size: msg.data.len() as u64,
            from: msg.sender.clone(),
            recipients: msg.recipients.clone(),
            id: msg.id.clone(),
        };
        hints.extend(hint.payloads());
    }
    let insert_messages = tx
        .prepare_cached(
            "INSERT INTO messages (seq, id, sender, recipients, size, stored_unix, holders, data)
         SELECT seq, id, sender, string_to_array(recipients, E'\\n'), size, $8, holders, data
         FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::text[], $5::bigint[],
                     $6::bigint[], $7::bytea[])
              AS t (seq, id, sender, recipients, size, holders, data)",
        )
        .await
        .map_err(db_error)?;
    let insert_entries = tx
        .prepare_cached(
            "INSERT INTO mailbox (username, seq) SELECT * FROM unnest($1::text[], $2::bigint[])",
        )
        .await
        .map_err(db_error)?;
    let count = tx
        .prepare_cached(
            "UPDATE users u SET box_messages = u.box_messages + d.messages,
                            box_bytes = u.box_bytes + d.bytes
         FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS d (name, messages, bytes)
         WHERE u.name = d.name",
        )
        .await
        .map_err(db_error)?;
    let notify = tx
        .prepare_cached("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
        .await
        .map_err(db_error)?;
    let (names, counts): (Vec<&str>, Vec<(i64, i64)>) = added.into_iter().unzip();
    let (messages, bytes): (Vec<i64>, Vec<i64>) = counts.into_iter().unzip();
    // Sent together, run in order (the entries after their messages).
    try_join4(
        tx.execute(
            &insert_messages,
            &[
                &seqs,
                &ids,
                &senders,
                &recipient_lines,
                &sizes,
                &holders,
                &data,
                &now,
            ],
        ),
        tx.execute(&insert_entries, &[&entry_users, &entry_seqs]),
        tx.execute(&count, &[&names, &messages, &bytes]),
        tx.execute(&notify, &[&super::CHANNEL, &hints]),
    )
    .await
    .map_err(db_error)?;
    Ok(())
}
