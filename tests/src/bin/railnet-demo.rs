//! `cargo xtask demo`: two GPU nodes, four rails, one pod on each, wired by
//! the real `railnet` CNI binary talking to the real `railnet-agent`, in
//! throwaway network namespaces. Shows what a network engineer checks:
//! addresses and routes, no ip rules, which rail packets really cross
//! (counted at the rail routers), and that steering survives an agent
//! crash. Everything it creates is removed when it ends, also on failure.

use std::time::{Duration, Instant};

use railnet_agent::dataplane::PodPins;
use railnet_tests::{Agent, FabricPod, RDMA_CIDR, RailFabric, cni, unique};

const RAILS: u32 = 4;
const PINGS: u32 = 20;

struct Pod {
    pod: FabricPod,
    cid: String,
    ips: Vec<String>,
}

fn add_rails(fabric: &RailFabric, node: usize, agent: &Agent, name: &str) -> Pod {
    let pod = fabric.pod(node);
    let cid = unique(name);
    let mut ips = Vec::new();
    for k in 1..=RAILS {
        let ifname = format!("net{k}");
        let started = Instant::now();
        let out = cni(
            "ADD",
            &fabric.netconf(k, agent, "ebpf"),
            &cid,
            Some(&pod.ns.path()),
            &ifname,
        );
        let took = started.elapsed();
        if !out.ok {
            eprintln!("ADD {ifname} failed: {}\n{}", out.stdout, agent.log());
            std::process::exit(1);
        }
        let ip = out.json["ips"][0]["address"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        println!(
            "  {name} {ifname}: rail {k}, macvlan on eth{k}, {ip:<16} gw {}  route {} metric {}  ({:.1} ms)",
            out.json["ips"][0]["gateway"].as_str().unwrap_or("-"),
            out.json["routes"][0]["dst"].as_str().unwrap_or("-"),
            out.json["routes"][0]["priority"],
            took.as_secs_f64() * 1e3
        );
        ips.push(ip.split('/').next().unwrap_or_default().to_owned());
    }
    Pod { pod, cid, ips }
}

/// Pings from A's rail-k address to B's rail-(5-k) address and reports the
/// kernel's pick and where the packets really went.
fn probe(fabric: &RailFabric, a: &Pod, b: &Pod) {
    println!(
        "  {:<8} {:<16} {:<16} {:<12} {:<34} result",
        "from", "source", "destination", "kernel pick", "A's packets seen at rail routers"
    );
    for k in 1..=RAILS {
        let src = &a.ips[(k - 1) as usize];
        let dst = &b.ips[(RAILS - k) as usize];
        let pick = a.pod.ns.ip_json(&["route", "get", dst, "from", src]);
        let pick = pick[0]["dev"].as_str().unwrap_or("?").to_owned();
        let before = fabric.rails_rx(0);
        let ok = a.pod.ns.ping(src, dst, PINGS, 56);
        let d: Vec<u64> = fabric
            .rails_rx(0)
            .iter()
            .zip(&before)
            .map(|(x, y)| x - y)
            .collect();
        let seen = d
            .iter()
            .enumerate()
            .map(|(i, n)| format!("r{}+{n}", i + 1))
            .collect::<Vec<_>>()
            .join(" ");
        let own = d[(k - 1) as usize] >= u64::from(PINGS);
        let result = match (ok, own, pick == format!("net{k}")) {
            (false, _, _) => "REPLIES MISSING".to_owned(),
            (true, true, true) => format!("on rail {k}"),
            (true, true, false) => format!("steered to rail {k} by railnet"),
            (true, false, _) => format!("WRONG RAIL (expected {k})"),
        };
        println!("  net{k:<5} {src:<16} {dst:<16} {pick:<12} {seen:<34} {result}");
    }
}

fn main() {
    let fabric = RailFabric::new(2, RAILS);
    let mut agent_a = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let agent_b = Agent::start(&fabric.nodes[1], &fabric.pools(1));

    println!("railnet demo: two GPU nodes, {RAILS} rails, the real CNI binary and agent\n");
    println!("fabric (all in throwaway netns; RDMA CIDR {RDMA_CIDR}):");
    println!(
        "  rail K = subnet 172.16.K.0/24, its own router (gateway 172.16.K.254), a spine between rails"
    );
    println!(
        "  nodes {} and {}, each with rail NICs eth1..eth{RAILS} and a railnet-agent",
        fabric.nodes[0].name(),
        fabric.nodes[1].name()
    );
    println!();
    println!("CNI ADD, once per rail network (as Multus does):");
    let a = add_rails(&fabric, 0, &agent_a, "podA");
    let b = add_rails(&fabric, 1, &agent_b, "podB");

    println!("\npod A main table (RDMA routes, one per rail, metric 100+K):");
    for line in a.pod.ns.ip(&["-4", "route", "show", RDMA_CIDR]).lines() {
        println!("  {line}");
    }
    let rules = a.pod.ns.ip(&["-4", "rule", "show"]).lines().count();
    println!("pod A IPv4 rules: {rules} (the kernel's defaults; railnet adds none)");

    println!(
        "\n{PINGS} pings from each of A's rail addresses to one of B's (sockets bound to an address, not a device):"
    );
    probe(&fabric, &a, &b);

    let pins = PodPins::new(&agent_a.pin_root, &a.cid);
    if let Ok(counters) = pins.counters() {
        let steered: u64 = counters
            .iter()
            .filter(|(_, v, _)| *v == railnet_common::Verdict::Steered)
            .map(|(_, _, n)| n)
            .sum();
        println!("pod A's program counted {steered} packets steered back to their own rail");
    }

    println!("\nnode A's agent is killed (SIGKILL); the pinned programs keep steering:");
    agent_a.kill9();
    probe(&fabric, &a, &b);
    agent_a.spawn(&fabric.nodes[0]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent_a.log().contains("adopted pinned pods") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let adopted = agent_a
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("adopted pinned pods"))
        .map(|l| l[l.find("adopted").unwrap_or(0)..].to_owned())
        .unwrap_or_else(|| "no adoption logged".into());
    println!("agent restarted: {adopted}");

    // RDMA: what `railnet doctor` says about this machine, and what the
    // agent reports per rail on a node that has RDMA.
    println!();
    let doctor = std::process::Command::new(railnet_tests::binary("RAILNET_CNI_BIN", "railnet"))
        .arg("doctor")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if doctor.contains("no RDMA netlink") {
        println!(
            "RDMA: this kernel has no RDMA subsystem, so these rails carry TCP only. On a GPU node\n  \
             ADD names each rail's RDMA device and GID index, refuses a master without one, and\n  \
             `railnet doctor` checks netns mode, link layers, MTUs and nvidia_peermem\n  \
             (cargo xtask test runs all of it on Linux 6.1 with soft RoCE, in both RDMA netns modes)"
        );
    } else {
        println!("railnet doctor on this machine:");
        for line in doctor.lines() {
            println!("  {line}");
        }
    }

    println!();
    for (pod, agent, name) in [(&a, &agent_a, "podA"), (&b, &agent_b, "podB")] {
        let mut ok = 0;
        for k in 1..=RAILS {
            let out = cni(
                "DEL",
                &fabric.netconf(k, agent, "ebpf"),
                &pod.cid,
                Some(&pod.pod.ns.path()),
                &format!("net{k}"),
            );
            ok += u32::from(out.ok);
        }
        let left = (1..=RAILS)
            .filter(|k| pod.pod.ns.has_link(&format!("net{k}")))
            .count();
        let pins_left = PodPins::new(&agent.pin_root, &pod.cid).dir().exists();
        println!(
            "CNI DEL {name}: {ok}/{RAILS} ok, {left} rail interfaces left, pins {}",
            if pins_left { "LEFT BEHIND" } else { "removed" }
        );
    }
    drop((a, b, agent_a, agent_b, fabric));
    println!("cleanup: agents stopped, namespaces and pins removed");
}
