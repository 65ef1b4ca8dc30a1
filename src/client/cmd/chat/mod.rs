//! `csm client chat`: the interactive terminal view. One loop owns the
//! screen, the session's write side and the [`Chat`] state; everything
//! else — the session's packets, keys, finished sends and receives — comes
//! to it over one bounded channel. A received message is acknowledged only
//! after the screen that shows it was drawn; one with attachments is saved
//! (with `--save`) or left in the mailbox. After `--idle-after` without a
//! key the others are told this user is idle, and the next key says back,
//! as the seed's client did.

mod state;
mod ui;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use csm_actors::proto::data::MessageData;
use csm_actors::proto::packet::Decoded;
use csm_actors::proto::Packet;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::events::{Event, Events};
use super::inbox::save_message;
use super::send::{deliver, new_message_id};
use super::{Account, Server};
use crate::client::{Receiving, SessionReader};
use state::{Action, Chat, Key};

/// Inputs waiting for the loop; past this, the senders wait.
const INPUT_QUEUE: usize = 256;
/// How often the idle timer and the shown idle times are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Tries of a send, with the same id, before it is shown as failed.
const SEND_RETRIES: u32 = 3;
/// Message streams receiving at once; a sign-on list of thousands of
/// messages waits its turn instead of opening thousands of connections.
const RECEIVES_AT_ONCE: usize = 4;

/// What the loop hears.
enum Input {
    Key(Key),
    Resized,
    Packet(Packet),
    SessionEnded(String),
    /// A message to show; acknowledged once `shown` is answered.
    Received {
        from: String,
        text: String,
        shown: oneshot::Sender<()>,
    },
    Notice(String),
    Sent {
        ticket: u64,
        result: Result<(), String>,
    },
}

pub async fn run(
    server: Server,
    account: Account,
    idle_after: Duration,
    save: Option<PathBuf>,
) -> Result<(), String> {
    // Sign on before taking over the terminal, so that a refusal is an
    // ordinary line on standard error.
    let session = server.sign_on(&account).await?;
    let (reader, mut writer) = session.split();
    let server = Arc::new(server);
    let (inputs, mut queue) = mpsc::channel(INPUT_QUEUE);
    let receives = Arc::new(Semaphore::new(RECEIVES_AT_ONCE));
    tokio::spawn(read_session(reader, inputs.clone()));
    let keys_stop = Arc::new(AtomicBool::new(false));
    read_keys(inputs.clone(), keys_stop.clone());

    let mut terminal = ratatui::try_init().map_err(|e| format!("cannot use the terminal: {e}"))?;
    let mut chat = Chat::new(&account.user);
    let mut events = Events::new(&account.user);
    let mut last_key = Instant::now();
    let mut idle = false;
    let mut ticker = tokio::time::interval(TICK);
    let outcome = loop {
        let now = Instant::now();
        if let Err(e) = terminal.draw(|frame| ui::draw(frame, &chat, now)) {
            break Err(format!("drawing: {e}"));
        }
        let input = tokio::select! {
            input = queue.recv() => input,
            _ = ticker.tick() => None,
        };
        match input {
            None => {
                if !idle && last_key.elapsed() >= idle_after {
                    idle = true;
                    let idle_secs = last_key.elapsed().as_secs();
                    if let Err(e) = writer.send(&Packet::Idle { idle_secs }).await {
                        break Err(format!("the session failed: {e}"));
                    }
                }
            }
            Some(Input::Key(key)) => {
                last_key = Instant::now();
                if idle {
                    idle = false;
                    if let Err(e) = writer.send(&Packet::NotIdle {}).await {
                        break Err(format!("the session failed: {e}"));
                    }
                }
                chat.notice = None;
                match chat.key(key, SystemTime::now()) {
                    Action::Nothing => {}
                    Action::Quit => break Ok(()),
                    Action::Send { ticket, to, text } => {
                        spawn_send(&server, &account, ticket, to, text, inputs.clone())
                    }
                }
            }
            Some(Input::Resized) => {}
            Some(Input::Packet(packet)) => {
                for event in events.feed(packet) {
                    chat.apply(&event, Instant::now());
                    if let Event::MessageAvailable { id, .. } = event {
                        spawn_receive(
                            &server,
                            &account,
                            id,
                            save.clone(),
                            &receives,
                            inputs.clone(),
                        );
                    }
                }
            }
            Some(Input::SessionEnded(why)) => break Err(why),
            Some(Input::Received { from, text, shown }) => {
                chat.received(&from, text, SystemTime::now());
                let now = Instant::now();
                if let Err(e) = terminal.draw(|frame| ui::draw(frame, &chat, now)) {
                    break Err(format!("drawing: {e}"));
                }
                let _ = shown.send(());
            }
            Some(Input::Notice(notice)) => chat.notice = Some(notice),
            Some(Input::Sent { ticket, result }) => chat.sent(ticket, result),
        }
    };
    keys_stop.store(true, Ordering::Relaxed);
    let _ = ratatui::try_restore();
    writer.close().await;
    outcome
}

async fn read_session(mut reader: SessionReader, inputs: mpsc::Sender<Input>) {
    loop {
        let input = match reader.recv_unbounded().await {
            Ok(Some(Decoded::Known(packet))) => Input::Packet(packet),
            Ok(Some(Decoded::Unknown(_))) => continue,
            Ok(None) => Input::SessionEnded("the server ended the session".into()),
            Err(e) => Input::SessionEnded(format!("the session failed: {e}")),
        };
        let ended = matches!(input, Input::SessionEnded(_));
        if inputs.send(input).await.is_err() || ended {
            return;
        }
    }
}

/// Reads keys on a thread of its own (the terminal's reads block) until
/// `stop` is set or the loop is gone.
fn read_keys(inputs: mpsc::Sender<Input>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match event::poll(Duration::from_millis(100)) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(_) => return,
            }
            let input = match event::read() {
                Ok(TermEvent::Key(key)) if key.kind != KeyEventKind::Release => {
                    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
                    let key = match key.code {
                        KeyCode::Esc => Key::Quit,
                        KeyCode::Char('c' | 'd') if ctrl => Key::Quit,
                        KeyCode::Char(c) if !ctrl => Key::Char(c),
                        KeyCode::Enter => Key::Enter,
                        KeyCode::Backspace => Key::Backspace,
                        KeyCode::Up | KeyCode::BackTab => Key::Up,
                        KeyCode::Down | KeyCode::Tab => Key::Down,
                        _ => continue,
                    };
                    Input::Key(key)
                }
                Ok(TermEvent::Resize(..)) => Input::Resized,
                Ok(_) => continue,
                Err(_) => return,
            };
            if inputs.blocking_send(input).is_err() {
                return;
            }
        }
    });
}

fn spawn_send(
    server: &Arc<Server>,
    account: &Account,
    ticket: u64,
    to: String,
    text: String,
    inputs: mpsc::Sender<Input>,
) {
    let (server, account) = (server.clone(), account.clone());
    tokio::spawn(async move {
        let result = match MessageData::new(&text, Vec::new()).encode() {
            Ok(data) => {
                let id = new_message_id();
                deliver(&server, &account, &[to], &data, &id, SEND_RETRIES, |_| {}).await
            }
            Err(e) => Err(format!("{e}")),
        };
        let _ = inputs.send(Input::Sent { ticket, result }).await;
    });
}

fn spawn_receive(
    server: &Arc<Server>,
    account: &Account,
    id: String,
    save: Option<PathBuf>,
    receives: &Arc<Semaphore>,
    inputs: mpsc::Sender<Input>,
) {
    let (server, account, receives) = (server.clone(), account.clone(), receives.clone());
    tokio::spawn(async move {
        let Ok(_turn) = receives.acquire().await else {
            return;
        };
        if let Err(notice) = receive(&server, &account, &id, save, &inputs).await {
            let _ = inputs.send(Input::Notice(notice)).await;
        }
    });
}

/// Receives `id`, has it shown (and saved, with attachments and `--save`),
/// then acknowledges it; a message that cannot be kept stays in the
/// mailbox and is announced again at the next sign-on.
async fn receive(
    server: &Server,
    account: &Account,
    id: &str,
    save: Option<PathBuf>,
    inputs: &mpsc::Sender<Input>,
) -> Result<(), String> {
    let (message, receiving) = server
        .on_message_stream(|connector, addr| async move {
            Receiving::open(&connector, addr, &account.user, &account.password, id).await
        })
        .await
        .map_err(|e| format!("message {id}: {e}"))?;
    let limits = crate::client::RECEIVE_LIMITS;
    let data = MessageData::parse(&message.data, limits)
        .map_err(|e| format!("message {id} cannot be read ({e}); it stays in your mailbox"))?;
    let mut text = data.text();
    if !data.attachments.is_empty() {
        let Some(dir) = save else {
            return Err(format!(
                "message {id} from {} has attachments: it stays in your mailbox \
                 (start the chat with --save DIR, or use `csm client receive --save DIR`)",
                message.sender
            ));
        };
        let path = save_message(&dir, &message.sender, &message.recipients, id, &data)
            .map_err(|e| format!("message {id}: saving under {}: {e}", dir.display()))?;
        text.push_str(&format!(" [attachments saved in {}]", path.display()));
    }
    let (shown, on_screen) = oneshot::channel();
    let incoming = Input::Received {
        from: message.sender.clone(),
        text,
        shown,
    };
    if inputs.send(incoming).await.is_err() || on_screen.await.is_err() {
        // The chat ended before showing it: it stays in the mailbox.
        return Ok(());
    }
    receiving
        .acknowledge()
        .await
        .map_err(|e| format!("message {id}: acknowledging: {e}"))
}
