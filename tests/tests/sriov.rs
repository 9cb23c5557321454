//! Mode sriov without SR-IOV hardware (none here): the "VF" is a veth whose
//! other end is a port of the rail router's bridge, as a VF's traffic
//! reaches the rail switch, and the agent's sysfs root is a tree of this
//! test's mapping the VF's PCI address to that netdev, as
//! /sys/bus/pci/devices/<bdf>/net/<name> does on a node. VF attributes
//! (vlan, spoofchk, trust, link_state) go through the PF: no driver here
//! has VFs, so the request is checked byte for byte against iproute2's and
//! the refusal of a PF that lists no such VF is checked end to end; a PF
//! that applies them (hardware, or netdevsim) is not available.

use std::path::Path;

use railnet_agent::netconf::{VfLinkMode, VfSettings};
use railnet_tests::{
    Agent, Netns, RailFabric, ScratchDir, cni, emitted, iproute2_newlink, link_attributes_of,
    veth_between,
};

const VF: &str = "ens1f0v3";
const BDF: &str = "0000:3b:00.3";
const VF_MAC: &str = "02:00:00:00:03:03";
const POD_MAC: &str = "02:aa:00:00:00:01";

/// The agent's sysfs tree for VF `BDF` (netdev `VF`) of a PF at
/// 0000:3b:00.0: if given, netdev `pf` listing the VF as `virtfn<n>`;
/// else the node's own rail NIC `eth1`, listing no VF (its VF attributes
/// cannot be set).
fn sysfs_for_vf(pf: Option<(&str, u32)>) -> ScratchDir {
    let sysfs = ScratchDir::new("sysfs");
    let devs = sysfs.path().join("bus/pci/devices");
    std::fs::create_dir_all(devs.join(BDF).join("net").join(VF)).unwrap();
    std::os::unix::fs::symlink("../0000:3b:00.0", devs.join(BDF).join("physfn")).unwrap();
    let netdev = pf.map_or("eth1", |(pf, _)| pf);
    std::fs::create_dir_all(devs.join("0000:3b:00.0/net").join(netdev)).unwrap();
    if let Some((_, n)) = pf {
        std::os::unix::fs::symlink(
            format!("../{BDF}"),
            devs.join(format!("0000:3b:00.0/virtfn{n}")),
        )
        .unwrap();
    }
    sysfs
}

/// An agent on the fabric's node reading `sysfs`, and a rail-1 network
/// config in mode sriov for VF `BDF`.
fn sriov_agent(fabric: &RailFabric, sysfs: &ScratchDir) -> (Agent, serde_json::Value) {
    let agent = Agent::start_with(
        &fabric.nodes[0],
        &fabric.pools(0),
        &["--sysfs-root", sysfs.path().to_str().unwrap()],
    );
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "sriov".into();
    conf["deviceID"] = BDF.into();
    (agent, conf)
}

#[test]
fn a_vf_moves_in_carries_its_rail_and_comes_back_as_it_was() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let router = fabric.router(1);
    veth_between(node, VF, router, "vf3r");
    router.ip(&["link", "set", "vf3r", "master", "br0", "up"]);
    node.ip(&["link", "set", VF, "address", VF_MAC, "mtu", "1500"]);
    let sysfs = sysfs_for_vf(None);
    let (agent, mut conf) = sriov_agent(&fabric, &sysfs);
    let records = agent.state_path().parent().unwrap().join("vfs");
    let pod = fabric.pod(0);
    conf["mtu"] = 1400.into();
    conf["runtimeConfig"] = serde_json::json!({ "mac": POD_MAC });

    let add = cni("ADD", &conf, "vf-pod", Some(&pod.ns.path()), "net1");
    assert!(add.ok, "{}\n{}", add.stdout, agent.log());
    assert!(!node.has_link(VF), "the VF is still in the node");
    let link = &pod.ns.ip_json(&["link", "show", "dev", "net1"])[0];
    assert_eq!(link["address"], POD_MAC);
    assert_eq!(link["mtu"], 1400);
    assert!(
        records.join("vf-vf-pod-net1.json").is_file(),
        "no record of the VF"
    );
    let addr = add.json["ips"][0]["address"].as_str().unwrap();
    let addr = addr.split('/').next().unwrap();
    let before = router.rx_packets("vf3r");
    assert!(
        pod.ns.ping(addr, "172.16.1.254", 5, 56),
        "rail 1 gateway over the VF"
    );
    assert!(
        router.rx_packets("vf3r") >= before + 5,
        "the pings did not cross the VF"
    );

    // The same VF cannot go to a second pod.
    let other = fabric.pod(0);
    let again = cni("ADD", &conf, "vf-pod-2", Some(&other.ns.path()), "net1");
    assert!(!again.ok);
    assert!(again.stdout.contains(VF), "{}", again.stdout);
    assert!(!other.ns.has_link("net1"));

    let del = cni("DEL", &conf, "vf-pod", Some(&pod.ns.path()), "net1");
    assert!(del.ok, "{}\n{}", del.stdout, agent.log());
    assert!(!pod.ns.has_link("net1"));
    let back = &node.ip_json(&["link", "show", "dev", VF])[0];
    assert_eq!(back["address"], VF_MAC, "MAC not restored");
    assert_eq!(back["mtu"], 1500, "MTU not restored");
    assert!(!Path::new(&records.join("vf-vf-pod-net1.json")).exists());
    assert_eq!(agent.allocations(node), 0);
    // DEL again (runtimes retry): nothing to do, success.
    assert!(cni("DEL", &conf, "vf-pod", Some(&pod.ns.path()), "net1").ok);

    // The PF itself (the node's own rail NIC, eth1): never moved into a pod.
    conf["deviceID"] = "0000:3b:00.0".into();
    let pf = cni("ADD", &conf, "vf-pod-pf", Some(&pod.ns.path()), "net1");
    assert!(!pf.ok);
    assert!(
        pf.stdout.contains("0000:3b:00.0 is not a VF"),
        "{}",
        pf.stdout
    );
    assert!(node.has_link("eth1") && !pod.ns.has_link("net1"));
    assert_eq!(agent.allocations(node), 0);

    // A PCI address that is no VF of this node: refused, naming it.
    conf["deviceID"] = "0000:3b:00.7".into();
    let bad = cni("ADD", &conf, "vf-pod-3", Some(&pod.ns.path()), "net1");
    assert!(!bad.ok);
    assert!(bad.stdout.contains("0000:3b:00.7"), "{}", bad.stdout);
    assert!(node.has_link(VF));
    assert_eq!(agent.allocations(node), 0);
}

/// `IFLA_VFINFO_LIST`.
const IFLA_VFINFO_LIST: u16 = 22;

/// What railnet sends to set VF attributes through the PF is what
/// `ip link set dev <pf> vf <n> …` sends (captured with strace; a veth
/// refuses both, which does not matter for what was sent).
#[test]
fn vf_attributes_are_byte_for_byte_what_iproute2_sends() {
    let ns = Netns::new("vfgold");
    ns.ip(&["link", "add", "pf0", "type", "veth", "peer", "name", "pf0p"]);
    let index = ns.ip_json(&["link", "show", "dev", "pf0"])[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    let all = VfSettings {
        vlan: Some(100),
        qos: 2,
        spoofchk: Some(false),
        trust: Some(true),
        link_state: Some(VfLinkMode::Enable),
        mac: Some([0x02, 0xaa, 0, 0, 0, 0x01]),
        ..VfSettings::default()
    };
    let cases: Vec<(Vec<&str>, VfSettings)> = vec![
        (
            vec![
                "mac", POD_MAC, "vlan", "100", "qos", "2", "spoofchk", "off", "trust", "on",
                "state", "enable",
            ],
            all,
        ),
        (
            vec![
                "vlan", "0", "spoofchk", "on", "trust", "off", "state", "auto",
            ],
            VfSettings {
                vlan: Some(0),
                qos: 0,
                spoofchk: Some(true),
                trust: Some(false),
                link_state: Some(VfLinkMode::Auto),
                mac: None,
                ..VfSettings::default()
            },
        ),
        (
            vec!["state", "disable"],
            VfSettings {
                link_state: Some(VfLinkMode::Disable),
                ..VfSettings::default()
            },
        ),
    ];
    for (args, set) in cases {
        let mut cmd = vec!["link", "set", "dev", "pf0", "vf", "3"];
        cmd.extend(&args);
        let theirs = iproute2_newlink(&ns, &cmd);
        assert_eq!(
            u32::from_ne_bytes(theirs[4..8].try_into().unwrap()),
            index,
            "iproute2 addressed the PF by index"
        );
        let ours = emitted(&railnet_agent::rtnl::vf_request(index, 3, &set));
        assert_eq!(&ours[4..8], &theirs[4..8], "the PF's index");
        assert_eq!(
            link_attributes_of(&ours, &[IFLA_VFINFO_LIST]),
            link_attributes_of(&theirs, &[IFLA_VFINFO_LIST]),
            "IFLA_VFINFO_LIST for `{}`",
            args.join(" ")
        );
    }
}

/// InfiniBand VF GUIDs: each of railnet's requests is iproute2's `ip link
/// set dev <pf> vf 3 node_guid G` (then `port_guid G`) byte for byte —
/// one GUID per request, since the kernel applies the first GUID of a
/// request and ignores the rest — and the link state goes in a request of
/// its own before them, as `… vf 3 state enable`.
#[test]
fn vf_guids_are_byte_for_byte_what_iproute2_sends() {
    let ns = Netns::new("guidgold");
    ns.ip(&["link", "add", "ib0", "type", "veth", "peer", "name", "ib0p"]);
    let index = ns.ip_json(&["link", "show", "dev", "ib0"])[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    let guid = "00:11:22:33:44:55:66:77";
    let g = railnet_agent::netconf::parse_guid(guid).unwrap();
    let ours = railnet_agent::rtnl::vf_requests(
        index,
        3,
        &VfSettings {
            link_state: Some(VfLinkMode::Enable),
            node_guid: Some(g),
            port_guid: Some(g),
            ..VfSettings::default()
        },
    );
    assert_eq!(ours.len(), 3, "state, node GUID, port GUID: three requests");
    let commands = [
        vec!["state", "enable"],
        vec!["node_guid", guid],
        vec!["port_guid", guid],
    ];
    for (msg, args) in ours.iter().zip(commands) {
        let mut cmd = vec!["link", "set", "dev", "ib0", "vf", "3"];
        cmd.extend(&args);
        let theirs = iproute2_newlink(&ns, &cmd);
        assert_eq!(
            link_attributes_of(&emitted(msg), &[IFLA_VFINFO_LIST]),
            link_attributes_of(&theirs, &[IFLA_VFINFO_LIST]),
            "IFLA_VFINFO_LIST for `{}`",
            args.join(" ")
        );
    }
}

/// A VF whose PF lists no such VF (here a veth: no SR-IOV): ADD is refused
/// naming the PF and the VF number, before anything changes.
#[test]
fn vf_attributes_need_a_pf_that_has_the_vf_and_nothing_changes_without_one() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let router = fabric.router(1);
    veth_between(node, VF, router, "vf3r");
    node.ip(&[
        "link", "add", "ens1f0", "type", "veth", "peer", "name", "ens1f0p",
    ]);
    let sysfs = sysfs_for_vf(Some(("ens1f0", 3)));
    let (agent, mut conf) = sriov_agent(&fabric, &sysfs);
    let records = agent.state_path().parent().unwrap().join("vfs");
    let pod = fabric.pod(0);
    conf["vlan"] = 100.into();
    conf["trust"] = "on".into();
    let add = cni("ADD", &conf, "vf-attr", Some(&pod.ns.path()), "net1");
    assert!(!add.ok, "{}", add.stdout);
    let text = format!("{} {}", add.json["msg"], add.json["details"]);
    assert!(
        text.contains("ens1f0") && text.contains("VF 3") && text.contains("sriov_numvfs"),
        "{text}"
    );
    assert!(node.has_link(VF), "the VF left the node");
    assert!(!pod.ns.has_link("net1"));
    assert!(
        !records.join("vf-vf-attr-net1.json").exists(),
        "a record of a VF that was never taken"
    );
    assert_eq!(agent.allocations(node), 0);
    // A VF attribute sriov-cni would not accept: refused before the agent.
    conf["vlan"] = 5000.into();
    let bad = cni("ADD", &conf, "vf-attr", Some(&pod.ns.path()), "net1");
    assert!(!bad.ok);
    assert!(bad.stdout.contains("0 to 4094"), "{}", bad.stdout);
}

/// VF attributes on a PF that has VFs: netdevsim's (built for the guest
/// kernel by the VM setup; not in Debian's kernel, not on this machine's).
/// ADD sets vlan, qos, spoofchk, trust and link state through the PF, as
/// `ip link show <pf>` reports them; DEL puts back what the VF had.
#[test]
#[ignore = "needs netdevsim: cargo xtask test runs it under qemu"]
fn vf_attributes_are_set_through_the_pf_and_put_back_on_del() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let router = fabric.router(1);
    // A netdevsim device with two VFs; its PF netdev moves to the node.
    let id = 100 + std::process::id() % 800;
    std::fs::write("/sys/bus/netdevsim/new_device", format!("{id} 1")).unwrap();
    struct Sim(u32);
    impl Drop for Sim {
        fn drop(&mut self) {
            let _ = std::fs::write("/sys/bus/netdevsim/del_device", self.0.to_string());
        }
    }
    let _sim = Sim(id);
    let dev = format!("/sys/bus/netdevsim/devices/netdevsim{id}");
    std::fs::write(format!("{dev}/sriov_numvfs"), "2").unwrap();
    let pf = std::fs::read_dir(format!("{dev}/net"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();
    railnet_tests::sh(std::process::Command::new("ip").args([
        "link",
        "set",
        &pf,
        "netns",
        node.name(),
    ]));
    veth_between(node, VF, router, "vf3r");
    let sysfs = sysfs_for_vf(Some((&pf, 1)));
    let (agent, mut conf) = sriov_agent(&fabric, &sysfs);
    let vf1 = || node.ip_json(&["-d", "link", "show", "dev", &pf])[0]["vfinfo_list"][1].clone();
    let before = vf1();
    assert_eq!(before["vf"], 1, "{before}");
    let pod = fabric.pod(0);
    conf["vlan"] = 100.into();
    conf["vlanQoS"] = 2.into();
    conf["spoofchk"] = "on".into();
    conf["trust"] = "on".into();
    conf["link_state"] = "enable".into();
    conf["runtimeConfig"] = serde_json::json!({ "mac": POD_MAC });
    let add = cni("ADD", &conf, "vf-sim", Some(&pod.ns.path()), "net1");
    assert!(add.ok, "{}\n{}", add.stdout, agent.log());
    let set = vf1();
    assert_eq!(set["vlan_list"][0]["vlan"], 100, "{set}");
    assert_eq!(set["vlan_list"][0]["qos"], 2, "{set}");
    assert_eq!(set["spoofchk"], true, "{set}");
    assert_eq!(set["trust"], true, "{set}");
    assert_eq!(set["link_state"], "enable", "{set}");
    assert_eq!(set["address"], POD_MAC, "the PF knows the pod's MAC: {set}");
    assert!(pod.ns.has_link("net1"));
    let del = cni("DEL", &conf, "vf-sim", Some(&pod.ns.path()), "net1");
    assert!(del.ok, "{}\n{}", del.stdout, agent.log());
    let after = vf1();
    for key in ["address", "vlan_list", "spoofchk", "trust", "link_state"] {
        assert_eq!(after.get(key), before.get(key), "{key}: {before} → {after}");
    }
    assert!(node.has_link(VF));

    // An InfiniBand VF's GUID through a PF whose driver cannot set GUIDs
    // (netdevsim has no ndo_set_vf_guid: EOPNOTSUPP, as an Ethernet-only
    // NIC answers). The link state went through first; refused, named,
    // and put back: nothing changed, nothing allocated, no record.
    let mut ib = conf.clone();
    for key in ["vlan", "vlanQoS", "spoofchk", "trust", "runtimeConfig"] {
        ib.as_object_mut().unwrap().remove(key);
    }
    ib["mode"] = "ib-sriov".into();
    ib["link_state"] = "disable".into();
    ib["runtimeConfig"] = serde_json::json!({ "infinibandGUID": "00:11:22:33:44:55:66:77" });
    let refused = cni("ADD", &ib, "ib-sim", Some(&pod.ns.path()), "net1");
    assert!(!refused.ok, "{}", refused.stdout);
    let text = format!("{} {}", refused.json["msg"], refused.json["details"]);
    assert!(
        text.contains(&pf) && text.contains("EOPNOTSUPP") && text.contains("VF 1"),
        "{text}"
    );
    let untouched = vf1();
    assert_eq!(
        untouched.get("link_state"),
        before.get("link_state"),
        "the link state set before the GUID was refused stayed: {untouched}"
    );
    assert!(node.has_link(VF) && !pod.ns.has_link("net1"));
    let records = agent.state_path().parent().unwrap().join("vfs");
    assert!(!records.join("vf-ib-sim-net1.json").exists());
    assert_eq!(agent.allocations(node), 0);
}

/// Mode ib-sriov end to end (no InfiniBand here: the VF netdev is a veth,
/// Ethernet, which has no GUID to check): the VF moves in with its rail
/// and comes back on DEL; a GUID asked of a VF whose PF sysfs does not
/// name is refused before anything changes.
#[test]
fn an_ib_vf_moves_in_and_back_and_a_guid_needs_its_pf() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let router = fabric.router(1);
    veth_between(node, VF, router, "vf3r");
    router.ip(&["link", "set", "vf3r", "master", "br0", "up"]);
    let sysfs = sysfs_for_vf(None);
    let (agent, mut conf) = sriov_agent(&fabric, &sysfs);
    conf["mode"] = "ib-sriov".into();
    conf["pkey"] = "0x8001".into();
    let pod = fabric.pod(0);
    let add = cni("ADD", &conf, "ib-pod", Some(&pod.ns.path()), "net1");
    assert!(add.ok, "{}\n{}", add.stdout, agent.log());
    assert!(!node.has_link(VF) && pod.ns.has_link("net1"));
    let addr = add.json["ips"][0]["address"].as_str().unwrap();
    let addr = addr.split('/').next().unwrap();
    assert!(pod.ns.ping(addr, "172.16.1.254", 3, 56));
    // IPoIB carries no Ethernet frames for the program: rules keep the
    // rail (asked for ebpf, given rules).
    let rules = pod.ns.ip(&["-4", "rule", "show"]);
    assert!(rules.contains(&format!("from {addr}")), "{rules}");
    let del = cni("DEL", &conf, "ib-pod", Some(&pod.ns.path()), "net1");
    assert!(del.ok, "{}\n{}", del.stdout, agent.log());
    assert!(node.has_link(VF) && !pod.ns.has_link("net1"));
    assert_eq!(agent.allocations(node), 0);

    // Waiting for ib-kubernetes (ibKubernetesEnabled, not yet marked
    // configured): "try again" (code 11), nothing taken.
    conf["ibKubernetesEnabled"] = true.into();
    let wait = cni("ADD", &conf, "ib-pod4", Some(&pod.ns.path()), "net1");
    assert!(!wait.ok);
    assert_eq!(wait.json["code"], 11, "{}", wait.stdout);
    assert!(
        wait.stdout.contains("mellanox.infiniband.app"),
        "{}",
        wait.stdout
    );
    assert!(node.has_link(VF) && !pod.ns.has_link("net1"));
    assert_eq!(agent.allocations(node), 0);
    conf.as_object_mut().unwrap().remove("ibKubernetesEnabled");

    conf["runtimeConfig"] = serde_json::json!({ "infinibandGUID": "00:11:22:33:44:55:66:77" });
    let refused = cni("ADD", &conf, "ib-pod2", Some(&pod.ns.path()), "net1");
    assert!(!refused.ok);
    let text = format!("{} {}", refused.json["msg"], refused.json["details"]);
    assert!(
        text.contains("GUIDs are set through its PF") && text.contains("no virtfn link"),
        "{text}"
    );
    assert!(node.has_link(VF) && !pod.ns.has_link("net1"));
    assert_eq!(agent.allocations(node), 0);
    // Ethernet VF attributes on an InfiniBand VF: refused before the agent.
    conf["vlan"] = 100.into();
    let bad = cni("ADD", &conf, "ib-pod3", Some(&pod.ns.path()), "net1");
    assert!(!bad.ok && bad.stdout.contains("pkey"), "{}", bad.stdout);
}
