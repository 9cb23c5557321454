//! Giving addresses back: by interface, by container, by any rule (CNI GC,
//! the sweep) — durable before it returns.

use super::{Allocation, AllocationKey, Ipam, IpamError, keys_of};

impl Ipam {
    /// Releases whatever (container, ifname) holds, both families. Durable
    /// when it returns; returns what was released.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Allocation>, IpamError> {
        self.release_keys(&keys_of(container_id, ifname))
    }

    /// Releases everything a container holds.
    pub fn release_container(&self, container_id: &str) -> Result<Vec<Allocation>, IpamError> {
        self.release_where(|k| k.container_id == container_id)
    }

    /// Releases every allocation whose key `doomed` picks (CNI GC).
    pub fn release_where(
        &self,
        doomed: impl Fn(&AllocationKey) -> bool,
    ) -> Result<Vec<Allocation>, IpamError> {
        self.release_where_allocation(|a| doomed(&a.key))
    }

    /// Releases every allocation `doomed` picks (the sweep).
    pub fn release_where_allocation(
        &self,
        doomed: impl Fn(&Allocation) -> bool,
    ) -> Result<Vec<Allocation>, IpamError> {
        let keys: Vec<AllocationKey> = {
            let state = self.lock();
            state
                .held
                .iter()
                .filter(|(k, h)| doomed(&state.record(k, h)))
                .map(|(k, _)| k.clone())
                .collect()
        };
        self.release_keys(&keys)
    }

    fn release_keys(&self, keys: &[AllocationKey]) -> Result<Vec<Allocation>, IpamError> {
        let released: Vec<Allocation> = {
            let mut state = self.lock();
            let mut out = Vec::new();
            for k in keys {
                if let Some(h) = state.held.remove(k) {
                    let pool = state.name(h.pool).to_owned();
                    state.free(&pool, h.address);
                    out.push(state.record(k, &h));
                }
            }
            out
        };
        if released.is_empty() {
            return Ok(released);
        }
        let written = self.backend.release(self.store.as_ref(), &released);
        if let Err(e) = written {
            // The record still says "held": hold it in memory too, so the
            // address is not handed out while the disk disagrees.
            let mut state = self.lock();
            let pools = state.pools.clone();
            for a in &released {
                if let (Some(pool), Some(index)) =
                    (pools.get(&a.pool), state.index.get_mut(&a.pool))
                {
                    index.mark(pool, a.address);
                }
                state.hold(a);
            }
            return Err(e);
        }
        Ok(released)
    }
}
