//! `cargo xtask bench cluster`: pod start-up with 8 rails through the whole
//! real path — `kubectl apply`, scheduler, kubelet, containerd, Multus, the
//! CNI plugins — on the two-node test cluster, side by side in one run:
//! railnet; the reference stack (Multus + reference macvlan + host-local per
//! rail); and the same pods with no rails, so the cost railnet adds to a
//! pod's start shows. Figures and ratios only; nothing passes or fails.
//!
//! railnet's 8 rails come two ways: through 8 NADs, and through DRA — one
//! ResourceClaim per pod (from a template) holding one device per rail,
//! allocated by the scheduler and wired by one ADD of the DRA network.
//!
//! `RAILNET_BENCH_PODS` (default 100) pods per variant, spread over both
//! nodes by a node selector (so every variant goes through the scheduler,
//! which DRA needs). Times are seen by polling the API server once a
//! second, as a user watching `kubectl get pods` would.

use std::time::{Duration, Instant};

use railnet_tests::cluster::{API_IP, Cluster, RAILS, WORKLOAD, helm_install};
use serde_json::{Value, json};

/// railnet's values: per node and rail a pool of 90 addresses of the
/// rail's /24 (the fabric's router is .254), so 100 pods fit.
fn values() -> Value {
    let mut pools = Vec::new();
    for n in 0..2usize {
        for k in 1..=RAILS {
            let lo = 10 + 100 * n;
            pools.push(json!({
                "name": format!("rail{k}-node{n}"),
                "subnet": format!("172.16.{k}.0/24"),
                "gateway": format!("172.16.{k}.254"),
                "ips": [format!("172.16.{k}.{lo}-172.16.{k}.{}", lo + 89)],
                "nodeName": [format!("node{n}")],
            }));
        }
    }
    let networks: Vec<Value> = (1..=RAILS)
        .map(|k| {
            json!({"name": format!("rail{k}"), "rail": k, "master": format!("eth{k}"),
                   "ippools": {"ipv4": [format!("rail{k}-*")]}})
        })
        .collect();
    json!({
        "k8sServiceHost": API_IP, "k8sServicePort": 6443,
        "controller": {"replicas": 1},
        "pools": pools,
        "networkDefaults": {"rdmaCIDRs": ["172.16.0.0/16"]},
        "networks": networks,
        "dra": {"enabled": true},
    })
}

/// RailNetworks of namespace default on the same pools (what DRA devices
/// are made of), and the claim template asking for one device of each.
fn dra_networks() -> String {
    let mut out: Vec<String> = (1..=RAILS)
        .map(|k| {
            json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
                   "metadata": {"name": format!("rail{k}"), "namespace": "default"},
                   "spec": {"rail": k, "type": "macvlan", "master": format!("eth{k}"),
                            "ippools": {"ipv4": [format!("rail{k}-*")]},
                            "rdmaCIDRs": ["172.16.0.0/16"]}})
            .to_string()
        })
        .collect();
    let requests: Vec<Value> = (1..=RAILS)
        .map(|k| {
            json!({"name": format!("rail{k}"), "exactly": {
                "deviceClassName": "rail.railnet.io",
                "selectors": [{"cel": {"expression":
                    format!("device.attributes[\"railnet.io\"].network == \"default/rail{k}\"")}}]}})
        })
        .collect();
    out.push(
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
               "metadata": {"name": "eight-rails", "namespace": "default"},
               "spec": {"spec": {"devices": {"requests": requests}}}})
        .to_string(),
    );
    out.join("\n---\n")
}

/// Waits until both nodes publish their 8 rail devices of namespace default.
fn wait_for_slices(c: &mut Cluster) {
    for n in 0..2 {
        let name = format!("node{n}-railnet-io-default");
        c.wait_for(
            &format!("{name}'s 8 devices"),
            Duration::from_secs(120),
            |c| {
                let s = c
                    .kubectl_try(&["get", "resourceslice", &name, "-o", "json"])
                    .ok()?;
                let s: Value = serde_json::from_str(&s).ok()?;
                (s["spec"]["devices"].as_array().map(Vec::len) == Some(RAILS as usize))
                    .then_some(())
            },
        );
    }
}

/// The reference stack's NADs: reference macvlan on each rail NIC with
/// host-local (node-local ranges: the same range on both nodes, which a
/// real cluster would need whereabouts for — start-up cost is the same).
fn reference_nads() -> String {
    (1..=RAILS)
        .map(|k| {
            let conf = json!({
                "cniVersion": "0.3.1", "name": format!("ref-rail{k}"), "type": "macvlan",
                "master": format!("eth{k}"), "mode": "bridge",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("172.18.{k}.0/24")}]]},
            });
            json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                   "metadata": {"name": format!("ref-rail{k}"), "namespace": "default"},
                   "spec": {"config": conf.to_string()}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// whereabouts as its README installs it — its CRDs, and its ClusterRole
/// for the identity the plugin uses on the nodes (Multus's kubeconfig) —
/// and one NAD per rail: reference macvlan with whereabouts, one range per
/// rail shared by both nodes (the seeds' Solution 1, what railnet's
/// Kubernetes IPAM serves).
fn setup_whereabouts(c: &Cluster) {
    let dir = std::env::var_os("RAILNET_WHEREABOUTS_CRDS")
        .map(std::path::PathBuf::from)
        .expect("RAILNET_WHEREABOUTS_CRDS (cargo xtask bench cluster sets it)");
    for crd in [
        "whereabouts.cni.cncf.io_ippools.yaml",
        "whereabouts.cni.cncf.io_overlappingrangeipreservations.yaml",
    ] {
        c.apply(&std::fs::read_to_string(dir.join(crd)).unwrap());
    }
    c.apply(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: whereabouts-cni}
rules:
  - apiGroups: [whereabouts.cni.cncf.io]
    resources: [ippools, overlappingrangeipreservations, nodeslicepools]
    verbs: [get, list, watch, create, update, patch, delete]
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: ["*"]
  - apiGroups: [""]
    resources: [pods, nodes]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: whereabouts-cni}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: whereabouts-cni}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: multus}
"#,
    );
    let nads: Vec<String> = (1..=RAILS)
        .map(|k| {
            let conf = json!({
                "cniVersion": "0.3.1", "name": format!("wb-rail{k}"), "type": "macvlan",
                "master": format!("eth{k}"), "mode": "bridge",
                "ipam": {"type": "whereabouts", "range": format!("172.19.{k}.0/24"),
                         "kubernetes": {"kubeconfig": "/etc/cni/net.d/multus.d/multus.kubeconfig"}},
            });
            json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                   "metadata": {"name": format!("wb-rail{k}"), "namespace": "default"},
                   "spec": {"config": conf.to_string()}})
            .to_string()
        })
        .collect();
    c.apply(&nads.join("\n---\n"));
}

/// How a variant's pods get their rails.
struct Variant {
    tag: &'static str,
    /// The networks annotation.
    networks: Option<String>,
    /// A ResourceClaimTemplate each pod claims from.
    claim_template: Option<&'static str>,
}

fn pods(tag: &str, n: usize, networks: Option<&str>, claim_template: Option<&str>) -> String {
    (0..n)
        .map(|i| {
            let mut meta = json!({"name": format!("{tag}-{i}"), "namespace": "default",
                                  "labels": {"bench": tag}});
            if let Some(nets) = networks {
                meta["annotations"] = json!({"k8s.v1.cni.cncf.io/networks": nets});
            }
            let mut spec = json!({
                "nodeSelector": {"kubernetes.io/hostname": format!("node{}", i % 2)},
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "w", "image": WORKLOAD, "imagePullPolicy": "Never",
                                "command": ["sleep", "100000"]}]});
            if let Some(t) = claim_template {
                spec["resourceClaims"] = json!([{"name": "rails", "resourceClaimTemplateName": t}]);
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// One variant's figures, seconds.
struct Batch {
    up: Vec<f64>,
    up_total: f64,
    down_total: f64,
    missing: usize,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn run_batch(c: &Cluster, v: &Variant, n: usize) -> Batch {
    let tag = v.tag;
    let manifest = pods(tag, n, v.networks.as_deref(), v.claim_template);
    let start = Instant::now();
    c.kubectl_stdin(&["apply", "-f", "-"], &manifest)
        .unwrap_or_else(|e| panic!("kubectl apply: {e}"));
    let mut up = std::collections::HashMap::new();
    let deadline = start + Duration::from_secs(900);
    while up.len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        let list = c.kubectl_json(&["get", "pods", "-l", &format!("bench={tag}")]);
        for p in list["items"].as_array().into_iter().flatten() {
            if p["status"]["phase"] == "Running" {
                let name = p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                up.entry(name)
                    .or_insert_with(|| start.elapsed().as_secs_f64());
            }
        }
    }
    let up_total = start.elapsed().as_secs_f64();
    let missing = n - up.len();
    let start = Instant::now();
    c.kubectl_ok(&[
        "delete",
        "pods",
        "-l",
        &format!("bench={tag}"),
        "--wait=false",
    ]);
    loop {
        let list = c.kubectl_json(&["get", "pods", "-l", &format!("bench={tag}")]);
        if list["items"].as_array().is_none_or(Vec::is_empty)
            || start.elapsed() > Duration::from_secs(600)
        {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Batch {
        up: up.into_values().collect(),
        up_total,
        down_total: start.elapsed().as_secs_f64(),
        missing,
    }
}

fn main() {
    let n: usize = std::env::var("RAILNET_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut c = Cluster::start(2);
    helm_install(&mut c, false, "bench-values.json", &values(), &[]);
    c.apply(&reference_nads());
    let railnet_nets: Vec<String> = (1..=RAILS).map(|k| format!("railnet/rail{k}")).collect();
    let reference_nets: Vec<String> = (1..=RAILS).map(|k| format!("ref-rail{k}")).collect();
    c.apply(&dra_networks());
    wait_for_slices(&mut c);
    let variant = |tag, networks: Option<String>| Variant {
        tag,
        networks,
        claim_template: None,
    };
    let mut variants = vec![
        variant("none", None),
        variant("railnet", Some(railnet_nets.join(","))),
        variant("reference", Some(reference_nets.join(","))),
        Variant {
            tag: "railnet-dra",
            networks: Some("railnet/railnet-dra".into()),
            claim_template: Some("eight-rails"),
        },
    ];
    if c.tools.whereabouts.is_some() {
        setup_whereabouts(&c);
        let nets: Vec<String> = (1..=RAILS).map(|k| format!("wb-rail{k}")).collect();
        variants.push(variant("whereabouts", Some(nets.join(","))));
    }
    println!(
        "cluster start-up: {n} pods over 2 nodes, 8 rails each (no rails for 'none'), kubectl apply → all Running, then delete → all gone"
    );
    let mut results = Vec::new();
    for v in &variants {
        let b = run_batch(&c, v, n);
        println!(
            "  {:<11} per pod p50 {:>6.1} s  p99 {:>6.1} s   all Running {:>6.1} s   all deleted {:>6.1} s{}",
            v.tag,
            percentile(&b.up, 0.5),
            percentile(&b.up, 0.99),
            b.up_total,
            b.down_total,
            if b.missing > 0 {
                format!("   ({} never Running)", b.missing)
            } else {
                String::new()
            },
        );
        results.push(b);
    }
    let (none, railnet, reference, dra) = (&results[0], &results[1], &results[2], &results[3]);
    println!(
        "  ratio railnet DRA / railnet NADs: all Running {:.2}, p50 {:.2}, p99 {:.2}, all deleted {:.2}",
        dra.up_total / railnet.up_total,
        percentile(&dra.up, 0.5) / percentile(&railnet.up, 0.5),
        percentile(&dra.up, 0.99) / percentile(&railnet.up, 0.99),
        dra.down_total / railnet.down_total,
    );
    if let Some(wb) = results.get(4) {
        println!(
            "  ratio railnet / whereabouts (cluster-wide IPAM): all Running {:.2}, p50 {:.2}, all deleted {:.2}",
            railnet.up_total / wb.up_total,
            percentile(&railnet.up, 0.5) / percentile(&wb.up, 0.5),
            railnet.down_total / wb.down_total,
        );
    }
    println!(
        "  ratio railnet / reference: all Running {:.2}, p50 {:.2}, all deleted {:.2}",
        railnet.up_total / reference.up_total,
        percentile(&railnet.up, 0.5) / percentile(&reference.up, 0.5),
        railnet.down_total / reference.down_total,
    );
    println!(
        "  cost of 8 rails over none: railnet +{:.1} s per pod (p50), reference +{:.1} s",
        percentile(&railnet.up, 0.5) - percentile(&none.up, 0.5),
        percentile(&reference.up, 0.5) - percentile(&none.up, 0.5),
    );
}
