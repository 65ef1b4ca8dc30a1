//! The message stream: one short-lived handler per connection. It reads the
//! four header lines, checks the credentials, then either takes a message
//! (recipients, `c`, data; the mailbox makes it durable; `done`) or hands
//! one out (the send format; the receiver's `done`; the durable removal;
//! close). Every failure is one `error <code> <text>` line, then the close,
//! checked in the contract's order: header, credentials, recipients, data,
//! quota, id.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::budget::Reservation;
use crate::mailbox::Stager;
use crate::messages::{Deliver, Fetch, Remove};
use crate::proto::data::{read_data_within, DataError, ReadDataError};
use crate::proto::lines::{
    read_line, recipients_block, Action, ErrorCode, Header, LineError, StreamError, DONE,
};
use crate::proto::names::{valid_message_id, valid_username};
use crate::services::{LoginOutcome, OwnedCountGuard, Services};
use crate::store::{MessageBody, NewData};

/// The one answer for an unknown user and a wrong password.
pub const AUTH_REFUSED: &str = "unknown user or wrong password";

/// How an exchange ended early.
enum Fail {
    /// Tell the client, then close.
    Answer(StreamError),
    /// The peer is gone or cannot be written to; just close.
    Gone(String),
}

impl From<StreamError> for Fail {
    fn from(e: StreamError) -> Self {
        Fail::Answer(e)
    }
}

fn answer(code: ErrorCode, text: impl Into<String>) -> Fail {
    Fail::Answer(StreamError::new(code, text))
}

/// Longest a sender's `done` waits for its recipients' notices to be
/// written to their sessions.
const NOTICE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The digest of a message ([`crate::mailbox::digest`]) and its data as the
/// mailbox takes it, made here rather than on the shared mailbox actor's
/// thread. Large data is hashed, and staged into the spool when there is
/// one, on the blocking pool: SHA-256 of megabytes and the sync of their
/// file would hold up every connection of this thread too.
async fn prepare(
    recipients: Vec<String>,
    data: Vec<u8>,
    stager: Option<Arc<Stager>>,
) -> Result<(Vec<String>, NewData, Vec<u8>), Fail> {
    if data.len() < crate::store::SPOOL_FROM_BYTES {
        let digest = crate::mailbox::digest(&recipients, &data);
        return Ok((recipients, NewData::Bytes(data), digest));
    }
    tokio::task::spawn_blocking(move || {
        let digest = crate::mailbox::digest(&recipients, &data);
        let data = match stager {
            Some(stager) => stager.stage(data),
            None => NewData::Bytes(data),
        };
        (recipients, data, digest)
    })
    .await
    .map_err(|e| answer(ErrorCode::Internal, format!("preparing the message: {e}")))
}

/// Serves one message stream, from its first byte to its close.
pub async fn serve<S>(stream: S, peer: SocketAddr, services: Arc<Services>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _in_flight = OwnedCountGuard::new(services.clone(), |s| &s.exchanges);
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(16 * 1024, reader);
    let exchange_timeout = services.timeouts.exchange();
    let outcome = if services.is_shutting_down() {
        Err(answer(
            ErrorCode::Unavailable,
            "server is shutting down; try again",
        ))
    } else {
        let storing = std::cell::Cell::new(false);
        let exchange = Exchange {
            services: &services,
            peer,
            reader: &mut reader,
            writer: &mut writer,
            storing: &storing,
        };
        match tokio::time::timeout(exchange_timeout, exchange.run()).await {
            Ok(outcome) => outcome,
            // The client sent everything; the store did not confirm in
            // time. The message may still be stored: a retry with the same
            // id is answered `done` then, and stores nothing twice.
            Err(_) if storing.get() => Err(answer(
                ErrorCode::Unavailable,
                format!(
                    "the store did not confirm the message within {}s; try again with the same id",
                    exchange_timeout.as_secs()
                ),
            )),
            Err(_) => Err(answer(
                ErrorCode::Malformed,
                format!(
                    "exchange not completed within {}s",
                    exchange_timeout.as_secs()
                ),
            )),
        }
    };
    let write_timeout = services.timeouts.write();
    match outcome {
        Ok(()) => {}
        Err(Fail::Gone(why)) => log::debug!("message stream from {peer}: {why}"),
        Err(Fail::Answer(error)) => {
            metrics::counter!(crate::metrics::STREAM_ERRORS, "code" => error.code.as_str())
                .increment(1);
            log::info!("message stream from {peer}: {error}");
            let _ = tokio::time::timeout(write_timeout, async {
                writer.write_all(&error.to_line()).await?;
                writer.flush().await
            })
            .await;
            let _ = tokio::time::timeout(write_timeout, writer.shutdown()).await;
            let mut sink = tokio::io::sink();
            // Unread input is drained (within limits) so that the close
            // does not become a reset that hides the error line.
            let mut rest = (&mut reader).take(services.limits.linger_bytes);
            let drain = tokio::io::copy(&mut rest, &mut sink);
            let _ = tokio::time::timeout(services.timeouts.linger(), drain).await;
            return;
        }
    }
    let _ = tokio::time::timeout(write_timeout, writer.shutdown()).await;
}

struct Exchange<'a, R, W> {
    services: &'a Services,
    peer: SocketAddr,
    reader: &'a mut R,
    writer: &'a mut W,
    /// Set once the whole message is read and handed to the mailbox.
    storing: &'a std::cell::Cell<bool>,
}

impl<R, W> Exchange<'_, R, W>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn run(mut self) -> Result<(), Fail> {
        let header = self.header().await?;
        #[cfg(feature = "failpoints")]
        if header.message_id == crate::FAILPOINT_MESSAGE_ID {
            panic!("failpoint: message stream panic injected");
        }
        if self.services.is_shutting_down() {
            return Err(answer(
                ErrorCode::Unavailable,
                "server is shutting down; try again",
            ));
        }
        let outcome = self
            .services
            .check_login(&header.username, &header.password, self.peer.ip())
            .await;
        match outcome {
            LoginOutcome::Accepted => {}
            LoginOutcome::WrongCredentials => return Err(answer(ErrorCode::Auth, AUTH_REFUSED)),
            LoginOutcome::Throttled(reason) => return Err(answer(ErrorCode::Unavailable, reason)),
            LoginOutcome::Unavailable(reason) => {
                return Err(answer(ErrorCode::Unavailable, reason))
            }
            LoginOutcome::Failed(e) => {
                return Err(answer(
                    ErrorCode::Internal,
                    format!("credential check failed: {e}"),
                ))
            }
        }
        match header.action {
            Action::Send => self.send(header).await,
            Action::Receive => self.receive(header).await,
        }
    }

    async fn line(&mut self) -> Result<String, Fail> {
        let limit = self.services.limits.line_bytes;
        let wait = self.services.timeouts.read();
        match tokio::time::timeout(wait, read_line(self.reader, limit)).await {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(LineError::TooLong(n))) => Err(answer(
                ErrorCode::TooLarge,
                format!("line longer than {n} bytes"),
            )),
            Ok(Err(LineError::NotUtf8)) => Err(answer(ErrorCode::Malformed, "line is not UTF-8")),
            Ok(Err(LineError::Eof)) => Err(answer(
                ErrorCode::Malformed,
                "stream ended inside the header",
            )),
            Ok(Err(LineError::Io(e))) => Err(Fail::Gone(format!("read failed: {e}"))),
            Err(_) => Err(answer(
                ErrorCode::Malformed,
                format!("no complete line within {}s", wait.as_secs()),
            )),
        }
    }

    async fn header(&mut self) -> Result<Header, Fail> {
        let username = self.line().await?;
        let password = self.line().await?;
        let message_id = self.line().await?;
        let action_line = self.line().await?;
        let action = Action::parse(&action_line)
            .ok_or_else(|| answer(ErrorCode::Malformed, "action must be send or receive"))?;
        if !valid_message_id(&message_id) {
            return Err(answer(
                ErrorCode::Malformed,
                "message id must be 1-256 bytes",
            ));
        }
        Ok(Header {
            username,
            password,
            message_id,
            action,
        })
    }

    async fn send(&mut self, header: Header) -> Result<(), Fail> {
        let recipients = self.recipients().await?;
        let wait = self.services.timeouts.read();
        let marker = match tokio::time::timeout(wait, self.reader.read_u8()).await {
            Ok(Ok(byte)) => byte,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(answer(
                    ErrorCode::Malformed,
                    "stream ended before the c byte",
                ))
            }
            Ok(Err(e)) => return Err(Fail::Gone(format!("read failed: {e}"))),
            Err(_) => return Err(answer(ErrorCode::Malformed, "no c byte in time")),
        };
        if marker != b'c' {
            return Err(answer(
                ErrorCode::Malformed,
                "expected the byte c after the empty line",
            ));
        }
        // Held until the mailbox has the message: the data is in memory
        // until then.
        let mut reservation = self.services.budget.reservation();
        let data = self.data(&mut reservation).await?;
        let stager = self.services.stager.clone();
        let (recipients, data, digest) = prepare(recipients, data, stager).await?;
        self.storing.set(true);
        let delivered = self
            .services
            .mailbox
            .send(Deliver {
                sender: header.username,
                id: header.message_id,
                recipients,
                data,
                digest,
            })
            .await
            .map_err(|e| answer(ErrorCode::Unavailable, format!("mailbox unavailable: {e}")))?;
        drop(reservation);
        // The contract: every open session of a recipient has its
        // `MessageAvailable` no later than the sender has `done`. The
        // notices are queued; wait (bounded, so a recipient that does not
        // read cannot hold the sender) until they are on their sockets.
        if !delivered?.written(NOTICE_WAIT).await {
            log::debug!("a recipient's session did not take its notice within {NOTICE_WAIT:?}");
        }
        self.write(DONE).await
    }

    async fn recipients(&mut self) -> Result<Vec<String>, Fail> {
        let max = self.services.limits.recipients;
        let mut recipients = Vec::new();
        let mut seen = HashSet::new();
        let mut lines = 0usize;
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            lines += 1;
            if lines > max.saturating_mul(4) {
                return Err(answer(
                    ErrorCode::TooLarge,
                    format!("more than {} recipient lines", lines - 1),
                ));
            }
            if seen.insert(line.clone()) {
                recipients.push(line);
                if recipients.len() > max {
                    return Err(answer(
                        ErrorCode::TooLarge,
                        format!("more than {max} recipients"),
                    ));
                }
            }
        }
        if recipients.is_empty() {
            return Err(answer(ErrorCode::Malformed, "no recipients"));
        }
        for recipient in &recipients {
            let exists = valid_username(recipient)
                && self
                    .services
                    .users
                    .user_exists(recipient)
                    .await
                    .map_err(|e| {
                        let code = if e.is_transient() {
                            ErrorCode::Unavailable
                        } else {
                            ErrorCode::Internal
                        };
                        answer(code, format!("user lookup failed: {e}"))
                    })?;
            if !exists {
                return Err(answer(
                    ErrorCode::UnknownRecipient,
                    format!("no user {recipient}"),
                ));
            }
        }
        Ok(recipients)
    }

    /// Reads the message data within the server's budget of bytes in
    /// flight, mapping each failure to its error code.
    async fn data(&mut self, reservation: &mut Reservation) -> Result<Vec<u8>, Fail> {
        let limits = self.services.limits.data();
        let stall = self.services.timeouts.read();
        read_data_within(self.reader, limits, stall, Some(reservation))
            .await
            .map_err(|e| match e {
                ReadDataError::Budget(e) => {
                    metrics::counter!(crate::metrics::SENDS_REFUSED_BUDGET).increment(1);
                    answer(ErrorCode::Unavailable, format!("{e}; try again"))
                }
                ReadDataError::Data(DataError::Malformed(text)) => {
                    answer(ErrorCode::Malformed, text)
                }
                ReadDataError::Data(DataError::TooLarge(text)) => answer(ErrorCode::TooLarge, text),
                ReadDataError::Io(e) => Fail::Gone(format!("read failed: {e}")),
                other => answer(ErrorCode::Malformed, other.to_string()),
            })
    }

    async fn receive(&mut self, header: Header) -> Result<(), Fail> {
        let mailbox = &self.services.mailbox;
        let fetched = mailbox
            .send(Fetch {
                user: header.username.clone(),
                id: header.message_id.clone(),
            })
            .await
            .map_err(|e| answer(ErrorCode::Unavailable, format!("mailbox unavailable: {e}")))??;
        let mut head = Header {
            username: fetched.header.sender.clone(),
            password: String::new(),
            message_id: header.message_id.clone(),
            action: Action::Send,
        }
        .to_lines();
        head.extend_from_slice(&recipients_block(&fetched.header.recipients));
        self.write(&head).await?;
        match fetched.data {
            MessageBody::Bytes(data) => self.write(&data).await?,
            MessageBody::File { file, len } => self.stream_file(file, len).await?,
        }
        let line = self.line().await?;
        if line != "done" {
            return Err(answer(ErrorCode::Malformed, "expected done"));
        }
        mailbox
            .send(Remove {
                user: header.username,
                id: header.message_id,
            })
            .await
            .map_err(|e| answer(ErrorCode::Unavailable, format!("mailbox unavailable: {e}")))??;
        metrics::counter!(crate::metrics::MESSAGES_DELIVERED).increment(1);
        Ok(())
    }

    /// Streams large data from its file, 64 KiB at a time, so that a
    /// receive holds no copy of the message however large it is.
    async fn stream_file(&mut self, file: std::fs::File, len: u64) -> Result<(), Fail> {
        let file = tokio::fs::File::from_std(file);
        let mut from = BufReader::with_capacity(64 * 1024, file.take(len));
        let copied = tokio::io::copy_buf(&mut from, self.writer)
            .await
            .map_err(|e| Fail::Gone(format!("streaming the message: {e}")))?;
        if copied != len {
            // The answer has begun: the stream can only be cut short.
            log::error!("message file ended after {copied} of {len} bytes");
            return Err(Fail::Gone("the message file ended early".to_owned()));
        }
        self.writer
            .flush()
            .await
            .map_err(|e| Fail::Gone(format!("write failed: {e}")))
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        let write = async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        };
        // Large answers are bounded by the exchange timeout around us.
        write
            .await
            .map_err(|e| Fail::Gone(format!("write failed: {e}")))
    }
}
