//! Kubernetes mode's store: the API server (etcd behind it) is the only
//! shared store, and its atomic operations are the only lock.
//!
//! A pool's addresses are cut into aligned blocks (`RailBlock`, cluster
//! scoped). A node claims a block by creating it — create-if-absent, so two
//! nodes can never both own one — and hands its addresses out. Each claim
//! (address → container, interface, pod, node) is written into the block
//! with the block's resourceVersion as a precondition: a write that lost a
//! race is refused (409) and retried against the fresh block, never applied
//! twice. Owners write their own blocks, so nodes seldom meet; a node that
//! finds every block claimed borrows a free address from another node's
//! block the same way, so a pool fills to its last address.
//!
//! A write whose answer was lost (the API server died mid-request) is
//! resolved by reading the block back: our claim there means it happened.
//! While the API server is unreachable every call fails fast with
//! [`ClusterError::Unavailable`] and nothing is half-written: a claim is one
//! object write.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
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

/// Node label saying the node's RDMA netns mode (`exclusive`, `shared`, or
/// `none` when the kernel has no RDMA subsystem): pods whose networks move
/// RDMA devices (`rdmaIsolation`) are scheduled by it.
pub const RDMA_MODE_LABEL: &str = "railnet.io/rdma-netns-mode";

/// Labels Node `node` with its RDMA netns mode (a merge patch of that one
/// label).
pub async fn label_node(client: &Client, node: &str, mode: &str) -> Result<(), kube::Error> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({
                "metadata": {"labels": {RDMA_MODE_LABEL: mode}}
            })),
        )
        .await
        .map(|_| ())
}

/// The API resource `plural` of `group`/`version` (`kind`), for dynamic
/// objects (RailNetworks, NADs, Leases, RailPools, Namespaces).
pub fn resource(group: &str, version: &str, kind: &str, plural: &str) -> kube::core::ApiResource {
    kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk(group, version, kind),
        plural,
    )
}

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
    /// Per-request limit; an unreachable server fails calls within it.
    pub timeout: Duration,
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
        }
    }
}

/// Blocks of one pool as last seen, by name.
#[derive(Default)]
struct Blocks {
    listed: bool,
    by_name: BTreeMap<String, RailBlock>,
}

/// The API-server-backed store. Its calls block (the agent's request
/// threads are plain threads); one small runtime, built where the store is
/// made, runs every request — so its sockets live in the network namespace
/// of the thread that connected, whoever calls.
pub struct ClusterStore {
    rt: tokio::runtime::Runtime,
    inner: Arc<Inner>,
}

struct Inner {
    api: Api<RailBlock>,
    opts: ClusterOptions,
    /// Writes the API server refused because the block had changed (409):
    /// how often nodes meet in one block.
    conflicts: std::sync::atomic::AtomicU64,
    /// Writes (claims, releases, block claims) the API server accepted.
    writes: std::sync::atomic::AtomicU64,
    /// One lock per pool: this node's writers to a pool queue behind each
    /// other (they would only conflict), pools proceed in parallel.
    pools: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Blocks>>>>,
    /// ADDs waiting for their pool's lock, by pool.
    pending: Mutex<HashMap<String, Vec<Ask>>>,
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
    reply: tokio::sync::oneshot::Sender<Result<IpAddr, ClusterError>>,
}

/// Rounds of compare-and-swap before giving up on a busy block.
const MAX_ROUNDS: usize = 64;

impl ClusterStore {
    /// Connects (lazily: nothing is sent until the first call).
    pub fn connect(opts: ClusterOptions) -> Result<Self, ClusterError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("railnet-kube")
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Refused(format!("tokio runtime: {e}")))?;
        let client = rt.block_on(client(opts.kubeconfig.as_deref(), opts.timeout))?;
        Ok(Self {
            rt,
            inner: Arc::new(Inner {
                api: Api::all(client),
                opts,
                conflicts: Default::default(),
                writes: Default::default(),
                pools: Mutex::default(),
                pending: Mutex::default(),
            }),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.opts.node
    }

    /// (accepted writes, writes refused as conflicts) since start.
    pub fn write_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.writes.load(Relaxed),
            self.inner.conflicts.load(Relaxed),
        )
    }

    /// Runs `f` on the store's runtime and waits for it.
    fn run<T: Send + 'static, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T, ClusterError>
    where
        F: std::future::Future<Output = Result<T, ClusterError>> + Send + 'static,
    {
        let task = self.rt.spawn(f(self.inner.clone()));
        self.rt
            .block_on(task)
            .unwrap_or_else(|e| Err(ClusterError::Unavailable(format!("request task: {e}"))))
    }

    /// Every claim this node made, in any block: what the agent holds
    /// after a restart.
    pub fn load(&self) -> Result<Vec<Allocation>, ClusterError> {
        self.run(|i| async move { i.load().await })
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

    /// Releases allocations (their claims, if still theirs). A block this
    /// node claimed that is left empty is deleted, so other nodes can claim
    /// its range.
    pub fn release(&self, released: &[Allocation]) -> Result<(), ClusterError> {
        let released = released.to_vec();
        self.run(|i| async move { i.release(&released).await })
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

    /// Labels this node with its RDMA netns mode ([`label_node`]).
    pub fn label_node(&self, mode: &str) -> Result<(), ClusterError> {
        let mode = mode.to_owned();
        self.run(|i| async move {
            label_node(&i.api.clone().into_client(), &i.opts.node, &mode)
                .await
                .map_err(classify)
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

    async fn load(&self) -> Result<Vec<Allocation>, ClusterError> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(classify)?;
        let mut out = Vec::new();
        for b in &list.items {
            for (a, c) in &b.spec.claims {
                if c.node == self.opts.node
                    && let Ok(address) = a.parse()
                {
                    out.push(allocation_of(&b.spec.pool, address, c));
                }
            }
        }
        Ok(out)
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
        // Group commit: every ADD for this pool that arrives while a write
        // is in flight waits in `pending`; whoever takes the pool's lock
        // next serves them all, one write per block they land in.
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue(
            &pool.name,
            Ask {
                key: key.clone(),
                wanted,
                claim,
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
        answer
            .await
            .unwrap_or_else(|_| Err(ClusterError::Unavailable("the request was dropped".into())))
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
    /// them), then each block touched is written once. A write that lost a
    /// race is read back: asks whose claim made it are answered, the rest
    /// go round again.
    async fn serve(&self, blocks: &mut Blocks, pool: &Pool, batch: Vec<Ask>) {
        if !blocks.listed
            && let Err(e) = self.relist(blocks, &pool.name).await
        {
            for ask in batch {
                let _ = ask.reply.send(Err(e.clone()));
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
                if let Some((name, held)) = find(blocks, &ask.key) {
                    if let Some(w) = ask.wanted
                        && w != held
                    {
                        let _ = ask.reply.send(Err(ClusterError::Full(format!(
                            "this interface already holds {held}"
                        ))));
                    } else if let Some(g) = groups.get_mut(&name) {
                        // Asked twice in one batch: answered with the
                        // first's write.
                        g.push((ask, held));
                    } else {
                        let _ = ask.reply.send(Ok(held));
                    }
                    continue;
                }
                let target = match ask.wanted {
                    Some(a) => self.exact_target(blocks, pool, a).await,
                    None => self.next_target(blocks, pool).await,
                };
                match target {
                    Err(e) => {
                        let _ = ask.reply.send(Err(e));
                    }
                    Ok(None) => full.push(ask),
                    // Choosing may have fetched a block that already holds
                    // this ask's claim (a write whose answer was lost):
                    // that claim is the answer, not a second address.
                    Ok(Some(_)) if find(blocks, &ask.key).is_some() => open.push(ask),
                    Ok(Some((name, address))) => {
                        // Held in the cache until the write says otherwise.
                        if let Some(b) = blocks.by_name.get_mut(&name) {
                            b.spec.claims.insert(address.to_string(), ask.claim.clone());
                        }
                        groups.entry(name).or_default().push((ask, address));
                    }
                }
            }
            for (name, members) in groups {
                open.extend(self.write_group(blocks, &name, members).await);
            }
            if !full.is_empty() {
                // The cache may be stale (another node released): look
                // once more before saying the pool is full.
                if !relisted {
                    relisted = true;
                    if let Err(e) = self.relist(blocks, &pool.name).await {
                        for ask in full.into_iter().chain(open.drain(..)) {
                            let _ = ask.reply.send(Err(e.clone()));
                        }
                        return;
                    }
                    open.extend(full);
                } else {
                    for ask in full {
                        let why = match ask.wanted {
                            Some(a) => format!("{a} is held by another pod"),
                            None => format!(
                                "exhausted: all {} addresses are held ({} blocks)",
                                blocks
                                    .by_name
                                    .values()
                                    .map(|b| b.spec.claims.len())
                                    .sum::<usize>(),
                                blocks.by_name.len()
                            ),
                        };
                        let _ = ask.reply.send(Err(ClusterError::Full(why)));
                    }
                }
            }
        }
        for ask in open {
            let _ = ask.reply.send(Err(ClusterError::Unavailable(format!(
                "pool {}: {MAX_ROUNDS} rounds of conflicting writes",
                pool.name
            ))));
        }
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
                    let _ = ask.reply.send(Ok(address));
                }
                return Vec::new();
            }
            Err(e) => e,
        };
        let code = status(&e);
        self.count_conflict(code);
        // Whatever happened, the cached copy (with our tentative claims)
        // is no longer the truth.
        blocks.by_name.remove(name);
        if !read_back_decides(code) {
            let err = classify(e);
            for (ask, _) in members {
                let _ = ask.reply.send(Err(err.clone()));
            }
            return Vec::new();
        }
        // 409/404: someone else wrote (or deleted) the block. No answer at
        // all: our write may or may not have happened. The block as it is
        // now decides, claim by claim.
        match self.get(name).await {
            Ok(Some(b)) => {
                let mut again = Vec::new();
                for (ask, address) in members {
                    let ours = b.spec.claims.get(&address.to_string()).is_some_and(|c| {
                        c.container_id == ask.claim.container_id
                            && c.interface == ask.claim.interface
                    });
                    if ours {
                        let _ = ask.reply.send(Ok(address));
                    } else {
                        again.push(ask);
                    }
                }
                blocks.by_name.insert(name.to_owned(), b);
                again
            }
            Ok(None) => members.into_iter().map(|(a, _)| a).collect(),
            Err(e2) => {
                // Neither the write's answer nor the block could be read:
                // a claim of ours may be stored. Read every block of the
                // pool before the next choice, so a retried ADD finds it
                // rather than taking a second address.
                blocks.listed = false;
                let err = if code.is_none() {
                    classify(e).or(e2)
                } else {
                    e2
                };
                for (ask, _) in members {
                    let _ = ask.reply.send(Err(err.clone()));
                }
                Vec::new()
            }
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

    /// Reads every block of `pool` into the cache.
    async fn relist(&self, blocks: &mut Blocks, pool: &str) -> Result<(), ClusterError> {
        let lp = ListParams::default().labels(&format!("{POOL_LABEL}={pool}"));
        let list = self.api.list(&lp).await.map_err(classify)?;
        blocks.by_name = list
            .items
            .into_iter()
            .filter(|b| b.spec.pool == pool)
            .map(|b| (b.metadata.name.clone().unwrap_or_default(), b))
            .collect();
        blocks.listed = true;
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

    /// Where the next address comes from: a free address in a block of
    /// ours, else a block nobody has claimed (claimed now), else a free
    /// address in another node's block. `None`: nothing free anywhere seen.
    async fn next_target(
        &self,
        blocks: &mut Blocks,
        pool: &Pool,
    ) -> Result<Option<(String, IpAddr)>, ClusterError> {
        let me = &self.opts.node;
        for (name, b) in &blocks.by_name {
            if &b.spec.node == me
                && let Some(a) = free_in(pool, b)
            {
                return Ok(Some((name.clone(), a)));
            }
        }
        let prefix = self.prefix(pool);
        // Walk aligned blocks over the pool's ranges; a /64 is never
        // enumerated: every step either skips a known block or stops.
        let size: u128 = 1u128 << (if pool.is_v6() { 128 } else { 32 } - u32::from(prefix));
        for &(lo, hi) in pool.ranges() {
            let mut start = lo - lo % size;
            while start <= hi {
                let cidr = block_cidr(pool, start, prefix);
                let name = block_name(&pool.name, &cidr);
                if !blocks.by_name.contains_key(&name) && any_free(pool, &cidr) {
                    let b = self.claim_block(pool, &name, &cidr).await?;
                    let mine = &b.spec.node == me;
                    let free = free_in(pool, &b);
                    blocks.by_name.insert(name.clone(), b);
                    if mine && let Some(a) = free {
                        return Ok(Some((name, a)));
                    }
                }
                match start.checked_add(size) {
                    Some(s) => start = s,
                    None => break,
                }
            }
        }
        for (name, b) in &blocks.by_name {
            if let Some(a) = free_in(pool, b) {
                return Ok(Some((name.clone(), a)));
            }
        }
        Ok(None)
    }

    /// The block holding `address` (claimed now if nobody has), if the
    /// address is free in it.
    async fn exact_target(
        &self,
        blocks: &mut Blocks,
        pool: &Pool,
        address: IpAddr,
    ) -> Result<Option<(String, IpAddr)>, ClusterError> {
        let prefix = self.prefix(pool);
        let cidr = IpNet::new(address, prefix)
            .expect("prefix fits the family")
            .trunc();
        let name = block_name(&pool.name, &cidr);
        if !blocks.by_name.contains_key(&name) {
            let b = self.claim_block(pool, &name, &cidr).await?;
            blocks.by_name.insert(name.clone(), b);
        }
        let b = &blocks.by_name[&name];
        Ok((!b.spec.claims.contains_key(&address.to_string())).then_some((name, address)))
    }

    /// Creates the block for this node; if it exists already, whoever owns
    /// it, returns it as it is (a retried create meeting our own block is
    /// ours).
    async fn claim_block(
        &self,
        pool: &Pool,
        name: &str,
        cidr: &IpNet,
    ) -> Result<RailBlock, ClusterError> {
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
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        let holder = |blocks: &Blocks| {
            blocks
                .by_name
                .iter()
                .find(|(_, b)| b.spec.claims.contains_key(&key))
                .map(|(n, _)| n.clone())
        };
        let mut name = holder(blocks);
        if name.is_none() {
            self.relist(blocks, &a.pool).await?;
            name = holder(blocks);
        }
        let Some(name) = name else {
            return Ok(()); // nothing holds it: already released
        };
        for _ in 0..MAX_ROUNDS {
            let Some(current) = blocks.by_name.get(&name).cloned() else {
                return Ok(());
            };
            let is_ours = current.spec.claims.get(&key).is_some_and(|c| {
                c.container_id == a.key.container_id && c.interface == a.key.ifname
            });
            if !is_ours {
                return Ok(());
            }
            let mut next = current.clone();
            next.spec.claims.remove(&key);
            let empty_and_mine = next.spec.claims.is_empty() && next.spec.node == self.opts.node;
            let result = if empty_and_mine {
                // Give the range back: deleted only if nobody wrote since.
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: current.metadata.resource_version.clone(),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                self.api.delete(&name, &dp).await.map(|_| None)
            } else {
                self.api
                    .replace(&name, &PostParams::default(), &next)
                    .await
                    .map(Some)
            };
            match result {
                Ok(Some(b)) => {
                    self.count_write();
                    blocks.by_name.insert(name, b);
                    return Ok(());
                }
                Ok(None) => {
                    self.count_write();
                    blocks.by_name.remove(&name);
                    return Ok(());
                }
                Err(e) => {
                    let code = status(&e);
                    self.count_conflict(code);
                    if !read_back_decides(code) {
                        return Err(classify(e));
                    }
                    match self.get(&name).await {
                        Ok(Some(b)) => {
                            blocks.by_name.insert(name.clone(), b);
                        }
                        Ok(None) => {
                            blocks.by_name.remove(&name);
                            return Ok(());
                        }
                        Err(e2) if code.is_none() => return Err(classify(e).or(e2)),
                        Err(e2) => return Err(e2),
                    }
                }
            }
        }
        Err(ClusterError::Unavailable(format!(
            "block {name}: {MAX_ROUNDS} rounds of conflicting writes"
        )))
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

/// A client from `kubeconfig` (else inferred: KUBECONFIG, ~/.kube/config,
/// the in-cluster service account) with every request bounded by
/// `timeout`. Call inside a runtime.
pub async fn client(kubeconfig: Option<&Path>, timeout: Duration) -> Result<Client, ClusterError> {
    let mut config = match kubeconfig {
        Some(path) => from_file(path).await?,
        None => Config::infer().await.map_err(|e| {
            ClusterError::Refused(format!(
                "no Kubernetes configuration found ({e}); run in a pod with a service account, or pass --kubeconfig"
            ))
        })?,
    };
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    Client::try_from(config).map_err(|e| ClusterError::Refused(format!("client: {e}")))
}

async fn from_file(path: &Path) -> Result<Config, ClusterError> {
    let kc = Kubeconfig::read_from(path)
        .map_err(|e| ClusterError::Refused(format!("kubeconfig {}: {e}", path.display())))?;
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| ClusterError::Refused(format!("kubeconfig {}: {e}", path.display())))
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

fn find(blocks: &Blocks, key: &AllocationKey) -> Option<(String, IpAddr)> {
    let v6 = key.family == Family::V6;
    blocks.by_name.iter().find_map(|(name, b)| {
        b.spec.claims.iter().find_map(|(a, c)| {
            let a: IpAddr = a.parse().ok()?;
            (c.container_id == key.container_id && c.interface == key.ifname && a.is_ipv6() == v6)
                .then(|| (name.clone(), a))
        })
    })
}

/// The lowest address of `b` the pool hands out and nobody holds.
fn free_in(pool: &Pool, b: &RailBlock) -> Option<IpAddr> {
    let net: IpNet = b.spec.cidr.parse().ok()?;
    let (lo, hi) = (pool::num(net.network()), pool::num(net.broadcast()));
    (lo..=hi)
        .map(|n| pool::addr(pool.is_v6(), n))
        .find(|a| pool.holds(*a) && !b.spec.claims.contains_key(&a.to_string()))
}

fn any_free(pool: &Pool, cidr: &IpNet) -> bool {
    let (lo, hi) = (pool::num(cidr.network()), pool::num(cidr.broadcast()));
    (lo..=hi).any(|n| pool.holds(pool::addr(pool.is_v6(), n)))
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

    fn block(cidr: &str, claimed: &[&str]) -> RailBlock {
        RailBlock {
            spec: BlockSpec {
                pool: "rail1".into(),
                cidr: cidr.into(),
                node: "n".into(),
                claims: claimed
                    .iter()
                    .map(|a| (a.to_string(), Claim::default()))
                    .collect(),
            },
            ..RailBlock::default()
        }
    }

    /// kube-rs over a mock service (the test API server has no nodes): the
    /// request is one merge patch of the one label, on the node named.
    #[tokio::test]
    async fn the_node_label_is_one_merge_patch() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |req: hyper::Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = http_body_util::BodyExt::collect(body)
                    .await
                    .unwrap()
                    .to_bytes();
                log.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.path().to_owned(),
                    parts.headers["content-type"].to_str().unwrap().to_owned(),
                    String::from_utf8(body.to_vec()).unwrap(),
                ));
                let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-7"}});
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .header("Content-Type", "application/json")
                        .body(kube::client::Body::from(node.to_string().into_bytes()))
                        .unwrap(),
                )
            }
        });
        label_node(&Client::new(service, "default"), "gpu-7", "exclusive")
            .await
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (method, path, kind, body) = &seen[0];
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("PATCH", "/api/v1/nodes/gpu-7")
        );
        assert_eq!(kind, "application/merge-patch+json");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            serde_json::json!({"metadata": {"labels": {"railnet.io/rdma-netns-mode": "exclusive"}}})
        );
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
    fn free_addresses_skip_network_broadcast_and_claims() {
        let p = pool("172.16.1.0/24", &[]);
        assert_eq!(
            free_in(&p, &block("172.16.1.0/28", &[])),
            Some("172.16.1.1".parse().unwrap())
        );
        assert_eq!(
            free_in(&p, &block("172.16.1.0/28", &["172.16.1.1"])),
            Some("172.16.1.2".parse().unwrap())
        );
        let all: Vec<String> = (0..15).map(|i| format!("172.16.1.{}", 240 + i)).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        // .255 is the broadcast address: a block of .240-.254 taken is full.
        assert_eq!(free_in(&p, &block("172.16.1.240/28", &all)), None);
        // Outside the pool's ranges: nothing to give.
        let ranged = pool("172.16.1.0/24", &["172.16.1.100-172.16.1.110"]);
        assert!(!any_free(&ranged, &"172.16.1.0/28".parse().unwrap()));
        assert!(any_free(&ranged, &"172.16.1.96/28".parse().unwrap()));
    }
}
