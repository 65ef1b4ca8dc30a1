//! `csm client watch`: sign on and print what happens, one line (or one
//! JSON object) per event, until the server ends the session; with
//! `--receive DIR`, also receive each announced message, save it and only
//! then acknowledge it.

use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use csm_actors::proto::packet::Decoded;

use super::events::{Event, Events};
use super::inbox::{receive_one, Keep, Kept};
use super::{Account, Server};

pub async fn run(
    server: &Server,
    account: &Account,
    json: bool,
    receive: Option<PathBuf>,
) -> Result<(), String> {
    let session = server.sign_on(account).await?;
    // The write side stays open (and unused): closing it would end the
    // session.
    let (mut reader, _writer) = session.split();
    let mut events = Events::new(&account.user);
    loop {
        let packet = match reader.recv_unbounded().await {
            Ok(Some(Decoded::Known(packet))) => packet,
            Ok(Some(Decoded::Unknown(_))) => continue,
            Ok(None) => return Err("the server ended the session".into()),
            Err(e) => return Err(format!("the session failed: {e}")),
        };
        for event in events.feed(packet) {
            print(&event, json)?;
            if let (Some(dir), Event::MessageAvailable { id, from, .. }) = (&receive, &event) {
                match receive_one(server, account, id, Keep::Save(dir)).await {
                    Ok(Kept::Saved(path)) => print(
                        &Event::Saved {
                            id: id.clone(),
                            from: from.clone(),
                            path: path.display().to_string(),
                        },
                        json,
                    )?,
                    Ok(Kept::Printed) => {}
                    // It stays in the mailbox and is announced again at the
                    // next sign-on; watching goes on.
                    Err(e) => eprintln!("csm client: {id}: {e}"),
                }
            }
        }
    }
}

/// Writes one event; a closed standard output ends the watch.
fn print(event: &Event, json: bool) -> Result<(), String> {
    let now = SystemTime::now();
    let line = if json {
        event.json(now).to_string()
    } else {
        event.line(now)
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing: {e}"))
}
