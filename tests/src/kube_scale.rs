//! Kubernetes-mode IPAM at cluster scale, simulated against one real API
//! server: S nodes, each the agent's own allocator over its own
//! `ClusterStore` (block claims, held addresses, flushes, lend requests,
//! the per-node watch) with its journal on tmpfs, all in this process on
//! one shared runtime. A job launch: every node starts P pods at once, 8
//! rails each, allocated one after another as Multus calls them; a pod
//! whose ADD fails gives back what it got and is tried again 10–15 s
//! later, as kubelet does with a failed sandbox.
//!
//! What is measured is what the API server saw and what the pods got; the
//! verdict (no address twice, no acknowledged allocation lost, the short
//! pools filled) is read from the API server's RailBlocks, not from the
//! simulated nodes' own accounts. `cargo xtask bench kube-scale` prints it
//! for S = 100, 250, 500; the test `cluster_ipam_scale` runs S = 50.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Barrier, Mutex},
    time::{Duration, Instant},
};

use railnet_agent::ipam::{
    AllocationKey, Candidates, Family, Ipam, PoolSpec, RedbStore,
    cluster::{ClusterOptions, ClusterStore, Owner, Traffic},
};
use serde_json::{Value, json};

use crate::apiserver::ApiServer;

/// Rails per pod (the seeds' 8-GPU nodes).
pub const RAILS: usize = 8;

/// How the pools are sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pools {
    /// Per-rail pools shared cluster-wide, far larger than the job (the
    /// seeds' Solution 1): every node claims blocks of its own.
    Plenty,
    /// Exactly as many addresses per rail as the job has pods: half the
    /// nodes find no block left and must borrow held addresses from the
    /// others, and the pools end full to their last address.
    Short,
}

/// One job launch.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Simulated nodes.
    pub nodes: usize,
    /// Pods each node starts at once.
    pub pods_per_node: usize,
    /// How the pools are sized.
    pub pools: Pools,
    /// When to give up on pods that still lack rails (they are reported).
    pub deadline: Duration,
}

/// What one launch did, and what the API server holds after it.
#[derive(Debug)]
pub struct Report {
    /// The launch.
    pub scenario: Scenario,
    /// From the barrier until the last pod had all its rails (or the
    /// deadline).
    pub elapsed: Duration,
    /// Latency of each successful allocation, ms, sorted.
    pub latencies_ms: Vec<f64>,
    /// Pods that got every rail.
    pub pods_done: usize,
    /// Pod attempts that failed and were tried again, and the first few
    /// reasons.
    pub pod_retries: usize,
    /// Distinct reasons of those failures, with counts.
    pub failure_reasons: BTreeMap<String, usize>,
    /// The nodes' requests, summed.
    pub traffic: Traffic,
    /// The API server's own count of requests on RailBlocks, by verb.
    pub server_requests: BTreeMap<String, u64>,
    /// What API Priority and Fairness did (kube-apiserver; empty on the
    /// CRD server, which runs without it).
    pub flow_control: Vec<FlowControl>,
    /// CPU seconds and peak resident MB of the API server and of etcd
    /// over the run.
    pub apiserver_usage: ProcUsage,
    /// The same for etcd.
    pub etcd_usage: ProcUsage,
    /// The same for the simulated nodes (this process: they share the
    /// machine's CPUs with the server).
    pub nodes_usage: ProcUsage,
    /// RailBlocks at the end.
    pub blocks: usize,
    /// Ground-truth violations, each a sentence; empty when correct.
    pub violations: Vec<String>,
}

/// A process's CPU time and peak memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcUsage {
    /// User + system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set (VmHWM), MB.
    pub peak_mb: f64,
}

impl ProcUsage {
    /// Reads `/proc/<pid>`.
    pub fn of(pid: u32) -> Self {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime is the
        // 12th, stime the 13th of them.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Self {
            cpu_s: (ticks(11) + ticks(12)) / hz,
            peak_mb: hwm_kb / 1024.0,
        }
    }

    /// CPU used since `before` (peak memory as now).
    fn since(self, before: ProcUsage) -> Self {
        Self {
            cpu_s: self.cpu_s - before.cpu_s,
            peak_mb: self.peak_mb,
        }
    }
}

/// Rail `k`'s pool for scenario `s`: a /16 of its own; in the short case
/// a range of exactly nodes × pods addresses from its start.
fn pool_spec(k: usize, s: &Scenario) -> PoolSpec {
    let base = Ipv4Addr::new(172, 16 + k as u8, 0, 0);
    let mut spec = json!({"name": format!("rail{k}"), "subnet": format!("{base}/16")});
    if s.pools == Pools::Short {
        let first = u32::from(base) + 1;
        let last = first + (s.nodes * s.pods_per_node) as u32 - 1;
        spec["ips"] = json!([format!(
            "{}-{}",
            Ipv4Addr::from(first),
            Ipv4Addr::from(last)
        )]);
    }
    serde_json::from_value(spec).expect("a valid pool")
}

/// One simulated node.
struct Node {
    name: String,
    ipam: Ipam,
    store: Arc<ClusterStore>,
}

/// What pods were given: (pool, address) → (container ID, interface).
type Given = HashMap<(String, IpAddr), (String, String)>;

/// Runs scenario `s` against `api` (a fresh server: its CPU and memory
/// are charged to this run), with `tune` applied to every node's options
/// after the agent's defaults.
pub fn run(api: &ApiServer, s: Scenario, tune: impl Fn(&mut ClusterOptions)) -> Report {
    let specs: Vec<PoolSpec> = (1..=RAILS).map(|k| pool_spec(k, &s)).collect();
    let journals = Tmpfs::new();
    // One runtime for every node's requests, made inside the server's
    // netns so its sockets reach 127.0.0.1 there.
    let rt = api.inside(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sim-nodes")
            .enable_all()
            .build()
            .expect("runtime")
    });
    if api.is_kube() {
        grant_agent_role(api);
    }
    let nodes: Vec<Node> = (0..s.nodes)
        .map(|n| {
            let name = format!("gpu-{n:04}");
            let mut opts = ClusterOptions::new(&name);
            // On kube-apiserver each node is its own identity (a token of
            // its own, the chart's agent role), as a cluster's agents are.
            opts.kubeconfig = Some(if api.is_kube() {
                api.identity_kubeconfig(n)
            } else {
                api.kubeconfig()
            });
            tune(&mut opts);
            let store =
                Arc::new(ClusterStore::connect_on(opts, rt.handle().clone()).expect("client"));
            let journal =
                RedbStore::open(&journals.0.join(format!("{name}.redb"))).expect("journal");
            let ipam = Ipam::with_cluster(specs.clone(), store.clone(), Box::new(journal))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            Node { name, ipam, store }
        })
        .collect();
    let (server_pid, etcd_pid) = api.pids();
    let (api0, etcd0) = (ProcUsage::of(server_pid), ProcUsage::of(etcd_pid));
    let nodes0 = ProcUsage::of(std::process::id());
    let metrics0 = api.get_text("/metrics");

    let pods = s.nodes * s.pods_per_node;
    let start = Barrier::new(pods + 1);
    let given: Mutex<Given> = Mutex::default();
    let failures: Mutex<BTreeMap<String, usize>> = Mutex::default();
    let mut launched = Instant::now();
    let mut finished_at: Vec<Option<Instant>> = Vec::new();
    let mut latencies = Vec::new();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for node in &nodes {
            for p in 0..s.pods_per_node {
                let (start, given, failures) = (&start, &given, &failures);
                let deadline = s.deadline;
                let h = std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        start.wait();
                        pod(node, p, deadline, given, failures)
                    })
                    .expect("a pod thread");
                handles.push(h);
            }
        }
        start.wait();
        launched = Instant::now();
        for h in handles {
            let (done, lat) = h.join().expect("pod thread");
            finished_at.push(done);
            latencies.extend(lat);
        }
    });
    let pods_done = finished_at.iter().filter(|d| d.is_some()).count();
    let last = finished_at.iter().flatten().max().copied();
    let elapsed = match last {
        Some(t) if pods_done == pods => t - launched,
        _ => launched.elapsed(),
    };
    // Every claim made from held addresses written before counting (the
    // agent's flush retries every 200 ms; so does this, for two minutes).
    let mut unflushed = Vec::new();
    for n in &nodes {
        let until = Instant::now() + Duration::from_secs(120);
        while let Err(e) = n.ipam.flush() {
            if Instant::now() >= until {
                unflushed.push(format!("{}: {e}", n.name));
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let apiserver_usage = ProcUsage::of(server_pid).since(api0);
    let nodes_usage = ProcUsage::of(std::process::id()).since(nodes0);
    let etcd_usage = ProcUsage::of(etcd_pid).since(etcd0);
    let metrics1 = api.get_text("/metrics");
    let server_requests = server_requests(&metrics0, &metrics1);
    let flow_control = flow_control(&metrics0, &metrics1);
    let traffic = nodes
        .iter()
        .map(|n| n.store.traffic())
        .fold(Traffic::default(), |a, b| a + b);
    let given = given.into_inner().unwrap();
    let (blocks, mut violations) = verify(api, &s, &specs, &given);
    if std::env::var_os("RAILNET_SCALE_DEBUG").is_some() {
        for n in &nodes {
            let held: Vec<_> = n
                .ipam
                .allocations()
                .into_iter()
                .filter(|a| !given.contains_key(&(a.pool.clone(), a.address)))
                .map(|a| format!("{} {}", a.key.container_id, a.key.ifname))
                .collect();
            if !held.is_empty() || n.store.unwritten() > 0 {
                eprintln!(
                    "{}: unwritten {}, held but not given: {held:?}",
                    n.name,
                    n.store.unwritten()
                );
            }
        }
    }
    if let Some(first) = unflushed.first() {
        violations.push(format!(
            "{} nodes could not write their claims in two minutes, e.g. {first}",
            unflushed.len()
        ));
    }
    if pods_done < pods {
        violations.push(format!(
            "{} of {pods} pods still lacked a rail after {:?}",
            pods - pods_done,
            s.deadline
        ));
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let failure_reasons = failures.into_inner().unwrap();
    drop(nodes);
    rt.shutdown_background();
    Report {
        scenario: s,
        elapsed,
        latencies_ms: latencies,
        pods_done,
        pod_retries: failure_reasons.values().sum(),
        failure_reasons,
        traffic,
        server_requests,
        flow_control,
        apiserver_usage,
        etcd_usage,
        nodes_usage,
        blocks,
        violations,
    }
}

/// One pod: its rails one after another; on a failure, what it got is
/// given back and the pod tried again 10–15 s later, as kubelet does (a
/// failed sandbox is torn down, DEL retried until it succeeds, and the
/// pod worker requeued after `workerBackOffPeriod`, 10 s with up to 50 %
/// jitter). Returns when it had every rail (`None`: not by the deadline)
/// and its allocations' latencies.
fn pod(
    node: &Node,
    p: usize,
    deadline: Duration,
    given: &Mutex<Given>,
    failures: &Mutex<BTreeMap<String, usize>>,
) -> (Option<Instant>, Vec<f64>) {
    let until = Instant::now() + deadline;
    let owner = Owner {
        netns: Default::default(),
        network: "rails".into(),
        pod_namespace: "training".into(),
        pod_name: format!("{}-worker-{p}", node.name),
        pod_uid: format!("uid-{}-{p}", node.name),
    };
    let mut latencies = Vec::new();
    for attempt in 0.. {
        let container = format!("{}-{p}-{attempt}", node.name);
        let mut got = Vec::new();
        let mut failed = None;
        for k in 1..=RAILS {
            let (key, c) = rail_ask(&container, k);
            let t0 = Instant::now();
            match node.ipam.allocate_owned(key, &c, None, &owner) {
                Ok(a) => {
                    latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                    got.push(a);
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    if std::env::var_os("RAILNET_SCALE_DEBUG").is_some() {
                        eprintln!("{container} failed at net{k} after {:?}: {e}", t0.elapsed());
                    }
                    break;
                }
            }
        }
        match failed {
            None => {
                let mut g = given.lock().unwrap();
                for a in got {
                    g.insert(
                        (a.pool.clone(), a.address),
                        (a.key.container_id.clone(), a.key.ifname.clone()),
                    );
                }
                return (Some(Instant::now()), latencies);
            }
            Some(why) => {
                *failures.lock().unwrap().entry(reason(&why)).or_default() += 1;
                // kubelet calls DEL until it succeeds.
                while let Err(e) = node.ipam.release_container(&container) {
                    let why = format!("DEL: {e}");
                    *failures.lock().unwrap().entry(reason(&why)).or_default() += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                if Instant::now() >= until {
                    return (None, latencies);
                }
                // Jitter from the pod's own name and attempt: pods that
                // failed together do not come back together.
                let seed = node
                    .name
                    .bytes()
                    .fold(p * 7919 + attempt * 104_729, |h, b| {
                        h.wrapping_mul(31).wrapping_add(usize::from(b))
                    });
                let jitter = seed % 5000;
                std::thread::sleep(Duration::from_millis(10_000 + jitter as u64));
            }
        }
    }
    unreachable!()
}

/// What Multus's call for rail `k` of `container` asks the allocator:
/// interface `net<k>`, IPv4, from pool `rail<k>`.
pub fn rail_ask(container: &str, k: usize) -> (AllocationKey, Candidates) {
    (
        AllocationKey {
            container_id: container.to_owned(),
            ifname: format!("net{k}"),
            family: Family::V4,
        },
        Candidates {
            pools: vec![format!("rail{k}")],
            rejected: vec![],
        },
    )
}

/// A failure's message without the parts that differ per pod (addresses,
/// node names, numbers), so reasons can be counted.
fn reason(why: &str) -> String {
    let mut out = String::new();
    let mut last_digit = false;
    for c in why.chars() {
        let d = c.is_ascii_digit();
        if d && !last_digit {
            out.push('N');
        } else if !d {
            out.push(c);
        }
        last_digit = d;
    }
    out.replace("gpu-N", "gpu-…")
}

/// A Prometheus text exposition's samples of metric `name`, each as its
/// labels and value.
fn samples<'a>(
    text: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (BTreeMap<&'a str, &'a str>, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (labels, value) = rest.rsplit_once("} ")?;
        let labels = labels
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                Some((k, v.trim_end_matches('"')))
            })
            .collect();
        Some((labels, value.trim().parse().ok()?))
    })
}

/// Counters of `name` summed by `key` of their labels, for samples
/// `keep` accepts; the difference `after - before`.
fn counter_delta(
    before: &str,
    after: &str,
    name: &str,
    keep: impl Fn(&BTreeMap<&str, &str>) -> bool,
    key: impl Fn(&BTreeMap<&str, &str>) -> String,
) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (text, sign) in [(after, 1.0), (before, -1.0)] {
        for (labels, v) in samples(text, name).filter(|(l, _)| keep(l)) {
            *out.entry(key(&labels)).or_default() += sign * v;
        }
    }
    out.retain(|_, v| *v > 0.0);
    out
}

/// The API server's count of requests on RailBlocks by verb between two
/// readings of its `/metrics` (`apiserver_request_total`).
fn server_requests(before: &str, after: &str) -> BTreeMap<String, u64> {
    counter_delta(
        before,
        after,
        "apiserver_request_total",
        |l| l.get("resource") == Some(&"railblocks"),
        |l| l.get("verb").copied().unwrap_or("?").to_owned(),
    )
    .into_iter()
    .map(|(k, v)| (k, v as u64))
    .collect()
}

/// What API Priority and Fairness did with one flow schema's requests
/// during the run (kube-apiserver only).
#[derive(Clone, Debug, Default)]
pub struct FlowControl {
    /// The FlowSchema that classified them.
    pub flow_schema: String,
    /// The priority level it sent them to.
    pub priority_level: String,
    /// Requests let through.
    pub dispatched: u64,
    /// Requests refused with 429, by reason (queue full, time out…).
    pub rejected: BTreeMap<String, u64>,
    /// Mean time a dispatched request waited in its queue, ms.
    pub mean_wait_ms: f64,
}

/// API Priority and Fairness between two readings of `/metrics`: one row
/// per flow schema that dispatched or rejected anything, the exempt
/// (the harness's admin) left out.
fn flow_control(before: &str, after: &str) -> Vec<FlowControl> {
    let by_schema = |l: &BTreeMap<&str, &str>| {
        format!(
            "{}\t{}",
            l.get("flow_schema").unwrap_or(&"?"),
            l.get("priority_level").unwrap_or(&"?")
        )
    };
    let not_exempt = |l: &BTreeMap<&str, &str>| l.get("priority_level") != Some(&"exempt");
    let dispatched = counter_delta(
        before,
        after,
        "apiserver_flowcontrol_dispatched_requests_total",
        not_exempt,
        by_schema,
    );
    let rejected = counter_delta(
        before,
        after,
        "apiserver_flowcontrol_rejected_requests_total",
        not_exempt,
        |l| {
            format!(
                "{}\t{}",
                by_schema(l),
                l.get("reason").copied().unwrap_or("?")
            )
        },
    );
    let executed = |l: &BTreeMap<&str, &str>| not_exempt(l) && l.get("execute") == Some(&"true");
    let wait_sum = counter_delta(
        before,
        after,
        "apiserver_flowcontrol_request_wait_duration_seconds_sum",
        executed,
        by_schema,
    );
    let wait_count = counter_delta(
        before,
        after,
        "apiserver_flowcontrol_request_wait_duration_seconds_count",
        executed,
        by_schema,
    );
    let mut rows: BTreeMap<String, FlowControl> = BTreeMap::new();
    fn row<'a>(rows: &'a mut BTreeMap<String, FlowControl>, key: &str) -> &'a mut FlowControl {
        rows.entry(key.to_owned()).or_insert_with(|| {
            let (schema, level) = key.split_once('\t').unwrap_or((key, "?"));
            FlowControl {
                flow_schema: schema.to_owned(),
                priority_level: level.to_owned(),
                ..Default::default()
            }
        })
    }
    for (key, n) in &dispatched {
        let r = row(&mut rows, key);
        r.dispatched = *n as u64;
        let count = wait_count.get(key).copied().unwrap_or(0.0);
        if count > 0.0 {
            r.mean_wait_ms = wait_sum.get(key).copied().unwrap_or(0.0) / count * 1e3;
        }
    }
    for (key, n) in &rejected {
        let (schema_level, reason) = key.rsplit_once('\t').unwrap_or((key, "?"));
        row(&mut rows, schema_level)
            .rejected
            .insert(reason.to_owned(), *n as u64);
    }
    rows.into_values().collect()
}

/// Reads every RailBlock and checks what the pods were told against it:
/// no address claimed twice, no block outside its pool or overlapping
/// another, every acknowledged allocation claimed by whom it was given
/// to, no claim nobody was given (a leak), and in the short case every
/// address of every pool claimed. Returns the block count and the
/// violations.
fn verify(
    api: &ApiServer,
    s: &Scenario,
    specs: &[PoolSpec],
    given: &Given,
) -> (usize, Vec<String>) {
    let (code, list) = api.get("/apis/railnet.io/v1alpha1/railblocks");
    if code != 200 {
        return (0, vec![format!("listing RailBlocks: HTTP {code}: {list}")]);
    }
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let mut v = Vec::new();
    let mut claims: HashMap<(String, IpAddr), (String, String)> = HashMap::new();
    let mut covered: HashMap<String, Vec<ipnet::IpNet>> = HashMap::new();
    for b in &items {
        let name = b["metadata"]["name"].as_str().unwrap_or("?");
        let pool = b["spec"]["pool"].as_str().unwrap_or("").to_owned();
        let Ok(cidr) = b["spec"]["cidr"]
            .as_str()
            .unwrap_or("")
            .parse::<ipnet::IpNet>()
        else {
            v.push(format!("block {name}: no CIDR"));
            continue;
        };
        let nets = covered.entry(pool.clone()).or_default();
        if let Some(o) = nets.iter().find(|n| n.contains(&cidr) || cidr.contains(*n)) {
            v.push(format!("block {name} ({cidr}) overlaps {o} in pool {pool}"));
        }
        nets.push(cidr);
        for (a, c) in b["spec"]["claims"].as_object().into_iter().flatten() {
            let Ok(address) = a.parse::<IpAddr>() else {
                v.push(format!("block {name}: claim of {a:?}, not an address"));
                continue;
            };
            if !cidr.contains(&address) {
                v.push(format!("block {name}: claim of {address} outside {cidr}"));
            }
            let who = (
                c["containerID"].as_str().unwrap_or("").to_owned(),
                c["interface"].as_str().unwrap_or("").to_owned(),
            );
            if let Some(other) = claims.insert((pool.clone(), address), who.clone()) {
                v.push(format!(
                    "{pool} {address} claimed twice: by {other:?} and {who:?}"
                ));
            }
        }
    }
    let mut lost = 0;
    for ((pool, address), who) in given {
        match claims.get(&(pool.clone(), *address)) {
            Some(c) if c == who => {}
            Some(c) => {
                lost += 1;
                if lost <= 5 {
                    v.push(format!(
                        "{pool} {address} was given to {who:?} but the API server says {c:?}"
                    ));
                }
            }
            None => {
                lost += 1;
                if lost <= 5 {
                    v.push(format!(
                        "{pool} {address} was given to {who:?} but no block claims it (lost)"
                    ));
                }
            }
        }
    }
    if lost > 5 {
        v.push(format!("{lost} acknowledged allocations lost in all"));
    }
    let by_who: HashSet<&(String, String)> = given.values().collect();
    let leaked: Vec<_> = claims
        .iter()
        .filter(|(_, who)| !by_who.contains(who))
        .collect();
    if !leaked.is_empty() {
        v.push(format!(
            "{} claims nobody was given (leaked), e.g. {:?}",
            leaked.len(),
            leaked[0]
        ));
        if std::env::var_os("RAILNET_SCALE_DEBUG").is_some() {
            for l in leaked.iter().take(20) {
                eprintln!("leaked: {l:?}");
            }
        }
    }
    if s.pools == Pools::Short {
        for spec in specs {
            let n = claims.keys().filter(|(p, _)| p == &spec.name).count();
            let want = s.nodes * s.pods_per_node;
            if n != want {
                v.push(format!(
                    "pool {} ends with {n} of its {want} addresses claimed, not full",
                    spec.name
                ));
            }
        }
    }
    (items.len(), v)
}

impl Report {
    /// Allocation latency at quantile `q`, ms.
    pub fn latency(&self, q: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        self.latencies_ms[((self.latencies_ms.len() - 1) as f64 * q).round() as usize]
    }

    /// What a person reads: one block per launch.
    pub fn print(&self) {
        let s = &self.scenario;
        let pods = s.nodes * s.pods_per_node;
        let allocs = self.latencies_ms.len();
        let secs = self.elapsed.as_secs_f64();
        println!(
            "   S={:>3} {:?}: {pods} pods x {RAILS} rails, every pod with all its rails in {secs:.1} s ({}/{pods} done)",
            s.nodes, s.pools, self.pods_done
        );
        println!(
            "      {allocs} allocations = {:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; pods retried {}",
            allocs as f64 / secs,
            self.latency(0.5),
            self.latency(0.99),
            self.latency(1.0),
            self.pod_retries
        );
        for (why, n) in &self.failure_reasons {
            println!("         {n} x {why}");
        }
        let t = &self.traffic;
        println!(
            "      API writes {} ({:.2}/pod), conflicts {}, lists {}, ADDs served again {}; watches opened {}, events {}; blocks {}",
            t.writes,
            t.writes as f64 / pods as f64,
            t.conflicts,
            t.lists,
            t.retries,
            t.watches,
            t.watch_events,
            self.blocks
        );
        let verbs: Vec<String> = self
            .server_requests
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect();
        println!(
            "      the API server counted on RailBlocks: {}",
            verbs.join(", ")
        );
        for f in &self.flow_control {
            let rejected: Vec<String> = f
                .rejected
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect();
            println!(
                "      flow control: {} -> {}: {} dispatched, mean queue wait {:.1} ms, rejected (429) {}",
                f.flow_schema,
                f.priority_level,
                f.dispatched,
                f.mean_wait_ms,
                if rejected.is_empty() {
                    "none".to_owned()
                } else {
                    rejected.join(", ")
                }
            );
        }
        println!(
            "      API server {:.1} CPU-s, peak {:.0} MB; etcd {:.1} CPU-s, peak {:.0} MB; the simulated nodes {:.1} CPU-s",
            self.apiserver_usage.cpu_s,
            self.apiserver_usage.peak_mb,
            self.etcd_usage.cpu_s,
            self.etcd_usage.peak_mb,
            self.nodes_usage.cpu_s
        );
        if self.violations.is_empty() {
            println!(
                "      ground truth (the API server's RailBlocks): no address twice, no acknowledged allocation lost, no leak{}",
                if s.pools == Pools::Short {
                    ", every pool full to its last address"
                } else {
                    ""
                }
            );
        } else {
            for v in &self.violations {
                println!("      VIOLATION: {v}");
            }
        }
    }
}

/// The nodes' journals: a directory on tmpfs, removed on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new() -> Self {
        let p = PathBuf::from("/dev/shm").join(crate::unique("railnet-scale"));
        std::fs::create_dir_all(&p).expect("a directory on /dev/shm");
        Self(p)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Binds the agents' identities (the ServiceAccount
/// [`crate::apiserver::AGENT_USER`] names) to what the chart's agent
/// ClusterRole grants on RailBlocks (read from
/// `charts/railnet/templates/rbac.yaml`: a verb the agent needs and the
/// chart forgot fails the run) and nothing else.
#[track_caller]
pub fn grant_agent_role(api: &ApiServer) {
    let rbac = "/apis/rbac.authorization.k8s.io/v1";
    let (code, body) = api.post(
        &format!("{rbac}/clusterroles"),
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "railnet-agent"},
            "rules": [{"apiGroups": ["railnet.io"], "resources": ["railblocks"],
                       "verbs": chart_agent_verbs("railblocks")}],
        }),
    );
    assert!(matches!(code, 201 | 409), "ClusterRole refused: {body}");
    let (code, body) = api.post(
        &format!("{rbac}/clusterrolebindings"),
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "railnet-agent"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "railnet-agent"},
            "subjects": [{"kind": "ServiceAccount", "namespace": "railnet", "name": "railnet-agent"}],
        }),
    );
    assert!(
        matches!(code, 201 | 409),
        "ClusterRoleBinding refused: {body}"
    );
}

/// The verbs the chart's agent ClusterRole grants on `resource` (its rule
/// is written `resources: [<resource>]` with `verbs: [...]` on the next
/// line; the template is not rendered, so the rule is found by its text).
#[track_caller]
fn chart_agent_verbs(resource: &str) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/railnet/templates/rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("the chart's rbac.yaml");
    let mut lines = text.lines();
    lines
        .find(|l| l.trim() == format!("resources: [{resource}]"))
        .and_then(|_| lines.next())
        .and_then(|l| l.trim().strip_prefix("verbs: ["))
        .and_then(|l| l.strip_suffix(']'))
        .map(|v| v.split(',').map(|v| v.trim().to_owned()).collect())
        .unwrap_or_else(|| {
            panic!(
                "no `resources: [{resource}]` rule with its verbs in {}",
                path.display()
            )
        })
}

/// Installs the RailBlock CRD (the chart's) on `api`.
pub fn install_crd(api: &ApiServer) {
    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/railnet/crds/railnet.io_railblocks.yaml");
    let text = std::fs::read_to_string(crd).expect("the chart's RailBlock CRD");
    let crd: Value = serde_norway::from_str(&text).expect("CRD YAML");
    api.install_crd(&crd);
}
