//! railnet on the test cluster: the values for its fabric, pods asking for
//! rails, and reading what Multus reports of them — shared by the cluster
//! test, `cargo xtask demo cluster` and `cargo xtask bench cluster`.

use std::time::Duration;

use serde_json::{Value, json};

use super::{API_IP, Cluster, RAILS, rail_subnet};

/// The release's namespace.
pub const NS: &str = "railnet";
/// The tests' workload image (`cargo xtask test` builds it).
pub const WORKLOAD: &str = "localhost/railnet-test/workload:1";

/// The test fabric's values: the seeds' Solution 2 (a /27 per node per
/// rail, wildcard pools picked by the master's subnet).
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
        .collect();
    json!({
        // No kube-proxy in the test cluster: railnet's pods are told the
        // API server's address (a setting users without kube-proxy have too).
        "k8sServiceHost": API_IP,
        "k8sServicePort": 6443,
        "agent": {"sweepInterval": 5},
        "controller": {"replicas": 1, "webhook": {"enabled": true}},
        "pools": pools,
        "networkDefaults": {"rdmaCIDRs": ["172.16.0.0/16"]},
        "networks": networks,
    })
}

/// A pod on `node` asking for every rail through the networks annotation.
pub fn rail_pod(name: &str, node: &str) -> String {
    let nets: Vec<String> = (1..=RAILS).map(|k| format!("{NS}/rail{k}")).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"k8s.v1.cni.cncf.io/networks": nets.join(",")},
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
    })
    .to_string()
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
