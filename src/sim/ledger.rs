//! The simulator's books: every message by id (who sent it to whom, when it
//! was acknowledged, announced and received, and whether its bytes came
//! back intact), latency histograms, per-second series, and the presence
//! each simulated user believes in. At the end it says what was lost,
//! duplicated, corrupted or missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// TCP connect + TLS handshake of a session stream.
    TlsConnect,
    /// Login sent → every `AddUser` and the user's own status received.
    LoginToSnapshot,
    /// Send scheduled → `done` (from the scheduled time, so queueing in the
    /// simulator counts: corrected for coordinated omission).
    SendToDone,
    /// Sender's `done` → `MessageAvailable` at a recipient that was online
    /// (0 when the notice came first, as the protocol allows).
    DoneToAvailable,
    /// Receive stream opened → message read and `done` acknowledged.
    Receive,
    /// Send scheduled → recipient has received and acknowledged.
    EndToEnd,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::TlsConnect,
        Metric::LoginToSnapshot,
        Metric::SendToDone,
        Metric::DoneToAvailable,
        Metric::Receive,
        Metric::EndToEnd,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::TlsConnect => "TLS connect",
            Metric::LoginToSnapshot => "login to snapshot",
            Metric::SendToDone => "send to done",
            Metric::DoneToAvailable => "done to available",
            Metric::Receive => "receive",
            Metric::EndToEnd => "end to end",
        }
    }
}

/// Counted events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Count {
    SignOns,
    SignOnFailures,
    /// Sign-ons answered "busy" and tried again.
    LoginRetries,
    Sent,
    SendErrors,
    Received,
    ReceiveErrors,
    StatusPackets,
    IdleToggles,
    Disconnects,
}

struct Sent {
    sender: String,
    recipients: Vec<String>,
    scheduled: Instant,
    done: Option<Instant>,
    digest: u64,
    /// Recipients online when the send was scheduled.
    online_at_send: Vec<bool>,
    received_by: Vec<String>,
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    pub done: u64,
    pub received: u64,
    pub sign_ons: u64,
    pub end_to_end_p50_ms: f64,
    pub end_to_end_p99_ms: f64,
    #[serde(skip)]
    hist: Option<Histogram<u64>>,
}

/// Failures of correctness; the run fails unless all are zero.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged with `done` but never received by a recipient.
    pub lost: u64,
    /// Received more than once by one recipient.
    pub duplicated: u64,
    /// Received with other bytes or another sender than were sent.
    pub corrupted: u64,
    /// A user's final view of another user's presence differs from the truth,
    /// or a sign-on snapshot lacked users.
    pub missed_presence: u64,
}

impl Verdict {
    pub fn clean(&self) -> bool {
        *self == Verdict::default()
    }
}

#[derive(Default)]
struct Books {
    sent: HashMap<String, Sent>,
    hists: HashMap<Metric, Histogram<u64>>,
    counts: HashMap<Count, u64>,
    series: Vec<Second>,
    duplicated: u64,
    corrupted: u64,
    missed_presence: u64,
    /// user → (signed on, idle) as the user itself set it.
    truth: HashMap<String, (bool, bool)>,
    first_scheduled: Option<Instant>,
    last_done: Option<Instant>,
    first_received: Option<Instant>,
    last_received: Option<Instant>,
    /// observer → what it shows of each user. Each view is written by its
    /// user's reader alone, so the hot path never takes the ledger's lock.
    views: HashMap<String, View>,
    last_event: Option<Instant>,
}

/// What one simulated user believes about the others' presence: a slot
/// per user of the roster (none yet before the first `StatusChange`),
/// `None` for offline, else whether idle.
pub type View = Arc<Mutex<Vec<Option<bool>>>>;

/// The simulated users' names, each at its place: `prefix` and the index
/// in five or more digits. A reader finds a user's slot in its view from
/// the name by reading the digits back, without hashing the name, as it
/// does for every `StatusChange` it reads.
pub struct Roster {
    prefix: String,
    names: Vec<String>,
}

impl Roster {
    pub fn new(prefix: &str, users: usize) -> Roster {
        Roster {
            prefix: prefix.to_owned(),
            names: (0..users).map(|i| format!("{prefix}{i:05}")).collect(),
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Records in `view` how it shows `user` (`None`: offline, else
    /// whether idle). A user outside the roster, not one of this run's, is
    /// no part of the check.
    pub fn show(&self, view: &mut Vec<Option<bool>>, user: &str, shown: Option<bool>) {
        if let Some(slot) = self.index_of(user) {
            if view.is_empty() {
                view.resize(self.names.len(), None);
            }
            view[slot] = shown;
        }
    }

    /// The slot of `name`, if it is one of the roster's users.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        let index: usize = name.strip_prefix(&self.prefix)?.parse().ok()?;
        (self.names.get(index)? == name).then_some(index)
    }
}

/// Shared by every simulated user; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    roster: Arc<Roster>,
    books: Arc<Mutex<Books>>,
    /// StatusChange packets received, counted without the lock.
    status_packets: Arc<AtomicU64>,
    start: Instant,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Books {
    /// Calls `each` for every online observer's view of another user that
    /// differs from the truth (with a way to describe it), while it says
    /// go on.
    fn mismatches(&self, roster: &Roster, mut each: impl FnMut(&dyn Fn() -> String) -> bool) {
        for (observer, view) in &self.views {
            if !self.truth.get(observer).is_some_and(|t| t.0) {
                continue;
            }
            let view = view.lock().unwrap_or_else(|p| p.into_inner());
            for (user, (online, idle)) in &self.truth {
                let shown = roster
                    .index_of(user)
                    .and_then(|slot| view.get(slot).copied().flatten());
                let truth = online.then_some(*idle);
                if user == observer || shown == truth {
                    continue;
                }
                let describe =
                    || format!("{observer} sees {user} as {shown:?} (idle?), truth {truth:?}");
                if !each(&describe) {
                    return;
                }
            }
        }
    }
}

impl Ledger {
    pub fn new(roster: Arc<Roster>) -> Ledger {
        Ledger {
            roster,
            books: Arc::new(Mutex::new(Books::default())),
            status_packets: Arc::new(AtomicU64::new(0)),
            start: Instant::now(),
        }
    }

    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn second(&self, books: &mut Books, at: Instant) -> usize {
        let index = at.saturating_duration_since(self.start).as_secs() as usize;
        if books.series.len() <= index {
            books.series.resize(index + 1, Second::default());
        }
        index
    }

    pub fn record(&self, metric: Metric, took: Duration) {
        let micros = (took.as_micros() as u64).max(1);
        let mut books = self.books();
        let _ = books
            .hists
            .entry(metric)
            .or_insert_with(histogram)
            .record(micros);
    }

    pub fn count(&self, count: Count) {
        let now = Instant::now();
        let mut books = self.books();
        *books.counts.entry(count).or_default() += 1;
        let index = self.second(&mut books, now);
        if count == Count::SignOns {
            books.series[index].sign_ons += 1;
        }
        books.last_event = Some(now);
    }

    pub fn get(&self, count: Count) -> u64 {
        if count == Count::StatusPackets {
            return self.status_packets.load(Ordering::Relaxed);
        }
        self.books().counts.get(&count).copied().unwrap_or(0)
    }

    /// Counts StatusChange packets (the hot path: no lock).
    pub fn status_packets(&self, n: u64) {
        self.status_packets.fetch_add(n, Ordering::Relaxed);
    }

    /// A user signed on (or off), as the user knows it.
    pub fn set_truth(&self, user: &str, online: bool, idle: bool) {
        self.books().truth.insert(user.to_owned(), (online, idle));
    }

    /// A fresh view for `observer`, which its reader fills in.
    pub fn new_view(&self, observer: &str) -> View {
        // Sized at its first write: a run that only holds sessions writes
        // none, and 20,000 users of 20,000 slots would be 400 MB.
        let view = View::default();
        self.books().views.insert(observer.to_owned(), view.clone());
        view
    }

    /// Something happened (for the quiet-period checks).
    pub fn touch(&self) {
        self.books().last_event = Some(Instant::now());
    }

    /// Forgets a user's view when it signs off.
    pub fn clear_view(&self, observer: &str) {
        self.books().views.remove(observer);
    }

    /// A sign-on snapshot that did not list every user.
    pub fn missed_presence(&self, n: u64) {
        self.books().missed_presence += n;
    }

    /// A send is scheduled.
    pub fn scheduled(
        &self,
        id: &str,
        sender: &str,
        recipients: &[String],
        digest: u64,
        at: Instant,
    ) {
        let mut books = self.books();
        books.first_scheduled.get_or_insert(at);
        let online_at_send = recipients
            .iter()
            .map(|r| books.truth.get(r).is_some_and(|t| t.0))
            .collect();
        books.sent.insert(
            id.to_owned(),
            Sent {
                sender: sender.to_owned(),
                recipients: recipients.to_vec(),
                scheduled: at,
                done: None,
                digest,
                online_at_send,
                received_by: Vec::new(),
            },
        );
    }

    /// The sender got `done`.
    pub fn done(&self, id: &str) {
        let now = Instant::now();
        let mut books = self.books();
        let index = self.second(&mut books, now);
        books.series[index].done += 1;
        *books.counts.entry(Count::Sent).or_default() += 1;
        books.last_event = Some(now);
        books.last_done = Some(now);
        let Some(sent) = books.sent.get_mut(id) else {
            return;
        };
        sent.done = Some(now);
        let took = now.saturating_duration_since(sent.scheduled);
        drop(books);
        self.record(Metric::SendToDone, took);
    }

    /// A recipient heard `MessageAvailable`.
    pub fn available(&self, id: &str, recipient: &str) {
        let now = Instant::now();
        let books = self.books();
        let Some(sent) = books.sent.get(id) else {
            return;
        };
        let online = sent
            .recipients
            .iter()
            .position(|r| r == recipient)
            .is_some_and(|i| sent.online_at_send[i]);
        let took = sent.done.map(|done| now.saturating_duration_since(done));
        drop(books);
        if online {
            self.record(Metric::DoneToAvailable, took.unwrap_or(Duration::ZERO));
        }
    }

    /// A recipient received a message; checks it against what was sent.
    pub fn received(&self, id: &str, recipient: &str, sender: &str, digest: u64) {
        let now = Instant::now();
        let mut books = self.books();
        let index = self.second(&mut books, now);
        books.series[index].received += 1;
        *books.counts.entry(Count::Received).or_default() += 1;
        books.last_event = Some(now);
        books.first_received.get_or_insert(now);
        books.last_received = Some(now);
        let (corrupted, duplicated, took) = match books.sent.get_mut(id) {
            None => (true, false, None),
            Some(sent) => {
                let corrupted = sent.sender != sender || sent.digest != digest;
                let duplicated = sent.received_by.iter().any(|r| r == recipient);
                sent.received_by.push(recipient.to_owned());
                (
                    corrupted,
                    duplicated,
                    Some(now.saturating_duration_since(sent.scheduled)),
                )
            }
        };
        books.corrupted += u64::from(corrupted);
        books.duplicated += u64::from(duplicated);
        if let Some(took) = took {
            let micros = (took.as_micros() as u64).max(1);
            let second = &mut books.series[index];
            let _ = second.hist.get_or_insert_with(histogram).record(micros);
            drop(books);
            self.record(Metric::EndToEnd, took);
        }
    }

    /// Messages acknowledged to their sender and not yet received by every
    /// recipient.
    pub fn outstanding(&self) -> usize {
        self.books()
            .sent
            .values()
            .filter(|s| s.done.is_some() && s.received_by.len() < s.recipients.len())
            .count()
    }

    /// Time since the last event of any kind.
    pub fn quiet_for(&self) -> Duration {
        self.books()
            .last_event
            .map_or(Duration::MAX, |at| at.elapsed())
    }

    /// The final checks.
    pub fn verdict(&self) -> Verdict {
        let books = self.books();
        let lost = books
            .sent
            .values()
            .filter(|s| s.done.is_some())
            .map(|s| {
                s.recipients
                    .iter()
                    .filter(|r| !s.received_by.contains(r))
                    .count() as u64
            })
            .sum();
        let mut missed = books.missed_presence;
        books.mismatches(&self.roster, |_| {
            missed += 1;
            true
        });
        Verdict {
            lost,
            duplicated: books.duplicated,
            corrupted: books.corrupted,
            missed_presence: missed,
        }
    }

    /// True when every online user's view matches the truth. Stops at the
    /// first difference, so polling it while views still fill up is cheap
    /// (a full verdict compares every pair of users).
    pub fn presence_converged(&self) -> bool {
        let books = self.books();
        let mut converged = books.missed_presence == 0;
        if converged {
            books.mismatches(&self.roster, |_| {
                converged = false;
                false
            });
        }
        converged
    }

    /// Up to `most` views that differ from the truth, as text, for the log
    /// of a run that did not converge.
    pub fn presence_mismatches(&self, most: usize) -> Vec<String> {
        let mut found = Vec::new();
        self.books().mismatches(&self.roster, |line| {
            found.push(line());
            found.len() < most
        });
        found
    }

    /// Latency percentiles (ms) of one metric.
    pub fn percentiles(&self, metric: Metric) -> Option<Percentiles> {
        let books = self.books();
        let h = books.hists.get(&metric)?;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        })
    }

    /// The per-second series, with end-to-end percentiles filled in.
    pub fn series(&self) -> Vec<Second> {
        let books = self.books();
        books
            .series
            .iter()
            .map(|s| {
                let mut out = s.clone();
                if let Some(h) = &s.hist {
                    out.end_to_end_p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
                    out.end_to_end_p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
                }
                out.hist = None;
                out
            })
            .collect()
    }

    /// Acknowledged sends per second, from the first scheduled send to the
    /// last `done` (so sends still finishing after the steady phase count
    /// against the time they took).
    pub fn send_rate(&self) -> f64 {
        let books = self.books();
        let sent = books.counts.get(&Count::Sent).copied().unwrap_or(0) as f64;
        match (books.first_scheduled, books.last_done) {
            (Some(first), Some(last)) if last > first => sent / (last - first).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Receives per second, from the first to the last.
    pub fn receive_rate(&self) -> f64 {
        let books = self.books();
        let received = books.counts.get(&Count::Received).copied().unwrap_or(0) as f64;
        match (books.first_received, books.last_received) {
            (Some(first), Some(last)) if last > first => received / (last - first).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_of_two() -> Ledger {
        Ledger::new(Arc::new(Roster::new("u", 2)))
    }

    #[test]
    fn lost_duplicated_and_corrupted_are_counted() {
        let ledger = ledger_of_two();
        let now = Instant::now();
        let to = vec!["b".to_string(), "c".to_string()];
        ledger.scheduled("m1", "a", &to, 7, now);
        ledger.done("m1");
        ledger.received("m1", "b", "a", 7);
        ledger.received("m1", "b", "a", 7);
        ledger.scheduled("m2", "a", &to[..1], 9, now);
        ledger.done("m2");
        ledger.received("m2", "b", "a", 8);
        let verdict = ledger.verdict();
        assert_eq!(verdict.lost, 1, "c never got m1");
        assert_eq!(verdict.duplicated, 1);
        assert_eq!(verdict.corrupted, 1);
    }

    #[test]
    fn a_roster_finds_its_own_names_only() {
        let roster = Roster::new("u", 2);
        assert_eq!(roster.names(), ["u00000", "u00001"]);
        assert_eq!(roster.index_of("u00001"), Some(1));
        for stranger in ["u00002", "x00001", "u1", "u", "u0000x", ""] {
            assert_eq!(roster.index_of(stranger), None, "{stranger:?}");
        }
    }

    #[test]
    fn presence_views_are_checked_against_the_truth() {
        let ledger = ledger_of_two();
        let (a, b) = ("u00000", "u00001");
        ledger.set_truth(a, true, false);
        ledger.set_truth(b, true, true);
        let roster = ledger.roster();
        roster.show(&mut ledger.new_view(a).lock().unwrap(), b, Some(true));
        roster.show(&mut ledger.new_view(b).lock().unwrap(), a, Some(true));
        assert_eq!(
            ledger.verdict().missed_presence,
            1,
            "b wrongly thinks a is idle"
        );
        assert!(!ledger.presence_converged());
        assert_eq!(
            ledger.presence_mismatches(5),
            vec!["u00001 sees u00000 as Some(true) (idle?), truth Some(false)".to_string()]
        );
        roster.show(&mut ledger.new_view(b).lock().unwrap(), a, Some(false));
        assert!(ledger.presence_converged());
        assert_eq!(ledger.verdict().missed_presence, 0);
    }
}
