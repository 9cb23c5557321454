//! RDMA netlink on a kernel that has RDMA. This machine's kernel has no RDMA
//! subsystem, so every test here is ignored on it; `cargo xtask test` runs
//! them in Debian's Linux 6.1 under qemu, with soft RoCE (rxe) devices on
//! dummy and macvlan netdevs, one guest per RDMA netns mode (the mode can
//! only change while no other netns exists):
//! - `shared_*` in a guest left in shared mode (the kernel default);
//! - `exclusive_*` in a guest switched to exclusive mode before any netns.

use std::process::Command;

use railnet_agent::rdma::{NetnsMode, RdmaNetlink, Request};
use railnet_tests::{Agent, Netns, RailFabric, cni};
use serde_json::Value;

const NEEDS_RDMA: &str = "needs a kernel with RDMA: cargo xtask test runs it under qemu";

/// [`railnet_tests::sh`] (panics with the output on failure), returning
/// what the command printed.
#[track_caller]
fn sh(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&railnet_tests::sh(cmd).stdout).into_owned()
}

/// A soft-RoCE device on a dummy netdev inside `ns`, removed on drop.
struct Rxe {
    name: String,
}

impl Rxe {
    #[track_caller]
    fn on_dummy(ns: &Netns, netdev: &str, name: &str) -> Self {
        ns.ip(&["link", "add", netdev, "type", "dummy"]);
        ns.ip(&["link", "set", netdev, "up"]);
        soft_device(ns, "rxe", netdev, name)
    }
}

impl Drop for Rxe {
    fn drop(&mut self) {
        let _ = Command::new("rdma")
            .args(["link", "delete", &self.name])
            .output();
    }
}

/// Our socket, opened inside `ns` (a device's netdev is reported only to
/// a socket in the netdev's netns).
fn in_ns<T: Send + 'static>(
    ns: &Netns,
    work: impl FnOnce(&mut RdmaNetlink) -> T + Send + 'static,
) -> T {
    ns.run(move || work(&mut RdmaNetlink::open().expect("RDMA netlink")))
}

fn rdma_json(ns: &Netns, args: &[&str]) -> Value {
    let out = sh(Command::new("ip")
        .args(["netns", "exec", ns.name(), "rdma", "-j"])
        .args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rdma -j {args:?}: {e}: {out}"))
}

fn guid(g: u64) -> String {
    // rdma prints the GUID as four big-endian 16-bit groups.
    let b = g.to_be_bytes();
    format!(
        "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_our_dump_equals_rdma_dev_and_rdma_link() {
    let _ = NEEDS_RDMA;
    let ns = Netns::new("dump");
    let _a = Rxe::on_dummy(&ns, "rail1", "rxedump1");
    let _b = Rxe::on_dummy(&ns, "rail2", "rxedump2");

    let (devices, links) = in_ns(&ns, |nl| (nl.devices().unwrap(), nl.links().unwrap()));
    let theirs = rdma_json(&ns, &["dev"]);
    let theirs = theirs.as_array().unwrap();
    assert_eq!(devices.len(), theirs.len(), "{devices:?}\n{theirs:?}");
    for (ours, t) in devices.iter().zip(theirs) {
        assert_eq!(ours.index as u64, t["ifindex"].as_u64().unwrap());
        assert_eq!(ours.name, t["ifname"].as_str().unwrap());
        assert_eq!(
            guid(ours.node_guid.unwrap()),
            t["node_guid"].as_str().unwrap()
        );
        assert_eq!(ours.node_type, Some(1), "rdma says {}", t["node_type"]);
    }
    let theirs = rdma_json(&ns, &["link"]);
    let theirs = theirs.as_array().unwrap();
    assert_eq!(links.len(), theirs.len(), "{links:?}\n{theirs:?}");
    for (ours, t) in links.iter().zip(theirs) {
        assert_eq!(ours.device, t["ifname"].as_str().unwrap());
        assert_eq!(ours.port as u64, t["port"].as_u64().unwrap());
        assert_eq!(ours.netdev.as_deref(), t["netdev"].as_str());
        assert_eq!(ours.netdev_index.map(u64::from), t["netdev_index"].as_u64());
        assert_eq!(ours.state == Some(4), t["state"] == "ACTIVE");
    }
    assert!(links.iter().any(|p| p.netdev.as_deref() == Some("rail2")));
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_mode_reads_like_rdma_system() {
    let ns = Netns::new("mode");
    let ours = in_ns(&ns, |nl| nl.netns_mode().unwrap());
    let theirs = sh(Command::new("rdma").arg("system"));
    assert!(theirs.contains("netns shared"), "{theirs}");
    assert_eq!(ours, NetnsMode::Shared);
    // Setting the mode it already has is accepted even with netns around;
    // changing it is not, and says what to do instead.
    in_ns(&ns, |nl| nl.set_netns_mode(NetnsMode::Shared)).unwrap();
    let err = in_ns(&ns, |nl| nl.set_netns_mode(NetnsMode::Exclusive)).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EBUSY), "{err}");
    assert!(
        err.to_string().contains("options ib_core netns_mode=0"),
        "{err}"
    );
    assert!(sh(Command::new("rdma").arg("system")).contains("netns shared"));
}

/// The netlink messages `rdma <args>` sends (run in the guest; rdma sends
/// one message per sendto).
fn rdma_sends(ns: &Netns, args: &[&str]) -> Vec<Vec<u8>> {
    railnet_tests::netlink_sends(ns, "rdma", args)
}

fn message_type(m: &[u8]) -> u16 {
    u16::from_ne_bytes([m[4], m[5]])
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_requests_are_byte_for_byte_what_iproute2_sends() {
    let ns = Netns::new("golden");
    let target = Netns::new("golden-target");
    let _rxe = Rxe::on_dummy(&ns, "rail1", "rxegold");
    let dev = in_ns(&ns, |nl| nl.device("rxegold").unwrap());
    let cases: Vec<(Vec<&str>, Request)> = vec![
        (vec!["dev"], Request::Devices),
        (
            vec!["link", "show", "rxegold/1"],
            Request::Port {
                device: dev.index,
                port: 1,
            },
        ),
        (vec!["system"], Request::SystemGet),
        (
            vec!["system", "set", "netns", "shared"],
            Request::SystemSetNetnsMode(NetnsMode::Shared),
        ),
        (
            vec!["statistic", "show", "link", "rxegold/1"],
            Request::Counters {
                device: dev.index,
                port: 1,
            },
        ),
        (
            vec!["dev", "set", "rxegold", "netns", target.name()],
            Request::MoveDevice {
                device: dev.index,
                netns_fd: 0,
            },
        ),
        // Last: it really renames the device (renamed back below).
        (
            vec!["dev", "set", "rxegold", "name", "rxegold2"],
            Request::RenameDevice {
                device: dev.index,
                name: {
                    let mut n = [0u8; 64];
                    n[..8].copy_from_slice(b"rxegold2");
                    n
                },
            },
        ),
    ];
    for (args, ours) in cases {
        let sent = rdma_sends(&ns, &args);
        let probe = ours.encode(0);
        let ty = message_type(&probe);
        // rdma first dumps the devices to find indexes (and `rdma dev`
        // then asks for each one): the message for the operation itself
        // is the last of its type and flags.
        let theirs = sent
            .iter()
            .rev()
            .find(|m| message_type(m) == ty && m[6..8] == probe[6..8])
            .unwrap_or_else(|| panic!("rdma {args:?} sent no message of type {ty:#x}: {sent:x?}"));
        let seq = u32::from_ne_bytes(theirs[8..12].try_into().unwrap());
        let mut mine = ours.encode(seq);
        let mut theirs = theirs.clone();
        if let Request::MoveDevice { .. } = ours {
            // The netns fd is a number in each sender's own fd table.
            mine[28..32].fill(0);
            theirs[28..32].fill(0);
        }
        assert_eq!(
            mine, theirs,
            "rdma {args:?}: ours {mine:02x?}\ntheirs {theirs:02x?}"
        );
    }
    // Our rename, for real: the name a device had before a dead pod netns
    // gave it back under another.
    let listed = |name: &'static str| {
        rdma_json(&ns, &["dev"])
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["ifname"] == name)
    };
    assert!(listed("rxegold2"), "iproute2's rename did not happen");
    in_ns(&ns, |nl| {
        let dev = nl.device("rxegold2").unwrap();
        nl.rename_device(&dev, "rxegold")
    })
    .unwrap();
    assert!(
        listed("rxegold") && !listed("rxegold2"),
        "our rename did not happen"
    );
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_a_move_is_refused_with_the_reason() {
    let ns = Netns::new("move");
    let pod = Netns::new("move-pod");
    let _rxe = Rxe::on_dummy(&ns, "rail1", "rxemove");
    let pod_fd = std::fs::File::open(pod.path()).unwrap();
    let err = in_ns(&ns, move |nl| {
        let dev = nl.device("rxemove").unwrap();
        use std::os::fd::AsRawFd;
        nl.move_device(&dev, pod_fd.as_raw_fd())
    })
    .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EOPNOTSUPP), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("rxemove"), "{msg}");
    assert!(msg.contains("shared mode"), "{msg}");
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_counters_are_read() {
    let ns = Netns::new("stats");
    let _rxe = Rxe::on_dummy(&ns, "rail1", "rxestat");
    let counters = in_ns(&ns, |nl| {
        let dev = nl.device("rxestat").unwrap();
        nl.counters(&dev, 1).unwrap()
    });
    let names: Vec<&str> = counters.iter().map(|(n, _)| n.as_str()).collect();
    let theirs = rdma_json(&ns, &["statistic", "show", "link", "rxestat/1"]);
    let theirs = theirs[0].as_object().unwrap();
    for (name, value) in &counters {
        assert_eq!(
            theirs.get(name).and_then(Value::as_u64),
            Some(*value),
            "{name}"
        );
    }
    assert!(names.contains(&"sent_pkts"), "{names:?}");
}

fn doctor(args: &[&str]) -> (bool, String) {
    let bin = railnet_tests::binary("RAILNET_CTL_BIN", "railnetctl");
    let out = Command::new(bin).arg("doctor").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_doctor_reports_mode_link_layer_and_mtu() {
    // The guest's own root netns (a qemu guest of this test run): doctor
    // looks at the host side of a node.
    let _ = Command::new("ip").args(["link", "del", "docrail"]).output();
    sh(Command::new("ip").args(["link", "add", "docrail", "type", "dummy"]));
    sh(Command::new("ip").args(["link", "set", "docrail", "mtu", "1500", "up"]));
    sh(Command::new("rdma").args(["link", "add", "rxedoc", "type", "rxe", "netdev", "docrail"]));
    let _rxe = Rxe {
        name: "rxedoc".into(),
    };
    let (ok, out) = doctor(&["--expect", "shared"]);
    assert!(out.contains("ok    RDMA netns mode is shared"), "{out}");
    assert!(
        out.contains("rxedoc/1: link layer Ethernet, state ACTIVE, netdev docrail"),
        "{out}"
    );
    assert!(
        out.contains("docrail: MTU 1500 limits RoCE to MTU 1024"),
        "{out}"
    );
    assert!(out.contains("nvidia_peermem"), "{out}");
    // Lossless RoCE: a dummy netdev has no DCB support, which is said and
    // is no failure; the ToS RDMA-CM uses is read from its configfs.
    assert!(out.contains("WARN  docrail: no DCB support"), "{out}");
    assert!(out.contains("rxedoc/1: RDMA-CM RoCE ToS"), "{out}");
    assert!(ok, "only warnings: {out}");
    sh(Command::new("ip").args(["link", "set", "docrail", "mtu", "9000"]));
    let (ok, out) = doctor(&["--expect", "exclusive"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL  RDMA netns mode is shared; these networks need exclusive"),
        "{out}"
    );
    assert!(out.contains("options ib_core netns_mode=0"), "{out}");
    assert!(
        out.contains("docrail: MTU 9000 allows RoCE MTU 4096"),
        "{out}"
    );
    let _ = Command::new("ip").args(["link", "del", "docrail"]).output();
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn exclusive_a_move_reaches_the_driver_and_is_explained() {
    assert_eq!(
        RdmaNetlink::open().unwrap().netns_mode().unwrap(),
        NetnsMode::Exclusive
    );
    assert!(sh(Command::new("rdma").arg("system")).contains("netns exclusive"));
    let ns = Netns::new("xmove");
    let pod = Netns::new("xmove-pod");
    // In exclusive mode a new device belongs to the initial netns, where
    // the agent runs; its netdev may live elsewhere.
    let _rxe = Rxe::on_dummy(&ns, "rail1", "rxexmove");
    let mut nl = RdmaNetlink::open().unwrap();
    let dev = nl.device("rxexmove").unwrap();
    // Not a netns fd: the kernel says so before looking at the driver.
    let null = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsRawFd;
    let err = nl.move_device(&dev, null.as_raw_fd()).unwrap_err();
    assert_ne!(err.errno(), Some(libc::EOPNOTSUPP), "{err}");
    // A netns fd: accepted, and the driver (rxe has no disassociate) says no.
    let pod_fd = std::fs::File::open(pod.path()).unwrap();
    let err = nl.move_device(&dev, pod_fd.as_raw_fd()).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EOPNOTSUPP), "{err}");
    assert!(err.to_string().contains("cannot change netns"), "{err}");
    // In exclusive mode the pod netns does not see host devices.
    let seen = in_ns(&pod, |nl| nl.devices().unwrap());
    assert!(seen.iter().all(|d| d.name != "rxexmove"), "{seen:?}");
}

/// An isolated device's counters are read inside the netns it was moved
/// to, where alone it is visible in exclusive mode, and labelled with the
/// pod holding it. No driver here can move a device (rxe and siw answer
/// EOPNOTSUPP), so the record a successful move writes is planted, and the
/// "pod" netns holding the device is the initial one — where a new device
/// lives in exclusive mode — while the agent runs in its node's netns, from
/// which, exactly as from a host for a moved device, it cannot be seen.
#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn exclusive_an_isolated_device_s_counters_are_read_in_its_pod_netns() {
    use std::os::unix::fs::MetadataExt;

    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let _rxe = Rxe::on_dummy(node, "rdmaiso", "rxeiso");
    let agent = Agent::start(node, &fabric.pools(0));
    let seen = in_ns(node, |nl| nl.devices().unwrap());
    assert!(
        seen.iter().all(|d| d.name != "rxeiso"),
        "the agent's netns must not see the device: {seen:?}"
    );
    let counted = || {
        agent
            .scrape(node, "/metrics")
            .lines()
            .filter(|l| {
                l.starts_with("railnet_rdma_port_hw_counter_total{")
                    && l.contains("device=\"rxeiso\"")
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(counted().is_empty(), "{:?}", counted());
    let records = agent.state_path().parent().unwrap().join("vfs");
    std::fs::create_dir_all(&records).unwrap();
    let inode = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let record = railnet_agent::sriov::RdmaRecord {
        pci_address: "0000:3b:00.2".into(),
        device: "rxeiso".into(),
        holder: railnet_agent::sriov::Holder {
            pod: "default/trainer-0".into(),
            interface: "net1".into(),
        },
        netns_inode: inode,
    };
    railnet_agent::sriov::save(&records, "rdma", "iso", "net1", &record).unwrap();
    let lines = counted();
    assert!(!lines.is_empty(), "no counters of rxeiso:\n{}", agent.log());
    for l in &lines {
        assert!(
            l.contains("pod=\"default/trainer-0\"") && l.contains("interface=\"net1\""),
            "{l}"
        );
    }
    // The record gone (DEL gave the device back): not looked for any more.
    railnet_agent::sriov::forget(&records, "rdma", "iso", "net1");
    assert!(counted().is_empty(), "{:?}", counted());
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn exclusive_an_isolated_device_s_gid_index_is_read_in_its_netns() {
    use railnet_agent::rdma::{roce_gid_index, roce_gid_index_in};
    use std::os::fd::AsFd;

    // In exclusive mode a soft-RoCE device stays in the initial netns while
    // its netdev is in the node's — as an isolated VF's device is in its
    // pod while the agent reads from the host: the node's netns cannot see
    // it, the initial one can.
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let _rxe = Rxe::on_dummy(node, "rdmagid", "rxegid");
    node.ip(&["addr", "add", "172.16.1.77/24", "dev", "rdmagid"]);
    let seen = in_ns(node, |nl| nl.devices().unwrap());
    assert!(seen.iter().all(|d| d.name != "rxegid"), "{seen:?}");
    let addr: std::net::Ipv4Addr = "172.16.1.77".parse().unwrap();
    // What the initial netns's own sysfs says (the test runs there, its
    // /sys mounted there).
    let expected = roce_gid_index("rxegid", 1, addr).expect("a RoCE GID for 172.16.1.77");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();

    let initial = std::fs::File::open("/proc/1/ns/net").unwrap();
    let node_ns = std::fs::File::open(node.path()).unwrap();
    // A reader whose /sys shows the node's netns, as a host's /sys does not
    // show a device isolated in a pod: a thread with a mount namespace of
    // its own, the node's sysfs mounted over /sys.
    let (host_view, from_initial, from_node) = std::thread::spawn(move || {
        use nix::mount::{MsFlags, mount};
        use nix::sched::{CloneFlags, setns, unshare};
        unshare(CloneFlags::CLONE_NEWNS).unwrap();
        let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
        mount(None::<&str>, "/", None::<&str>, private, None::<&str>).unwrap();
        setns(&node_ns, CloneFlags::CLONE_NEWNET).unwrap();
        let none = MsFlags::empty();
        mount(Some("sysfs"), "/sys", Some("sysfs"), none, None::<&str>).unwrap();
        (
            roce_gid_index("rxegid", 1, addr),
            roce_gid_index_in(initial.as_fd(), "rxegid", 1, addr),
            roce_gid_index_in(node_ns.as_fd(), "rxegid", 1, addr),
        )
    })
    .join()
    .unwrap();
    assert_eq!(host_view, None, "this reader's /sys must not show rxegid");
    assert_eq!(from_initial, Ok(Some(expected)));
    assert_eq!(
        from_node,
        Ok(None),
        "the node's netns does not see the device, so neither may its reading"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        mounts,
        "reading must leave the host's mounts as they were"
    );
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn exclusive_mode_change_while_pods_exist_says_how() {
    let _pod = Netns::new("xbusy");
    let err = RdmaNetlink::open()
        .unwrap()
        .set_netns_mode(NetnsMode::Shared)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EBUSY), "{err}");
    assert!(err.to_string().contains("reboot"), "{err}");
    let (ok, out) = doctor(&["--expect", "exclusive"]);
    assert!(out.contains("ok    RDMA netns mode is exclusive"), "{out}");
    assert!(
        out.contains("WARN  netns mode exclusive is not persisted"),
        "{out}"
    );
    let _ = ok;
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_add_uses_the_masters_device_and_refuses_a_master_without_one() {
    let fabric = RailFabric::new(1, 2);
    let node = &fabric.nodes[0];
    // Rail 1's NIC has a (soft) RoCE device; rail 2's has none.
    sh(Command::new("ip").args([
        "netns",
        "exec",
        node.name(),
        "rdma",
        "link",
        "add",
        "rxeadd1",
        "type",
        "rxe",
        "netdev",
        "eth1",
    ]));
    let _rxe = Rxe {
        name: "rxeadd1".into(),
    };
    let agent = Agent::start(node, &fabric.pools(0));
    let pod = fabric.pod(0);
    // Multus, for a network with the CNIDeviceInfoFile capability, names
    // a file the plugin fills and copies it into network-status.
    // (Multus's directory: the only place railnet writes device info; this
    // runs in the qemu guest.)
    let devinfo = std::path::PathBuf::from(format!(
        "/run/k8s.cni.cncf.io/devinfo/cni-test-{}",
        std::process::id()
    ));
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["runtimeConfig"] = serde_json::json!({
        "CNIDeviceInfoFile": devinfo.join("rail1-net1.json"),
    });
    let ok = cni("ADD", &conf, "rdma-shared", Some(&pod.ns.path()), "net1");
    assert!(ok.ok, "{}", ok.stdout);
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(devinfo.join("rail1-net1.json")).expect("device-info file"),
    )
    .unwrap();
    assert_eq!(info["type"], "pci");
    assert_eq!(info["version"], "1.1.0");
    assert_eq!(info["pci"]["rdma-device"], "rxeadd1");
    let _ = std::fs::remove_dir_all(&devinfo);
    let log = agent.log();
    assert!(
        log.contains("pod shares the master's RDMA device") && log.contains("rxeadd1"),
        "{log}"
    );
    // The GID the kernel made from the pod's address, as NCCL needs it.
    let addr = ok.json["ips"][0]["address"].as_str().unwrap();
    let addr: std::net::Ipv4Addr = addr.split('/').next().unwrap().parse().unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("pod shares the master's RDMA device"))
        .unwrap();
    let index: u32 = line
        .split("gid_index=Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no GID index in {line}"));
    let gid = std::fs::read_to_string(format!(
        "/sys/class/infiniband/rxeadd1/ports/1/gids/{index}"
    ))
    .unwrap();
    assert_eq!(
        gid.trim().parse::<std::net::Ipv6Addr>().unwrap(),
        addr.to_ipv6_mapped(),
        "GID {index} is not the pod's address"
    );
    // The workload's NCCL settings name that device and that GID index.
    let env = std::fs::read_to_string(agent.pod_info("uid-rdma-shared").join("nccl.env")).unwrap();
    assert!(env.contains("export NCCL_IB_HCA='=rxeadd1:1'\n"), "{env}");
    assert!(
        env.contains(&format!("export NCCL_IB_GID_INDEX={index}\n")),
        "{env}"
    );
    let before = agent.allocations(node);
    let no = cni(
        "ADD",
        &fabric.netconf(2, &agent, "ebpf"),
        "rdma-shared",
        Some(&pod.ns.path()),
        "net2",
    );
    assert!(!no.ok, "{}", no.stdout);
    assert_eq!(no.json["code"], 7, "{}", no.stdout);
    let msg = no.json["msg"].as_str().unwrap();
    assert!(msg.contains("master eth2 has no RDMA device"), "{msg}");
    let details = no.json["details"].as_str().unwrap();
    assert!(details.contains("eth1 (rxeadd1/1)"), "{details}");
    assert!(!pod.ns.has_link("net2"), "a refused ADD left net2");
    assert_eq!(
        agent.allocations(node),
        before,
        "a refused ADD kept an address"
    );
}

/// A one-node fabric, its agent, a pod whose `net1` an earlier plugin made
/// (a dummy standing in for sriov-cni's VF), and the chained config with
/// `rdmaIsolation` for the VF at 0000:3b:00.2.
fn isolated_vf_pod() -> (RailFabric, Agent, railnet_tests::FabricPod, Value) {
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let pod = fabric.pod(0);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "chained".into();
    conf["rdmaIsolation"] = true.into();
    conf["deviceID"] = "0000:3b:00.2".into();
    pod.ns.ip(&["link", "add", "net1", "type", "dummy"]);
    (fabric, agent, pod, conf)
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_isolation_is_refused_before_anything_is_made() {
    let (fabric, agent, pod, conf) = isolated_vf_pod();
    let node = &fabric.nodes[0];
    let out = cni("ADD", &conf, "rdma-iso", Some(&pod.ns.path()), "net1");
    assert!(!out.ok, "{}", out.stdout);
    let msg = out.json["msg"].as_str().unwrap();
    assert!(msg.contains("RDMA netns mode is shared"), "{msg}");
    let details = out.json["details"].as_str().unwrap();
    assert!(
        details.contains("options ib_core netns_mode=0"),
        "{details}"
    );
    assert!(
        pod.ns
            .ip(&["-4", "addr", "show", "net1"])
            .lines()
            .all(|l| !l.contains("inet ")),
        "the refused interface got an address"
    );
    assert_eq!(agent.allocations(node), 0);
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn exclusive_isolation_of_a_vf_without_an_rdma_device_is_refused_cleanly() {
    let (fabric, agent, pod, conf) = isolated_vf_pod();
    let node = &fabric.nodes[0];
    let out = cni("ADD", &conf, "rdma-xiso", Some(&pod.ns.path()), "net1");
    assert!(!out.ok, "{}", out.stdout);
    let msg = out.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("no RDMA device for PCI address 0000:3b:00.2"),
        "{msg}"
    );
    assert_eq!(agent.allocations(node), 0);
}

/// Mode ib-sriov with isolation, in exclusive mode: the VF's RDMA device
/// (found by its PCI address in sysfs) is moved before its netdev, and a
/// driver that cannot move it (rxe: EOPNOTSUPP, as here) fails ADD with
/// the reason and leaves everything as it was: the VF's netdev in the node
/// under its name, no record, no address.
#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn exclusive_an_ib_vf_whose_device_cannot_move_is_refused_with_nothing_changed() {
    const BDF: &str = "0000:3b:00.4";
    // In exclusive mode only the initial netns sees the device, and the
    // agent runs there (hostNetwork), as on a node: the guest's.
    let exclusive = RdmaNetlink::open()
        .and_then(|mut nl| nl.netns_mode())
        .is_ok_and(|m| m == NetnsMode::Exclusive);
    let host = Netns::initial_in_guest("host", exclusive);
    let fabric = RailFabric::new(1, 1);
    let node = &host;
    node.ip(&["link", "add", "ib4v", "type", "dummy"]);
    let _rxe = Rxe::on_dummy(node, "rdmaib4", "rxeib4");
    let sysfs = railnet_tests::ScratchDir::new("sysfs");
    let pci = sysfs.path().join("bus/pci/devices").join(BDF);
    std::fs::create_dir_all(pci.join("net/ib4v")).unwrap();
    std::fs::create_dir_all(pci.join("infiniband/rxeib4")).unwrap();
    // A VF: its PF's function (no PF netdev needed without VF attributes).
    std::fs::create_dir_all(sysfs.path().join("bus/pci/devices/0000:3b:00.0")).unwrap();
    std::os::unix::fs::symlink("../0000:3b:00.0", pci.join("physfn")).unwrap();
    let agent = Agent::start_with(
        node,
        &fabric.pools(0),
        &["--sysfs-root", sysfs.path().to_str().unwrap()],
    );
    let pod = fabric.pod(0);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "ib-sriov".into();
    conf["rdmaIsolation"] = true.into();
    conf["deviceID"] = BDF.into();
    let out = cni("ADD", &conf, "ib-xiso", Some(&pod.ns.path()), "net1");
    assert!(!out.ok, "{}", out.stdout);
    let text = format!("{} {}", out.json["msg"], out.json["details"]);
    assert!(
        text.contains("rxeib4") && text.contains("cannot change netns"),
        "{text}"
    );
    assert!(node.has_link("ib4v") && !pod.ns.has_link("net1"));
    let records = agent.state_path().parent().unwrap().join("vfs");
    let left: Vec<_> = std::fs::read_dir(&records)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "records left: {left:?}");
    assert_eq!(agent.allocations(node), 0);
    drop(agent);
    for dev in ["ib4v", "rdmaib4"] {
        node.ip(&["link", "del", dev]);
    }
}

/// `railnet_rdma_port_hw_counter_total` of one device and counter.
/// In shared mode a VF's RDMA device stays in the host while its netdev
/// goes to the pod (mode sriov): the device's counters carry the pod and
/// interface holding it — found by PCI address (sysfs) in the VF records —
/// and lose them when DEL gives the VF back. Every pod sees every VF's
/// device in shared mode, so the pod's NCCL settings name its own.
#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_a_vf_s_rdma_device_is_the_pod_s_for_nccl_and_its_counters() {
    const BDF: &str = "0000:3b:00.3";
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    railnet_tests::veth_between(node, "ens1f0v3", fabric.router(1), "vf3r");
    fabric
        .router(1)
        .ip(&["link", "set", "vf3r", "master", "br0", "up"]);
    // The VF's RDMA device: a soft device cannot follow its netdev into
    // another netns (the move unregisters the netdev, and rxe with it), so
    // it sits on a dummy of its own; sysfs ties both to the VF's PCI
    // function, as a real VF's are.
    let _rxe = Rxe::on_dummy(node, "rdmavf3", "rxevf3");
    let sysfs = railnet_tests::ScratchDir::new("sysfs");
    let pci = sysfs.path().join("bus/pci/devices").join(BDF);
    std::fs::create_dir_all(pci.join("net/ens1f0v3")).unwrap();
    std::fs::create_dir_all(sysfs.path().join("bus/pci/devices/0000:3b:00.0")).unwrap();
    std::os::unix::fs::symlink("../0000:3b:00.0", pci.join("physfn")).unwrap();
    // Both ways, as sysfs has them: the function's device, the device's
    // function.
    std::fs::create_dir_all(pci.join("infiniband/rxevf3")).unwrap();
    let ib = sysfs.path().join("class/infiniband/rxevf3");
    std::fs::create_dir_all(&ib).unwrap();
    std::os::unix::fs::symlink(&pci, ib.join("device")).unwrap();
    let agent = Agent::start_with(
        node,
        &fabric.pools(0),
        &["--sysfs-root", sysfs.path().to_str().unwrap()],
    );
    let labels = || {
        let text = agent.scrape(node, "/metrics");
        text.lines()
            .find(|l| {
                l.starts_with("railnet_rdma_port_hw_counter_total{")
                    && l.contains("device=\"rxevf3\"")
            })
            .unwrap_or_else(|| panic!("no counters of rxevf3 in:\n{text}\n{}", agent.log()))
            .to_owned()
    };
    let free = labels();
    assert!(free.contains("pod=\"\""), "{free}");
    // The port's state, as the RailnetRdmaPortDown alert reads it: its
    // netdev down takes it out of ACTIVE, up brings it back.
    let active = || {
        let text = agent.scrape(node, "/metrics");
        text.lines()
            .find(|l| l.starts_with("railnet_rdma_port_active{") && l.contains("device=\"rxevf3\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u8>().ok())
            .unwrap_or_else(|| panic!("no railnet_rdma_port_active of rxevf3 in:\n{text}"))
    };
    assert_eq!(active(), 1);
    node.ip(&["link", "set", "rdmavf3", "down"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while active() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(active(), 0, "a port whose netdev is down is not ACTIVE");
    node.ip(&["link", "set", "rdmavf3", "up"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while active() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(active(), 1);
    let pod = fabric.pod(0);
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "sriov".into();
    conf["deviceID"] = BDF.into();
    let add = cni("ADD", &conf, "vf-rdma", Some(&pod.ns.path()), "net1");
    assert!(add.ok, "{}\n{}", add.stdout, agent.log());
    let held = labels();
    assert!(
        held.contains("pod=\"default/demo\"") && held.contains("interface=\"net1\""),
        "{held}"
    );
    let env = std::fs::read_to_string(agent.pod_info("uid-vf-rdma").join("nccl.env")).unwrap();
    assert!(
        env.contains("export NCCL_IB_HCA='=rxevf3:1'\n"),
        "the pod's NCCL settings do not name its VF's RDMA device:\n{env}\n{}",
        agent.log()
    );
    assert!(cni("DEL", &conf, "vf-rdma", Some(&pod.ns.path()), "net1").ok);
    let back = labels();
    assert!(back.contains("pod=\"\""), "{back}");
}

fn hw_counter(agent: &Agent, node: &Netns, device: &str, counter: &str) -> u64 {
    let text = agent.scrape(node, "/metrics");
    text.lines()
        .filter(|l| l.starts_with("railnet_rdma_port_hw_counter_total{"))
        .find(|l| {
            l.contains(&format!("device=\"{device}\""))
                && l.contains(&format!("counter=\"{counter}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {counter} of {device} in:\n{text}"))
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_metrics_count_real_rdma_traffic() {
    // Linux 6.1's rxe sends and receives through a UDP socket of the
    // initial netns only, so real RDMA traffic here runs there: this is
    // the qemu guest of this test run, whose root netns is the test's own.
    let _ = Command::new("ip").args(["link", "del", "rdmet0"]).output();
    sh(Command::new("ip").args(["link", "add", "rdmet0", "type", "dummy"]));
    sh(Command::new("ip").args(["addr", "add", "10.79.0.1/24", "dev", "rdmet0"]));
    sh(Command::new("ip").args(["link", "set", "rdmet0", "up"]));
    sh(Command::new("rdma").args(["link", "add", "rxemet", "type", "rxe", "netdev", "rdmet0"]));
    let _rxe = Rxe {
        name: "rxemet".into(),
    };
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let agent = Agent::start(node, &fabric.pools(0));
    let before = hw_counter(&agent, node, "rxemet", "sent_pkts");

    let mut server = Command::new("rping")
        .args(["-s", "-a", "10.79.0.1", "-C", "5"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("rping server");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let client = Command::new("timeout")
        .args(["60", "rping", "-c", "-a", "10.79.0.1", "-C", "5", "-v"])
        .output()
        .expect("rping client");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        client.status.success(),
        "rping failed: {}{}",
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&client.stderr)
    );
    let after = hw_counter(&agent, node, "rxemet", "sent_pkts");
    assert!(
        after >= before + 10,
        "5 rping rounds sent {} packets by the agent's count ({before} -> {after})",
        after - before
    );
    let _ = Command::new("ip").args(["link", "del", "rdmet0"]).output();
}

/// A soft RDMA device (`kind`: rxe or siw) on `netdev` inside `ns`,
/// removed on drop.
fn soft_device(ns: &Netns, kind: &str, netdev: &str, name: &str) -> Rxe {
    sh(Command::new("ip").args([
        "netns",
        "exec",
        ns.name(),
        "rdma",
        "link",
        "add",
        name,
        "type",
        kind,
        "netdev",
        netdev,
    ]));
    Rxe { name: name.into() }
}

/// One pod on each of the fabric's two nodes, rails 1 and 2 added through
/// the CNI; their addresses, by pod then rail.
fn two_pods_on_two_rails(
    fabric: &RailFabric,
    agents: &[Agent],
    tag: &str,
) -> ([railnet_tests::FabricPod; 2], [Vec<String>; 2]) {
    let pods = [fabric.pod(0), fabric.pod(1)];
    let mut addr = [Vec::new(), Vec::new()];
    for (n, pod) in pods.iter().enumerate() {
        for k in 1..=2 {
            let out = cni(
                "ADD",
                &fabric.netconf(k, &agents[n], "ebpf"),
                &format!("{tag}-{n}"),
                Some(&pod.ns.path()),
                &format!("net{k}"),
            );
            assert!(out.ok, "{}", out.stdout);
            let a = out.json["ips"][0]["address"].as_str().unwrap();
            addr[n].push(a.split('/').next().unwrap().to_owned());
        }
    }
    (pods, addr)
}

/// An `rping -s` in `ns` on `address`, for one connection (`-v`: it
/// prints the payload it got).
fn rping_server(ns: &Netns, address: &str) -> std::process::Child {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "timeout",
            "60",
            "rping",
            "-s",
            "-v",
        ])
        .args(["-a", address, "-C", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("rping server");
    std::thread::sleep(std::time::Duration::from_secs(1));
    child
}

/// What `rping -c` printed, from pod `ns`, bound to `src`, to `dst`.
fn rping_from(ns: &Netns, src: &str, dst: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "timeout",
            "30",
            "rping",
            "-c",
            "-v",
        ])
        .args(["-a", dst, "-I", src, "-C", "1"])
        .output()
        .expect("rping");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_rdma_cm_resolves_the_peer_through_the_rails_routes() {
    // Linux 6.1's rxe sends and receives through a UDP socket of the
    // initial netns only (seen: a connect from a pod netns ends in
    // RDMA_CM_EVENT_UNREACHABLE at once), so with soft RoCE this shows the
    // part railnet owns: the RDMA CM resolves a peer on another rail
    // through the rail's route (the source address binds the lookup to its
    // rail device), and fails to without it. Real traffic between pods:
    // the soft-iWARP test below.
    let fabric = RailFabric::new(2, 2);
    let mut rxes = Vec::new();
    for (n, node) in fabric.nodes.iter().enumerate() {
        for k in 1..=2 {
            rxes.push(soft_device(
                node,
                "rxe",
                &format!("eth{k}"),
                &format!("rxecm{n}{k}"),
            ));
        }
    }
    let agents: Vec<Agent> = (0..2)
        .map(|n| Agent::start(&fabric.nodes[n], &fabric.pools(n)))
        .collect();
    let (pods, addr) = two_pods_on_two_rails(&fabric, &agents, "cm");
    // Pod A's rail-1 address to pod B's rail-2 address: across both rail
    // routers and the spine.
    let (src, dst) = (addr[0][0].clone(), addr[1][1].clone());
    let mut server = rping_server(&pods[1].ns, &dst);
    let with = rping_from(&pods[0].ns, &src, &dst);
    assert!(
        !with.contains("ADDR_ERROR") && !with.contains("ROUTE_ERROR"),
        "resolution failed with railnet's routes:\n{with}"
    );
    assert!(
        with.contains("RDMA_CM_EVENT_UNREACHABLE") || with.contains("ping data"),
        "rping did not reach the connect step:\n{with}"
    );
    for k in 1..=2 {
        pods[0]
            .ns
            .ip(&["route", "del", "172.16.0.0/16", "dev", &format!("net{k}")]);
    }
    let without = rping_from(&pods[0].ns, &src, &dst);
    assert!(
        without.contains("RDMA_CM_EVENT_ADDR_ERROR"),
        "resolved without the rail routes:\n{without}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// Real RDMA traffic between two pods' rails. Soft iWARP (siw, built for
/// the guest kernel by the VM setup) opens its TCP sockets in the netns of
/// the process that connects — unlike rxe — so a siw device on each pod's
/// rail interface carries real RDMA (rping: connect, RDMA READ/WRITE, the
/// payload checked) from pod A's rail 1 to pod B's rail 2, across both
/// rail routers; with railnet's per-rail routes removed from pod A the
/// same rping cannot resolve its peer.
#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_pods_exchange_real_rdma_traffic_across_the_rails() {
    let fabric = RailFabric::new(2, 2);
    let agents: Vec<Agent> = (0..2)
        .map(|n| Agent::start(&fabric.nodes[n], &fabric.pools(n)))
        .collect();
    let (pods, addr) = two_pods_on_two_rails(&fabric, &agents, "iw");
    // After the ADDs (the masters have no RDMA device here; the agent
    // refuses a master without one once the node has any).
    let mut devices = Vec::new();
    for (n, pod) in pods.iter().enumerate() {
        for k in 1..=2 {
            devices.push(soft_device(
                &pod.ns,
                "siw",
                &format!("net{k}"),
                &format!("siwp{n}{k}"),
            ));
        }
    }
    let (src, dst) = (addr[0][0].clone(), addr[1][1].clone());
    let server = rping_server(&pods[1].ns, &dst);
    let (rail1_before, rail2_before) = (
        fabric.router(1).rx_packets("n0"),
        fabric.router(2).rx_packets("n1"),
    );
    let with = rping_from(&pods[0].ns, &src, &dst);
    assert!(
        with.contains("ping data: rdma-ping-0: ABCDEFGHIJ"),
        "no RDMA traffic from pod A rail 1 ({src}) to pod B rail 2 ({dst}):\n{with}"
    );
    let served = server.wait_with_output().expect("rping server");
    let served = String::from_utf8_lossy(&served.stdout);
    assert!(
        served.contains("server ping data: rdma-ping-0: ABCDEFGHIJ"),
        "the server did not see the payload:\n{served}"
    );
    // It went out on pod A's rail 1 and in on pod B's rail 2.
    assert!(fabric.router(1).rx_packets("n0") > rail1_before);
    assert!(fabric.router(2).rx_packets("n1") > rail2_before);
    for k in 1..=2 {
        pods[0]
            .ns
            .ip(&["route", "del", "172.16.0.0/16", "dev", &format!("net{k}")]);
    }
    let mut server = rping_server(&pods[1].ns, &dst);
    let without = rping_from(&pods[0].ns, &src, &dst);
    assert!(
        !without.contains("ping data") && without.contains("ERROR"),
        "RDMA traffic without the rail routes:\n{without}"
    );
    let _ = server.kill();
    let _ = server.wait();
    drop(devices);
}

#[test]
#[ignore = "needs a kernel with RDMA: cargo xtask test runs it under qemu"]
fn shared_a_device_back_under_another_name_gets_its_own_back() {
    // A VF's RDMA device that a dead pod netns returned as "rxeback2": the
    // PCI → device link comes from a sysfs tree of this test's (there is no
    // PCI device here), the rename is real.
    let ns = Netns::new("back");
    let _rxe = Rxe::on_dummy(&ns, "rail1", "rxeback2");
    let sysfs = railnet_tests::ScratchDir::new("sysfs");
    std::fs::create_dir_all(
        sysfs
            .path()
            .join("bus/pci/devices/0000:3b:00.4/infiniband/rxeback2"),
    )
    .unwrap();
    let root = sysfs.path().to_path_buf();
    let renamed = in_ns(&ns, move |_| {
        railnet_agent::rdma::restore_name(
            &root,
            "0000:3b:00.4",
            "rxeback",
            std::time::Duration::from_secs(2),
        )
    })
    .unwrap();
    assert!(renamed);
    let names: Vec<String> = rdma_json(&ns, &["dev"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["ifname"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.contains(&"rxeback".to_owned()), "{names:?}");
    // Its Rxe guard deletes by the old name: delete the new one here.
    let _ = Command::new("rdma")
        .args(["link", "delete", "rxeback"])
        .output();
    // A PCI function with no RDMA device: the error says which and how long.
    let err = railnet_agent::rdma::restore_name(
        sysfs.path(),
        "0000:3b:00.5",
        "rxegone",
        std::time::Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(
        err.contains("0000:3b:00.5") && err.contains("did not come back"),
        "{err}"
    );
}
