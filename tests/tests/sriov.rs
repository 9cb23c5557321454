//! Mode sriov without SR-IOV hardware (none here): the "VF" is a veth whose
//! other end is a port of the rail router's bridge, as a VF's traffic
//! reaches the rail switch, and the agent's sysfs root is a tree of this
//! test's mapping the VF's PCI address to that netdev, as
//! /sys/bus/pci/devices/<bdf>/net/<name> does on a node. What the test
//! cannot show: VF attributes set through a real PF (refused, see netconf).

use std::path::Path;

use railnet_tests::{Agent, RailFabric, ScratchDir, cni, veth_between};

const VF: &str = "ens1f0v3";
const BDF: &str = "0000:3b:00.3";
const VF_MAC: &str = "02:00:00:00:03:03";
const POD_MAC: &str = "02:aa:00:00:00:01";

#[test]
fn a_vf_moves_in_carries_its_rail_and_comes_back_as_it_was() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let router = fabric.router(1);
    veth_between(node, VF, router, "vf3r");
    router.ip(&["link", "set", "vf3r", "master", "br0", "up"]);
    node.ip(&["link", "set", VF, "address", VF_MAC, "mtu", "1500"]);
    let sysfs = ScratchDir::new("sysfs");
    std::fs::create_dir_all(
        sysfs
            .path()
            .join("bus/pci/devices")
            .join(BDF)
            .join("net")
            .join(VF),
    )
    .unwrap();
    let agent = Agent::start_with(
        node,
        &fabric.pools(0),
        &["--sysfs-root", sysfs.path().to_str().unwrap()],
    );
    let records = agent.state_path().parent().unwrap().join("vfs");
    let pod = fabric.pod(0);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "sriov".into();
    conf["deviceID"] = BDF.into();
    conf["mtu"] = 1400.into();
    conf["runtimeConfig"] = serde_json::json!({ "mac": POD_MAC });

    let add = cni("ADD", &conf, "vf-pod", Some(&pod.ns.path()), "net1");
    assert!(add.ok, "{}\n{}", add.stdout, agent.log());
    assert!(!node.has_link(VF), "the VF is still in the node");
    let link = &pod.ns.ip_json(&["link", "show", "dev", "net1"])[0];
    assert_eq!(link["address"], POD_MAC);
    assert_eq!(link["mtu"], 1400);
    assert!(
        records.join("vf-vf-pod-net1.json").is_file(),
        "no record of the VF"
    );
    let addr = add.json["ips"][0]["address"].as_str().unwrap();
    let addr = addr.split('/').next().unwrap();
    let before = router.rx_packets("vf3r");
    assert!(
        pod.ns.ping(addr, "172.16.1.254", 5, 56),
        "rail 1 gateway over the VF"
    );
    assert!(
        router.rx_packets("vf3r") >= before + 5,
        "the pings did not cross the VF"
    );

    // The same VF cannot go to a second pod.
    let other = fabric.pod(0);
    let again = cni("ADD", &conf, "vf-pod-2", Some(&other.ns.path()), "net1");
    assert!(!again.ok);
    assert!(again.stdout.contains(VF), "{}", again.stdout);
    assert!(!other.ns.has_link("net1"));

    let del = cni("DEL", &conf, "vf-pod", Some(&pod.ns.path()), "net1");
    assert!(del.ok, "{}\n{}", del.stdout, agent.log());
    assert!(!pod.ns.has_link("net1"));
    let back = &node.ip_json(&["link", "show", "dev", VF])[0];
    assert_eq!(back["address"], VF_MAC, "MAC not restored");
    assert_eq!(back["mtu"], 1500, "MTU not restored");
    assert!(!Path::new(&records.join("vf-vf-pod-net1.json")).exists());
    assert_eq!(agent.allocations(node), 0);
    // DEL again (runtimes retry): nothing to do, success.
    assert!(cni("DEL", &conf, "vf-pod", Some(&pod.ns.path()), "net1").ok);

    // A PCI address that is no VF of this node: refused, naming it.
    conf["deviceID"] = "0000:3b:00.7".into();
    let bad = cni("ADD", &conf, "vf-pod-3", Some(&pod.ns.path()), "net1");
    assert!(!bad.ok);
    assert!(bad.stdout.contains("0000:3b:00.7"), "{}", bad.stdout);
    assert!(node.has_link(VF));
    assert_eq!(agent.allocations(node), 0);
}
