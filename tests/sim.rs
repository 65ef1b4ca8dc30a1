//! The simulator's small scenario against a real server: 20 users, 200
//! messages, idle churn and offline recipients who sign on later, ending
//! with nothing lost, duplicated or corrupted and no presence missed.

mod common;

use common::TestServer;
use csm::sim::ledger::Count;
use csm::sim::{run_scenario, target, user_credentials, Scenario, TargetInfo};

#[test]
fn small_scenario_is_clean() {
    let server = TestServer::start();
    let scenario = Scenario {
        users: 20,
        ramp: 100.0,
        duration_secs: 5.0,
        rate: 40.0,
        recipients: 2,
        idle_rate: 10.0,
        offline_fraction: 0.2,
        drain_secs: 20.0,
        ..Scenario::default()
    };
    target::add_users_live(&server.data_dir, &user_credentials(&scenario)).unwrap();
    let target = TargetInfo {
        connector: server.connector.clone(),
        session_addr: server.session_addr,
        message_addr: server.message_addr,
        server_pid: None,
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
