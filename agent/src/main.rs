//! `railnet-agent`: the node daemon. Thin: flags, validation, then serve.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use railnet_agent::{
    api, bpf_object, config, dataplane,
    ipam::{
        Ipam, OpenError, RedbStore,
        cluster::{ClusterOptions, ClusterStore},
    },
    rail::RailService,
    server,
};
use tracing::{error, info};

/// railnet's node agent.
///
/// Serves the CNI binary (`railnet`, executed by Multus) on a unix socket:
/// allocates each rail interface's address from the pools file, creates the
/// interface in the pod's netns, installs the rail's routes and attaches
/// railnet's tc program, pinned under the pin root so pods keep routing
/// while the agent restarts.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Unix socket the CNI binary connects to.
    #[arg(long, env = "RAILNET_SOCKET", default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Pools file (YAML; JSON works too): `pools:`, a list of SpiderIPPool-like
    /// specs (name, subnet, gateway, ips, excludeIPs, routes, nodeName, disable).
    #[arg(
        long,
        env = "RAILNET_CONFIG",
        default_value = "/etc/railnet/pools.yaml"
    )]
    config: PathBuf,
    /// Where allocations are kept (an embedded redb database).
    #[arg(
        long,
        env = "RAILNET_STATE",
        default_value = "/var/lib/railnet/ipam.redb"
    )]
    state: PathBuf,
    /// Address for `/metrics` and `/healthz`.
    /// (`ip:port`; an IPv6 address with or without brackets, as the
    /// downward API's status.hostIP gives it.)
    #[arg(long, env = "RAILNET_METRICS_ADDRESS", default_value = "0.0.0.0:9465", value_parser = socket_address)]
    metrics_address: std::net::SocketAddr,
    /// How long a `/metrics` render is reused (milliseconds): a render
    /// walks every pinned map, RDMA netlink and `/proc`, so a client
    /// scraping in a loop costs one render per this, not one per request.
    /// 0: a fresh render per request, still one at a time.
    #[arg(long, env = "RAILNET_METRICS_MAX_AGE_MS", default_value_t = 1000)]
    metrics_max_age_ms: u64,
    /// Where the CNI leaves DELs it could not deliver; finished on start
    /// and at every sweep.
    #[arg(long, env = "RAILNET_TOMBSTONES", default_value = api::DEFAULT_TOMBSTONES)]
    tombstones: PathBuf,
    /// This node's name, for pools' node affinity; the hostname if unset.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// bpffs directory for the pods' pinned programs and maps.
    #[arg(long, env = "RAILNET_PIN_ROOT", default_value = dataplane::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Seconds between sweeps that remove the pins (and addresses) of pods
    /// whose netns is gone without a DEL.
    #[arg(long, env = "RAILNET_SWEEP_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    sweep_interval: u64,
    /// Where addresses are claimed: `local` (the redb file of `--state`, one
    /// node on its own) or `kubernetes` (RailBlock objects in the API
    /// server, shared by every node; needs the chart's CRDs and RBAC).
    #[arg(long, env = "RAILNET_IPAM_STORE", value_enum, default_value = "local")]
    ipam_store: StoreKind,
    /// Kubeconfig for `--ipam-store kubernetes`; unset: in-cluster service
    /// account (or KUBECONFIG).
    #[arg(long, env = "RAILNET_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The node's CNI bin dir, where the init container installed `railnet`
    /// and `railnet-ipam`: removed from it when the agent stops because its
    /// DaemonSet (`--daemonset`) is gone and no pod here holds a rail
    /// address (the node's share of `helm uninstall`).
    #[arg(long, requires = "daemonset")]
    remove_cni_on_uninstall: Option<PathBuf>,
    /// This agent's DaemonSet, `<namespace>/<name>`.
    #[arg(long)]
    daemonset: Option<String>,
    /// This agent serves one node of many, each with its own local store
    /// (the chart sets it): a pool not pinned to exactly one node
    /// (`nodeName`) would hand out the same addresses on every node it
    /// names, so it is refused. A standalone agent (one box) needs no pins.
    #[arg(long, env = "RAILNET_REQUIRE_PINNED_POOLS")]
    require_pinned_pools: bool,
    /// The interfaces a network may name as its master (names, `*`
    /// wildcards, comma-separated; e.g. `eno*np1`): any other is refused
    /// at ADD. Unset: any (whoever writes NADs is then trusted to name
    /// only rail NICs).
    #[arg(long, env = "RAILNET_ALLOWED_MASTERS", value_delimiter = ',')]
    allowed_masters: Vec<String>,
    /// Where the pods' interface sysctls (rp_filter, arp_ignore, accept_ra…)
    /// are written: `/proc/sys`, or the node's procfs mounted elsewhere
    /// where the container's `/proc/sys` is read-only (unprivileged).
    #[arg(long, env = "RAILNET_SYSCTL_ROOT", default_value = "/proc/sys")]
    sysctl_root: PathBuf,
    /// Label this node `railnet.io/rdma-netns-mode` with the kernel's RDMA
    /// netns mode (`exclusive`, `shared`, `none`), in either IPAM mode:
    /// the webhook schedules exclusive-mode pods by it. Needs patch on
    /// this Node (the chart's RBAC and admission policy).
    #[arg(long, env = "RAILNET_LABEL_NODE")]
    label_node: bool,
    /// Prefix length of the IPv4 address blocks a node claims in
    /// Kubernetes mode (28: 16 addresses; a pod's rails cost one API write
    /// each, a new block one more).
    #[arg(long, env = "RAILNET_BLOCK_PREFIX_V4", default_value_t = 28, value_parser = clap::value_parser!(u8).range(16..=32))]
    block_prefix_v4: u8,
    /// Prefix length of IPv6 blocks in Kubernetes mode.
    #[arg(long, env = "RAILNET_BLOCK_PREFIX_V6", default_value_t = 122, value_parser = clap::value_parser!(u8).range(112..=128))]
    block_prefix_v6: u8,
    /// Kubernetes mode: seconds between reads of the RailPool objects
    /// (pools from `--config` apply too).
    #[arg(long, env = "RAILNET_POOL_REFRESH", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pool_refresh: u64,
    /// Node-local lock: a second agent for the same socket refuses to
    /// start while one holds it (two agents would wire the same pods
    /// twice). Default: the socket's path with `.lock` appended.
    #[arg(long, env = "RAILNET_LOCK")]
    lock: Option<PathBuf>,
    /// Where sysfs is: PCI addresses (deviceID) are looked up under
    /// `<root>/bus/pci/devices/` (tests point it at a tree of their own).
    #[arg(long, env = "RAILNET_SYSFS_ROOT", default_value = "/sys")]
    sysfs_root: PathBuf,
    /// How the rail program is attached: clsact (a tc filter; no RCU wait,
    /// about half the ADD time) or tcx (a pinned TCX link, Linux 6.6+:
    /// keeps its order among other TCX programs on the device).
    #[arg(long, env = "RAILNET_TC_ATTACH", value_enum, default_value_t = AttachKind::Clsact)]
    tc_attach: AttachKind,
    /// Where each Kubernetes pod's rails (interfaces, addresses, RDMA
    /// devices, GID indexes) and NCCL settings are written for its
    /// workload, one directory per pod UID; the webhook mounts a pod's own
    /// at /etc/railnet. Default: `pods/` beside the socket.
    #[arg(long, env = "RAILNET_POD_INFO_DIR")]
    pod_info_dir: Option<PathBuf>,
}

/// `--tc-attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AttachKind {
    /// A clsact egress filter.
    Clsact,
    /// A TCX link.
    Tcx,
}

/// Which store allocations live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// redb on this node's disk.
    Local,
    /// The Kubernetes API server.
    Kubernetes,
}

/// Exit codes a supervisor can act on.
mod exit {
    pub const CONFIG: u8 = 2;
    pub const STUB_BPF: u8 = 3;
    pub const BIND: u8 = 4;
    pub const STORE: u8 = 5;
    pub const LOCKED: u8 = 6;
}

/// Takes the node-local lock (flock, released by the kernel when the
/// process ends however it ends), writing our PID into the file; or says
/// who holds it.
fn take_node_lock(path: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("lock {}: {e}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            return Err(format!(
                "another railnet-agent (pid {}) serves this node (lock {}); stop it first — two agents would wire the same pods twice",
                holder.trim(),
                path.display()
            ));
        }
        Err((_, e)) => return Err(format!("lock {}: {e}", path.display())),
    };
    // The pid in the lock file is for a person looking; the lock is what
    // keeps a second agent out.
    let _ = lock.set_len(0);
    let _ = writeln!(lock, "{}", std::process::id());
    Ok(lock)
}

fn main() -> ExitCode {
    // Each CNI request is served on a thread of its own, and glibc gives
    // threads malloc arenas of their own (up to 8 per CPU) whose freed
    // fragments stay resident for the agent's life (~5 MB at 65 000
    // allocations in `bench ipam`). Two suffice for an agent that mostly
    // waits on netlink and fsync.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt with a valid parameter, before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let tc_attach = match match args.tc_attach {
        AttachKind::Clsact => railnet_agent::dataplane::TcAttach::Clsact,
        AttachKind::Tcx => railnet_agent::dataplane::TcAttach::Tcx,
    }
    .supported()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("railnet-agent: --tc-attach: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    if let Err(e) = bpf_object::object() {
        eprintln!("railnet-agent: {e}");
        return ExitCode::from(exit::STUB_BPF);
    }
    let specs = match config::load_pools(&args.config) {
        Ok(specs) => specs,
        Err(e) => {
            eprintln!("railnet-agent: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    if args.require_pinned_pools && matches!(args.ipam_store, StoreKind::Local) {
        let shared = config::unpinned(&specs);
        if !shared.is_empty() {
            for e in shared {
                eprintln!("railnet-agent: {}: {e}", args.config.display());
            }
            return ExitCode::from(exit::CONFIG);
        }
    }
    let node_name = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    });
    // Before anything is opened or touched: one agent per node.
    let lock_path = args.lock.clone().unwrap_or_else(|| {
        let mut p = args.socket.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    });
    let _lock = match take_node_lock(&lock_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("railnet-agent: {e}");
            return ExitCode::from(exit::LOCKED);
        }
    };
    // Kubernetes mode: the file's pools and the store, to merge RailPools
    // into as they change.
    let mut file_pools = None;
    let opened = match args.ipam_store {
        StoreKind::Local => match RedbStore::open(&args.state) {
            Ok(store) => Ipam::with_store(specs, Box::new(store)),
            Err(e) => {
                eprintln!(
                    "railnet-agent: allocation store {}: {e}",
                    args.state.display()
                );
                return ExitCode::from(exit::STORE);
            }
        },
        StoreKind::Kubernetes => {
            // The node's journal: ADDs from addresses this node holds are
            // durable here before their claims reach the API server.
            let journal = match RedbStore::open(&args.state) {
                Ok(store) => Box::new(store),
                Err(e) => {
                    eprintln!(
                        "railnet-agent: allocation journal {}: {e}",
                        args.state.display()
                    );
                    return ExitCode::from(exit::STORE);
                }
            };
            let mut opts = ClusterOptions::new(node_name.clone());
            opts.kubeconfig = args.kubeconfig.clone();
            opts.block_prefix_v4 = args.block_prefix_v4;
            opts.block_prefix_v6 = args.block_prefix_v6;
            let cluster = match ClusterStore::connect(opts) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    eprintln!("railnet-agent: Kubernetes store: {e}");
                    return ExitCode::from(exit::STORE);
                }
            };
            // The RailPools join the file's pools before the first ADD.
            let mut all = specs.clone();
            match cluster.rail_pools() {
                Ok((pools, skipped)) => {
                    for s in &skipped {
                        tracing::warn!("{s}");
                    }
                    all.extend(pools);
                }
                Err(e) => {
                    eprintln!("railnet-agent: reading RailPools: {e}");
                    return ExitCode::from(exit::STORE);
                }
            }
            file_pools = Some((specs.clone(), cluster.clone()));
            Ipam::with_cluster(all, cluster, journal)
        }
    };
    let ipam = match opened {
        Ok(ipam) => ipam,
        Err(OpenError::Pools(errors)) => {
            let text = std::fs::read_to_string(&args.config).unwrap_or_default();
            for e in errors {
                eprintln!("railnet-agent: {}", config::locate(&args.config, &text, e));
            }
            return ExitCode::from(exit::CONFIG);
        }
        Err(e @ OpenError::Store(_)) => {
            match args.ipam_store {
                StoreKind::Local => eprintln!("railnet-agent: {}: {e}", args.state.display()),
                StoreKind::Kubernetes => eprintln!("railnet-agent: Kubernetes store: {e}"),
            }
            return ExitCode::from(exit::STORE);
        }
    };
    if let Err(e) = check_pin_root(&args.pin_root) {
        eprintln!("railnet-agent: {e}");
        return ExitCode::from(exit::CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("railnet-agent: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Take over what an earlier agent left before answering anyone: pins,
    // allocations, DELs left as tombstones (on a plain thread: DEL may use
    // netlink, which runs its own small runtime).
    dataplane::warm_up();
    adopt(&args.pin_root);
    info!(allocations = ipam.allocated(), node = %node_name, "allocations restored");
    let service = Arc::new(RailService {
        ipam,
        pin_root: args.pin_root.clone(),
        node_name,
        sysfs_root: args.sysfs_root.clone(),
        // Beside the allocations: what each VF looked like before a pod
        // took it, so DEL can restore it after any restart.
        vf_records: args
            .state
            .parent()
            .unwrap_or(std::path::Path::new("/var/lib/railnet"))
            .join("vfs"),
        pod_info: Some(railnet_agent::podinfo::PodInfo::new(
            args.pod_info_dir.clone().unwrap_or_else(|| {
                args.socket
                    .parent()
                    .unwrap_or(std::path::Path::new("/run/railnet"))
                    .join("pods")
            }),
        )),
        sweep_gate: std::sync::RwLock::new(()),
        allowed_masters: args.allowed_masters.clone(),
        tc_attach,
        sysctl_root: args.sysctl_root.clone(),
    });
    if let Some((file, cluster)) = file_pools {
        let (service, every) = (
            service.clone(),
            std::time::Duration::from_secs(args.pool_refresh),
        );
        let spawned = std::thread::Builder::new()
            .name("railpools".into())
            .spawn(move || refresh_pools(&service, &file, &cluster, every));
        if let Err(e) = spawned {
            eprintln!("railnet-agent: cannot start the RailPool reader: {e}");
            return ExitCode::FAILURE;
        }
    }
    let swept = railnet_agent::rail::sweep_ipoib_leftovers();
    if !swept.is_empty() {
        info!(children = ?swept, "removed IPoIB children an interrupted ADD left in the node");
    }
    let finished = service.finish_tombstones(&args.tombstones);
    if finished > 0 {
        info!(finished, "finished DELs left while the agent was away");
    }
    runtime.block_on(async move {
        let listener = match server::bind(&args.socket) {
            Ok(l) => l,
            Err(e) => {
                error!(socket = %args.socket.display(), error = %e, "cannot bind");
                return ExitCode::from(exit::BIND);
            }
        };
        let metrics_listener = match railnet_agent::metrics::bind(args.metrics_address).await {
            Ok(l) => l,
            Err(e) => {
                error!(address = %args.metrics_address, error = %e, "cannot bind the metrics endpoint");
                return ExitCode::from(exit::BIND);
            }
        };
        info!(socket = %args.socket.display(), pin_root = %args.pin_root.display(), metrics = %args.metrics_address, "serving");
        // The rail programs' rare events, with the pod and rail they concern.
        let program_log = match dataplane::log::open(&args.pin_root) {
            Ok(logger) => Some(tokio::spawn(dataplane::log::forward(logger))),
            Err(e) => {
                tracing::warn!(error = %e, "the rail programs' log is not forwarded");
                None
            }
        };
        let metrics = Arc::new(railnet_agent::metrics::Metrics::default());
        let metrics_task = tokio::spawn(railnet_agent::metrics::serve(
            metrics_listener,
            metrics.clone(),
            service.clone(),
            std::time::Duration::from_millis(args.metrics_max_age_ms),
        ));
        let sweeper = tokio::spawn(sweep_loop(
            service.clone(),
            std::time::Duration::from_secs(args.sweep_interval),
            args.tombstones.clone(),
        ));
        let labeller = args.label_node.then(|| {
            let mode = railnet_agent::rdma::RdmaNetlink::open()
                .and_then(|mut r| r.netns_mode())
                .map(|m| m.to_string())
                .unwrap_or_else(|_| "none".into());
            tokio::spawn(railnet_agent::node_label::keep_trying(
                args.kubeconfig.clone(),
                service.node_name.clone(),
                mode,
            ))
        });
        let uninstalling = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let uninstall_watch = match (&args.remove_cni_on_uninstall, &args.daemonset) {
            (Some(_), Some(ds)) => match railnet_agent::kube_api::client(
                args.kubeconfig.as_deref(),
                std::time::Duration::from_secs(5),
            )
            .await
            {
                Ok(client) => Some(tokio::spawn(railnet_agent::uninstall::watch(
                    client,
                    ds.clone(),
                    uninstalling.clone(),
                ))),
                Err(e) => {
                    tracing::warn!(error = %e, "no API client: an uninstall will leave the CNI binaries");
                    None
                }
            },
            _ => None,
        };
        let last = service.clone();
        server::serve(listener, args.socket, service, metrics, shutdown_signal()).await;
        for task in [uninstall_watch, labeller, program_log]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        sweeper.abort();
        metrics_task.abort();
        // Kubernetes mode: claims made since the last flush are in the
        // journal already; writing them now saves the next agent the
        // catching up (and shows them to the controller at once).
        // On a plain thread: the store runs its own runtime.
        let held = last.ipam.allocated();
        let flushed = std::thread::spawn(move || last.ipam.flush()).join();
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "claims not written before exit; the next agent writes them from its journal");
        }
        if let (Some(dir), Some(ds)) = (&args.remove_cni_on_uninstall, &args.daemonset) {
            // Seen by the watch; else one last look (an uninstall without
            // the cleanup Job: the DaemonSet is gone).
            let gone = if uninstalling.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(true)
            } else {
                match railnet_agent::kube_api::client(
                args.kubeconfig.as_deref(),
                std::time::Duration::from_secs(5),
            )
            .await
            {
                    Ok(client) => railnet_agent::uninstall::daemonset_gone(&client, ds).await,
                    Err(e) => Err(e.to_string()),
                }
            };
            match gone {
                Ok(true) => {
                    railnet_agent::uninstall::remove_cni_binaries(dir, held);
                    if held == 0
                        && let Err(e) = dataplane::log::unpin(&args.pin_root)
                    {
                        tracing::warn!(error = %e, "the rail programs' log buffer stays pinned");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot tell an uninstall from a restart; the CNI binaries stay"),
            }
        }
        ExitCode::SUCCESS
    })
}

/// Kubernetes mode: reads the RailPools every `every` and swaps them (with
/// the file's pools) into the allocator; says once what it left out and
/// why, and what changed.
fn refresh_pools(
    service: &RailService,
    file: &[railnet_agent::ipam::PoolSpec],
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
fn adopt(pin_root: &std::path::Path) {
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
async fn sweep_loop(service: Arc<RailService>, every: std::time::Duration, tombstones: PathBuf) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let service = service.clone();
        let tombstones = tombstones.clone();
        let removed = tokio::task::spawn_blocking(move || {
            service.finish_tombstones(&tombstones);
            // No ADD between the look and the releases (see sweep_gate).
            let _gate = service
                .sweep_gate
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let live = railnet_agent::netns::LiveNetns::scan();
            let mut removed = dataplane::sweep(&service.pin_root, &live);
            for cid in &removed {
                if let Err(e) = service.ipam.release_container(cid) {
                    tracing::warn!(container = %cid, error = %e, "sweep: addresses of a gone pod not released; next sweep tries again");
                }
            }
            // Rules-mode pods have no pins: their allocations carry the
            // netns inode too.
            if let Ok(gone) = service
                .ipam
                .release_where_allocation(|a| a.netns_inode != 0 && !live.contains(a.netns()))
            {
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

/// The pin root must be on bpffs, or pins would silently not persist.
fn check_pin_root(root: &std::path::Path) -> Result<(), String> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    std::fs::create_dir_all(root).map_err(|e| {
        format!(
            "pin root {}: {e}; mount bpffs first: `mount -t bpf bpf /sys/fs/bpf`",
            root.display()
        )
    })?;
    let fs =
        nix::sys::statfs::statfs(root).map_err(|e| format!("statfs {}: {e}", root.display()))?;
    if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(format!(
            "pin root {} is not on bpffs; mount it (`mount -t bpf bpf /sys/fs/bpf`) or pass --pin-root under a bpffs mount",
            root.display()
        ));
    }
    Ok(())
}

/// `ip:port`, where `ip` may be an IPv6 address without brackets (the
/// chart writes `$(HOST_IP):<port>`, and a node's IP may be IPv6).
fn socket_address(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    let (ip, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not ip:port"))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("{text:?}: {ip:?} is not an IP address"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?}: {port:?} is not a port"))?;
    Ok(std::net::SocketAddr::new(ip, port))
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

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_addresses_as_the_downward_api_gives_them() {
        for (text, want) in [
            ("0.0.0.0:9465", "0.0.0.0:9465"),
            ("10.0.0.7:9465", "10.0.0.7:9465"),
            ("[fd00::7]:9465", "[fd00::7]:9465"),
            ("fd00::7:9465", "[fd00::7]:9465"),
        ] {
            assert_eq!(super::socket_address(text).unwrap().to_string(), want);
        }
        assert!(
            super::socket_address("node0:9465")
                .unwrap_err()
                .contains("not an IP")
        );
        assert!(super::socket_address("10.0.0.7").is_err());
    }
}
