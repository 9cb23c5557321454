//! Where an allocation is chosen and made durable: one [`Backend`] per
//! IPAM mode, chosen once when the allocator is built.
//!
//! - [`Local`]: the node's own store (redb), every pool this node's alone;
//!   the choice is made under the allocator's lock, then written.
//! - [`Kubernetes`]: blocks of addresses in the API server shared by every
//!   node ([`super::cluster::ClusterStore`]), with the node's own store as
//!   a journal written before an ADD is answered.
//!
//! [`super::Ipam`] keeps what both share — the pools, what this node
//! holds, the journal — and asks its backend only what differs.

use std::{net::IpAddr, sync::Arc};

use super::{Allocation, AllocationKey, AllocationStore, Candidates, Ipam, IpamError, cluster};

/// An IPAM mode.
pub(super) trait Backend: Send + Sync {
    /// Allocates for `key` (exactly `wanted`, if given) for `owner`:
    /// held by `ipam` and durable when it returns.
    fn allocate(
        &self,
        ipam: &Ipam,
        key: AllocationKey,
        candidates: &Candidates,
        wanted: Option<IpAddr>,
        owner: &cluster::Owner,
    ) -> Result<Allocation, IpamError>;

    /// Makes the release of `released` (no longer held by the allocator)
    /// durable; on error the caller holds them again.
    fn release(
        &self,
        journal: &dyn AllocationStore,
        released: &[Allocation],
    ) -> Result<(), IpamError>;

    /// Writes now what this node changed and has not written yet.
    fn flush(&self) -> Result<(), IpamError> {
        Ok(())
    }

    /// (API writes accepted, writes refused as conflicts) since start, for
    /// a backend that writes to the API server.
    fn api_writes(&self) -> Option<(u64, u64)> {
        None
    }
}

/// The node's own store.
pub(super) struct Local;

impl Backend for Local {
    fn allocate(
        &self,
        ipam: &Ipam,
        key: AllocationKey,
        candidates: &Candidates,
        wanted: Option<IpAddr>,
        owner: &cluster::Owner,
    ) -> Result<Allocation, IpamError> {
        ipam.allocate_local(key, candidates, wanted, owner.netns, &owner.network)
    }

    fn release(
        &self,
        journal: &dyn AllocationStore,
        released: &[Allocation],
    ) -> Result<(), IpamError> {
        journal
            .delete(released)
            .map_err(|e| IpamError::Store(e.to_string()))
    }
}

/// The API server's blocks, shared by every node.
pub(super) struct Kubernetes(pub(super) Arc<cluster::ClusterStore>);

impl Backend for Kubernetes {
    fn allocate(
        &self,
        ipam: &Ipam,
        key: AllocationKey,
        candidates: &Candidates,
        wanted: Option<IpAddr>,
        owner: &cluster::Owner,
    ) -> Result<Allocation, IpamError> {
        ipam.allocate_in_cluster(&self.0, key, candidates, wanted, owner)
    }

    fn release(
        &self,
        journal: &dyn AllocationStore,
        released: &[Allocation],
    ) -> Result<(), IpamError> {
        self.0
            .release(released)
            .map_err(|e| IpamError::Unavailable(e.to_string()))?;
        // The claims are released: a journal that still lists them is
        // corrected at the next start (their claims are gone), so this
        // only warns.
        if let Err(e) = journal.delete(released) {
            tracing::warn!(error = %e, "released allocations remain in the journal until the next start");
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), IpamError> {
        self.0
            .sync()
            .map_err(|e| IpamError::Unavailable(e.to_string()))
    }

    fn api_writes(&self) -> Option<(u64, u64)> {
        Some(self.0.write_counts())
    }
}
