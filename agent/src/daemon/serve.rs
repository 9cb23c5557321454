//! Serving: the CNI socket and `/metrics` bound, the background tasks
//! started (program log, sweep, node label, uninstall watch), requests
//! served until SIGTERM, and what is done on the way out.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::task::AbortHandle;
use tracing::{error, info};

use super::{Args, exit, upkeep};
use crate::{dataplane, kube_api, metrics, rail::RailService, server};

/// Serves until told to stop; returns the exit code.
pub(super) async fn serve(args: Args, service: Arc<RailService>) -> u8 {
    let listener = match server::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            error!(socket = %args.socket.display(), error = %e, "cannot bind");
            return exit::BIND;
        }
    };
    let metrics_listener = match metrics::bind(args.metrics_address).await {
        Ok(l) => l,
        Err(e) => {
            error!(address = %args.metrics_address, error = %e, "cannot bind the metrics endpoint");
            return exit::BIND;
        }
    };
    info!(socket = %args.socket.display(), pin_root = %args.pin_root.display(), metrics = %args.metrics_address, "serving");
    let metrics = Arc::new(metrics::Metrics::default());
    let mut tasks = vec![
        tokio::spawn(metrics::serve(
            metrics_listener,
            metrics.clone(),
            service.clone(),
            std::time::Duration::from_millis(args.metrics_max_age_ms),
        ))
        .abort_handle(),
        tokio::spawn(upkeep::sweep_loop(
            service.clone(),
            metrics.clone(),
            std::time::Duration::from_secs(args.sweep_interval),
            args.tombstones.clone(),
        ))
        .abort_handle(),
    ];
    if let Some(cidr) = args.host_rules {
        tasks.push(
            tokio::spawn(upkeep::keep_host_rules(
                service.clone(),
                metrics.clone(),
                cidr,
                std::time::Duration::from_secs(args.sweep_interval),
            ))
            .abort_handle(),
        );
    }
    // The rail programs' rare events, with the pod and rail they concern.
    match dataplane::log::open(&args.pin_root) {
        Ok(logger) => tasks.push(tokio::spawn(dataplane::log::forward(logger)).abort_handle()),
        Err(e) => tracing::warn!(error = %e, "the rail programs' log is not forwarded"),
    }
    if args.label_node {
        tasks.push(label_node(&args, &service));
    }
    let uninstalling = Arc::new(AtomicBool::new(false));
    if args.dra {
        match start_dra(&args, &service, uninstalling.clone()).await {
            Ok(mut started) => tasks.append(&mut started),
            Err(e) => {
                error!(error = %e, "cannot be the node's DRA driver");
                return exit::FAILURE;
            }
        }
    }
    if let Some(task) = watch_uninstall(&args, uninstalling.clone()).await {
        tasks.push(task);
    }
    let last = service.clone();
    server::serve(
        listener,
        args.socket.clone(),
        service,
        metrics,
        shutdown_signal(),
    )
    .await;
    for task in tasks {
        task.abort();
    }
    on_the_way_out(&args, last, uninstalling.load(Ordering::Relaxed)).await;
    0
}

/// Labels the node with its RDMA netns mode (what the webhook and the
/// scheduler read), retrying until the API server takes it.
fn label_node(args: &Args, service: &RailService) -> AbortHandle {
    let mode = crate::rdma::RdmaNetlink::open()
        .and_then(|mut r| r.netns_mode())
        .map(|m| m.to_string())
        .unwrap_or_else(|_| "none".into());
    tokio::spawn(crate::node_label::keep_trying(
        args.kubeconfig.clone(),
        service.node_name.clone(),
        mode,
    ))
    .abort_handle()
}

/// `--dra`: the ResourceSlices kept, the kubelet plugin served, the DRA
/// network's requests answered.
async fn start_dra(
    args: &Args,
    service: &Arc<RailService>,
    uninstalling: Arc<AtomicBool>,
) -> Result<Vec<AbortHandle>, String> {
    let client = kube_api::client(
        args.kubeconfig.as_deref(),
        std::time::Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("the DRA driver needs the API server: {e}"))?;
    let dra = Arc::new(crate::dra::Dra {
        node: service.node_name.clone(),
        client,
        store: crate::dra::prepared::Store::new(
            args.state
                .parent()
                .unwrap_or(std::path::Path::new("/var/lib/railnet"))
                .join("dra"),
        ),
        inventory: Default::default(),
        shared_namespace: args.dra_shared_namespace.clone(),
        sysfs_root: args.sysfs_root.clone(),
        cdi_dir: args.dra_cdi_dir.clone(),
        // Switching the mode needs a reboot or a node without pods: read
        // once.
        rdma_exclusive: crate::rdma::RdmaNetlink::open()
            .and_then(|mut r| r.netns_mode())
            .is_ok_and(|m| m == crate::rdma::NetnsMode::Exclusive),
        runtime: tokio::runtime::Handle::current(),
    });
    service
        .dra
        .set(dra.clone())
        .map_err(|_| "started twice".to_owned())?;
    let sockets = crate::dra::plugin::Sockets {
        plugin: args.dra_plugin_dir.join("dra.sock"),
        registration: args
            .dra_registry_dir
            .join(format!("{}-reg.sock", crate::dra::DRIVER)),
    };
    let (loaded, first_inventory) = tokio::sync::oneshot::channel();
    let changed = Arc::new(tokio::sync::Notify::new());
    // Its own client: the watch idles longer than any read timeout.
    let watching = kube_api::watch_client(
        args.kubeconfig.as_deref(),
        std::time::Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("the DRA driver's watch client: {e}"))?;
    let watcher = tokio::spawn(crate::dra::publish::watch_networks(
        watching,
        changed.clone(),
        uninstalling.clone(),
    ));
    let publisher = tokio::spawn(crate::dra::publish::keep_published(
        dra.clone(),
        std::time::Duration::from_secs(args.dra_refresh),
        uninstalling,
        loaded,
        changed,
    ));
    let plugin = tokio::spawn(async move {
        // Registered only once the devices are known: a prepare the
        // kubelet sends a restarted agent before that would be refused as
        // "not published here" (it retries, but says so in the pod's
        // events).
        if first_inventory.await.is_err() {
            return;
        }
        if let Err(e) = crate::dra::plugin::serve(dra, sockets, std::future::pending()).await {
            error!(error = %e, "the DRA plugin stopped serving");
        }
    });
    Ok(vec![
        watcher.abort_handle(),
        publisher.abort_handle(),
        plugin.abort_handle(),
    ])
}

/// With `--remove-cni-on-uninstall`: watches the DaemonSet for the mark
/// `helm uninstall`'s hook sets.
async fn watch_uninstall(args: &Args, flag: Arc<AtomicBool>) -> Option<AbortHandle> {
    let (Some(_), Some(ds)) = (&args.remove_cni_on_uninstall, &args.daemonset) else {
        return None;
    };
    match kube_api::client(
        args.kubeconfig.as_deref(),
        std::time::Duration::from_secs(5),
    )
    .await
    {
        Ok(client) => {
            Some(tokio::spawn(crate::uninstall::watch(client, ds.clone(), flag)).abort_handle())
        }
        Err(e) => {
            tracing::warn!(error = %e, "no API client: an uninstall will leave the CNI binaries");
            None
        }
    }
}

/// Flushes the claims (Kubernetes mode) and, when this exit is the node's
/// share of an uninstall, takes railnet's files off the node.
async fn on_the_way_out(args: &Args, last: Arc<RailService>, uninstalling: bool) {
    // Kubernetes mode: claims made since the last flush are in the
    // journal already; writing them now saves the next agent the
    // catching up (and shows them to the controller at once).
    // On a plain thread: the store runs its own runtime.
    let held = last.ipam.allocated();
    let flushed = std::thread::spawn(move || last.ipam.flush()).join();
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "claims not written before exit; the next agent writes them from its journal");
    }
    let (Some(dir), Some(ds)) = (&args.remove_cni_on_uninstall, &args.daemonset) else {
        return;
    };
    // Seen by the watch; else one last look (an uninstall without the
    // cleanup Job: the DaemonSet is gone).
    let gone = if uninstalling {
        Ok(true)
    } else {
        match kube_api::client(
            args.kubeconfig.as_deref(),
            std::time::Duration::from_secs(5),
        )
        .await
        {
            Ok(client) => crate::uninstall::daemonset_gone(&client, ds).await,
            Err(e) => Err(e.to_string()),
        }
    };
    match gone {
        Ok(true) => {
            // The node's ResourceSlices are the cleanup Job's to delete:
            // by the time the agent stops, Helm has taken its rights.
            crate::uninstall::remove_cni_binaries(dir, held);
            if args.host_rules.is_some() {
                // rtnetlink on a blocking thread: `with_rtnl` runs its own loop.
                let removed = tokio::task::spawn_blocking(|| {
                    crate::rtnl::with_rtnl(|h| async move { crate::host_rules::remove(&h).await })
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                match removed {
                    Ok(Ok(removed)) => info!(?removed, "host rules removed"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %crate::rtnl::describe(&e), "host rules stay")
                    }
                    Err(e) => tracing::warn!(error = %e, "host rules stay"),
                }
            }
            if held == 0
                && let Err(e) = dataplane::log::unpin(&args.pin_root)
            {
                tracing::warn!(error = %e, "the rail programs' log buffer stays pinned");
            }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell an uninstall from a restart; the CNI binaries stay")
        }
    }
}

/// SIGTERM (kubelet, the demo) or SIGINT (a person) ends the agent cleanly.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
