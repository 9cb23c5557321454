//! railnet as a DRA driver (`resource.k8s.io/v1`, driver `railnet.io`):
//! the scheduler allocates rails, aligned with a pod's GPUs where a claim
//! asks; railnet gives them addresses, routes and its program as it does
//! for rails a pod names through NADs.
//!
//! The path of one pod:
//! 1. [`publish`] keeps this node's rail devices ([`devices`], read from
//!    the RailNetworks and [`nic`] sysfs facts) in ResourceSlices;
//! 2. the scheduler allocates some to the pod's ResourceClaims;
//! 3. the kubelet calls [`plugin`]'s `NodePrepareResources`: the agent reads
//!    each claim's allocation, checks the devices are this node's and the
//!    claim's namespace may use them, and records them ([`prepared`]);
//! 4. the pod's sandbox is made; Multus calls railnet for the one DRA
//!    network the pod names (`"dra": true`), and [`claimed`] wires every
//!    rail the pod's prepared claims hold, in one ADD, then writes each
//!    device's interface, addresses and MAC into the claim's status;
//! 5. DEL undoes the rails; `NodeUnprepareResources` forgets the claim.
//!
//! Meanwhile [`health`] streams each device's health to the kubelet (its
//! NIC's carrier), which shows it in the status of the pods holding it.
//!
//! Why the wiring waits for the CNI ADD: at prepare time the pod's netns
//! does not exist yet, and the CNI ADD is where the pod's netns, its
//! sandbox's container ID (what DEL, GC and the sweep key on) and Multus's
//! network status come together. A pod names the DRA network once, not
//! once per rail: how many rails it gets is the claim's business.

pub mod authority;
pub mod cdi;
pub mod claimed;
pub mod devices;
pub mod health;
pub mod nic;
pub mod peers;
pub mod plugin;
pub mod prepared;
pub mod publish;
pub mod topology;

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

/// The driver name in ResourceSlices, DeviceClasses and claims.
pub const DRIVER: &str = "railnet.io";

/// The kubelet's gRPC services, generated from `agent/proto/`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    /// The DRA plugin service, v1.
    pub mod dra {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
    }
    /// Device health, v1.
    pub mod health {
        tonic::include_proto!("v1");
    }
    /// Plugin registration.
    pub mod registration {
        tonic::include_proto!("pluginregistration");
    }
}

/// What the driver's parts share.
pub struct Dra {
    /// This node.
    pub node: String,
    /// The API server.
    pub client: kube::Client,
    /// Prepared claims and wired sandboxes.
    pub store: prepared::Store,
    /// The devices last published.
    pub inventory: RwLock<Arc<devices::Inventory>>,
    /// The namespace whose RailNetworks any namespace's claims may use
    /// (the release's, where the administrator's are; the same rule as
    /// Multus's `namespaceIsolation` with railnet's namespace global).
    pub shared_namespace: String,
    /// sysfs (`--sysfs-root`).
    pub sysfs_root: PathBuf,
    /// Where the runtime reads CDI specs (`--dra-cdi-dir`).
    pub cdi_dir: PathBuf,
    /// Whether the node's RDMA netns mode is exclusive (read at start).
    pub rdma_exclusive: bool,
    /// The agent's runtime, for API calls from request threads.
    pub runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Dra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dra")
            .field("node", &self.node)
            .field("shared_namespace", &self.shared_namespace)
            .finish_non_exhaustive()
    }
}

impl Dra {
    /// The devices last published.
    pub fn inventory(&self) -> Arc<devices::Inventory> {
        self.inventory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a claim in `claim_ns` may use a device of a RailNetwork in
    /// `device_ns`.
    pub fn may_use(&self, claim_ns: &str, device_ns: &str) -> bool {
        claim_ns == device_ns || device_ns == self.shared_namespace
    }
}
