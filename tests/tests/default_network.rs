//! railnet as a pod's default network (seed 003: Multus's
//! `v1.multus-cni.io/default-network` pointing at a rail network): the rail
//! is the pod's `eth0`, and a pool route `to: 0.0.0.0/0` makes it the
//! default route, at the rail's metric.

use railnet_tests::{Agent, Netns, RailFabric, cni};

#[test]
fn a_rail_can_be_the_pods_eth0_with_the_default_route() {
    let fabric = RailFabric::new(1, 2);
    let node = &fabric.nodes[0];
    let mut pools = fabric.pools(0);
    assert_eq!(pools["pools"][0]["name"], "rail1");
    pools["pools"][0]["routes"] = serde_json::json!([{"to": "0.0.0.0/0", "via": "172.16.1.254"}]);
    let agent = Agent::start(node, &pools);
    // No eth0 of another plugin: railnet's interface is the pod's first.
    let pod = Netns::new("dflt");
    let conf = fabric.netconf(1, &agent, "ebpf");
    let out = cni("ADD", &conf, "dflt-pod", Some(&pod.path()), "eth0");
    assert!(out.ok, "{}\n{}", out.stdout, agent.log());
    assert_eq!(out.json["interfaces"][0]["name"], "eth0");
    let default = pod.ip(&["-4", "route", "show", "default"]);
    assert!(
        default.contains("via 172.16.1.254 dev eth0") && default.contains("metric 101"),
        "{default}"
    );
    let routes = out.json["routes"].as_array().unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == "172.16.1.254"),
        "the result does not carry the default route: {}",
        out.json
    );
    // Traffic leaves through it: the gateway, and rail 2's gateway across
    // the spine.
    let addr = out.json["ips"][0]["address"].as_str().unwrap();
    let addr = addr.split('/').next().unwrap();
    assert!(pod.ping(addr, "172.16.1.254", 3, 56));
    assert!(pod.ping(addr, "172.16.2.254", 3, 56));
    let del = cni("DEL", &conf, "dflt-pod", Some(&pod.path()), "eth0");
    assert!(del.ok, "{}", del.stdout);
    assert!(!pod.has_link("eth0"));
    assert_eq!(agent.allocations(node), 0);
}
