//! Rail fabrics: nodes, rail routers and pods cabled with veths.

use std::{
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

use crate::{Agent, Netns, veth_between};

/// A node with rail NICs cabled to one router netns per fabric, plus a pod
/// netns: the smallest rail-optimized network that shows steering.
///
/// Rail K: node `ethK` ⇄ router `railK` (172.16.1K.254/24, rail K's
/// gateway). The router also holds 172.16.100.1/32, a "remote GPU" inside
/// the RDMA CIDR 172.16.0.0/16, reachable through every rail.
#[derive(Debug)]
pub struct Fabric {
    /// The pod.
    pub pod: Netns,
    /// The node (the agent runs here).
    pub node: Netns,
    /// The rail router.
    pub router: Netns,
    /// Rail numbers.
    pub rails: Vec<u32>,
}

/// The fabric's remote RDMA destination.
pub const REMOTE: &str = "172.16.100.1";
/// The fabric's RDMA CIDR.
pub const RDMA_CIDR: &str = "172.16.0.0/16";
/// The fabric's IPv6 RDMA CIDR.
pub const RDMA_CIDR6: &str = "fd00:16::/32";

impl Fabric {
    /// Builds the fabric for `rails` (each 1..=89).
    #[track_caller]
    pub fn new(rails: &[u32]) -> Self {
        let node = Netns::new("node");
        let router = Netns::new("rtr");
        let pod = Netns::new("pod");
        for &k in rails {
            let (nic, port) = (format!("eth{k}"), format!("rail{k}"));
            veth_between(&node, &nic, &router, &port);
            node.ip(&["link", "set", &nic, "up"]);
            router.ip(&[
                "addr",
                "add",
                &format!("{}/24", Self::gateway(k)),
                "dev",
                &port,
            ]);
            router.ip(&["link", "set", &port, "up"]);
        }
        router.ip(&["addr", "add", &format!("{REMOTE}/32"), "dev", "lo"]);
        Self {
            pod,
            node,
            router,
            rails: rails.to_vec(),
        }
    }

    /// Rail K's gateway.
    pub fn gateway(k: u32) -> String {
        format!("172.16.{}.254", 10 + k)
    }

    /// The agent's pools file: one pool per rail.
    pub fn pools(&self) -> Value {
        let pools: Vec<Value> = self
            .rails
            .iter()
            .map(|k| {
                serde_json::json!({
                    "name": format!("rail{k}"),
                    "subnet": format!("172.16.{}.0/24", 10 + k),
                    "ips": [format!("172.16.{0}.10-172.16.{0}.99", 10 + k)],
                    "gateway": Self::gateway(*k),
                })
            })
            .collect();
        serde_json::json!({ "pools": pools })
    }

    /// Rail K's network config, as a NetworkAttachmentDefinition carries it.
    pub fn netconf(&self, k: u32, agent: &Agent) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("rail{k}"),
            "type": "railnet",
            "rail": k,
            "master": format!("eth{k}"),
            "rdmaCIDRs": [RDMA_CIDR],
            "ippools": { "ipv4": [format!("rail{k}")] },
            "agentSocket": agent.socket,
        })
    }

    /// Pings `dst` from the pod, bound to `src`, `count` times, quickly.
    /// Returns whether every reply came back.
    pub fn ping_from(&self, src: &str, dst: &str, count: u32) -> bool {
        self.pod
            .command("ping")
            .args([
                "-q",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.01",
                "-W",
                "1",
                "-I",
                src,
                dst,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// The issue-3 fabric: two or more nodes, `R` rails, one router netns per
/// rail (a bridge holding rail K's gateway 172.16.K.254/24, with a port to
/// every node's `ethK`), a spine routing between the rail routers, and per
/// node a pod bridge (10.244.N.1/24) for the pods' default `eth0`, with a
/// "service" address 10.96.0.10 outside the RDMA CIDR on the node.
#[derive(Debug)]
pub struct RailFabric {
    /// Rail routers, index K-1.
    pub routers: Vec<Netns>,
    /// The spine.
    pub spine: Netns,
    /// The nodes.
    pub nodes: Vec<Netns>,
    /// Number of rails.
    pub rails: u32,
    pods_made: AtomicU32,
}

/// A service address outside the RDMA CIDR, on every node.
pub const SERVICE: &str = "10.96.0.10";

/// A pod of a [`RailFabric`]: its netns and default `eth0`.
#[derive(Debug)]
pub struct FabricPod {
    /// The pod netns.
    pub ns: Netns,
    /// Index of its node.
    pub node: usize,
    /// Node-side end of its eth0 veth (count its rx for eth0 traffic).
    pub host_veth: String,
}

impl RailFabric {
    /// Builds `nodes` nodes and `rails` rails (each ≤ 9).
    #[track_caller]
    pub fn new(nodes: usize, rails: u32) -> Self {
        let spine = Netns::new("spine");
        spine.sysctl("net.ipv4.ip_forward", "1");
        spine.sysctl("net.ipv6.conf.all.forwarding", "1");
        // The fabric stands in for switches that have been up for days:
        // no IPv6 duplicate-address detection delaying its first seconds.
        spine.sysctl("net.ipv6.conf.default.accept_dad", "0");
        let nodes: Vec<Netns> = (0..nodes).map(|_| Netns::new("node")).collect();
        let mut routers = Vec::new();
        for k in 1..=rails {
            let r = Netns::new(&format!("rtr{k}"));
            r.sysctl("net.ipv4.ip_forward", "1");
            r.sysctl("net.ipv6.conf.all.forwarding", "1");
            r.sysctl("net.ipv6.conf.default.accept_dad", "0");
            r.ip(&["link", "add", "br0", "type", "bridge"]);
            for (n, node) in nodes.iter().enumerate() {
                let (nic, port) = (format!("eth{k}"), format!("n{n}"));
                veth_between(node, &nic, &r, &port);
                node.ip(&["link", "set", &nic, "up"]);
                r.ip(&["link", "set", &port, "master", "br0", "up"]);
            }
            r.ip(&["addr", "add", &format!("172.16.{k}.254/24"), "dev", "br0"]);
            r.ip(&[
                "addr",
                "add",
                &format!("fd00:16:{k}::254/64"),
                "dev",
                "br0",
                "nodad",
            ]);
            r.ip(&["link", "set", "br0", "up"]);
            let up = format!("r{k}");
            veth_between(&r, "uplink", &spine, &up);
            r.ip(&["addr", "add", &format!("172.31.{k}.1/30"), "dev", "uplink"]);
            r.ip(&[
                "addr",
                "add",
                &format!("fd00:31:{k}::1/64"),
                "dev",
                "uplink",
                "nodad",
            ]);
            r.ip(&["link", "set", "uplink", "up"]);
            r.ip(&["route", "add", "default", "via", &format!("172.31.{k}.2")]);
            r.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:31:{k}::2"),
            ]);
            spine.ip(&["addr", "add", &format!("172.31.{k}.2/30"), "dev", &up]);
            spine.ip(&[
                "addr",
                "add",
                &format!("fd00:31:{k}::2/64"),
                "dev",
                &up,
                "nodad",
            ]);
            spine.ip(&["link", "set", &up, "up"]);
            spine.ip(&[
                "route",
                "add",
                &format!("172.16.{k}.0/24"),
                "via",
                &format!("172.31.{k}.1"),
            ]);
            spine.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:16:{k}::/64"),
                "via",
                &format!("fd00:31:{k}::1"),
            ]);
            routers.push(r);
        }
        for (n, node) in nodes.iter().enumerate() {
            node.ip(&["link", "add", "cbr0", "type", "bridge"]);
            node.ip(&["addr", "add", &format!("10.244.{n}.1/24"), "dev", "cbr0"]);
            node.ip(&["link", "set", "cbr0", "up"]);
            node.ip(&["addr", "add", &format!("{SERVICE}/32"), "dev", "lo"]);
        }
        for r in &routers {
            r.wait_bridge_ports_forwarding();
        }
        Self {
            routers,
            spine,
            nodes,
            rails,
            pods_made: AtomicU32::new(0),
        }
    }

    /// Rail K's router.
    pub fn router(&self, k: u32) -> &Netns {
        &self.routers[(k - 1) as usize]
    }

    /// Packets rail K's router received from node `n`'s rail NIC.
    pub fn rail_rx(&self, k: u32, n: usize) -> u64 {
        self.router(k).rx_packets(&format!("n{n}"))
    }

    /// Rx counters of every rail router's port to node `n`, index K-1.
    pub fn rails_rx(&self, n: usize) -> Vec<u64> {
        (1..=self.rails).map(|k| self.rail_rx(k, n)).collect()
    }

    /// Node `n`'s pools file: per rail a pool of 90 addresses no other node
    /// uses (172.16.K.(10+100n)…).
    pub fn pools(&self, n: usize) -> Value {
        let pools: Vec<Value> = (1..=self.rails)
            .flat_map(|k| {
                let lo = 10 + 100 * n;
                [
                    serde_json::json!({
                        "name": format!("rail{k}"),
                        "subnet": format!("172.16.{k}.0/24"),
                        "ips": [format!("172.16.{k}.{lo}-172.16.{k}.{}", lo + 89)],
                        "gateway": format!("172.16.{k}.254"),
                    }),
                    serde_json::json!({
                        "name": format!("rail{k}-v6"),
                        "subnet": format!("fd00:16:{k}::/64"),
                        "ips": [format!("fd00:16:{k}::{n}:10-fd00:16:{k}::{n}:99")],
                        "gateway": format!("fd00:16:{k}::254"),
                    }),
                ]
            })
            .collect();
        serde_json::json!({ "pools": pools })
    }

    /// Rail K's network config (IPv4 only).
    pub fn netconf(&self, k: u32, agent: &Agent, routing: &str) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("rail{k}"),
            "type": "railnet",
            "rail": k,
            "master": format!("eth{k}"),
            "rdmaCIDRs": [RDMA_CIDR],
            "ippools": { "ipv4": [format!("rail{k}")] },
            "routing": routing,
            "agentSocket": agent.socket,
            "tombstoneDir": agent.tombstones(),
        })
    }

    /// Rail K's dual-stack network config (IPv6 RDMA CIDR fd00:16::/32).
    pub fn netconf_dual(&self, k: u32, agent: &Agent, routing: &str) -> Value {
        let mut conf = self.netconf(k, agent, routing);
        conf["rdmaCIDRs"] = serde_json::json!([RDMA_CIDR, RDMA_CIDR6]);
        conf["ippools"]["ipv6"] = serde_json::json!([format!("rail{k}-v6")]);
        conf
    }

    /// A pod on node `n` with a default `eth0` on the node's pod bridge.
    #[track_caller]
    pub fn pod(&self, n: usize) -> FabricPod {
        let i = self.pods_made.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::new("pod");
        let node = &self.nodes[n];
        let host_veth = format!("vp{i}");
        veth_between(node, &host_veth, &ns, "eth0");
        node.ip(&["link", "set", &host_veth, "master", "cbr0", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("10.244.{n}.{}/24", i + 2),
            "dev",
            "eth0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &format!("10.244.{n}.1")]);
        node.wait_bridge_ports_forwarding();
        FabricPod {
            ns,
            node: n,
            host_veth,
        }
    }
}
