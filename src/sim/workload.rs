//! The named workloads, `csm sim --scenario w1|w2|w3`: three measurements
//! made the same way on other presence servers, so that csm's figures can
//! be set beside theirs. Each is a preset scenario (flags still override
//! its fields) and a summary of exactly the figures it is compared on.
//!
//! - **W1**: 5,000 users sign on and stay idle; memory per idle TLS session
//!   and the server's CPU per sign-on.
//! - **W2**: 500 users sign on at once, and everyone must see everyone
//!   online; time to that point and the server's CPU per sign-on, fan-out
//!   included.
//! - **W3**: 5,000 messages queued for offline users, who then sign on and
//!   receive them; the server's CPU per message stored and delivered,
//!   and beside it (with `--baseline`) the floor of two bare TLS exchanges.
//!
//! `--warm` signs everyone on and off once first, so that the measured wave
//! finds passwords already verified (the login cache), as on a server that
//! has been up for a while. W3 always measures warm sign-ons: its recipients
//! sign on before they go offline.

use std::fmt::Write as _;

use serde::Serialize;

use super::content::ContentSpec;
use super::report::Report;
use super::Scenario;

/// One of the named workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    W1,
    W2,
    W3,
}

impl Workload {
    /// The workload `name` stands for, if it is one (`w1`, `W1` …).
    pub fn named(name: &str) -> Option<Workload> {
        match name.to_ascii_lowercase().as_str() {
            "w1" => Some(Workload::W1),
            "w2" => Some(Workload::W2),
            "w3" => Some(Workload::W3),
            _ => None,
        }
    }

    /// The scenario this workload runs.
    pub fn scenario(self, warm: bool) -> Scenario {
        let quiet = Scenario {
            duration_secs: 0.0,
            rate: 0.0,
            idle_rate: 0.0,
            offline_fraction: 0.0,
            // A cold wave runs at the argon2 rate whatever the ramp; busy
            // answers are retried.
            ramp: 1000.0,
            reconnect: warm,
            reconnect_ramp: 5000.0,
            ..Scenario::default()
        };
        match self {
            Workload::W1 => Scenario {
                users: 5000,
                hold: true,
                ..quiet
            },
            Workload::W2 => Scenario {
                users: 500,
                ..quiet
            },
            Workload::W3 => Scenario {
                users: 20,
                queued: 5000,
                reconnect: false,
                content: ContentSpec {
                    text_bytes: 100,
                    attachments: 0,
                    attachment_bytes: 0,
                },
                ..quiet
            },
        }
    }
}

/// The figures a workload is compared on.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "workload", rename_all = "lowercase")]
pub enum Figures {
    W1 {
        warm: bool,
        sessions: u64,
        rss_kib_per_session: Option<f64>,
        server_cpu_ms_per_sign_on: Option<f64>,
    },
    W2 {
        warm: bool,
        users: usize,
        convergence_secs: Option<f64>,
        server_cpu_ms_per_sign_on: Option<f64>,
    },
    W3 {
        queued: u64,
        delivered: u64,
        server_cpu_us_per_message: Option<f64>,
        store_cpu_us_per_message: Option<f64>,
        deliver_cpu_us_per_message: Option<f64>,
        /// Two bare TLS exchanges of the baseline's server (one stream to
        /// store, one to deliver): what any server of this protocol pays.
        tls_floor_us_per_message: Option<f64>,
    },
}

impl Figures {
    /// Picks a workload's figures out of a run's report.
    pub fn of(workload: Workload, report: &Report) -> Figures {
        let scenario = &report.scenario;
        match workload {
            Workload::W1 => Figures::W1 {
                warm: scenario.reconnect,
                sessions: report.hold.as_ref().map_or(0, |h| h.sessions),
                rss_kib_per_session: report.hold.as_ref().map(|h| h.kib_per_session),
                server_cpu_ms_per_sign_on: report.sign_on_server_cpu_ms,
            },
            Workload::W2 => Figures::W2 {
                warm: scenario.reconnect,
                users: scenario.users,
                convergence_secs: report.presence_convergence_secs,
                server_cpu_ms_per_sign_on: report.sign_on_server_cpu_ms,
            },
            Workload::W3 => {
                let queue = report.queue.as_ref();
                let per = |cpu: Option<f64>| {
                    queue
                        .zip(cpu)
                        .filter(|(q, _)| q.delivered > 0)
                        .map(|(q, secs)| secs * 1e6 / q.delivered as f64)
                };
                Figures::W3 {
                    queued: queue.map_or(0, |q| q.queued),
                    delivered: queue.map_or(0, |q| q.delivered),
                    server_cpu_us_per_message: per(queue.and_then(|q| {
                        q.store_cpu_secs.zip(q.deliver_cpu_secs).map(|(s, d)| s + d)
                    })),
                    store_cpu_us_per_message: per(queue.and_then(|q| q.store_cpu_secs)),
                    deliver_cpu_us_per_message: per(queue.and_then(|q| q.deliver_cpu_secs)),
                    tls_floor_us_per_message: report
                        .baseline
                        .as_ref()
                        .and_then(|b| b.tls_server_cpu_us_per_exchange)
                        .map(|us| 2.0 * us),
                }
            }
        }
    }

    /// The figures as lines of the report's table.
    pub fn table(&self) -> String {
        let shown = |v: Option<f64>, digits: usize| {
            v.map_or(
                "not measured (no server process to read)".to_string(),
                |v| format!("{v:.digits$}"),
            )
        };
        let warmth = |warm: bool| if warm { "warm" } else { "cold" };
        let mut out = String::new();
        match self {
            Figures::W1 {
                warm,
                sessions,
                rss_kib_per_session,
                server_cpu_ms_per_sign_on,
            } => {
                let _ = writeln!(out, "W1: {sessions} idle TLS sessions ({})", warmth(*warm));
                let _ = writeln!(
                    out,
                    "  RSS per idle session       {} KiB",
                    shown(*rss_kib_per_session, 1)
                );
                let _ = writeln!(
                    out,
                    "  server CPU per sign-on     {} ms",
                    shown(*server_cpu_ms_per_sign_on, 3)
                );
            }
            Figures::W2 {
                warm,
                users,
                convergence_secs,
                server_cpu_ms_per_sign_on,
            } => {
                let _ = writeln!(out, "W2: {users} users sign on at once ({})", warmth(*warm));
                let _ = writeln!(
                    out,
                    "  everyone sees everyone in  {}",
                    convergence_secs
                        .map_or("never (not converged)".to_string(), |s| format!("{s:.3} s"))
                );
                let _ = writeln!(
                    out,
                    "  server CPU per sign-on     {} ms (fan-out included)",
                    shown(*server_cpu_ms_per_sign_on, 3)
                );
            }
            Figures::W3 {
                queued,
                delivered,
                server_cpu_us_per_message,
                store_cpu_us_per_message,
                deliver_cpu_us_per_message,
                tls_floor_us_per_message,
            } => {
                let _ = writeln!(
                    out,
                    "W3: {queued} messages queued for offline users, {delivered} delivered"
                );
                let _ = writeln!(
                    out,
                    "  server CPU per message     {} µs (stored {} + delivered {})",
                    shown(*server_cpu_us_per_message, 1),
                    shown(*store_cpu_us_per_message, 1),
                    shown(*deliver_cpu_us_per_message, 1)
                );
                if let Some(floor) = tls_floor_us_per_message {
                    let _ = writeln!(
                        out,
                        "  two bare TLS exchanges     {floor:.1} µs (the baseline's server, per message)"
                    );
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_workloads_and_nothing_else() {
        assert_eq!(Workload::named("w1"), Some(Workload::W1));
        assert_eq!(Workload::named("W2"), Some(Workload::W2));
        assert_eq!(Workload::named("w3"), Some(Workload::W3));
        assert_eq!(Workload::named("w4"), None);
        assert_eq!(Workload::named("scenario.toml"), None);
    }

    #[test]
    fn presets_are_the_published_workloads() {
        let w1 = Workload::W1.scenario(true);
        assert_eq!((w1.users, w1.hold, w1.reconnect), (5000, true, true));
        let w2 = Workload::W2.scenario(false);
        assert_eq!((w2.users, w2.hold, w2.reconnect), (500, false, false));
        assert_eq!(w2.rate, 0.0, "sign-ons only");
        let w3 = Workload::W3.scenario(false);
        assert_eq!(w3.queued, 5000);
        assert_eq!(w3.offline_fraction, 0.0);
    }
}
