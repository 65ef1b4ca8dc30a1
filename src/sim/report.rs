//! The simulator's report: a table for people, JSON for machines, and a
//! self-contained HTML page with plots of rate and latency over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::baseline::Baseline;
use super::ledger::{Count, Metric, Percentiles, Second, Verdict};
use super::queue::QueueReport;
use super::target::ProcessUsage;
use super::workload::Figures;
use super::Scenario;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub machine: Machine,
    pub started_unix: u64,
    pub seconds: f64,
    /// Sign-ons completed per second during the sign-on wave that was
    /// measured (the second one with `reconnect`).
    pub sign_ons_per_sec: f64,
    /// Seconds from the first login of the measured wave until every online
    /// user saw every other one online.
    pub presence_convergence_secs: Option<f64>,
    pub messages_per_sec: f64,
    pub receives_per_sec: f64,
    /// StatusChange packets received per second in the steady phase.
    pub status_packets_per_sec: f64,
    pub latency_ms: BTreeMap<Metric, Percentiles>,
    pub counts: BTreeMap<Count, u64>,
    pub verdict: Verdict,
    pub server: Option<ServerUsage>,
    pub baseline: Option<Baseline>,
    pub hold: Option<Hold>,
    /// The server's CPU per sign-on over the measured wave (milliseconds),
    /// from its first login until presence converged or, holding, the
    /// sign-on traffic settled: the server's own cost, whatever the
    /// simulator's.
    pub sign_on_server_cpu_ms: Option<f64>,
    /// The same wave's CPU per sign-on split between the server's argon2,
    /// the rest of the server and this simulator, which shares the
    /// machine.
    pub sign_on_cost: Option<CpuCost>,
    /// With `--defer-receive`: the CPU per message of the send phase alone,
    /// from its first send until every send had its answer, by who spent
    /// it.
    pub send_cost: Option<CpuCost>,
    /// The offline queue phase, if the scenario had one.
    pub queue: Option<QueueReport>,
    /// The figures of the named workload this run was.
    pub workload: Option<Figures>,
    pub series: Vec<Second>,
}

/// CPU milliseconds per event (a sign-on of the measured wave, a message
/// of the send phase), by who spent them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuCost {
    /// The server's argon2 threads (cold sign-ons only).
    pub server_argon2_ms: f64,
    /// The rest of the server: TLS, sessions, presence, the store.
    pub server_other_ms: f64,
    /// This simulator: its TLS clients and the packets it decodes.
    pub simulator_ms: f64,
}

impl CpuCost {
    /// argon2's part of all the CPU a cold sign-on costs, the simulator's
    /// included. With the simulator on the same cores as the server, the
    /// sign-on rate can be at most this part of the argon2 rate.
    pub fn argon2_share(&self) -> Option<f64> {
        let all = self.server_argon2_ms + self.server_other_ms + self.simulator_ms;
        (self.server_argon2_ms > 0.0).then(|| self.server_argon2_ms / all)
    }

    /// argon2's part of the server's own CPU per cold sign-on: the same
    /// ceiling for a server whose clients run elsewhere.
    pub fn argon2_share_of_server(&self) -> Option<f64> {
        let server = self.server_argon2_ms + self.server_other_ms;
        (self.server_argon2_ms > 0.0).then(|| self.server_argon2_ms / server)
    }
}

/// This machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
}

impl Machine {
    pub fn here() -> Machine {
        let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        }
    }
}

/// The server's use of the machine during the run.
#[derive(Debug, Clone, Serialize)]
pub struct ServerUsage {
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
    pub rss_kib_at_end: u64,
}

/// The hold mode's result: memory per idle session.
#[derive(Debug, Clone, Serialize)]
pub struct Hold {
    pub sessions: u64,
    /// Before the first sign-on.
    pub rss_kib_before: u64,
    /// Once the sign-on traffic ended.
    pub rss_kib_after: u64,
    /// After the sessions sat idle for 10 s more.
    pub rss_kib_idle: u64,
    /// (idle − before) ÷ sessions.
    pub kib_per_session: f64,
}

impl ServerUsage {
    pub fn between(before: ProcessUsage, after: ProcessUsage) -> ServerUsage {
        ServerUsage {
            cpu_secs: after.cpu_secs - before.cpu_secs,
            peak_rss_kib: after.peak_rss_kib,
            rss_kib_at_end: after.rss_kib,
        }
    }
}

impl Report {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let s = &self.scenario;
        let _ = writeln!(
            out,
            "csm sim: {} users ({}% offline at start), {:.0}s, {} msg/s target, {} idle toggles/s; {} cores, {} GiB",
            s.users,
            (s.offline_fraction * 100.0).round(),
            s.duration_secs,
            s.rate,
            s.idle_rate,
            self.machine.cores,
            self.machine.memory_gib
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "throughput");
        let _ = writeln!(
            out,
            "  sign-ons/s            {:>12.1}",
            self.sign_ons_per_sec
        );
        if let Some(c) = self.presence_convergence_secs {
            let _ = writeln!(out, "  presence converged in {:>11.3} s", c);
        }
        let _ = writeln!(
            out,
            "  messages done/s       {:>12.1}",
            self.messages_per_sec
        );
        let _ = writeln!(
            out,
            "  receives/s            {:>12.1}",
            self.receives_per_sec
        );
        let _ = writeln!(
            out,
            "  StatusChange recv/s   {:>12.1}  (steady phase)",
            self.status_packets_per_sec
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "latency (ms)          {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for metric in Metric::ALL {
            if let Some(p) = self.latency_ms.get(&metric) {
                let _ = writeln!(
                    out,
                    "  {:<20}{:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                    metric.label(),
                    p.count,
                    p.p50,
                    p.p90,
                    p.p99,
                    p.p999,
                    p.max
                );
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "counts");
        for (count, n) in &self.counts {
            let _ = writeln!(out, "  {:<22}{:>10}", format!("{count:?}"), n);
        }
        if let Some(server) = &self.server {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "server: {:.2} CPU s, peak RSS {:.1} MiB, RSS at end {:.1} MiB",
                server.cpu_secs,
                server.peak_rss_kib as f64 / 1024.0,
                server.rss_kib_at_end as f64 / 1024.0
            );
        }
        if let Some(ms) = self.sign_on_server_cpu_ms {
            let _ = writeln!(
                out,
                "server CPU per sign-on of the measured wave: {ms:.3} ms"
            );
        }
        if let Some(cost) = &self.sign_on_cost {
            let _ = writeln!(
                out,
                "  of which argon2 {:.3} ms, the rest of the server {:.3} ms; simulator {:.3} ms",
                cost.server_argon2_ms, cost.server_other_ms, cost.simulator_ms
            );
            if let Some((all, server)) = cost.argon2_share().zip(cost.argon2_share_of_server()) {
                let _ = writeln!(
                    out,
                    "  argon2's share: {all:.3} of all this CPU, {server:.3} of the server's \
                     (the most sign-ons/s ÷ argon2 verifies/s can be, with and without \
                     the simulator on the same cores)"
                );
            }
        }
        if let Some(cost) = &self.send_cost {
            let _ = writeln!(
                out,
                "CPU per message of the send phase: server {:.3} ms, simulator {:.3} ms",
                cost.server_argon2_ms + cost.server_other_ms,
                cost.simulator_ms
            );
        }
        if let Some(q) = &self.queue {
            let _ = writeln!(
                out,
                "offline queue: {} sent, {} stored in {:.2} s, {} delivered in {:.2} s",
                q.queued, q.stored, q.store_secs, q.delivered, q.deliver_secs
            );
        }
        if let Some(hold) = &self.hold {
            let _ = writeln!(
                out,
                "hold: {} sessions, RSS {:.1} → {:.1} MiB, idle 10 s later {:.1} MiB, {:.1} KiB per session",
                hold.sessions,
                hold.rss_kib_before as f64 / 1024.0,
                hold.rss_kib_after as f64 / 1024.0,
                hold.rss_kib_idle as f64 / 1024.0,
                hold.kib_per_session
            );
        }
        if let Some(b) = &self.baseline {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "baseline: {:.0} bare TLS exchanges/s ({} at once), {:.1} argon2 verifies/s",
                b.tls_exchanges_per_sec, b.tls_concurrency, b.argon2_verifies_per_sec
            );
            if let Some(us) = b.tls_server_cpu_us_per_exchange {
                let _ = writeln!(out, "  the TLS server's CPU per bare exchange {us:.1} µs");
            }
            if b.tls_exchanges_per_sec > 0.0 && self.messages_per_sec > 0.0 {
                let _ = writeln!(
                    out,
                    "  messages/s ÷ TLS exchanges/s = {:.2}",
                    self.messages_per_sec / b.tls_exchanges_per_sec
                );
            }
            if b.argon2_verifies_per_sec > 0.0 && self.sign_ons_per_sec > 0.0 {
                let _ = writeln!(
                    out,
                    "  sign-ons/s ÷ argon2 verifies/s = {:.2}",
                    self.sign_ons_per_sec / b.argon2_verifies_per_sec
                );
            }
        }
        if let Some(figures) = &self.workload {
            let _ = writeln!(out);
            out.push_str(&figures.table());
        }
        let v = &self.verdict;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "verdict: lost {}, duplicated {}, corrupted {}, missed presence {} => {}",
            v.lost,
            v.duplicated,
            v.corrupted,
            v.missed_presence,
            if v.clean() { "OK" } else { "FAILED" }
        );
        out
    }

    /// One self-contained HTML page with inline SVG plots.
    pub fn html(&self) -> String {
        let series = &self.series;
        let rates = plot(
            "rate per second",
            &[
                (
                    "messages done",
                    series.iter().map(|s| s.done as f64).collect(),
                ),
                (
                    "received",
                    series.iter().map(|s| s.received as f64).collect(),
                ),
                (
                    "sign-ons",
                    series.iter().map(|s| s.sign_ons as f64).collect(),
                ),
            ],
        );
        let latency = plot(
            "end-to-end latency (ms)",
            &[
                ("p50", series.iter().map(|s| s.end_to_end_p50_ms).collect()),
                ("p99", series.iter().map(|s| s.end_to_end_p99_ms).collect()),
            ],
        );
        let table = escape(&self.table());
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>csm sim report</title>\
             <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}\
             svg{{border:1px solid #ccc;margin:1em 0}}</style></head><body>\
             <h1>csm sim report</h1><pre>{table}</pre>{rates}{latency}\
             <details><summary>JSON</summary><pre>{}</pre></details></body></html>",
            escape(&json)
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn plot(title: &str, lines: &[(&str, Vec<f64>)]) -> String {
    let (width, height, pad) = (800.0, 260.0, 40.0);
    let points = lines.iter().map(|(_, v)| v.len()).max().unwrap_or(0).max(2);
    let top = lines
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1.0);
    let x = |i: usize| pad + (width - 2.0 * pad) * i as f64 / (points - 1) as f64;
    let y = |v: f64| height - pad - (height - 2.0 * pad) * v / top;
    let mut svg = format!(
        "<h2>{}</h2><svg width=\"{width}\" height=\"{height}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"4\" y=\"{}\" font-size=\"11\">{top:.1}</text>\
         <text x=\"4\" y=\"{}\" font-size=\"11\">0</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\">{} s</text>",
        escape(title),
        pad,
        height - pad,
        width - pad - 20.0,
        height - 10.0,
        points - 1
    );
    for (n, (name, values)) in lines.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let path: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{colour}\">{}</text>",
            path.join(" "),
            pad + 10.0 + 130.0 * n as f64,
            pad - 12.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::CpuCost;

    #[test]
    fn argon2s_share_is_of_all_the_cpu_or_of_the_servers() {
        let cold = CpuCost {
            server_argon2_ms: 17.0,
            server_other_ms: 1.0,
            simulator_ms: 2.0,
        };
        assert_eq!(cold.argon2_share(), Some(17.0 / 20.0));
        assert_eq!(cold.argon2_share_of_server(), Some(17.0 / 18.0));
        let warm = CpuCost {
            server_argon2_ms: 0.0,
            ..cold
        };
        assert_eq!(warm.argon2_share(), None);
        assert_eq!(warm.argon2_share_of_server(), None);
    }
}
