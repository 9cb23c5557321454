//! railnet with CNI plugins nobody here wrote: the reference `macvlan`
//! from Debian's containernetworking-plugins using `railnet-ipam` (railnet's
//! IPAM as an IPAM plugin, as Spiderpool's IPAM is used).

use std::path::Path;

use railnet_tests::{Agent, CniOutcome, Netns, RailFabric, ScratchDir, binary, plugin, unique};
use serde_json::{Value, json};

const MACVLAN: &str = "/usr/lib/cni/macvlan";

/// Runs the reference macvlan for `net1` from the node's netns (it makes
/// the link beside its master there), as kubelet would on the node.
fn macvlan_on_node(
    node: &Netns,
    command: &str,
    conf: &Value,
    cid: &str,
    ns: &Path,
    cni_path: &str,
) -> CniOutcome {
    let (command, conf, cid, ns, cni_path) = (
        command.to_owned(),
        conf.clone(),
        cid.to_owned(),
        ns.to_owned(),
        cni_path.to_owned(),
    );
    node.run(move || {
        plugin(
            Path::new(MACVLAN),
            &command,
            &conf,
            &cid,
            Some(&ns),
            "net1",
            &cni_path,
        )
    })
}

#[test]
fn reference_macvlan_gets_its_address_from_railnet_ipam() {
    let fabric = RailFabric::new(1, 1);
    let pools = json!({"pools": [{
        "name": "rail1", "subnet": "172.16.1.0/24", "gateway": "172.16.1.254",
        "ips": ["172.16.1.10-172.16.1.20"],
        "routes": [{"to": "172.16.0.0/16", "via": "172.16.1.254"}],
    }]});
    let agent = Agent::start(&fabric.nodes[0], &pools);
    // CNI_PATH: the railnet binary under its IPAM name, then the reference
    // plugins.
    let bin_dir = ScratchDir::new("cnibin");
    std::os::unix::fs::symlink(
        binary("RAILNET_CNI_BIN", "railnet"),
        bin_dir.path().join("railnet-ipam"),
    )
    .unwrap();
    let cni_path = format!("{}:/usr/lib/cni", bin_dir.path().display());
    let conf = json!({
        "cniVersion": "1.0.0", "name": "rail1", "type": "macvlan", "master": "eth1", "mode": "bridge",
        "agentSocket": agent.socket, "tombstoneDir": agent.tombstones(),
        "ipam": {"type": "railnet-ipam", "ippools": {"ipv4": ["rail1"]}},
    });
    // The reference macvlan creates the link in the node's netns: run it
    // there, as kubelet would on the node.
    let pod = fabric.pod(0);
    let cid = unique("c");
    let run = |command: &str, cid: &str, ns: &Path| {
        macvlan_on_node(&fabric.nodes[0], command, &conf, cid, ns, &cni_path)
    };
    let out = run("ADD", &cid, &pod.ns.path());
    assert!(
        out.ok,
        "macvlan + railnet-ipam ADD: {}\n{}",
        out.stdout,
        agent.log()
    );
    assert_eq!(
        out.json["ips"][0]["address"], "172.16.1.10/24",
        "{}",
        out.stdout
    );
    let addrs = pod.ns.ip(&["-4", "addr", "show", "dev", "net1"]);
    assert!(addrs.contains("172.16.1.10/24"), "{addrs}");
    let routes = pod.ns.ip(&["route", "show", "172.16.0.0/16"]);
    assert!(
        routes.contains("via 172.16.1.254 dev net1"),
        "the pool's route reached the pod: {routes}"
    );

    let out = run("DEL", &cid, &pod.ns.path());
    assert!(out.ok, "DEL: {}", out.stdout);
    assert!(!pod.ns.has_link("net1"));
    // Released: the next pod gets the same first address.
    let next = fabric.pod(0);
    let out = run("ADD", &unique("c"), &next.ns.path());
    assert!(out.ok, "{}", out.stdout);
    assert_eq!(
        out.json["ips"][0]["address"], "172.16.1.10/24",
        "{}",
        out.stdout
    );
    // The ips capability: the macvlan passes its config, runtimeConfig and
    // all, to railnet-ipam, which gives the address the pod asked for.
    let asked = fabric.pod(0);
    let mut asking = conf.clone();
    asking["runtimeConfig"] = json!({"ips": ["172.16.1.15/24"]});
    let out = macvlan_on_node(
        &fabric.nodes[0],
        "ADD",
        &asking,
        &unique("c"),
        &asked.ns.path(),
        &cni_path,
    );
    assert!(out.ok, "{}\n{}", out.stdout, agent.log());
    assert_eq!(
        out.json["ips"][0]["address"], "172.16.1.15/24",
        "{}",
        out.stdout
    );
}

#[test]
fn railnet_chained_after_reference_macvlan_adds_address_routes_and_program() {
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let pod = fabric.pod(0);
    let cid = unique("c");
    // The chain as a NetworkAttachmentDefinition conflist would run it:
    // macvlan (no IPAM: L2 only) makes net1, railnet adds its part.
    let macvlan = json!({"cniVersion": "1.0.0", "name": "rail1", "type": "macvlan", "master": "eth1", "mode": "bridge"});
    let run_macvlan = |command: &str| {
        macvlan_on_node(
            &fabric.nodes[0],
            command,
            &macvlan,
            &cid,
            &pod.ns.path(),
            "/usr/lib/cni",
        )
    };
    let first = run_macvlan("ADD");
    assert!(first.ok, "macvlan: {}", first.stdout);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "chained".into();
    conf.as_object_mut().unwrap().remove("master");
    conf["prevResult"] = first.json.clone();
    let out = railnet_tests::cni("ADD", &conf, &cid, Some(&pod.ns.path()), "net1");
    assert!(out.ok, "railnet chained: {}\n{}", out.stdout, agent.log());
    assert_eq!(out.json["ips"][0]["address"], "172.16.1.10/24");
    let routes = pod.ns.ip(&["route", "show", "172.16.0.0/16"]);
    assert!(
        routes.contains("via 172.16.1.254 dev net1 proto static metric 101"),
        "{routes}"
    );
    assert!(
        agent.pin_root.join(&cid).join("links/net1").exists(),
        "the program is attached"
    );

    // DEL in reverse order: railnet takes its part off, macvlan removes the link.
    let del = railnet_tests::cni("DEL", &conf, &cid, Some(&pod.ns.path()), "net1");
    assert!(del.ok, "{}", del.stdout);
    assert!(pod.ns.has_link("net1"), "the link is macvlan's to remove");
    let addrs = pod.ns.ip(&["-4", "addr", "show", "dev", "net1"]);
    assert!(
        !addrs.contains("172.16.1.10"),
        "railnet's address is gone: {addrs}"
    );
    assert!(!agent.pin_root.join(&cid).exists());
    assert!(run_macvlan("DEL").ok);
    assert!(!pod.ns.has_link("net1"));
}

#[test]
fn add_announces_the_pod_with_a_gratuitous_arp() {
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let conf = fabric.netconf(1, &agent, "ebpf");
    let (a, b) = (fabric.pod(0), fabric.pod(0));
    assert!(railnet_tests::cni("ADD", &conf, &unique("b"), Some(&b.ns.path()), "net1").ok);
    // B takes gratuitous ARPs into its cache; nothing else could teach B
    // about A (A's own ARP for its gateway is not addressed to B).
    b.ns.sysctl("net.ipv4.conf.net1.arp_accept", "1");
    let out = railnet_tests::cni("ADD", &conf, &unique("a"), Some(&a.ns.path()), "net1");
    assert!(out.ok, "{}", out.stdout);
    let ip = out.json["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mac = out.json["interfaces"][0]["mac"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let neigh = b.ns.ip(&["neigh", "show", &ip, "dev", "net1"]);
        if neigh.contains(&mac) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never learnt {ip} at {mac}: {neigh:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn reference_tuning_chained_after_railnet_reads_railnet_s_result() {
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let pod = fabric.pod(0);
    let cid = unique("c");
    for version in ["0.4.0", "1.0.0"] {
        let mut conf = fabric.netconf(1, &agent, "ebpf");
        conf["cniVersion"] = version.into();
        let out = railnet_tests::cni("ADD", &conf, &cid, Some(&pod.ns.path()), "net1");
        assert!(out.ok, "{}", out.stdout);
        // tuning parses railnet's result with libcni's own types.
        let tuning = json!({
            "cniVersion": version, "name": "rail1", "type": "tuning",
            "sysctl": {"net.ipv4.conf.net1.arp_ignore": "2"},
            "prevResult": out.json,
        });
        let t = plugin(
            Path::new("/usr/lib/cni/tuning"),
            "ADD",
            &tuning,
            &cid,
            Some(&pod.ns.path()),
            "net1",
            "/usr/lib/cni",
        );
        assert!(t.ok, "tuning after railnet ({version}): {}", t.stdout);
        assert_eq!(
            t.json["ips"][0]["address"], out.json["ips"][0]["address"],
            "tuning passes railnet's result on"
        );
        let v = pod
            .ns
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/net1/arp_ignore").unwrap());
        assert_eq!(v.trim(), "2", "railnet sets 1; tuning after it wins");
        let t = plugin(
            Path::new("/usr/lib/cni/tuning"),
            "DEL",
            &tuning,
            &cid,
            Some(&pod.ns.path()),
            "net1",
            "/usr/lib/cni",
        );
        assert!(t.ok, "{}", t.stdout);
        assert!(railnet_tests::cni("DEL", &conf, &cid, Some(&pod.ns.path()), "net1").ok);
    }
}
