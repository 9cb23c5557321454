//! The RailPools' status: addresses claimed and how many each can hand out.

use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
    core::DynamicObject,
};
use serde_json::json;

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
