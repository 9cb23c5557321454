//! `railnetctl check` on the netns fabric (two nodes, three rails, one
//! router per rail, a spine), the real agents wiring the probes: a clean
//! fabric is reported clean, and each fault a rack really has — two rail
//! NICs swapped, a rail switch with a smaller MTU, a pulled cable, a node
//! without a rail's NIC — is reported as that fault, on that node and
//! rail, and nowhere else. Nothing of the probes is left on the nodes.

use std::{path::PathBuf, process::Command};

use railnet_tests::{Agent, Netns, RailFabric, ScratchDir};
use serde_json::Value;

const RAILS: u32 = 3;

struct Rack {
    fabric: RailFabric,
    agents: Vec<Agent>,
    confs: Vec<PathBuf>,
    _dir: ScratchDir,
}

impl Rack {
    fn new() -> Self {
        let fabric = RailFabric::new(2, RAILS);
        let agents: Vec<Agent> = (0..2)
            .map(|n| Agent::start(&fabric.nodes[n], &fabric.pools(n)))
            .collect();
        let dir = ScratchDir::new("check");
        let confs = (1..=RAILS)
            .map(|k| {
                let path = dir.path().join(format!("rail{k}.json"));
                std::fs::write(&path, fabric.netconf(k, &agents[0], "ebpf").to_string()).unwrap();
                path
            })
            .collect();
        Self {
            fabric,
            agents,
            confs,
            _dir: dir,
        }
    }

    /// Runs the check: (exit code, the JSON matrix, the table).
    fn check(&self) -> (i32, Value, String) {
        let run = |output: &str| {
            let mut cmd = Command::new(railnet_tests::binary("RAILNET_CTL_BIN", "railnetctl"));
            cmd.arg("check").args(["-o", output]);
            for c in &self.confs {
                cmd.arg("--conf").arg(c);
            }
            for (n, a) in self.agents.iter().enumerate() {
                cmd.arg("--node")
                    .arg(format!("node-{n}={}", a.socket.display()));
            }
            cmd.output().expect("railnetctl")
        };
        let json = run("json");
        let matrix: Value = serde_json::from_slice(&json.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&json.stdout),
                String::from_utf8_lossy(&json.stderr)
            )
        });
        let table = run("table");
        assert_eq!(json.status.code(), table.status.code());
        (
            json.status.code().unwrap_or(-1),
            matrix,
            String::from_utf8_lossy(&table.stdout).into_owned(),
        )
    }

    /// Every probe address is back in the pools and no interface is left.
    fn assert_left_nothing(&self) {
        for (n, agent) in self.agents.iter().enumerate() {
            assert_eq!(
                agent.allocations(&self.fabric.nodes[n]),
                0,
                "node-{n} still holds probe addresses\n{}",
                agent.log()
            );
        }
    }
}

/// The kinds of fault per cell, `[node][rail]`, each once.
fn kinds(matrix: &Value) -> Vec<Vec<Vec<String>>> {
    matrix["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    c["problems"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p["kind"].as_str().unwrap().to_owned())
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// A matrix with `kind` at the cells listed and nothing anywhere else.
fn only(faults: &[(usize, usize, &str)]) -> Vec<Vec<Vec<String>>> {
    let mut want = vec![vec![Vec::<String>::new(); RAILS as usize]; 2];
    for &(n, i, kind) in faults {
        want[n][i].push(kind.to_owned());
    }
    want
}

#[test]
fn a_clean_fabric_is_reported_clean() {
    let rack = Rack::new();
    let (code, matrix, table) = rack.check();
    assert_eq!(kinds(&matrix), only(&[]), "{table}");
    assert_eq!(code, 0, "{table}");
    assert_eq!(matrix["ok"], true);
    // Each node: one echo per peer per rail, one across the spine per rail.
    assert_eq!(matrix["echoes"], 2 * (RAILS + RAILS), "{table}");
    assert!(table.contains("node-0  ✓"), "{table}");
    rack.assert_left_nothing();
}

/// Moves node 0's cable on router `a` to router `b`'s switch and back.
fn swap_cables(fabric: &RailFabric, a: u32, b: u32) {
    let (ra, rb) = (fabric.router(a), fabric.router(b));
    ra.ip(&["link", "set", "n0", "name", "xa", "netns", rb.name()]);
    rb.ip(&["link", "set", "n0", "name", "xb", "netns", ra.name()]);
    for (r, port) in [(rb, "xa"), (ra, "xb")] {
        r.ip(&["link", "set", port, "name", "n0"]);
        r.ip(&["link", "set", "n0", "master", "br0", "up"]);
    }
    for r in [ra, rb] {
        r.wait_bridge_ports_forwarding();
    }
}

#[test]
fn swapped_rail_nics_are_named_as_miscabled_on_their_node() {
    let rack = Rack::new();
    swap_cables(&rack.fabric, 1, 2);
    let (code, matrix, table) = rack.check();
    assert_eq!(
        kinds(&matrix),
        only(&[(0, 0, "miscabled"), (0, 1, "miscabled")]),
        "{table}"
    );
    assert_eq!(code, 1);
    assert!(table.contains("eth1 is on rail2's network"), "{table}");
    assert!(table.contains("eth2 is on rail1's network"), "{table}");
    rack.assert_left_nothing();
}

#[test]
fn a_rail_switch_with_a_smaller_mtu_is_reported_on_that_rail() {
    let rack = Rack::new();
    let r2 = rack.fabric.router(2);
    for port in ["n0", "n1"] {
        r2.ip(&["link", "set", port, "mtu", "1400"]);
    }
    let (code, matrix, table) = rack.check();
    // Both nodes' rail 2: full-size echoes to each other and across the
    // spine are lost, small ones arrive.
    assert_eq!(
        kinds(&matrix),
        only(&[(0, 1, "mtu"), (1, 1, "mtu")]),
        "{table}"
    );
    assert_eq!(code, 1);
    assert!(table.contains("1500-byte packets (DF)"), "{table}");
    rack.assert_left_nothing();
}

#[test]
fn a_pulled_cable_is_a_link_down_on_its_node_and_rail_only() {
    let rack = Rack::new();
    rack.fabric.router(3).ip(&["link", "set", "n0", "down"]);
    let (code, matrix, table) = rack.check();
    assert_eq!(kinds(&matrix), only(&[(0, 2, "link_down")]), "{table}");
    assert_eq!(code, 1);
    assert!(table.contains("eth3 has no carrier"), "{table}");
    rack.assert_left_nothing();
}

#[test]
fn a_node_without_a_rail_nic_is_reported_so() {
    let rack = Rack::new();
    let node1: &Netns = &rack.fabric.nodes[1];
    node1.ip(&["link", "del", "eth3"]);
    let (code, matrix, table) = rack.check();
    assert_eq!(kinds(&matrix), only(&[(1, 2, "setup")]), "{table}");
    assert_eq!(code, 1);
    assert!(table.contains("node-1  ✓      ✓      no eth3"), "{table}");
    let cell = &matrix["cells"][1][2]["problems"][0];
    assert!(
        cell["detail"].as_str().unwrap().contains("eth3"),
        "{cell}\n{table}"
    );
    rack.assert_left_nothing();
}
