//! `csm sim`: the actor-driven load simulator. Each simulated user is an
//! actor that behaves like a real client, over the project's own protocol
//! code; a driver signs users on at a set rate, sends messages and toggles
//! idle state at set rates, signs the offline fraction on half-way, then
//! drains and checks the ledger: every acknowledged message received once
//! and intact, every user's view of presence true.

pub mod baseline;
pub mod content;
pub mod ledger;
mod queue;
pub mod report;
pub mod target;
pub mod user;
pub mod workload;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Arbiter};
use anyhow::{bail, Context, Result};
use clap::Args;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::client::Connector;
use content::ContentSpec;
use ledger::{Count, Ledger, Metric, Roster};
use report::{CpuCost, Hold, Machine, Report, ServerUsage};
use target::{process_usage, NodeAddrs, ProcessUsage, Spawned};
use user::{password_for, FetchPending, SendOne, SignOff, SimUser, ToggleIdle, World};
use workload::{Figures, Workload};

/// A scenario; every field has a default, and a TOML file or flags set them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Simulated users.
    pub users: usize,
    /// Sign-ons started per second.
    pub ramp: f64,
    /// Seconds of steady load after the sign-on wave.
    pub duration_secs: f64,
    /// Messages sent per second, all users together (fixed rate).
    pub rate: f64,
    /// Recipients per message.
    pub recipients: usize,
    /// Idle/back toggles per second, all users together.
    pub idle_rate: f64,
    /// Fraction of users offline at the start; they sign on half-way.
    pub offline_fraction: f64,
    pub content: ContentSpec,
    /// Sign everyone off and on again, and measure the second wave
    /// (credentials already verified: the reconnect storm).
    pub reconnect: bool,
    /// Sign-ons started per second in the reconnect wave.
    pub reconnect_ramp: f64,
    /// Recipients fetch their messages only once every send of the steady
    /// phase has its answer, so that the phase measures sends alone (its
    /// CPU per message is reported as `send_cost`).
    pub defer_receive: bool,
    /// Only sign on and hold the sessions, to measure memory per session.
    /// Presence is not checked then, and the users keep no views of it.
    pub hold: bool,
    /// Holding: seconds to keep the sessions open after the measurement,
    /// so that simulators in several processes hold theirs at once (each
    /// process can open only as many connections as its open-file limit).
    pub hold_secs: f64,
    /// Message streams in flight at once.
    pub max_streams: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1…).
    pub source_ips: usize,
    /// Name prefix of the simulated users.
    pub prefix: String,
    /// Longest wait for outstanding messages at the end, in seconds.
    pub drain_secs: f64,
    /// Instead of the steady phase: the second half of the users sign
    /// off, the first half send them this many messages, then they sign on
    /// again and receive them all (0: no such phase).
    pub queued: usize,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            users: 50,
            ramp: 200.0,
            duration_secs: 10.0,
            rate: 100.0,
            recipients: 1,
            idle_rate: 5.0,
            offline_fraction: 0.1,
            content: ContentSpec::default(),
            reconnect: false,
            reconnect_ramp: 5000.0,
            defer_receive: false,
            hold: false,
            hold_secs: 0.0,
            max_streams: 256,
            source_ips: 16,
            prefix: "sim".into(),
            drain_secs: 30.0,
            queued: 0,
        }
    }
}

/// `csm sim` options; each overrides the scenario file.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// A named workload (w1, w2, w3: see docs/BENCHMARKS.md), or a TOML
    /// scenario file (the fields of `Scenario`).
    #[arg(long, value_name = "w1|w2|w3|FILE")]
    pub scenario: Option<String>,
    /// Sign everyone on and off once before the measured wave, so that it
    /// finds passwords already verified (w1, w2, or any scenario).
    #[arg(long)]
    pub warm: bool,
    /// Messages to queue for offline users and deliver when they come back
    /// (replaces the steady phase; w3 queues 5,000).
    #[arg(long)]
    pub queued: Option<usize>,
    #[arg(long)]
    pub users: Option<usize>,
    /// Sign-ons per second.
    #[arg(long)]
    pub ramp: Option<f64>,
    /// Seconds of steady load.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Messages per second, all users together.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Recipients per message.
    #[arg(long)]
    pub recipients: Option<usize>,
    /// Idle/back toggles per second.
    #[arg(long)]
    pub idle_rate: Option<f64>,
    /// Fraction of users offline at the start (0 to 1).
    #[arg(long)]
    pub offline_fraction: Option<f64>,
    #[arg(long)]
    pub text_bytes: Option<usize>,
    #[arg(long)]
    pub attachments: Option<usize>,
    #[arg(long)]
    pub attachment_bytes: Option<usize>,
    /// Measure a second sign-on wave with credentials already verified.
    #[arg(long)]
    pub reconnect: bool,
    /// Sign-ons per second in the reconnect wave.
    #[arg(long)]
    pub reconnect_ramp: Option<f64>,
    /// Receive only once every send has its answer (measure sends alone,
    /// and report their CPU per message).
    #[arg(long)]
    pub defer_receive: bool,
    /// Only hold the sessions open and measure server memory per session.
    #[arg(long)]
    pub hold: bool,
    /// With --hold: keep the sessions open this many seconds after the
    /// measurement (for simulators run side by side)
    #[arg(long)]
    pub hold_secs: Option<f64>,
    #[arg(long)]
    pub max_streams: Option<usize>,
    #[arg(long)]
    pub source_ips: Option<usize>,
    /// Start a server on a temporary data directory for this run.
    #[arg(long)]
    pub spawn: bool,
    /// Configuration file for the spawned server.
    #[arg(long, requires = "spawn")]
    pub server_config: Option<PathBuf>,
    /// Spawn this many nodes sharing the PostgreSQL database of
    /// --store-url (implies --spawn).
    #[arg(long, value_name = "N", requires = "store_url")]
    pub spawn_nodes: Option<usize>,
    /// The PostgreSQL database the spawned nodes share; users are created
    /// in it directly.
    #[arg(long, value_name = "URL")]
    pub store_url: Option<String>,
    /// An external server's session address; repeat it for each node of a
    /// cluster (users are spread over the nodes in turn).
    #[arg(long)]
    pub session_addr: Vec<SocketAddr>,
    /// An external server's message address; one per --session-addr, in
    /// the same order.
    #[arg(long)]
    pub message_addr: Vec<SocketAddr>,
    /// The external server's data directory: its certificate is pinned and
    /// users are created through its admin socket.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Pin this PEM certificate instead (users must exist).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// The server's process id, to report its CPU and memory; repeat it
    /// for each node (their CPU and memory are added up).
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Measure this machine's TLS and argon2 ceilings first.
    #[arg(long)]
    pub baseline: bool,
    /// Seconds per baseline measurement.
    #[arg(long, default_value_t = 5.0)]
    pub baseline_secs: f64,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the report as one HTML page with plots.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

impl SimArgs {
    /// The scenario to run, and the named workload it is if it is one.
    fn scenario(&self) -> Result<(Scenario, Option<Workload>)> {
        let workload = self.scenario.as_deref().and_then(Workload::named);
        if workload == Some(Workload::W3) && self.warm {
            bail!("w3 always measures warm sign-ons; --warm applies to w1 and w2");
        }
        let mut s = match (&self.scenario, workload) {
            (_, Some(workload)) => workload.scenario(self.warm),
            (Some(path), None) => {
                let path = PathBuf::from(path);
                toml::from_str(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                )
                .with_context(|| format!("in {}", path.display()))?
            }
            (None, None) => Scenario::default(),
        };
        macro_rules! set {
            ($($field:ident).+ = $value:expr) => {
                if let Some(v) = $value {
                    s.$($field).+ = v;
                }
            };
        }
        set!(users = self.users);
        set!(ramp = self.ramp);
        set!(reconnect_ramp = self.reconnect_ramp);
        set!(duration_secs = self.duration);
        set!(rate = self.rate);
        set!(recipients = self.recipients);
        set!(idle_rate = self.idle_rate);
        set!(offline_fraction = self.offline_fraction);
        set!(content.text_bytes = self.text_bytes);
        set!(content.attachments = self.attachments);
        set!(content.attachment_bytes = self.attachment_bytes);
        set!(max_streams = self.max_streams);
        set!(source_ips = self.source_ips);
        set!(queued = self.queued);
        set!(hold_secs = self.hold_secs);
        s.reconnect |= self.reconnect || self.warm;
        s.defer_receive |= self.defer_receive;
        s.hold |= self.hold;
        if s.users < 2 && !s.hold {
            bail!("a scenario needs at least 2 users");
        }
        if s.recipients == 0 || s.recipients >= s.users.max(2) {
            bail!("recipients per message must be between 1 and users - 1");
        }
        if !(0.0..1.0).contains(&s.offline_fraction) || s.ramp <= 0.0 {
            bail!("offline fraction must be in [0, 1) and ramp above 0");
        }
        if s.queued > 0 && s.hold {
            bail!("a scenario either holds sessions or queues messages, not both");
        }
        if !(0.0..=86_400.0).contains(&s.hold_secs) || (s.hold_secs > 0.0 && !s.hold) {
            bail!("--hold-secs goes with --hold, from 0 to 86400 seconds");
        }
        Ok((s, workload))
    }
}

/// The server a scenario runs against: one node, or several acting as one
/// (with one certificate).
pub struct TargetInfo {
    pub connector: Connector,
    pub nodes: Vec<NodeAddrs>,
    /// Process ids whose CPU and memory are reported (added up).
    pub server_pids: Vec<u32>,
}

/// The simulated users' names and passwords.
pub fn user_credentials(scenario: &Scenario) -> Vec<(String, String)> {
    Roster::new(&scenario.prefix, scenario.users)
        .names()
        .iter()
        .map(|name| (name.clone(), password_for(&scenario.prefix, name)))
        .collect()
}

/// `csm sim`.
pub fn run(args: SimArgs) -> ExitCode {
    match run_cli(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("csm sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_cli(args: SimArgs) -> Result<bool> {
    let (scenario, workload) = args.scenario()?;
    let fd_limit = target::raise_fd_limit();
    if (scenario.users as u64) * 2 + 64 > fd_limit {
        log::warn!(
            "{} users need about {} open files but the limit is {fd_limit}",
            scenario.users,
            scenario.users * 2
        );
    }
    let baseline = if args.baseline {
        eprintln!("measuring the baseline ({} s each)…", args.baseline_secs);
        Some(baseline::measure(
            Duration::from_secs_f64(args.baseline_secs),
            32,
        )?)
    } else {
        None
    };
    let credentials = user_credentials(&scenario);
    let spawned;
    let target = if args.spawn || args.spawn_nodes.is_some() {
        let nodes = args.spawn_nodes.unwrap_or(1).max(1);
        eprintln!(
            "creating {} users and starting {nodes} server node(s)…",
            credentials.len()
        );
        let mut extra: Vec<String> = match &args.server_config {
            Some(path) => vec!["--config".into(), path.display().to_string()],
            None => Vec::new(),
        };
        if let Some(url) = &args.store_url {
            extra.extend(["--store-url".into(), url.clone()]);
        }
        spawned = Spawned::start(&credentials, &extra, args.store_url.as_deref(), nodes)?;
        TargetInfo {
            connector: Connector::for_data_dir(spawned.first_data_dir())?,
            nodes: spawned.nodes(),
            server_pids: spawned.pids(),
        }
    } else {
        if args.session_addr.is_empty() || args.session_addr.len() != args.message_addr.len() {
            bail!(
                "give --spawn, or one --message-addr for each --session-addr of a running server"
            );
        }
        let nodes = args
            .session_addr
            .iter()
            .zip(&args.message_addr)
            .map(|(&session, &message)| NodeAddrs { session, message })
            .collect();
        let connector = match (&args.cert, &args.data_dir) {
            (Some(cert), _) => Connector::new(crate::tls::pinned_client_config_from_pem(cert)?),
            (None, Some(dir)) => Connector::for_data_dir(dir)?,
            (None, None) => bail!("give --data-dir or --cert to trust the server"),
        };
        if let Some(dir) = &args.data_dir {
            eprintln!(
                "creating {} users through the admin socket…",
                credentials.len()
            );
            target::add_users_live(dir, &credentials)?;
        }
        TargetInfo {
            connector,
            nodes,
            server_pids: args.server_pid.clone(),
        }
    };
    let system = actix::System::new();
    let mut report = system.block_on(run_scenario(&scenario, &target, true))?;
    report.baseline = baseline;
    report.workload = workload.map(|w| Figures::of(w, &report));
    println!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report.html())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.verdict.clean())
}

/// Starts and stops the simulated users and keeps the ones online.
struct Driver {
    scenario: Scenario,
    world: Arc<World>,
    arbiters: Vec<Arbiter>,
    credentials: Vec<(String, String)>,
    online: Vec<(usize, Addr<SimUser>)>,
}

impl Driver {
    /// Starts user `index`; it signs on by itself.
    fn start_user(&mut self, index: usize) {
        let (name, password) = self.credentials[index].clone();
        let world = self.world.clone();
        let arbiter = &self.arbiters[index % self.arbiters.len()];
        let addr = SimUser::start_in_arbiter(&arbiter.handle(), move |_| {
            SimUser::new(name, password, index, world)
        });
        self.online.push((index, addr));
    }

    /// Starts `indices` at the ramp rate; waits until each has its snapshot.
    /// Returns (sign-ons per second, seconds to presence convergence).
    async fn wave(
        &mut self,
        indices: Vec<usize>,
        ramp: f64,
        check_presence: bool,
    ) -> Result<(f64, Option<f64>)> {
        let ledger = self.world.ledger.clone();
        let before = ledger.get(Count::SignOns) + ledger.get(Count::SignOnFailures);
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / ramp);
        let count = indices.len() as u64;
        for (n, index) in indices.into_iter().enumerate() {
            let due = started + interval.mul_f64(n as f64);
            tokio::time::sleep_until(due.into()).await;
            self.start_user(index);
        }
        // Cold sign-ons run at the argon2 rate whatever the ramp: allow for
        // a slow machine (20 per second) before calling the wave stuck.
        let limit = Duration::from_secs(60)
            + interval.mul_f64(count as f64)
            + Duration::from_millis(50 * count);
        while ledger.get(Count::SignOns) + ledger.get(Count::SignOnFailures) < before + count {
            if started.elapsed() > limit {
                bail!("sign-ons did not complete within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rate = count as f64 / started.elapsed().as_secs_f64();
        let convergence = if check_presence {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if ledger.presence_converged() {
                    break Some(started.elapsed().as_secs_f64());
                }
                if Instant::now() > deadline {
                    for line in ledger.presence_mismatches(5) {
                        log::warn!("presence not converged: {line}");
                    }
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } else {
            None
        };
        Ok((rate, convergence))
    }

    /// Signs every user off and returns once each has forgotten its
    /// session, so that no late sign-off can undo the next wave's truth.
    async fn sign_off_all(&mut self) {
        self.sign_off_where(|_| true).await;
    }

    /// Signs off the online users whose index `chosen` picks, as
    /// `sign_off_all` does.
    async fn sign_off_where(&mut self, chosen: impl Fn(usize) -> bool) {
        let (leaving, staying) = std::mem::take(&mut self.online)
            .into_iter()
            .partition(|(index, _)| chosen(*index));
        self.online = staying;
        let asked: Vec<_> = leaving
            .into_iter()
            .map(|(_, addr): (usize, Addr<SimUser>)| addr.send(SignOff))
            .collect();
        for answer in asked {
            // A user that stopped already has nothing left to forget.
            let _ = answer.await;
        }
    }

    /// Waits until no event has reached the ledger for `quiet`, at most
    /// `limit`: the traffic of the last step is over.
    async fn settle(&self, quiet: Duration, limit: Duration) {
        let started = Instant::now();
        while self.world.ledger.quiet_for() < quiet && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs one scenario against a server and returns its report.
pub async fn run_scenario(
    scenario: &Scenario,
    target: &TargetInfo,
    progress: bool,
) -> Result<Report> {
    let ledger = Ledger::new(Arc::new(Roster::new(&scenario.prefix, scenario.users)));
    let first = target.nodes.first().context("no server to run against")?;
    let sources = if first.session.ip().is_loopback() && first.session.is_ipv4() {
        (0..scenario.source_ips.min(250))
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)))
            .collect()
    } else {
        Vec::new()
    };
    let world = Arc::new(World {
        connector: target.connector.clone(),
        nodes: target.nodes.clone(),
        ledger: ledger.clone(),
        users: scenario.users,
        track_presence: !scenario.hold,
        content: scenario.content,
        streams: Arc::new(Semaphore::new(scenario.max_streams.max(1))),
        defer_receive: std::sync::atomic::AtomicBool::new(scenario.defer_receive),
        sources,
    });
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut driver = Driver {
        scenario: scenario.clone(),
        world,
        arbiters: (0..threads).map(|_| Arbiter::new()).collect(),
        credentials: user_credentials(scenario),
        online: Vec::new(),
    };
    let bar = progress_bar(progress, &ledger);
    let started_unix = csm_actors::store::unix_now();
    let usage_before = process_usage(&target.server_pids);
    let offline = ((scenario.users as f64) * scenario.offline_fraction).round() as usize;
    let first: Vec<usize> = (0..scenario.users - offline).collect();
    let later: Vec<usize> = (scenario.users - offline..scenario.users).collect();

    let check_presence = !scenario.hold;
    let pids = &target.server_pids;
    // The server's CPU over the measured wave, from its first login until
    // presence converged (or, holding, the sign-on traffic settled).
    let mut wave_from = WaveReading::now(usage_before);
    let wave_users = first.len();
    let (mut sign_on_rate, mut convergence) = driver
        .wave(first.clone(), scenario.ramp, check_presence)
        .await?;
    let mut wave_until = WaveReading::now(process_usage(pids));
    let mut hold = None;
    let mut queue = None;
    let mut steady_from = None;
    let mut send_cost = None;
    if scenario.reconnect {
        driver.sign_off_all().await;
        driver
            .settle(Duration::from_millis(500), Duration::from_secs(30))
            .await;
        wave_from = WaveReading::now(process_usage(pids));
        (sign_on_rate, convergence) = driver
            .wave(first, scenario.reconnect_ramp, check_presence)
            .await?;
        wave_until = WaveReading::now(process_usage(pids));
    }
    if scenario.hold {
        // Measure once the sign-on traffic has settled.
        driver
            .settle(Duration::from_secs(2), Duration::from_secs(300))
            .await;
        let after = process_usage(pids);
        wave_until = WaveReading::now(after);
        // The sessions then sit idle; what the server holds for them is
        // read once the memory of the burst had time to go back (the
        // server returns free memory every few seconds).
        tokio::time::sleep(HOLD_IDLE).await;
        let idle = process_usage(pids);
        if let (Some(before), Some(after), Some(idle)) = (usage_before, after, idle) {
            let sessions = driver.online.len() as u64;
            hold = Some(Hold {
                sessions,
                rss_kib_before: before.rss_kib,
                rss_kib_after: after.rss_kib,
                rss_kib_idle: idle.rss_kib,
                kib_per_session: (idle.rss_kib.saturating_sub(before.rss_kib)) as f64
                    / sessions.max(1) as f64,
            });
        }
        if scenario.hold_secs > 0.0 {
            log::info!(
                "holding {} sessions for {} s more",
                driver.online.len(),
                scenario.hold_secs
            );
            tokio::time::sleep(Duration::from_secs_f64(scenario.hold_secs)).await;
        }
    } else if scenario.queued > 0 {
        queue = Some(queue::offline_queue(&mut driver, pids).await?);
    } else {
        steady_from = Some((Instant::now(), ledger.get(Count::StatusPackets)));
        let sends_from = WaveReading::now(process_usage(pids));
        let dispatched = steady(&mut driver, later).await?;
        if scenario.defer_receive {
            // The send phase ends when every send has its answer; only then
            // do the recipients fetch, so that it measures sends alone.
            let answered = || ledger.get(Count::Sent) + ledger.get(Count::SendErrors);
            let deadline = Instant::now() + Duration::from_secs_f64(scenario.drain_secs);
            while answered() < dispatched && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let sends_until = WaveReading::now(process_usage(pids));
            send_cost = sends_from.cost_until(&sends_until, ledger.get(Count::Sent) as usize);
            driver
                .world
                .defer_receive
                .store(false, std::sync::atomic::Ordering::Release);
            for (_, user) in &driver.online {
                user.do_send(FetchPending);
            }
        }
    }
    let drain_deadline = Instant::now() + Duration::from_secs_f64(scenario.drain_secs);
    while Instant::now() < drain_deadline
        && (ledger.outstanding() > 0 || ledger.quiet_for() < Duration::from_millis(500))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // StatusChange delivery during the steady phase, up to the last event.
    let steady_status_rate = steady_from.map_or(0.0, |(from, before): (Instant, u64)| {
        let last = Instant::now() - ledger.quiet_for().min(from.elapsed());
        let packets = ledger.get(Count::StatusPackets).saturating_sub(before);
        packets as f64
            / last
                .saturating_duration_since(from)
                .as_secs_f64()
                .max(0.001)
    });
    let verdict = if scenario.hold {
        Default::default()
    } else {
        ledger.verdict()
    };
    let usage_after = process_usage(&target.server_pids);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = ledger.elapsed().as_secs_f64();
    let mut latency_ms = BTreeMap::new();
    for metric in Metric::ALL {
        if let Some(p) = ledger.percentiles(metric) {
            latency_ms.insert(metric, p);
        }
    }
    let counts = [
        Count::SignOns,
        Count::SignOnFailures,
        Count::LoginRetries,
        Count::Sent,
        Count::SendErrors,
        Count::Received,
        Count::ReceiveErrors,
        Count::StatusPackets,
        Count::IdleToggles,
        Count::Disconnects,
    ]
    .into_iter()
    .map(|c| (c, ledger.get(c)))
    .collect();
    let report = Report {
        scenario: scenario.clone(),
        machine: Machine::here(),
        started_unix,
        seconds,
        sign_ons_per_sec: sign_on_rate,
        presence_convergence_secs: convergence,
        messages_per_sec: ledger.send_rate(),
        receives_per_sec: ledger.receive_rate(),
        status_packets_per_sec: steady_status_rate,
        latency_ms,
        counts,
        verdict,
        server: usage_before
            .zip(usage_after)
            .map(|(b, a)| ServerUsage::between(b, a)),
        baseline: None,
        hold,
        sign_on_server_cpu_ms: cpu_between(wave_from.server, wave_until.server)
            .map(|secs| secs * 1000.0 / wave_users.max(1) as f64),
        sign_on_cost: wave_from.cost_until(&wave_until, wave_users),
        send_cost,
        queue,
        workload: None,
        series: ledger.series(),
    };
    driver.sign_off_all().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for arbiter in &driver.arbiters {
        arbiter.stop();
    }
    Ok(report)
}

/// How long held sessions sit idle before the server's memory is read.
const HOLD_IDLE: Duration = Duration::from_secs(10);

/// The CPU counters of the server and of this simulator at one moment of
/// a sign-on wave.
#[derive(Debug, Clone, Copy)]
struct WaveReading {
    server: Option<ProcessUsage>,
    simulator_cpu_secs: Option<f64>,
}

impl WaveReading {
    fn now(server: Option<ProcessUsage>) -> WaveReading {
        WaveReading {
            server,
            simulator_cpu_secs: target::own_cpu_secs(),
        }
    }

    /// Where the machine's CPU went between this reading and `until`, per
    /// one of the `events` (sign-ons of a wave, or messages sent).
    fn cost_until(&self, until: &WaveReading, events: usize) -> Option<CpuCost> {
        let (from_server, until_server) = (self.server?, until.server?);
        let (from_sim, until_sim) = (self.simulator_cpu_secs?, until.simulator_cpu_secs?);
        let per_event = |secs: f64| secs.max(0.0) * 1000.0 / events.max(1) as f64;
        let argon2 = until_server.argon2_cpu_secs - from_server.argon2_cpu_secs;
        let server = until_server.cpu_secs - from_server.cpu_secs;
        Some(CpuCost {
            server_argon2_ms: per_event(argon2),
            server_other_ms: per_event(server - argon2),
            simulator_ms: per_event(until_sim - from_sim),
        })
    }
}

/// The server's CPU seconds between two readings, if both were made.
fn cpu_between(from: Option<ProcessUsage>, until: Option<ProcessUsage>) -> Option<f64> {
    from.zip(until)
        .map(|(from, until)| (until.cpu_secs - from.cpu_secs).max(0.0))
}

/// The steady phase: messages and idle toggles at fixed rates; the offline
/// users sign on half-way. Returns the number of sends it started.
async fn steady(driver: &mut Driver, later: Vec<usize>) -> Result<u64> {
    let scenario = driver.scenario.clone();
    let names: Vec<String> = driver.credentials.iter().map(|(n, _)| n.clone()).collect();
    let nonce = id_nonce();
    let start = Instant::now();
    let duration = Duration::from_secs_f64(scenario.duration_secs);
    let mut later = Some(later);
    let (mut sent, mut toggled) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < duration {
        tick.tick().await;
        let elapsed = start.elapsed().min(duration);
        if elapsed >= duration / 2 {
            if let Some(later) = later.take() {
                if !later.is_empty() {
                    // Not awaited to the end: the wave runs beside the load.
                    for index in later {
                        driver.start_user(index);
                    }
                }
            }
        }
        if driver.online.is_empty() {
            continue;
        }
        let due_msgs = due(scenario.rate, elapsed, duration);
        let mut rng = rand::thread_rng();
        while sent < due_msgs {
            // The time this send should have started: latency counts from it.
            let scheduled = start + Duration::from_secs_f64(sent as f64 / scenario.rate);
            let (sender_index, sender) =
                driver.online[rng.gen_range(0..driver.online.len())].clone();
            let mut others: Vec<&String> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != sender_index)
                .map(|(_, n)| n)
                .collect();
            others.shuffle(&mut rng);
            let recipients = others
                .into_iter()
                .take(scenario.recipients)
                .cloned()
                .collect();
            sender.do_send(SendOne {
                id: format!("{}-{nonce}-{sent}", scenario.prefix),
                recipients,
                scheduled,
            });
            sent += 1;
        }
        let due_toggles = due(scenario.idle_rate, elapsed, duration);
        while toggled < due_toggles {
            let (_, user) = &driver.online[rng.gen_range(0..driver.online.len())];
            user.do_send(ToggleIdle);
            toggled += 1;
        }
    }
    Ok(sent)
}

/// What makes this run's message ids unlike those of any earlier run
/// against the same server (ids are retained).
fn id_nonce() -> String {
    format!(
        "{:x}{:x}",
        csm_actors::store::unix_now(),
        std::process::id()
    )
}

/// How many events of a fixed `rate` are due `elapsed` into a phase of
/// `duration`: event k is due at k / rate, so the first at the start (and
/// latency counted from k / rate is not inflated by one interval).
fn due(rate: f64, elapsed: Duration, duration: Duration) -> u64 {
    if rate <= 0.0 {
        return 0;
    }
    let total = (rate * duration.as_secs_f64()) as u64;
    ((rate * elapsed.as_secs_f64()) as u64 + 1).min(total)
}

fn progress_bar(show: bool, ledger: &Ledger) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if bar.is_hidden() {
        return None;
    }
    let ledger = ledger.clone();
    let ticker = bar.clone();
    actix::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        while !ticker.is_finished() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let sent = ledger.get(Count::Sent);
            let rate = (sent - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), sent);
            let errors = ledger.get(Count::SendErrors)
                + ledger.get(Count::ReceiveErrors)
                + ledger.get(Count::SignOnFailures);
            ticker.set_message(format!(
                "{:>6.1}s  signed on {}  sent {} ({:.0}/s)  received {}  status {}  errors {}",
                ledger.elapsed().as_secs_f64(),
                ledger.get(Count::SignOns),
                sent,
                rate,
                ledger.get(Count::Received),
                ledger.get(Count::StatusPackets),
                errors
            ));
            ticker.tick();
        }
    });
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_due_at_its_own_time_and_the_total_is_kept() {
        let duration = Duration::from_secs(10);
        let at = Duration::from_millis;
        // 4 per second: events at 0, 250, 500 … 9,750 ms.
        assert_eq!(due(4.0, at(0), duration), 1, "the first at the start");
        assert_eq!(due(4.0, at(249), duration), 1);
        assert_eq!(due(4.0, at(250), duration), 2);
        assert_eq!(due(4.0, at(9_750), duration), 40);
        assert_eq!(due(4.0, duration, duration), 40, "rate × duration in all");
        assert_eq!(due(0.0, duration, duration), 0);
    }
}
