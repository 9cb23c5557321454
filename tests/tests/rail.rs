//! A pod's rails wired by the real CNI binary talking to the real agent, in
//! real network namespaces, with the real BPF program attached (a clsact
//! filter, the agent's default).
//! Needs root; `cargo xtask test` builds the binaries these tests execute.

use std::path::Path;

use railnet_agent::dataplane::PodPins;
use railnet_common::Verdict;
use railnet_tests::{Agent, Fabric, REMOTE, cni, unique};

fn address_of(result: &serde_json::Value) -> String {
    let cidr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in CNI result {result}"));
    cidr.split('/').next().unwrap().to_owned()
}

#[test]
fn the_program_puts_rail_sourced_traffic_back_on_its_own_rail() {
    let fabric = Fabric::new(&[1, 2]);
    let agent = Agent::start(&fabric.node, &fabric.pools());
    let cid = unique("c");
    let pod = fabric.pod.path();

    let r1 = cni("ADD", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1");
    assert!(r1.ok, "ADD rail 1: {}\n{}", r1.stdout, agent.log());
    let r2 = cni("ADD", &fabric.netconf(2, &agent), &cid, Some(&pod), "net2");
    assert!(r2.ok, "ADD rail 2: {}\n{}", r2.stdout, agent.log());
    assert_eq!(r1.json["cniVersion"], "1.0.0");
    assert_eq!(r1.json["interfaces"][0]["name"], "net1");
    let (ip1, ip2) = (address_of(&r1.json), address_of(&r2.json));
    assert_eq!(ip1, "172.16.11.10");
    assert_eq!(ip2, "172.16.12.10");

    // Both rails route the RDMA CIDR; rail 1's lower metric wins source-less
    // lookups, which is exactly what sends rail 2's traffic the wrong way.
    let routes = fabric.pod.ip(&["route", "show", "172.16.0.0/16"]);
    assert!(
        routes.contains("via 172.16.11.254 dev net1") && routes.contains("metric 101"),
        "{routes}"
    );
    assert!(
        routes.contains("via 172.16.12.254 dev net2") && routes.contains("metric 102"),
        "{routes}"
    );
    assert_eq!(
        fabric.pod.ip(&["-4", "rule", "show"]).lines().count(),
        3,
        "eBPF mode adds no IPv4 rules"
    );

    // Rail 2's address to the remote GPU: the kernel picks net1; the program
    // redirects to net2. Counted where the packets really arrive.
    let (before1, before2) = (
        fabric.router.rx_packets("rail1"),
        fabric.router.rx_packets("rail2"),
    );
    assert!(
        fabric.ping_from(&ip2, REMOTE, 20),
        "ping from rail 2's address failed\n{}",
        agent.log()
    );
    let d1 = fabric.router.rx_packets("rail1") - before1;
    let d2 = fabric.router.rx_packets("rail2") - before2;
    assert!(
        d2 >= 20,
        "rail 2's router saw {d2} packets, expected the 20 pings"
    );
    assert!(
        d1 < 5,
        "rail 1's router saw {d1} packets of rail 2's traffic"
    );

    let pins = PodPins::new(&agent.pin_root, &cid);
    let counters = pins.counters().expect("read the pod's counters");
    let steered: u64 = counters
        .iter()
        .filter(|(rail, v, _)| *rail == 2 && *v == Verdict::Steered)
        .map(|(_, _, n)| n)
        .sum();
    assert!(steered >= 20, "counters: {counters:?}");

    // Detach the program from net1 (delete its clsact filter): the same
    // traffic now follows the lowest metric, out of rail 1. This is what
    // makes the test above able to fail.
    assert!(pins.dir().join("links/net1").exists(), "net1's program pin");
    railnet_tests::sh(std::process::Command::new("tc").args([
        "-n",
        fabric.pod.name(),
        "filter",
        "del",
        "dev",
        "net1",
        "egress",
    ]));
    let (before1, before2) = (
        fabric.router.rx_packets("rail1"),
        fabric.router.rx_packets("rail2"),
    );
    assert!(fabric.ping_from(&ip2, REMOTE, 20));
    let d1 = fabric.router.rx_packets("rail1") - before1;
    let d2 = fabric.router.rx_packets("rail2") - before2;
    assert!(
        d1 >= 20 && d2 < 5,
        "without the program: rail1 +{d1}, rail2 +{d2}"
    );

    // Outside the RDMA CIDRs nothing is steered (not-to-RDMA-CIDR rule):
    // covered by verdict counters in the dataplane tests of issue 3.

    for (k, ifname) in [(1, "net1"), (2, "net2")] {
        let del = cni("DEL", &fabric.netconf(k, &agent), &cid, Some(&pod), ifname);
        assert!(del.ok, "DEL {ifname}: {}\n{}", del.stdout, agent.log());
        assert!(
            !fabric.pod.has_link(ifname),
            "{ifname} left in the pod after DEL"
        );
    }
    assert!(
        !pins.dir().exists(),
        "pins left after DEL: {}",
        pins.dir().display()
    );
    let again = cni("DEL", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1");
    assert!(again.ok, "a repeated DEL must succeed: {}", again.stdout);
}

#[test]
fn a_failed_add_leaves_nothing_behind_and_names_the_problem() {
    let fabric = Fabric::new(&[1]);
    let agent = Agent::start(&fabric.node, &fabric.pools());
    let cid = unique("c");
    let pod = fabric.pod.path();

    let mut conf = fabric.netconf(1, &agent);
    conf["master"] = "eth9".into();
    let out = cni("ADD", &conf, &cid, Some(&pod), "net1");
    assert!(!out.ok);
    assert_eq!(out.json["code"], 7, "{}", out.stdout);
    assert!(
        out.json["msg"].as_str().unwrap().contains("eth9"),
        "{}",
        out.stdout
    );
    assert!(!fabric.pod.has_link("net1"));
    assert!(!Path::new(&agent.pin_root).join(&cid).exists());

    // MTU above the master's: refused before anything is made.
    let mut conf = fabric.netconf(1, &agent);
    conf["mtu"] = 9000.into();
    let out = cni("ADD", &conf, &cid, Some(&pod), "net1");
    assert!(
        !out.ok && out.json["msg"].as_str().unwrap().contains("mtu 9000"),
        "{}",
        out.stdout
    );
    assert!(!fabric.pod.has_link("net1"));

    // The interface name is taken in the pod: clear error, and the address
    // reserved for this attempt goes back.
    fabric.pod.ip(&[
        "link", "add", "net1", "type", "veth", "peer", "name", "taken",
    ]);
    let out = cni("ADD", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1");
    assert!(
        !out.ok && out.stdout.contains("already exists"),
        "{}",
        out.stdout
    );
    fabric.pod.ip(&["link", "del", "net1"]);

    // Nothing leaked: the first good ADD still gets the pool's first address.
    // (Checked below; first, a second interface claiming rail 1 is refused.)
    let ok = cni("ADD", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1");
    assert!(ok.ok, "{}\n{}", ok.stdout, agent.log());
    assert_eq!(address_of(&ok.json), "172.16.11.10");

    let twin = cni("ADD", &fabric.netconf(1, &agent), &cid, Some(&pod), "net7");
    assert!(
        !twin.ok
            && twin
                .stdout
                .contains("rail 1 is already wired in this pod, on net1"),
        "{}",
        twin.stdout
    );
    assert!(
        !fabric.pod.has_link("net7"),
        "the refused interface is gone again"
    );

    // CHECK (given ADD's result, as runtimes pass it) agrees while the
    // attachment is intact, and says what broke: a route ADD reported
    // gone, the link down, the address flushed.
    let mut checked = fabric.netconf(1, &agent);
    checked["cniVersion"] = "1.0.0".into();
    checked["prevResult"] = ok.json.clone();
    let check = || cni("CHECK", &checked, &cid, Some(&pod), "net1");
    let fresh = check();
    assert!(fresh.ok, "CHECK of a fresh attachment: {}", fresh.stdout);
    let route = &ok.json["routes"][0];
    let (dst, gw) = (
        route["dst"].as_str().unwrap(),
        route["gw"].as_str().unwrap(),
    );
    let metric = route["priority"].to_string();
    fabric.pod.ip(&[
        "route", "del", dst, "via", gw, "dev", "net1", "metric", &metric,
    ]);
    let unrouted = check();
    assert!(
        !unrouted.ok
            && unrouted
                .stdout
                .contains(&format!("the route {dst} via {gw} dev net1")),
        "{}",
        unrouted.stdout
    );
    fabric.pod.ip(&["link", "set", "net1", "down"]);
    let down = check();
    assert!(
        !down.ok && down.stdout.contains("net1 is down"),
        "{}",
        down.stdout
    );
    fabric.pod.ip(&["link", "set", "net1", "up"]);
    fabric.pod.ip(&["addr", "flush", "dev", "net1"]);
    let flushed = check();
    assert!(
        !flushed.ok && flushed.stdout.contains("lacks its address 172.16.11.10"),
        "{}",
        flushed.stdout
    );
    assert!(cni("DEL", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1").ok);
}

#[test]
fn results_come_back_in_the_config_s_version() {
    let fabric = Fabric::new(&[1]);
    let agent = Agent::start(&fabric.node, &fabric.pools());
    let cid = unique("c");
    let pod = fabric.pod.path();
    let mut conf = fabric.netconf(1, &agent);
    conf["cniVersion"] = "0.3.1".into();
    let out = cni("ADD", &conf, &cid, Some(&pod), "net1");
    assert!(out.ok, "{}", out.stdout);
    assert_eq!(out.json["cniVersion"], "0.3.1");
    assert_eq!(out.json["ips"][0]["version"], "4");
    assert!(cni("DEL", &conf, &cid, Some(&pod), "net1").ok);
}

#[test]
fn a_repeated_add_keeps_the_address_the_pod_is_using() {
    // The same ADD again (a runtime retry): whatever it answers, the first
    // ADD's address stays the pod's and is never handed to another pod.
    let fabric = Fabric::new(&[1]);
    let agent = Agent::start(&fabric.node, &fabric.pools());
    let cid = unique("c");
    let pod = fabric.pod.path();
    let first = cni("ADD", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1");
    assert!(first.ok, "{}\n{}", first.stdout, agent.log());
    let ip = address_of(&first.json);
    let again = cni("ADD", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1");
    if again.ok {
        assert_eq!(
            address_of(&again.json),
            ip,
            "a repeat answers with the same address"
        );
    }
    let addr = fabric.pod.ip(&["-4", "addr", "show", "dev", "net1"]);
    assert!(addr.contains(&ip), "the pod lost {ip}:\n{addr}");
    let other = railnet_tests::Netns::new("pod2");
    let second = cni(
        "ADD",
        &fabric.netconf(1, &agent),
        &unique("c"),
        Some(&other.path()),
        "net1",
    );
    assert!(second.ok, "{}", second.stdout);
    assert_ne!(
        address_of(&second.json),
        ip,
        "another pod got the address the first pod still uses"
    );
}

/// A pod netns the agent's sweep could not find later — held by no process
/// it sees and pinned nowhere it looks, as `/proc/<pid>/ns/net` of a pod
/// looks to an agent without the host's PID namespace — is refused at ADD,
/// naming the fix, before any address: the next sweep would otherwise
/// take the live pod for gone and release its addresses.
#[test]
fn a_netns_the_sweep_cannot_see_is_refused_before_any_address() {
    let fabric = Fabric::new(&[1]);
    let agent = Agent::start(&fabric.node, &fabric.pools());
    let dir = railnet_tests::ScratchDir::new("hidden-netns");
    let file = dir.path().join("ns");
    std::fs::write(&file, b"").unwrap();
    // A namespace held only by a bind mount on this file.
    railnet_tests::sh(
        std::process::Command::new("unshare")
            .arg(format!("--net={}", file.display()))
            .arg("true"),
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&file);
    let out = cni(
        "ADD",
        &fabric.netconf(1, &agent),
        &unique("c"),
        Some(&file),
        "net1",
    );
    assert!(!out.ok, "{}", out.stdout);
    assert_eq!(out.json["code"], 4, "{}", out.stdout);
    let said = format!("{} {}", out.json["msg"], out.json["details"]);
    assert!(
        said.contains("not visible to the agent") && said.contains("agent.hostPID"),
        "{said}"
    );
    assert_eq!(agent.allocations(&fabric.node), 0, "an address was held");
}

/// With an allow-list of masters (the node's rail NICs), a network naming
/// another interface is refused at ADD, naming it and the list, before
/// any address; one naming an allowed NIC is wired.
#[test]
fn a_master_the_node_does_not_allow_is_refused() {
    let fabric = Fabric::new(&[1, 2]);
    let agent = Agent::start_with(
        &fabric.node,
        &fabric.pools(),
        &["--allowed-masters", "eth1,none*"],
    );
    let cid = unique("c");
    let pod = fabric.pod.path();
    let refused = cni("ADD", &fabric.netconf(2, &agent), &cid, Some(&pod), "net2");
    assert!(!refused.ok);
    assert_eq!(refused.json["code"], 7, "{}", refused.stdout);
    let said = format!("{} {}", refused.json["msg"], refused.json["details"]);
    assert!(
        said.contains("master eth2 is not one this node allows")
            && said.contains("eth1, none*")
            && said.contains("agent.allowedMasters"),
        "{said}"
    );
    assert!(!fabric.pod.has_link("net2"));
    assert_eq!(agent.allocations(&fabric.node), 0);
    let ok = cni("ADD", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1");
    assert!(ok.ok, "{}\n{}", ok.stdout, agent.log());
    assert!(cni("DEL", &fabric.netconf(1, &agent), &cid, Some(&pod), "net1").ok);
}
