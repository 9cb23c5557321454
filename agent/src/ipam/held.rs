//! The allocator's memory: the pools, every held address by key, and the
//! per-pool indexes of free addresses, under the one lock of [`super::Ipam`].

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{Allocation, AllocationKey, PodRef, Pool, pool::PoolIndex};
use crate::netns::NetnsId;

#[derive(Default)]
pub(super) struct State {
    /// The pools, swapped whole when they change (Kubernetes mode reads
    /// RailPools); readers keep the snapshot they took.
    pub(super) pools: Arc<BTreeMap<String, Pool>>,
    /// The key is stored once; pool and network names are shared, so a
    /// node with tens of thousands of allocations stays small.
    pub(super) held: HashMap<AllocationKey, Held>,
    pub(super) index: HashMap<String, PoolIndex>,
    /// Pool and network names, each once; [`Held`] names them by index.
    pub(super) names: Vec<Arc<str>>,
    pub(super) ids: HashMap<Arc<str>, u32>,
}

/// One held address: 48 bytes, so 65 000 of them (a big node's worth in
/// `bench ipam`) stay a few MB.
pub(super) struct Held {
    pub(super) address: IpAddr,
    pub(super) netns: NetnsId,
    /// Index into [`State::names`].
    pub(super) pool: u32,
    /// Index into [`State::names`].
    pub(super) network: u32,
}

impl State {
    pub(super) fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let n: Arc<str> = Arc::from(name);
        let id = u32::try_from(self.names.len()).expect("fewer than 2^32 pool and network names");
        self.names.push(n.clone());
        self.ids.insert(n, id);
        id
    }

    /// The pool or network name `id` stands for.
    pub(super) fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }

    /// Holds a fresh allocation and returns its record.
    pub(super) fn hold_new(
        &mut self,
        key: AllocationKey,
        pool: String,
        address: IpAddr,
        netns: NetnsId,
        network: &str,
    ) -> Allocation {
        let a = Allocation {
            key,
            pool,
            address,
            netns_inode: netns.inode,
            netns_cookie: netns.cookie,
            network: network.to_owned(),
            pod: PodRef::default(),
        };
        self.hold(&a);
        a
    }

    /// Holds a loaded allocation, marking its address taken in its pool.
    pub(super) fn adopt(&mut self, a: &Allocation) {
        if self.own_pool_covers(&a.pool, a.address) {
            let pools = self.pools.clone();
            if let (Some(pool), Some(index)) = (pools.get(&a.pool), self.index.get_mut(&a.pool)) {
                index.mark(pool, a.address);
            }
        } else {
            // The pool was removed, renamed or changed under a live
            // allocation: keep the address, in whichever pools now cover
            // it, until it is released (never hand it out twice).
            let covering = self.mark_orphan(a.address);
            tracing::warn!(
                pool = %a.pool, address = %a.address, container = %a.key.container_id,
                held_by = ?covering,
                "allocation refers to a pool that no longer holds it; kept (in the pools that now cover it) until released"
            );
        }
        self.hold(a);
    }

    /// Whether pool `name`, as the pools are now, covers `address`.
    pub(super) fn own_pool_covers(&self, name: &str, address: IpAddr) -> bool {
        self.pools.get(name).is_some_and(|p| p.covers(address))
    }

    /// Marks `address`, held under a pool that no longer covers it, taken
    /// in every pool that does. Returns their names.
    pub(super) fn mark_orphan(&mut self, address: IpAddr) -> Vec<String> {
        let pools = self.pools.clone();
        let mut names = Vec::new();
        for (name, pool) in pools.iter().filter(|(_, p)| p.covers(address)) {
            if let Some(index) = self.index.get_mut(name) {
                index.mark(pool, address);
                names.push(name.clone());
            }
        }
        names
    }

    /// Gives back an address held under pool `name`: to that pool if it
    /// covers it, else to every pool that does ([`Self::mark_orphan`]).
    pub(super) fn free(&mut self, name: &str, address: IpAddr) {
        let pools = self.pools.clone();
        let targets: Vec<(&String, &Pool)> = match pools.get_key_value(name) {
            Some(own) if own.1.covers(address) => vec![own],
            _ => pools.iter().filter(|(_, p)| p.covers(address)).collect(),
        };
        for (n, pool) in targets {
            if let Some(index) = self.index.get_mut(n) {
                index.free(pool, address);
            }
        }
    }

    pub(super) fn hold(&mut self, a: &Allocation) {
        let held = Held {
            pool: self.intern(&a.pool),
            address: a.address,
            netns: a.netns(),
            network: self.intern(&a.network),
        };
        self.held.insert(a.key.clone(), held);
    }

    pub(super) fn record(&self, key: &AllocationKey, h: &Held) -> Allocation {
        Allocation {
            key: key.clone(),
            pool: self.name(h.pool).to_owned(),
            address: h.address,
            netns_inode: h.netns.inode,
            netns_cookie: h.netns.cookie,
            network: self.name(h.network).to_owned(),
            pod: PodRef::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's held addresses stay small: 48 bytes an entry besides its
    /// key (the names live once in the state).
    #[test]
    fn a_held_address_costs_48_bytes() {
        assert!(
            std::mem::size_of::<Held>() <= 48,
            "{}",
            std::mem::size_of::<Held>()
        );
    }
}
