//! Kubernetes-mode IPAM against a real API server (etcd +
//! apiextensions-apiserver in a netns of the test's own): two "nodes" —
//! each the agent's own allocator (`Ipam` over a `ClusterStore` with its
//! node name) — share pools with no lock but the API server's
//! create-if-absent and resourceVersion preconditions.
//!
//! What a user would notice: an address handed to two pods (duplicates), a
//! pod refused while the pool still had room, an allocation acknowledged
//! and then gone after the API server came back, a restarted agent that
//! forgot its pods.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use railnet_agent::{
    ipam::{
        AllocationKey, AllocationStore, Candidates, Family, Ipam, IpamError, MemoryStore, PoolSpec,
        RedbStore,
        cluster::{ClusterOptions, ClusterStore, Owner, block_name},
    },
    netns::NetnsId,
};
use railnet_tests::{Agent, ScratchDir, apiserver::ApiServer, binary, plugin};
use serde_json::{Value, json};

fn server() -> ApiServer {
    // The agent's log goes into the test's captured output: a failing
    // test shows what the allocator did (writes refused, retries).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("railnet_agent=info")
        .try_init();
    let api = ApiServer::start();
    for crd in ["railnet.io_railblocks.yaml", "railnet.io_railpools.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/railnet/crds")
            .join(crd);
        let text = std::fs::read_to_string(&path).unwrap();
        api.install_crd(&serde_norway::from_str(&text).unwrap());
    }
    api
}

fn pools(subnet: &str) -> Vec<PoolSpec> {
    vec![serde_json::from_value(json!({"name": "rail1", "subnet": subnet})).unwrap()]
}

/// One node's allocator, connected from inside the server's netns, with
/// an in-memory journal.
fn node(api: &ApiServer, name: &str, subnet: &str) -> Arc<Ipam> {
    node_with(api, name, subnet, Box::new(MemoryStore::default()), |_| ())
}

/// One node's allocator with `journal` as its own store.
fn node_with(
    api: &ApiServer,
    name: &str,
    subnet: &str,
    journal: Box<dyn AllocationStore>,
    tune: impl FnOnce(&mut ClusterOptions) + Send,
) -> Arc<Ipam> {
    let kubeconfig = api.kubeconfig();
    api.inside(|| {
        let mut opts = ClusterOptions::new(name);
        opts.kubeconfig = Some(kubeconfig);
        opts.timeout = Duration::from_secs(10);
        // Emptied blocks go back soon: the test waits for it.
        opts.empty_block_grace = Duration::from_secs(1);
        tune(&mut opts);
        let store = ClusterStore::connect(opts).expect("client");
        Arc::new(Ipam::with_cluster(pools(subnet), Arc::new(store), journal).expect("load"))
    })
}

/// Waits until `f` holds. What is awaited happens within a second or two
/// of the flush interval; the wait is long because a loaded CI machine
/// (each test its own etcd and API server, on two cores) is slow, and
/// this is a test of what happens, not of how fast.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    until(what, || if f() { Ok(()) } else { Err(String::new()) });
}

/// Waits as `eventually` does; `f` says what it saw when not yet, and the
/// last of that is in the failure.
fn until(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let Err(seen) = f() else { return };
        assert!(std::time::Instant::now() < deadline, "never: {what} {seen}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn key(i: usize, node: &str) -> AllocationKey {
    AllocationKey {
        container_id: format!("{node}-pod{i}"),
        ifname: "net1".into(),
        family: Family::V4,
    }
}

fn owner(i: usize, node: &str) -> Owner {
    Owner {
        netns: NetnsId::default(),
        network: "rail1".into(),
        pod_namespace: "ai".into(),
        pod_name: format!("trainer-{i}"),
        pod_uid: format!("uid-{node}-{i}"),
    }
}

fn candidates() -> Candidates {
    Candidates {
        pools: vec!["rail1".into()],
        rejected: vec![],
    }
}

/// `given` (address, to whom) as a map, panicking if an address was given
/// twice.
fn each_once(given: impl IntoIterator<Item = (IpAddr, String)>) -> HashMap<IpAddr, String> {
    let mut owner_of = HashMap::new();
    for (address, who) in given {
        if let Some(other) = owner_of.insert(address, who.clone()) {
            panic!("{address} was given to {other} and to {who}");
        }
    }
    owner_of
}

/// The API server's claims: address → container.
fn claimed(api: &ApiServer) -> HashMap<IpAddr, String> {
    claims_in(api)
        .into_iter()
        .map(|(a, cid, _)| (a, cid))
        .collect()
}

/// Every claim the API server holds: address → (container, interface).
fn claims_in(api: &ApiServer) -> Vec<(IpAddr, String, String)> {
    let (code, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    assert_eq!(code, 200, "{list}");
    let mut out = Vec::new();
    for b in list["items"].as_array().unwrap() {
        for (a, c) in b["spec"]["claims"].as_object().into_iter().flatten() {
            out.push((
                a.parse().unwrap(),
                c["containerID"].as_str().unwrap().to_owned(),
                c["interface"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn two_nodes_share_a_pool_without_one_duplicate() {
    let api = server();
    // A /20: 4094 addresses; 2 × 2600 allocations with every fourth pod
    // deleted again, so both nodes claim, fill, release and reuse.
    let nodes = [
        ("node-a", node(&api, "node-a", "172.16.16.0/20")),
        ("node-b", node(&api, "node-b", "172.16.16.0/20")),
    ];
    const PER_NODE: usize = 2600;
    let acked: Vec<Vec<(String, IpAddr)>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .flat_map(|(name, ipam)| {
                // Two request threads per node, as two pods' ADDs at once.
                (0..2).map(move |t| {
                    s.spawn(move || {
                        let mut held = Vec::new();
                        let mut released = Vec::new();
                        for i in (t..PER_NODE).step_by(2) {
                            let a = ipam
                                .allocate_owned(key(i, name), &candidates(), None, &owner(i, name))
                                .unwrap_or_else(|e| panic!("{name} pod {i}: {e}"));
                            if i % 4 == 0 {
                                ipam.release(&a.key.container_id, "net1").unwrap();
                                released.push(a.key.container_id);
                            } else {
                                held.push((a.key.container_id, a.address));
                            }
                        }
                        held
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let acked: Vec<(String, IpAddr)> = acked.into_iter().flatten().collect();
    assert_eq!(acked.len(), 2 * (PER_NODE - PER_NODE / 4));
    // Claims made from held addresses are written in batches: far fewer
    // writes than claims and releases (one write each would be 6 500).
    let mut writes = 0;
    for (_, ipam) in &nodes {
        ipam.flush().unwrap();
        writes += ipam.api_writes().unwrap().0;
    }
    let changes = 2 * (PER_NODE + PER_NODE / 4) as u64;
    eprintln!("{writes} API writes for {changes} claims and releases");
    assert!(
        writes * 2 < changes,
        "{writes} API writes for {changes} claims and releases"
    );
    let expected = each_once(acked.iter().map(|(c, a)| (*a, c.clone())));
    // What the API server holds is exactly what the nodes acknowledged
    // and still hold: no lost claim, no leaked one.
    assert_eq!(claimed(&api), expected);
    // Both nodes really allocated (neither did all the work through the
    // other's blocks).
    let (code, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    assert_eq!(code, 200);
    let owners: HashSet<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["spec"]["node"].as_str().unwrap())
        .collect();
    assert_eq!(owners, HashSet::from(["node-a", "node-b"]));
}

#[test]
fn a_pool_of_254_serves_exactly_254_pods_across_two_nodes() {
    let api = server();
    let a = node(&api, "node-a", "172.16.1.0/24");
    let b = node(&api, "node-b", "172.16.1.0/24");
    // 300 pods asked for, 150 per node at once: the nodes' blocks fill,
    // then each asks the other to lend the held addresses it does not use.
    let results: Vec<Result<IpAddr, IpamError>> = std::thread::scope(|s| {
        let hs: Vec<_> = [("node-a", &a), ("node-b", &b)]
            .into_iter()
            .map(|(name, ipam)| {
                s.spawn(move || {
                    (0..150)
                        .map(|i| {
                            ipam.allocate_owned(key(i, name), &candidates(), None, &owner(i, name))
                                .map(|x| x.address)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<IpAddr> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let distinct: HashSet<IpAddr> = ok.iter().copied().collect();
    assert_eq!(ok.len(), 254, "pods served");
    assert_eq!(distinct.len(), 254, "an address was given twice");
    assert!(!distinct.contains(&"172.16.1.0".parse().unwrap()));
    assert!(!distinct.contains(&"172.16.1.255".parse().unwrap()));
    for r in &results {
        if let Err(e) = r {
            let text = e.to_string();
            assert!(
                text.contains("rail1") && text.contains("exhausted"),
                "a refusal a person can act on names the pool: {text}"
            );
        }
    }
    // Deleting one pod makes room for exactly one more, on either node.
    a.release("node-a-pod0", "net1").unwrap();
    let again = b
        .allocate_owned(
            key(500, "node-b"),
            &candidates(),
            None,
            &owner(500, "node-b"),
        )
        .unwrap();
    let freed = *results[0].as_ref().expect("node-a's first pod was served");
    assert_eq!(again.address, freed, "the one free address");
    assert!(
        b.allocate_owned(
            key(501, "node-b"),
            &candidates(),
            None,
            &owner(501, "node-b")
        )
        .is_err()
    );
}

#[test]
fn killing_the_api_server_mid_run_loses_and_duplicates_nothing() {
    let mut api = server();
    // Blocks of 256: when the server dies each node still holds
    // addresses to serve from.
    let wide = |o: &mut ClusterOptions| o.block_prefix_v4 = 24;
    let mem = || Box::new(MemoryStore::default());
    let a = node_with(&api, "node-a", "172.16.32.0/22", mem(), wide);
    let b = node_with(&api, "node-b", "172.16.32.0/22", mem(), wide);
    let stop = AtomicBool::new(false);
    let refused_while_down = AtomicUsize::new(0);
    let served = AtomicUsize::new(0);
    let down = AtomicBool::new(false);
    let served_while_down = AtomicUsize::new(0);
    let down_message = std::sync::Mutex::new(String::new());
    const PODS: usize = 400;
    let acked: Vec<(String, IpAddr)> = std::thread::scope(|s| {
        let workers: Vec<_> = [("node-a", &a), ("node-b", &b)]
            .into_iter()
            .map(|(name, ipam)| {
                let (refused_while_down, down_message, stop, served) =
                    (&refused_while_down, &down_message, &stop, &served);
                let (down, served_while_down) = (&down, &served_while_down);
                s.spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0..PODS {
                        // As the kubelet does: the same ADD again until it
                        // is answered.
                        loop {
                            match ipam.allocate_owned(
                                key(i, name),
                                &candidates(),
                                None,
                                &owner(i, name),
                            ) {
                                Ok(x) => {
                                    acked.push((x.key.container_id, x.address));
                                    served.fetch_add(1, Ordering::Relaxed);
                                    if down.load(Ordering::Relaxed) {
                                        served_while_down.fetch_add(1, Ordering::Relaxed);
                                    }
                                    // A pod a millisecond: served from held
                                    // addresses an ADD takes microseconds,
                                    // and unpaced the nodes could use up
                                    // their first block between the count
                                    // reaching 150 and the kill, leaving
                                    // nothing held to serve the outage from.
                                    std::thread::sleep(Duration::from_millis(1));
                                    break;
                                }
                                Err(IpamError::Unavailable(m)) => {
                                    refused_while_down.fetch_add(1, Ordering::Relaxed);
                                    let mut first = down_message.lock().unwrap();
                                    if first.is_empty() {
                                        *first = m;
                                    }
                                    std::thread::sleep(Duration::from_millis(100));
                                }
                                Err(e) => panic!("{name} pod {i}: {e}"),
                            }
                            assert!(!stop.load(Ordering::Relaxed), "never answered");
                        }
                    }
                    acked
                })
            })
            .collect();
        // Kill the server while both nodes are writing, keep it down for
        // a while, bring it back over the same etcd.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while served.load(Ordering::Relaxed) < 150 {
            assert!(
                std::time::Instant::now() < deadline && !workers.iter().any(|w| w.is_finished()),
                "the nodes stopped before 150 pods were served"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        api.kill_server();
        down.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(3));
        down.store(false, Ordering::Relaxed);
        api.restart_server();
        let out = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        stop.store(true, Ordering::Relaxed);
        out
    });
    assert!(
        refused_while_down.load(Ordering::Relaxed) > 0,
        "the outage was not seen: kill the server earlier"
    );
    let msg = down_message.lock().unwrap().clone();
    assert!(
        msg.contains("Kubernetes API server") && msg.contains("try again"),
        "what ADD said while the API server was down: {msg}"
    );
    assert_eq!(acked.len(), 2 * PODS);
    let distinct: HashSet<IpAddr> = acked.iter().map(|(_, a)| *a).collect();
    assert_eq!(distinct.len(), acked.len(), "an address was given twice");
    assert!(
        served_while_down.load(Ordering::Relaxed) > 0,
        "the nodes did not keep serving from their held addresses while the API server was down"
    );
    a.flush().unwrap();
    b.flush().unwrap();
    let stored = claims_in(&api);
    let stored_map: BTreeMap<IpAddr, String> =
        stored.iter().map(|(a, c, _)| (*a, c.clone())).collect();
    assert_eq!(stored.len(), stored_map.len());
    let expected: BTreeMap<IpAddr, String> = acked.iter().map(|(c, a)| (*a, c.clone())).collect();
    assert_eq!(
        stored_map, expected,
        "the API server's claims differ from what the nodes acknowledged"
    );
}

#[test]
fn a_restarted_agent_keeps_its_pods_addresses() {
    let api = server();
    let dir = ScratchDir::new("journal");
    let journal = dir.path().join("ipam.redb");
    let open = || Box::new(RedbStore::open(&journal).unwrap());
    // No flush before the agent stops.
    let never = |o: &mut ClusterOptions| o.flush_interval = Duration::from_secs(3600);
    let a = node_with(&api, "node-a", "172.16.1.0/24", open(), never);
    let first = a
        .allocate_owned(key(1, "node-a"), &candidates(), None, &owner(1, "node-a"))
        .unwrap();
    let wanted: IpAddr = "172.16.1.200".parse().unwrap();
    let exact = a
        .allocate_owned(
            key(2, "node-a"),
            &candidates(),
            Some(wanted),
            &owner(2, "node-a"),
        )
        .unwrap();
    assert_eq!(exact.address, wanted);
    // The agent stops before its flush: the claims are in its journal,
    // not in the API server yet.
    drop(a);
    assert!(claims_in(&api).is_empty());
    // A new agent for the same node: it takes its journal's claims back,
    // answers a repeated ADD with the same address, and writes the claims.
    let a = node_with(&api, "node-a", "172.16.1.0/24", open(), |_| ());
    assert_eq!(a.allocated(), 2);
    let again = a
        .allocate_owned(key(1, "node-a"), &candidates(), None, &owner(1, "node-a"))
        .unwrap();
    assert_eq!(again.address, first.address);
    eventually("the journal's claims reach the API server", || {
        claims_in(&api).len() == 2
    });
    // Another node asking for an address that node holds is told so.
    let b = node(&api, "node-b", "172.16.1.0/24");
    let err = b
        .allocate_owned(
            key(3, "node-b"),
            &candidates(),
            Some(wanted),
            &owner(3, "node-b"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("172.16.1.200") && err.contains("held"),
        "{err}"
    );
    // The claim records the pod as a person would look it up.
    let (_, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    let claim = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|b| b["spec"]["claims"].get("172.16.1.200").cloned())
        .unwrap();
    assert_eq!(claim["podName"], "trainer-2");
    assert_eq!(claim["podNamespace"], "ai");
    assert_eq!(claim["podUID"], "uid-node-a-2");
    assert_eq!(claim["node"], "node-a");
    // DEL gives the address back; an emptied block of ours is deleted
    // after its grace, so other nodes can claim its range.
    a.release(&first.key.container_id, "net1").unwrap();
    a.release(&exact.key.container_id, "net1").unwrap();
    a.flush().unwrap();
    assert!(claims_in(&api).is_empty());
    until("the emptied blocks are deleted", || {
        let (_, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
        match list["items"].as_array() {
            Some(items) if items.is_empty() => Ok(()),
            _ => Err(format!("(left: {:#})", list["items"])),
        }
    });
    // A claim released while the agent was away (here: its whole block
    // deleted) is not taken back from the journal.
    let gone = a
        .allocate_owned(key(4, "node-a"), &candidates(), None, &owner(4, "node-a"))
        .unwrap();
    a.flush().unwrap();
    drop(a);
    // Its first block again: a node begins its search where its name
    // says, so the same address.
    assert_eq!(gone.address, first.address);
    let name = block_name(
        "rail1",
        &ipnet::IpNet::new(gone.address, 28).unwrap().trunc(),
    );
    let (code, _) = api.delete(&format!("/apis/railnet.io/v1alpha1/railblocks/{name}"));
    assert_eq!(code, 200);
    let a = node_with(&api, "node-a", "172.16.1.0/24", open(), |_| ());
    assert_eq!(a.allocated(), 0, "{:?}", a.allocations());
}

/// The real agent in Kubernetes mode, driven by the real `railnet-ipam`
/// binary as a main plugin (the reference macvlan, sriov-cni) executes it:
/// claims land in the API server with the pod's identity; with the API
/// server gone ADD answers CNI code 11 (the runtime retries) naming it,
/// and a second agent for the node refuses to start.
#[test]
fn the_agent_claims_in_the_api_server_and_asks_for_a_retry_while_it_is_gone() {
    let mut api = server();
    let pools =
        json!({"pools": [{"name": "rail1", "subnet": "172.16.1.0/24", "gateway": "172.16.1.254"}]});
    let kubeconfig = api.kubeconfig();
    // Blocks of 4 addresses (.1-.3 in the first): the outage below meets
    // the end of one.
    let flags = [
        "--ipam-store",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--block-prefix-v4",
        "30",
    ];
    // The agent's "node" is the API server's netns: the only place its
    // loopback address is reachable.
    let mut agent = Agent::start_with(&api.ns, &pools, &flags);
    let bin = ScratchDir::new("cnibin");
    let ipam = bin.path().join("railnet-ipam");
    std::os::unix::fs::symlink(binary("RAILNET_CNI_BIN", "railnet"), &ipam).unwrap();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "rail1", "type": "macvlan", "master": "eth1",
        "agentSocket": agent.socket,
        "ipam": {"type": "railnet-ipam", "ippools": {"ipv4": ["rail1"]}},
    });
    let add = |cid: &str| plugin(&ipam, "ADD", &conf, cid, None, "net1", "/nonexistent");
    let out = add("c-first");
    assert!(out.ok, "{}\n{}", out.stdout, agent.log());
    assert_eq!(out.json["ips"][0]["address"], "172.16.1.1/24");
    // The claim follows within a flush.
    eventually("the claim is written", || claims_in(&api).len() == 1);
    let claims = claims_in(&api);
    assert_eq!(
        claims,
        vec![(
            "172.16.1.1".parse().unwrap(),
            "c-first".to_owned(),
            "net1".to_owned()
        )]
    );
    let (_, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    let claim = &list["items"][0]["spec"]["claims"]["172.16.1.1"];
    assert_eq!(claim["podName"], "demo", "{claim}");
    assert_eq!(claim["podNamespace"], "default", "{claim}");
    assert_eq!(claim["node"], api.ns.name(), "{claim}");

    // A second agent for the same node (same socket) refuses to start.
    let second = agent.command(&api.ns).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("another railnet-agent"), "{stderr}");
    assert!(agent.socket.exists(), "the first agent's socket was taken");

    // The API server goes away: the node keeps serving the addresses it
    // holds; a pod that needs a new block is told to try again (11).
    api.kill_server();
    for (cid, address) in [("c-second", "172.16.1.2/24"), ("c-third", "172.16.1.3/24")] {
        let out = add(cid);
        assert!(out.ok, "{}\n{}", out.stdout, agent.log());
        assert_eq!(out.json["ips"][0]["address"], address);
    }
    let out = add("c-fourth");
    assert!(!out.ok);
    assert_eq!(out.json["code"], 11, "{}", out.stdout);
    let msg = format!("{} {}", out.json["msg"], out.json["details"]);
    assert!(msg.contains("Kubernetes API server"), "{msg}");
    // Back: the claims made meanwhile are written, the kubelet's retry is
    // served, the first pod untouched.
    api.restart_server();
    let out = add("c-fourth");
    assert!(out.ok, "{}\n{}", out.stdout, agent.log());
    assert_eq!(out.json["ips"][0]["address"], "172.16.1.4/24");
    let out = plugin(&ipam, "DEL", &conf, "c-first", None, "net1", "/nonexistent");
    assert!(out.ok, "{}", out.stdout);
    eventually("the API server holds what the node holds", || {
        let mut left: Vec<String> = claims_in(&api).into_iter().map(|(_, c, _)| c).collect();
        left.sort();
        left == ["c-fourth", "c-second", "c-third"]
    });
    // The API writes are counted: at least the two blocks claimed; the
    // claims' writes are shared, so fewer than one per change (7 here).
    let metrics = agent.scrape(&api.ns, "/metrics");
    let writes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("railnet_ipam_api_writes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!((2..7).contains(&writes), "{writes} writes\n{metrics}");
    assert!(metrics.contains("railnet_ipam_api_write_conflicts_total 0"));
    // SIGTERM: the agent ends cleanly (writing what it has left); the
    // claims are in the API server.
    let out = add("c-fifth");
    assert!(out.ok, "{}", out.stdout);
    agent.stop();
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
    assert!(
        claims_in(&api).iter().any(|(_, c, _)| c == "c-fifth"),
        "{}",
        agent.log()
    );
}

/// Pools as users of the seeds write them: RailPool objects, read by every
/// agent in Kubernetes mode (no pools file), applied as they change.
#[test]
fn rail_pools_created_in_the_api_server_serve_pods_within_seconds() {
    let api = server();
    let kubeconfig = api.kubeconfig();
    let agent = Agent::start_with(
        &api.ns,
        &json!({"pools": []}),
        &[
            "--ipam-store",
            "kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--pool-refresh",
            "1",
        ],
    );
    let bin = ScratchDir::new("cnibin");
    let ipam = bin.path().join("railnet-ipam");
    std::os::unix::fs::symlink(binary("RAILNET_CNI_BIN", "railnet"), &ipam).unwrap();
    let conf = |pool: &str| {
        json!({
            "cniVersion": "1.0.0", "name": pool, "type": "macvlan", "master": "eth1",
            "agentSocket": agent.socket,
            "ipam": {"type": "railnet-ipam", "ippools": {"ipv4": [pool]}},
        })
    };
    let add = |pool: &str, cid: &str| plugin(&ipam, "ADD", &conf(pool), cid, None, "net1", "/x");
    // Before the pool exists: refused, naming it.
    let out = add("gpu1-net11", "c0");
    assert!(!out.ok);
    assert!(out.stdout.contains("gpu1-net11"), "{}", out.stdout);
    // The seeds' SpiderIPPool, as a RailPool (a range excluded).
    let pool = |name: &str, spec: Value| {
        json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailPool",
               "metadata": {"name": name}, "spec": spec})
    };
    let (code, body) = api.post(
        "/apis/railnet.io/v1alpha1/railpools",
        &pool(
            "gpu1-net11",
            json!({"subnet": "172.16.11.0/24", "gateway": "172.16.11.254",
                   "ips": ["172.16.11.1-172.16.11.200"], "excludeIPs": ["172.16.11.1-172.16.11.3"]}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = api.post(
        "/apis/railnet.io/v1alpha1/railpools",
        &pool(
            "by-labels",
            json!({"subnet": "172.16.12.0/24", "nodeAffinity": {"matchLabels": {"rail": "2"}}}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = add("gpu1-net11", "c1");
        if out.ok || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(out.ok, "{}\n{}", out.stdout, agent.log());
    assert_eq!(
        out.json["ips"][0]["address"], "172.16.11.4/24",
        "excluded range skipped"
    );
    assert_eq!(out.json["ips"][0]["gateway"], "172.16.11.254");
    // A pool the agent cannot evaluate is left out, and the log says why.
    let out = add("by-labels", "c2");
    assert!(!out.ok);
    assert!(
        agent.log().contains("RailPool by-labels: nodeAffinity"),
        "{}",
        agent.log()
    );
    // The pool deleted: no new pods from it; the pod that has an address
    // keeps it (and releases it on DEL).
    let (code, _) = api.delete("/apis/railnet.io/v1alpha1/railpools/gpu1-net11");
    assert_eq!(code, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while add("gpu1-net11", "c3").ok {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted pool still serves"
        );
        let _ = plugin(&ipam, "DEL", &conf("gpu1-net11"), "c3", None, "net1", "/x");
        std::thread::sleep(Duration::from_millis(300));
    }
    eventually("c1 keeps its address, c3's is released", || {
        claims_in(&api).len() == 1
    });
    let out = plugin(&ipam, "DEL", &conf("gpu1-net11"), "c1", None, "net1", "/x");
    assert!(out.ok, "{}", out.stdout);
    eventually("c1's release is written", || claims_in(&api).is_empty());
}

/// The controller's claim sweep against the real API server, with the live
/// pod UIDs given (this server has no pods API; the pod listing itself is
/// tested against kube-rs's mock service in railnet_agent::controller):
/// claims of gone pods are released after the grace period, live pods' and
/// UID-less claims are not.
#[test]
fn claims_of_pods_that_are_gone_are_released_after_the_grace_period() {
    let api = server();
    let a = node(&api, "node-a", "172.16.1.0/24");
    for i in 0..4 {
        let mut o = owner(i, "node-a");
        if i == 3 {
            o.pod_uid.clear(); // a runtime that did not say
        }
        a.allocate_owned(key(i, "node-a"), &candidates(), None, &o)
            .unwrap();
    }
    a.flush().unwrap();
    let (code, body) = api.post(
        "/apis/railnet.io/v1alpha1/railpools",
        &json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailPool", "metadata": {"name": "rail1"},
                "spec": {"subnet": "172.16.1.0/24", "gateway": "172.16.1.254"}}),
    );
    assert_eq!(code, 201, "{body}");
    let kubeconfig = api.kubeconfig();
    let released = api.inside(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = railnet_agent::kube_api::client(Some(&kubeconfig), Duration::from_secs(5))
                .await
                .unwrap();
            let mut sweeper =
                railnet_agent::controller::ClaimSweeper::new(Duration::from_millis(800));
            let live: HashSet<String> = ["uid-node-a-0".to_owned()].into();
            let first = sweeper.pass(&client, &live).await.unwrap();
            tokio::time::sleep(Duration::from_millis(900)).await;
            // Pod 2 came back (listed late): not released.
            let live: HashSet<String> =
                ["uid-node-a-0".to_owned(), "uid-node-a-2".to_owned()].into();
            let second = sweeper.pass(&client, &live).await.unwrap();
            // What `kubectl get railpools` shows: the claims left, out of
            // what the pool can hand out.
            assert_eq!(
                railnet_agent::controller::pool_status(&client)
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(
                railnet_agent::controller::pool_status(&client)
                    .await
                    .unwrap(),
                0,
                "unchanged: no write"
            );
            (first, second)
        })
    });
    assert_eq!(
        released,
        (0, 1),
        "nothing within the grace period, then pod 1's claim"
    );
    let left: HashSet<String> = claims_in(&api).into_iter().map(|(_, c, _)| c).collect();
    assert_eq!(
        left,
        ["node-a-pod0", "node-a-pod2", "node-a-pod3"]
            .map(String::from)
            .into()
    );
    let (_, table) = api.get_table("/apis/railnet.io/v1alpha1/railpools");
    let cell = |name: &str| railnet_tests::apiserver::cell(&table, 0, name);
    assert_eq!(cell("Allocated"), 3, "{table}");
    assert_eq!(
        cell("Total"),
        253,
        "/24 less network, broadcast and gateway: {table}"
    );
}

/// A node that holds addresses it does not use lends them when another
/// node needs them, even while it serves nothing itself (it watches its
/// blocks); a node that is gone cannot, and the refusal says which node
/// holds the addresses.
#[test]
fn an_idle_node_lends_its_held_addresses_to_a_node_that_needs_them() {
    let api = server();
    // A /27: two blocks of 15 usable addresses.
    let a = node(&api, "node-a", "172.16.1.0/27");
    let b = node(&api, "node-b", "172.16.1.0/27");
    a.allocate_owned(key(0, "node-a"), &candidates(), None, &owner(0, "node-a"))
        .unwrap();
    for i in 0..15 {
        b.allocate_owned(key(i, "node-b"), &candidates(), None, &owner(i, "node-b"))
            .unwrap_or_else(|e| panic!("node-b pod {i}: {e}"));
    }
    // node-b's block is full and the other is node-a's: node-a lends.
    let lent = b
        .allocate_owned(key(15, "node-b"), &candidates(), None, &owner(15, "node-b"))
        .expect("node-a lends one of the 14 addresses it holds and does not use");
    assert!(lent.address.to_string().starts_with("172.16.1."));
    let (_, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    let held: usize = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["spec"]["node"] == "node-a")
        .map(|b| b["spec"]["held"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(held, 1, "node-a keeps holding only what it uses: {list}");
    drop((a, b, api));
    // A node that holds addresses but is gone cannot lend: the refusal
    // names it. (A /28: one block.)
    let api = server();
    let gone = node(&api, "node-x", "172.16.2.0/28");
    gone.allocate_owned(key(0, "node-x"), &candidates(), None, &owner(0, "node-x"))
        .unwrap();
    drop(gone);
    let y = node(&api, "node-y", "172.16.2.0/28");
    let err = y
        .allocate_owned(key(0, "node-y"), &candidates(), None, &owner(0, "node-y"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exhausted")
            && err.contains("node-x")
            && err.contains("railnet-agent running"),
        "{err}"
    );
}

/// The controller's block sweep against the real API server, with the
/// live node names given (this server has no nodes API): after the grace,
/// a deleted node's held addresses are released — another node then takes
/// them — and, once its pods' claims are gone too, its block is deleted.
#[test]
fn blocks_of_a_node_that_is_gone_are_given_back_after_the_grace_period() {
    let api = server();
    // A /28: one block. node-x takes it, serves one pod, and is deleted.
    let x = node(&api, "node-x", "172.16.3.0/28");
    let held = x
        .allocate_owned(key(0, "node-x"), &candidates(), None, &owner(0, "node-x"))
        .unwrap();
    x.flush().unwrap();
    drop(x);
    let kubeconfig = api.kubeconfig();
    let mut sweeper = railnet_agent::controller::BlockSweeper::new(Duration::from_millis(800));
    let mut sweep = |live: &[&str]| -> usize {
        let live: HashSet<String> = live.iter().map(|s| s.to_string()).collect();
        let (kubeconfig, sweeper) = (kubeconfig.clone(), &mut sweeper);
        api.inside(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client =
                    railnet_agent::kube_api::client(Some(&kubeconfig), Duration::from_secs(5))
                        .await
                        .unwrap();
                sweeper.pass(&client, &live).await.unwrap()
            })
        })
    };
    let y = node(&api, "node-y", "172.16.3.0/28");
    let refused = y
        .allocate_owned(key(0, "node-y"), &candidates(), None, &owner(0, "node-y"))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("node-x"), "{refused}");
    // Within the grace: nothing; a node still listed: never.
    assert_eq!(sweep(&["node-y"]), 0);
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(
        sweep(&["node-y", "node-x"]),
        0,
        "node-x is back in the list"
    );
    assert_eq!(
        sweep(&["node-y"]),
        0,
        "missing again: the grace starts over"
    );
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(sweep(&["node-y"]), 1, "node-x's held addresses released");
    let got = y
        .allocate_owned(key(1, "node-y"), &candidates(), None, &owner(1, "node-y"))
        .expect("node-y takes an address node-x held");
    assert_ne!(got.address, held.address, "node-x's pod keeps its claim");
    // node-x's pod is gone too (the claim sweep's part, here by hand): its
    // block, with node-y's claim in it, stays; node-y's release empties it
    // and the next pass deletes it.
    let (_, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    let mut block = list["items"][0].clone();
    let name = block["metadata"]["name"].as_str().unwrap().to_owned();
    block["spec"]["claims"]
        .as_object_mut()
        .unwrap()
        .remove(&held.address.to_string());
    let (code, body) = api.put(
        &format!("/apis/railnet.io/v1alpha1/railblocks/{name}"),
        &block,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(sweep(&["node-y"]), 0, "node-y's claim keeps the block");
    y.release(&got.key.container_id, "net1").unwrap();
    y.flush().unwrap();
    assert_eq!(sweep(&["node-y"]), 1, "the emptied block is deleted");
    let (_, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    assert!(list["items"].as_array().unwrap().is_empty(), "{list}");
}

/// What the intercepted client of `lossy` does with the next request.
static FAULT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(PASS);
/// Requests go through.
const PASS: u8 = 0;
/// The next write that lends (leaves a block holding only its claimed
/// addresses) is done by the API server, its answer is lost, and from
/// then on the server cannot be reached.
const LOSE_LEND: u8 = 1;
/// No request reaches the server.
const UNREACHABLE: u8 = 2;

/// The store's client with `FAULT` between it and the API server: the
/// real server does the write, only its answer is lost (which no server
/// can be made to do on cue; a kill would lose the write too, or not).
fn lossy(client: kube::Client) -> kube::Client {
    let service = tower::service_fn(move |req: hyper::Request<kube::client::Body>| {
        let client = client.clone();
        async move {
            let lost = || -> Box<dyn std::error::Error + Send + Sync> {
                "connection reset (the test lost this answer)".into()
            };
            match FAULT.load(Ordering::SeqCst) {
                UNREACHABLE => Err(lost()),
                LOSE_LEND if req.method() == hyper::Method::PUT => {
                    use http_body_util::BodyExt;
                    let (parts, body) = req.into_parts();
                    let bytes = body.collect().await?.to_bytes();
                    let block: Value = serde_json::from_slice(&bytes)?;
                    let held = block["spec"]["held"].as_array().map_or(0, Vec::len);
                    let claims = block["spec"]["claims"].as_object().map_or(0, |c| c.len());
                    let req = hyper::Request::from_parts(parts, bytes.to_vec().into());
                    if held != claims {
                        return client.send(req).await.map_err(Into::into);
                    }
                    let answer = client.send(req).await?;
                    if !answer.status().is_success() {
                        return Ok(answer); // not written: nothing to lose
                    }
                    FAULT.store(UNREACHABLE, Ordering::SeqCst);
                    Err(lost())
                }
                _ => client.send(req).await.map_err(Into::into),
            }
        }
    });
    kube::Client::new(service, "default")
}

/// Hardening 12: node A answers B's lend request; the write lands (A's
/// held addresses are lent) but its answer is lost and A cannot read the
/// block back. A must not go on handing out the held addresses of its
/// stale copy (B may have claimed one), and a later flush must never
/// overwrite B's claim: no address is ever held twice.
#[test]
fn a_lend_whose_answer_is_lost_never_hands_an_address_out_twice() {
    let api = server();
    // One /28: one block, which A claims whole.
    let subnet = "172.16.1.0/28";
    let a = node_with(
        &api,
        "node-a",
        subnet,
        Box::new(MemoryStore::default()),
        |o| {
            o.intercept = Some(lossy);
        },
    );
    let mut given = Vec::new();
    for i in 1..=2 {
        let got = a
            .allocate_owned(key(i, "node-a"), &candidates(), None, &owner(i, "node-a"))
            .unwrap();
        given.push((got.address, format!("node-a-pod{i}")));
    }
    a.flush().unwrap();
    FAULT.store(LOSE_LEND, Ordering::SeqCst);
    // B finds no free block, asks A to lend, and gets a lent address once
    // A's (answer-lost) write is in.
    let b = node(&api, "node-b", subnet);
    let got = b
        .allocate_owned(key(1, "node-b"), &candidates(), None, &owner(1, "node-b"))
        .expect("B is lent an address");
    given.push((got.address, "node-b-pod1".into()));
    assert_eq!(
        FAULT.load(Ordering::SeqCst),
        UNREACHABLE,
        "A's lend answer was lost"
    );
    // A, unable to read its block, must not hand out from its old copy.
    match a.allocate_owned(key(3, "node-a"), &candidates(), None, &owner(3, "node-a")) {
        Ok(got) => given.push((got.address, "node-a-pod3".into())),
        Err(e) => assert!(e.to_string().contains("try again"), "{e}"),
    }
    // The server is back: A serves again, and writes what it made.
    FAULT.store(PASS, Ordering::SeqCst);
    let got = a
        .allocate_owned(key(4, "node-a"), &candidates(), None, &owner(4, "node-a"))
        .expect("A serves once the server answers");
    given.push((got.address, "node-a-pod4".into()));
    a.flush().unwrap();
    b.flush().unwrap();
    let given = each_once(given);
    // The API server agrees: every address given is claimed by whom it
    // was given to, once.
    assert_eq!(claimed(&api), given);
}

/// Many nodes in one process (the scale issue's simulation) share one
/// runtime: stores made with `connect_on` claim, lend and flush as stores
/// with runtimes of their own do — 8 nodes, 15 pods each, from a pool of
/// 126 addresses in 8 blocks (a node that claims two makes another
/// borrow), every address once.
#[test]
fn stores_on_one_shared_runtime_fill_a_pool_without_a_duplicate() {
    let api = server();
    let kubeconfig = api.kubeconfig();
    // Built inside the server's netns: its workers are made there, and the
    // stores' sockets with them.
    let rt = api.inside(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    });
    let subnet = "172.16.32.0/25";
    let nodes: Vec<(String, Arc<Ipam>)> = (0..8)
        .map(|n| {
            let name = format!("node-{n}");
            let mut opts = ClusterOptions::new(&name);
            opts.kubeconfig = Some(kubeconfig.clone());
            opts.timeout = Duration::from_secs(10);
            // A borrower waits for a lender's flush: on a loaded machine
            // (every test its own API server) that can take seconds.
            opts.lend_wait = Duration::from_secs(20);
            let store = ClusterStore::connect_on(opts, rt.handle().clone()).expect("client");
            let ipam = Ipam::with_cluster(
                pools(subnet),
                Arc::new(store),
                Box::new(MemoryStore::default()),
            )
            .expect("load");
            (name, Arc::new(ipam))
        })
        .collect();
    let given: Vec<(IpAddr, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|(name, ipam)| {
                s.spawn(move || {
                    (0..15)
                        .map(|i| {
                            let a = ipam
                                .allocate_owned(key(i, name), &candidates(), None, &owner(i, name))
                                .unwrap_or_else(|e| panic!("{name} pod {i}: {e}"));
                            (a.address, a.key.container_id)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let given = each_once(given);
    for (_, ipam) in &nodes {
        ipam.flush().unwrap();
    }
    assert_eq!(
        claimed(&api),
        given,
        "the API server's claims are what was given"
    );
    drop(nodes);
    rt.shutdown_background();
}
