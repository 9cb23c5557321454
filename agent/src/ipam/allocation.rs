//! What an allocation is: its key (container, interface, family), the
//! address and pool it holds, the pod it was made for.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::netns::NetnsId;

/// Address family of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// What identifies an allocation: a container's interface and a family.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AllocationKey {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// Family.
    pub family: Family,
}

impl Allocation {
    /// The pod netns it was made for.
    pub fn netns(&self) -> NetnsId {
        NetnsId {
            inode: self.netns_inode,
            cookie: self.netns_cookie,
        }
    }
}

/// A durable allocation record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Whose.
    pub key: AllocationKey,
    /// Pool name.
    pub pool: String,
    /// The address.
    pub address: IpAddr,
    /// Inode of the pod's netns at ADD (0 if unknown): the sweep releases
    /// allocations whose netns is gone.
    pub netns_inode: u64,
    /// Cookie of that netns (0 if unknown): inodes are reused, cookies not.
    #[serde(default)]
    pub netns_cookie: u64,
    /// The network (NetworkAttachmentDefinition) it was made for; CNI GC
    /// works per network.
    #[serde(default)]
    pub network: String,
    /// The pod, when the runtime said (Kubernetes mode writes it into the
    /// claim, also after a restart).
    #[serde(default, skip_serializing_if = "PodRef::is_empty")]
    pub pod: PodRef,
}

/// A pod as CNI_ARGS names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// K8S_POD_NAMESPACE.
    pub namespace: String,
    /// K8S_POD_NAME.
    pub name: String,
    /// K8S_POD_UID.
    pub uid: String,
}

impl PodRef {
    /// Nothing known.
    pub fn is_empty(&self) -> bool {
        self.namespace.is_empty() && self.name.is_empty() && self.uid.is_empty()
    }
}
