//! `cargo xtask demo`: one pod, two rails, wired by the real `railnet` CNI
//! binary talking to the real `railnet-agent`, in throwaway network
//! namespaces. Shows what a network engineer checks: addresses, routes, no
//! ip rules, and which rail the packets really leave on (router counters).
//! Everything it creates is removed when it ends, also on failure.

use std::time::Instant;

use railnet_agent::dataplane::PodPins;
use railnet_tests::{Agent, Fabric, RDMA_CIDR, REMOTE, cni, unique};

const PINGS: u32 = 10;

fn main() {
    let fabric = Fabric::new(&[1, 2]);
    let agent = Agent::start(&fabric.node, &fabric.pools());
    let cid = unique("pod");
    let pod = fabric.pod.path();

    println!("railnet demo: one pod, two rails, real CNI binary + real agent\n");
    println!("fabric (all in throwaway netns):");
    println!(
        "  node   {}  rail NICs eth1, eth2 (veth to the rail router)",
        fabric.node.name()
    );
    println!(
        "  router {}  gateways 172.16.11.254 (rail 1), 172.16.12.254 (rail 2)",
        fabric.router.name()
    );
    println!("         remote GPU {REMOTE} inside RDMA CIDR {RDMA_CIDR}");
    println!("  pod    {}", fabric.pod.name());
    println!(
        "  agent  railnet-agent in the node netns, socket {}",
        agent.socket.display()
    );
    println!();

    let mut addrs = Vec::new();
    for k in [1u32, 2] {
        let ifname = format!("net{k}");
        let started = Instant::now();
        let out = cni("ADD", &fabric.netconf(k, &agent), &cid, Some(&pod), &ifname);
        let took = started.elapsed();
        if !out.ok {
            eprintln!("ADD {ifname} failed: {}\n{}", out.stdout, agent.log());
            std::process::exit(1);
        }
        let ip = out.json["ips"][0]["address"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let route = &out.json["routes"][0];
        println!(
            "CNI ADD {ifname}: rail {k}, macvlan on eth{k}, {ip} gw {}, route {} metric {}  ({:.1} ms)",
            out.json["ips"][0]["gateway"].as_str().unwrap_or("-"),
            route["dst"].as_str().unwrap_or("-"),
            route["priority"],
            took.as_secs_f64() * 1e3
        );
        addrs.push((k, ip.split('/').next().unwrap_or_default().to_owned()));
    }

    println!("\npod main table:");
    for line in fabric.pod.ip(&["-4", "route", "show"]).lines() {
        println!("  {line}");
    }
    let rules = fabric.pod.ip(&["-4", "rule", "show"]).lines().count();
    println!("pod IPv4 rules: {rules} (the kernel's defaults; railnet adds none)");

    println!("\n{PINGS} pings to {REMOTE} from each rail address; router-side rx counters:");
    println!(
        "  {:<14} {:<22} {:<20} result",
        "source", "kernel route picks", "arrived on"
    );
    for (k, ip) in &addrs {
        let picked = fabric.pod.ip_json(&["route", "get", REMOTE, "from", ip]);
        let picked = picked[0]["dev"].as_str().unwrap_or("?").to_owned();
        let before: Vec<u64> = [1, 2]
            .iter()
            .map(|r| fabric.router.rx_packets(&format!("rail{r}")))
            .collect();
        let ok = fabric.ping_from(ip, REMOTE, PINGS);
        let after: Vec<u64> = [1, 2]
            .iter()
            .map(|r| fabric.router.rx_packets(&format!("rail{r}")))
            .collect();
        let d: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let arrived = format!("rail1 +{}  rail2 +{}", d[0], d[1]);
        let on_own = d[(*k - 1) as usize] >= u64::from(PINGS);
        let result = match (ok, on_own, picked == format!("net{k}")) {
            (false, _, _) => "replies missing".to_owned(),
            (true, true, true) => format!("on rail {k}"),
            (true, true, false) => format!("steered back to rail {k} by railnet"),
            (true, false, _) => format!("WRONG RAIL (expected rail {k})"),
        };
        println!(
            "  {ip:<14} {:<22} {arrived:<20} {result}",
            format!("dev {picked}")
        );
    }

    let pins = PodPins::new(&agent.pin_root, &cid);
    match pins.counters() {
        Ok(counters) => {
            let shown: Vec<String> = counters
                .iter()
                .map(|(rail, v, n)| format!("rail {rail} {} {n}", v.name()))
                .collect();
            println!("program counters in the pod: {}", shown.join(", "));
        }
        Err(e) => println!("program counters unavailable: {e}"),
    }
    let mut pinned = Vec::new();
    for sub in ["maps", "links"] {
        if let Ok(dir) = std::fs::read_dir(pins.dir().join(sub)) {
            let mut names: Vec<String> = dir
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            pinned.push(format!("{sub}/{{{}}}", names.join(",")));
        }
    }
    println!(
        "pinned in bpffs: {}/{}",
        pins.dir().display(),
        pinned.join(" ")
    );

    println!();
    for k in [2u32, 1] {
        let ifname = format!("net{k}");
        let out = cni("DEL", &fabric.netconf(k, &agent), &cid, Some(&pod), &ifname);
        println!(
            "CNI DEL {ifname}: {}",
            if out.ok {
                "ok".to_owned()
            } else {
                format!("FAILED {}", out.stdout)
            }
        );
    }
    let left_links = [1, 2]
        .iter()
        .filter(|k| fabric.pod.has_link(&format!("net{k}")))
        .count();
    println!(
        "after DEL: {left_links} rail interfaces in the pod, pins {}",
        if pins.dir().exists() {
            "LEFT BEHIND"
        } else {
            "removed"
        }
    );
    drop(agent);
    drop(fabric);
    println!("cleanup: agent stopped, namespaces and pins removed");
}
