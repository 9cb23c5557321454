//! The rail-routing dataplane, proven with real traffic across a fabric of
//! network namespaces: two nodes, five rails, a router netns per rail and a
//! spine. Packets are counted where they really pass (the rail routers'
//! interface counters), never by the program's own counters alone.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::OwnedFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use railnet_agent::dataplane::PodPins;
use railnet_common::Verdict;
use railnet_tests::{Agent, FabricPod, RDMA_CIDR6, RailFabric, SERVICE, cni, unique};

const RAILS: u32 = 5;

/// A pod with rails 1..=RAILS added through the real CNI.
struct RailedPod {
    pod: FabricPod,
    cid: String,
    /// Address per rail, index K-1.
    ips: Vec<String>,
    /// IPv6 address per rail when dual-stack, index K-1.
    ips6: Vec<String>,
    dual: bool,
}

impl RailedPod {
    #[track_caller]
    fn new(fabric: &RailFabric, node: usize, agent: &Agent, routing: &str) -> Self {
        Self::build(fabric, node, agent, routing, &[], false)
    }

    #[track_caller]
    fn dual(fabric: &RailFabric, node: usize, agent: &Agent, routing: &str) -> Self {
        Self::build(fabric, node, agent, routing, &[], true)
    }

    #[track_caller]
    fn with_mtu(
        fabric: &RailFabric,
        node: usize,
        agent: &Agent,
        routing: &str,
        mtus: &[(u32, u32)],
    ) -> Self {
        Self::build(fabric, node, agent, routing, mtus, false)
    }

    #[track_caller]
    fn build(
        fabric: &RailFabric,
        node: usize,
        agent: &Agent,
        routing: &str,
        mtus: &[(u32, u32)],
        dual: bool,
    ) -> Self {
        let pod = fabric.pod(node);
        let cid = unique("c");
        let (mut ips, mut ips6) = (Vec::new(), Vec::new());
        for k in 1..=fabric.rails {
            let mut conf = if dual {
                fabric.netconf_dual(k, agent, routing)
            } else {
                fabric.netconf(k, agent, routing)
            };
            if let Some((_, mtu)) = mtus.iter().find(|(r, _)| *r == k) {
                conf["mtu"] = (*mtu).into();
            }
            let out = cni("ADD", &conf, &cid, Some(&pod.ns.path()), &format!("net{k}"));
            assert!(out.ok, "ADD rail {k}: {}\n{}", out.stdout, agent.log());
            let ip = out.json["ips"][0]["address"].as_str().unwrap();
            ips.push(ip.split('/').next().unwrap().to_owned());
            if dual {
                let ip6 = out.json["ips"][1]["address"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no IPv6 address in {}", out.stdout));
                ips6.push(ip6.split('/').next().unwrap().to_owned());
            }
        }
        Self {
            pod,
            cid,
            ips,
            ips6,
            dual,
        }
    }

    fn ip6(&self, k: u32) -> &str {
        &self.ips6[(k - 1) as usize]
    }

    fn ip(&self, k: u32) -> &str {
        &self.ips[(k - 1) as usize]
    }

    fn pins(&self, agent: &Agent) -> PodPins {
        PodPins::new(&agent.pin_root, &self.cid)
    }

    #[track_caller]
    fn del(&self, fabric: &RailFabric, agent: &Agent, routing: &str) {
        for k in 1..=fabric.rails {
            let conf = if self.dual {
                fabric.netconf_dual(k, agent, routing)
            } else {
                fabric.netconf(k, agent, routing)
            };
            let out = cni(
                "DEL",
                &conf,
                &self.cid,
                Some(&self.pod.ns.path()),
                &format!("net{k}"),
            );
            assert!(out.ok, "DEL rail {k}: {}\n{}", out.stdout, agent.log());
        }
    }
}

fn deltas(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

fn rails_bytes(fabric: &RailFabric, node: usize) -> Vec<u64> {
    (1..=fabric.rails)
        .map(|k| fabric.router(k).rx_bytes(&format!("n{node}")))
        .collect()
}

/// Sends `bytes` over TCP from `client` bound to `src` to a server in
/// `server` listening on `dst`; returns what the server counted.
fn tcp_transfer(
    server: &FabricPod,
    dst: &str,
    client: &FabricPod,
    src: &str,
    bytes: usize,
) -> usize {
    let dst: Ipv4Addr = dst.parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server.ns.spawn(move || {
        let listener = TcpListener::bind((dst, 0)).expect("listen in pod B");
        tx.send(listener.local_addr().unwrap().port()).unwrap();
        let (mut conn, _) = listener.accept().expect("accept");
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) => panic!("server read: {e}"),
            }
        }
        total
    });
    let port = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server port");
    let src: Ipv4Addr = src.parse().unwrap();
    client.ns.run(move || {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket,
        };
        // Bound to the rail address, not to a device: the kernel picks the
        // lowest-metric route, exactly the traffic the program must steer.
        let fd: OwnedFd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(SocketAddrV4::new(src, 0)),
        )
        .unwrap();
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(SocketAddrV4::new(dst, port)),
        )
        .expect("connect from the rail address");
        let mut stream = TcpStream::from(fd);
        let chunk = vec![7u8; 65536];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            stream.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
    });
    srv.join().expect("server thread")
}

const PINGS: u32 = 50;

/// Takes the program off rail `k` of a pod behind the agent's back: the
/// TCX link pin removed (an agent with `--tc-attach tcx`), or the clsact
/// filter deleted.
fn detach_program(pod: &RailedPod, agent: &Agent, k: u32, tcx: bool) {
    let pin = pod.pins(agent).dir().join(format!("links/net{k}"));
    if tcx {
        std::fs::remove_file(pin).unwrap();
    } else {
        railnet_tests::sh(std::process::Command::new("tc").args([
            "-n",
            pod.pod.ns.name(),
            "filter",
            "del",
            "dev",
            &format!("net{k}"),
            "egress",
        ]));
    }
}

/// The rail the kernel's own route lookup picks for `dst` from `src`.
fn kernel_choice(pod: &RailedPod, dst: &str, src: &str) -> u32 {
    let got = pod.pod.ns.ip_json(&["route", "get", dst, "from", src]);
    let dev = got[0]["dev"].as_str().unwrap_or_default().to_owned();
    dev.trim_start_matches("net")
        .parse()
        .unwrap_or_else(|_| panic!("route get: {got}"))
}

/// Rail `k` carried at least `n` packets, every other rail at most a
/// quarter of that (fresh interfaces send a few IPv6 ND/MLD packets).
#[track_caller]
fn assert_on_rail(d: &[u64], k: u32, n: u32) {
    let n = u64::from(n);
    assert!(
        d[(k - 1) as usize] >= n,
        "rail {k}'s router saw {} of {n} packets: {d:?}",
        d[(k - 1) as usize]
    );
    for (i, got) in d.iter().enumerate() {
        if i as u32 + 1 != k {
            assert!(
                *got <= n / 4,
                "rail {}'s router saw {got} packets meant for rail {k}: {d:?}",
                i + 1
            );
        }
    }
}

fn verdict_count(pins: &PodPins, rail: u32, verdict: Verdict) -> u64 {
    pins.counters()
        .expect("counters")
        .iter()
        .filter(|(r, v, _)| *r == rail && *v == verdict)
        .map(|(_, _, n)| n)
        .sum()
}

#[test]
fn rail_sourced_ping_and_tcp_cross_their_own_rail_and_fail_without_the_program() {
    steering(&[]);
}

/// The same with the program attached through pinned TCX links (Linux
/// 6.6+), the agent's other attach mode.
#[test]
fn tcx_links_steer_the_same() {
    if !railnet_agent::dataplane::tcx_supported() {
        eprintln!("skipped: this kernel has no TCX (Linux 6.6+)");
        return;
    }
    steering(&["--tc-attach", "tcx"]);
}

fn steering(flags: &[&str]) {
    let tcx = flags.contains(&"tcx");
    let fabric = RailFabric::new(2, RAILS);
    let agent_a = Agent::start_with(&fabric.nodes[0], &fabric.pools(0), flags);
    let agent_b = Agent::start_with(&fabric.nodes[1], &fabric.pools(1), flags);
    let a = RailedPod::new(&fabric, 0, &agent_a, "ebpf");
    let b = RailedPod::new(&fabric, 1, &agent_b, "ebpf");

    // A's kernel sends rail 3's traffic to B's rail-5 address out of net5
    // (on-link: rail 5's subnet spans both nodes).
    let wrong = kernel_choice(&a, b.ip(5), a.ip(3));
    assert_ne!(
        wrong, 3,
        "the fabric must make the kernel pick another rail"
    );

    let before = fabric.rails_rx(0);
    assert!(
        a.pod.ns.ping(a.ip(3), b.ip(5), PINGS, 56),
        "ping A rail3 → B rail5\n{}",
        agent_a.log()
    );
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 3, PINGS);

    let before = rails_bytes(&fabric, 0);
    let sent = 4 << 20;
    assert_eq!(tcp_transfer(&b.pod, b.ip(5), &a.pod, a.ip(3), sent), sent);
    let d = deltas(&before, &rails_bytes(&fabric, 0));
    assert!(
        d[2] as usize >= sent,
        "rail 3 carried {} bytes of a {sent}-byte TCP flow: {d:?}",
        d[2]
    );
    let stray = d[(wrong - 1) as usize];
    assert!(
        stray < 100_000,
        "rail {wrong} carried {stray} bytes of rail 3's TCP flow: {d:?}"
    );
    assert!(verdict_count(&a.pins(&agent_a), 3, Verdict::Steered) >= u64::from(PINGS));

    // An ADD that fails (a master the node lacks) is counted with why.
    let mut bad = fabric.netconf(3, &agent_a, "ebpf");
    bad["master"] = "nosuchnic".into();
    let refused = cni("ADD", &bad, "metrics-bad", Some(&a.pod.ns.path()), "net9");
    assert!(!refused.ok, "{}", refused.stdout);

    // The same counters, as an operator scrapes them.
    let scrape = agent_a.scrape(&fabric.nodes[0], "/metrics");
    let steered = format!(
        "railnet_dataplane_packets_total{{container=\"{}\",namespace=\"default\",pod=\"demo\",rail=\"3\",verdict=\"steered\"}} ",
        a.cid
    );
    let line = scrape
        .lines()
        .find(|l| l.starts_with(&steered))
        .unwrap_or_else(|| panic!("no {steered} in\n{scrape}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= u64::from(PINGS), "{line}");
    assert!(
        scrape.contains("railnet_ipam_pool_used_addresses{pool=\"rail3\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("railnet_cni_requests_total{op=\"ADD\",result=\"ok\"} 5"),
        "{scrape}"
    );
    assert!(
        scrape.contains(
            "railnet_cni_requests_total{op=\"ADD\",result=\"error\",reason=\"invalid_config\"} 1"
        ),
        "{scrape}"
    );
    assert!(
        scrape.contains("railnet_cni_request_duration_seconds_bucket"),
        "{scrape}"
    );
    assert!(
        agent_a
            .scrape(&fabric.nodes[0], "/healthz")
            .ends_with("ok\n")
    );

    // Detach the program from the interface the kernel picks: the same
    // traffic now leaves on that wrong rail. This is what lets the
    // assertions above fail.
    detach_program(&a, &agent_a, wrong, tcx);
    let before = fabric.rails_rx(0);
    assert!(a.pod.ns.ping(a.ip(3), b.ip(5), PINGS, 56));
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), wrong, PINGS);

    a.del(&fabric, &agent_a, "ebpf");
    b.del(&fabric, &agent_b, "ebpf");
}

#[test]
fn traffic_outside_the_rdma_cidrs_is_left_to_the_main_table() {
    let fabric = RailFabric::new(1, 3);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let a = RailedPod::new(&fabric, 0, &agent, "ebpf");
    let node = &fabric.nodes[0];
    let (eth0_before, rails_before) = (node.rx_packets(&a.pod.host_veth), fabric.rails_rx(0));
    // The node answers nothing for a rail source; only where the requests
    // go matters here.
    let _ = a.pod.ns.ping(a.ip(2), SERVICE, PINGS, 56);
    let eth0 = node.rx_packets(&a.pod.host_veth) - eth0_before;
    let d = deltas(&rails_before, &fabric.rails_rx(0));
    assert!(
        eth0 >= u64::from(PINGS),
        "eth0 carried {eth0} of {PINGS} requests to {SERVICE}"
    );
    assert!(
        d.iter().all(|n| *n <= u64::from(PINGS / 4)),
        "rail routers saw non-RDMA traffic: {d:?}"
    );

    // A non-RDMA network the main table reaches through rail 1 (say,
    // storage): rail 2's address must not pull it onto rail 2.
    fabric
        .spine
        .ip(&["addr", "add", "192.168.50.1/32", "dev", "lo"]);
    a.pod.ns.ip(&[
        "route",
        "add",
        "192.168.50.0/24",
        "via",
        "172.16.1.254",
        "dev",
        "net1",
    ]);
    let before = fabric.rails_rx(0);
    assert!(a.pod.ns.ping(a.ip(2), "192.168.50.1", PINGS, 56));
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 1, PINGS);
    assert!(verdict_count(&a.pins(&agent), 2, Verdict::NotRdma) >= u64::from(PINGS));
    a.del(&fabric, &agent, "ebpf");
}

/// A pulled cable on the rail whose RDMA-CIDR route has the lowest metric
/// must not take the other rails' routed traffic with it: the kernel
/// sends a rail-2 packet to a destination outside every rail's subnet out
/// of the lowest-metric rail first (where the program steers it to rail
/// 2), so with rail 1's link down and its gateway's neighbour entry gone
/// the packet would wait on an ARP that can never be answered. The pod's
/// rails ignore routes through a link without carrier, so the kernel
/// picks the next rail's route and the program steers as before.
#[test]
fn a_dead_rail_does_not_take_the_other_rails_routed_traffic_with_it() {
    let fabric = RailFabric::new(1, 3);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let a = RailedPod::new(&fabric, 0, &agent, "ebpf");
    // A GPU in another scalable unit: in the RDMA CIDR, in no rail's
    // subnet, reached through the rails' gateways and the spine.
    const FAR: &str = "172.16.200.1";
    fabric
        .spine
        .ip(&["addr", "add", &format!("{FAR}/32"), "dev", "lo"]);
    assert_eq!(kernel_choice(&a, FAR, a.ip(2)), 1);
    assert!(a.pod.ns.ping(a.ip(2), FAR, 3, 56), "rail 2 to {FAR} before");

    // Rail 1's cable pulled at the switch; the pod's neighbour entries
    // age out (flushed here, as minutes would).
    fabric.router(1).ip(&["link", "set", "n0", "down"]);
    a.pod.ns.ip(&["neigh", "flush", "dev", "net1"]);
    let before = fabric.rails_rx(0);
    assert!(
        a.pod.ns.ping(a.ip(2), FAR, PINGS, 56),
        "rail 2's traffic to {FAR} died with rail 1's link (kernel picks net{})",
        kernel_choice(&a, FAR, a.ip(2))
    );
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 2, PINGS);
    fabric.router(1).ip(&["link", "set", "n0", "up"]);
    a.del(&fabric, &agent, "ebpf");
}

#[test]
fn every_rail_resolves_via_its_own_gateway_when_bound_to_its_device() {
    for routing in ["ebpf", "rules"] {
        let fabric = RailFabric::new(1, RAILS);
        let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
        let a = RailedPod::dual(&fabric, 0, &agent, routing);
        for k in 1..=RAILS {
            // IPv6 ignores oif when a source is given: only the per-rail
            // rules make this right.
            let got = a.pod.ns.ip(&[
                "-6",
                "route",
                "get",
                "fd00:16:200::1",
                "from",
                a.ip6(k),
                "oif",
                &format!("net{k}"),
            ]);
            assert!(
                got.contains(&format!("via fd00:16:{k}::254 dev net{k}")),
                "{routing}: IPv6 rail {k}: {got}"
            );
            // A remote RDMA address on no rail's subnet.
            let got = a.pod.ns.ip(&[
                "route",
                "get",
                "172.16.200.1",
                "from",
                a.ip(k),
                "oif",
                &format!("net{k}"),
            ]);
            assert!(
                got.contains(&format!("via 172.16.{k}.254 dev net{k}")),
                "{routing}: rail {k}: {got}"
            );
        }
        let rules6 = a.pod.ns.ip(&["-6", "rule", "show"]);
        for k in 1..=RAILS {
            assert!(
                rules6.contains(&format!(
                    "from {} to fd00:16::/32 lookup {}",
                    a.ip6(k),
                    100 + k
                )),
                "{routing}: IPv6 rail {k}:\n{rules6}"
            );
        }
        let rules = a.pod.ns.ip(&["-4", "rule", "show"]);
        match routing {
            "ebpf" => assert_eq!(
                rules.lines().count(),
                3,
                "eBPF mode adds no IPv4 rules:\n{rules}"
            ),
            _ => {
                for k in 1..=RAILS {
                    assert!(
                        rules.contains(&format!(
                            "from {} to 172.16.0.0/16 lookup {}",
                            a.ip(k),
                            100 + k
                        )),
                        "rules mode, rail {k}:\n{rules}"
                    );
                }
            }
        }
        if routing == "ebpf" {
            // Without the IPv6 rules the same lookup lands on another rail:
            // what makes the assertion above able to fail.
            a.pod
                .ns
                .ip(&["-6", "rule", "del", "from", a.ip6(3), "to", RDMA_CIDR6]);
            let got = a.pod.ns.ip(&[
                "-6",
                "route",
                "get",
                "fd00:16:200::1",
                "from",
                a.ip6(3),
                "oif",
                "net3",
            ]);
            assert!(!got.contains("via fd00:16:3::254"), "without rules: {got}");
        }
        a.del(&fabric, &agent, routing);
        let rules = a.pod.ns.ip(&["-4", "rule", "show"]);
        assert_eq!(
            rules.lines().count(),
            3,
            "{routing}: rules left after DEL:\n{rules}"
        );
        let rules6 = a.pod.ns.ip(&["-6", "rule", "show"]);
        assert_eq!(
            rules6.lines().count(),
            2,
            "{routing}: IPv6 rules left after DEL:\n{rules6}"
        );
    }
}

#[test]
fn ipv6_rail_traffic_crosses_its_own_rail() {
    let fabric = RailFabric::new(2, RAILS);
    let agent_a = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let agent_b = Agent::start(&fabric.nodes[1], &fabric.pools(1));
    let a = RailedPod::dual(&fabric, 0, &agent_a, "ebpf");
    let b = RailedPod::dual(&fabric, 1, &agent_b, "ebpf");
    let before = fabric.rails_rx(0);
    assert!(
        a.pod.ns.ping(a.ip6(3), b.ip6(5), PINGS, 56),
        "ping -6 A rail3 → B rail5"
    );
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 3, PINGS);
    // IPv4 of the same dual-stack rails is still steered by the program.
    let before = fabric.rails_rx(0);
    assert!(a.pod.ns.ping(a.ip(3), b.ip(5), PINGS, 56));
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 3, PINGS);
    a.del(&fabric, &agent_a, "ebpf");
    b.del(&fabric, &agent_b, "ebpf");
}

#[test]
fn rules_mode_keeps_rail_traffic_on_its_rail_without_a_program() {
    let fabric = RailFabric::new(2, RAILS);
    let agent_a = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let agent_b = Agent::start(&fabric.nodes[1], &fabric.pools(1));
    let a = RailedPod::new(&fabric, 0, &agent_a, "rules");
    let b = RailedPod::new(&fabric, 1, &agent_b, "rules");
    assert!(
        !a.pins(&agent_a).dir().exists(),
        "rules mode loads no program"
    );
    let before = fabric.rails_rx(0);
    assert!(
        a.pod.ns.ping(a.ip(3), b.ip(5), PINGS, 56),
        "rules mode ping\n{}",
        a.pod.ns.ip(&["rule"])
    );
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 3, PINGS);
    a.del(&fabric, &agent_a, "rules");
    b.del(&fabric, &agent_b, "rules");
}

#[test]
fn routing_survives_an_agent_crash_and_the_new_agent_adopts_the_pins() {
    let fabric = RailFabric::new(2, RAILS);
    let mut agent_a = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let agent_b = Agent::start(&fabric.nodes[1], &fabric.pools(1));
    let a = RailedPod::new(&fabric, 0, &agent_a, "ebpf");
    let b = RailedPod::new(&fabric, 1, &agent_b, "ebpf");

    agent_a.kill9();
    let before = fabric.rails_rx(0);
    assert!(
        a.pod.ns.ping(a.ip(3), b.ip(5), PINGS, 56),
        "traffic while the agent is down"
    );
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 3, PINGS);

    agent_a.spawn(&fabric.nodes[0]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent_a
        .log()
        .contains(&format!("pods=1 attachments={RAILS}"))
    {
        assert!(
            Instant::now() < deadline,
            "no adoption logged:\n{}",
            agent_a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = fabric.rails_rx(0);
    assert!(a.pod.ns.ping(a.ip(3), b.ip(5), PINGS, 56));
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 3, PINGS);
    a.del(&fabric, &agent_a, "ebpf");
    assert!(
        !a.pins(&agent_a).dir().exists(),
        "the new agent's DEL removed the adopted pins"
    );
    b.del(&fabric, &agent_b, "ebpf");
}

/// IDs of the pod's programs (through its pinned links) and maps.
fn pod_objects(pins: &PodPins) -> (Vec<u32>, Vec<u32>) {
    let mut progs = Vec::new();
    for e in std::fs::read_dir(pins.dir().join("links"))
        .unwrap()
        .flatten()
    {
        let link = aya::programs::links::PinnedLink::from_pin(e.path()).expect("pinned link");
        let link = aya::programs::links::FdLink::from(link);
        progs.push(link.info().expect("link info").program_id());
    }
    let mut maps = Vec::new();
    for e in std::fs::read_dir(pins.dir().join("maps"))
        .unwrap()
        .flatten()
    {
        let map = aya::maps::MapData::from_pin(e.path()).expect("pinned map");
        maps.push(map.info().expect("map info").id());
    }
    (progs, maps)
}

#[track_caller]
fn assert_freed(what: &str, progs: &[u32], maps: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let live_progs: Vec<u32> = aya::programs::loaded_programs()
            .flatten()
            .map(|p| p.id())
            .filter(|id| progs.contains(id))
            .collect();
        let live_maps: Vec<u32> = aya::maps::loaded_maps()
            .flatten()
            .map(|m| m.id())
            .filter(|id| maps.contains(id))
            .collect();
        if live_progs.is_empty() && live_maps.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: programs {live_progs:?} and maps {live_maps:?} still loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn del_and_a_vanished_netns_leave_no_program_map_or_pin() {
    let fabric = RailFabric::new(1, 3);
    let agent = Agent::start_with(
        &fabric.nodes[0],
        &fabric.pools(0),
        &["--sweep-interval", "1"],
    );

    let a = RailedPod::new(&fabric, 0, &agent, "ebpf");
    let pins = a.pins(&agent);
    let (progs, maps) = pod_objects(&pins);
    assert_eq!(progs.len(), 3, "one program instance per rail interface");
    assert_eq!(maps.len(), 4);
    a.del(&fabric, &agent, "ebpf");
    assert!(!pins.dir().exists(), "pins left after DEL");
    assert_freed("after DEL", &progs, &maps);

    // A pod whose netns goes away without any DEL: the sweep finds it.
    let b = RailedPod::new(&fabric, 0, &agent, "ebpf");
    let pins = b.pins(&agent);
    let (progs, maps) = pod_objects(&pins);
    let dir: PathBuf = pins.dir().to_path_buf();
    let info = agent.pod_info(&format!("uid-{}", b.cid));
    assert!(info.join("rails.json").exists());
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() {
        assert!(
            Instant::now() < deadline,
            "sweep did not remove {}\n{}",
            dir.display(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_freed("after the sweep", &progs, &maps);
    // The sweep logs after it removed the pins: give a slow guest a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("swept pods whose netns is gone") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        agent.log().contains("swept pods whose netns is gone"),
        "{}",
        agent.log()
    );
    assert!(!info.exists(), "the sweep left the pod's rail info");
}

#[test]
fn a_redirect_that_would_not_fit_the_rail_mtu_is_passed_and_counted() {
    let fabric = RailFabric::new(2, RAILS);
    let mut agent_a = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let agent_b = Agent::start(&fabric.nodes[1], &fabric.pools(1));
    let a = RailedPod::with_mtu(&fabric, 0, &agent_a, "ebpf", &[(2, 1280)]);
    let b = RailedPod::new(&fabric, 1, &agent_b, "ebpf");
    let wrong = kernel_choice(&a, b.ip(5), a.ip(2));
    let before = fabric.rails_rx(0);
    // 1300-byte payload: fits the kernel's pick (1500), not net2 (1280).
    assert!(
        a.pod.ns.ping(a.ip(2), b.ip(5), PINGS, 1300),
        "big pings must still get through"
    );
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), wrong, PINGS);
    assert!(verdict_count(&a.pins(&agent_a), 2, Verdict::MtuExceeded) >= u64::from(PINGS));
    // The program says so through the agent, naming the pod and the rail,
    // once: the repeats within a few seconds are counted, not repeated.
    let said = program_says(&agent_a, 0, &a.cid, 2, "does not fit the rail's MTU");
    assert_eq!(
        said,
        1,
        "one line for {PINGS} big pings:\n{}",
        agent_a.log()
    );
    // Small packets from the same address are still steered.
    let before = fabric.rails_rx(0);
    assert!(a.pod.ns.ping(a.ip(2), b.ip(5), PINGS, 56));
    assert_on_rail(&deltas(&before, &fabric.rails_rx(0)), 2, PINGS);
    // One log buffer per node, pinned: the program the first agent loaded
    // still reaches the agent that replaced it.
    agent_a.stop();
    let earlier = agent_a.log().len();
    agent_a.spawn(&fabric.nodes[0]);
    assert!(a.pod.ns.ping(a.ip(2), b.ip(5), 1, 1300));
    let said = program_says(&agent_a, earlier, &a.cid, 2, "does not fit the rail's MTU");
    assert_eq!(
        said,
        1,
        "the restarted agent forwards the program's log:\n{}",
        agent_a.log()
    );
    a.del(&fabric, &agent_a, "ebpf");
    b.del(&fabric, &agent_b, "ebpf");
}

/// How many lines the agent logged, from byte `from` of its log, are the
/// rail program's event `what` about `cid`'s rail `rail` (forwarding is
/// asynchronous: waits up to 5 s for the first, then a little for more).
fn program_says(agent: &Agent, from: usize, cid: &str, rail: u32, what: &str) -> usize {
    let count = || {
        agent.log()[from..]
            .lines()
            .filter(|l| {
                l.contains("railnet::program")
                    && l.contains(what)
                    && l.contains(&format!("pod={cid}"))
                    && l.contains(&format!("rail={rail}"))
            })
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while count() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    count()
}
