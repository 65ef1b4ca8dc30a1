//! The simulator's small scenario against a real server: 20 users, 200
//! messages, idle churn and offline recipients who sign on later, ending
//! with nothing lost, duplicated or corrupted and no presence missed.

mod common;

use common::TestServer;
use csm::sim::ledger::Count;
use csm::sim::target::NodeAddrs;
use csm::sim::{run_scenario, target, user_credentials, Scenario, TargetInfo};

/// 20 users, 200 messages to two recipients each, idle churn, a fifth of
/// the users signing on half-way.
fn small_scenario() -> Scenario {
    Scenario {
        users: 20,
        ramp: 100.0,
        duration_secs: 5.0,
        rate: 40.0,
        recipients: 2,
        idle_rate: 10.0,
        offline_fraction: 0.2,
        drain_secs: 20.0,
        ..Scenario::default()
    }
}

#[test]
fn small_scenario_is_clean() {
    let server = TestServer::start();
    let scenario = small_scenario();
    target::add_users_live(&server.data_dir, &user_credentials(&scenario)).unwrap();
    let target = TargetInfo {
        connector: server.connector.clone(),
        nodes: vec![NodeAddrs {
            session: server.session_addr,
            message: server.message_addr,
        }],
        server_pids: Vec::new(),
    };
    let report = actix::System::new()
        .block_on(run_scenario(&scenario, &target, false))
        .unwrap();
    println!("{}", report.table());
    assert_eq!(
        report.counts[&Count::Sent],
        200,
        "every scheduled message acknowledged"
    );
    assert_eq!(report.counts[&Count::Received], 400, "two recipients each");
    assert_eq!(report.counts[&Count::SignOns], 20);
    assert!(report.counts[&Count::IdleToggles] >= 40);
    assert!(report.verdict.clean(), "{:?}", report.verdict);
    assert!(report.html().contains("<svg"));
}

/// The same scenario spread over two nodes on one PostgreSQL: every
/// message is sent at one node and received at the other, and every
/// user's presence crosses between them.
#[cfg(csm_postgres)]
#[test]
fn small_scenario_across_two_nodes_is_clean() {
    let a = TestServer::start_on(common::Backend::Postgres, |_| {});
    let (cert, key) = csm::tls::dev_cert_paths(&a.data_dir);
    let url = a.store_url.clone();
    let b = TestServer::start_on(common::Backend::Postgres, |c| {
        c.store.url = url;
        c.cert = Some(cert);
        c.key = Some(key);
    });
    let scenario = small_scenario();
    target::add_users_live(&a.data_dir, &user_credentials(&scenario)).unwrap();
    let target = TargetInfo {
        connector: a.connector.clone(),
        nodes: [&a, &b]
            .iter()
            .map(|node| NodeAddrs {
                session: node.session_addr,
                message: node.message_addr,
            })
            .collect(),
        server_pids: Vec::new(),
    };
    let report = actix::System::new()
        .block_on(run_scenario(&scenario, &target, false))
        .unwrap();
    println!("{}", report.table());
    assert_eq!(report.counts[&Count::Sent], 200);
    assert_eq!(report.counts[&Count::Received], 400);
    assert!(report.verdict.clean(), "{:?}", report.verdict);
}

/// Runs `csm sim --spawn` with `args` and returns its JSON report.
fn sim_json(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_csm"))
        .args(["sim", "--spawn"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "csm sim {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

/// The named workloads run against a server the simulator spawns, and
/// report the figures they are compared on, read from that server's
/// /proc: here scaled down (fewer users and messages) to fit a test.
#[test]
fn named_workloads_report_their_figures() {
    let w1 = sim_json(&["--scenario", "w1", "--warm", "--users", "40"]);
    let figures = &w1["workload"];
    assert_eq!(figures["workload"], "w1", "{w1}");
    assert_eq!(figures["warm"], true);
    assert_eq!(figures["sessions"], 40, "every session held");
    assert!(figures["rss_kib_per_session"].as_f64().unwrap() > 0.0);
    assert!(figures["server_cpu_ms_per_sign_on"].is_f64(), "{figures}");

    let w2 = sim_json(&["--scenario", "w2", "--warm", "--users", "30"]);
    let figures = &w2["workload"];
    assert_eq!(
        (&figures["workload"], &figures["users"]),
        (&"w2".into(), &30.into())
    );
    assert!(
        figures["convergence_secs"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    assert!(figures["server_cpu_ms_per_sign_on"].is_f64(), "{figures}");
    assert_eq!(
        w2["counts"]["sign_ons"], 60,
        "a cold wave, then the warm one"
    );
    assert_eq!(
        w2["sign_on_cost"]["server_argon2_ms"], 0.0,
        "the measured wave is warm: no password is hashed"
    );

    let w3 = sim_json(&[
        "--scenario",
        "w3",
        "--queued",
        "200",
        "--baseline",
        "--baseline-secs",
        "0.3",
    ]);
    let figures = &w3["workload"];
    assert_eq!(figures["workload"], "w3", "{w3}");
    assert_eq!(
        (&figures["queued"], &figures["delivered"]),
        (&200.into(), &200.into())
    );
    let per_message = figures["server_cpu_us_per_message"].as_f64().unwrap();
    let stored = figures["store_cpu_us_per_message"].as_f64().unwrap();
    let delivered = figures["deliver_cpu_us_per_message"].as_f64().unwrap();
    assert!(per_message > 0.0, "{figures}");
    assert!((per_message - stored - delivered).abs() < 1e-6);
    // The floor beside W3 is two of the baseline's bare exchanges.
    let per_exchange = w3["baseline"]["tls_server_cpu_us_per_exchange"]
        .as_f64()
        .unwrap();
    let floor = figures["tls_floor_us_per_message"].as_f64().unwrap();
    assert!(per_exchange > 0.0, "{w3}");
    assert!((floor - 2.0 * per_exchange).abs() < 1e-6, "{figures}");
    for report in [&w1, &w2, &w3] {
        assert_eq!(report["verdict"]["lost"], 0);
        assert_eq!(report["verdict"]["missed_presence"], 0);
    }
}

/// A cold wave's CPU per sign-on is split between the server's argon2
/// threads, the rest of the server and the simulator, and the server's two
/// parts add up to its whole.
#[test]
fn a_cold_wave_splits_its_cpu_between_argon2_the_server_and_the_simulator() {
    let report = sim_json(&[
        "--users",
        "12",
        "--duration",
        "0",
        "--rate",
        "0",
        "--idle-rate",
        "0",
        "--offline-fraction",
        "0",
    ]);
    let cost = &report["sign_on_cost"];
    let argon2 = cost["server_argon2_ms"].as_f64().unwrap();
    let rest = cost["server_other_ms"].as_f64().unwrap();
    let whole = report["sign_on_server_cpu_ms"].as_f64().unwrap();
    // Twelve argon2 verifications of 19 MiB each: far more than the 10 ms
    // a CPU reading can tell apart.
    assert!(argon2 > 1.0, "{report}");
    assert!(rest >= 0.0, "{report}");
    // CPU is read in clock ticks, the process's and each thread's apart:
    // the rest can come out a tick below nothing, and is then shown as 0.
    assert!(
        (argon2 + rest - whole).abs() < 1e-6 || rest == 0.0,
        "{report}"
    );
    assert!(cost["simulator_ms"].as_f64().unwrap() >= 0.0, "{report}");
    assert_eq!(report["counts"]["sign_ons"], 12);
    assert_eq!(report["verdict"]["missed_presence"], 0);
}

#[test]
fn a_warm_offline_queue_is_refused_with_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_csm"))
        .args(["sim", "--spawn", "--scenario", "w3", "--warm"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--warm applies to w1 and w2"), "{stderr}");
}

#[test]
fn holding_on_after_the_measurement_needs_a_hold() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_csm"))
        .args(["sim", "--spawn", "--users", "4", "--hold-secs", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--hold-secs goes with --hold"), "{stderr}");
}

/// With `--defer-receive` the send phase's CPU per message is reported
/// for the server and the simulator apart, and every message is then
/// received.
#[test]
fn the_send_phase_of_deferred_receives_is_costed() {
    let report = sim_json(&[
        "--users",
        "10",
        "--duration",
        "1",
        "--rate",
        "200",
        "--idle-rate",
        "0",
        "--offline-fraction",
        "0",
        "--attachments",
        "0",
        "--defer-receive",
    ]);
    assert_eq!(report["counts"]["sent"], 200, "{report}");
    assert_eq!(report["counts"]["received"], 200, "{report}");
    let cost = &report["send_cost"];
    let server =
        cost["server_argon2_ms"].as_f64().unwrap() + cost["server_other_ms"].as_f64().unwrap();
    // 200 TLS handshakes and durable writes: many CPU ticks of the server.
    assert!(server > 0.0, "{report}");
    assert!(cost["simulator_ms"].as_f64().unwrap() >= 0.0, "{report}");
    assert_eq!(report["verdict"]["lost"], 0);
}
