//! The seeds' Solution 2 (seed 001): a /27 per node per rail, pools named
//! `<nic>-rail<N>-<node>`, networks that list `eno3np<N>-rail<N>*` and set
//! `matchMasterSubnet`. A pod on node1 gets one address per rail, each
//! from its own rail's node1 pool; node2's pools are refused for a reason
//! a person can read. The seed's pools as printed overrun their /27s: the
//! agent refuses to start and names every bad range.

use std::process::Command;

use railnet_tests::{Agent, Netns, ScratchDir, binary, cni, unique};
use serde_json::{Value, json};

const RAILS: u32 = 8;

/// Rail K's /27 on node `n` (n = 1, 2), as the seed lays them out.
fn base(n: u32, k: u32) -> String {
    format!("172.16.{n}.{}", 32 * (k - 1))
}

fn host(n: u32, k: u32, h: u32) -> String {
    format!("172.16.{n}.{}", 32 * (k - 1) + h)
}

fn pools(corrected: bool) -> Value {
    let mut pools = Vec::new();
    for n in [1, 2] {
        for k in 1..=RAILS {
            // As printed: .2 to the next subnet's first address.
            let last = if corrected {
                host(n, k, 29)
            } else {
                format!("172.16.{n}.{}", 32 * k)
            };
            let mut p = json!({
                "name": format!("eno3np{k}-rail{k}-node{n}"),
                "subnet": format!("{}/27", base(n, k)),
                "gateway": host(n, k, 1),
                "ips": [format!("{}-{last}", host(n, k, 2))],
            });
            if k == 1 {
                p["routes"] = json!([{"to": "172.16.0.0/16", "via": host(n, k, 1)}]);
            }
            pools.push(p);
        }
    }
    json!({ "pools": pools })
}

fn netconf(k: u32, agent: &Agent) -> Value {
    json!({
        "cniVersion": "0.3.1", "name": format!("sriov-eno3np{k}"), "type": "railnet",
        "rail": k, "master": format!("eth{k}"),
        "ippools": {"ipv4": [format!("eno3np{k}-rail{k}*")]},
        "matchMasterSubnet": true,
        "agentSocket": agent.socket,
    })
}

#[test]
fn a_pod_on_node1_gets_each_rail_from_its_own_node1_pool() {
    let node = Netns::new("node1");
    for k in 1..=RAILS {
        let nic = format!("eth{k}");
        node.ip(&[
            "link",
            "add",
            &nic,
            "type",
            "veth",
            "peer",
            "name",
            &format!("peer{k}"),
        ]);
        // The rail NIC's own address: what matchMasterSubnet matches.
        node.ip(&[
            "addr",
            "add",
            &format!("{}/27", host(1, k, 30)),
            "dev",
            &nic,
        ]);
        node.ip(&["link", "set", &nic, "up"]);
        node.ip(&["link", "set", &format!("peer{k}"), "up"]);
    }
    let agent = Agent::start(&node, &pools(true));
    let pod = Netns::new("pod");
    let cid = unique("c");
    for k in 1..=RAILS {
        let out = cni(
            "ADD",
            &netconf(k, &agent),
            &cid,
            Some(&pod.path()),
            &format!("net{k}"),
        );
        assert!(out.ok, "rail {k}: {}\n{}", out.stdout, agent.log());
        let ip = out.json["ips"][0]["address"].as_str().unwrap();
        assert_eq!(ip, format!("{}/27", host(1, k, 2)), "rail {k}");
        assert_eq!(out.json["ips"][0]["gateway"], host(1, k, 1));
    }
    // Rail 1's pool carries the RDMA subnet route; every rail gets its own
    // route to the RDMA CIDR only when the network declares rdmaCIDRs.
    let routes = pod.ip(&["route", "show", "172.16.0.0/16"]);
    assert!(
        routes.contains(&format!("via {} dev net1", host(1, 1, 1))),
        "{routes}"
    );

    // A master with no address in any rail-1 pool: every candidate refused,
    // each with its reason.
    node.ip(&["addr", "flush", "dev", "eth1"]);
    let out = cni(
        "ADD",
        &netconf(1, &agent),
        &unique("c"),
        Some(&pod.path()),
        "net9",
    );
    assert!(!out.ok);
    let details = out.json["details"].as_str().unwrap_or_default();
    for n in [1, 2] {
        assert!(
            details.contains(&format!("eno3np1-rail1-node{n}: matchMasterSubnet")),
            "{details}"
        );
    }
    assert!(!pod.has_link("net9"), "a refused ADD leaves no interface");

    // A master that is not on this node: the config's fault (code 7, the
    // master named), not a pool problem.
    let mut missing = netconf(1, &agent);
    missing["master"] = "eth77".into();
    let out = cni("ADD", &missing, &unique("c"), Some(&pod.path()), "net9");
    assert_eq!(out.json["code"], 7, "{}", out.stdout);
    assert!(
        out.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("\"eth77\" not found on this node"),
        "{}",
        out.stdout
    );
    assert!(!pod.has_link("net9"));

    for k in 1..=RAILS {
        assert!(
            cni(
                "DEL",
                &netconf(k, &agent),
                &cid,
                Some(&pod.path()),
                &format!("net{k}")
            )
            .ok
        );
    }
}

#[test]
fn the_seed_pools_as_printed_are_refused_naming_every_bad_range() {
    let dir = ScratchDir::new("seed");
    let config = dir.path().join("pools.yaml");
    std::fs::write(&config, pools(false).to_string()).unwrap();
    let out = Command::new(binary("RAILNET_AGENT_BIN", "railnet-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--state")
        .arg(dir.path().join("ipam.redb"))
        .arg("--socket")
        .arg(dir.path().join("s"))
        .arg("--pin-root")
        .arg("/sys/fs/bpf")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for n in [1, 2] {
        for k in 1..=RAILS {
            let bad = format!("{}-172.16.{n}.{}", host(n, k, 2), 32 * k);
            assert!(stderr.contains(&bad), "{bad} not named in:\n{stderr}");
        }
    }
    assert!(!dir.path().join("s").exists(), "nothing was served");
}
