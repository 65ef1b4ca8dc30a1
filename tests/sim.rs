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
