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
//!
//! Here: the store and its options, errors and the start (`load`).
//! `objects`: RailBlock and RailPool objects and their names; `blocks`:
//! what a node knows of a pool's blocks and the order it searches them;
//! `search`: an ADD's address (held, a new block, a free one, a lend);
//! `own`: a node's own blocks — flushes, lending, the watch.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api,
    api::{ListParams, PostParams},
};

use super::{Allocation, AllocationKey, Pool, pool};
use crate::netns::NetnsId;

mod blocks;
mod error;
mod objects;
mod options;
mod own;
mod search;
mod traffic;
mod walk;

pub use error::ClusterError;
use error::{classify, never_sent, read_back_decides, status};
pub use options::ClusterOptions;
pub use traffic::Traffic;

use blocks::{Answer, Blocks, Target, any_free, block_cidr, block_starts, rotated, spare, spread};
pub use objects::{
    BlockSpec, Claim, NODE_LABEL, POOL_LABEL, RailBlock, block_name, if_unchanged, pool_spec_of,
    railpools,
};
use objects::{allocation_of, claim_of};

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
}

#[cfg(test)]
mod tests {
    use super::blocks::Delta;
    use super::*;
    use crate::ipam::{Family, PoolSpec};

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
