//! The DRA stage: the agents publish their rail devices, the real
//! scheduler allocates a claim's rails, the kubelet has railnet prepare
//! them, and the pod that names the DRA network once gets exactly those
//! rails — addresses from their pools, routes, program — with the claim's
//! status saying so; a claim reaching for another namespace's rail network
//! is refused at prepare and wires nothing; deleting the pod undoes it all.

use std::time::Duration;

use railnet_tests::cluster::{Cluster, NS, RAILS, WORKLOAD, node_ip, rail_subnet, stand_in_nic};
use serde_json::{Value, json};

/// The namespace of the stage's claims, pods and RailNetworks.
pub const TEAM: &str = "dra-team";

/// A ResourceClaimTemplate in [`TEAM`] asking for one device of each of
/// `networks` (RailNetwork `ns/name`s), request `nic<i>`.
fn template(name: &str, networks: &[&str]) -> String {
    let requests: Vec<Value> = networks
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({"name": format!("nic{i}"), "exactly": {
                "deviceClassName": "rail.railnet.io",
                "selectors": [{"cel": {"expression":
                    format!("device.attributes[\"railnet.io\"].network == \"{n}\"")}}],
            }})
        })
        .collect();
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "namespace": TEAM},
        "spec": {"spec": {"devices": {"requests": requests}}},
    })
    .to_string()
}

/// A pod on `node` (chosen by the scheduler: it must allocate the claim)
/// with a claim from `template` and the DRA network named once.
fn pod(name: &str, node: &str, template: &str) -> String {
    pod_in(TEAM, name, node, template)
}

/// [`pod`] in namespace `ns`.
pub fn pod_in(ns: &str, name: &str, node: &str, template: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns,
                     "annotations": {"k8s.v1.cni.cncf.io/networks": format!("{NS}/railnet-dra")}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 1,
            "resourceClaims": [{"name": "rails", "resourceClaimTemplateName": template}],
            // The container names the claim: the kubelet shows its
            // devices' health, and hands its CDI devices (a VF's RDMA
            // nodes), only to the containers that use the claim.
            "containers": [{"name": "w", "image": WORKLOAD, "imagePullPolicy": "Never",
                            "command": ["sleep", "100000"],
                            "resources": {"claims": [{"name": "rails"}]}}],
        },
    })
    .to_string()
}

/// The health the kubelet shows for each of pod `name`'s rail devices
/// (`allocatedResourcesStatus` of its container, claim `rails`): device
/// name → (health, message).
fn device_health(c: &Cluster, name: &str) -> std::collections::BTreeMap<String, (String, String)> {
    let pod = c.kubectl_json(&["get", "pod", name, "-n", TEAM]);
    pod["status"]["containerStatuses"][0]["allocatedResourcesStatus"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "claim:rails")
        .flat_map(|s| s["resources"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| {
            let device = r["resourceID"].as_str()?.rsplit('/').next()?.to_owned();
            let health = r["health"].as_str()?.to_owned();
            Some((
                device,
                (health, r["message"].as_str().unwrap_or("").to_owned()),
            ))
        })
        .collect()
}

/// The pod's rail interfaces (`rail…`) with their IPv4 address and prefix,
/// sorted, and `ip -o -4 addr` as the pod printed it (for messages).
#[track_caller]
fn rail_addrs(c: &Cluster, ns: &str, pod: &str) -> (Vec<(String, String)>, String) {
    let addrs = crate::exec_in(c, ns, pod, &["ip", "-o", "-4", "addr"]).unwrap();
    let mut rails: Vec<(String, String)> = addrs
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ifname = f.get(1)?.trim_end_matches(':');
            let cidr = f.get(3)?;
            ifname
                .starts_with("rail")
                .then(|| (ifname.to_owned(), cidr.to_string()))
        })
        .collect();
    rails.sort();
    (rails, addrs)
}

/// The stage (see the module doc). The release runs with `dra.enabled`.
#[track_caller]
pub fn dra_stage(c: &mut Cluster) {
    c.kubectl_ok(&["create", "namespace", TEAM]);
    c.apply(&crate::rail_networks(TEAM));

    // Each agent publishes its node's devices of TEAM's RailNetworks: one
    // per rail, placed as sysfs places its NIC.
    for n in 0..c.nodes.len() {
        let slice_name = format!("node{n}-railnet-io-{TEAM}");
        let slice = c.wait_for(
            &format!("node{n}'s ResourceSlice of {TEAM}'s rails"),
            Duration::from_secs(60),
            // All of them: the agent may read the RailNetworks while
            // `kubectl apply` is still creating them (the next read adds
            // the rest).
            |c| {
                c.kubectl_try(&["get", "resourceslice", &slice_name, "-o", "json"])
                    .ok()
                    .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                    .filter(|s| {
                        s["spec"]["devices"].as_array().map(Vec::len) == Some(RAILS as usize)
                    })
            },
        );
        let spec = &slice["spec"];
        assert_eq!(spec["driver"], "railnet.io");
        assert_eq!(spec["nodeName"], format!("node{n}"));
        assert_eq!(spec["pool"]["name"], format!("node{n}/{TEAM}"));
        let devices = spec["devices"].as_array().unwrap();
        assert_eq!(devices.len(), RAILS as usize, "{slice}");
        for d in devices {
            let rail = d["attributes"]["rail"]["int"].as_u64().unwrap() as u32;
            let (root, bdf, numa) = stand_in_nic(rail);
            let a = &d["attributes"];
            assert_eq!(d["name"], format!("rail{rail}"));
            assert_eq!(a["netdev"]["string"], format!("eth{rail}"));
            assert_eq!(a["resource.kubernetes.io/pcieRoot"]["string"], root, "{d}");
            assert_eq!(a["resource.kubernetes.io/pciBusID"]["string"], bdf.as_str());
            assert_eq!(a["resource.kubernetes.io/numaNode"]["int"], numa);
            assert_eq!(a["network"]["string"], format!("{TEAM}/rail{rail}"));
        }
    }

    // A pod claiming rails 2 and 5 on node0 gets exactly those two.
    c.apply(&template(
        "two-rails",
        &[&format!("{TEAM}/rail2"), &format!("{TEAM}/rail5")],
    ));
    c.apply(&pod("dra-a", "node0", "two-rails"));
    let running = crate::wait_running(c, TEAM, "dra-a");
    let (rails, addrs) = rail_addrs(c, TEAM, "dra-a");
    assert_eq!(
        rails.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["rail2", "rail5"],
        "the pod's rail interfaces:\n{addrs}"
    );
    for (ifname, cidr) in &rails {
        let k: u32 = ifname[4..].parse().unwrap();
        let (subnet, _, _) = rail_subnet(k, 0);
        let prefix = subnet.rsplit_once('.').unwrap().0;
        assert!(
            cidr.starts_with(&format!("{prefix}.")),
            "{ifname} has {cidr}, not an address of rail{k}-node0 ({subnet})"
        );
    }
    let routes = crate::exec_in(c, TEAM, "dra-a", &["ip", "route"]).unwrap();
    for (ifname, _) in &rails {
        assert!(
            routes.contains(&format!("dev {ifname}")),
            "no route on {ifname}:\n{routes}"
        );
    }
    // The NAD path beside it, on the same NICs and pools: rails-a (node0,
    // eight rails through NADs) keeps its rails, and no address is both
    // its and dra-a's.
    let nad = crate::exec_in(c, "default", "rails-a", &["ip", "-o", "-4", "addr"]).unwrap();
    let nad_rails: Vec<&str> = nad
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|i| i.starts_with("net"))
        .collect();
    assert_eq!(nad_rails.len(), RAILS as usize, "rails-a's rails:\n{nad}");
    for (ifname, cidr) in &rails {
        let ip = cidr.split('/').next().unwrap();
        assert!(
            !nad.contains(&format!("inet {ip}/")),
            "dra-a's {ifname} got {ip}, which rails-a holds through its NAD:\n{nad}"
        );
    }
    // Multus's network status lists both, from the one DRA network.
    let status: Value = serde_json::from_str(
        running["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let listed: Vec<&str> = status
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == format!("{NS}/railnet-dra"))
        .filter_map(|s| s["interface"].as_str())
        .collect();
    assert_eq!(listed, ["rail2", "rail5"], "network-status: {status}");

    // The claim's status carries each device's interface and addresses.
    let claim_name = running["status"]["resourceClaimStatuses"][0]["resourceClaimName"]
        .as_str()
        .expect("the pod's generated claim")
        .to_owned();
    let devices = c.wait_for("the claim's network status", Duration::from_secs(30), |c| {
        let claim = c.kubectl_json(&["get", "resourceclaim", &claim_name, "-n", TEAM]);
        let devices = claim["status"]["devices"].as_array().cloned()?;
        (devices.len() == 2).then_some(devices)
    });
    for (ifname, cidr) in &rails {
        let entry = devices
            .iter()
            .find(|d| d["networkData"]["interfaceName"] == ifname.as_str())
            .unwrap_or_else(|| panic!("no status for {ifname}: {devices:?}"));
        assert_eq!(entry["driver"], "railnet.io");
        assert_eq!(entry["pool"], format!("node0/{TEAM}"));
        assert_eq!(entry["device"], ifname.as_str());
        assert_eq!(entry["networkData"]["ips"], json!([cidr]), "{entry}");
    }

    // Each device's health, as the kubelet shows it in the pod's status:
    // rail5's NIC losing its carrier makes rail5 Unhealthy, and saying
    // why; rail2 stays Healthy; the link back, rail5 is Healthy again.
    c.wait_for("dra-a's devices Healthy", Duration::from_secs(60), |c| {
        let h = device_health(c, "dra-a");
        (h.len() == 2 && h.values().all(|(s, _)| s == "Healthy")).then_some(())
    });
    c.fabric.nodes[0].ip(&["link", "set", "eth5", "down"]);
    let down = c.wait_for(
        "rail5 Unhealthy in dra-a's status",
        Duration::from_secs(60),
        |c| {
            let h = device_health(c, "dra-a");
            (h.get("rail5")?.0 == "Unhealthy").then_some(h)
        },
    );
    c.fabric.nodes[0].ip(&["link", "set", "eth5", "up"]);
    assert!(down["rail5"].1.contains("eth5 has no carrier"), "{down:?}");
    assert_eq!(down["rail2"].0, "Healthy", "{down:?}");
    c.wait_for(
        "rail5 Healthy again in dra-a's status",
        Duration::from_secs(60),
        |c| (device_health(c, "dra-a").get("rail5")?.0 == "Healthy").then_some(()),
    );

    // A claim in TEAM reaching for the ai namespace's rail network: the
    // scheduler allocates it (it knows nothing of tenancy), railnet refuses
    // to prepare it, the pod never starts and gets no interface.
    c.apply(&template("borrowed", &["ai/rail1"]));
    c.apply(&pod("dra-borrower", "node0", "borrowed"));
    let said = crate::event_in(
        c,
        TEAM,
        "dra-borrower",
        "may not use",
        "the kubelet reporting railnet's refusal to prepare another namespace's rail",
    );
    assert!(said.contains("belongs to RailNetwork ai/rail1"), "{said}");
    let borrower = c.kubectl_json(&["get", "pod", "dra-borrower", "-n", TEAM]);
    assert_ne!(borrower["status"]["phase"], "Running");
    c.kubectl_ok(&["delete", "pod", "dra-borrower", "-n", TEAM, "--wait=true"]);

    // Deleting the pod undoes it: no record of the claim or the sandbox on
    // the node, the claim gone with its pod.
    c.kubectl_ok(&["delete", "pod", "dra-a", "-n", TEAM, "--wait=true"]);
    c.wait_for(
        "node0's DRA records gone with the pod",
        Duration::from_secs(60),
        |c| {
            let left: Vec<String> = ["claims", "sandboxes"]
                .iter()
                .flat_map(|d| {
                    std::fs::read_dir(c.nodes[0].path(&format!("/var/lib/railnet/dra/{d}")))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                })
                .collect();
            left.is_empty().then_some(())
        },
    );
    c.wait_for("the pod's claim deleted", Duration::from_secs(60), |c| {
        c.kubectl_try(&["get", "resourceclaim", &claim_name, "-n", TEAM])
            .is_err()
            .then_some(())
    });
    aligned(c);
    restarts(c);
    injected(c);
    super::dra_vf::vf_stage(c);
    c.kubectl_ok(&["delete", "namespace", TEAM, "--wait=false"]);
}

/// A claim for two GPUs and, per GPU, the rail on its PCIe root (one
/// `matchAttribute` constraint per pair): the scheduler picks, railnet
/// wires what it picked. And a pairing no node has stays Pending.
#[track_caller]
fn aligned(c: &mut Cluster) {
    c.apply(
        &json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
            "metadata": {"name": "gpu.test.railnet.io"},
            "spec": {"selectors": [{"cel": {"expression": "device.driver == \"gpu.test.railnet.io\""}}]},
        })
        .to_string(),
    );
    // GPUs 1 and 2 (roots pci0000:5d and pci0000:9a: rails 3|4 and 5|6).
    c.apply(&aligned_template("aligned", &[1, 2], None));
    c.apply(&pod("dra-aligned", "node1", "aligned"));
    let running = crate::wait_running(c, TEAM, "dra-aligned");
    let claim_name = running["status"]["resourceClaimStatuses"][0]["resourceClaimName"]
        .as_str()
        .unwrap()
        .to_owned();
    let claim = c.kubectl_json(&["get", "resourceclaim", &claim_name, "-n", TEAM]);
    let results = claim["status"]["allocation"]["devices"]["results"]
        .as_array()
        .unwrap()
        .clone();
    let device_of = |request: &str| -> String {
        results
            .iter()
            .find(|r| r["request"] == request)
            .and_then(|r| r["device"].as_str())
            .unwrap_or_else(|| panic!("no {request} in {results:?}"))
            .to_owned()
    };
    assert_eq!(
        (device_of("gpu0"), device_of("gpu1")),
        ("gpu1".into(), "gpu2".into())
    );
    let (nic0, nic1) = (device_of("nic0"), device_of("nic1"));
    assert!(
        ["rail3", "rail4"].contains(&nic0.as_str()) && ["rail5", "rail6"].contains(&nic1.as_str()),
        "GPU 1 (pci0000:5d) got {nic0}, GPU 2 (pci0000:9a) got {nic1}: not the rails on their roots"
    );
    let (rails, addrs) = rail_addrs(c, TEAM, "dra-aligned");
    let wired: Vec<&str> = rails.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(wired, [nic0.as_str(), nic1.as_str()], "{addrs}");
    nccl_pairs(c, &running, &[(1, &nic0), (2, &nic1)]);
    c.kubectl_ok(&["delete", "pod", "dra-aligned", "-n", TEAM, "--wait=true"]);

    // GPU 0 sits on pci0000:3a; rail 5's NIC on pci0000:9a: no node can
    // pair them. The pod stays Pending with the scheduler's reason.
    c.apply(&aligned_template("misaligned", &[0], Some(5)));
    c.apply(&pod("dra-misaligned", "node1", "misaligned"));
    let why = unschedulable(c, "dra-misaligned");
    assert!(why.contains("cannot allocate all claims"), "{why}");
    let pod = c.kubectl_json(&["get", "pod", "dra-misaligned", "-n", TEAM]);
    assert_eq!(pod["status"]["phase"], "Pending");
    c.kubectl_ok(&["delete", "pod", "dra-misaligned", "-n", TEAM, "--wait=true"]);
}

/// Why the scheduler cannot place pod `name` of [`TEAM`] (its
/// `PodScheduled=False` message), waited for up to a minute.
#[track_caller]
pub fn unschedulable(c: &mut Cluster, name: &str) -> String {
    c.wait_for(
        &format!("the scheduler's reason for not placing {name}"),
        Duration::from_secs(60),
        |c| {
            let pod = c.kubectl_json(&["get", "pod", name, "-n", TEAM]);
            pod["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                .and_then(|c| c["message"].as_str())
                .map(str::to_owned)
        },
    )
}

/// A template asking for GPUs `gpus` (by index) and, for each, a rail of
/// TEAM on the same PCIe root (`rail`: that rail only).
fn aligned_template(name: &str, gpus: &[u32], rail: Option<u32>) -> String {
    aligned_template_in(TEAM, name, gpus, rail)
}

/// [`aligned_template`] in (and with the rails of) namespace `ns`.
fn aligned_template_in(ns: &str, name: &str, gpus: &[u32], rail: Option<u32>) -> String {
    let mut requests = Vec::new();
    let mut constraints = Vec::new();
    for (i, g) in gpus.iter().enumerate() {
        requests.push(json!({"name": format!("gpu{i}"), "exactly": {
            "deviceClassName": "gpu.test.railnet.io",
            "selectors": [{"cel": {"expression": format!("device.attributes[\"gpu.test.railnet.io\"].index == {g}")}}],
        }}));
        let mut nic = format!("device.attributes[\"railnet.io\"].network.startsWith(\"{ns}/\")");
        if let Some(k) = rail {
            nic.push_str(&format!(
                " && device.attributes[\"railnet.io\"].rail == {k}"
            ));
        }
        requests.push(json!({"name": format!("nic{i}"), "exactly": {
            "deviceClassName": "rail.railnet.io",
            "selectors": [{"cel": {"expression": nic}}],
        }}));
        constraints.push(json!({"requests": [format!("gpu{i}"), format!("nic{i}")],
                                "matchAttribute": "resource.kubernetes.io/pcieRoot"}));
    }
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"spec": {"devices": {"requests": requests, "constraints": constraints}}},
    })
    .to_string()
}

/// What railnet writes for NCCL of the pod `running` on node1 (its pod
/// directory, `/etc/railnet` in the pod): `nccl.env` names the topology
/// file, and the file puts each GPU `g` of `pairs` in one PCI switch with
/// its rail device (`railK`) and nothing else — the other rail on the
/// GPU's root included, which the claim did not give the pod.
#[track_caller]
fn nccl_pairs(c: &Cluster, running: &Value, pairs: &[(usize, &str)]) {
    let uid = running["metadata"]["uid"].as_str().unwrap();
    let dir = c.nodes[1].path(&format!("/run/railnet/pods/{uid}"));
    let env = std::fs::read_to_string(dir.join("nccl.env")).unwrap();
    assert!(
        env.contains("export NCCL_TOPO_FILE=/etc/railnet/topo.xml"),
        "{env}"
    );
    let topo = std::fs::read_to_string(dir.join("topo.xml")).unwrap();
    assert!(topo.starts_with("<system version=\"1\">"), "{topo}");
    // The bus IDs in each switch (a `<pci>` holding `<pci .../>`s).
    let switches: Vec<Vec<&str>> = topo
        .split("class=\"0x060400\"")
        .skip(1)
        .map(|s| {
            s.split("</pci>")
                .next()
                .unwrap()
                .split("busid=\"")
                .skip(1)
                .map(|b| &b[..12])
                .collect()
        })
        .collect();
    assert_eq!(switches.len(), pairs.len(), "{topo}");
    for (g, nic) in pairs {
        let gpu = railnet_tests::cluster::STAND_IN_GPUS[*g].2;
        let (_, nic_bdf, _) = stand_in_nic(nic[4..].parse().unwrap());
        let mut want = vec![gpu, nic_bdf.as_str()];
        want.sort();
        assert!(
            switches.contains(&want),
            "GPU {g} ({gpu}) is not alone in a switch with {nic} ({nic_bdf}):\n{topo}"
        );
    }
}

/// node1's agent restarts between railnet's prepare of a pod's claim and
/// the pod's start, and again while the pod runs: the pod starts with
/// exactly its claim's rails, keeps them, and its delete gives every
/// address back and leaves no record. The pod is held back after prepare
/// by its network: it names a DRA NAD that does not exist yet, so Multus
/// fails its sandbox (the kubelet retries) until the test makes it.
#[track_caller]
fn restarts(c: &mut Cluster) {
    const HELD: &str = "held-dra";
    let held = allocations(c, 1);
    let pins = crate::pins(c, 1);
    let mut p: Value = serde_json::from_str(&pod("dra-restart", "node1", "aligned")).unwrap();
    p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] = json!(HELD);
    c.apply(&p.to_string());
    // railnet's record says its prepare ran (deterministically: the
    // kubelet prepares every claim before it makes the sandbox).
    let records = c.nodes[1].path("/var/lib/railnet/dra");
    let dir_names = |d: &str| -> Vec<String> {
        std::fs::read_dir(records.join(d))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    c.wait_for(
        "railnet's prepare of the held pod's claim",
        Duration::from_secs(60),
        |_| (!dir_names("claims").is_empty()).then_some(()),
    );
    crate::event_in(
        c,
        TEAM,
        "dra-restart",
        HELD,
        "Multus failing the sandbox for the DRA NAD not made yet",
    );
    let pod = c.kubectl_json(&["get", "pod", "dra-restart", "-n", TEAM]);
    assert_ne!(
        pod["status"]["phase"], "Running",
        "the pod was not held back"
    );
    assert!(
        dir_names("sandboxes").is_empty(),
        "wired before the pod could start"
    );

    restart_agent(c, 1);
    c.apply(
        &json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": HELD, "namespace": TEAM},
            "spec": {"config": json!({"cniVersion": "1.0.0", "name": HELD, "type": "railnet", "dra": true}).to_string()},
        })
        .to_string(),
    );
    // The kubelet's next try, after its back-off (over a minute by now).
    let running = c.wait_for(
        "pod dra-team/dra-restart Running",
        Duration::from_secs(300),
        |c| {
            let pod = c.kubectl_json(&["get", "pod", "dra-restart", "-n", TEAM]);
            (pod["status"]["phase"] == "Running").then_some(pod)
        },
    );
    let claim_name = running["status"]["resourceClaimStatuses"][0]["resourceClaimName"]
        .as_str()
        .unwrap()
        .to_owned();
    let claim = c.kubectl_json(&["get", "resourceclaim", &claim_name, "-n", TEAM]);
    let mut given: Vec<String> = claim["status"]["allocation"]["devices"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["driver"] == "railnet.io")
        .map(|r| r["device"].as_str().unwrap().to_owned())
        .collect();
    given.sort();
    let wired = |c: &Cluster| rail_addrs(c, TEAM, "dra-restart").0;
    let before = wired(c);
    assert_eq!(
        before.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(),
        given,
        "the pod's rails after the agent restarted between prepare and start"
    );
    assert_eq!(
        allocations(c, 1),
        held + 2,
        "addresses held for the pod's two rails"
    );
    // The pod's program is pinned (what keeps its rails steered).
    let pinned = crate::pins(c, 1);
    assert!(
        pinned.iter().any(|p| !pins.contains(p)),
        "no pin for the DRA pod's program: {pinned:?}"
    );
    let nic = |i: usize| given[i].as_str();
    nccl_pairs(c, &running, &[(1, nic(0)), (2, nic(1))]);

    restart_agent(c, 1);
    assert_eq!(wired(c), before, "the pod's rails after an agent restart");
    assert_eq!(
        allocations(c, 1),
        held + 2,
        "addresses held after the restart"
    );

    c.kubectl_ok(&["delete", "pod", "dra-restart", "-n", TEAM, "--wait=true"]);
    c.wait_for(
        "node1's records and addresses of the pod gone",
        Duration::from_secs(60),
        |c| {
            (dir_names("claims").is_empty()
                && dir_names("sandboxes").is_empty()
                && allocations(c, 1) == held)
                .then_some(())
        },
    );
    let uid = running["metadata"]["uid"].as_str().unwrap();
    assert!(
        !c.nodes[1]
            .path(&format!("/run/railnet/pods/{uid}"))
            .exists()
    );
    let left: Vec<String> = crate::pins(c, 1)
        .into_iter()
        .filter(|p| !pins.contains(p))
        .collect();
    assert!(left.is_empty(), "the DRA pod's pins outlived it: {left:?}");
}

/// Addresses node `n`'s agent holds (its `railnet_ipam_allocations`).
fn allocations(c: &Cluster, n: usize) -> u64 {
    let url = format!("http://{}:9465/metrics", node_ip(n));
    let scrape = c.run(c.cp.command("curl").args(["-sf", "--max-time", "10", &url]));
    scrape
        .lines()
        .find_map(|l| l.strip_prefix("railnet_ipam_allocations "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no railnet_ipam_allocations from node{n}:\n{scrape}"))
}

/// Deletes node `n`'s agent pod and waits for its replacement to be
/// ready (the DaemonSet makes it).
#[track_caller]
fn restart_agent(c: &mut Cluster, n: usize) {
    let agent = |c: &mut Cluster| -> Option<(String, bool)> {
        let p = crate::agent_pods(c, n)
            .into_iter()
            .find(|p| p["metadata"]["deletionTimestamp"].is_null())?;
        let ready = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        Some((p["metadata"]["name"].as_str()?.to_owned(), ready))
    };
    let (old, _) = agent(c).expect("node's agent pod");
    c.kubectl_ok(&["delete", "pod", &old, "-n", NS, "--wait=true"]);
    c.wait_for(
        &format!("node{n}'s new agent ready"),
        Duration::from_secs(120),
        |c| {
            agent(c)
                .filter(|(name, ready)| *name != old && *ready)
                .map(|_| ())
        },
    );
}

/// With the Kubernetes IPAM store (RailBlocks): a pod's DRA rails get
/// addresses claimed in RailBlocks under the pod's name, and its delete
/// releases them.
#[track_caller]
pub fn kubernetes_store_stage(c: &mut Cluster) {
    c.kubectl_ok(&["create", "namespace", TEAM]);
    c.apply(&crate::rail_networks(TEAM));
    c.wait_for(
        "node0's ResourceSlice of the rails",
        Duration::from_secs(60),
        |c| {
            let slice = c
                .kubectl_try(&[
                    "get",
                    "resourceslice",
                    &format!("node0-railnet-io-{TEAM}"),
                    "-o",
                    "json",
                ])
                .ok()?;
            let slice: Value = serde_json::from_str(&slice).ok()?;
            (slice["spec"]["devices"].as_array().map(Vec::len) == Some(RAILS as usize))
                .then_some(())
        },
    );
    c.apply(&template(
        "two-rails",
        &[&format!("{TEAM}/rail2"), &format!("{TEAM}/rail5")],
    ));
    c.apply(&pod("dra-k", "node0", "two-rails"));
    crate::wait_running(c, TEAM, "dra-k");
    let (rails, addrs) = rail_addrs(c, TEAM, "dra-k");
    let ips: Vec<String> = rails
        .iter()
        .map(|(_, cidr)| cidr.split('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(ips.len(), 2, "{addrs}");
    let claims = c.wait_for(
        "dra-k's claims in RailBlocks",
        Duration::from_secs(30),
        |c| {
            let claims = crate::claims_in(c, TEAM, "dra-k");
            (claims.len() == 2).then_some(claims)
        },
    );
    for ip in &ips {
        assert!(
            claims.contains(ip),
            "dra-k's {ip} is not claimed: {claims:?}"
        );
    }
    c.kubectl_ok(&["delete", "pod", "dra-k", "-n", TEAM, "--wait=true"]);
    c.wait_for(
        "dra-k's claims released by its DEL",
        Duration::from_secs(30),
        |c| crate::claims_in(c, TEAM, "dra-k").is_empty().then_some(()),
    );
    c.kubectl_ok(&["delete", "namespace", TEAM, "--wait=false"]);
}

/// A pod of a namespace the webhook injects (ai, group gpu) that claims
/// its rail through DRA: it keeps the DRA network (the group's eight NADs
/// are not added), gets just its claim's rail, and reads its rail info —
/// the NCCL topology pairing its GPU with that rail — at /etc/railnet.
#[track_caller]
fn injected(c: &mut Cluster) {
    c.apply(&aligned_template_in("ai", "one-aligned", &[1], None));
    let said = c
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &pod_in("ai", "dra-injected", "node1", "one-aligned"),
        )
        .unwrap_or_else(|e| panic!("the webhook refused a DRA pod of an injected namespace: {e}"));
    let running = crate::wait_running(c, "ai", "dra-injected");
    assert_eq!(
        running["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"],
        format!("{NS}/railnet-dra"),
        "the webhook replaced the DRA pod's networks ({said})"
    );
    let links = crate::exec_in(c, "ai", "dra-injected", &["ip", "-o", "link"]).unwrap();
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap())
        .filter(|n| *n != "lo" && *n != "eth0")
        .collect();
    assert!(
        names.len() == 1 && ["rail3", "rail4"].contains(&names[0]),
        "the DRA pod's interfaces: {names:?} (GPU 1's rail only, no group NADs)"
    );
    let env = crate::exec_in(c, "ai", "dra-injected", &["cat", "/etc/railnet/nccl.env"])
        .unwrap_or_else(|e| panic!("no rail info in the DRA pod: {e}"));
    assert!(
        env.contains("NCCL_TOPO_FILE=/etc/railnet/topo.xml"),
        "{env}"
    );
    let topo = crate::exec_in(c, "ai", "dra-injected", &["cat", "/etc/railnet/topo.xml"]).unwrap();
    let (_, nic, _) = stand_in_nic(names[0][4..].parse().unwrap());
    let gpu = railnet_tests::cluster::STAND_IN_GPUS[1].2;
    assert!(
        topo.contains(&format!("busid=\"{nic}\"")) && topo.contains(&format!("busid=\"{gpu}\"")),
        "{topo}"
    );
    c.kubectl_ok(&["delete", "pod", "dra-injected", "-n", "ai", "--wait=true"]);
}
