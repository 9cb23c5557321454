//! The objects Kubernetes-mode IPAM keeps in the API server: RailBlocks
//! (a pool's aligned blocks, who holds and who claims each address) and
//! RailPools read as pool specs; their names, labels and the conversions
//! between a block's claims and the node's journal records.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Preconditions};
use serde::{Deserialize, Serialize};

use crate::ipam::{Allocation, AllocationKey, Family, PodRef, PoolSpec, pool};

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
pub fn pool_spec_of(name: &str, spec: &serde_json::Value) -> Result<PoolSpec, String> {
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

/// `<pool>.<network with - for . and :>-<prefix>`: one name per range, so
/// create-if-absent is what makes a range one node's.
pub fn block_name(pool: &str, cidr: &IpNet) -> String {
    let net = cidr.network().to_string().replace(['.', ':'], "-");
    format!("{pool}.{net}-{}", cidr.prefix_len())
}

/// The claim for journal record `a`, made by `node`.
pub(super) fn claim_of(node: &str, a: &Allocation) -> Claim {
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

pub(super) fn allocation_of(pool: &str, address: IpAddr, c: &Claim) -> Allocation {
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
        pod: PodRef {
            namespace: c.pod_namespace.clone(),
            name: c.pod_name.clone(),
            uid: c.pod_uid.clone(),
        },
    }
}
