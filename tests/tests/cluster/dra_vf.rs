//! DRA's VF devices: a RailNetwork of the administrator's namespace that
//! names a PF (and no device plugin resource) has each of the PF's VFs
//! published as a device of its own, allocated to one claim at a time (a
//! tenant's naming the same PF publishes nothing). The pod's claim gets a VF moved in
//! whole, with an address of the rail's pool, and the VF's RDMA character
//! devices reach its container through the CDI spec railnet wrote at
//! prepare; deleting the pod puts the VF back and removes the spec. The
//! chart's example claims are checked against the API server.

use std::time::Duration;

use railnet_tests::cluster::{Cluster, DRA_VF_RAIL, NS, VFS_PER_NODE, rail_subnet, stand_in_nic};
use serde_json::{Value, json};

use super::dra::TEAM;

/// The RailNetwork whose VFs are claimed.
const NETWORK: &str = "vf2";

/// A ResourceClaimTemplate asking for `count` VFs of [`NETWORK`].
fn template(name: &str, count: u32) -> String {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "namespace": TEAM},
        "spec": {"spec": {"devices": {"requests": [{"name": "vf", "exactly": {
            "deviceClassName": "sriov.railnet.io",
            "allocationMode": "ExactCount", "count": count,
            "selectors": [{"cel": {"expression":
                format!("device.attributes[\"railnet.io\"].network == \"{NS}/{NETWORK}\"")}}],
        }}]}}},
    })
    .to_string()
}

/// The CDI spec files on node0.
fn cdi_specs(c: &Cluster) -> Vec<String> {
    std::fs::read_dir(c.nodes[0].path("/run/cdi"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The stage (see the module doc); [`TEAM`] exists.
#[track_caller]
pub fn vf_stage(c: &mut Cluster) {
    let (root, pf, _) = stand_in_nic(DRA_VF_RAIL);
    let vfs = crate::stand_in_vfs(c, DRA_VF_RAIL);
    // The administrator's VF network, in the release's namespace; a
    // tenant's naming the same PF.
    let vf_network = |ns: &str, name: &str| {
        json!({
            "apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"rail": DRA_VF_RAIL, "type": "sriov", "master": format!("eth{DRA_VF_RAIL}"),
                     "ippools": {"ipv4": [format!("rail{DRA_VF_RAIL}-*")]}},
        })
        .to_string()
    };
    c.apply(&vf_network(NS, NETWORK));
    c.apply(&vf_network(TEAM, "my-vfs"));

    // The controller renders no NAD for it (Multus would pass no deviceID)
    // and says why; the tenant's is said not to be published.
    let ready = |c: &mut Cluster, ns: &str, name: &str| {
        c.wait_for(
            &format!("RailNetwork {ns}/{name}'s status"),
            Duration::from_secs(60),
            |c| {
                let net = c.kubectl_json(&["get", "railnetwork", name, "-n", ns]);
                net["status"]["conditions"][0]
                    .get("reason")
                    .is_some()
                    .then(|| net["status"]["conditions"][0].clone())
            },
        )
    };
    let admin = ready(c, NS, NETWORK);
    assert_eq!(admin["reason"], "DRADevices", "{admin}");
    assert_eq!(admin["status"], "True", "{admin}");
    assert!(
        c.kubectl_try(&["get", "net-attach-def", NETWORK, "-n", NS])
            .is_err(),
        "a NAD for DRA's VFs"
    );
    let tenant = ready(c, TEAM, "my-vfs");
    assert_eq!(tenant["reason"], "NotPublished", "{tenant}");

    // node0 publishes each VF as a device of its own, for one claim; none
    // of the tenant's.
    let slice_name = format!("node0-railnet-io-{NS}");
    let devices = c.wait_for("node0's VF devices of vf2", Duration::from_secs(60), |c| {
        let slice = c.kubectl_json(&["get", "resourceslice", &slice_name]);
        let vfs: Vec<Value> = slice["spec"]["devices"]
            .as_array()?
            .iter()
            .filter(|d| d["name"].as_str().is_some_and(|n| n.starts_with("vf2-")))
            .cloned()
            .collect();
        (vfs.len() == VFS_PER_NODE).then_some(vfs)
    });
    let tenants = c.kubectl_try(&[
        "get",
        "resourceslice",
        &format!("node0-railnet-io-{TEAM}"),
        "-o",
        "json",
    ]);
    assert!(
        !tenants.as_deref().unwrap_or_default().contains("my-vfs"),
        "a tenant's VF network was published: {tenants:?}"
    );
    for (i, d) in devices.iter().enumerate() {
        let a = &d["attributes"];
        assert_eq!(d["name"], format!("vf2-vf{i}"));
        assert!(
            d.get("allowMultipleAllocations").is_none(),
            "a VF must go to one claim: {d}"
        );
        let bdf = format!("{}.{}", &pf[..pf.len() - 2], i + 1);
        assert_eq!(a["resource.kubernetes.io/pciBusID"]["string"], bdf.as_str());
        assert_eq!(a["resource.kubernetes.io/pcieRoot"]["string"], root);
        assert_eq!(a["kind"]["string"], "sriov");
        assert_eq!(a["netdev"]["string"], format!("eth{DRA_VF_RAIL}"));
        assert_eq!(
            a["rdmaDevice"]["string"],
            format!("mlx5_{}", 10 * DRA_VF_RAIL + i as u32)
        );
    }

    // A pod claiming one VF gets it whole: it leaves the node and is the
    // pod's rail2, with an address of rail2-node0.
    let before = cdi_specs(c);
    c.apply(&template("one-vf", 1));
    c.apply(&super::dra::pod_in(TEAM, "vf-claim", "node0", "one-vf"));
    let running = crate::wait_running(c, TEAM, "vf-claim");
    let claim_name = running["status"]["resourceClaimStatuses"][0]["resourceClaimName"]
        .as_str()
        .expect("the pod's generated claim")
        .to_owned();
    let claim = c.kubectl_json(&["get", "resourceclaim", &claim_name, "-n", TEAM]);
    let device = claim["status"]["allocation"]["devices"]["results"][0]["device"]
        .as_str()
        .unwrap()
        .to_owned();
    let i: usize = device.rsplit("vf").next().unwrap().parse().unwrap();
    let (vf, mac) = vfs[i].clone();
    let node = &c.fabric.nodes[0];
    assert!(!node.has_link(&vf), "{vf} ({device}) is still in node0");
    let other = &vfs[1 - i].0;
    assert!(
        node.has_link(other),
        "{other} was not claimed but left node0"
    );
    let in_pod = crate::exec_in(
        c,
        TEAM,
        "vf-claim",
        &["cat", "/sys/class/net/rail2/address"],
    )
    .unwrap();
    assert_eq!(in_pod.trim(), mac, "the pod's rail2 is not VF {vf}");
    let addrs = crate::exec_in(
        c,
        TEAM,
        "vf-claim",
        &["ip", "-o", "-4", "addr", "show", "rail2"],
    )
    .unwrap();
    let (subnet, gateway, _) = rail_subnet(DRA_VF_RAIL, 0);
    let prefix = subnet.rsplit_once('.').unwrap().0;
    assert!(
        addrs.contains(&format!("inet {prefix}.")),
        "rail2's address is not of rail2-node0 ({subnet}):\n{addrs}"
    );
    // Its traffic crosses that VF to rail 2's router.
    let router = c.fabric.router(DRA_VF_RAIL);
    let port = format!("n0{vf}");
    let rx = router.rx_packets(&port);
    let ping = crate::exec_in(
        c,
        TEAM,
        "vf-claim",
        &["ping", "-c", "3", "-W", "2", &gateway],
    );
    assert!(ping.is_ok(), "vf-claim → {gateway} over {vf}: {ping:?}");
    assert!(
        router.rx_packets(&port) >= rx + 3,
        "rail 2's router did not see the pings on {vf}'s port"
    );

    // The VF's RDMA character devices are in the container, through the
    // claim's CDI spec: its uverbs and rdma_cm, nothing of the other VF.
    let n = 10 * DRA_VF_RAIL + i as u32;
    let listing = crate::exec_in(c, TEAM, "vf-claim", &["ls", "-l", "/dev/infiniband"])
        .unwrap_or_else(|e| panic!("no /dev/infiniband in the pod: {e}"));
    let nodes: Vec<String> = listing
        .lines()
        .filter(|l| l.starts_with('c'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // crw-rw-rw- 1 root root 231, 212 <date…> uverbs20
            format!("{} {}{}", f[f.len() - 1], f[4], f[5])
        })
        .collect();
    assert_eq!(
        nodes,
        [
            "rdma_cm 10,58".to_owned(),
            format!("uverbs{n} 231,{}", 192 + n)
        ],
        "/dev/infiniband in the pod:\n{listing}"
    );
    let specs = cdi_specs(c);
    let uid = claim["metadata"]["uid"].as_str().unwrap();
    assert!(
        specs.contains(&format!("railnet.io-{uid}.json")),
        "no CDI spec of the claim on node0: {specs:?}"
    );

    // While it holds one, a claim for both VFs cannot be allocated.
    c.apply(&template("both-vfs", 2));
    c.apply(&super::dra::pod_in(TEAM, "vf-both", "node0", "both-vfs"));
    let why = super::dra::unschedulable(c, "vf-both");
    assert!(why.contains("cannot allocate all claims"), "{why}");
    c.kubectl_ok(&["delete", "pod", "vf-both", "-n", TEAM, "--wait=true"]);

    // Deleted: the VF is back in node0 as it was, the spec gone.
    c.kubectl_ok(&["delete", "pod", "vf-claim", "-n", TEAM, "--wait=true"]);
    c.wait_for(
        "the claim's CDI spec removed at unprepare",
        Duration::from_secs(60),
        |c| (cdi_specs(c) == before).then_some(()),
    );
    let node = &c.fabric.nodes[0];
    assert!(node.has_link(&vf), "{vf} did not come back to node0");
    let back = &node.ip_json(&["link", "show", "dev", &vf])[0];
    assert_eq!(back["address"], mac.as_str(), "{vf}'s MAC not restored");

    // The chart's example claims (one device per rail, GPUs with their
    // rails, a GPU with its VF) are what this API server accepts.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/railnet/examples/dra-claims.yaml");
    c.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-n",
        TEAM,
        "-f",
        examples.to_str().unwrap(),
    ]);
    c.kubectl_ok(&["delete", "railnetwork", NETWORK, "-n", NS]);
}
