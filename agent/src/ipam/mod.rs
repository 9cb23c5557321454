//! IPAM: pools, pool selection, allocation, and the store behind them.
//!
//! Allocation happens in memory under one lock (so no address can have two
//! owners), then is made durable before the caller hears of it; a failed
//! write undoes the reservation. Where the choice is made and what makes it
//! durable is the IPAM mode, a backend (`backend.rs`): the node's own store (redb on
//! local disk with group commit: concurrent ADDs share one fsync), or
//! blocks in the API server shared by every node ([`cluster`]) with that
//! store as the node's journal.

mod allocation;
mod backend;
pub mod cluster;
mod held;
mod pool;
mod release;
mod select;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

pub use allocation::{Allocation, AllocationKey, Family, PodRef};
use held::State;
pub use pool::{IpamError, Pool, PoolSpec, RouteSpec};
pub use select::{Candidates, PoolRequest, Rejection, select, wildcard_match};

use crate::netns::NetnsId;
pub use store::{AllocationStore, MemoryStore, RedbStore, StoreError};

use pool::PoolIndex;

/// Pools plus the allocations made from them.
pub struct Ipam {
    state: Mutex<State>,
    /// The node's own store (in Kubernetes mode, its journal).
    store: Box<dyn AllocationStore>,
    /// Where addresses are chosen and made durable (the IPAM mode).
    backend: Box<dyn backend::Backend>,
}

impl std::fmt::Debug for Ipam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ipam")
            .field("pools", &self.lock().pools.len())
            .finish()
    }
}

impl Ipam {
    /// Builds the allocator over validated pools and an in-memory store.
    pub fn new(specs: Vec<PoolSpec>) -> Result<Self, IpamError> {
        Self::with_store(specs, Box::new(MemoryStore::default())).map_err(|e| match e {
            OpenError::Pools(mut e) => e.remove(0),
            OpenError::Store(e) => unreachable!("the memory store cannot fail: {e}"),
        })
    }

    /// Builds the allocator over validated pools and `store`, taking back
    /// every allocation the store holds.
    pub fn with_store(
        specs: Vec<PoolSpec>,
        store: Box<dyn AllocationStore>,
    ) -> Result<Self, OpenError> {
        let pools = build_pools(specs).map_err(OpenError::Pools)?;
        let mut state = State {
            index: pools
                .iter()
                .map(|(n, p)| (n.clone(), PoolIndex::new(p)))
                .collect(),
            pools: Arc::new(pools),
            ..State::default()
        };
        for a in store.load().map_err(OpenError::Store)? {
            state.adopt(&a);
        }
        Ok(Self {
            state: Mutex::new(state),
            store,
            backend: Box::new(backend::Local),
        })
    }

    /// Builds the allocator over validated pools with the API server as the
    /// shared store (Kubernetes mode) and `journal` as this node's own:
    /// ADDs from addresses the node holds are durable in the journal before
    /// their claims reach the API server. Takes back every claim this node
    /// made and every journal record still valid (see
    /// [`cluster::ClusterStore::load`]); drops the rest from the journal.
    pub fn with_cluster(
        specs: Vec<PoolSpec>,
        cluster: Arc<cluster::ClusterStore>,
        journal: Box<dyn AllocationStore>,
    ) -> Result<Self, OpenError> {
        let recorded = journal.load().map_err(OpenError::Store)?;
        let (kept, gone) = cluster
            .load(
                recorded,
                &specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            )
            .map_err(|e| OpenError::Store(StoreError::Db(e.to_string())))?;
        for a in &gone {
            tracing::info!(
                pool = %a.pool, address = %a.address, container = %a.key.container_id,
                "allocation released while the agent was away (its claim is gone from the API server)"
            );
        }
        journal.delete(&gone).map_err(OpenError::Store)?;
        let mut ipam = Self::with_store(specs, journal)?;
        {
            // Claims the journal lacks (it was lost, or the agent stopped
            // between the claim's write and the journal's): held all the
            // same.
            let mut state = ipam.lock();
            for a in kept {
                if !state.held.contains_key(&a.key) {
                    state.adopt(&a);
                }
            }
        }
        ipam.backend = Box::new(backend::Kubernetes(cluster));
        Ok(ipam)
    }

    /// Kubernetes mode: writes the claims this node made or released from
    /// its held addresses now, instead of at the next flush. Nothing to do
    /// with the local store (every change is durable when made).
    pub fn flush(&self) -> Result<(), IpamError> {
        self.backend.flush()
    }

    /// The pools by name, as they are now.
    pub fn pools(&self) -> Arc<BTreeMap<String, Pool>> {
        self.lock().pools.clone()
    }

    /// Replaces the pools (Kubernetes mode: the RailPools changed). Every
    /// bad spec is reported and nothing changes; otherwise new and changed
    /// pools get a fresh index holding what this node holds in them, and
    /// removed pools hand out nothing more (their allocations are kept
    /// until released). Returns the names added, changed and removed.
    pub fn replace_pools(&self, specs: Vec<PoolSpec>) -> Result<PoolChanges, Vec<IpamError>> {
        let new = build_pools(specs)?;
        let mut state = self.lock();
        let old = state.pools.clone();
        let mut changes = PoolChanges::default();
        let mut index = HashMap::new();
        for (name, pool) in &new {
            match (old.get(name), state.index.remove(name)) {
                (Some(before), Some(ix)) if before == pool => {
                    index.insert(name.clone(), ix);
                    continue;
                }
                (Some(_), _) => changes.changed.push(name.clone()),
                (None, _) => changes.added.push(name.clone()),
            }
            let mut ix = PoolIndex::new(pool);
            for h in state.held.values() {
                if state.name(h.pool) == name.as_str() && pool.subnet.contains(&h.address) {
                    ix.mark(pool, h.address);
                }
            }
            index.insert(name.clone(), ix);
        }
        changes.removed = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        state.index = index;
        state.pools = Arc::new(new);
        // Addresses held under pools that are gone or no longer cover them
        // stay taken in the pools that now do.
        let orphans: Vec<IpAddr> = state
            .held
            .values()
            .filter(|h| !state.own_pool_covers(state.name(h.pool), h.address))
            .map(|h| h.address)
            .collect();
        for address in orphans {
            state.mark_orphan(address);
        }
        Ok(changes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates for `key` from the first of `candidates` with room; a
    /// repeated call for the same key returns the same address. Durable
    /// when it returns.
    pub fn allocate(
        &self,
        key: AllocationKey,
        candidates: &Candidates,
        netns: NetnsId,
    ) -> Result<Allocation, IpamError> {
        self.allocate_for(key, candidates, netns, "")
    }

    /// Allocates for `key` (exactly `wanted`, if given) recording who it is
    /// for: in Kubernetes mode the claim carries the pod's namespace, name
    /// and UID.
    pub fn allocate_owned(
        &self,
        key: AllocationKey,
        candidates: &Candidates,
        wanted: Option<IpAddr>,
        owner: &cluster::Owner,
    ) -> Result<Allocation, IpamError> {
        self.backend.allocate(self, key, candidates, wanted, owner)
    }

    /// What a repeated ADD for `key` gets: the allocation it holds, or —
    /// when it asks for an exact address other than the one it holds — a
    /// refusal naming the held one. `None`: nothing held yet.
    fn repeated(
        state: &State,
        key: &AllocationKey,
        wanted: Option<IpAddr>,
    ) -> Option<Result<Allocation, IpamError>> {
        let held = state.record(key, state.held.get(key)?);
        Some(match wanted {
            Some(a) if a != held.address => Err(IpamError::Requested {
                address: a,
                rejected: vec![Rejection {
                    pool: held.pool,
                    why: format!("this interface already holds {}", held.address),
                }],
            }),
            _ => Ok(held),
        })
    }

    /// The cluster path: the held check here, the choice and the claim in
    /// the API server (no node-wide lock held meanwhile: the cluster store
    /// queues writers per pool).
    fn allocate_in_cluster(
        &self,
        c: &cluster::ClusterStore,
        key: AllocationKey,
        candidates: &Candidates,
        wanted: Option<IpAddr>,
        owner: &cluster::Owner,
    ) -> Result<Allocation, IpamError> {
        if let Some(answer) = Self::repeated(&self.lock(), &key, wanted) {
            return answer;
        }
        let mut refused = Vec::new();
        let pools = self.pools();
        for name in &candidates.pools {
            let Some(pool) = pools.get(name) else {
                refused.push(Rejection {
                    pool: name.clone(),
                    why: "the pool was just removed".into(),
                });
                continue;
            };
            match c.allocate(pool, &key, wanted, owner) {
                Ok(address) => {
                    let mut allocation = {
                        let mut state = self.lock();
                        if let Some(index) = state.index.get_mut(name) {
                            index.mark(pool, address);
                        }
                        state.hold_new(key, name.clone(), address, owner.netns, &owner.network)
                    };
                    allocation.pod = PodRef {
                        namespace: owner.pod_namespace.clone(),
                        name: owner.pod_name.clone(),
                        uid: owner.pod_uid.clone(),
                    };
                    return self.journal(c, allocation);
                }
                Err(cluster::ClusterError::Full(why)) => refused.push(Rejection {
                    pool: name.clone(),
                    why,
                }),
                Err(e @ cluster::ClusterError::Unavailable(_)) => {
                    return Err(IpamError::Unavailable(format!("pool {name}: {e}")));
                }
                Err(e) => return Err(IpamError::Store(format!("pool {name}: {e}"))),
            }
        }
        let mut rejected = candidates.rejected.clone();
        rejected.extend(refused);
        Err(match wanted {
            Some(address) => IpamError::Requested { address, rejected },
            None => IpamError::NoPool(rejected),
        })
    }

    /// Makes a cluster allocation durable in the node's journal; if that
    /// fails, it is undone (the claim released) and nothing is held.
    fn journal(
        &self,
        c: &cluster::ClusterStore,
        allocation: Allocation,
    ) -> Result<Allocation, IpamError> {
        let undo = allocation.clone();
        self.commit(allocation).inspect_err(|_| {
            if let Err(e) = c.release(std::slice::from_ref(&undo)) {
                tracing::warn!(address = %undo.address, error = %e, "claim of a failed ADD not released; the claim sweep will");
            }
        })
    }

    /// Allocates exactly `address` (the `ips` capability: an address the
    /// pod asked for) from the first candidate pool that holds it, or says
    /// for each candidate why not. A repeated ADD gets the same answer.
    pub fn allocate_exact_for(
        &self,
        key: AllocationKey,
        candidates: &Candidates,
        address: IpAddr,
        netns: NetnsId,
        network: &str,
    ) -> Result<Allocation, IpamError> {
        self.allocate_owned(key, candidates, Some(address), &Self::owner(netns, network))
    }

    /// As [`Ipam::allocate`], recording the network it is for.
    pub fn allocate_for(
        &self,
        key: AllocationKey,
        candidates: &Candidates,
        netns: NetnsId,
        network: &str,
    ) -> Result<Allocation, IpamError> {
        self.allocate_owned(key, candidates, None, &Self::owner(netns, network))
    }

    fn owner(netns: NetnsId, network: &str) -> cluster::Owner {
        cluster::Owner {
            netns,
            network: network.to_owned(),
            ..cluster::Owner::default()
        }
    }

    /// The local path: choice and hold under the node's lock, then the
    /// store's durable write.
    fn allocate_local(
        &self,
        key: AllocationKey,
        candidates: &Candidates,
        wanted: Option<IpAddr>,
        netns: NetnsId,
        network: &str,
    ) -> Result<Allocation, IpamError> {
        let allocation = {
            let mut state = self.lock();
            if let Some(answer) = Self::repeated(&state, &key, wanted) {
                return answer;
            }
            match wanted {
                Some(address) => self
                    .take_first(
                        &mut state,
                        key,
                        candidates,
                        netns,
                        network,
                        |pool, index| index.take_exact(pool, address).map(|()| address),
                    )
                    .map_err(|mut rejected| {
                        rejected.extend(candidates.rejected.iter().cloned());
                        IpamError::Requested { address, rejected }
                    })?,
                None => self
                    .take_first(
                        &mut state,
                        key,
                        candidates,
                        netns,
                        network,
                        |pool, index| index.take(pool).ok_or_else(|| "exhausted".to_owned()),
                    )
                    .map_err(|full| {
                        let mut rejected = candidates.rejected.clone();
                        rejected.extend(full);
                        IpamError::NoPool(rejected)
                    })?,
            }
        };
        self.commit(allocation)
    }

    /// Holds the first address `take` gives from the candidate pools, in
    /// order; or, if none gives one, each pool with why not.
    fn take_first(
        &self,
        state: &mut State,
        key: AllocationKey,
        candidates: &Candidates,
        netns: NetnsId,
        network: &str,
        take: impl Fn(&Pool, &mut PoolIndex) -> Result<IpAddr, String>,
    ) -> Result<Allocation, Vec<Rejection>> {
        let mut refused = Vec::new();
        let pools = state.pools.clone();
        for name in &candidates.pools {
            let (Some(pool), Some(index)) = (pools.get(name), state.index.get_mut(name)) else {
                refused.push(Rejection {
                    pool: name.clone(),
                    why: "the pool was just removed".into(),
                });
                continue;
            };
            match take(pool, index) {
                Ok(address) => {
                    return Ok(state.hold_new(key, name.clone(), address, netns, network));
                }
                Err(why) => refused.push(Rejection {
                    pool: name.clone(),
                    why,
                }),
            }
        }
        Err(refused)
    }

    /// Makes a held allocation durable, or gives the address back so the
    /// state stays what the store holds.
    fn commit(&self, allocation: Allocation) -> Result<Allocation, IpamError> {
        if let Err(e) = self.store.put(&allocation) {
            let mut state = self.lock();
            state.held.remove(&allocation.key);
            let pools = state.pools.clone();
            if let (Some(pool), Some(index)) = (
                pools.get(&allocation.pool),
                state.index.get_mut(&allocation.pool),
            ) {
                index.free(pool, allocation.address);
            }
            return Err(IpamError::Store(e.to_string()));
        }
        Ok(allocation)
    }

    /// The addresses (container, ifname) holds, IPv4 first. Direct lookups:
    /// DEL and CHECK must not scan every allocation of the node.
    pub fn addresses_of(&self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        let state = self.lock();
        keys_of(container_id, ifname)
            .iter()
            .filter_map(|k| state.held.get(k).map(|h| h.address))
            .collect()
    }

    /// The netns (container, ifname)'s addresses were allocated for, if it
    /// holds any.
    pub fn netns_of(&self, container_id: &str, ifname: &str) -> Option<NetnsId> {
        let state = self.lock();
        keys_of(container_id, ifname)
            .iter()
            .find_map(|k| state.held.get(k).map(|h| h.netns))
    }

    /// Every allocation held.
    pub fn allocations(&self) -> Vec<Allocation> {
        let mut v: Vec<Allocation> = {
            let state = self.lock();
            state.held.iter().map(|(k, h)| state.record(k, h)).collect()
        };
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Kubernetes mode: (API writes accepted, writes refused as
    /// conflicts) since start; `None` with the local store.
    pub fn api_writes(&self) -> Option<(u64, u64)> {
        self.backend.api_writes()
    }

    /// Number of addresses held.
    pub fn allocated(&self) -> usize {
        self.lock().held.len()
    }

    /// (used, capacity) of a pool.
    pub fn usage(&self, pool: &str) -> Option<(u128, u128)> {
        let state = self.lock();
        state.index.get(pool).map(|i| (i.used(), i.capacity()))
    }
}

/// The keys one attachment can hold, one per family.
fn keys_of(container_id: &str, ifname: &str) -> [AllocationKey; 2] {
    let v4 = AllocationKey {
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
        family: Family::V4,
    };
    let v6 = AllocationKey {
        family: Family::V6,
        ..v4.clone()
    };
    [v4, v6]
}

/// How many addresses `pool` can hand out (ranges minus exclusions).
pub fn capacity(pool: &Pool) -> u128 {
    PoolIndex::new(pool).capacity()
}

/// What [`Ipam::replace_pools`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PoolChanges {
    /// Pools that are new.
    pub added: Vec<String>,
    /// Pools whose definition changed.
    pub changed: Vec<String>,
    /// Pools that are gone.
    pub removed: Vec<String>,
}

impl PoolChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Validates every spec (all errors reported, not just the first: a person
/// fixes the file once) into pools by name.
fn build_pools(specs: Vec<PoolSpec>) -> Result<BTreeMap<String, Pool>, Vec<IpamError>> {
    let mut pools = BTreeMap::new();
    let mut errors = Vec::new();
    for spec in specs {
        match Pool::new(spec) {
            Ok(pool) if pools.contains_key(&pool.name) => {
                errors.push(IpamError::Duplicate(pool.name))
            }
            Ok(pool) => {
                pools.insert(pool.name.clone(), pool);
            }
            Err(e) => errors.push(e),
        }
    }
    // Two pools handing out one address give it to two pods (a pool renamed
    // while pods hold its addresses is the same): refused, naming both.
    let all: Vec<&Pool> = pools.values().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if let Some((first, last)) = a.overlap(b) {
                errors.push(IpamError::Overlap {
                    a: a.name.clone(),
                    b: b.name.clone(),
                    shared: format!("{first}-{last}"),
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(pools)
    } else {
        Err(errors)
    }
}

/// Why an allocator could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Pool definitions (every bad one).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Pools(Vec<IpamError>),
    /// The store.
    #[error("allocation store: {0}")]
    Store(StoreError),
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Arc};

    use proptest::prelude::*;

    use super::{pool::tests::spec, *};

    #[test]
    fn overlapping_pools_are_refused_naming_both_and_the_range() {
        let errs = build_pools(vec![
            spec("rail1", "172.16.1.0/24", &["172.16.1.10-172.16.1.50"], None),
            spec(
                "rail1-renamed",
                "172.16.1.0/24",
                &["172.16.1.40-172.16.1.90"],
                None,
            ),
            spec("rail2", "172.16.2.0/24", &["172.16.2.10-172.16.2.50"], None),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        let said = errs[0].to_string();
        assert!(
            said.contains("rail1 and rail1-renamed") && said.contains("172.16.1.40-172.16.1.50"),
            "{said}"
        );
        // Excluding the shared part makes them disjoint.
        let mut b = spec(
            "rail1-renamed",
            "172.16.1.0/24",
            &["172.16.1.40-172.16.1.90"],
            None,
        );
        b.exclude_ips = (40..=50)
            .map(|h| format!("172.16.1.{h}").parse().unwrap())
            .collect();
        assert!(
            build_pools(vec![
                spec("rail1", "172.16.1.0/24", &["172.16.1.10-172.16.1.50"], None),
                b
            ])
            .is_ok()
        );
    }

    fn key(c: usize) -> AllocationKey {
        AllocationKey {
            container_id: format!("c{c}"),
            ifname: "net1".into(),
            family: Family::V4,
        }
    }

    fn only(pool: &str) -> Candidates {
        Candidates {
            pools: vec![pool.into()],
            rejected: vec![],
        }
    }

    fn small_pool() -> PoolSpec {
        let mut s = spec(
            "p",
            "10.0.0.0/26",
            &["10.0.0.0-10.0.0.40"],
            Some("10.0.0.1"),
        );
        s.exclude_ips = vec!["10.0.0.7".parse().unwrap()];
        s
    }

    proptest! {
        /// Any interleaving of ADDs and DELs: one owner per address, never
        /// the network, gateway or an excluded address, never outside the
        /// range; and a full pool hands a released address straight back.
        #[test]
        fn one_owner_per_address(ops in proptest::collection::vec((0usize..60, any::<bool>()), 1..400)) {
            let ipam = Ipam::new(vec![small_pool()]).unwrap();
            for (c, add) in ops {
                if add {
                    let _ = ipam.allocate(key(c), &only("p"), NetnsId::default());
                } else {
                    ipam.release(&format!("c{c}"), "net1").unwrap();
                }
                let all = ipam.allocations();
                let addrs: HashSet<IpAddr> = all.iter().map(|a| a.address).collect();
                prop_assert_eq!(addrs.len(), all.len(), "an address with two owners");
                for a in &all {
                    let n = match a.address { IpAddr::V4(v) => u32::from(v), _ => unreachable!() };
                    prop_assert!(n <= u32::from(std::net::Ipv4Addr::new(10, 0, 0, 40)));
                    for never in ["10.0.0.0", "10.0.0.1", "10.0.0.7"] {
                        prop_assert_ne!(a.address, never.parse::<IpAddr>().unwrap());
                    }
                }
            }
        }
    }

    /// Pool `name` of four addresses, 10.0.0.2-10.0.0.5.
    fn four(name: &str) -> PoolSpec {
        spec(name, "10.0.0.0/24", &["10.0.0.2-10.0.0.5"], None)
    }

    /// Every address `pool` hands out until it is full.
    fn drain(ipam: &Ipam, pool: &str, from: usize) -> Vec<IpAddr> {
        let mut got = Vec::new();
        while let Ok(a) = ipam.allocate(key(from + got.len()), &only(pool), NetnsId::default()) {
            got.push(a.address);
        }
        got
    }

    /// A pool renamed (or removed) under live allocations: their addresses
    /// stay held by the pool that now covers them, whether the change comes
    /// while the agent runs (RailPools) or across a restart (the pools
    /// file), until they are released.
    #[test]
    fn an_address_held_under_a_gone_pool_is_held_by_the_pool_that_covers_it() {
        let ipam = Ipam::new(vec![four("old")]).unwrap();
        let held: Vec<IpAddr> = drain(&ipam, "old", 0)[..2].to_vec();
        ipam.release("c2", "net1").unwrap();
        ipam.release("c3", "net1").unwrap();
        ipam.replace_pools(vec![four("renamed")]).unwrap();
        let fresh = drain(&ipam, "renamed", 100);
        assert_eq!(fresh.len(), 2, "{fresh:?}");
        assert!(
            fresh.iter().all(|a| !held.contains(a)),
            "{held:?} handed out again: {fresh:?}"
        );
        // Released, an orphan's address is the covering pool's again.
        ipam.release("c0", "net1").unwrap();
        assert_eq!(drain(&ipam, "renamed", 200), vec![held[0]]);

        // Across a restart: the store's allocation names the old pool.
        let dir = scratch("orphan");
        let db = dir.join("ipam.redb");
        let before = {
            let ipam = Ipam::with_store(vec![four("old")], Box::new(RedbStore::open(&db).unwrap()))
                .unwrap();
            ipam.allocate(key(0), &only("old"), NetnsId::default())
                .unwrap()
                .address
        };
        let ipam = Ipam::with_store(
            vec![four("renamed")],
            Box::new(RedbStore::open(&db).unwrap()),
        )
        .unwrap();
        let fresh = drain(&ipam, "renamed", 100);
        assert_eq!(fresh.len(), 3);
        assert!(!fresh.contains(&before), "{before} handed out twice");
        drop(ipam);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_full_pool_reuses_a_released_address_and_says_it_is_exhausted() {
        let ipam = Ipam::new(vec![small_pool()]).unwrap();
        // 41 addresses minus network, gateway and one excluded.
        let mut n = 0;
        while ipam
            .allocate(key(n), &only("p"), NetnsId::default())
            .is_ok()
        {
            n += 1;
        }
        assert_eq!(n, 38);
        let err = ipam
            .allocate(key(999), &only("p"), NetnsId::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("p: exhausted"), "{err}");
        let freed = ipam.release("c5", "net1").unwrap();
        let again = ipam
            .allocate(key(999), &only("p"), NetnsId::default())
            .unwrap();
        assert_eq!(again.address, freed[0].address);
        assert_eq!(
            ipam.allocate(key(999), &only("p"), NetnsId::default())
                .unwrap(),
            again,
            "a repeated ADD gets the same address"
        );
    }

    #[test]
    fn ipv6_pools_allocate_without_enumerating_a_64() {
        let ipam = Ipam::new(vec![spec(
            "v6",
            "fd00:16:1::/64",
            &[],
            Some("fd00:16:1::1"),
        )])
        .unwrap();
        let v6 = |c: usize| AllocationKey {
            family: Family::V6,
            ..key(c)
        };
        let a = ipam
            .allocate(v6(1), &only("v6"), NetnsId::default())
            .unwrap();
        assert_eq!(a.address, "fd00:16:1::2".parse::<IpAddr>().unwrap());
        for c in 2..2000 {
            ipam.allocate(v6(c), &only("v6"), NetnsId::default())
                .unwrap();
        }
        assert_eq!(ipam.usage("v6"), Some((1999, (1u128 << 64) - 2)));
    }

    struct FailingStore;
    impl AllocationStore for FailingStore {
        fn load(&self) -> Result<Vec<Allocation>, StoreError> {
            Ok(vec![])
        }
        fn put(&self, _: &Allocation) -> Result<(), StoreError> {
            Err(StoreError::Db("disk full".into()))
        }
        fn delete(&self, _: &[Allocation]) -> Result<(), StoreError> {
            Err(StoreError::Db("disk full".into()))
        }
    }

    #[test]
    fn a_write_that_fails_allocates_nothing() {
        let ipam = Ipam::with_store(vec![small_pool()], Box::new(FailingStore)).unwrap();
        let err = ipam
            .allocate(key(1), &only("p"), NetnsId::default())
            .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(ipam.allocated(), 0);
        assert_eq!(ipam.usage("p").unwrap().0, 0);
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("railnet-ipam-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn an_asked_for_address_is_given_once_or_refused_with_the_reason() {
        let ipam = Ipam::new(vec![small_pool()]).unwrap();
        let at = |s: &str| -> IpAddr { s.parse().unwrap() };
        let ask = |c: usize, a: &str| {
            ipam.allocate_exact_for(key(c), &only("p"), at(a), NetnsId::default(), "")
        };
        assert_eq!(ask(1, "10.0.0.30").unwrap().address, at("10.0.0.30"));
        assert_eq!(
            ask(1, "10.0.0.30").unwrap().address,
            at("10.0.0.30"),
            "repeated ADD"
        );
        let why = |r: Result<Allocation, IpamError>| r.unwrap_err().to_string();
        assert!(why(ask(2, "10.0.0.30")).contains("already held"));
        assert!(why(ask(2, "10.0.0.1")).contains("excluded"), "the gateway");
        assert!(why(ask(2, "10.0.0.7")).contains("excluded"));
        assert!(why(ask(2, "10.0.0.50")).contains("outside the pool's ranges"));
        assert!(why(ask(2, "10.1.0.5")).contains("outside its subnet"));
        assert!(why(ask(1, "10.0.0.31")).contains("already holds 10.0.0.30"));
        // The next free address skips the asked-for one; release frees it.
        let taken: Vec<IpAddr> = (10..40)
            .filter_map(|c| ipam.allocate(key(c), &only("p"), NetnsId::default()).ok())
            .map(|a| a.address)
            .collect();
        assert!(!taken.contains(&at("10.0.0.30")));
        ipam.release("c1", "net1").unwrap();
        assert_eq!(ask(2, "10.0.0.30").unwrap().address, at("10.0.0.30"));
    }

    #[test]
    fn allocations_survive_a_restart_and_are_not_handed_out_again() {
        let dir = scratch("restart");
        let db = dir.join("ipam.redb");
        let pod = NetnsId {
            inode: 42,
            cookie: 7,
        };
        let first: Vec<IpAddr> = {
            let ipam =
                Ipam::with_store(vec![small_pool()], Box::new(RedbStore::open(&db).unwrap()))
                    .unwrap();
            (0..10)
                .map(|c| ipam.allocate(key(c), &only("p"), pod).unwrap().address)
                .collect()
        };
        let ipam =
            Ipam::with_store(vec![small_pool()], Box::new(RedbStore::open(&db).unwrap())).unwrap();
        assert_eq!(ipam.allocated(), 10);
        let strangers = ipam.release_where_allocation(|a| a.netns() != pod).unwrap();
        assert!(strangers.is_empty(), "netns identity lost: {strangers:?}");
        assert_eq!(
            ipam.allocate(key(3), &only("p"), pod).unwrap().address,
            first[3]
        );
        let fresh = ipam.allocate(key(100), &only("p"), pod).unwrap().address;
        assert!(!first.contains(&fresh), "{fresh} was already held");
        ipam.release("c3", "net1").unwrap();
        drop(ipam);
        let ipam =
            Ipam::with_store(vec![small_pool()], Box::new(RedbStore::open(&db).unwrap())).unwrap();
        assert_eq!(ipam.allocated(), 10, "10 + 1 - 1");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn concurrent_allocations_share_commits_and_never_collide() {
        let dir = scratch("group");
        let db = dir.join("ipam.redb");
        let ipam = Arc::new(
            Ipam::with_store(
                vec![spec("big", "10.1.0.0/16", &[], None)],
                Box::new(RedbStore::open(&db).unwrap()),
            )
            .unwrap(),
        );
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| {
                            ipam.allocate(key(t * 1000 + i), &only("big"), NetnsId::default())
                                .unwrap()
                                .address
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<IpAddr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), 400);
        drop(ipam);
        let store = RedbStore::open(&db).unwrap();
        assert_eq!(
            store.load().unwrap().len(),
            400,
            "every acknowledged allocation is on disk"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
