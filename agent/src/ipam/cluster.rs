//! Kubernetes mode's store: the API server (etcd behind it) is the only
//! shared store, and its atomic operations are the only lock.
//!
//! A pool's addresses are cut into aligned blocks (`RailBlock`, cluster
//! scoped). A node claims a block by creating it — create-if-absent, so two
//! nodes can never both own one — with every address of it *held*: its
//! own to hand out. Addresses a node holds go to its pods without an API
//! write: the ADD is made durable in the node's journal (the agent's redb
//! file) and the claims (address → container, interface, pod, node) are
//! written into the block by a flush a moment later, one write per block
//! for every claim made meanwhile. So a pod's eight rail ADDs cost no API
//! round trip, and the writes are shared by every pod of a flush.
//!
//! Nobody else may take a held address. A node that finds no free address
//! and no unclaimed block takes one from another node's block that its
//! owner does not hold (a claim written with the block's resourceVersion
//! as a precondition: a write that lost a race is refused with 409 and
//! retried against the fresh block, never applied twice); if the only
//! free addresses are held, it asks their owner to lend (`lendRequested`),
//! and the owner's next flush gives up the held addresses it has not
//! handed out. So a pool still fills to its last address, and an owner
//! never races anyone for what it holds.
//!
//! A write whose answer was lost (the API server died mid-request) is
//! resolved by reading the block back. While the API server is unreachable
//! a node keeps serving from what it holds (the flush catches up when the
//! server is back); anything needing the server fails fast with
//! [`ClusterError::Unavailable`] and nothing is half-written: each change
//! is one object write.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use backon::BackoffBuilder;
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
};
use serde::{Deserialize, Serialize};

use super::{Allocation, AllocationKey, Family, Pool, pool};
use crate::netns::NetnsId;

/// The block object (`railblocks.railnet.io/v1alpha1`, cluster scoped;
/// charts/railnet/crds/railnet.io_railblocks.yaml).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RailBlock {
    /// `railnet.io/v1alpha1`.
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    /// `RailBlock`.
    #[serde(default)]
    pub kind: String,
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The block.
    pub spec: BlockSpec,
}

/// What a block is and who holds its addresses.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BlockSpec {
    /// Pool name.
    pub pool: String,
    /// The block's network, aligned inside the pool's subnet.
    pub cidr: String,
    /// The node that claimed it.
    pub node: String,
    /// Address (as text) → its claim.
    #[serde(default)]
    pub claims: BTreeMap<String, Claim>,
    /// Addresses the owner hands out without a write (their claims follow
    /// within a flush); no other node may take them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub held: BTreeSet<String>,
    /// Set by a node that found no free address but held ones here: the
    /// owner's next flush gives up those it has not handed out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lend_requested: bool,
}

/// Who holds one address.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    /// CNI container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the pod.
    pub interface: String,
    /// The node that made the claim.
    pub node: String,
    /// The network (NetworkAttachmentDefinition) it was made for.
    #[serde(default)]
    pub network: String,
    /// Pod namespace (CNI_ARGS K8S_POD_NAMESPACE).
    #[serde(default)]
    pub pod_namespace: String,
    /// Pod name.
    #[serde(default)]
    pub pod_name: String,
    /// Pod UID: the sweep releases claims whose pod UID is gone.
    #[serde(default, rename = "podUID")]
    pub pod_uid: String,
    /// The pod netns's inode at ADD (the node's own sweep).
    #[serde(default)]
    pub netns_inode: u64,
    /// That netns's cookie.
    #[serde(default)]
    pub netns_cookie: u64,
}

impl kube::Resource for RailBlock {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "RailBlock".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "railnet.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "railblocks".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

use crate::kube_api::resource;

/// `railpools.railnet.io/v1alpha1`.
pub fn railpools() -> kube::core::ApiResource {
    resource("railnet.io", "v1alpha1", "RailPool", "railpools")
}

/// Most addresses one excludeIPs range may name (it is expanded).
const MAX_EXCLUDED_RANGE: u128 = 65_536;

/// A RailPool's spec as the agent's pool spec (SpiderIPPool's field names
/// on both sides; `namespaceName` is the spec's `namespace`, excludeIPs
/// ranges are expanded).
pub fn pool_spec_of(name: &str, spec: &serde_json::Value) -> Result<super::PoolSpec, String> {
    use serde_json::{Value, json};
    if spec.get("nodeAffinity").is_some() {
        return Err(
            "nodeAffinity is not evaluated by this railnet version; list the nodes in nodeName"
                .into(),
        );
    }
    let mut excluded = Vec::new();
    for e in spec["excludeIPs"].as_array().into_iter().flatten() {
        let text = e.as_str().unwrap_or_default();
        let (a, b) = text.split_once('-').unwrap_or((text, text));
        let (a, b): (IpAddr, IpAddr) =
            match (a.trim().parse::<IpAddr>(), b.trim().parse::<IpAddr>()) {
                (Ok(a), Ok(b)) if a.is_ipv6() == b.is_ipv6() => (a, b),
                _ => {
                    return Err(format!(
                        "excludeIPs {text:?} is not an address or range a-b"
                    ));
                }
            };
        let (lo, hi) = (pool::num(a), pool::num(b));
        if hi < lo || hi - lo >= MAX_EXCLUDED_RANGE {
            return Err(format!(
                "excludeIPs {text:?}: a range must go upwards and hold at most {MAX_EXCLUDED_RANGE} addresses (narrow ips instead)"
            ));
        }
        excluded.extend((lo..=hi).map(|n| Value::from(pool::addr(a.is_ipv6(), n).to_string())));
    }
    let mut out = json!({"name": name, "excludeIPs": excluded});
    for (from, to) in [
        ("subnet", "subnet"),
        ("ips", "ips"),
        ("gateway", "gateway"),
        ("routes", "routes"),
        ("nodeName", "nodeName"),
        ("disable", "disable"),
        ("namespaceName", "namespace"),
        ("networks", "networks"),
    ] {
        if let Some(v) = spec.get(from) {
            out[to] = v.clone();
        }
    }
    serde_json::from_value(out).map_err(|e| e.to_string())
}

/// Label naming a block's pool (blocks of one pool are listed by it).
pub const POOL_LABEL: &str = "railnet.io/pool";
/// Label naming the node that claimed a block.
pub const NODE_LABEL: &str = "railnet.io/node";

/// Who an allocation is for, beyond its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// The pod's netns.
    pub netns: NetnsId,
    /// The network it is made for.
    pub network: String,
    /// Pod namespace, name and UID (empty when the runtime did not say).
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
}

/// What went wrong talking to the cluster.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    /// The pool (or the wanted address) has nothing to give; the reason.
    #[error("{0}")]
    Full(String),
    /// The API server cannot be reached or did not answer; nothing changed
    /// (or a change was read back and found not made).
    #[error(
        "the Kubernetes API server did not serve the request ({0}); nothing was allocated — try again"
    )]
    Unavailable(String),
    /// The API server refused a request for a reason retrying won't fix.
    #[error("the Kubernetes API server refused: {0}")]
    Refused(String),
}

/// How the store talks to the API server.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// This node's name: blocks it claims carry it.
    pub node: String,
    /// A kubeconfig file; `None` infers (KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Prefix length of IPv4 blocks (28: 16 addresses).
    pub block_prefix_v4: u8,
    /// Prefix length of IPv6 blocks (122: 64 addresses).
    pub block_prefix_v6: u8,
    /// How long connecting and sending a request may take: an unreachable
    /// server fails calls within it (5 s).
    pub timeout: Duration,
    /// How long a sent request may wait for its answer (15 s): as long as
    /// kube-apiserver's API Priority and Fairness may queue it before
    /// refusing it with 429 (a quarter of its 60 s request timeout). A
    /// client that gives up sooner turns a busy server's queue into a
    /// failed ADD that kubelet retries 10 s later with a DEL and a new
    /// ADD: at a job launch on 500 nodes, 5 s sent 197 of 4 000 pods back
    /// and took 80 s; 15 s, 27 pods and 44 s (`cargo xtask bench
    /// kube-scale`).
    pub answer_timeout: Duration,
    /// How often claims made from held addresses are written (200 ms).
    pub flush_interval: Duration,
    /// How long an ADD waits for another node to lend a held address
    /// before saying the pool is exhausted (10 s: at a job launch on 100
    /// nodes with pools exactly the job's size, 3 s sent borrowers back
    /// to kubelet, whose retry comes 10 s later and costs a DEL and an ADD).
    pub lend_wait: Duration,
    /// How long a block of ours stays empty before it is deleted, giving
    /// its range back (10 s: pods come and go without block churn).
    pub empty_block_grace: Duration,
    /// Wraps the client that reads and writes blocks (not the watch's):
    /// the seam where fault-injection tests lose a write's answer. `None`
    /// in the agent.
    pub intercept: Option<fn(Client) -> Client>,
}

impl ClusterOptions {
    /// Defaults for `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            kubeconfig: None,
            block_prefix_v4: 28,
            block_prefix_v6: 122,
            timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(15),
            flush_interval: Duration::from_millis(200),
            lend_wait: Duration::from_secs(10),
            empty_block_grace: Duration::from_secs(10),
            intercept: None,
        }
    }
}

/// Blocks of one pool as last seen, by name, with this node's changes not
/// yet written.
#[derive(Default)]
struct Blocks {
    /// The cache may be handed out from: read since start, and not in
    /// doubt since (a write whose outcome is unknown clears it).
    listed: bool,
    /// `by_name` came from a list of the whole pool (else only this
    /// node's blocks and those it met since were read: at a job launch
    /// on many nodes, every node listing every block of every pool is
    /// what grows with the square of the nodes).
    complete: bool,
    /// Anything of the pool was read since start.
    read: bool,
    /// When the whole pool was last listed.
    listed_at: Option<Instant>,
    /// As the API server last returned them.
    by_name: BTreeMap<String, RailBlock>,
    /// Own blocks: claims made and released locally, for the next flush.
    delta: BTreeMap<String, Delta>,
    /// Own blocks found with no claim, since when.
    empty_since: BTreeMap<String, Instant>,
    /// Own blocks whose unused held addresses another node asked for.
    lend: BTreeSet<String>,
    /// Own blocks a write in flight changes the held set of (lending or
    /// deleting): nothing is handed out from them meanwhile.
    busy: BTreeSet<String>,
    /// Nodes have had to lend in this pool: releases are written at once
    /// (and give the address up), so another node sees them free.
    tight: bool,
}

/// One own block's unwritten changes.
#[derive(Clone, Default, PartialEq)]
struct Delta {
    /// Claims made from held addresses.
    adds: BTreeMap<String, Claim>,
    /// Claims released: address → (container ID, interface) whose claim it
    /// was (removed only while it still is).
    removes: BTreeSet<Release>,
}

/// A claim released: (address, container ID, interface). Keyed by all
/// three, not by the address: an address released and handed out again
/// before the next flush has two changes to write — the old claim's
/// removal and the new claim — and the new one released too makes a
/// third (a job launch whose pods failed and were retried lost the first
/// removal when releases were keyed by address, leaking the claim).
type Release = (String, String, String);

impl Delta {
    fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.removes.is_empty()
    }

    /// Whether stored claim `c` at `address` is released here.
    fn releases(&self, address: &str, c: &Claim) -> bool {
        self.removes.iter().any(|(a, cid, ifname)| {
            a == address && cid == &c.container_id && ifname == &c.interface
        })
    }

    /// Releases `who`'s claim at `address` (unwritten or stored).
    fn release(&mut self, address: &str, who: (String, String)) {
        if self
            .adds
            .get(address)
            .is_some_and(|c| c.container_id == who.0 && c.interface == who.1)
        {
            self.adds.remove(address);
        }
        self.removes.insert((address.to_owned(), who.0, who.1));
    }

    /// `spec` with these changes made. A claim of ours at an address
    /// another attachment already claims in `spec` is not made: it never
    /// replaces theirs. Returns those addresses (the caller says so
    /// loudly: two pods were given one address).
    fn apply(&self, spec: &mut BlockSpec) -> Vec<String> {
        for (a, cid, ifname) in &self.removes {
            if spec
                .claims
                .get(a)
                .is_some_and(|c| &c.container_id == cid && &c.interface == ifname)
            {
                spec.claims.remove(a);
            }
        }
        let mut refused = Vec::new();
        for (a, c) in &self.adds {
            match spec.claims.get(a) {
                Some(theirs)
                    if theirs.container_id != c.container_id || theirs.interface != c.interface =>
                {
                    refused.push(a.clone());
                }
                _ => {
                    spec.claims.insert(a.clone(), c.clone());
                }
            }
        }
        refused
    }

    /// Forgets the changes of `written` that are still as they were (a
    /// change made since stays for the next write).
    fn subtract(&mut self, written: &Delta) {
        for (a, c) in &written.adds {
            if self.adds.get(a) == Some(c) {
                self.adds.remove(a);
            }
        }
        for r in &written.removes {
            self.removes.remove(r);
        }
    }
}

impl Blocks {
    /// Who holds `address` in block `name`, unwritten changes included.
    fn claim(&self, name: &str, address: &str) -> Option<&Claim> {
        let stored = self.by_name.get(name)?.spec.claims.get(address);
        let Some(d) = self.delta.get(name) else {
            return stored;
        };
        if let Some(c) = d.adds.get(address) {
            return Some(c);
        }
        stored.filter(|c| !d.releases(address, c))
    }

    /// Every claim of block `name`, unwritten changes included (what
    /// `claims_in` counts).
    #[cfg(test)]
    fn claims(&self, name: &str) -> BTreeMap<String, Claim> {
        let Some(b) = self.by_name.get(name) else {
            return BTreeMap::new();
        };
        let mut spec = b.spec.clone();
        if let Some(d) = self.delta.get(name) {
            let _ = d.apply(&mut spec);
        }
        spec.claims
    }

    /// How many claims block `name` has, unwritten changes included: what
    /// `claims(name).len()` says, without copying them (the flush asks of
    /// every own block every 200 ms).
    fn claims_in(&self, name: &str) -> usize {
        let Some(b) = self.by_name.get(name) else {
            return 0;
        };
        let Some(d) = self.delta.get(name) else {
            return b.spec.claims.len();
        };
        let kept = b
            .spec
            .claims
            .iter()
            .filter(|(a, c)| !d.adds.contains_key(*a) && !d.releases(a, c))
            .count();
        kept + d.adds.len()
    }

    /// The block and address `key` holds, if any.
    fn find(&self, key: &AllocationKey) -> Option<(String, IpAddr)> {
        let v6 = key.family == Family::V6;
        let matches = |a: &str, c: &Claim| {
            c.container_id == key.container_id
                && c.interface == key.ifname
                && a.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6() == v6)
        };
        for (name, d) in &self.delta {
            if let Some((a, _)) = d.adds.iter().find(|(a, c)| matches(a, c)) {
                return a.parse().ok().map(|a| (name.clone(), a));
            }
        }
        self.by_name.iter().find_map(|(name, b)| {
            b.spec.claims.iter().find_map(|(a, c)| {
                if matches(a, c) && self.claim(name, a) == Some(c) {
                    Some((name.clone(), a.parse().ok()?))
                } else {
                    None
                }
            })
        })
    }

    /// The lowest address of block `name` the pool hands out, nobody
    /// claims, and that is held (or not held, with `held` false).
    fn free(&self, pool: &Pool, name: &str, held: bool) -> Option<IpAddr> {
        if held && self.busy.contains(name) {
            return None;
        }
        let b = self.by_name.get(name)?;
        let net: IpNet = b.spec.cidr.parse().ok()?;
        let (lo, hi) = (pool::num(net.network()), pool::num(net.broadcast()));
        (lo..=hi).map(|n| pool::addr(pool.is_v6(), n)).find(|a| {
            let text = a.to_string();
            pool.holds(*a)
                && b.spec.held.contains(&text) == held
                && self.claim(name, &text).is_none()
        })
    }

    /// Whether another node's block holds addresses nobody claims (it can
    /// be asked to lend them).
    fn has_lenders(&self, me: &str) -> bool {
        self.by_name
            .values()
            .any(|b| b.spec.node != me && spare(b) > 0)
    }

    /// Whether the whole pool was listed less than a second ago.
    fn fresh(&self) -> bool {
        self.listed
            && self.complete
            && self
                .listed_at
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
    }

    /// The names of the blocks `node` owns.
    fn owned_by(&self, node: &str) -> Vec<String> {
        self.by_name
            .iter()
            .filter(|(_, b)| b.spec.node == node)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Claims in every block (what the API server will hold after a flush).
    fn claim_count(&self) -> usize {
        self.by_name.keys().map(|n| self.claims_in(n)).sum()
    }
}

/// Where an ask's address comes from.
enum Target {
    /// Held by this node: handed out now, written by the next flush.
    Local(String, IpAddr),
    /// Not held by anyone: claimed by a compare-and-swap write now.
    Write(String, IpAddr),
    /// Nothing free that may be taken.
    None,
    /// Refused, with why (an exact address another node holds).
    Refused(String),
}

/// An ask's answer from one round.
enum Answer {
    Address(IpAddr),
    /// Only held addresses of other nodes are free; they were asked to
    /// lend. Why the pool is full, if nothing comes.
    Wait(String),
}

/// The API-server-backed store. Its calls block (the agent's request
/// threads are plain threads); one small runtime, built where the store is
/// made, runs every request — so its sockets live in the network namespace
/// of the thread that connected, whoever calls. Many stores in one process
/// (a simulation of many nodes) share one runtime instead
/// ([`ClusterStore::connect_on`]).
pub struct ClusterStore {
    rt: StoreRuntime,
    inner: Arc<Inner>,
}

/// The runtime a store's requests run on.
enum StoreRuntime {
    /// Its own (the agent's case).
    Own(tokio::runtime::Runtime),
    /// One the process shares among many stores.
    Shared(tokio::runtime::Handle),
}

impl StoreRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            StoreRuntime::Own(rt) => rt.handle(),
            StoreRuntime::Shared(h) => h,
        }
    }
}

struct Inner {
    api: Api<RailBlock>,
    /// The same without a read timeout: watches wait minutes for events.
    watch_api: Api<RailBlock>,
    opts: ClusterOptions,
    /// Writes the API server refused because the block had changed (409):
    /// how often nodes meet in one block.
    conflicts: std::sync::atomic::AtomicU64,
    /// Writes (claims, releases, block claims) the API server accepted.
    writes: std::sync::atomic::AtomicU64,
    /// Lists sent (pool relists, lend checks, loads).
    lists: std::sync::atomic::AtomicU64,
    /// Watches opened on this node's blocks, and the events they brought.
    watches: std::sync::atomic::AtomicU64,
    watch_events: std::sync::atomic::AtomicU64,
    /// ADDs that went round again: a lost write race, or a wait for a lend.
    retries: std::sync::atomic::AtomicU64,
    /// One lock per pool: this node's writers to a pool queue behind each
    /// other (they would only conflict), pools proceed in parallel.
    pools: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Blocks>>>>,
    /// ADDs waiting for their pool's lock, by pool.
    pending: Mutex<HashMap<String, Vec<Ask>>>,
    /// Own blocks seen asking us to lend, for the next flush.
    lend_asks: Mutex<Vec<RailBlock>>,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("node", &self.inner.opts.node)
            .finish()
    }
}

/// A store's requests to the API server, counted since it started (the
/// scale benchmark sums them over its simulated nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Writes the API server accepted.
    pub writes: u64,
    /// Writes it refused because the block had changed (409).
    pub conflicts: u64,
    /// Lists.
    pub lists: u64,
    /// Watches opened.
    pub watches: u64,
    /// Events those watches brought.
    pub watch_events: u64,
    /// ADDs served again: their write lost a race, or they waited for
    /// another node to lend.
    pub retries: u64,
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            writes: self.writes + o.writes,
            conflicts: self.conflicts + o.conflicts,
            lists: self.lists + o.lists,
            watches: self.watches + o.watches,
            watch_events: self.watch_events + o.watch_events,
            retries: self.retries + o.retries,
        }
    }
}

/// One ADD waiting for its pool's next write.
struct Ask {
    key: AllocationKey,
    wanted: Option<IpAddr>,
    claim: Claim,
    reply: tokio::sync::oneshot::Sender<Result<Answer, ClusterError>>,
}

impl Ask {
    /// Answers the ADD that asked.
    fn answer(self, answer: Result<Answer, ClusterError>) {
        // Err: the ADD stopped waiting (its request ended); nobody to tell,
        // and a claim made for it is found again by a retried ADD.
        let _ = self.reply.send(answer);
    }
}

/// Rounds of compare-and-swap before giving up on a busy block.
const MAX_ROUNDS: usize = 64;

impl ClusterStore {
    /// Connects (lazily: nothing is sent until the first call) and starts
    /// the flush of claims made from held addresses.
    pub fn connect(opts: ClusterOptions) -> Result<Self, ClusterError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("railnet-kube")
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Refused(format!("tokio runtime: {e}")))?;
        Self::connect_with(opts, StoreRuntime::Own(rt))
    }

    /// As [`ClusterStore::connect`], on `runtime` (shared with other
    /// stores; its sockets live in its workers' network namespace). Call
    /// it, and the store's methods, outside that runtime's tasks: they
    /// block.
    pub fn connect_on(
        opts: ClusterOptions,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, ClusterError> {
        Self::connect_with(opts, StoreRuntime::Shared(runtime))
    }

    fn connect_with(opts: ClusterOptions, runtime: StoreRuntime) -> Result<Self, ClusterError> {
        let rt = runtime.handle();
        let mut client = rt.block_on(crate::kube_api::client_waiting(
            opts.kubeconfig.as_deref(),
            opts.timeout,
            opts.answer_timeout,
        ))?;
        if let Some(wrap) = opts.intercept {
            // A client's service starts a task: on the store's runtime.
            let _in = rt.enter();
            client = wrap(client);
        }
        let watch_client = rt.block_on(crate::kube_api::watch_client(
            opts.kubeconfig.as_deref(),
            opts.timeout,
        ))?;
        let inner = Arc::new(Inner {
            api: Api::all(client),
            watch_api: Api::all(watch_client),
            opts,
            conflicts: Default::default(),
            writes: Default::default(),
            lists: Default::default(),
            watches: Default::default(),
            watch_events: Default::default(),
            retries: Default::default(),
            pools: Mutex::default(),
            pending: Mutex::default(),
            lend_asks: Mutex::default(),
        });
        rt.spawn(Inner::flush_loop(Arc::downgrade(&inner)));
        rt.spawn(Inner::lend_watch(Arc::downgrade(&inner)));
        Ok(Self { rt: runtime, inner })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.opts.node
    }

    /// (accepted writes, writes refused as conflicts) since start.
    pub fn write_counts(&self) -> (u64, u64) {
        let t = self.traffic();
        (t.writes, t.conflicts)
    }

    /// What this store asked of the API server since start.
    pub fn traffic(&self) -> Traffic {
        use std::sync::atomic::Ordering::Relaxed;
        let i = &self.inner;
        Traffic {
            writes: i.writes.load(Relaxed),
            conflicts: i.conflicts.load(Relaxed),
            lists: i.lists.load(Relaxed),
            watches: i.watches.load(Relaxed),
            watch_events: i.watch_events.load(Relaxed),
            retries: i.retries.load(Relaxed),
        }
    }

    /// Runs `f` on the store's runtime and waits for it.
    fn run<T: Send + 'static, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T, ClusterError>
    where
        F: std::future::Future<Output = Result<T, ClusterError>> + Send + 'static,
    {
        let rt = self.rt.handle();
        let task = rt.spawn(f(self.inner.clone()));
        rt.block_on(task)
            .unwrap_or_else(|e| Err(ClusterError::Unavailable(format!("request task: {e}"))))
    }

    /// What this node holds after a restart: every claim it made in any
    /// block, and the allocations of its `journal` whose claims the API
    /// server does not have yet (made from held addresses just before the
    /// agent stopped: they are written by the next flush). Returns those
    /// to keep, and the journal's allocations that are gone (released
    /// while the agent was away, or their block is no longer ours). The
    /// list that answers this is every block: it is kept as the cache of
    /// every pool in `pools` (none read again at its first ADD).
    pub fn load(
        &self,
        journal: Vec<Allocation>,
        pools: &[String],
    ) -> Result<(Vec<Allocation>, Vec<Allocation>), ClusterError> {
        let pools = pools.to_vec();
        self.run(|i| async move { i.load(journal, pools).await })
    }

    /// Allocates for `key` from `pool` (exactly `wanted` if given). A
    /// repeated call for the same key returns the address it holds.
    pub fn allocate(
        &self,
        pool: &Pool,
        key: &AllocationKey,
        wanted: Option<IpAddr>,
        owner: &Owner,
    ) -> Result<IpAddr, ClusterError> {
        let (pool, key, owner) = (pool.clone(), key.clone(), owner.clone());
        self.run(|i| async move { i.allocate(&pool, &key, wanted, &owner).await })
    }

    /// Releases allocations (their claims, if still theirs): a held
    /// address at once (written by the next flush), a taken one by a
    /// write now.
    pub fn release(&self, released: &[Allocation]) -> Result<(), ClusterError> {
        let released = released.to_vec();
        self.run(|i| async move { i.release(&released).await })
    }

    /// Writes every claim made or released locally now (and answers lend
    /// requests); fails if the API server cannot take them (they stay
    /// queued).
    pub fn sync(&self) -> Result<(), ClusterError> {
        self.run(|i| async move { i.flush(true).await })
    }

    /// Claims made or released locally and not written yet.
    pub fn unwritten(&self) -> usize {
        let pools: Vec<_> = self.inner.pool_locks();
        self.rt.handle().block_on(async move {
            let mut n = 0;
            for (_, lock) in pools {
                let blocks = lock.lock().await;
                n += blocks
                    .delta
                    .values()
                    .map(|d| d.adds.len() + d.removes.len())
                    .sum::<usize>();
            }
            n
        })
    }

    /// The RailPools as pool specs, and the RailPools left out with why
    /// (each a line a person can act on).
    pub fn rail_pools(&self) -> Result<(Vec<super::PoolSpec>, Vec<String>), ClusterError> {
        self.run(|i| async move {
            let api: Api<kube::core::DynamicObject> =
                Api::all_with(i.api.clone().into_client(), &railpools());
            let list = api.list(&ListParams::default()).await.map_err(classify)?;
            let mut specs = Vec::new();
            let mut skipped = Vec::new();
            for p in list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                match pool_spec_of(&name, &p.data["spec"]) {
                    Ok(s) => specs.push(s),
                    Err(why) => skipped.push(format!("RailPool {name}: {why}")),
                }
            }
            Ok((specs, skipped))
        })
    }
}

impl Inner {
    fn blocks_of(&self, pool: &str) -> Arc<tokio::sync::Mutex<Blocks>> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(pool.to_owned())
            .or_default()
            .clone()
    }

    fn pool_locks(&self) -> Vec<(String, Arc<tokio::sync::Mutex<Blocks>>)> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect()
    }

    async fn load(
        &self,
        journal: Vec<Allocation>,
        pools: Vec<String>,
    ) -> Result<(Vec<Allocation>, Vec<Allocation>), ClusterError> {
        Self::count(&self.lists);
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(classify)?;
        // Every pool read, those with no block too.
        let whole = || Blocks {
            listed: true,
            complete: true,
            read: true,
            ..Blocks::default()
        };
        let mut by_pool: BTreeMap<String, Blocks> =
            pools.into_iter().map(|p| (p, whole())).collect();
        for b in list.items {
            let name = b.metadata.name.clone().unwrap_or_default();
            let blocks = by_pool.entry(b.spec.pool.clone()).or_insert_with(whole);
            blocks.by_name.insert(name, b);
        }
        let me = &self.opts.node;
        let mut kept = Vec::new();
        for blocks in by_pool.values() {
            for b in blocks.by_name.values() {
                for (a, c) in &b.spec.claims {
                    if &c.node == me
                        && let Ok(address) = a.parse()
                    {
                        kept.push(allocation_of(&b.spec.pool, address, c));
                    }
                }
            }
        }
        let mut gone = Vec::new();
        for j in journal {
            let text = j.address.to_string();
            let Some(blocks) = by_pool.get_mut(&j.pool) else {
                gone.push(j);
                continue;
            };
            let holder = blocks
                .by_name
                .iter()
                .find(|(_, b)| {
                    b.spec
                        .cidr
                        .parse::<IpNet>()
                        .is_ok_and(|n| n.contains(&j.address))
                })
                .map(|(n, b)| (n.clone(), b.spec.node == *me && b.spec.held.contains(&text)));
            match holder {
                Some((name, held)) => match blocks.claim(&name, &text) {
                    Some(c)
                        if c.container_id == j.key.container_id && c.interface == j.key.ifname =>
                    {
                        // In both: loaded above.
                    }
                    None if held => {
                        // Made from a held address, not written yet.
                        blocks
                            .delta
                            .entry(name)
                            .or_default()
                            .adds
                            .insert(text, claim_of(me, &j));
                        kept.push(j);
                    }
                    _ => gone.push(j),
                },
                None => gone.push(j),
            }
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        for (pool, blocks) in by_pool {
            pools.insert(pool, Arc::new(tokio::sync::Mutex::new(blocks)));
        }
        Ok((kept, gone))
    }

    async fn allocate(
        &self,
        pool: &Pool,
        key: &AllocationKey,
        wanted: Option<IpAddr>,
        owner: &Owner,
    ) -> Result<IpAddr, ClusterError> {
        if pool.disable {
            return Err(ClusterError::Full("the pool is disabled".into()));
        }
        if let Some(why) = wanted.and_then(|a| pool.refusal(a)) {
            return Err(ClusterError::Full(why));
        }
        let claim = Claim {
            container_id: key.container_id.clone(),
            interface: key.ifname.clone(),
            node: self.opts.node.clone(),
            network: owner.network.clone(),
            pod_namespace: owner.pod_namespace.clone(),
            pod_name: owner.pod_name.clone(),
            pod_uid: owner.pod_uid.clone(),
            netns_inode: owner.netns.inode,
            netns_cookie: owner.netns.cookie,
        };
        let deadline = Instant::now() + self.opts.lend_wait;
        // Waits for a lend grow (jittered) from one flush interval to 2 s:
        // borrowers that asked together do not all look again together.
        let mut waits = backon::ExponentialBuilder::new()
            .with_min_delay(self.opts.flush_interval)
            .with_max_delay(Duration::from_secs(2).max(self.opts.flush_interval))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            // Group commit: every ADD for this pool that arrives while a
            // write is in flight waits in `pending`; whoever takes the
            // pool's lock next serves them all, one write per block.
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.queue(
                &pool.name,
                Ask {
                    key: key.clone(),
                    wanted,
                    claim: claim.clone(),
                    reply,
                },
            );
            {
                let lock = self.blocks_of(&pool.name);
                let mut blocks = lock.lock().await;
                let batch = self.take_queued(&pool.name);
                if !batch.is_empty() {
                    self.serve(&mut blocks, pool, batch).await;
                }
            }
            let answer = answer.await.unwrap_or_else(|_| {
                Err(ClusterError::Unavailable("the request was dropped".into()))
            })?;
            match answer {
                Answer::Address(a) => return Ok(a),
                // The owners were asked to lend; their flush answers
                // within a lend check. The pool's lock is not held while
                // waiting: our own flush may be what another node waits
                // for.
                Answer::Wait(why) if Instant::now() >= deadline => {
                    return Err(ClusterError::Full(why));
                }
                Answer::Wait(_) => {
                    Self::count(&self.retries);
                    let wait = waits.next().unwrap_or(self.opts.flush_interval);
                    tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now())))
                        .await
                }
            }
        }
    }

    /// Queues `ask` for `pool`'s next write.
    fn queue(&self, pool: &str, ask: Ask) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(pool.to_owned())
            .or_default()
            .push(ask);
    }

    /// Takes every ask queued for `pool`.
    fn take_queued(&self, pool: &str) -> Vec<Ask> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pool)
            .unwrap_or_default()
    }

    /// Serves a batch of asks for `pool`: each gets an address chosen
    /// against the blocks as cached (with the batch's earlier choices in
    /// them). A held address is answered at once; each block taken from
    /// is written once. A write that lost a race is read back: asks whose
    /// claim made it are answered, the rest go round again.
    async fn serve(&self, blocks: &mut Blocks, pool: &Pool, batch: Vec<Ask>) {
        // Never read: this node's own blocks are enough to start handing
        // out (a free block is found by claiming it). In doubt after a
        // lost write: the whole pool, so a claim of ours is found.
        let read = match (blocks.listed, blocks.read) {
            (true, _) => Ok(()),
            (false, false) => self.relist_own(blocks, &pool.name).await,
            (false, true) => self.relist(blocks, &pool.name).await,
        };
        if let Err(e) = read {
            for ask in batch {
                ask.answer(Err(e.clone()));
            }
            return;
        }
        let mut open = batch;
        let mut relisted = false;
        for _ in 0..MAX_ROUNDS {
            if open.is_empty() {
                return;
            }
            let mut groups: BTreeMap<String, Vec<(Ask, IpAddr)>> = BTreeMap::new();
            let mut full = Vec::new();
            for ask in std::mem::take(&mut open) {
                if let Some((name, held)) = blocks.find(&ask.key) {
                    if let Some(w) = ask.wanted
                        && w != held
                    {
                        ask.answer(Err(ClusterError::Full(format!(
                            "this interface already holds {held}"
                        ))));
                    } else if let Some(g) = groups.get_mut(&name) {
                        // Asked twice in one batch: answered with the
                        // first's write.
                        g.push((ask, held));
                    } else {
                        ask.answer(Ok(Answer::Address(held)));
                    }
                    continue;
                }
                let target = match ask.wanted {
                    Some(a) => self.exact_target(blocks, pool, a).await,
                    None => self.next_target(blocks, pool, relisted).await,
                };
                match target {
                    Err(e) => {
                        ask.answer(Err(e));
                    }
                    Ok(Target::None) => full.push(ask),
                    Ok(Target::Refused(why)) => {
                        ask.answer(Err(ClusterError::Full(why)));
                    }
                    // Choosing may have fetched a block that already holds
                    // this ask's claim (a write whose answer was lost):
                    // that claim is the answer, not a second address.
                    Ok(_) if blocks.find(&ask.key).is_some() => open.push(ask),
                    Ok(Target::Local(name, address)) => {
                        blocks
                            .delta
                            .entry(name.clone())
                            .or_default()
                            .adds
                            .insert(address.to_string(), ask.claim.clone());
                        blocks.empty_since.remove(&name);
                        ask.answer(Ok(Answer::Address(address)));
                    }
                    Ok(Target::Write(name, address)) => {
                        // Held in the cache until the write says otherwise.
                        if let Some(b) = blocks.by_name.get_mut(&name) {
                            b.spec.claims.insert(address.to_string(), ask.claim.clone());
                        }
                        groups.entry(name).or_default().push((ask, address));
                    }
                }
            }
            for (name, members) in groups {
                let again = self.write_group(blocks, &name, members).await;
                self.retries
                    .fetch_add(again.len() as u64, std::sync::atomic::Ordering::Relaxed);
                open.extend(again);
            }
            if full.is_empty() {
                continue;
            }
            // The cache may be stale (another node released): look once
            // more before saying the pool is full.
            // At most one list a second: borrowers waiting for lenders
            // each listed the whole pool from etcd every 200 ms, and at a
            // launch on 100 nodes those lists were most of the API
            // server's work.
            // (Skipped only while there are lenders to wait for: a pool
            // that looks full is always read again before an ADD is told
            // so.)
            let waiting_is_enough = blocks.fresh() && blocks.has_lenders(&self.opts.node);
            if !relisted && !waiting_is_enough {
                relisted = true;
                if let Err(e) = self.relist(blocks, &pool.name).await {
                    for ask in full.into_iter().chain(open.drain(..)) {
                        ask.answer(Err(e.clone()));
                    }
                    return;
                }
                open.extend(full);
                continue;
            }
            let lenders = self.ask_to_lend(blocks, full.len()).await;
            blocks.tight = true;
            for ask in full {
                let why = match ask.wanted {
                    Some(a) => format!("{a} is held by another pod"),
                    None if lenders.is_empty() => format!(
                        "exhausted: all {} addresses are held ({} blocks)",
                        blocks.claim_count(),
                        blocks.by_name.len()
                    ),
                    None => format!(
                        "exhausted: every free address is held by node(s) {} for their pods, and they did not lend one within {:?} (is railnet-agent running there?)",
                        lenders.join(", "),
                        self.opts.lend_wait
                    ),
                };
                let answer = if ask.wanted.is_none() && !lenders.is_empty() {
                    Ok(Answer::Wait(why))
                } else {
                    Err(ClusterError::Full(why))
                };
                ask.answer(answer);
            }
        }
        for ask in open {
            ask.answer(Err(ClusterError::Unavailable(format!(
                "pool {}: {MAX_ROUNDS} rounds of conflicting writes",
                pool.name
            ))));
        }
    }

    /// Asks the owners of blocks with held addresses nobody claims to lend
    /// them (sets `lendRequested` where it is not set yet) — enough blocks
    /// for `need` addresses, from a place of this node's own: every
    /// borrower asking every block was a write per borrower per block, most
    /// of them refused as conflicts. Returns those owners; best effort: a
    /// failed ask is asked again next time.
    async fn ask_to_lend(&self, blocks: &mut Blocks, need: usize) -> Vec<String> {
        let me = &self.opts.node;
        let candidates: Vec<String> = blocks
            .by_name
            .iter()
            .filter(|(_, b)| &b.spec.node != me && spare(b) > 0)
            .map(|(n, _)| n.clone())
            .collect();
        let mut names = Vec::new();
        let mut covered = 0;
        for name in rotated(&candidates, spread(me)) {
            if covered >= need {
                break;
            }
            covered += spare(&blocks.by_name[name]);
            names.push(name.clone());
        }
        let mut owners = BTreeSet::new();
        for name in names {
            let b = &blocks.by_name[&name];
            owners.insert(b.spec.node.clone());
            if b.spec.lend_requested {
                continue;
            }
            let mut next = b.clone();
            next.spec.lend_requested = true;
            match self.api.replace(&name, &PostParams::default(), &next).await {
                Ok(b) => {
                    self.count_write();
                    tracing::info!(block = %name, owner = %b.spec.node, "asked to lend held addresses");
                    blocks.by_name.insert(name, b);
                }
                Err(e) => {
                    self.count_conflict(status(&e));
                    tracing::debug!(block = %name, error = %e, "lend request not written");
                }
            }
        }
        owners.into_iter().collect()
    }

    /// Writes block `name` as cached (the group's claims in it) if it is
    /// still as we saw it; answers the asks whose claims are stored and
    /// returns the others, to go round again.
    async fn write_group(
        &self,
        blocks: &mut Blocks,
        name: &str,
        members: Vec<(Ask, IpAddr)>,
    ) -> Vec<Ask> {
        let Some(next) = blocks.by_name.get(name).cloned() else {
            return members.into_iter().map(|(a, _)| a).collect();
        };
        let e = match self.api.replace(name, &PostParams::default(), &next).await {
            Ok(b) => {
                self.count_write();
                blocks.by_name.insert(name.to_owned(), b);
                for (ask, address) in members {
                    ask.answer(Ok(Answer::Address(address)));
                }
                return Vec::new();
            }
            Err(e) => e,
        };
        // Whatever happened, the cached copy (with our tentative claims)
        // is no longer the truth.
        blocks.by_name.remove(name);
        match self.read_back(name, e).await {
            Ok(Some(b)) => {
                let mut again = Vec::new();
                for (ask, address) in members {
                    let ours = b.spec.claims.get(&address.to_string()).is_some_and(|c| {
                        c.container_id == ask.claim.container_id
                            && c.interface == ask.claim.interface
                    });
                    if ours {
                        ask.answer(Ok(Answer::Address(address)));
                    } else {
                        again.push(ask);
                    }
                }
                blocks.by_name.insert(name.to_owned(), b);
                again
            }
            Ok(None) => members.into_iter().map(|(a, _)| a).collect(),
            Err((err, unknown)) => {
                if unknown {
                    // Neither the write's answer nor the block could be
                    // read: a claim of ours may be stored. Read every
                    // block of the pool before the next choice, so a
                    // retried ADD finds it rather than taking a second
                    // address.
                    blocks.listed = false;
                }
                for (ask, _) in members {
                    ask.answer(Err(err.clone()));
                }
                Vec::new()
            }
        }
    }

    /// After write error `e` on block `name`: the block as it is now, when
    /// that decides what became of the write (someone else wrote or
    /// deleted it, or no answer came); else the error to report, and
    /// whether the write may have happened.
    async fn read_back(
        &self,
        name: &str,
        e: kube::Error,
    ) -> Result<Option<RailBlock>, (ClusterError, bool)> {
        let code = status(&e);
        self.count_conflict(code);
        if !read_back_decides(code) {
            return Err((classify(e), false));
        }
        match self.get(name).await {
            Ok(b) => Ok(b),
            Err(e2) if code.is_none() => Err((classify(e).or(e2), true)),
            Err(e2) => Err((e2, true)),
        }
    }

    async fn release(&self, released: &[Allocation]) -> Result<(), ClusterError> {
        for a in released {
            let lock = self.blocks_of(&a.pool);
            let mut blocks = lock.lock().await;
            self.remove_claim(&mut blocks, a).await?;
        }
        Ok(())
    }

    /// Reads every block of `pool` into the cache (this node's unwritten
    /// changes stay).
    async fn relist(&self, blocks: &mut Blocks, pool: &str) -> Result<(), ClusterError> {
        let lp = ListParams::default().labels(&format!("{POOL_LABEL}={pool}"));
        Self::count(&self.lists);
        let list = self.api.list(&lp).await.map_err(classify)?;
        blocks.by_name = list
            .items
            .into_iter()
            .filter(|b| b.spec.pool == pool)
            .map(|b| (b.metadata.name.clone().unwrap_or_default(), b))
            .collect();
        blocks.listed = true;
        blocks.complete = true;
        blocks.read = true;
        blocks.listed_at = Some(Instant::now());
        Ok(())
    }

    /// Reads this node's own blocks of `pool` (a first read: nothing of
    /// the pool is cached yet).
    async fn relist_own(&self, blocks: &mut Blocks, pool: &str) -> Result<(), ClusterError> {
        // From the API server's cache (`resourceVersion=0`), not a read
        // of every block of the pool from etcd: a block of ours the cache
        // has not seen yet is met again when claimed (409), and nothing
        // is handed out of a block not read.
        let lp = ListParams::default()
            .labels(&format!(
                "{POOL_LABEL}={pool},{NODE_LABEL}={}",
                self.opts.node
            ))
            .match_any();
        Self::count(&self.lists);
        let list = self.api.list(&lp).await.map_err(classify)?;
        blocks.by_name.extend(
            list.items
                .into_iter()
                .filter(|b| b.spec.pool == pool && b.spec.node == self.opts.node)
                .map(|b| (b.metadata.name.clone().unwrap_or_default(), b)),
        );
        blocks.listed = true;
        blocks.read = true;
        Ok(())
    }

    fn prefix(&self, pool: &Pool) -> u8 {
        let want = if pool.is_v6() {
            self.opts.block_prefix_v6
        } else {
            self.opts.block_prefix_v4
        };
        // A pool smaller than a block is one block.
        want.max(pool.subnet.prefix_len())
    }

    /// Where the next address comes from: a held address of ours, else a
    /// block nobody has claimed (claimed now, held whole), else a free
    /// address nobody holds in any block. `listed_now`: the whole pool
    /// was listed for this batch (as fresh as a list can be: blocks met
    /// after it were claimed since, and the walk goes on past them).
    async fn next_target(
        &self,
        blocks: &mut Blocks,
        pool: &Pool,
        listed_now: bool,
    ) -> Result<Target, ClusterError> {
        let me = &self.opts.node;
        for name in blocks.owned_by(me) {
            if let Some(a) = blocks.free(pool, &name, true) {
                return Ok(Target::Local(name, a));
            }
        }
        let prefix = self.prefix(pool);
        // Walk aligned blocks over the pool's ranges. Nodes that all
        // walked from the first block raced for each block in turn (at a
        // job launch on 50 nodes, four refused block claims for every
        // block made). A /64 is never enumerated: every step either skips
        // a known block or stops.
        let size: u128 = 1u128 << (if pool.is_v6() { 128 } else { 32 } - u32::from(prefix));
        let start = u128::from(spread(me));
        let mut met = 0;
        // In order while nobody else is met (a quiet pool fills from its
        // start: addresses a person can predict); from the node's own
        // place once another node's block is met (at a launch every node
        // meets one block taken, not every block before its own).
        'phases: for first in [0, start] {
            for start in block_starts(pool.ranges(), size, first) {
                let cidr = block_cidr(pool, start, prefix);
                let name = block_name(&pool.name, &cidr);
                if blocks.by_name.contains_key(&name) || !any_free(pool, &cidr) {
                    continue;
                }
                let b = self.claim_block(pool, &name, &cidr).await?;
                let mine = &b.spec.node == me;
                blocks.by_name.insert(name.clone(), b);
                if mine && let Some(a) = blocks.free(pool, &name, true) {
                    return Ok(Target::Local(name, a));
                }
                if mine {
                    continue;
                }
                // Another node's: with only our own blocks read (or a list
                // of the pool from before the launch), a pool filling up
                // would be probed block by block, a refused create and a
                // read each. One list of the pool instead (after this
                // batch's writes).
                // Not after a list made for this batch, though: on a busy
                // API server the walk outlives a second, and saying "none"
                // then sent an ADD of a pool with thousands of free blocks
                // to wait for lenders (at a launch on 500 nodes against
                // kube-apiserver, one pod was told its /16 was exhausted).
                met += 1;
                if met >= 2 && !listed_now && !blocks.fresh() {
                    return Ok(Target::None);
                }
                if first == 0 {
                    continue 'phases;
                }
            }
            // The first phase walked every block without meeting another
            // node's: nothing left to claim.
            break;
        }
        if !blocks.complete {
            return Ok(Target::None);
        }
        // Another node's block with a free address that nobody holds:
        // also from a place of this node's own, or every borrower would
        // write into the same block and all but one be refused.
        let names: Vec<String> = blocks.by_name.keys().cloned().collect();
        for name in rotated(&names, spread(me)) {
            if let Some(a) = blocks.free(pool, name, false) {
                return Ok(Target::Write(name.clone(), a));
            }
        }
        Ok(Target::None)
    }

    /// The block holding `address` (claimed now if nobody has), if the
    /// address is free in it.
    async fn exact_target(
        &self,
        blocks: &mut Blocks,
        pool: &Pool,
        address: IpAddr,
    ) -> Result<Target, ClusterError> {
        let prefix = self.prefix(pool);
        let cidr = IpNet::new(address, prefix)
            .expect("prefix fits the family")
            .trunc();
        let name = block_name(&pool.name, &cidr);
        if !blocks.by_name.contains_key(&name) {
            let b = self.claim_block(pool, &name, &cidr).await?;
            blocks.by_name.insert(name.clone(), b);
        }
        let text = address.to_string();
        if blocks.claim(&name, &text).is_some() {
            return Ok(Target::None);
        }
        let b = &blocks.by_name[&name];
        let busy = blocks.busy.contains(&name);
        Ok(
            match (b.spec.held.contains(&text), b.spec.node == self.opts.node) {
                // Ours, but its held set is being written: a claim written now
                // is safe either way (the writes are ordered by the block's
                // resourceVersion).
                (true, true) if busy => Target::Write(name, address),
                (false, _) => Target::Write(name, address),
                (true, true) => Target::Local(name, address),
                (true, false) => Target::Refused(format!(
                    "{address} is held by node {} (its block {name}) for its pods",
                    b.spec.node
                )),
            },
        )
    }

    /// Creates the block for this node, every address of it held; if it
    /// exists already, whoever owns it, returns it as it is (a retried
    /// create meeting our own block is ours).
    async fn claim_block(
        &self,
        pool: &Pool,
        name: &str,
        cidr: &IpNet,
    ) -> Result<RailBlock, ClusterError> {
        let (lo, hi) = (pool::num(cidr.network()), pool::num(cidr.broadcast()));
        let held = (lo..=hi)
            .map(|n| pool::addr(pool.is_v6(), n))
            .filter(|a| pool.holds(*a))
            .map(|a| a.to_string())
            .collect();
        let block = RailBlock {
            api_version: "railnet.io/v1alpha1".into(),
            kind: "RailBlock".into(),
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([
                    (POOL_LABEL.to_owned(), pool.name.clone()),
                    (NODE_LABEL.to_owned(), self.opts.node.clone()),
                ])),
                ..ObjectMeta::default()
            },
            spec: BlockSpec {
                pool: pool.name.clone(),
                cidr: cidr.to_string(),
                node: self.opts.node.clone(),
                claims: BTreeMap::new(),
                held,
                lend_requested: false,
            },
        };
        // A block found taken can be deleted by its owner (emptied) before
        // we read it: then it is free again, and we try to claim it anew.
        for _ in 0..MAX_ROUNDS {
            match self.api.create(&PostParams::default(), &block).await {
                Ok(b) => {
                    self.count_write();
                    tracing::info!(block = name, pool = %pool.name, %cidr, "claimed an address block");
                    return Ok(b);
                }
                Err(e) if status(&e) == Some(409) => {
                    self.count_conflict(Some(409));
                    if let Some(b) = self.get(name).await? {
                        return Ok(b);
                    }
                }
                Err(e) => return Err(classify(e)),
            }
        }
        Err(ClusterError::Unavailable(format!(
            "block {name}: claimed and released {MAX_ROUNDS} times while we looked"
        )))
    }

    fn count_write(&self) {
        Self::count(&self.writes);
    }

    fn count(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn count_conflict(&self, code: Option<u16>) {
        if code == Some(409) {
            self.conflicts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn get(&self, name: &str) -> Result<Option<RailBlock>, ClusterError> {
        self.api.get_opt(name).await.map_err(classify)
    }

    async fn remove_claim(&self, blocks: &mut Blocks, a: &Allocation) -> Result<(), ClusterError> {
        // The block holding the address: from the cache, else by listing
        // the pool (after a restart the cache is empty).
        let key = a.address.to_string();
        let ours = |c: &Claim| c.container_id == a.key.container_id && c.interface == a.key.ifname;
        let holder = |blocks: &Blocks| {
            blocks
                .by_name
                .keys()
                .find(|n| blocks.claim(n, &key).is_some_and(ours))
                .cloned()
        };
        let mut name = holder(blocks);
        if name.is_none() && !(blocks.listed && blocks.complete) {
            self.relist(blocks, &a.pool).await?;
            name = holder(blocks);
        }
        let Some(name) = name else {
            // Nothing holds it: already released.
            tracing::debug!(address = %key, container = %a.key.container_id, "release: no claim found");
            return Ok(());
        };
        let me = &self.opts.node;
        let b = &blocks.by_name[&name];
        let own_held = &b.spec.node == me && b.spec.held.contains(&key);
        let who = (a.key.container_id.clone(), a.key.ifname.clone());
        if own_held && !blocks.tight {
            // Ours to hand out: no one else can take it meanwhile, so the
            // flush writes the release. (Also when the claim is not
            // written yet: a flush may be writing it right now.)
            tracing::debug!(address = %key, container = %a.key.container_id, block = %name, "release: for the next flush");
            blocks.delta.entry(name).or_default().release(&key, who);
            return Ok(());
        }
        // Written now, and a held address given up with it: another node
        // needs to see it free.
        if let Some(d) = blocks.delta.get_mut(&name) {
            d.release(&key, who.clone());
        }
        for _ in 0..MAX_ROUNDS {
            let Some(current) = blocks.by_name.get(&name) else {
                return Ok(());
            };
            let stored = current.spec.claims.get(&key).is_some_and(ours);
            let held = &current.spec.node == me && current.spec.held.contains(&key);
            if !stored && !held {
                break;
            }
            let mut next = current.clone();
            if stored {
                next.spec.claims.remove(&key);
            }
            next.spec.held.remove(&key);
            let e = match self.api.replace(&name, &PostParams::default(), &next).await {
                Ok(b) => {
                    self.count_write();
                    blocks.by_name.insert(name.clone(), b);
                    break;
                }
                Err(e) => e,
            };
            match self.read_back(&name, e).await {
                Ok(Some(b)) => {
                    blocks.by_name.insert(name.clone(), b);
                }
                Ok(None) => {
                    blocks.by_name.remove(&name);
                    break;
                }
                Err((e, undecided)) => {
                    // As in `write_own`: a held address may have been
                    // given up; read the pool again before handing out.
                    if undecided {
                        blocks.listed = false;
                    }
                    return Err(e);
                }
            }
        }
        if let Some(d) = blocks.delta.get_mut(&name) {
            d.removes.remove(&(key, who.0, who.1));
        }
        Ok(())
    }

    /// Flushes every `flush_interval` until the store is dropped.
    async fn flush_loop(inner: std::sync::Weak<Inner>) {
        loop {
            let interval = match inner.upgrade() {
                Some(i) => i.opts.flush_interval,
                None => return,
            };
            tokio::time::sleep(interval).await;
            let Some(i) = inner.upgrade() else { return };
            if let Err(e) = i.flush(false).await {
                tracing::warn!(error = %e, "claims not written yet; retrying");
            }
        }
    }

    /// Watches this node's blocks for lend requests (one long-poll watch,
    /// not a list per node per second): each is answered by the next
    /// flush. A watch that ends or fails is resumed after a fresh list.
    async fn lend_watch(inner: std::sync::Weak<Inner>) {
        use futures::StreamExt;
        use kube::api::{WatchEvent, WatchParams};
        // Failed starts, and watches the API server ended at once, are
        // retried after a growing, jittered pause: at a job launch on 100
        // nodes, an API server too busy to answer a list in time met every
        // node's retry each second, all together, and answered none (ten
        // thousand lists given up in seven minutes).
        let pauses = || {
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(30))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut pause = pauses();
        // Where the last watch got to: a watch that ended (the server's
        // timeout, or a busy server closing a slow watcher) resumes from
        // there without a list; one refused as too old lists again.
        let mut resume: Option<String> = None;
        loop {
            let Some(i) = inner.upgrade() else { return };
            let started = async {
                // A list (to answer requests made while no watch ran),
                // then a watch from its version.
                let version = match resume.take() {
                    Some(v) => v,
                    None => i
                        .check_lend_requests()
                        .await
                        .map_err(|e| format!("cannot look for lend requests: {e}"))?,
                };
                let wp = WatchParams::default()
                    .labels(&format!("{NODE_LABEL}={}", i.opts.node))
                    .timeout(290);
                let wp = WatchParams {
                    bookmarks: true,
                    ..wp
                };
                Self::count(&i.watches);
                let stream = i
                    .watch_api
                    .watch(&wp, &version)
                    .await
                    .map_err(|e| format!("cannot watch this node's blocks: {e}"))?;
                Ok::<_, String>((stream, version))
            }
            .await;
            drop(i);
            let (stream, mut version) = match started {
                Ok(s) => s,
                Err(e) => {
                    let wait = pause.next().unwrap_or(Duration::from_secs(30));
                    tracing::debug!(error = %e, ?wait, "the lend watch did not start; trying again");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let mut stream = std::pin::pin!(stream);
            let opened = tokio::time::Instant::now();
            let mut relist = false;
            while let Some(event) = stream.next().await {
                let Some(i) = inner.upgrade() else { return };
                Self::count(&i.watch_events);
                match event {
                    Ok(WatchEvent::Added(b) | WatchEvent::Modified(b)) => {
                        version = b.metadata.resource_version.clone().unwrap_or(version);
                        i.note_lend(b);
                    }
                    Ok(WatchEvent::Deleted(b)) => {
                        version = b.metadata.resource_version.unwrap_or(version);
                    }
                    Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                    Ok(WatchEvent::Error(e)) => {
                        tracing::debug!(error = %e, "the lend watch was refused; again from a fresh list");
                        relist = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the lend watch failed; again from a fresh list");
                        relist = true;
                        break;
                    }
                }
            }
            if !relist {
                resume = Some(version);
            }
            if opened.elapsed() < Duration::from_secs(5) {
                let wait = pause.next().unwrap_or(Duration::from_secs(30));
                tracing::debug!(lasted = ?opened.elapsed(), ?wait, "the lend watch ended early");
                tokio::time::sleep(wait).await;
            } else {
                pause = pauses();
            }
        }
    }

    /// Notes the lend requests on this node's blocks (one list of them);
    /// returns the list's resourceVersion, to watch from.
    async fn check_lend_requests(&self) -> Result<String, ClusterError> {
        // From the cache: the watch follows from its version, so nothing
        // written after it is missed.
        let lp = ListParams::default()
            .labels(&format!("{NODE_LABEL}={}", self.opts.node))
            .match_any();
        Self::count(&self.lists);
        let list = self.api.list(&lp).await.map_err(classify)?;
        for b in list.items {
            self.note_lend(b);
        }
        Ok(list.metadata.resource_version.unwrap_or_default())
    }

    /// If block `b` (ours) asks us to lend, the next flush answers.
    ///
    /// Noted without waiting for the pool's lock (held across API writes):
    /// the API server closes a watch whose reader stalls once its buffer
    /// fills (at a job launch on 100 nodes watches were seen closing
    /// within 100 ms; this alone did not stop that — see `lend_watch`).
    fn note_lend(&self, b: RailBlock) {
        if !b.spec.lend_requested || b.spec.node != self.opts.node {
            return;
        }
        self.lend_asks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(b);
    }

    /// Hands the lend requests noted since the last flush to their pools.
    async fn take_lend_asks(&self) {
        let asks = std::mem::take(&mut *self.lend_asks.lock().unwrap_or_else(|p| p.into_inner()));
        for b in asks {
            let name = b.metadata.name.clone().unwrap_or_default();
            let lock = self.blocks_of(&b.spec.pool);
            let mut blocks = lock.lock().await;
            blocks.lend.insert(name.clone());
            // The event may be older than our copy (our own answer to
            // this request can come first): a stale copy would hand out
            // addresses already lent. The write answering the request
            // reads the block if our copy is behind.
            blocks.by_name.entry(name).or_insert(b);
        }
    }

    /// Writes each own block that has unwritten claims or releases, a lend
    /// request to answer, or has been empty for the grace (`now`: every
    /// block with changes, lend requests answered, empty blocks kept). The
    /// pool's lock is not held while a write is in flight: ADDs go on
    /// being served from held addresses, also while the API server is
    /// away.
    async fn flush(&self, now: bool) -> Result<(), ClusterError> {
        self.take_lend_asks().await;
        let mut first = None;
        for (_, lock) in self.pool_locks() {
            let due = {
                let mut blocks = lock.lock().await;
                let mut due = Vec::new();
                for name in blocks.owned_by(&self.opts.node) {
                    if blocks.claims_in(&name) == 0 {
                        blocks
                            .empty_since
                            .entry(name.clone())
                            .or_insert_with(Instant::now);
                    } else {
                        blocks.empty_since.remove(&name);
                    }
                    let changed = blocks.delta.get(&name).is_some_and(|d| !d.is_empty());
                    let expired = !now
                        && blocks
                            .empty_since
                            .get(&name)
                            .is_some_and(|t| t.elapsed() >= self.opts.empty_block_grace);
                    if changed || blocks.lend.contains(&name) || expired {
                        due.push(name);
                    }
                }
                due
            };
            for name in due {
                if let Err(e) = self.write_own(&lock, &name, now).await {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes own block `name` with its unwritten changes; gives up the
    /// held addresses nobody uses if asked to lend; deletes it if it has
    /// been empty for the grace (or is empty and asked to lend).
    async fn write_own(
        &self,
        lock: &tokio::sync::Mutex<Blocks>,
        name: &str,
        keep_empty: bool,
    ) -> Result<(), ClusterError> {
        for _ in 0..MAX_ROUNDS {
            let (current, next, written, lend, delete) = {
                let mut blocks = lock.lock().await;
                let Some(current) = blocks.by_name.get(name).cloned() else {
                    return self.lost_block(&mut blocks, name);
                };
                let mut written = blocks.delta.get(name).cloned().unwrap_or_default();
                let mut next = current.clone();
                for address in written.apply(&mut next.spec) {
                    // Never overwrite: the stored claim is the one other
                    // nodes see. Ours is dropped from the write, loudly.
                    let ours = written.adds.remove(&address).unwrap_or_default();
                    let theirs = &current.spec.claims[&address];
                    tracing::error!(
                        block = name,
                        %address,
                        pod = %format!("{}/{}", ours.pod_namespace, ours.pod_name),
                        container = %ours.container_id,
                        claimed_by = %format!("{}/{} on node {}", theirs.pod_namespace, theirs.pod_name, theirs.node),
                        "this node handed out an address another pod already claims; not overwriting that claim — both pods have the address: delete one of them"
                    );
                    if let Some(d) = blocks.delta.get_mut(name) {
                        d.adds.remove(&address);
                    }
                }
                let lend = blocks.lend.contains(name) || current.spec.lend_requested;
                if lend {
                    let claims = &next.spec.claims;
                    next.spec.held.retain(|a| claims.contains_key(a));
                    next.spec.lend_requested = false;
                }
                let expired = blocks
                    .empty_since
                    .get(name)
                    .is_some_and(|t| t.elapsed() >= self.opts.empty_block_grace);
                let delete = next.spec.claims.is_empty() && (lend || (expired && !keep_empty));
                if lend || delete {
                    blocks.busy.insert(name.to_owned());
                }
                (current, next, written, lend, delete)
            };
            let result = if delete {
                // Give the range back: deleted only if nobody wrote since.
                self.api
                    .delete(name, &if_unchanged(&current.metadata))
                    .await
                    .map(|_| None)
            } else {
                self.api
                    .replace(name, &PostParams::default(), &next)
                    .await
                    .map(Some)
            };
            let back = match result {
                Ok(written) => Ok(written),
                Err(e) => Err(self.read_back(name, e).await),
            };
            let mut blocks = lock.lock().await;
            blocks.busy.remove(name);
            match back {
                Ok(stored) => {
                    self.count_write();
                    tracing::debug!(block = name, adds = ?written.adds.keys().collect::<Vec<_>>(), removes = ?written.removes, "flushed");
                    if let Some(d) = blocks.delta.get_mut(name) {
                        d.subtract(&written);
                        if d.is_empty() {
                            blocks.delta.remove(name);
                        }
                    }
                    if lend {
                        blocks.lend.remove(name);
                        blocks.tight = true;
                    }
                    match stored {
                        Some(b) => {
                            if lend {
                                tracing::info!(
                                    block = name,
                                    held = b.spec.held.len(),
                                    "lent the held addresses not in use"
                                );
                            }
                            blocks.by_name.insert(name.to_owned(), b);
                        }
                        None => {
                            tracing::info!(block = name, "gave an empty address block back");
                            blocks.by_name.remove(name);
                            blocks.empty_since.remove(name);
                            blocks.lend.remove(name);
                        }
                    }
                    return Ok(());
                }
                Err(Ok(Some(b))) => {
                    blocks.by_name.insert(name.to_owned(), b);
                }
                Err(Ok(None)) if delete => {
                    blocks.by_name.remove(name);
                    blocks.empty_since.remove(name);
                    blocks.lend.remove(name);
                    return Ok(());
                }
                Err(Ok(None)) => {
                    blocks.by_name.remove(name);
                    return self.lost_block(&mut blocks, name);
                }
                Err(Err((e, undecided))) => {
                    if undecided {
                        // The write may have happened (a lend gave held
                        // addresses away) and the block could not be read:
                        // our copy is not the truth. Nothing is handed out
                        // of this pool until it is read again.
                        blocks.listed = false;
                        tracing::warn!(block = name, error = %e, "a write's answer was lost; reading the pool again before handing out its addresses");
                    }
                    return Err(e);
                }
            }
        }
        Err(ClusterError::Unavailable(format!(
            "block {name}: {MAX_ROUNDS} rounds of conflicting writes"
        )))
    }

    /// Our block is gone (someone deleted it by hand): its unwritten claims
    /// have nowhere to go. Said loudly; the pods keep their addresses
    /// until released, and the range may be claimed again.
    fn lost_block(&self, blocks: &mut Blocks, name: &str) -> Result<(), ClusterError> {
        blocks.empty_since.remove(name);
        blocks.lend.remove(name);
        if let Some(d) = blocks.delta.remove(name)
            && !d.adds.is_empty()
        {
            tracing::error!(
                block = name,
                claims = d.adds.len(),
                "this node's address block was deleted from the API server with claims not yet written; those addresses may be handed out again — do not delete RailBlocks by hand"
            );
        }
        Ok(())
    }
}

impl From<crate::kube_api::ClientError> for ClusterError {
    fn from(e: crate::kube_api::ClientError) -> Self {
        ClusterError::Refused(e.0)
    }
}

impl ClusterError {
    /// For a lost answer, the read-back's error is the one to report when
    /// both failed the same way.
    fn or(self, other: ClusterError) -> ClusterError {
        match (&self, &other) {
            (ClusterError::Unavailable(_), _) => self,
            _ => other,
        }
    }
}

/// Delete parameters that delete the object only as `meta` saw it (its
/// resourceVersion): a write since makes the delete fail with 409.
pub fn if_unchanged(meta: &ObjectMeta) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: meta.resource_version.clone(),
            uid: None,
        }),
        ..DeleteParams::default()
    }
}

/// Whether the block as it is now says what became of a failed write:
/// someone else wrote or deleted it (409, 404), or no answer came (the
/// write may have happened), or the server failed (5xx).
fn read_back_decides(code: Option<u16>) -> bool {
    match code {
        None | Some(404) | Some(409) => true,
        Some(c) => c >= 500,
    }
}

fn status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Sorts an error of the client: what retrying may fix (no answer, a 5xx,
/// 429) is `Unavailable`; the rest is a refusal with the server's message.
fn classify(e: kube::Error) -> ClusterError {
    match &e {
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => {
            ClusterError::Unavailable(format!("{} {}", s.code, s.message))
        }
        // A 404 that is not about one object: the resource itself is not
        // served — the CRD is missing, or the server is still starting.
        kube::Error::Api(s) if s.code == 404 && s.reason != "NotFound" => {
            ClusterError::Unavailable(
                "railnet.io resources (railblocks, railpools) are not served: install the chart's CRDs, or wait for the API server to finish starting"
                    .into(),
            )
        }
        kube::Error::Api(s) => ClusterError::Refused(format!("{} {}", s.code, s.message)),
        _ => {
            // The client's own words are terse ("client error
            // (SendRequest)"): the chain of causes says what happened.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let more = s.to_string();
                // Wrappers often repeat their cause's words.
                if !text.contains(&more) {
                    text.push_str(": ");
                    text.push_str(&more);
                }
                source = s.source();
            }
            ClusterError::Unavailable(text)
        }
    }
}

fn any_free(pool: &Pool, cidr: &IpNet) -> bool {
    let (lo, hi) = (pool::num(cidr.network()), pool::num(cidr.broadcast()));
    (lo..=hi).any(|n| pool.holds(pool::addr(pool.is_v6(), n)))
}

/// Where `node` begins its search of a pool's blocks: a stable hash of
/// its name (FNV-1a), so nodes spread over the pool instead of racing.
fn spread(node: &str) -> u64 {
    node.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Held addresses of block `b` that nobody claims (it can lend them).
fn spare(b: &RailBlock) -> usize {
    b.spec
        .held
        .iter()
        .filter(|a| !b.spec.claims.contains_key(*a))
        .count()
}

/// `items` from the one `seed` picks, wrapping round.
fn rotated<T>(items: &[T], seed: u64) -> impl Iterator<Item = &T> {
    let first = match items.len() {
        0 => 0,
        n => (seed % n as u64) as usize,
    };
    items[first..].iter().chain(&items[..first])
}

/// The starts of the aligned blocks of `size` over `ranges`, beginning
/// at the `first`-th (modulo their number) and wrapping round to those
/// before it; each once per range.
fn block_starts(ranges: &[(u128, u128)], size: u128, first: u128) -> impl Iterator<Item = u128> {
    let spans: Vec<(u128, u128)> = ranges
        .iter()
        .map(|&(lo, hi)| {
            let start = lo - lo % size;
            (start, (hi - start) / size + 1)
        })
        .collect();
    let total = spans.iter().fold(0u128, |t, (_, n)| t.saturating_add(*n));
    let mut skip = if total == 0 { 0 } else { first % total };
    let (mut after, mut before) = (Vec::new(), Vec::new());
    for (start, n) in spans {
        if skip >= n {
            before.push((start, n));
            skip -= n;
        } else {
            if skip > 0 {
                before.push((start, skip));
            }
            after.push((start + skip * size, n - skip));
            skip = 0;
        }
    }
    after
        .into_iter()
        .chain(before)
        .flat_map(move |(start, n)| (0..n).map(move |i| start + i * size))
}

fn block_cidr(pool: &Pool, start: u128, prefix: u8) -> IpNet {
    IpNet::new(pool::addr(pool.is_v6(), start), prefix).expect("prefix fits the family")
}

/// `<pool>.<network with - for . and :>-<prefix>`: one name per range, so
/// create-if-absent is what makes a range one node's.
pub fn block_name(pool: &str, cidr: &IpNet) -> String {
    let net = cidr.network().to_string().replace(['.', ':'], "-");
    format!("{pool}.{net}-{}", cidr.prefix_len())
}

/// The claim for journal record `a`, made by `node`.
fn claim_of(node: &str, a: &Allocation) -> Claim {
    Claim {
        container_id: a.key.container_id.clone(),
        interface: a.key.ifname.clone(),
        node: node.to_owned(),
        network: a.network.clone(),
        pod_namespace: a.pod.namespace.clone(),
        pod_name: a.pod.name.clone(),
        pod_uid: a.pod.uid.clone(),
        netns_inode: a.netns_inode,
        netns_cookie: a.netns_cookie,
    }
}

fn allocation_of(pool: &str, address: IpAddr, c: &Claim) -> Allocation {
    Allocation {
        key: AllocationKey {
            container_id: c.container_id.clone(),
            ifname: c.interface.clone(),
            family: if address.is_ipv6() {
                Family::V6
            } else {
                Family::V4
            },
        },
        pool: pool.to_owned(),
        address,
        netns_inode: c.netns_inode,
        netns_cookie: c.netns_cookie,
        network: c.network.clone(),
        pod: super::PodRef {
            namespace: c.pod_namespace.clone(),
            name: c.pod_name.clone(),
            uid: c.pod_uid.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::PoolSpec;

    fn pool(subnet: &str, ips: &[&str]) -> Pool {
        let spec = serde_json::json!({"name": "rail1", "subnet": subnet, "ips": ips});
        Pool::new(serde_json::from_value::<PoolSpec>(spec).unwrap()).unwrap()
    }

    /// One pool's blocks: block `cidr` with `claimed` written and `held`
    /// held, as the API server returned it.
    fn blocks(cidr: &str, claimed: &[&str], held: &[&str]) -> (Blocks, String) {
        let b = RailBlock {
            spec: BlockSpec {
                pool: "rail1".into(),
                cidr: cidr.into(),
                node: "n".into(),
                claims: claimed
                    .iter()
                    .map(|a| (a.to_string(), Claim::default()))
                    .collect(),
                held: held.iter().map(|a| a.to_string()).collect(),
                lend_requested: false,
            },
            ..RailBlock::default()
        };
        let mut blocks = Blocks::default();
        blocks.by_name.insert("b".into(), b);
        (blocks, "b".into())
    }

    #[test]
    fn rail_pools_map_to_pool_specs_or_say_why_not() {
        let spec = serde_json::json!({"subnet": "172.16.1.0/24", "namespaceName": ["ai"],
            "excludeIPs": ["172.16.1.9", "172.16.1.20-172.16.1.22"], "nodeName": ["n1"]});
        let p = pool_spec_of("gpu1", &spec).unwrap();
        assert_eq!(p.name, "gpu1");
        assert_eq!(p.namespace, vec!["ai".to_owned()]);
        assert_eq!(p.exclude_ips.len(), 4);
        let huge =
            serde_json::json!({"subnet": "fd00::/64", "excludeIPs": ["fd00::1-fd00::ffff:ffff"]});
        assert!(pool_spec_of("v6", &huge).unwrap_err().contains("at most"));
        let bad = serde_json::json!({"subnet": "172.16.1.0/24", "excludeIPs": ["nope"]});
        assert!(pool_spec_of("x", &bad).unwrap_err().contains("\"nope\""));
    }

    #[test]
    fn block_names_are_valid_object_names_and_distinct() {
        let a = block_name("rail1", &"172.16.1.16/28".parse().unwrap());
        let b = block_name("rail1", &"fd00:1::40/122".parse().unwrap());
        assert_eq!(a, "rail1.172-16-1-16-28");
        assert_eq!(b, "rail1.fd00-1--40-122");
    }

    #[test]
    fn the_block_search_starts_where_the_node_says_and_visits_each_block_once() {
        // Two ranges: 0..=63 (4 blocks of 16) and 96..=111 (1 block).
        let ranges = [(0, 63), (96, 111)];
        let all = |first| block_starts(&ranges, 16, first).collect::<Vec<_>>();
        assert_eq!(all(0), [0, 16, 32, 48, 96]);
        assert_eq!(all(2), [32, 48, 96, 0, 16]);
        assert_eq!(all(4), [96, 0, 16, 32, 48]);
        assert_eq!(all(7), all(2), "modulo the number of blocks");
        // A range that starts inside a block begins at that block.
        assert_eq!(block_starts(&[(5, 20)], 16, 1).collect::<Vec<_>>(), [16, 0]);
        // A /64 of /122 blocks is never enumerated to find the first.
        let v6 = [(0, (1u128 << 64) - 1)];
        assert_eq!(
            block_starts(&v6, 64, u128::MAX).next(),
            Some(((1u128 << 58) - 1) * 64)
        );
        // Nodes' starting points differ.
        let starts: std::collections::BTreeSet<u64> = (0..100)
            .map(|n| spread(&format!("gpu-{n:04}")) % 4096)
            .collect();
        assert!(starts.len() > 95, "{} distinct of 100", starts.len());
    }

    #[test]
    fn free_addresses_skip_network_broadcast_and_claims() {
        let p = pool("172.16.1.0/24", &[]);
        let free = |claimed: &[&str]| {
            let (b, n) = blocks("172.16.1.0/28", claimed, &[]);
            b.free(&p, &n, false)
        };
        assert_eq!(free(&[]), Some("172.16.1.1".parse().unwrap()));
        assert_eq!(free(&["172.16.1.1"]), Some("172.16.1.2".parse().unwrap()));
        let all: Vec<String> = (0..15).map(|i| format!("172.16.1.{}", 240 + i)).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        // .255 is the broadcast address: a block of .240-.254 taken is full.
        let (b, n) = blocks("172.16.1.240/28", &all, &[]);
        assert_eq!(b.free(&p, &n, false), None);
        // Outside the pool's ranges: nothing to give.
        let ranged = pool("172.16.1.0/24", &["172.16.1.100-172.16.1.110"]);
        assert!(!any_free(&ranged, &"172.16.1.0/28".parse().unwrap()));
        assert!(any_free(&ranged, &"172.16.1.96/28".parse().unwrap()));
    }

    /// Held addresses are the owner's alone: nobody else's search finds
    /// them free, the owner's does; and the owner's unwritten claims and
    /// releases count as made.
    #[test]
    fn held_addresses_and_unwritten_changes() {
        let p = pool("172.16.1.0/24", &[]);
        let (mut b, n) = blocks(
            "172.16.1.0/28",
            &["172.16.1.1"],
            &["172.16.1.1", "172.16.1.2"],
        );
        assert_eq!(b.free(&p, &n, true), Some("172.16.1.2".parse().unwrap()));
        assert_eq!(b.free(&p, &n, false), Some("172.16.1.3".parse().unwrap()));
        let claim = |cid: &str| Claim {
            container_id: cid.into(),
            interface: "net1".into(),
            ..Claim::default()
        };
        let d = b.delta.entry(n.clone()).or_default();
        d.adds.insert("172.16.1.2".into(), claim("c2"));
        // A release of a claim that is not the one stored changes nothing.
        d.removes
            .insert(("172.16.1.1".into(), "other".into(), "net1".into()));
        assert_eq!(b.free(&p, &n, true), None);
        assert_eq!(b.claims(&n).len(), 2);
        assert_eq!(b.claims_in(&n), 2);
        let key = AllocationKey {
            container_id: "c2".into(),
            ifname: "net1".into(),
            family: Family::V4,
        };
        assert_eq!(
            b.find(&key),
            Some((n.clone(), "172.16.1.2".parse().unwrap()))
        );
        // Releasing the stored claim frees its address (for the owner).
        b.delta
            .get_mut(&n)
            .unwrap()
            .release("172.16.1.1", (String::new(), String::new()));
        assert_eq!(b.free(&p, &n, true), Some("172.16.1.1".parse().unwrap()));
        assert_eq!(b.claims_in(&n), 1);
        // A claim made again at an address whose stored claim is released
        // counts once.
        b.delta
            .get_mut(&n)
            .unwrap()
            .adds
            .insert("172.16.1.1".into(), claim("c3"));
        assert_eq!(b.claims_in(&n), b.claims(&n).len());
        b.delta.get_mut(&n).unwrap().adds.remove("172.16.1.1");
        let mut spec = b.by_name[&n].spec.clone();
        let _ = b.delta[&n].apply(&mut spec);
        assert_eq!(spec.claims.keys().collect::<Vec<_>>(), vec!["172.16.1.2"]);
    }

    /// Found by the scale bench: a pod released, its address handed to
    /// the next pod and that one released too, all between two flushes —
    /// both stored claims' removals must reach the API server.
    #[test]
    fn an_address_released_twice_between_flushes_leaves_no_claim() {
        let (mut b, n) = blocks("172.16.1.0/28", &[], &["172.16.1.1"]);
        let claim = |cid: &str| Claim {
            container_id: cid.into(),
            interface: "net1".into(),
            ..Claim::default()
        };
        // Pod a's claim is stored.
        b.by_name
            .get_mut(&n)
            .unwrap()
            .spec
            .claims
            .insert("172.16.1.1".into(), claim("a"));
        let who = |cid: &str| (cid.to_owned(), "net1".to_owned());
        let d = b.delta.entry(n.clone()).or_default();
        d.release("172.16.1.1", who("a"));
        // Pod b gets the address, and is released before the flush; its
        // claim may be in a write already in flight.
        d.adds.insert("172.16.1.1".into(), claim("b"));
        let in_flight = d.clone();
        d.release("172.16.1.1", who("b"));
        assert_eq!(b.claims_in(&n), 0);
        // The in-flight write lands with b's claim (a's removed).
        let mut stored = b.by_name[&n].spec.clone();
        assert!(in_flight.apply(&mut stored).is_empty());
        assert_eq!(stored.claims["172.16.1.1"], claim("b"));
        let d = b.delta.get_mut(&n).unwrap();
        d.subtract(&in_flight);
        // The next write removes b's claim too.
        let _ = d.apply(&mut stored);
        assert!(stored.claims.is_empty(), "left: {:?}", stored.claims);
        // Had no write been in flight, one write removes both.
        let mut fresh = b.by_name[&n].spec.clone();
        let mut d = Delta::default();
        d.release("172.16.1.1", who("a"));
        d.adds.insert("172.16.1.1".into(), claim("b"));
        d.release("172.16.1.1", who("b"));
        let _ = d.apply(&mut fresh);
        assert!(fresh.claims.is_empty(), "left: {:?}", fresh.claims);
    }

    /// Hardening 12: a claim made from a held address that another node
    /// has claimed meanwhile (the held set was lent and our copy was
    /// stale) must not replace theirs in the next write.
    #[test]
    fn a_flush_never_replaces_another_pods_claim() {
        let claim = |cid: &str| Claim {
            container_id: cid.into(),
            interface: "net1".into(),
            ..Claim::default()
        };
        let mut spec = BlockSpec::default();
        spec.claims.insert("172.16.1.3".into(), claim("theirs"));
        let mut d = Delta::default();
        d.adds.insert("172.16.1.3".into(), claim("ours"));
        d.adds.insert("172.16.1.4".into(), claim("ours-too"));
        // The same attachment again is no conflict.
        spec.claims.insert("172.16.1.5".into(), claim("again"));
        d.adds.insert("172.16.1.5".into(), claim("again"));
        assert_eq!(d.apply(&mut spec), vec!["172.16.1.3".to_owned()]);
        assert_eq!(spec.claims["172.16.1.3"].container_id, "theirs");
        assert_eq!(spec.claims["172.16.1.4"].container_id, "ours-too");
        assert_eq!(spec.claims.len(), 3);
    }
}
