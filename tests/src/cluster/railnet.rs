//! railnet on the test cluster: the values for its fabric, pods asking for
//! rails, and reading what Multus reports of them — shared by the cluster
//! test, `cargo xtask demo cluster` and `cargo xtask bench cluster`.

use std::time::Duration;

use serde_json::{Value, json};

use super::{API_IP, Cluster, RAILS, STAND_IN_SYSFS, VF_RESOURCE, rail_subnet};

/// The release's namespace.
pub const NS: &str = "railnet";
/// The tests' workload image (`cargo xtask test` builds it).
pub const WORKLOAD: &str = "localhost/railnet-test/workload:1";

/// The SR-IOV network: a VF of the rail-1 NIC from the device plugin
/// (Multus passes its PCI address), addressed from rail 1's pools.
pub const VF_NETWORK: &str = "rail1-vf";

/// The test fabric's values: the seeds' Solution 2 (a /27 per node per
/// rail, wildcard pools picked by the master's subnet), and an SR-IOV
/// network on rail 1 ([`VF_NETWORK`]).
pub fn values(nodes: usize) -> Value {
    let mut pools = Vec::new();
    for n in 0..nodes {
        for k in 1..=RAILS {
            let (subnet, gw, _) = rail_subnet(k, n);
            let base = 32 * n;
            pools.push(json!({
                "name": format!("rail{k}-node{n}"),
                "subnet": subnet,
                "gateway": gw,
                "ips": [format!("172.16.{k}.{}-172.16.{k}.{}", base + 2, base + 29)],
                "nodeName": [format!("node{n}")],
            }));
        }
    }
    let networks: Vec<Value> = (1..=RAILS)
        .map(|k| {
            json!({
                "name": format!("rail{k}"),
                "rail": k,
                "master": format!("eth{k}"),
                "ippools": {"ipv4": [format!("rail{k}-*")]},
                "matchMasterSubnet": true,
                "deviceInfo": true,
            })
        })
        .chain([json!({
            "name": VF_NETWORK,
            "rail": 1,
            "mode": "sriov",
            "resourceName": VF_RESOURCE,
            // The node's own rail-1 pool (pools are pinned to nodes).
            "ippools": {"ipv4": ["rail1-*"]},
        })])
        .collect();
    json!({
        // No kube-proxy in the test cluster: railnet's pods are told the
        // API server's address (a setting users without kube-proxy have too).
        "k8sServiceHost": API_IP,
        "k8sServicePort": 6443,
        "agent": {
            "sweepInterval": 5,
            // The nodes' rail NICs carry host addresses (matchMasterSubnet
            // reads them): the agents keep the host side of the rule.
            "hostRules": true,
            // The stand-in VFs are described in a sysfs tree of the node's.
            "extraEnv": [{"name": "RAILNET_SYSFS_ROOT", "value": STAND_IN_SYSFS}],
            "extraVolumes": [{"name": "stand-in-sysfs", "hostPath": {"path": STAND_IN_SYSFS}}],
            "extraVolumeMounts": [{"name": "stand-in-sysfs", "mountPath": STAND_IN_SYSFS, "readOnly": true}],
        },
        "controller": {"replicas": 1, "webhook": {"enabled": true}},
        "pools": pools,
        "networkDefaults": {"rdmaCIDRs": ["172.16.0.0/16"]},
        "networks": networks,
    })
}

/// A pod on `node` (namespace default) asking for `networks` through the
/// networks annotation, its container given `limits` if any.
fn pod(name: &str, node: &str, networks: &str, limits: Option<Value>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"k8s.v1.cni.cncf.io/networks": networks},
        },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "w",
                "image": WORKLOAD,
                "imagePullPolicy": "Never",
                "command": ["sleep", "100000"],
            }],
        },
    });
    if let Some(limits) = limits {
        pod["spec"]["containers"][0]["resources"] = json!({ "limits": limits });
    }
    pod
}

/// A pod on `node` asking for `networks` (the annotation's text).
pub fn networks_pod(name: &str, node: &str, networks: &str) -> String {
    pod(name, node, networks, None).to_string()
}

/// A pod on `node` asking for every rail through the networks annotation.
pub fn rail_pod(name: &str, node: &str) -> String {
    let nets: Vec<String> = (1..=RAILS).map(|k| format!("{NS}/rail{k}")).collect();
    networks_pod(name, node, &nets.join(","))
}

/// A pod on `node` asking for one VF of [`VF_NETWORK`]: the device
/// plugin's resource in its limits (kubelet allocates a VF), the network
/// in its annotation (Multus passes that VF's PCI address to railnet).
pub fn vf_pod(name: &str, node: &str) -> String {
    pod(
        name,
        node,
        &format!("{NS}/{VF_NETWORK}"),
        Some(json!({ VF_RESOURCE: "1" })),
    )
    .to_string()
}

/// `helm install railnet` (or, with `upgrade`, `helm upgrade`) with
/// `values` and `--set`s, waiting until an agent of this release is Ready
/// on every node (`helm --wait` counts a DaemonSet ready at
/// maxUnavailable short). The values are written to `<file>` in the
/// cluster's scratch directory.
#[track_caller]
pub fn helm_install(c: &mut Cluster, upgrade: bool, file: &str, values: &Value, sets: &[&str]) {
    let path = c.scratch(file);
    std::fs::write(&path, values.to_string()).unwrap();
    let mut cmd = c.helm();
    cmd.args([if upgrade { "upgrade" } else { "install" }, "railnet"])
        .arg(super::Tools::chart())
        .args(["-n", NS, "--create-namespace", "-f"])
        .arg(&path);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.args(["--wait", "--timeout", "4m"]).output().unwrap();
    assert!(
        out.status.success(),
        "helm {}: {}\n{}",
        if upgrade { "upgrade" } else { "install" },
        String::from_utf8_lossy(&out.stderr),
        c.diagnostics()
    );
    let nodes = c.nodes.len();
    c.wait_for(
        "an up-to-date agent Ready on every node",
        Duration::from_secs(120),
        |c| {
            let ds = c.kubectl_json(&["get", "daemonset", "railnet-agent", "-n", NS]);
            let s = &ds["status"];
            (s["updatedNumberScheduled"] == nodes && s["numberReady"] == nodes).then_some(())
        },
    );
}

/// Waits until the pod runs; returns it.
#[track_caller]
pub fn wait_running(c: &mut Cluster, ns: &str, name: &str) -> Value {
    c.wait_for(
        &format!("pod {ns}/{name} Running"),
        Duration::from_secs(120),
        |c| {
            let pod = c.kubectl_json(&["get", "pod", name, "-n", ns]);
            (pod["status"]["phase"] == "Running").then_some(pod)
        },
    )
}

/// The pod's rail addresses by interface, from Multus's network-status.
#[track_caller]
pub fn rail_addresses(pod: &Value) -> Vec<(String, String)> {
    let status = pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "no network-status annotation on {}",
                pod["metadata"]["name"]
            )
        });
    let status: Value = serde_json::from_str(status).unwrap();
    status
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["interface"]
                .as_str()
                .is_some_and(|i| i.starts_with("net"))
        })
        .map(|s| {
            (
                s["interface"].as_str().unwrap().to_owned(),
                s["ips"][0].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}
