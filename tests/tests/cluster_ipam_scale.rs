//! Kubernetes-mode IPAM at cluster scale, as a correctness test (the
//! figures are `cargo xtask bench kube-scale`'s): a job launch on 50
//! simulated nodes — each the agent's own allocator and store, 8 pods × 8
//! rails at once — against one real kube-apiserver, API Priority and
//! Fairness and RBAC on, each node its own token bound to the chart's
//! agent role (the CRD-only server, without APF, took four times as long
//! on the short pools: 176 s against 43 s). What a user would
//! notice is read from the API server's RailBlocks: an address given to
//! two pods, an acknowledged allocation gone, a claim nobody holds (a
//! leak: the pool shrinks for good), a pod that never got its rails, a
//! short pool not filled to its last address. Not timed.

use std::time::Duration;

use railnet_tests::{
    apiserver::ApiServer,
    kube_scale::{self, Pools, Report, Scenario},
};

fn launch(api: ApiServer, pools: Pools) -> Report {
    railnet_tests::raise_nofile_limit();
    kube_scale::install_crd(&api);
    kube_scale::run(
        &api,
        Scenario {
            nodes: 50,
            pods_per_node: 8,
            pools,
            deadline: Duration::from_secs(600),
        },
        |_| (),
    )
}

fn assert_correct(r: &Report) {
    r.print();
    let s = &r.scenario;
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    assert_eq!(r.pods_done, s.nodes * s.pods_per_node);
}

/// Per-rail pools with room to spare (the seeds' Solution 1): every node
/// claims blocks of its own.
#[test]
fn a_job_launch_on_50_nodes_gives_every_pod_its_rails_once() {
    let r = launch(ApiServer::start_kube(50), Pools::Plenty);
    assert_correct(&r);
    // The agents' requests went through API Priority and Fairness as
    // a cluster's would (the chart's ServiceAccount: not exempt).
    assert!(
        r.flow_control.iter().any(|f| f.dispatched > 0),
        "API Priority and Fairness dispatched none of the agents' requests: {:?}",
        r.flow_control
    );
}

/// Pools exactly the job's size: half the nodes find no block left and
/// borrow held addresses from the others; the pools end full.
#[test]
fn a_job_launch_that_fills_its_pools_lends_every_last_address_once() {
    let r = launch(ApiServer::start_kube(50), Pools::Short);
    assert_correct(&r);
    // Fewer blocks than nodes × rails, yet every pod has every rail: the
    // nodes without a block of a rail's pool borrowed.
    let s = &r.scenario;
    assert!(
        r.blocks < s.nodes * kube_scale::RAILS,
        "{} blocks: no node had to borrow",
        r.blocks
    );
}
