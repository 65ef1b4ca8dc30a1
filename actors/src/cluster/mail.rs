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
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::mailboxes::{
    digest, no_such_message, Entry, MailboxItem, MailboxSettings, MailboxStats,
};
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

struct Job {
    msg: Deliver,
    digest: Vec<u8>,
    reply: oneshot::Sender<Result<Accepted, StreamError>>,
}

/// The mailboxes of every node sharing the database.
#[derive(Clone)]
pub struct PgMail {
    pool: Pool,
    jobs: mpsc::Sender<Job>,
    settings: Arc<MailboxSettings>,
}

/// A database failure as the message stream reports it.
pub fn stream_error(e: StoreError) -> StreamError {
    match e {
        StoreError::Unavailable(why) => StreamError::new(
            ErrorCode::Unavailable,
            format!("the database is unavailable ({why}); try again"),
        ),
        other => crate::mailboxes::internal(other),
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
        let digest = digest(&msg.recipients, &msg.data);
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { msg, digest, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StreamError::new(
                    ErrorCode::Unavailable,
                    "too many sends waiting for the database; try again",
                ),
                mpsc::error::TrySendError::Closed(_) => {
                    StreamError::new(ErrorCode::Unavailable, "the store is closed; try again")
                }
            })?;
        answer.await.unwrap_or_else(|_| {
            Err(StreamError::new(
                ErrorCode::Unavailable,
                "the store is closed; try again",
            ))
        })
    }

    /// The messages waiting for `user`, oldest first, with their numbers.
    pub async fn waiting(&self, user: &str) -> Result<Vec<(u64, Entry)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                "SELECT m.seq, m.id, m.sender, m.size, m.stored_unix
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE b.username = $1 ORDER BY b.seq",
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
                "SELECT b.username, m.seq, m.id, m.sender, m.size, m.stored_unix
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE b.username = ANY($1) ORDER BY b.username, b.seq",
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
                "SELECT m.sender, m.recipients, m.size, m.stored_unix, m.data
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE b.username = $1 AND m.id = $2",
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
            data: row.get(4),
        })
    }

    /// Removes a message from one mailbox, durably; the number of the
    /// message removed, `None` if it was not there.
    pub async fn remove(&self, user: &str, id: &str) -> Result<Option<u64>, StreamError> {
        self.remove_where(user, Some(id), None)
            .await
            .map(|removed| removed.first().map(|&seq| seq as u64))
            .map_err(stream_error)
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
        let seqs: Vec<i64> = tx
            .query(
                "SELECT b.seq FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE b.username = $1 AND ($2::bytea IS NULL OR m.id = $2)
                   AND ($3::bigint IS NULL OR m.stored_unix < $3)",
                &[&user, &id, &cutoff],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let removed = remove_entries(&tx, user, &seqs).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(removed)
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
                "SELECT b.username, m.id, m.sender, m.recipients, m.size, m.stored_unix, m.data
                 FROM mailbox b JOIN messages m ON m.seq = b.seq
                 WHERE $1::text IS NULL OR b.username = $1
                 ORDER BY b.username COLLATE \"C\", b.seq",
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
                "SELECT name, box_messages, box_bytes FROM users WHERE box_messages > 0
                 ORDER BY name COLLATE \"C\"",
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
                    "DELETE FROM message_ids WHERE id IN (
                        SELECT i.id FROM message_ids i
                        WHERE i.accepted_unix < $1
                          AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.seq = i.seq)
                        ORDER BY i.accepted_unix LIMIT $2)",
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
    let removed: Vec<i64> = tx
        .query(
            "DELETE FROM mailbox WHERE username = $1 AND seq = ANY($2) RETURNING seq",
            &[&user, &seqs],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if removed.is_empty() {
        return Ok(removed);
    }
    // Message rows in number order, so that removals never deadlock.
    let rows = tx
        .query(
            "WITH locked AS (
                SELECT seq FROM messages WHERE seq = ANY($1) ORDER BY seq FOR NO KEY UPDATE)
             UPDATE messages m SET holders = m.holders - 1 FROM locked
             WHERE m.seq = locked.seq RETURNING m.seq, m.holders, m.size",
            &[&removed],
        )
        .await
        .map_err(db_error)?;
    let mut gone = Vec::new();
    let mut bytes = 0i64;
    for row in &rows {
        bytes += row.get::<_, i64>(2);
        if row.get::<_, i64>(1) <= 0 {
            gone.push(row.get::<_, i64>(0));
        }
    }
    if !gone.is_empty() {
        tx.execute("DELETE FROM messages WHERE seq = ANY($1)", &[&gone])
            .await
            .map_err(db_error)?;
    }
    tx.execute(
        "UPDATE users SET box_messages = box_messages - $2, box_bytes = box_bytes - $3
         WHERE name = $1",
        &[&user, &(removed.len() as i64), &bytes],
    )
    .await
    .map_err(db_error)?;
    Ok(removed)
}

async fn committer(
    pool: Pool,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    settings: Arc<MailboxSettings>,
    node: Arc<String>,
) {
    loop {
        let batch = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut bytes = first.msg.data.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match queue.try_recv() {
                    Ok(job) => {
                        bytes += job.msg.data.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let started = std::time::Instant::now();
        let outcome = commit_batch(&pool, &batch, &settings, &node).await;
        metrics::histogram!(crate::metrics::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::COMMIT_BATCH).record(batch.len() as f64);
        match outcome {
            Ok(answers) => {
                for (job, answer) in batch.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                log::error!("storing {} messages failed: {e}", batch.len());
                let error = stream_error(e);
                for job in batch {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// One transaction for the whole batch; the answer of each send, or the
/// failure that leaves every one of them unstored.
async fn commit_batch(
    pool: &Pool,
    batch: &[Job],
    settings: &MailboxSettings,
    node: &str,
) -> Result<Vec<Result<Accepted, StreamError>>, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    let mut names: Vec<&str> = batch
        .iter()
        .flat_map(|job| job.msg.recipients.iter().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    let rows = tx
        .query(
            "SELECT name, box_messages, box_bytes FROM users WHERE name = ANY($1)
             ORDER BY name COLLATE \"C\" FOR NO KEY UPDATE",
            &[&names],
        )
        .await
        .map_err(db_error)?;
    let mut usage: HashMap<String, (i64, i64)> = rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let mut answers = Vec::with_capacity(batch.len());
    for job in batch {
        answers.push(store_one(&tx, job, &mut usage, settings, node).await?);
    }
    tx.commit().await.map_err(db_error)?;
    Ok(answers)
}

/// Checks and writes one send inside the batch's transaction. Every check
/// comes before the first write, so a refused send leaves nothing behind.
async fn store_one(
    tx: &Transaction<'_>,
    job: &Job,
    usage: &mut HashMap<String, (i64, i64)>,
    settings: &MailboxSettings,
    node: &str,
) -> Result<Result<Accepted, StreamError>, StoreError> {
    let msg = &job.msg;
    let id = msg.id.as_bytes();
    let same = |row: &tokio_postgres::Row| {
        row.get::<_, &str>(0) == msg.sender && row.get::<_, &[u8]>(1) == job.digest.as_slice()
    };
    let earlier = tx
        .query_opt(
            "SELECT sender, digest, seq FROM message_ids WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(db_error)?;
    if let Some(row) = &earlier {
        if same(row) {
            return Ok(Ok(Accepted {
                seq: row.get::<_, i64>(2) as u64,
                new: false,
            }));
        }
    }
    let size = msg.data.len() as i64;
    for recipient in &msg.recipients {
        let Some(&(count, bytes)) = usage.get(recipient) else {
            return Ok(Err(StreamError::new(
                ErrorCode::UnknownRecipient,
                format!("no user {recipient}"),
            )));
        };
        if count + 1 > settings.max_messages as i64 || bytes + size > settings.max_bytes as i64 {
            return Ok(Err(StreamError::new(
                ErrorCode::Quota,
                format!("mailbox of {recipient} is full"),
            )));
        }
    }
    let duplicate = || {
        StreamError::new(
            ErrorCode::Duplicate,
            "message id already used for another message",
        )
    };
    if earlier.is_some() {
        return Ok(Err(duplicate()));
    }
    let now = unix_now() as i64;
    let claimed = tx
        .query_opt(
            "INSERT INTO message_ids (id, sender, digest, seq, accepted_unix)
             VALUES ($1, $2, $3, nextval('message_seq'), $4)
             ON CONFLICT (id) DO NOTHING RETURNING seq",
            &[&id, &msg.sender, &job.digest, &now],
        )
        .await
        .map_err(db_error)?;
    let Some(claimed) = claimed else {
        // Another transaction (perhaps another node) took the id while we
        // waited for it: the same message is a retry, anything else not.
        let row = tx
            .query_one(
                "SELECT sender, digest, seq FROM message_ids WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_error)?;
        return Ok(if same(&row) {
            Ok(Accepted {
                seq: row.get::<_, i64>(2) as u64,
                new: false,
            })
        } else {
            Err(duplicate())
        });
    };
    let seq: i64 = claimed.get(0);
    tx.execute(
        "INSERT INTO messages (seq, id, sender, recipients, size, stored_unix, holders, data)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &seq,
            &id,
            &msg.sender,
            &msg.recipients,
            &size,
            &now,
            &(msg.recipients.len() as i64),
            &msg.data,
        ],
    )
    .await
    .map_err(db_error)?;
    tx.execute(
        "INSERT INTO mailbox (username, seq) SELECT unnest($1::text[]), $2",
        &[&msg.recipients, &seq],
    )
    .await
    .map_err(db_error)?;
    tx.execute(
        "UPDATE users SET box_messages = box_messages + 1, box_bytes = box_bytes + $2
         WHERE name = ANY($1)",
        &[&msg.recipients, &size],
    )
    .await
    .map_err(db_error)?;
    for recipient in &msg.recipients {
        if let Some(entry) = usage.get_mut(recipient) {
            entry.0 += 1;
            entry.1 += size;
        }
    }
    let hint = MailHint {
        origin: node.to_owned(),
        seq: seq as u64,
        size: size as u64,
        from: msg.sender.clone(),
        recipients: msg.recipients.clone(),
        id: msg.id.clone(),
    };
    for payload in hint.payloads() {
        tx.execute("SELECT pg_notify($1, $2)", &[&super::CHANNEL, &payload])
            .await
            .map_err(db_error)?;
    }
    Ok(Ok(Accepted {
        seq: seq as u64,
        new: true,
    }))
}
