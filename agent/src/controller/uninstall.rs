//! `helm uninstall`'s cluster-wide cleanup (the chart's pre-delete hook):
//! the agents are told, the controller stopped, the rendered NADs and the
//! unheld RailBlocks deleted.

use kube::{Api, Client, api::ListParams, core::DynamicObject};
use serde_json::json;

use super::nads;

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

/// `helm uninstall`'s cleanup (the chart's pre-delete hook): deletes the
/// NADs this controller rendered (owned by a RailNetwork; the RailNetworks
/// and RailPools are the user's and stay) and every RailBlock no pod holds
/// an address in. A block with claims is kept and named with its pods:
/// deleting it would let a reinstalled railnet hand those addresses out
/// a second time while the pods still use them.
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

/// Deletes the ResourceSlices of DRA driver `driver` (the agents'): they
/// are owned by their Nodes, so nothing else removes them, and by the time
/// the agents stop their rights to are gone. The agents stop publishing
/// when they see the uninstall mark, which comes first.
pub async fn delete_slices(client: &Client, driver: &str) -> Result<usize, kube::Error> {
    use k8s_openapi::api::resource::v1::ResourceSlice;
    use kube::api::DeleteParams;

    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let mut deleted = 0;
    for s in slices
        .list(&ListParams::default().fields(&format!("spec.driver={driver}")))
        .await?
        .items
    {
        let Some(name) = s.metadata.name else {
            continue;
        };
        match slices.delete(&name, &DeleteParams::default()).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
