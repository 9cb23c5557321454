//! What the agent keeps doing beside serving requests: taking over an
//! earlier agent's pins at start, sweeping what DEL never came for, and
//! (Kubernetes mode) reading the RailPools into the allocator.

use std::{path::PathBuf, sync::Arc};

use tracing::info;

use crate::{
    dataplane,
    ipam::{PoolSpec, cluster::ClusterStore},
    rail::RailService,
};

/// Kubernetes mode: reads the RailPools every `every` and swaps them (with
/// the file's pools) into the allocator; says once what it left out and
/// why, and what changed.
pub(super) fn refresh_pools(
    service: &RailService,
    file: &[PoolSpec],
    cluster: &ClusterStore,
    every: std::time::Duration,
) {
    let mut said = std::collections::BTreeSet::new();
    loop {
        std::thread::sleep(every);
        let (pools, skipped) = match cluster.rail_pools() {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read RailPools; keeping the pools as they are");
                continue;
            }
        };
        let mut all = file.to_vec();
        all.extend(pools);
        let mut now = std::collections::BTreeSet::new();
        match service.ipam.replace_pools(all) {
            Ok(changes) if !changes.is_empty() => info!(
                added = ?changes.added, changed = ?changes.changed, removed = ?changes.removed,
                "pools updated from RailPools"
            ),
            Ok(_) => {}
            Err(errors) => {
                for e in errors {
                    now.insert(format!("RailPools not applied: {e}"));
                }
            }
        }
        now.extend(skipped);
        for line in now.difference(&said) {
            tracing::warn!("{line}");
        }
        said = now;
    }
}

/// Takes over the pods an earlier agent left pinned: their programs kept
/// steering while no agent ran; from now on DEL and the sweep handle them.
pub(super) fn adopt(pin_root: &std::path::Path) {
    let pods = dataplane::pinned_pods(pin_root);
    let links: usize = pods.iter().map(|p| p.links.len()).sum();
    for pod in &pods {
        if pod.layout_version != Some(railnet_common::LAYOUT_VERSION) {
            tracing::warn!(
                container = %pod.container_id,
                found = ?pod.layout_version,
                expected = railnet_common::LAYOUT_VERSION,
                "pinned maps have another layout; they keep working and are replaced when the pod is re-added"
            );
        }
    }
    info!(
        pods = pods.len(),
        attachments = links,
        "adopted pinned pods"
    );
}

/// Periodically removes what DEL never came for: pins and addresses of
/// pods whose netns is gone.
pub(super) async fn sweep_loop(
    service: Arc<RailService>,
    metrics: Arc<crate::metrics::Metrics>,
    every: std::time::Duration,
    tombstones: PathBuf,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let service = service.clone();
        let tombstones = tombstones.clone();
        let metrics = metrics.clone();
        let removed = tokio::task::spawn_blocking(move || {
            service.finish_tombstones(&tombstones);
            // No ADD between the look and the releases (see sweep_gate).
            let _gate = service
                .sweep_gate
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let live = crate::netns::LiveNetns::scan();
            let mut removed = dataplane::sweep(&service.pin_root, &live);
            for cid in &removed {
                match service.ipam.release_container(cid) {
                    Ok(released) => metrics.swept(released.len()),
                    Err(e) => {
                        tracing::warn!(container = %cid, error = %e, "sweep: addresses of a gone pod not released; next sweep tries again")
                    }
                }
            }
            // Rules-mode pods have no pins: their allocations carry the
            // netns inode too.
            if let Ok(gone) = service
                .ipam
                .release_where_allocation(|a| a.netns_inode != 0 && !live.contains(a.netns()))
            {
                metrics.swept(gone.len());
                for a in gone {
                    if !removed.contains(&a.key.container_id) {
                        removed.push(a.key.container_id);
                    }
                }
            }
            if let Some(info) = &service.pod_info
                && !removed.is_empty()
                && let Err(e) = info.forget_matching(None, |r| removed.contains(&r.container_id))
            {
                tracing::warn!(error = %e, "sweep: gone pods left in the rail info");
            }
            removed
        })
        .await
        .unwrap_or_default();
        if !removed.is_empty() {
            info!(containers = ?removed, "swept pods whose netns is gone");
        }
    }
}

/// With `--host-rules`: brings the host's rules and routes to the plan for
/// its NICs' addresses and the pools every `every`, saying what changed
/// and what it left out (each once).
pub(super) async fn keep_host_rules(
    service: Arc<RailService>,
    metrics: Arc<crate::metrics::Metrics>,
    cidr: ipnet::Ipv4Net,
    every: std::time::Duration,
) {
    use crate::host_rules;
    let mut tick = tokio::time::interval(every);
    let mut said = std::collections::BTreeSet::new();
    loop {
        tick.tick().await;
        let pools: Vec<(ipnet::Ipv4Net, Option<std::net::Ipv4Addr>)> = service
            .ipam
            .pools()
            .values()
            .filter_map(|p| match (p.subnet, p.gateway) {
                (ipnet::IpNet::V4(s), Some(std::net::IpAddr::V4(g))) => Some((s, Some(g))),
                (ipnet::IpNet::V4(s), _) => Some((s, None)),
                _ => None,
            })
            .collect();
        // rtnetlink on a blocking thread: `with_rtnl` runs its own loop.
        let done = tokio::task::spawn_blocking(move || {
            crate::rtnl::with_rtnl(|h| async move {
                let nics = host_rules::nics(&h).await?;
                let plan = host_rules::plan(&nics, cidr, &pools);
                let changes = host_rules::reconcile(&h, &plan).await?;
                Ok::<_, rtnetlink::Error>((plan, changes))
            })
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match done {
            Ok(Ok((plan, changes))) => {
                metrics.host_rules(plan.rules.len(), plan.routes.len());
                if !changes.added.is_empty() || !changes.removed.is_empty() {
                    info!(added = ?changes.added, removed = ?changes.removed, "host rules updated");
                }
                let now: std::collections::BTreeSet<String> = plan.skipped.into_iter().collect();
                for line in now.difference(&said) {
                    tracing::warn!("host rules: {line}");
                }
                said = now;
            }
            Ok(Err(e)) => tracing::warn!(error = %crate::rtnl::describe(&e), "host rules not kept"),
            Err(e) => tracing::warn!(error = %e, "host rules not kept"),
        }
    }
}
