//! The agent's flags (each with its environment variable, as the chart
//! sets them), checked by clap before anything else happens.

use std::path::PathBuf;

use clap::Parser;

use crate::{api, dataplane};

/// railnet's node agent.
///
/// Serves the CNI binary (`railnet`, executed by Multus) on a unix socket:
/// allocates each rail interface's address from the pools file, creates the
/// interface in the pod's netns, installs the rail's routes and attaches
/// railnet's tc program, pinned under the pin root so pods keep routing
/// while the agent restarts.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Args {
    /// Unix socket the CNI binary connects to.
    #[arg(long, env = "RAILNET_SOCKET", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Pools file (YAML; JSON works too): `pools:`, a list of SpiderIPPool-like
    /// specs (name, subnet, gateway, ips, excludeIPs, routes, nodeName, disable).
    #[arg(
        long,
        env = "RAILNET_CONFIG",
        default_value = "/etc/railnet/pools.yaml"
    )]
    pub config: PathBuf,
    /// Where allocations are kept (an embedded redb database).
    #[arg(
        long,
        env = "RAILNET_STATE",
        default_value = "/var/lib/railnet/ipam.redb"
    )]
    pub state: PathBuf,
    /// Address for `/metrics` and `/healthz`.
    /// (`ip:port`; an IPv6 address with or without brackets, as the
    /// downward API's status.hostIP gives it.)
    #[arg(long, env = "RAILNET_METRICS_ADDRESS", default_value = "0.0.0.0:9465", value_parser = socket_address)]
    pub metrics_address: std::net::SocketAddr,
    /// How long a `/metrics` render is reused (milliseconds): a render
    /// walks every pinned map, RDMA netlink and `/proc`, so a client
    /// scraping in a loop costs one render per this, not one per request.
    /// 0: a fresh render per request, still one at a time.
    #[arg(long, env = "RAILNET_METRICS_MAX_AGE_MS", default_value_t = 1000)]
    pub metrics_max_age_ms: u64,
    /// Where the CNI leaves DELs it could not deliver; finished on start
    /// and at every sweep.
    #[arg(long, env = "RAILNET_TOMBSTONES", default_value = api::DEFAULT_TOMBSTONES)]
    pub tombstones: PathBuf,
    /// This node's name, for pools' node affinity; the hostname if unset.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// bpffs directory for the pods' pinned programs and maps.
    #[arg(long, env = "RAILNET_PIN_ROOT", default_value = dataplane::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Seconds between sweeps that remove the pins (and addresses) of pods
    /// whose netns is gone without a DEL.
    #[arg(long, env = "RAILNET_SWEEP_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub sweep_interval: u64,
    /// Keep the host side of the not-to-RDMA-CIDR rule (the guides'
    /// `setRdmaRule.sh` and `setNicAddr.sh` policy routes): `not to <CIDR>
    /// lookup main`, and per host rail address a table with its pool's
    /// gateway and a `from` rule. Checked every sweep interval; removed
    /// only by the node's uninstall step.
    #[arg(long, env = "RAILNET_HOST_RULES_RDMA_CIDR", value_name = "IPV4_CIDR")]
    pub host_rules: Option<ipnet::Ipv4Net>,
    /// Where addresses are claimed: `local` (the redb file of `--state`, one
    /// node on its own) or `kubernetes` (RailBlock objects in the API
    /// server, shared by every node; needs the chart's CRDs and RBAC).
    #[arg(long, env = "RAILNET_IPAM_STORE", value_enum, default_value = "local")]
    pub ipam_store: StoreKind,
    /// Kubeconfig for `--ipam-store kubernetes`; unset: in-cluster service
    /// account (or KUBECONFIG).
    #[arg(long, env = "RAILNET_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The node's CNI bin dir, where the init container installed `railnet`
    /// and `railnet-ipam`: removed from it when the agent stops because its
    /// DaemonSet (`--daemonset`) is gone and no pod here holds a rail
    /// address (the node's share of `helm uninstall`).
    #[arg(long, requires = "daemonset")]
    pub remove_cni_on_uninstall: Option<PathBuf>,
    /// This agent's DaemonSet, `<namespace>/<name>`.
    #[arg(long)]
    pub daemonset: Option<String>,
    /// This agent serves one node of many, each with its own local store
    /// (the chart sets it): a pool not pinned to exactly one node
    /// (`nodeName`) would hand out the same addresses on every node it
    /// names, so it is refused. A standalone agent (one box) needs no pins.
    #[arg(long, env = "RAILNET_REQUIRE_PINNED_POOLS")]
    pub require_pinned_pools: bool,
    /// The interfaces a network may name as its master (names, `*`
    /// wildcards, comma-separated; e.g. `eno*np1`): any other is refused
    /// at ADD. Unset: any (whoever writes NADs is then trusted to name
    /// only rail NICs).
    #[arg(long, env = "RAILNET_ALLOWED_MASTERS", value_delimiter = ',')]
    pub allowed_masters: Vec<String>,
    /// Where the pods' interface sysctls (rp_filter, arp_ignore, accept_ra…)
    /// are written: `/proc/sys`, or the node's procfs mounted elsewhere
    /// where the container's `/proc/sys` is read-only (unprivileged).
    #[arg(long, env = "RAILNET_SYSCTL_ROOT", default_value = "/proc/sys")]
    pub sysctl_root: PathBuf,
    /// Label this node `railnet.io/rdma-netns-mode` with the kernel's RDMA
    /// netns mode (`exclusive`, `shared`, `none`), in either IPAM mode:
    /// the webhook schedules exclusive-mode pods by it. Needs patch on
    /// this Node (the chart's RBAC and admission policy).
    #[arg(long, env = "RAILNET_LABEL_NODE")]
    pub label_node: bool,
    /// Prefix length of the IPv4 address blocks a node claims in
    /// Kubernetes mode (28: 16 addresses; a pod's rails cost one API write
    /// each, a new block one more).
    #[arg(long, env = "RAILNET_BLOCK_PREFIX_V4", default_value_t = 28, value_parser = clap::value_parser!(u8).range(16..=32))]
    pub block_prefix_v4: u8,
    /// Prefix length of IPv6 blocks in Kubernetes mode.
    #[arg(long, env = "RAILNET_BLOCK_PREFIX_V6", default_value_t = 122, value_parser = clap::value_parser!(u8).range(112..=128))]
    pub block_prefix_v6: u8,
    /// Kubernetes mode: seconds between reads of the RailPool objects
    /// (pools from `--config` apply too).
    #[arg(long, env = "RAILNET_POOL_REFRESH", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub pool_refresh: u64,
    /// Node-local lock: a second agent for the same socket refuses to
    /// start while one holds it (two agents would wire the same pods
    /// twice). Default: the socket's path with `.lock` appended.
    #[arg(long, env = "RAILNET_LOCK")]
    pub lock: Option<PathBuf>,
    /// Where sysfs is: PCI addresses (deviceID) are looked up under
    /// `<root>/bus/pci/devices/` (tests point it at a tree of their own).
    #[arg(long, env = "RAILNET_SYSFS_ROOT", default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// How the rail program is attached: clsact (a tc filter; no RCU wait,
    /// about half the ADD time) or tcx (a pinned TCX link, Linux 6.6+:
    /// keeps its order among other TCX programs on the device).
    #[arg(long, env = "RAILNET_TC_ATTACH", value_enum, default_value_t = AttachKind::Clsact)]
    pub tc_attach: AttachKind,
    /// Where each Kubernetes pod's rails (interfaces, addresses, RDMA
    /// devices, GID indexes) and NCCL settings are written for its
    /// workload, one directory per pod UID; the webhook mounts a pod's own
    /// at /etc/railnet. Default: `pods/` beside the socket.
    #[arg(long, env = "RAILNET_POD_INFO_DIR")]
    pub pod_info_dir: Option<PathBuf>,
    /// Be the node's DRA driver `railnet.io`: publish its rail devices in
    /// ResourceSlices, serve the kubelet's DRA plugin API, and wire the
    /// rails of prepared claims through the DRA network (`"dra": true`).
    /// Needs API access in either IPAM mode.
    #[arg(long, env = "RAILNET_DRA")]
    pub dra: bool,
    /// DRA: the directory of the driver's socket (`dra.sock`), as the
    /// kubelet sees it.
    #[arg(
        long,
        env = "RAILNET_DRA_PLUGIN_DIR",
        default_value = "/var/lib/kubelet/plugins/railnet.io"
    )]
    pub dra_plugin_dir: PathBuf,
    /// DRA: the kubelet's plugin registration directory.
    #[arg(
        long,
        env = "RAILNET_DRA_REGISTRY_DIR",
        default_value = "/var/lib/kubelet/plugins_registry"
    )]
    pub dra_registry_dir: PathBuf,
    /// DRA: the namespace whose RailNetworks claims of every namespace may
    /// use (the release namespace); others' serve their own namespace.
    #[arg(long, env = "RAILNET_DRA_SHARED_NAMESPACE", default_value = "railnet")]
    pub dra_shared_namespace: String,
    /// DRA: where the container runtime reads CDI specs (containerd's and
    /// CRI-O's default `/var/run/cdi`): the RDMA character devices of a
    /// claim's VFs are handed to the runtime there.
    #[arg(long, env = "RAILNET_DRA_CDI_DIR", default_value = "/var/run/cdi")]
    pub dra_cdi_dir: PathBuf,
    /// DRA: seconds between reads of the RailNetworks and NICs for the
    /// ResourceSlices (a slice is written only when its devices change); a
    /// RailNetwork change is published at once (they are watched).
    #[arg(long, env = "RAILNET_DRA_REFRESH", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub dra_refresh: u64,
}

/// `--tc-attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachKind {
    /// A clsact egress filter.
    Clsact,
    /// A TCX link.
    Tcx,
}

/// Which store allocations live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// redb on this node's disk.
    Local,
    /// The Kubernetes API server.
    Kubernetes,
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
