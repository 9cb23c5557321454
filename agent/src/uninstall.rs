//! The node's share of `helm uninstall`: when the agent stops during an
//! uninstall, and no pod on the node holds a rail address any more, it
//! removes the CNI binaries its init container installed. Where pods still
//! hold addresses the binaries stay: those pods' DELs still run them (they
//! leave a tombstone for an agent that comes back). A rolling restart is no
//! uninstall, so nothing is removed.
//!
//! An uninstall is seen while the agent still may look: the chart's
//! pre-delete cleanup marks the DaemonSet ([`UNINSTALLING`]) before Helm
//! deletes anything, and the agent watches its own DaemonSet (by then Helm
//! may have deleted the agent's RBAC, so a look at exit alone is not enough).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, Client};

/// The annotation the uninstall cleanup puts on the agent's DaemonSet.
pub const UNINSTALLING: &str = "railnet.io/uninstalling";

/// Whether `ds` says an uninstall is under way (marked, or being deleted).
fn uninstalling(ds: &DaemonSet) -> bool {
    ds.metadata.deletion_timestamp.is_some()
        || ds
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(UNINSTALLING))
            .is_some_and(|v| v == "true")
}

fn split(daemonset: &str) -> Result<(&str, &str), String> {
    daemonset
        .split_once('/')
        .ok_or_else(|| format!("--daemonset {daemonset:?}: write <namespace>/<name>"))
}

/// Keeps `flag` true once the DaemonSet `namespace/name` is marked, being
/// deleted, or gone — a watch of that one object (by name: its Role allows
/// nothing else), renewed when it ends. Runs until dropped.
pub async fn watch(client: Client, daemonset: String, flag: Arc<AtomicBool>) {
    use futures::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let Ok((ns, name)) = split(&daemonset) else {
        return;
    };
    let api: Api<DaemonSet> = Api::namespaced(client, ns);
    loop {
        let version = match api.get_opt(name).await {
            Ok(None) => {
                flag.store(true, Ordering::Relaxed);
                return;
            }
            Ok(Some(ds)) => {
                if uninstalling(&ds) {
                    flag.store(true, Ordering::Relaxed);
                }
                ds.metadata.resource_version.unwrap_or_default()
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the agent's DaemonSet; again shortly");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(290);
        let Ok(stream) = api.watch(&wp, &version).await else {
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Added(ds) | WatchEvent::Modified(ds)) if uninstalling(&ds) => {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok(WatchEvent::Deleted(_)) => flag.store(true, Ordering::Relaxed),
                Ok(WatchEvent::Error(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// The files the init container installs (`railnet install`): the CNI
/// binaries and the node's settings beside them.
pub const CNI_BINARIES: [&str; 3] = ["railnet", "railnet-ipam", crate::api::NODE_SETTINGS_FILE];

/// Whether the DaemonSet `namespace/name` is gone or being deleted.
pub async fn daemonset_gone(client: &Client, daemonset: &str) -> Result<bool, String> {
    let (ns, name) = split(daemonset)?;
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(None) => Ok(true),
        Ok(Some(ds)) => Ok(uninstalling(&ds)),
        Err(e) => Err(format!("reading DaemonSet {daemonset}: {e}")),
    }
}

/// Removes the CNI binaries from `dir` when `held` (rail addresses pods on
/// this node still hold) is zero; returns what was removed.
pub fn remove_cni_binaries(dir: &Path, held: usize) -> Vec<PathBuf> {
    if held > 0 {
        tracing::info!(
            held,
            dir = %dir.display(),
            "uninstall: pods on this node still hold rail addresses; the CNI binaries stay for their DEL"
        );
        return Vec::new();
    }
    let mut removed = Vec::new();
    for name in CNI_BINARIES {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "uninstall: cannot remove"),
        }
    }
    tracing::info!(removed = ?removed, "uninstall: removed the CNI binaries from this node");
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_go_only_when_no_pod_holds_an_address() {
        let dir = std::env::temp_dir().join(format!("railnet-uninstall-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in CNI_BINARIES.iter().chain(&["macvlan"]) {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        assert!(remove_cni_binaries(&dir, 3).is_empty());
        assert!(dir.join("railnet").exists());
        assert_eq!(remove_cni_binaries(&dir, 0).len(), 3);
        assert!(!dir.join("railnet").exists() && !dir.join("railnet-ipam").exists());
        assert!(!dir.join(crate::api::NODE_SETTINGS_FILE).exists());
        assert!(dir.join("macvlan").exists(), "other plugins are not ours");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
