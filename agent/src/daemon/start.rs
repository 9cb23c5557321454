//! Everything before the first request: the flags checked against the
//! node (attach kind, BPF object, pools file, bpffs), one agent per node
//! (a lock), the allocation store opened, and what an earlier agent left
//! taken over (pins, IPoIB children, DELs left as tombstones).

use std::{path::PathBuf, sync::Arc};

use tracing::info;

use super::{Args, AttachKind, Failure, StoreKind, exit, upkeep};
use crate::{
    bpf_object, config, dataplane,
    ipam::{
        Ipam, OpenError, PoolSpec, RedbStore,
        cluster::{ClusterOptions, ClusterStore},
    },
    podinfo::PodInfo,
    rail::RailService,
};

/// An agent ready to serve.
pub(super) struct Started {
    /// The service the socket serves.
    pub service: Arc<RailService>,
    /// Held while the agent runs: one agent per node.
    pub _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Kubernetes mode: the file's pools and the store, to merge the RailPools
/// into as they change.
type FilePools = Option<(Vec<PoolSpec>, Arc<ClusterStore>)>;

/// Checks, locks, opens and takes over, in that order: nothing is opened
/// or touched before the flags and files are known good and this is the
/// node's only agent.
pub(super) fn start(args: &Args) -> Result<Started, Failure> {
    let tc_attach = match args.tc_attach {
        AttachKind::Clsact => dataplane::TcAttach::Clsact,
        AttachKind::Tcx => dataplane::TcAttach::Tcx,
    }
    .supported()
    .map_err(|e| Failure::new(exit::CONFIG, format!("--tc-attach: {e}")))?;
    bpf_object::object().map_err(|e| Failure::new(exit::STUB_BPF, e.to_string()))?;
    let specs = pools_file(args)?;
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
    let lock = take_node_lock(&lock_path).map_err(|e| Failure::new(exit::LOCKED, e))?;
    let (ipam, file_pools) = open_ipam(args, specs, &node_name)?;
    check_pin_root(&args.pin_root).map_err(|e| Failure::new(exit::CONFIG, e))?;
    // Take over what an earlier agent left before answering anyone: pins,
    // allocations, DELs left as tombstones.
    dataplane::warm_up();
    upkeep::adopt(&args.pin_root);
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
        pod_info: Some(PodInfo::new(args.pod_info_dir.clone().unwrap_or_else(
            || {
                args.socket
                    .parent()
                    .unwrap_or(std::path::Path::new("/run/railnet"))
                    .join("pods")
            },
        ))),
        sweep_gate: std::sync::RwLock::new(()),
        allowed_masters: args.allowed_masters.clone(),
        tc_attach,
        sysctl_root: args.sysctl_root.clone(),
        dra: std::sync::OnceLock::new(),
    });
    if let Some((file, cluster)) = file_pools {
        let (service, every) = (
            service.clone(),
            std::time::Duration::from_secs(args.pool_refresh),
        );
        std::thread::Builder::new()
            .name("railpools".into())
            .spawn(move || upkeep::refresh_pools(&service, &file, &cluster, every))
            .map_err(|e| {
                Failure::new(
                    exit::FAILURE,
                    format!("cannot start the RailPool reader: {e}"),
                )
            })?;
    }
    let swept = crate::rail::sweep_ipoib_leftovers();
    if !swept.is_empty() {
        info!(children = ?swept, "removed IPoIB children an interrupted ADD left in the node");
    }
    let finished = service.finish_tombstones(&args.tombstones);
    if finished > 0 {
        info!(finished, "finished DELs left while the agent was away");
    }
    Ok(Started {
        service,
        _lock: lock,
    })
}

/// The pools file, parsed and checked: a bad file names every bad pool and
/// its line.
fn pools_file(args: &Args) -> Result<Vec<PoolSpec>, Failure> {
    let specs =
        config::load_pools(&args.config).map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?;
    if args.require_pinned_pools && matches!(args.ipam_store, StoreKind::Local) {
        let shared = config::unpinned(&specs);
        if !shared.is_empty() {
            let lines = shared
                .into_iter()
                .map(|e| format!("{}: {e}", args.config.display()))
                .collect();
            return Err(Failure {
                code: exit::CONFIG,
                lines,
            });
        }
    }
    Ok(specs)
}

/// The allocator over the store the flags chose: redb on the node, or the
/// API server's RailBlocks with redb as the node's journal.
fn open_ipam(
    args: &Args,
    specs: Vec<PoolSpec>,
    node_name: &str,
) -> Result<(Ipam, FilePools), Failure> {
    let journal = |what: &str| {
        RedbStore::open(&args.state).map_err(|e| {
            Failure::new(
                exit::STORE,
                format!("allocation {what} {}: {e}", args.state.display()),
            )
        })
    };
    let mut file_pools = None;
    let opened = match args.ipam_store {
        StoreKind::Local => Ipam::with_store(specs, Box::new(journal("store")?)),
        StoreKind::Kubernetes => {
            // The node's journal: ADDs from addresses this node holds are
            // durable here before their claims reach the API server.
            let journal = Box::new(journal("journal")?);
            let mut opts = ClusterOptions::new(node_name.to_owned());
            opts.kubeconfig = args.kubeconfig.clone();
            opts.block_prefix_v4 = args.block_prefix_v4;
            opts.block_prefix_v6 = args.block_prefix_v6;
            let cluster = ClusterStore::connect(opts)
                .map(Arc::new)
                .map_err(|e| Failure::new(exit::STORE, format!("Kubernetes store: {e}")))?;
            // The RailPools join the file's pools before the first ADD.
            let mut all = specs.clone();
            let (pools, skipped) = cluster
                .rail_pools()
                .map_err(|e| Failure::new(exit::STORE, format!("reading RailPools: {e}")))?;
            for s in &skipped {
                tracing::warn!("{s}");
            }
            all.extend(pools);
            file_pools = Some((specs, cluster.clone()));
            Ipam::with_cluster(all, cluster, journal)
        }
    };
    match opened {
        Ok(ipam) => Ok((ipam, file_pools)),
        Err(OpenError::Pools(errors)) => {
            let text = std::fs::read_to_string(&args.config).unwrap_or_default();
            let lines = errors
                .into_iter()
                .map(|e| config::locate(&args.config, &text, e).to_string())
                .collect();
            Err(Failure {
                code: exit::CONFIG,
                lines,
            })
        }
        Err(e @ OpenError::Store(_)) => Err(Failure::new(
            exit::STORE,
            match args.ipam_store {
                StoreKind::Local => format!("{}: {e}", args.state.display()),
                StoreKind::Kubernetes => format!("Kubernetes store: {e}"),
            },
        )),
    }
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
