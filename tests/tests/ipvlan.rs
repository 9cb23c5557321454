//! ipvlan (l2) rails. This machine's kernel has no ipvlan: here the test
//! checks the error says so; `cargo xtask test` runs the traffic test in
//! Debian's Linux 6.1 under qemu, which has it.

use railnet_tests::{Agent, RailFabric, cni, unique};

#[test]
fn ipvlan_rails_are_made_or_refused_with_a_reason() {
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "ipvlan".into();
    let pod = fabric.pod(0);
    let out = cni("ADD", &conf, &unique("c"), Some(&pod.ns.path()), "net1");
    if out.ok {
        assert!(out.ok, "{}", out.stdout);
        let link = pod.ns.ip(&["-d", "link", "show", "net1"]);
        assert!(
            link.contains("ipvlan") && link.contains("mode l2"),
            "{link}"
        );
    } else {
        assert!(!out.ok);
        assert!(
            out.stdout.contains("this kernel has no ipvlan"),
            "{}",
            out.stdout
        );
        assert!(!pod.ns.has_link("net1"));
    }
}

#[test]
#[ignore = "needs ipvlan: cargo xtask test runs it in Linux 6.1 under qemu"]
fn ipvlan_rail_traffic_is_steered_like_macvlan() {
    let fabric = RailFabric::new(2, 3);
    let agents = [
        Agent::start(&fabric.nodes[0], &fabric.pools(0)),
        Agent::start(&fabric.nodes[1], &fabric.pools(1)),
    ];
    let mut ips = Vec::new();
    let mut pods = Vec::new();
    for (n, agent) in agents.iter().enumerate() {
        let pod = fabric.pod(n);
        let cid = unique("c");
        let mut mine = Vec::new();
        for k in 1..=3 {
            let mut conf = fabric.netconf(k, agent, "ebpf");
            conf["mode"] = "ipvlan".into();
            let out = cni("ADD", &conf, &cid, Some(&pod.ns.path()), &format!("net{k}"));
            assert!(
                out.ok,
                "ipvlan ADD rail {k}: {}\n{}",
                out.stdout,
                agent.log()
            );
            mine.push(
                out.json["ips"][0]["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .to_owned(),
            );
        }
        ips.push(mine);
        pods.push(pod);
    }
    // A's rail-2 address to B's rail-3 address: the kernel picks net3
    // (on-link), the program puts it on rail 2.
    let before = fabric.rails_rx(0);
    let ok = pods[0].ns.ping(&ips[0][1], &ips[1][2], 30, 56);
    if !ok {
        let tc = |ns: &str, dev: &str| {
            std::process::Command::new("tc")
                .args(["-n", ns, "-s", "filter", "show", "dev", dev, "egress"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let diag = [
            pods[0].ns.ip(&["-d", "link"]),
            pods[0].ns.ip(&["neigh"]),
            pods[1].ns.ip(&["neigh"]),
            fabric.router(2).ip(&["neigh"]),
            fabric.router(3).ip(&["neigh"]),
            tc(pods[0].ns.name(), "net3"),
            format!("{:?}", fabric.rails_rx(0)),
            pods[0]
                .ns
                .ip(&["route", "get", &ips[1][2], "from", &ips[0][1]]),
        ];
        panic!("ipvlan ping failed:\n{}", diag.join("\n---\n"));
    }
    let d: Vec<u64> = fabric
        .rails_rx(0)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert!(d[1] >= 30 && d[2] <= 7, "ipvlan rail 2 traffic: {d:?}");
}
