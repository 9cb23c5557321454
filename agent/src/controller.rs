//! The controller role: renders each `RailNetwork` into the Multus
//! NetworkAttachmentDefinition of the same name and keeps it so (a NAD
//! edited by hand is put back), reporting on the RailNetwork's status.
//! Several replicas may run; one leads, through a `Lease`
//! (coordination.k8s.io/v1) taken and renewed with resourceVersion
//! preconditions, and only the leader writes.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    core::{ApiResource, DynamicObject},
};
use serde_json::{Value, json};

use crate::kube_api::resource;

/// `railnetworks.railnet.io/v1alpha1`.
pub fn railnetworks() -> ApiResource {
    resource("railnet.io", "v1alpha1", "RailNetwork", "railnetworks")
}

/// `network-attachment-definitions.k8s.cni.cncf.io/v1` (Multus).
pub fn nads() -> ApiResource {
    resource(
        "k8s.cni.cncf.io",
        "v1",
        "NetworkAttachmentDefinition",
        "network-attachment-definitions",
    )
}

/// Annotation without which Multus passes no `deviceID` to the plugin.
pub const RESOURCE_NAME: &str = "k8s.v1.cni.cncf.io/resourceName";
/// Label marking NADs this controller renders.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// The CNI config (`spec.config` of the NAD) and annotations for one
/// RailNetwork's spec, or why this version cannot serve it.
pub fn render(spec: &Value) -> Result<(Value, BTreeMap<String, String>), String> {
    let ty = spec["type"].as_str().unwrap_or_default();
    let mode = match ty {
        "macvlan" | "ipvlan" | "sriov" | "ib-sriov" | "ipoib" => ty,
        other => return Err(format!("type {other:?} is unknown")),
    };
    if ty == "ipoib" && spec["ib"].get("ibKubernetesEnabled").is_some() {
        return Err(
            "ib.ibKubernetesEnabled is for ib-sriov VFs (ib-kubernetes gives each a GUID): remove it"
                .to_owned(),
        );
    }
    if ty == "ipoib" && spec["ib"].get("linkState").is_some() {
        return Err(
            "ib.linkState is set through a VF's PF (type ib-sriov); an IPoIB child follows its port: remove it"
                .to_owned(),
        );
    }
    let mut conf = json!({
        "cniVersion": spec.get("cniVersion").cloned().unwrap_or_else(|| "0.3.1".into()),
        "name": Value::Null,
        "type": "railnet",
        "rail": spec["rail"],
        "mode": mode,
        "ippools": spec["ippools"],
    });
    let o = conf.as_object_mut().expect("an object");
    for k in [
        "master",
        "mtu",
        "routing",
        "rdmaCIDRs",
        "matchMasterSubnet",
        "rdmaIsolation",
        "detectIPConflict",
        "detectGateway",
    ] {
        if let Some(v) = spec.get(k)
            && !v.is_null()
            && v != &Value::Bool(false)
        {
            o.insert(k.into(), v.clone());
        }
    }
    // VF attributes under sriov-cni's keys (the CRD allows them on sriov
    // networks only).
    for (from, to) in [
        ("vlan", "vlan"),
        ("vlanQoS", "vlanQoS"),
        ("trust", "trust"),
        ("spoofchk", "spoofchk"),
        ("linkState", "link_state"),
    ] {
        if let Some(v) = spec["vf"].get(from) {
            o.insert(to.into(), v.clone());
        }
    }
    // Multus passes the pod's GUID (ib-kubernetes sets it) only when asked.
    if mode == "ib-sriov" {
        o.insert("capabilities".into(), json!({"infinibandGUID": true}));
    }
    // InfiniBand VF settings under ib-sriov-cni's keys.
    for (from, to) in [
        ("linkState", "link_state"),
        ("pkey", "pkey"),
        ("ibKubernetesEnabled", "ibKubernetesEnabled"),
    ] {
        if let Some(v) = spec["ib"].get(from) {
            o.insert(to.into(), v.clone());
        }
    }
    let mut annotations = BTreeMap::new();
    if let Some(r) = spec.get("resourceName").and_then(Value::as_str) {
        annotations.insert(RESOURCE_NAME.to_owned(), r.to_owned());
    }
    Ok((conf, annotations))
}

/// What the NAD for RailNetwork `net` must be (name, namespace, owner,
/// labels, annotations, config).
pub fn desired_nad(net: &DynamicObject) -> Result<DynamicObject, String> {
    let name = net.metadata.name.clone().unwrap_or_default();
    let ns = net.metadata.namespace.clone().unwrap_or_default();
    let (mut conf, annotations) = render(&net.data["spec"])?;
    conf["name"] = name.clone().into();
    let mut nad = DynamicObject::new(&name, &nads()).within(&ns).data(json!({
        "spec": {"config": conf.to_string()}
    }));
    nad.metadata.labels = Some(BTreeMap::from([
        (MANAGED_BY.to_owned(), "railnet".to_owned()),
        (
            "railnet.io/rail".to_owned(),
            net.data["spec"]["rail"].to_string(),
        ),
    ]));
    nad.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    // Deleting the RailNetwork deletes its NAD (same namespace: an owner
    // reference is allowed here, unlike for cluster-scoped claims).
    if let Some(uid) = &net.metadata.uid {
        nad.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "railnet.io/v1alpha1".into(),
                kind: "RailNetwork".into(),
                name: name.clone(),
                uid: uid.clone(),
                controller: Some(true),
                block_owner_deletion: None,
            },
        ]);
    }
    Ok(nad)
}

/// Watches RailNetworks and the NADs rendered from them, and wakes
/// `changed` at every event: a new network gets its NAD, and a hand edit
/// is put back, within a pass rather than an `--interval`. Each watch
/// lists first (for the version to watch from) and starts over when it
/// ends or fails (a second later). `client` must have no read timeout.
pub async fn watch_changes(client: Client, changed: std::sync::Arc<tokio::sync::Notify>) {
    let nets: Api<DynamicObject> = Api::all_with(client.clone(), &railnetworks());
    let rendered: Api<DynamicObject> = Api::all_with(client, &nads());
    tokio::join!(
        watch_one(nets, ListParams::default(), changed.clone()),
        watch_one(
            rendered,
            ListParams::default().labels(&format!("{MANAGED_BY}=railnet")),
            changed,
        ),
    );
}

async fn watch_one(
    api: Api<DynamicObject>,
    lp: ListParams,
    changed: std::sync::Arc<tokio::sync::Notify>,
) {
    use futures::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    loop {
        let started = async {
            let version = api
                .list_metadata(&lp.clone().limit(1))
                .await?
                .metadata
                .resource_version
                .unwrap_or_default();
            let mut wp = WatchParams::default().timeout(290);
            if let Some(l) = &lp.label_selector {
                wp = wp.labels(l);
            }
            api.watch(&wp, &version).await
        }
        .await;
        let stream = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch; again in a second");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Deleted(_)) => {
                    changed.notify_one();
                }
                Ok(WatchEvent::Bookmark(_)) => {}
                Ok(WatchEvent::Error(_)) | Err(_) => break,
            }
        }
    }
}

/// Whether `live` already is what `want` says (the fields we own).
fn in_sync(live: &DynamicObject, want: &DynamicObject) -> bool {
    let annotations = |o: &DynamicObject| {
        let mut a = o.metadata.annotations.clone().unwrap_or_default();
        a.retain(|k, _| k == RESOURCE_NAME);
        a
    };
    live.data["spec"]["config"] == want.data["spec"]["config"]
        && annotations(live) == annotations(want)
        && live
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .is_some()
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// NADs created.
    pub created: usize,
    /// NADs put back after they drifted.
    pub repaired: usize,
    /// RailNetworks that cannot be rendered (status says why).
    pub refused: usize,
    /// RailNetworks whose NAD or status the API server did not take this
    /// pass (each logged; the others were still rendered).
    pub failed: usize,
}

/// Renders every RailNetwork once: creates missing NADs, repairs drifted
/// ones, writes each RailNetwork's status.
pub async fn reconcile(client: &Client) -> Result<Pass, kube::Error> {
    let nets: Api<DynamicObject> = Api::all_with(client.clone(), &railnetworks());
    let mut pass = Pass::default();
    for net in nets.list(&ListParams::default()).await?.items {
        // One network the API server refuses (a NAD another tool holds, a
        // namespace being deleted, a conflict) must not stop the others.
        if let Err(e) = reconcile_one(client, &net, &mut pass).await {
            pass.failed += 1;
            tracing::warn!(
                network = net.metadata.name.as_deref().unwrap_or_default(),
                namespace = net.metadata.namespace.as_deref().unwrap_or_default(),
                error = %e,
                "cannot render this RailNetwork this pass; the others go on"
            );
        }
    }
    Ok(pass)
}

/// Renders one RailNetwork: its NAD, then its status.
async fn reconcile_one(
    client: &Client,
    net: &DynamicObject,
    pass: &mut Pass,
) -> Result<(), kube::Error> {
    let name = net.metadata.name.clone().unwrap_or_default();
    let ns = net.metadata.namespace.clone().unwrap_or_default();
    let status = match desired_nad(net) {
        Ok(want) => {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &nads());
            match api.get_opt(&name).await? {
                None => {
                    api.create(&PostParams::default(), &want).await?;
                    tracing::info!(network = %name, namespace = %ns, "rendered NetworkAttachmentDefinition");
                    pass.created += 1;
                }
                Some(live) if !in_sync(&live, &want) => {
                    let mut fixed = want.clone();
                    fixed.metadata.resource_version = live.metadata.resource_version.clone();
                    // Keep annotations others put there (Multus
                    // tooling), ours win.
                    let mut a = live.metadata.annotations.clone().unwrap_or_default();
                    a.remove(RESOURCE_NAME);
                    a.extend(want.metadata.annotations.clone().unwrap_or_default());
                    fixed.metadata.annotations = (!a.is_empty()).then_some(a);
                    api.replace(&name, &PostParams::default(), &fixed).await?;
                    tracing::warn!(network = %name, namespace = %ns, "NetworkAttachmentDefinition differed from its RailNetwork; put back");
                    pass.repaired += 1;
                }
                Some(_) => {}
            }
            json!({"networkAttachmentDefinition": name, "conditions": [
                {"type": "Ready", "status": "True", "reason": "Rendered",
                 "message": format!("NetworkAttachmentDefinition {ns}/{name} is in sync")}]})
        }
        Err(why) => {
            pass.refused += 1;
            json!({"conditions": [
                {"type": "Ready", "status": "False", "reason": "Unsupported", "message": why}]})
        }
    };
    if net.data.get("status") != Some(&status) {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &railnetworks());
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    Ok(())
}

/// The UIDs of every pod in the cluster (metadata only). An error is an
/// error: the sweep must never run on a partial or failed list.
pub async fn pod_uids(client: &Client) -> Result<std::collections::HashSet<String>, kube::Error> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());
    all_of(&pods, |m| m.uid).await
}

/// The names of every Node (metadata only); an error as for [`pod_uids`].
pub async fn node_names(client: &Client) -> Result<std::collections::HashSet<String>, kube::Error> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    all_of(&nodes, |m| m.name).await
}

/// `pick` of every object `api` lists, page by page (metadata only).
async fn all_of<K>(
    api: &Api<K>,
    pick: impl Fn(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<String>,
) -> Result<std::collections::HashSet<String>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = std::collections::HashSet::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api.list_metadata(&lp).await?;
        out.extend(page.items.into_iter().filter_map(|p| pick(p.metadata)));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => return Ok(out),
        }
    }
}

/// How long each thing (a claim's pod, a block's node) has been missing
/// from the lists, pass after pass: what is seen again starts over.
#[derive(Debug)]
struct Missing<K> {
    grace: Duration,
    since: std::collections::HashMap<K, std::time::Instant>,
    seen: std::collections::HashSet<K>,
}

impl<K: Eq + std::hash::Hash + Clone> Missing<K> {
    fn new(grace: Duration) -> Self {
        Self {
            grace,
            since: Default::default(),
            seen: Default::default(),
        }
    }

    /// Starts a pass.
    fn start(&mut self) {
        self.seen.clear();
    }

    /// Notes `key` missing at `now`; whether it has been for the grace.
    fn for_grace(&mut self, key: K, now: std::time::Instant) -> bool {
        self.seen.insert(key.clone());
        let since = *self.since.entry(key).or_insert(now);
        now.duration_since(since) >= self.grace
    }

    /// Ends a pass: what it did not find missing is forgotten.
    fn end(&mut self) {
        let seen = &self.seen;
        self.since.retain(|k, _| seen.contains(k));
    }
}

/// Gives back the blocks of nodes that are gone: a node deleted (replaced,
/// scaled in) never releases what it held. After its name has been
/// missing from every Node list for `grace`, its blocks' held addresses
/// are released (any node may then take their free addresses) and a
/// block with no claim left is deleted — the claims themselves go with
/// their pods ([`ClaimSweeper`]). Every write has the block's
/// resourceVersion as a precondition.
#[derive(Debug)]
pub struct BlockSweeper {
    missing: Missing<String>,
}

impl BlockSweeper {
    /// A sweeper with `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            missing: Missing::new(grace),
        }
    }

    /// One pass against the nodes that exist now; returns the blocks
    /// given back (held addresses released, or deleted).
    pub async fn pass(
        &mut self,
        client: &Client,
        live: &std::collections::HashSet<String>,
    ) -> Result<usize, kube::Error> {
        use crate::ipam::cluster::{RailBlock, if_unchanged};
        let blocks: Api<RailBlock> = Api::all(client.clone());
        let now = std::time::Instant::now();
        self.missing.start();
        let mut given = 0;
        for block in blocks.list(&ListParams::default()).await?.items {
            let node = &block.spec.node;
            if live.contains(node) {
                continue;
            }
            if !self.missing.for_grace(node.clone(), now)
                || (block.spec.held.is_empty() && !block.spec.claims.is_empty())
            {
                continue;
            }
            let name = block.metadata.name.clone().unwrap_or_default();
            let result = if block.spec.claims.is_empty() {
                blocks
                    .delete(&name, &if_unchanged(&block.metadata))
                    .await
                    .map(|_| ())
            } else {
                let mut next = block.clone();
                next.spec.held.clear();
                next.spec.lend_requested = false;
                blocks
                    .replace(&name, &PostParams::default(), &next)
                    .await
                    .map(|_| ())
            };
            match result {
                Ok(()) => {
                    tracing::info!(block = %name, node = %node, claims = block.spec.claims.len(),
                        "gave back the block of a node that is gone");
                    given += 1;
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        self.missing.end();
        Ok(given)
    }
}

/// Releases claims whose pod is gone: cluster-scoped claims cannot be
/// owned by pods (owner references may not cross scopes), so nothing else
/// frees the address of a pod deleted while its node was down. A claim is
/// released only after its pod UID has been missing from every list for
/// `grace` (a pod created a moment ago may not be listed yet); claims
/// without a pod UID are left to their node.
#[derive(Debug)]
pub struct ClaimSweeper {
    missing: Missing<(String, String)>,
}

impl ClaimSweeper {
    /// A sweeper with `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            missing: Missing::new(grace),
        }
    }

    /// One pass against the pods alive now; returns the claims released.
    pub async fn pass(
        &mut self,
        client: &Client,
        live: &std::collections::HashSet<String>,
    ) -> Result<usize, kube::Error> {
        use crate::ipam::cluster::RailBlock;
        let blocks: Api<RailBlock> = Api::all(client.clone());
        let now = std::time::Instant::now();
        self.missing.start();
        let mut released = 0;
        for block in blocks.list(&ListParams::default()).await?.items {
            let name = block.metadata.name.clone().unwrap_or_default();
            let mut doomed = Vec::new();
            for (address, claim) in &block.spec.claims {
                if claim.pod_uid.is_empty() || live.contains(&claim.pod_uid) {
                    continue;
                }
                let key = (name.clone(), format!("{address}/{}", claim.pod_uid));
                if self.missing.for_grace(key, now) {
                    doomed.push(address.clone());
                }
            }
            if doomed.is_empty() {
                continue;
            }
            let mut next = block.clone();
            for a in &doomed {
                next.spec.claims.remove(a);
            }
            // With the block's resourceVersion: a node that wrote since
            // wins, and we look again next pass.
            match blocks.replace(&name, &PostParams::default(), &next).await {
                Ok(_) => {
                    for a in &doomed {
                        let c = &block.spec.claims[a];
                        tracing::info!(block = %name, address = %a, pod = %format!("{}/{}", c.pod_namespace, c.pod_name),
                            pod_uid = %c.pod_uid, node = %c.node, "released the claim of a pod that is gone");
                    }
                    released += doomed.len();
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        // Forget claims that were released or whose pod came back.
        self.missing.end();
        Ok(released)
    }
}

/// What [`uninstall`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// NADs rendered from RailNetworks, deleted.
    pub nads: usize,
    /// RailBlocks no pod held an address in, deleted.
    pub blocks: usize,
    /// RailBlocks kept, each with why (pods still hold addresses there).
    pub kept: Vec<String>,
}

/// `helm uninstall`'s cleanup (the chart's pre-delete hook): deletes the
/// NADs this controller rendered (owned by a RailNetwork; the RailNetworks
/// and RailPools are the user's and stay) and every RailBlock no pod holds
/// an address in. A block with claims is kept and named with its pods:
/// deleting it would let a reinstalled railnet hand those addresses out
/// a second time while the pods still use them.
/// Marks the agents' DaemonSet `name` in `namespace` as uninstalling
/// ([`crate::uninstall::UNINSTALLING`]); a missing one needs no mark.
pub async fn mark_uninstalling(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use kube::api::{Patch, PatchParams};
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"metadata": {"annotations": {crate::uninstall::UNINSTALLING: "true"}}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Stops the controller Deployment `name` in `namespace` (replicas 0) and
/// waits up to a minute for its pods to go: a running controller would
/// render the NADs again the moment the cleanup deletes them. A missing
/// Deployment is already stopped.
pub async fn stop_controller(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
    use kube::api::{Patch, PatchParams};
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let scaled = deployments
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await;
    let deployment = match scaled {
        Ok(d) => d,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    let selector: Vec<String> = deployment
        .spec
        .selector
        .match_labels
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&selector.join(","));
    for _ in 0..60 {
        if pods.list(&lp).await?.items.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    tracing::warn!(
        deployment = name,
        "controller pods still there after 60 s; cleaning up anyway"
    );
    Ok(())
}

pub async fn uninstall(client: &Client) -> Result<Uninstalled, kube::Error> {
    use kube::api::DeleteParams;

    use crate::ipam::cluster::{RailBlock, if_unchanged};
    let mut done = Uninstalled::default();
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &nads());
    for nad in all.list(&ListParams::default()).await?.items {
        let rendered = nad
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "RailNetwork" && o.api_version.starts_with("railnet.io/"));
        let (Some(name), Some(ns)) = (&nad.metadata.name, &nad.metadata.namespace) else {
            continue;
        };
        if !rendered {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &nads());
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => done.nads += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let blocks: Api<RailBlock> = Api::all(client.clone());
    for b in blocks.list(&ListParams::default()).await?.items {
        let name = b.metadata.name.clone().unwrap_or_default();
        if !b.spec.claims.is_empty() {
            let mut pods: Vec<String> = b
                .spec
                .claims
                .values()
                .map(|c| format!("{}/{}", c.pod_namespace, c.pod_name))
                .collect();
            pods.sort();
            pods.dedup();
            let more = pods.len().saturating_sub(3);
            pods.truncate(3);
            done.kept.push(format!(
                "RailBlock {name} ({} of node {}): {} address(es) still held by pod(s) {}{} — delete those pods, then the block",
                b.spec.cidr,
                b.spec.node,
                b.spec.claims.len(),
                pods.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ));
            continue;
        }
        // Only as we saw it: a claim written meanwhile keeps the block.
        let dp = if_unchanged(&b.metadata);
        match blocks.delete(&name, &dp).await {
            Ok(_) => done.blocks += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s)) if s.code == 409 => done.kept.push(format!(
                "RailBlock {name}: changed while it was being deleted (a pod was just given an address there); run the cleanup again"
            )),
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes each RailPool's status: addresses claimed in its blocks (every
/// node's) and how many it can hand out — the Allocated and Total columns
/// of `kubectl get railpools`. Returns the pools updated.
pub async fn pool_status(client: &Client) -> Result<usize, kube::Error> {
    use crate::ipam::cluster::{RailBlock, pool_spec_of, railpools};
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &railpools());
    let blocks: Api<RailBlock> = Api::all(client.clone());
    let mut claimed: std::collections::HashMap<String, u64> = Default::default();
    for b in blocks.list(&ListParams::default()).await?.items {
        *claimed.entry(b.spec.pool).or_default() += b.spec.claims.len() as u64;
    }
    let mut updated = 0;
    for p in pools.list(&ListParams::default()).await?.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        // A pool the agents refuse has no capacity to show; its agents'
        // logs say why.
        let total = pool_spec_of(&name, &p.data["spec"])
            .ok()
            .and_then(|s| crate::ipam::Pool::new(s).ok())
            .map(|pool| u64::try_from(crate::ipam::capacity(&pool)).unwrap_or(u64::MAX));
        let mut status = json!({"allocatedIPCount": claimed.get(&name).copied().unwrap_or(0)});
        if let Some(t) = total {
            status["totalIPCount"] = t.into();
        }
        let current = &p.data["status"];
        if current["allocatedIPCount"] == status["allocatedIPCount"]
            && current["totalIPCount"] == status["totalIPCount"]
        {
            continue;
        }
        pools
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
        updated += 1;
    }
    Ok(updated)
}

/// The controller's `/metrics` (and the webhook's): each metric is
/// registered once, when the struct is made; a scrape only encodes.
#[derive(Debug)]
pub struct Metrics {
    /// 1 while this replica leads.
    pub leader: prometheus_client::metrics::gauge::Gauge,
    /// NADs created.
    pub nads_created: prometheus_client::metrics::counter::Counter,
    /// NADs put back after a hand edit.
    pub nads_repaired: prometheus_client::metrics::counter::Counter,
    /// RailNetworks that cannot be rendered, at the last pass.
    pub networks_refused: prometheus_client::metrics::gauge::Gauge,
    /// Passes (reconcile or sweep) that failed.
    pub pass_errors: prometheus_client::metrics::counter::Counter,
    /// Claims of gone pods released.
    pub claims_released: prometheus_client::metrics::counter::Counter,
    /// Blocks of gone nodes given back.
    pub blocks_given_back: prometheus_client::metrics::counter::Counter,
    /// Webhook answers by result (`unchanged`, `patched`, `denied`,
    /// `bad_request`).
    pub webhook: prometheus_client::metrics::family::Family<
        Vec<(String, String)>,
        prometheus_client::metrics::counter::Counter,
    >,
    registry: prometheus_client::registry::Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            leader: Default::default(),
            nads_created: Default::default(),
            nads_repaired: Default::default(),
            networks_refused: Default::default(),
            pass_errors: Default::default(),
            claims_released: Default::default(),
            blocks_given_back: Default::default(),
            webhook: Default::default(),
            registry: prometheus_client::registry::Registry::with_prefix("railnet_controller"),
        };
        let r = &mut m.registry;
        r.register(
            "leader",
            "1 while this replica leads (holds the Lease)",
            m.leader.clone(),
        );
        r.register(
            "nads_created",
            "NetworkAttachmentDefinitions rendered from RailNetworks",
            m.nads_created.clone(),
        );
        r.register(
            "nads_repaired",
            "NetworkAttachmentDefinitions put back after they were edited",
            m.nads_repaired.clone(),
        );
        r.register(
            "networks_refused",
            "RailNetworks that cannot be rendered (their status says why)",
            m.networks_refused.clone(),
        );
        r.register(
            "pass_errors",
            "Passes that failed (retried next interval)",
            m.pass_errors.clone(),
        );
        r.register(
            "claims_released",
            "Address claims of pods that are gone, released",
            m.claims_released.clone(),
        );
        r.register(
            "blocks_given_back",
            "Address blocks of nodes that are gone, given back",
            m.blocks_given_back.clone(),
        );
        r.register(
            "webhook_requests",
            "RDMA resource-injection webhook answers, by result",
            m.webhook.clone(),
        );
        m
    }
}

impl Metrics {
    /// Counts one pass's outcome.
    pub fn record(&self, pass: &Pass) {
        self.nads_created.inc_by(pass.created as u64);
        self.nads_repaired.inc_by(pass.repaired as u64);
        self.networks_refused.set(pass.refused as i64);
    }

    /// Counts one webhook answer.
    pub fn webhook_answer(&self, result: &str) {
        self.webhook
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// The exposition (OpenMetrics text).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves the controller's `GET /metrics` and `/healthz` (see
/// [`crate::metrics::serve_exposition`]) until dropped.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    crate::metrics::serve_exposition(listener, move || {
        let metrics = metrics.clone();
        async move { metrics.render() }
    })
    .await;
}

/// A Lease-based leader election.
#[derive(Debug)]
pub struct Leader {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's lease as last seen changing: its
    /// resourceVersion, and when (this process's monotonic clock).
    observed: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// Whether a lease another replica holds has expired, judged as
/// client-go's leader election does: by how long this process has seen it
/// unchanged (`rv` its resourceVersion), never by comparing its renewTime
/// with the local clock — replicas whose clocks disagree by more than the
/// lease would both lead.
fn lease_expired(
    observed: &mut Option<(String, std::time::Instant)>,
    rv: &str,
    now: std::time::Instant,
    held_for: Duration,
) -> bool {
    match observed {
        Some((seen, since)) if seen == rv => now.duration_since(*since) > held_for,
        _ => {
            *observed = Some((rv.to_owned(), now));
            false
        }
    }
}

impl Leader {
    /// Election on Lease `name` in `namespace` as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: std::sync::Mutex::new(None),
        }
    }

    /// Takes or renews the lease if it is free, expired or ours; true if we
    /// lead now. A lost race (409) is simply "not leader".
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let secs = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let ours = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            renew_time: Some(now.clone()),
            ..LeaseSpec::default()
        };
        let Some(live) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    acquire_time: Some(now),
                    ..ours
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = live.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let held_for = spec
            .lease_duration_seconds
            .map_or(u64::from(secs.unsigned_abs()), |s| {
                u64::from(s.unsigned_abs())
            });
        let expired = holder.is_empty()
            || lease_expired(
                &mut self.observed.lock().unwrap_or_else(|p| p.into_inner()),
                live.metadata
                    .resource_version
                    .as_deref()
                    .unwrap_or_default(),
                std::time::Instant::now(),
                Duration::from_secs(held_for),
            );
        if holder != self.identity && !expired {
            return Ok(false);
        }
        let next_spec = if holder == self.identity {
            LeaseSpec {
                acquire_time: spec.acquire_time.clone(),
                lease_transitions: spec.lease_transitions,
                ..ours
            }
        } else {
            LeaseSpec {
                acquire_time: Some(now),
                lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + 1),
                ..ours
            }
        };
        let mut next = live;
        next.spec = Some(next_spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconf::NetConf;

    /// One RailNetwork whose NAD the API server refuses does not stop the
    /// pass: the other's NAD is made and its status written (kube-rs over
    /// a mock service: the test API server cannot be made to refuse one
    /// create).
    #[tokio::test]
    async fn a_network_the_api_server_refuses_does_not_stop_the_others() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |req: hyper::Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                log.lock().unwrap().push(format!("{method} {path}"));
                let net = |name: &str| {
                    json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
                           "metadata": {"name": name, "namespace": "ai"},
                           "spec": {"rail": 1, "type": "macvlan", "master": "eth1",
                                    "ippools": {"ipv4": ["rail1"]}}})
                };
                let (code, body) = match (method.as_str(), path.as_str()) {
                    ("GET", "/apis/railnet.io/v1alpha1/railnetworks") => (
                        200,
                        json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetworkList",
                               "metadata": {}, "items": [net("a"), net("b")]}),
                    ),
                    ("POST", p) if p.ends_with("/network-attachment-definitions") => {
                        let body = http_body_util::BodyExt::collect(req.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        let obj: Value = serde_json::from_slice(&body).unwrap();
                        if obj["metadata"]["name"] == "a" {
                            (
                                500,
                                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "message": "etcdserver: request timed out", "code": 500}),
                            )
                        } else {
                            (201, obj)
                        }
                    }
                    ("PATCH", _) => (200, net("b")),
                    _ => (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "NotFound", "code": 404}),
                    ),
                };
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .status(code)
                        .header("Content-Type", "application/json")
                        .body(kube::client::Body::from(body.to_string().into_bytes()))
                        .unwrap(),
                )
            }
        });
        let pass = reconcile(&Client::new(service, "default")).await.unwrap();
        assert_eq!((pass.created, pass.failed), (1, 1), "{pass:?}");
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter()
                .any(|r| r == "PATCH /apis/railnet.io/v1alpha1/namespaces/ai/railnetworks/b/status"),
            "b's status not written: {seen:?}"
        );
    }

    /// kube-rs over a mock service (no pods API exists in the test API
    /// server): every page of the pod list is read, and a failed list is
    /// an error, never an empty set.
    #[tokio::test]
    async fn pod_uids_reads_every_page_and_fails_loudly() {
        let service = tower::service_fn(|req: hyper::Request<kube::client::Body>| async move {
            let q = req.uri().query().unwrap_or_default().to_owned();
            let body = if req.uri().path() != "/api/v1/pods" {
                return Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .status(404)
                        .body(kube::client::Body::empty())
                        .unwrap(),
                );
            } else if q.contains("continue=page2") {
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                       "items": [{"metadata": {"name": "c", "uid": "uid-c"}}]})
            } else {
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"continue": "page2"},
                       "items": [{"metadata": {"name": "a", "uid": "uid-a"}},
                                 {"metadata": {"name": "b", "uid": "uid-b"}}]})
            };
            Ok(hyper::Response::builder()
                .header("Content-Type", "application/json")
                .body(kube::client::Body::from(body.to_string().into_bytes()))
                .unwrap())
        });
        let client = Client::new(service, "default");
        let uids = pod_uids(&client).await.unwrap();
        assert_eq!(uids.len(), 3);
        assert!(uids.contains("uid-c"));
        let failing = tower::service_fn(|_req: hyper::Request<kube::client::Body>| async move {
            Ok::<_, std::convert::Infallible>(
                hyper::Response::builder()
                    .status(503)
                    .body(kube::client::Body::from(b"{}".to_vec()))
                    .unwrap(),
            )
        });
        assert!(pod_uids(&Client::new(failing, "default")).await.is_err());
    }

    /// A lease another replica holds expires only after this process has
    /// seen it unchanged for its duration: its renewTime, stamped by
    /// another clock, is never compared with ours.
    #[test]
    fn a_lease_expires_by_what_this_process_saw_not_by_its_timestamps() {
        let t0 = std::time::Instant::now();
        let held = Duration::from_secs(15);
        let mut seen = None;
        // First sight, however old its renewTime says it is: not expired.
        assert!(!lease_expired(&mut seen, "100", t0, held));
        assert!(!lease_expired(
            &mut seen,
            "100",
            t0 + Duration::from_secs(15),
            held
        ));
        assert!(lease_expired(
            &mut seen,
            "100",
            t0 + Duration::from_secs(16),
            held
        ));
        // Renewed (a new resourceVersion): the clock starts again.
        assert!(!lease_expired(
            &mut seen,
            "101",
            t0 + Duration::from_secs(20),
            held
        ));
        assert!(!lease_expired(
            &mut seen,
            "101",
            t0 + Duration::from_secs(30),
            held
        ));
        assert!(lease_expired(
            &mut seen,
            "101",
            t0 + Duration::from_secs(36),
            held
        ));
    }

    #[test]
    fn a_rendered_network_is_one_railnet_accepts() {
        let spec = json!({"rail": 3, "type": "macvlan", "master": "eno5np1",
            "ippools": {"ipv4": ["rail3"]}, "mtu": 4200, "rdmaCIDRs": ["172.16.0.0/16"],
            "matchMasterSubnet": false, "group": "gpu"});
        let (mut conf, annotations) = render(&spec).unwrap();
        conf["name"] = "rail3".into();
        let parsed = NetConf::parse(conf.to_string().as_bytes()).expect("railnet accepts it");
        assert_eq!(parsed.name, "rail3");
        assert!(annotations.is_empty());
        assert!(
            conf.get("matchMasterSubnet").is_none(),
            "false is the default"
        );
        assert!(
            conf.get("group").is_none(),
            "group is the webhook's, not the CNI's"
        );
    }

    #[test]
    fn sriov_carries_the_resource_and_ipoib_its_partition() {
        let spec = json!({"rail": 1, "type": "sriov", "resourceName": "nvidia.com/rail1",
            "ippools": {"ipv4": ["rail1"]}, "rdmaIsolation": true});
        let (_, a) = render(&spec).unwrap();
        assert_eq!(a[RESOURCE_NAME], "nvidia.com/rail1");
        let ib = json!({"rail": 1, "type": "ipoib", "master": "ib0", "ippools": {"ipv4": ["p"]},
            "ib": {"pkey": "0x8001"}});
        let (mut conf, a) = render(&ib).unwrap();
        assert!(a.is_empty());
        conf["name"] = "ib1".into();
        let parsed = crate::netconf::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert!(parsed.ipoib());
        assert_eq!(parsed.pkey, Some("0x8001".into()));
        let mut bad = ib.clone();
        bad["ib"]["linkState"] = "enable".into();
        assert!(render(&bad).unwrap_err().contains("ib.linkState"));
    }

    /// An ib-sriov RailNetwork (the seeds' InfiniBand rails) renders into a
    /// NAD railnet's parser takes: the VF's resource, isolation, and the
    /// `ib` settings under ib-sriov-cni's keys.
    #[test]
    fn ib_sriov_networks_render_for_the_cni() {
        let spec = json!({"rail": 1, "type": "ib-sriov", "resourceName": "spidernet.io/eno3np2",
            "ippools": {"ipv4": ["gpu1-net91"]}, "rdmaIsolation": true,
            "ib": {"pkey": "0x8001", "linkState": "enable", "ibKubernetesEnabled": true}});
        let (mut conf, a) = render(&spec).unwrap();
        assert_eq!(a[RESOURCE_NAME], "spidernet.io/eno3np2");
        assert_eq!(conf["capabilities"]["infinibandGUID"], true);
        conf["name"] = "gpu1".into();
        conf["deviceID"] = "0000:3b:00.2".into();
        conf["runtimeConfig"] = json!({"infinibandGUID": "00:11:22:33:44:55:66:77"});
        let parsed = crate::netconf::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert!(parsed.ib_sriov() && parsed.rdma_isolation && parsed.ib_kubernetes_enabled);
        let set = parsed.vf_settings().unwrap();
        assert_eq!(set.link_state, Some(crate::netconf::VfLinkMode::Enable));
        assert_eq!(set.node_guid, Some(0x0011_2233_4455_6677));
        assert_eq!(set.port_guid, Some(0x0011_2233_4455_6677));
    }

    /// A RailNetwork's `vf` settings reach the NAD under sriov-cni's keys,
    /// and railnet's own parser reads them back as set.
    #[test]
    fn vf_settings_are_rendered_for_the_cni() {
        let spec = json!({"rail": 2, "type": "sriov", "resourceName": "nvidia.com/rail2",
            "ippools": {"ipv4": ["rail2"]},
            "vf": {"vlan": 100, "vlanQoS": 2, "trust": "on", "spoofchk": "off", "linkState": "enable"}});
        let (mut conf, _) = render(&spec).unwrap();
        conf["name"] = "rail2".into();
        conf["deviceID"] = "0000:3b:00.2".into();
        let parsed = crate::netconf::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert_eq!(
            parsed.vf_settings().unwrap(),
            crate::netconf::VfSettings {
                vlan: Some(100),
                qos: 2,
                spoofchk: Some(false),
                trust: Some(true),
                link_state: Some(crate::netconf::VfLinkMode::Enable),
                mac: None,
                ..Default::default()
            }
        );
    }
}
