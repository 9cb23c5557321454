//! `railnet-controller`: renders RailNetworks into Multus
//! NetworkAttachmentDefinitions and keeps them in sync. Run two or more
//! replicas: one leads (a Lease), the others wait to take over.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use railnet_agent::controller::{
    BlockSweeper, ClaimSweeper, Leader, node_names, pod_uids, reconcile,
};
use tracing::{info, warn};

/// railnet's controller.
///
/// Every RailNetwork becomes the NetworkAttachmentDefinition of the same
/// name in its namespace (with the resourceName annotation for SR-IOV
/// networks); a NAD edited by hand is put back at the next pass; each
/// RailNetwork's status says whether its NAD is in sync or why it cannot be
/// rendered.
#[derive(Debug, Parser)]
#[command(name = "railnet-controller", version)]
struct Args {
    /// Kubeconfig; unset: the in-cluster service account (or KUBECONFIG).
    #[arg(long, env = "RAILNET_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "railnet-controller")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader holds the Lease without renewing it.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..))]
    lease_seconds: u64,
    /// Seconds between passes (and renewals).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
    /// Seconds a claim's pod must be missing from the cluster before its
    /// address is released, and a block's node before the block is given
    /// back (Kubernetes IPAM mode); 0 turns both sweeps off.
    #[arg(long, default_value_t = 300)]
    claim_grace_seconds: u64,
    /// Keep each RailPool's status (allocated/total addresses) current
    /// from the RailBlocks (Kubernetes IPAM mode).
    #[arg(long)]
    pool_status: bool,
    /// Address for `/metrics` and `/healthz` (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:9466")]
    metrics_address: std::net::SocketAddr,
    /// Serve the RDMA resource-injection webhook (`POST /mutate-pods`,
    /// HTTPS) here; every replica serves it, leader or not. Its
    /// certificate: --tls-cert/--tls-key, or one the controller owns
    /// (--webhook-secret, --webhook-service, --webhook-config).
    #[arg(long)]
    webhook_address: Option<std::net::SocketAddr>,
    /// The webhook's certificate (PEM), signed by the caBundle of the
    /// MutatingWebhookConfiguration.
    #[arg(long, requires = "tls_key", conflicts_with = "webhook_secret")]
    tls_cert: Option<PathBuf>,
    /// The webhook's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The Secret (in the controller's namespace) holding the webhook's CA
    /// and certificate: made by the controller when missing, served, and
    /// re-read when it changes; its CA is written into --webhook-config's
    /// caBundle.
    #[arg(long, requires_all = ["webhook_service", "webhook_config"])]
    webhook_secret: Option<String>,
    /// The webhook's Service (the certificate names it).
    #[arg(long)]
    webhook_service: Option<String>,
    /// The MutatingWebhookConfiguration whose caBundle the controller keeps.
    #[arg(long)]
    webhook_config: Option<String>,
    /// The agents' pod-info directory on the nodes (their
    /// `--pod-info-dir`): the webhook mounts each injected pod's own
    /// directory of it at /etc/railnet (rails.json, nccl.env). Unset: no
    /// mount.
    #[arg(long, value_parser = host_dir, conflicts_with = "rail_info_image")]
    rail_info_dir: Option<String>,
    /// railnet's image: the webhook gives each injected pod an init
    /// container of it (`railnetctl pod-info`) that writes the rail info into
    /// an in-memory volume mounted at /etc/railnet — no hostPath, so Pod
    /// Security `baseline` and `restricted` namespaces admit the pod.
    #[arg(long)]
    rail_info_image: Option<String>,
    /// The namespace whose RailNetworks pods of every namespace may be
    /// given (an administrator's: the chart's release namespace); beyond
    /// it, a pod's group is resolved only in its own namespace.
    #[arg(long, env = "RAILNET_SHARED_NETWORKS_NAMESPACE")]
    shared_networks_namespace: Option<String>,
    /// railnet's DRA network (`namespace/name`, the chart's
    /// `railnet-dra`): a pod the webhook would inject that names it keeps
    /// its networks (its rails come from its ResourceClaims) and gets only
    /// its rail info.
    #[arg(long, value_parser = namespaced_name)]
    dra_network: Option<String>,
    /// Clean up for `helm uninstall` and exit (the chart's pre-delete
    /// hook): delete the NADs rendered from RailNetworks and the RailBlocks
    /// no pod holds an address in; name the blocks kept and why.
    #[arg(long)]
    uninstall: bool,
    /// With --uninstall: delete this DRA driver's ResourceSlices (the
    /// agents' own, which they cannot delete as they stop: Helm has taken
    /// their rights by then).
    #[arg(long, requires = "uninstall")]
    delete_slices_of: Option<String>,
    /// With --uninstall: the controller Deployment (in --lease-namespace)
    /// to stop first, so it does not render the deleted NADs again.
    #[arg(long, requires = "uninstall")]
    stop_deployment: Option<String>,
    /// With --uninstall: the agents' DaemonSet (in --lease-namespace) to
    /// mark as uninstalling, so each agent removes the node's CNI binaries
    /// as it stops where no pod needs them.
    #[arg(long, requires = "uninstall")]
    mark_daemonset: Option<String>,
}

/// The certificate the controller owns: made or read now (retried until
/// the API server answers), kept in step with its Secret afterwards.
async fn owned_certificate(
    client: &kube::Client,
    spec: railnet_agent::webhook_cert::CertSpec,
) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use railnet_agent::webhook_cert::{Reloading, certified_key, ensure, keep};
    let pems = loop {
        match ensure(client, &spec).await {
            Ok(p) => break p,
            Err(e) => {
                warn!(error = %e, "webhook certificate not ready; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let served = Reloading::new(certified_key(&pems)?);
    let config = served.server_config()?;
    tokio::spawn(keep(client.clone(), spec, served, pems));
    Ok(config)
}

/// A directory on the nodes for a hostPath volume: absolute, without `..`
/// (a relative path would make every injected pod fail to start).
fn host_dir(s: &str) -> Result<String, String> {
    let p = std::path::Path::new(s);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!(
            "{s:?} is not an absolute path without '..'; give the agents' --pod-info-dir, e.g. /run/railnet/pods"
        ));
    }
    match s.trim_end_matches('/') {
        "" => Err("\"/\" would mount the node's root; give the agents' --pod-info-dir, e.g. /run/railnet/pods".into()),
        dir => Ok(dir.to_owned()),
    }
}

/// A `namespace/name` (`--dra-network`).
fn namespaced_name(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_owned())
        }
        _ => Err(format!(
            "{s:?} is not namespace/name; give the DRA network's NAD, e.g. railnet/railnet-dra"
        )),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("railnet-controller: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, why)) => {
            eprintln!("railnet-controller: {why}");
            ExitCode::from(code)
        }
    }
}

/// Why the controller stops: its exit code (2: configuration or API
/// access, 4: an address cannot be bound, 1: the rest) and what to say.
type Stop = (u8, String);

/// The uninstall hook, or the controller (and webhook) until Ctrl-C.
async fn run(args: Args) -> Result<(), Stop> {
    let client =
        railnet_agent::kube_api::client(args.kubeconfig.as_deref(), Duration::from_secs(5))
            .await
            .map_err(|e| (2, e.to_string()))?;
    if args.uninstall {
        return uninstall_cleanup(&client, &args).await;
    }
    let metrics = std::sync::Arc::new(railnet_agent::controller::Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .map_err(|e| (4, format!("metrics address {}: {e}", args.metrics_address)))?;
    tokio::spawn(railnet_agent::controller::serve_metrics(
        listener,
        metrics.clone(),
    ));
    if let Some(addr) = args.webhook_address {
        start_webhook(&client, &args, addr, metrics.clone()).await?;
    }
    // A pass every --interval, and as soon as a RailNetwork or a NAD
    // rendered from one changes.
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    match railnet_agent::kube_api::watch_client(args.kubeconfig.as_deref(), Duration::from_secs(5))
        .await
    {
        Ok(c) => {
            tokio::spawn(railnet_agent::controller::watch_changes(c, changed.clone()));
        }
        Err(e) => warn!(error = %e, "no watch client; passes every --interval only"),
    }
    let mut passes = Passes::new(client, &args, metrics);
    let mut tick = tokio::time::interval(Duration::from_secs(args.interval));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = changed.notified() => {
                // Events come in bursts (a pass's own writes among
                // them): one pass after the burst.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        passes.once().await;
    }
}

/// `helm uninstall`'s pre-delete hook: stop the controller, tell the
/// agents, then delete what railnet rendered and what no pod holds.
async fn uninstall_cleanup(client: &kube::Client, args: &Args) -> Result<(), Stop> {
    let failed =
        |what: String| move |e: kube::Error| (1, format!("uninstall cleanup: {what}: {e}"));
    if let Some(d) = &args.stop_deployment {
        railnet_agent::controller::stop_controller(client, &args.lease_namespace, d)
            .await
            .map_err(failed(format!("stopping Deployment {d}")))?;
    }
    if let Some(ds) = &args.mark_daemonset {
        railnet_agent::controller::mark_uninstalling(client, &args.lease_namespace, ds)
            .await
            .map_err(failed(format!("marking DaemonSet {ds}")))?;
    }
    if let Some(driver) = &args.delete_slices_of {
        let n = railnet_agent::controller::delete_slices(client, driver)
            .await
            .map_err(failed(format!(
                "deleting DRA driver {driver}'s ResourceSlices"
            )))?;
        println!("railnet uninstall: deleted {n} ResourceSlice(s) of DRA driver {driver}");
    }
    let done = railnet_agent::controller::uninstall(client)
        .await
        .map_err(|e| (1, format!("uninstall cleanup: {e}")))?;
    println!(
        "railnet uninstall: deleted {} NetworkAttachmentDefinition(s) rendered from RailNetworks and {} empty RailBlock(s); RailNetworks and RailPools are kept (yours)",
        done.nads, done.blocks
    );
    for k in &done.kept {
        println!("  kept {k}");
    }
    // Kept blocks do not fail the uninstall: they protect running pods'
    // addresses.
    Ok(())
}

/// Serves the RDMA resource-injection webhook at `addr` (TLS from files,
/// or a certificate this controller keeps in a Secret).
async fn start_webhook(
    client: &kube::Client,
    args: &Args,
    addr: std::net::SocketAddr,
    metrics: std::sync::Arc<railnet_agent::controller::Metrics>,
) -> Result<(), Stop> {
    let tls = match (&args.tls_cert, &args.tls_key, &args.webhook_secret) {
        (Some(cert), Some(key), _) => railnet_agent::webhook::tls(cert, key),
        (_, _, Some(secret)) => {
            let spec = railnet_agent::webhook_cert::CertSpec {
                namespace: args.lease_namespace.clone(),
                secret: secret.clone(),
                service: args.webhook_service.clone().unwrap_or_default(),
                webhook_config: args.webhook_config.clone().unwrap_or_default(),
            };
            owned_certificate(client, spec).await
        }
        _ => Err("--webhook-address needs --tls-cert and --tls-key, or --webhook-secret".into()),
    }
    .map_err(|e| (2, format!("webhook TLS: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| (4, format!("webhook address {addr}: {e}")))?;
    info!(%addr, "serving the RDMA resource-injection webhook");
    // The webhook's watches wait minutes between events: a client
    // without a read timeout (one would end every idle watch, and the
    // back-off after each would leave the cache stale).
    let watching =
        railnet_agent::kube_api::watch_client(args.kubeconfig.as_deref(), Duration::from_secs(5))
            .await
            .map_err(|e| (2, format!("the webhook's watch client: {e}")))?;
    let rail_info = match (&args.rail_info_dir, &args.rail_info_image) {
        (Some(dir), _) => Some(railnet_agent::webhook::RailInfoSource::NodeDir(dir.clone())),
        (None, Some(image)) => Some(railnet_agent::webhook::RailInfoSource::InitContainer(
            image.clone(),
        )),
        (None, None) => None,
    };
    tokio::spawn(railnet_agent::webhook::serve(
        listener,
        tls,
        watching,
        metrics,
        rail_info,
        args.shared_networks_namespace.clone(),
        args.dra_network.clone(),
    ));
    Ok(())
}

/// The controller's passes: leadership first; the leader renders the NADs,
/// writes the RailPools' status and sweeps what gone pods and nodes left.
struct Passes {
    client: kube::Client,
    leader: Leader,
    identity: String,
    leading: bool,
    metrics: std::sync::Arc<railnet_agent::controller::Metrics>,
    pool_status: bool,
    /// The namespace whose VF networks are DRA devices (the DRA
    /// network's): another namespace's are said not to be.
    vf_namespace: Option<String>,
    /// `None`: sweeps off (`--claim-grace-seconds 0`).
    sweepers: Option<(ClaimSweeper, BlockSweeper)>,
    pods_unlisted: bool,
    nodes_unlisted: bool,
}

impl Passes {
    fn new(
        client: kube::Client,
        args: &Args,
        metrics: std::sync::Arc<railnet_agent::controller::Metrics>,
    ) -> Self {
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let grace = Duration::from_secs(args.claim_grace_seconds);
        Passes {
            leader: Leader::new(
                client.clone(),
                &args.lease_namespace,
                &args.lease_name,
                &identity,
                Duration::from_secs(args.lease_seconds),
            ),
            client,
            identity,
            leading: false,
            metrics,
            pool_status: args.pool_status,
            vf_namespace: args
                .dra_network
                .as_deref()
                .and_then(|n| n.split_once('/'))
                .map(|(ns, _)| ns.to_owned()),
            sweepers: (args.claim_grace_seconds > 0)
                .then(|| (ClaimSweeper::new(grace), BlockSweeper::new(grace))),
            pods_unlisted: false,
            nodes_unlisted: false,
        }
    }

    /// One pass.
    async fn once(&mut self) {
        match self.leader.try_lead().await {
            Ok(now) if now != self.leading => {
                self.leading = now;
                self.metrics.leader.set(i64::from(now));
                info!(identity = %self.identity, leading = now, "leadership changed");
            }
            Ok(_) => {}
            Err(e) => {
                // Cannot renew: stop writing until we can (another
                // replica may take over meanwhile).
                warn!(error = %e, "cannot reach the Lease; not leading");
                self.leading = false;
                self.metrics.leader.set(0);
            }
        }
        if !self.leading {
            return;
        }
        self.render().await;
        if self.pool_status
            && let Err(e) = railnet_agent::controller::pool_status(&self.client).await
        {
            self.metrics.pass_errors.inc();
            warn!(error = %e, "cannot update RailPool status; retrying next interval");
        }
        let (client, metrics) = (&self.client, &self.metrics);
        if let Some((claims, blocks)) = &mut self.sweepers {
            sweep(
                pod_uids(client).await,
                &mut self.pods_unlisted,
                ("pods", "claims of deleted pods are not released"),
                async |live| claims.pass(client, live).await,
                &metrics.claims_released,
                &metrics.pass_errors,
            )
            .await;
            sweep(
                node_names(client).await,
                &mut self.nodes_unlisted,
                ("nodes", "blocks of deleted nodes are not given back"),
                async |live| blocks.pass(client, live).await,
                &metrics.blocks_given_back,
                &metrics.pass_errors,
            )
            .await;
        }
    }

    /// Renders every RailNetwork's NAD, counting what it did.
    async fn render(&self) {
        let result = reconcile(&self.client, self.vf_namespace.as_deref()).await;
        match &result {
            Ok(pass) => {
                self.metrics.record(pass);
                if pass.failed > 0 {
                    self.metrics.pass_errors.inc();
                }
            }
            Err(_) => {
                self.metrics.pass_errors.inc();
            }
        }
        match result {
            Ok(pass)
                if pass.created + pass.repaired + pass.removed + pass.refused + pass.failed > 0 =>
            {
                info!(
                    created = pass.created,
                    repaired = pass.repaired,
                    removed = pass.removed,
                    refused = pass.refused,
                    failed = pass.failed,
                    "pass"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pass failed; retrying next interval"),
        }
    }
}

/// One sweep against what is alive now (`listed`): never on a failed list,
/// where everything would look gone. A failing list is logged once until it
/// works again (`unlisted`); `what`: what is listed, and what waits for it.
async fn sweep(
    listed: Result<std::collections::HashSet<String>, kube::Error>,
    unlisted: &mut bool,
    what: (&str, &str),
    pass: impl AsyncFnOnce(&std::collections::HashSet<String>) -> Result<usize, kube::Error>,
    done: &prometheus_client::metrics::counter::Counter,
    errors: &prometheus_client::metrics::counter::Counter,
) {
    match listed {
        Ok(live) => {
            *unlisted = false;
            match pass(&live).await {
                Ok(n) => {
                    done.inc_by(n as u64);
                }
                Err(e) => {
                    errors.inc();
                    warn!(error = %e, "sweep against the live {} failed; retrying next interval", what.0);
                }
            }
        }
        Err(e) if !*unlisted => {
            *unlisted = true;
            warn!(error = %e, "cannot list {}; {} until it can", what.0, what.1);
        }
        Err(_) => {}
    }
}
