//! `cargo xtask demo cluster`: railnet in a real Kubernetes cluster, as a
//! network engineer would look at it — two nodes on an 8-rail fabric,
//! `helm install` from `cargo xtask image`'s image, two pods with eight
//! rails each, their addresses and RailBlocks, traffic counted per rail at
//! the rail routers — then everything torn down.

use std::time::Instant;

use railnet_tests::cluster::{
    Cluster, NS, RAILS, helm_install, rail_addresses, rail_pod, values, wait_running,
};
use serde_json::json;

fn say(what: &str) {
    println!("\n== {what}");
}

fn show(c: &Cluster, args: &[&str]) {
    println!("$ kubectl {}", args.join(" "));
    match c.kubectl_try(args) {
        Ok(out) => print!("{out}"),
        Err(e) => print!("{e}"),
    }
}

fn main() {
    let started = Instant::now();
    say(
        "a cluster: control plane + 2 nodes, each a netns with 8 rail NICs (eth1..eth8) cabled to 8 rail routers",
    );
    let mut c = Cluster::start(2);
    show(&c, &["get", "nodes", "-o", "wide"]);

    say("helm install railnet (Kubernetes IPAM: address blocks are RailBlocks in the API server)");
    let mut v = values(2);
    v["ipam"] = json!({"store": "kubernetes"});
    helm_install(&mut c, false, "demo-values.json", &v, &[]);
    show(&c, &["get", "pods", "-n", NS, "-o", "wide"]);
    show(&c, &["get", "network-attachment-definitions", "-n", NS]);

    say("two pods, one per node, each asking for rail1..rail8 (k8s.v1.cni.cncf.io/networks)");
    c.apply(&rail_pod("pod-a", "node0"));
    c.apply(&rail_pod("pod-b", "node1"));
    let a = rail_addresses(&wait_running(&mut c, "default", "pod-a"));
    let b = rail_addresses(&wait_running(&mut c, "default", "pod-b"));
    println!(
        "{:<6} {:<18} {:<18}",
        "rail", "pod-a (node0)", "pod-b (node1)"
    );
    for k in 0..RAILS as usize {
        println!("{:<6} {:<18} {:<18}", a[k].0, a[k].1, b[k].1);
    }
    println!("\npod-a's routes (the tc program steers each rail's traffic; no ip rules):");
    show(&c, &["exec", "pod-a", "--", "ip", "route"]);
    show(&c, &["get", "railblocks"]);

    say(
        "traffic: pod-a → pod-b on each rail (ping -I <rail address>), packets counted at each rail router",
    );
    let mut table = Vec::new();
    for k in 1..=RAILS as usize {
        let before = c.fabric.rails_rx(0);
        let ok = c
            .kubectl_try(&[
                "exec",
                "pod-a",
                "--",
                "ping",
                "-q",
                "-c",
                "5",
                "-i",
                "0.2",
                "-W",
                "2",
                "-I",
                &a[k - 1].1,
                &b[k - 1].1,
            ])
            .is_ok();
        let after = c.fabric.rails_rx(0);
        let grew: Vec<u64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
        table.push((k, ok, grew));
    }
    print!("{:<8}", "flow");
    for k in 1..=RAILS {
        print!(" rail{k:<3}");
    }
    println!();
    for (k, ok, grew) in &table {
        print!("{:<8}", format!("rail{k}{}", if *ok { "" } else { "!" }));
        for g in grew {
            print!(" {g:<7}");
        }
        println!();
    }
    println!(
        "(packets from node0 at each rail router during each flow: the diagonal is the flow's own rail)"
    );

    say("teardown");
    drop(c);
    println!(
        "done in {:.0} s; nodes, pods, netns, cgroups and mounts removed",
        started.elapsed().as_secs_f64()
    );
}
