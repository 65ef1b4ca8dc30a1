//! `csm client inbox` and `receive`: the waiting messages, as the sign-on
//! list announces them, and receiving one, keeping it (printed, or saved
//! under a directory of its own) before acknowledging it, so that a
//! message is never gone from the mailbox before it is somewhere else.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use csm_actors::proto::data::MessageData;
use csm_actors::proto::packet::Decoded;
use csm_actors::proto::Packet;
use serde_json::json;

use super::events::size_text;
use super::{Account, Server};
use crate::client::{ClientError, Receiving};

/// A waiting message as announced.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub id: String,
    pub from: String,
    pub size: u64,
}

/// Signs on, collects the `MessageAvailable` list (complete once the stream
/// has been quiet for `quiet`) and signs off.
pub async fn waiting(
    server: &Server,
    account: &Account,
    quiet: Duration,
) -> Result<Vec<Waiting>, String> {
    let mut session = server.sign_on(account).await?;
    let mut found = Vec::new();
    loop {
        match session.recv(quiet).await {
            Ok(Some(Decoded::Known(Packet::MessageAvailable { id, from, size }))) => {
                found.push(Waiting { id, from, size })
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("the server closed the session".into()),
            Err(ClientError::Timeout(_)) => break,
            Err(e) => return Err(format!("reading the sign-on list: {e}")),
        }
    }
    session.close().await;
    Ok(found)
}

/// `csm client inbox`.
pub async fn list(
    server: &Server,
    account: &Account,
    json: bool,
    quiet: Duration,
) -> Result<(), String> {
    let found = waiting(server, account, quiet).await?;
    let mut out = std::io::stdout().lock();
    let result = if json {
        found.iter().try_for_each(|m| {
            writeln!(
                out,
                "{}",
                json!({"id": m.id, "from": m.from, "size": m.size})
            )
        })
    } else if found.is_empty() {
        writeln!(out, "no messages waiting for {}", account.user)
    } else {
        let id_width = found.iter().map(|m| m.id.len()).max().unwrap_or(2).max(2);
        let from_width = found.iter().map(|m| m.from.len()).max().unwrap_or(4).max(4);
        writeln!(out, "{:<id_width$}  {:<from_width$}  SIZE", "ID", "FROM").and_then(|()| {
            found.iter().try_for_each(|m| {
                writeln!(
                    out,
                    "{:<id_width$}  {:<from_width$}  {}",
                    m.id,
                    m.from,
                    size_text(m.size)
                )
            })
        })
    };
    result.map_err(|e| format!("writing the list: {e}"))
}

/// `csm client receive`: the one message `id`, or every waiting one.
pub async fn receive(
    server: &Server,
    account: &Account,
    id: Option<String>,
    save: Option<PathBuf>,
    json: bool,
    quiet: Duration,
) -> Result<(), String> {
    let ids = match id {
        Some(id) => vec![id],
        None => waiting(server, account, quiet)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect(),
    };
    if ids.is_empty() && !json {
        eprintln!("no messages waiting for {}", account.user);
    }
    let mut failures = Vec::new();
    for id in &ids {
        let keep = match &save {
            Some(dir) => Keep::Save(dir),
            None => Keep::Print { json },
        };
        match receive_one(server, account, id, keep).await {
            Ok(Kept::Saved(path)) if !json => {
                eprintln!("saved {id} in {}", path.display())
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("csm client: {id}: {e}");
                failures.push(id.clone());
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 if ids.len() == 1 => Err(format!("{} was not received", failures[0])),
        n => Err(format!("{n} of {} messages were not received", ids.len())),
    }
}

/// How a received message is kept before its `done`.
#[derive(Debug, Clone, Copy)]
pub enum Keep<'a> {
    /// In a new directory under this one: `message.txt` and the
    /// attachments, synced.
    Save(&'a Path),
    /// On standard output (text only: a message with attachments is left
    /// in the mailbox, since they cannot be printed).
    Print { json: bool },
}

/// What became of a received message.
#[derive(Debug)]
pub enum Kept {
    Saved(PathBuf),
    Printed,
}

/// Receives `id`, keeps it, and only then acknowledges it.
pub async fn receive_one(
    server: &Server,
    account: &Account,
    id: &str,
    keep: Keep<'_>,
) -> Result<Kept, String> {
    let (message, receiving) = server
        .on_message_stream(|connector, addr| async move {
            Receiving::open(&connector, addr, &account.user, &account.password, id).await
        })
        .await?;
    let data = MessageData::parse(&message.data, crate::client::RECEIVE_LIMITS)
        .map_err(|e| format!("the message data cannot be read: {e}; it stays in the mailbox"))?;
    let kept = match keep {
        Keep::Save(dir) => Kept::Saved(
            save_message(dir, &message.sender, &message.recipients, id, &data).map_err(|e| {
                format!(
                    "saving under {}: {e}; it stays in the mailbox",
                    dir.display()
                )
            })?,
        ),
        Keep::Print { json } => {
            if !data.attachments.is_empty() {
                let names: Vec<String> = data.attachments.iter().map(|a| a.name()).collect();
                return Err(format!(
                    "it has {} attachment(s) ({}): give --save DIR to keep them; it stays in the mailbox",
                    names.len(),
                    names.join(", ")
                ));
            }
            print_message(&message.sender, &message.recipients, id, &data, json)
                .map_err(|e| format!("writing it out: {e}; it stays in the mailbox"))?;
            Kept::Printed
        }
    };
    receiving
        .acknowledge()
        .await
        .map_err(|e| format!("acknowledging: {e}; it may be received again"))?;
    Ok(kept)
}

/// `message.txt` (a header and the text) and the attachments, in a new
/// directory under `dir`, all synced; the directory's path.
pub fn save_message(
    dir: &Path,
    sender: &str,
    recipients: &[String],
    id: &str,
    data: &MessageData,
) -> std::io::Result<PathBuf> {
    let path = crate::save::new_message_dir(dir, id)?;
    let text = format!(
        "From: {sender}\nTo: {}\nId: {id}\nDate: {}\n\n{}\n",
        recipients.join(", "),
        humantime::format_rfc3339_seconds(SystemTime::now()),
        data.text()
    );
    crate::save::write_files(
        &path,
        [("message.txt".to_owned(), text.as_bytes())],
        &[],
        true,
    )?;
    // An attachment named message.txt gets another name: the text has it.
    crate::save::write_files(
        &path,
        data.attachments
            .iter()
            .map(|a| (a.name(), a.data.as_slice())),
        &["message.txt"],
        true,
    )?;
    Ok(path)
}

fn print_message(
    sender: &str,
    recipients: &[String],
    id: &str,
    data: &MessageData,
    json: bool,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            json!({"id": id, "from": sender, "to": recipients, "text": data.text()})
        )?;
    } else {
        writeln!(
            out,
            "From: {sender}\nTo: {}\nId: {id}\n\n{}\n",
            recipients.join(", "),
            data.text()
        )?;
    }
    out.flush()
}
