//! `cargo xtask demo`: two GPU nodes, four rails, one pod on each, wired by
//! the real `railnet` CNI binary talking to the real `railnet-agent`, in
//! throwaway network namespaces. Shows what a network engineer checks:
//! addresses and routes, no ip rules, which rail packets really cross
//! (counted at the rail routers), and that steering survives an agent
//! crash; then Kubernetes mode: two nodes sharing one pool through a real
//! API server, which can go away without an address given twice.
//! Everything it creates is removed when it ends, also on failure.

use std::time::{Duration, Instant};

use railnet_agent::dataplane::PodPins;
use railnet_tests::{
    Agent, FabricPod, RDMA_CIDR, RailFabric, ScratchDir,
    apiserver::{ApiServer, apiserver_bin},
    binary, cni, plugin, unique,
};
use serde_json::json;

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
    // What the workload reads: the webhook mounts this at /etc/railnet.
    let info = agent_a.pod_info(&format!("uid-{}", a.cid));
    let rails: serde_json::Value = std::fs::read_to_string(info.join("rails.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let listed: Vec<String> = rails
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} {}",
                r["interface"].as_str().unwrap_or("?"),
                r["ips"][0].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!(
        "\npod A's rail info for its workload (/etc/railnet in the container): rails.json lists {}",
        listed.join(", ")
    );
    for line in std::fs::read_to_string(info.join("nccl.env"))
        .unwrap_or_default()
        .lines()
    {
        println!("  nccl.env | {line}");
    }

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
    // One program per pod: verified for its first rail, attached by all.
    let ids: std::collections::BTreeSet<String> = (1..=RAILS)
        .filter_map(|k| railnet_tests::egress_program_id(&a.pod.ns, &format!("net{k}")))
        .collect();
    println!(
        "pod A's {RAILS} rails run {} program(s): loaded and verified once, attached to each rail",
        ids.len()
    );

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

    // RDMA: what `railnetctl doctor` says about this machine, and what the
    // agent reports per rail on a node that has RDMA.
    println!();
    let doctor = std::process::Command::new(railnet_tests::binary("RAILNET_CTL_BIN", "railnetctl"))
        .arg("doctor")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if doctor.contains("no RDMA netlink") {
        println!(
            "RDMA: this kernel has no RDMA subsystem, so these rails carry TCP only. On a GPU node\n  \
             ADD names each rail's RDMA device and GID index, refuses a master without one, moves a\n  \
             VF's own device into its pod in exclusive mode (an InfiniBand VF gets its GUID through\n  \
             the PF first), and `railnetctl doctor` checks netns mode, link layers, MTUs and nvidia_peermem\n  \
             (cargo xtask test runs all of it on Linux 6.1 with soft RoCE, in both RDMA netns modes)"
        );
    } else {
        println!("railnetctl doctor on this machine:");
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
    drop((a, b));

    if apiserver_bin().is_file() {
        kubernetes_mode();
    } else {
        println!(
            "\n(Kubernetes mode skipped: `cargo xtask setup` builds the CRD API server it needs)"
        );
    }

    rail_check(&fabric, &[&agent_a, &agent_b]);
    drop((agent_a, agent_b, fabric));
    println!("cleanup: agents and API server stopped, namespaces and pins removed");
}

/// Day two: `railnetctl check` over the fabric, clean and then with a
/// cable pulled.
fn rail_check(fabric: &RailFabric, agents: &[&Agent]) {
    let dir = ScratchDir::new("demo-check");
    let mut cmd = std::process::Command::new(binary("RAILNET_CTL_BIN", "railnetctl"));
    cmd.arg("check");
    for k in 1..=RAILS {
        let path = dir.path().join(format!("rail{k}.json"));
        std::fs::write(&path, fabric.netconf(k, agents[0], "ebpf").to_string())
            .expect("scratch dir");
        cmd.arg("--conf").arg(path);
    }
    for (n, agent) in agents.iter().enumerate() {
        let name = ["nodeA", "nodeB"][n];
        cmd.arg("--node")
            .arg(format!("{name}={}", agent.socket.display()));
    }
    let show = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("railnetctl check");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("{}", format!("  {line}").trim_end());
        }
        println!("  (exit {})", out.status.code().unwrap_or(-1));
    };
    println!(
        "\nday two: `railnetctl check` — each agent wires a throwaway probe as a pod, which echoes\n  \
         every other node on its rail at full MTU with DF set, and one other rail across the spine:"
    );
    show(&mut cmd);
    println!("\nnodeB's rail-3 cable pulled (its router port down), checked again:");
    fabric.router(3).ip(&["link", "set", "n1", "down"]);
    show(&mut cmd);
    fabric.router(3).ip(&["link", "set", "n1", "up"]);
}

/// Two nodes, one RailPool, the API server as the only store.
fn kubernetes_mode() {
    println!(
        "\nKubernetes mode: two nodes share one RailPool; the API server (etcd behind it) is the only store"
    );
    let mut api = ApiServer::start();
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/railnet/crds");
    for f in ["railnet.io_railpools.yaml", "railnet.io_railblocks.yaml"] {
        let text = std::fs::read_to_string(crds.join(f)).expect("chart CRD");
        api.install_crd(&serde_norway::from_str(&text).expect("CRD YAML"));
    }
    let pool = json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailPool",
        "metadata": {"name": "rail1"},
        "spec": {"subnet": "172.16.60.0/24", "gateway": "172.16.60.254"}});
    let (code, body) = api.post("/apis/railnet.io/v1alpha1/railpools", &pool);
    assert_eq!(code, 201, "{body}");
    println!("  kubectl apply RailPool rail1: subnet 172.16.60.0/24, gateway 172.16.60.254");
    let kubeconfig = api.kubeconfig();
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path");
    let nodes: Vec<Agent> = ["gpu-node-1", "gpu-node-2"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let metrics = format!("127.0.0.1:{}", 9470 + i);
            Agent::start_named(
                &api.ns,
                name,
                &json!({"pools": []}),
                &[
                    "--ipam-store",
                    "kubernetes",
                    "--kubeconfig",
                    kubeconfig,
                    "--metrics-address",
                    &metrics,
                    // Blocks of 4 so the act meets a block's end.
                    "--block-prefix-v4",
                    "30",
                ],
            )
        })
        .collect();
    let bin = ScratchDir::new("demo-cni");
    let ipam = bin.path().join("railnet-ipam");
    std::os::unix::fs::symlink(binary("RAILNET_CNI_BIN", "railnet"), &ipam).expect("symlink");
    let add = |node: usize, cid: &str| {
        let conf = json!({"cniVersion": "1.0.0", "name": "rail1", "type": "macvlan", "master": "eth1",
            "agentSocket": nodes[node].socket,
            "ipam": {"type": "railnet-ipam", "ippools": {"ipv4": ["rail1"]}}});
        plugin(&ipam, "ADD", &conf, cid, None, "net1", "/nonexistent")
    };
    println!(
        "  railnet-ipam ADD for six pods, alternating nodes (as the reference macvlan or sriov-cni call it):"
    );
    for i in 0..6 {
        let out = add(i % 2, &format!("pod{i}"));
        println!(
            "    gpu-node-{} pod{i} net1 -> {}",
            i % 2 + 1,
            out.json["ips"][0]["address"]
                .as_str()
                .unwrap_or(&out.stdout)
        );
    }
    // The claims follow the ADDs within a flush (200 ms).
    std::thread::sleep(std::time::Duration::from_millis(600));
    let blocks = |api: &ApiServer| {
        let (_, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
        println!(
            "    {:<24} {:<16} {:<12} {:<5} CLAIMS",
            "NAME", "CIDR", "NODE", "HELD"
        );
        for b in list["items"].as_array().into_iter().flatten() {
            println!(
                "    {:<24} {:<16} {:<12} {:<5} {}",
                b["metadata"]["name"].as_str().unwrap_or(""),
                b["spec"]["cidr"].as_str().unwrap_or(""),
                b["spec"]["node"].as_str().unwrap_or(""),
                b["spec"]["held"].as_array().map_or(0, |c| c.len()),
                b["spec"]["claims"].as_object().map_or(0, |c| c.len())
            );
        }
        list
    };
    println!(
        "  kubectl get railblocks (a node claims a block with create-if-absent and hands out what it holds\n  with no API write per pod; the claims are written in batches):"
    );
    blocks(&api);
    api.kill_server();
    let out = add(1, "pod6");
    println!(
        "  API server killed; gpu-node-2 still holds an address, pod6 gets {}",
        out.json["ips"][0]["address"]
            .as_str()
            .unwrap_or(&out.stdout)
    );
    let out = add(0, "pod7");
    println!(
        "  gpu-node-1's block is used up: pod7 needs a new block, ADD answers CNI code {} (the runtime retries):\n    {}",
        out.json["code"],
        out.json["details"].as_str().unwrap_or(&out.stdout)
    );
    api.restart_server();
    let out = add(0, "pod7");
    println!(
        "  API server back; the retry gets {}",
        out.json["ips"][0]["address"]
            .as_str()
            .unwrap_or(&out.stdout)
    );
    std::thread::sleep(std::time::Duration::from_millis(600));
    println!("  kubectl get railblocks (pod6's claim, made during the outage, written since):");
    let list = blocks(&api);
    let addresses: Vec<&str> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b["spec"]["claims"].as_object().into_iter().flatten())
        .map(|(a, _)| a.as_str())
        .collect();
    let distinct: std::collections::HashSet<&&str> = addresses.iter().collect();
    let writes: u64 = nodes
        .iter()
        .map(|n| {
            n.scrape(&api.ns, "/metrics")
                .lines()
                .find_map(|l| l.strip_prefix("railnet_ipam_api_writes_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    println!(
        "  claims in the API server: {} for 8 pods, {} distinct addresses; {writes} API writes in all (blocks included)",
        addresses.len(),
        distinct.len()
    );
    drop(nodes);
}
