//! The optional checks before ADD answers (off by default, as users asked):
//! `detectIPConflict` refuses an address another host on the rail answers
//! ARP for; `detectGateway` refuses a rail whose gateway does not answer.
//! Either refusal leaves no interface and no address behind.

use railnet_tests::{Agent, Netns, RailFabric, cni, veth_between};

const TAKEN: &str = "172.16.1.60";

#[test]
fn an_address_another_host_answers_for_is_refused_when_asked() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    // A host on rail 1's L2 that already has the address.
    let squatter = Netns::new("squat");
    veth_between(&squatter, "eth0", fabric.router(1), "sq1");
    fabric
        .router(1)
        .ip(&["link", "set", "sq1", "master", "br0", "up"]);
    squatter.ip(&["addr", "add", &format!("{TAKEN}/24"), "dev", "eth0"]);
    squatter.ip(&["link", "set", "eth0", "up"]);
    let squatter_mac = squatter.ip_json(&["link", "show", "dev", "eth0"])[0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent = Agent::start(node, &fabric.pools(0));
    let pod = fabric.pod(0);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["runtimeConfig"] = serde_json::json!({ "ips": [format!("{TAKEN}/24")] });
    conf["detectIPConflict"] = true.into();
    let out = cni("ADD", &conf, "dad-pod", Some(&pod.ns.path()), "net1");
    assert!(!out.ok, "{}", out.stdout);
    let msg = out.json["msg"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "{TAKEN} is already used on rail 1 by {squatter_mac}"
        )),
        "{msg}"
    );
    assert!(
        !pod.ns.has_link("net1"),
        "the refused interface is still there"
    );
    assert_eq!(
        agent.allocations(node),
        0,
        "the refused address is still held"
    );
    // Off by default: the same ADD without the check goes through.
    conf.as_object_mut().unwrap().remove("detectIPConflict");
    let out = cni("ADD", &conf, "dad-pod", Some(&pod.ns.path()), "net1");
    assert!(out.ok, "{}", out.stdout);
    assert!(cni("DEL", &conf, "dad-pod", Some(&pod.ns.path()), "net1").ok);
    // A free address passes the check.
    conf["detectIPConflict"] = true.into();
    conf["runtimeConfig"] = serde_json::json!({ "ips": ["172.16.1.61/24"] });
    let out = cni("ADD", &conf, "dad-pod", Some(&pod.ns.path()), "net1");
    assert!(out.ok, "{}", out.stdout);
}

#[test]
fn a_gateway_that_does_not_answer_is_refused_when_asked() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let mut pools = fabric.pools(0);
    assert_eq!(pools["pools"][0]["name"], "rail1");
    // Nobody holds .253; the rail router is .254.
    pools["pools"][0]["gateway"] = "172.16.1.253".into();
    let agent = Agent::start(node, &pools);
    let pod = fabric.pod(0);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["detectGateway"] = true.into();
    let out = cni("ADD", &conf, "gw-pod", Some(&pod.ns.path()), "net1");
    assert!(!out.ok, "{}", out.stdout);
    let msg = out.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("gateway 172.16.1.253 of rail 1 did not answer ARP"),
        "{msg}"
    );
    assert!(!pod.ns.has_link("net1"));
    assert_eq!(agent.allocations(node), 0);
    drop(agent);
    // The real gateway answers: the check passes.
    let agent = Agent::start(node, &fabric.pools(0));
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["detectGateway"] = true.into();
    let out = cni("ADD", &conf, "gw-pod", Some(&pod.ns.path()), "net1");
    assert!(out.ok, "{}", out.stdout);
}
