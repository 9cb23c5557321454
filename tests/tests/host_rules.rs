//! The host side of the not-to-RDMA-CIDR rule (`--host-rules`), on the
//! netns fabric's nodes with host addresses on their rail NICs as the
//! guides' `setNicAddr.sh` gives them: the host's rail-sourced RDMA
//! traffic leaves on its own rail, its traffic to the cluster network never
//! leaves on a rail, an agent restart changes nothing (no flap), and the
//! uninstall step leaves the node's rules and routes as they were.

use std::time::{Duration, Instant};

use railnet_tests::{Agent, Netns, RailFabric};

const CIDR: &str = "172.16.0.0/16";

/// IPv4 rules and every table's IPv4 routes: what "as it was" means
/// (railnet's host rules are IPv4; the fabric's IPv6 link-local addresses
/// come and go on their own).
fn routing(node: &Netns) -> (String, String) {
    (
        node.ip(&["-4", "rule"]),
        node.ip(&["-4", "route", "show", "table", "all"]),
    )
}

/// Polls `f` for up to 15 s: whether it came true.
fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

fn dev_of(node: &Netns, dst: &str, src: &str) -> String {
    node.ip_json(&["route", "get", dst, "from", src])[0]["dev"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn host_rail_traffic_stays_on_its_rail_and_cluster_traffic_off_the_rails() {
    let fabric = RailFabric::new(2, 2);
    for (n, node) in fabric.nodes.iter().enumerate() {
        for k in 1..=2 {
            node.ip(&[
                "addr",
                "add",
                &format!("172.16.{k}.{}/24", 5 + n),
                "dev",
                &format!("eth{k}"),
            ]);
        }
    }
    let node0 = &fabric.nodes[0];
    let bare = routing(node0);
    // Without railnet's rules the host's rail-1 address reaches node 1's
    // rail-2 address out of rail 2 (the kernel's subnet route).
    assert_eq!(dev_of(node0, "172.16.2.6", "172.16.1.5"), "eth2");

    let flags = ["--host-rules", CIDR, "--sweep-interval", "1"];
    let mut agents: Vec<Agent> = (0..2)
        .map(|n| Agent::start_with(&fabric.nodes[n], &fabric.pools(n), &flags))
        .collect();
    assert!(
        wait_for(|| node0.ip(&["rule"]).contains("from 172.16.2.5 lookup")),
        "no host rules on node0: {}\n{}",
        node0.ip(&["rule"]),
        agents[0].log()
    );
    let rules = node0.ip(&["rule"]);
    assert!(
        rules.contains(&format!(
            "32760:\tnot from all to {CIDR} lookup main proto 214"
        )),
        "{rules}"
    );

    // Rail-sourced RDMA traffic leaves on its rail: rail 1's router sees
    // the requests, and node 1 answers (its own rules send the replies
    // back on rail 2, through the spine).
    assert_eq!(dev_of(node0, "172.16.2.6", "172.16.1.5"), "eth1");
    let before = fabric.rails_rx(0);
    assert!(node0.ping("172.16.1.5", "172.16.2.6", 5, 56), "{rules}");
    let after = fabric.rails_rx(0);
    assert!(
        after[0] - before[0] >= 5,
        "rail 1 saw {before:?} → {after:?}"
    );
    assert!(
        after[1] - before[1] < 5,
        "rail 2 saw {before:?} → {after:?}"
    );

    // The host's own traffic to the cluster network, sourced from a rail
    // address (as a CNI may pick it), follows the main table: not a rail.
    assert_eq!(dev_of(node0, "10.244.0.77", "172.16.1.5"), "cbr0");
    let before = fabric.rails_rx(0);
    let _ = node0.ping("172.16.1.5", "10.244.0.77", 20, 56);
    let after = fabric.rails_rx(0);
    // (A few packets of the fabric's own ARP and IPv6 chatter count too.)
    assert!(
        after.iter().zip(&before).all(|(a, b)| a - b < 10),
        "cluster traffic went out on a rail: {before:?} → {after:?}"
    );
    let scrape = agents[0].scrape(node0, "/metrics");
    assert!(
        scrape.contains("railnet_host_rules{kind=\"rule\"} 3"),
        "{scrape}"
    );

    // An agent restart keeps the rules: nothing removed while it is away,
    // nothing changed when it is back.
    let kept = routing(node0);
    agents[0].stop();
    assert_eq!(routing(node0), kept, "the rules went with the agent");
    agents[0].spawn(node0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(routing(node0), kept);
    let updates = agents[0].log().matches("host rules updated").count();
    assert_eq!(updates, 1, "{}", agents[0].log());

    // The uninstall step: the node as it was.
    agents[0].stop();
    let removed = node0.run(|| {
        railnet_agent::rtnl::with_rtnl(
            |h| async move { railnet_agent::host_rules::remove(&h).await },
        )
    });
    let removed = removed.expect("rtnetlink").expect("remove");
    assert_eq!(removed.len(), 3 + 4, "{removed:?}");
    assert_eq!(routing(node0), bare);
}
