//! `csm client send`: one message over a message stream. The id is printed
//! only after the server's `done`, which means the message is on disk; a
//! connection that fails (or a server that is `unavailable`) is tried
//! again with the same id, which the contract makes safe: the server
//! stores it once.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use csm_actors::proto::data::{Attachment, MessageData};
use csm_actors::proto::lines::ErrorCode;
use csm_actors::proto::names::valid_message_id;

use super::{Account, Server};
use crate::client::{send_message, ClientError, Outgoing};

/// First wait before a retry; doubled each time, at most [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// The message data from the command line's text and files.
pub fn compose(
    text: Option<String>,
    text_file: Option<PathBuf>,
    attach: &[PathBuf],
    password_on_stdin: bool,
) -> Result<Vec<u8>, String> {
    let text = match (text, text_file) {
        (Some(text), _) => text,
        (None, Some(path)) if path == Path::new("-") => {
            if password_on_stdin {
                return Err("--text-file - and --password-stdin both want standard input".into());
            }
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| format!("reading the text from stdin: {e}"))?
        }
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?,
        (None, None) if attach.is_empty() => {
            return Err("nothing to send: give --text, --text-file or --attach".into())
        }
        (None, None) => String::new(),
    };
    let mut attachments = Vec::with_capacity(attach.len());
    for path in attach {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{} is not a file", path.display()))?;
        let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        attachments.push(Attachment::new(&name, data));
    }
    MessageData::new(&text, attachments)
        .encode()
        .map_err(|e| format!("the message cannot be sent: {e}"))
}

/// A new id: the time and 64 random bits, as unique as the seed's client
/// made them.
pub fn new_message_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{millis}-{:016x}", rand::random::<u64>())
}

pub async fn run(
    server: &Server,
    account: &Account,
    to: &[String],
    data: &[u8],
    id: Option<String>,
    retries: u32,
) -> Result<(), String> {
    let id = id.unwrap_or_else(new_message_id);
    if !valid_message_id(&id) {
        return Err(format!(
            "{id:?} is not a message id (1-256 bytes, no line break)"
        ));
    }
    deliver(server, account, to, data, &id, retries, |e| {
        eprintln!("csm client: {e}; trying again with the same id")
    })
    .await?;
    println!("{id}");
    Ok(())
}

/// Sends until `done`, retrying with the same id what may succeed later;
/// `retrying` hears each failure that is tried again.
pub async fn deliver(
    server: &Server,
    account: &Account,
    to: &[String],
    data: &[u8],
    id: &str,
    retries: u32,
    mut retrying: impl FnMut(&str),
) -> Result<(), String> {
    let message = Outgoing {
        username: &account.user,
        password: &account.password,
        id,
        recipients: to,
        data,
    };
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0;
    loop {
        let result = server
            .on_message_stream_raw(|connector, addr| {
                let message = message.clone();
                async move { send_message(&connector, addr, &message).await }
            })
            .await;
        match result {
            Ok(()) => return Ok(()),
            Err(failure) if attempt < retries && worth_retrying(&failure.1) => {
                retrying(&server.describe(&failure));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
            Err(failure) => return Err(server.describe(&failure)),
        }
    }
}

/// Failures after which the same send may succeed: the connection, a
/// timeout, or a server that said it is unavailable for now.
fn worth_retrying(error: &ClientError) -> bool {
    match error {
        // A certificate that does not match will not match next time.
        ClientError::Io(e) => super::tls_error(e).is_none(),
        ClientError::Timeout(_) => true,
        ClientError::Refused(refusal) => refusal.code == ErrorCode::Unavailable,
        ClientError::LoginRefused(_) | ClientError::Protocol(_) => false,
    }
}
