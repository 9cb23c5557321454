//! CNI GC (spec 1.1) and pool affinities, through the real CNI binary.

use railnet_tests::{Agent, RailFabric, cni, unique};
use serde_json::json;

#[test]
fn gc_releases_what_the_runtime_no_longer_lists() {
    let fabric = RailFabric::new(1, 1);
    // Two addresses only: a third pod fits only once GC frees one.
    let pools = json!({"pools": [{
        "name": "rail1", "subnet": "172.16.1.0/24", "gateway": "172.16.1.254",
        "ips": ["172.16.1.10-172.16.1.11"],
    }]});
    let agent = Agent::start(&fabric.nodes[0], &pools);
    let conf = fabric.netconf(1, &agent, "ebpf");
    let (a, b, c) = (fabric.pod(0), fabric.pod(0), fabric.pod(0));
    let (ca, cb, cc) = (unique("a"), unique("b"), unique("c"));
    assert!(cni("ADD", &conf, &ca, Some(&a.ns.path()), "net1").ok);
    assert!(cni("ADD", &conf, &cb, Some(&b.ns.path()), "net1").ok);
    let full = cni("ADD", &conf, &cc, Some(&c.ns.path()), "net1");
    assert!(
        !full.ok && full.stdout.contains("exhausted"),
        "{}",
        full.stdout
    );

    // A list without a live pod (empty here: a runtime's bug, or a caller
    // that is no runtime) does not take its addresses: A and B still have
    // their netns.
    let mut gc = json!({"cniVersion": "1.1.0", "name": "rail1", "type": "railnet", "agentSocket": agent.socket});
    gc["cni.dev/valid-attachments"] = json!([]);
    let out = cni("GC", &gc, "", None, "");
    assert!(out.ok, "GC: {}\n{}", out.stdout, agent.log());
    assert!(
        agent.pin_root.join(&ca).exists() && agent.pin_root.join(&cb).exists(),
        "GC released pods whose netns is alive"
    );
    assert!(!cni("ADD", &conf, &cc, Some(&c.ns.path()), "net1").ok);

    // Pod B is gone without its DEL (its netns with it); the runtime says
    // only pod A is still attached to this network.
    let b_netns = b.ns.path();
    drop(b);
    assert!(!b_netns.exists());
    gc["cni.dev/valid-attachments"] = json!([{"containerID": ca, "ifname": "net1"}]);
    let out = cni("GC", &gc, "", None, "");
    assert!(out.ok, "GC: {}\n{}", out.stdout, agent.log());
    assert!(
        !agent.pin_root.join(&cb).exists(),
        "GC removes the stale pod's pins"
    );
    assert!(
        agent.pin_root.join(&ca).exists(),
        "GC keeps the valid pod's pins"
    );
    // …and its rail info (the harness's pod UID is uid-<container ID>).
    assert!(!agent.pod_info(&format!("uid-{cb}")).exists());
    assert!(
        agent
            .pod_info(&format!("uid-{ca}"))
            .join("rails.json")
            .exists()
    );
    let ok = cni("ADD", &conf, &cc, Some(&c.ns.path()), "net1");
    assert!(ok.ok, "after GC the freed address is there: {}", ok.stdout);
    for (cid, pod) in [(&ca, &a), (&cc, &c)] {
        assert!(cni("DEL", &conf, cid, Some(&pod.ns.path()), "net1").ok);
    }
}

#[test]
fn namespace_and_network_affinity_refuse_with_reasons() {
    let fabric = RailFabric::new(1, 1);
    let pools = json!({"pools": [
        {"name": "rail1-team", "subnet": "172.16.1.0/24", "gateway": "172.16.1.254",
         "ips": ["172.16.1.10-172.16.1.99"], "namespace": ["team-a"]},
        {"name": "rail1-other", "subnet": "172.16.1.0/24", "gateway": "172.16.1.254",
         "ips": ["172.16.1.100-172.16.1.199"], "networks": ["storage"]},
    ]});
    let agent = Agent::start(&fabric.nodes[0], &pools);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["ippools"]["ipv4"] = json!(["rail1-*"]);
    let pod = fabric.pod(0);
    // The harness's CNI_ARGS say K8S_POD_NAMESPACE=default.
    let out = cni("ADD", &conf, &unique("c"), Some(&pod.ns.path()), "net1");
    assert!(!out.ok);
    let details = out.json["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("rail1-team: namespace affinity [team-a] excludes namespace default"),
        "{details}"
    );
    assert!(
        details.contains("rail1-other: reserved for networks [storage], not rail1"),
        "{details}"
    );
    assert!(!pod.ns.has_link("net1"));
}

#[test]
fn del_while_the_agent_is_down_succeeds_and_the_agent_finishes_it_on_start() {
    let fabric = RailFabric::new(1, 1);
    // One address: a later ADD proves the DEL really released it.
    let pools = json!({"pools": [{
        "name": "rail1", "subnet": "172.16.1.0/24", "gateway": "172.16.1.254",
        "ips": ["172.16.1.10"],
    }]});
    let mut agent = Agent::start(&fabric.nodes[0], &pools);
    let conf = fabric.netconf(1, &agent, "ebpf");
    let pod = fabric.pod(0);
    let cid = unique("c");
    assert!(cni("ADD", &conf, &cid, Some(&pod.ns.path()), "net1").ok);

    // The agent is away (an upgrade); kubelet deletes the pod meanwhile.
    agent.stop();
    let out = cni("DEL", &conf, &cid, Some(&pod.ns.path()), "net1");
    assert!(
        out.ok,
        "DEL must not fail while the agent is away: {}",
        out.stdout
    );
    let tombstone = agent.tombstones().join(format!("{cid}_net1.json"));
    assert!(tombstone.exists(), "the DEL was left for the agent");
    drop(pod); // the runtime removes the pod's netns

    agent.spawn(&fabric.nodes[0]);
    assert!(
        !tombstone.exists(),
        "the new agent finished the DEL on start\n{}",
        agent.log()
    );
    assert!(!agent.pin_root.join(&cid).exists(), "its pins are gone");
    let next = fabric.pod(0);
    let out = cni("ADD", &conf, &unique("c"), Some(&next.ns.path()), "net1");
    assert!(out.ok, "the address came back: {}", out.stdout);
}
