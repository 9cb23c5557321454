//! Keeps this node's ResourceSlices equal to its rail devices: read the
//! RailNetworks and the NICs every interval, and when the devices differ
//! from what was last published, apply the slices (server-side apply,
//! field manager `railnet.io`) and delete this node's slices of pools that
//! have no device left.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{core::v1::Node, resource::v1::ResourceSlice};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
};
use tracing::{info, warn};

use super::{DRIVER, Dra, devices};

/// Publishes when `changed` is woken (a RailNetwork changed:
/// [`watch_networks`]) and every `every` (NICs come and go without a
/// word), until aborted or `uninstalling` is set (the uninstall's mark
/// seen: Helm is about to take the agent's rights, and a request after
/// that would only be refused). `loaded` is told when the devices are
/// first known.
pub async fn keep_published(
    dra: Arc<Dra>,
    every: Duration,
    uninstalling: Arc<std::sync::atomic::AtomicBool>,
    loaded: tokio::sync::oneshot::Sender<()>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut loaded = Some(loaded);
    let mut last: Option<Vec<devices::RailDevice>> = None;
    let mut left_out_said = Vec::new();
    loop {
        if uninstalling.load(std::sync::atomic::Ordering::Relaxed) {
            info!("uninstalling: rail devices no longer published");
            return;
        }
        match publish_once(&dra, last.as_deref()).await {
            Ok(inv) => {
                if inv.left_out != left_out_said {
                    for why in &inv.left_out {
                        warn!(network = %why, "RailNetwork not published as a DRA device");
                    }
                    left_out_said = inv.left_out.clone();
                }
                last = Some(inv.devices.clone());
                *dra.inventory.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(inv);
                if let Some(tell) = loaded.take() {
                    let _ = tell.send(());
                }
            }
            Err(e) => warn!(error = %e, "rail devices not published; again in {every:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = changed.notified() => {}
        }
    }
}

/// Wakes `changed` whenever a RailNetwork is made, changed or deleted, so
/// its device is published (or withdrawn) at once rather than at the next
/// refresh, until `uninstalling` is set (as the publisher: no request
/// once Helm takes the rights). `client` must have no read timeout (a
/// watch idles for minutes); the watch resumes after errors with back-off.
pub async fn watch_networks(
    client: kube::Client,
    changed: Arc<tokio::sync::Notify>,
    uninstalling: Arc<std::sync::atomic::AtomicBool>,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let api: Api<DynamicObject> = Api::all_with(client, &crate::controller::railnetworks());
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut look = tokio::time::interval(Duration::from_secs(1));
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = look.tick() => {
                if uninstalling.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                continue;
            }
        };
        let Some(event) = event else { return };
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                changed.notify_one()
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "watching RailNetworks; the periodic refresh still publishes")
            }
        }
    }
}

/// One pass; the inventory it published (or found already published).
async fn publish_once(
    dra: &Dra,
    last: Option<&[devices::RailDevice]>,
) -> Result<devices::Inventory, kube::Error> {
    let networks: Api<DynamicObject> =
        Api::all_with(dra.client.clone(), &crate::controller::railnetworks());
    let list = networks.list(&ListParams::default()).await?;
    let host = devices::Host {
        node: &dra.node,
        sysfs: &dra.sysfs_root,
        rdma_exclusive: dra.rdma_exclusive,
        admin_namespace: &dra.shared_namespace,
    };
    let inv = devices::inventory(host, &list.items);
    if last == Some(inv.devices.as_slice()) {
        return Ok(inv);
    }
    let node_uid = Api::<Node>::all(dra.client.clone())
        .get(&dra.node)
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    // Milliseconds since the epoch: larger with every publication, also
    // across restarts, as the pool generation must be.
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(1);
    let slices: Api<ResourceSlice> = Api::all(dra.client.clone());
    let wanted = devices::slices(&dra.node, &node_uid, &inv, generation);
    let params = PatchParams::apply(DRIVER).force();
    for slice in &wanted {
        let name = slice.metadata.name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(slice).expect("a slice serializes");
        body["apiVersion"] = "resource.k8s.io/v1".into();
        body["kind"] = "ResourceSlice".into();
        slices.patch(&name, &params, &Patch::Apply(&body)).await?;
    }
    let ours = slices
        .list(&ListParams::default().labels(&format!("{DRIVER}/node={}", dra.node)))
        .await?;
    for stale in ours
        .items
        .iter()
        .filter(|s| !wanted.iter().any(|w| w.metadata.name == s.metadata.name))
    {
        let name = stale.metadata.name.clone().unwrap_or_default();
        slices.delete(&name, &DeleteParams::default()).await?;
        info!(slice = %name, "stale ResourceSlice deleted");
    }
    info!(
        devices = ?inv.devices.iter().map(|d| format!("{}/{}={}", d.pool, d.name, d.master)).collect::<Vec<_>>(),
        "rail devices published"
    );
    Ok(inv)
}
