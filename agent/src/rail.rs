//! ADD and DEL of one rail interface: address, macvlan, routes, program.
//!
//! The order follows DESIGN.md's "A pod's ADD": allocate, create the
//! interface in the pod, address it, route it, attach the program — and on
//! any failure undo what was done, so a failed ADD leaves nothing behind.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::{
    Handle, LinkIpVlan, LinkMacVlan, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::{IpVlanMode, MacVlanMode},
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourState},
        route::{RouteProtocol, RouteScope},
        rule::RuleAction,
    },
};

use crate::{
    api::{
        AddResult, ApiError, Attachment, GcRequest, IpamRequest, IpamResult, RailRdma,
        ResultInterface, ResultIp, ResultRoute, code,
    },
    dataplane::{PodPins, RailAttachment},
    ipam::{AllocationKey, Family, Ipam, IpamError, PoolRequest},
    netconf::{NetConf, Routing, valid_ifname},
    netns::{NetnsId, PodNetns},
    rdma::{self, NetnsMode, RdmaDevice, RdmaError, RdmaNetlink, RdmaPort},
    rtnl::{self, describe, errno, with_rtnl},
    sriov,
};

/// Metric of rail K's routes is `ROUTE_METRIC_BASE + K`, so the lowest rail
/// wins source-less lookups and each rail's route is distinct.
pub const ROUTE_METRIC_BASE: u32 = 100;

/// In rules mode rail K's routes live in table `RULE_TABLE_BASE + K`.
pub const RULE_TABLE_BASE: u32 = 100;

/// In rules mode rail K's `from ipK` rules have priority
/// `RULE_PRIORITY_BASE + K`: after the kernel's `local` rule (0), before
/// `main` (32766).
pub const RULE_PRIORITY_BASE: u32 = 1000;

/// Who a pod is, as the runtime said (CNI_ARGS).
#[derive(Clone, Copy, Debug, Default)]
struct PodIds<'a> {
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    uid: Option<&'a str>,
}

/// What ADD and DEL need from the agent.
#[derive(Debug)]
pub struct RailService {
    /// The allocator.
    pub ipam: Ipam,
    /// Root of the pods' bpffs pins.
    pub pin_root: PathBuf,
    /// This node's name (pool node affinity).
    pub node_name: String,
    /// sysfs, for PCI address lookups (`/sys`).
    pub sysfs_root: PathBuf,
    /// Records of VFs given to pods (mode sriov), to restore them on DEL.
    pub vf_records: PathBuf,
    /// Where each pod's rails are written for its workload
    /// (`<dir>/<pod UID>/`); `None`: nowhere.
    pub pod_info: Option<crate::podinfo::PodInfo>,
    /// ADDs hold it shared, the sweep exclusively from its look at the
    /// live namespaces to its last release: an ADD finishing in between
    /// (its netns made after the look) would otherwise be taken for a
    /// pod that is gone.
    pub sweep_gate: std::sync::RwLock<()>,
    /// The masters (names, `*` wildcards) a network may name; empty: any.
    /// The node's operator sets it: a NAD author may otherwise hang pods
    /// off any interface of the node (its management NIC, say).
    pub allowed_masters: Vec<String>,
    /// How rail programs are attached (chosen once, at start).
    pub tc_attach: crate::dataplane::TcAttach,
}

/// Refuses an ADD for (container, ifname) from another netns than the one
/// its addresses were allocated for: a repeat ADD comes from the same pod;
/// another caller naming that container would be handed the pod's
/// addresses, wired into its own netns. Unknown (zero) parts are not held
/// against it.
fn same_netns(ipam: &Ipam, container_id: &str, ifname: &str, now: NetnsId) -> Result<(), ApiError> {
    let Some(then) = ipam.netns_of(container_id, ifname) else {
        return Ok(());
    };
    let differs = (then.inode != 0 && now.inode != 0 && then.inode != now.inode)
        || (then.cookie != 0 && now.cookie != 0 && then.cookie != now.cookie);
    if differs {
        return Err(ApiError::new(
            code::INVALID_ENV,
            format!("{container_id}/{ifname} holds addresses made for another network namespace"),
            "an ADD repeated for a container must come from its own netns: is CNI_CONTAINERID another pod's?",
        ));
    }
    Ok(())
}

/// Refuses a pod netns the sweep could not find later (not pinned under
/// `/run/netns` or `/var/run/netns`, and no process of it visible in
/// `/proc`): the sweep would release its addresses and pins within one
/// interval, taking the pod for gone.
fn sweep_can_see(id: NetnsId) -> Result<(), ApiError> {
    if id.inode == 0 || crate::netns::path_of(id.inode).is_some() {
        return Ok(());
    }
    Err(ApiError::new(
        code::INVALID_ENV,
        "the pod's network namespace is not visible to the agent",
        "it is neither pinned under /run/netns or /var/run/netns nor held by a process the agent can see \
         (its CNI_NETNS is likely /proc/<pid>/ns/net): run the agent with the host's PID namespace \
         (chart: agent.hostPID=true), or the agent would take the pod for gone",
    ))
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> ApiError {
    ApiError::new(code::INVALID_CONFIG, msg, details)
}

fn check_ids(container_id: &str, ifname: &str) -> Result<(), ApiError> {
    if !valid_container_id(container_id) || !valid_ifname(ifname) {
        return Err(ApiError::new(
            code::INVALID_ENV,
            "invalid CNI_CONTAINERID or CNI_IFNAME",
            format!(
                "{container_id:?} / {ifname:?}: IDs of letters, digits, '-', '_', '.'; names of 1 to 15 bytes"
            ),
        ));
    }
    Ok(())
}

/// A container ID becomes a directory name under the pin root: allow only
/// what runtimes generate, never a path.
fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A VF ready to move into a pod: its netdev in the host now (a rebind
/// may have renamed it) and what [`RailService::prepare_vf`] did.
struct PreparedVf {
    name: String,
    index: u32,
    mtu: u32,
    /// Its driver was rebound (a new GUID): its RDMA device is new too.
    rebound: bool,
}

/// What ADD does about RDMA for one interface.
enum RdmaPlan {
    /// The node has no RDMA device at all (no RDMA subsystem, or none
    /// registered): a test or CPU node; the rail carries TCP only.
    None,
    /// The pod shares the master's device (macvlan/ipvlan, shared mode).
    Shared(RdmaPort),
    /// The VF's device moves into the pod (exclusive mode).
    Isolate(RdmaDevice),
}

/// The PCI address of a netdev of the agent's netns, if it is a PCI
/// function (`/sys/class/net/<dev>/device` → `.../0000:3b:00.0`).
fn pci_address_of_netdev(netdev: &str) -> Option<String> {
    let target = std::fs::read_link(format!("/sys/class/net/{netdev}/device")).ok()?;
    let name = target.file_name()?.to_string_lossy().into_owned();
    // domain:bus:device.function
    let pci = name.len() == 12 && name.as_bytes()[4] == b':' && name.as_bytes()[7] == b':';
    pci.then_some(name)
}

/// Looks at the node's RDMA devices from the agent's netns (the host's).
fn rdma_plan(conf: &NetConf, sysfs: &Path) -> Result<RdmaPlan, ApiError> {
    let dp = |msg: &str, e: RdmaError| ApiError::new(code::DATAPLANE, msg, e.to_string());
    let mut nl = match RdmaNetlink::open() {
        Ok(nl) => nl,
        Err(e @ RdmaError::NoRdma(_)) if conf.rdma_isolation => {
            return Err(invalid(
                "\"rdmaIsolation\" is set but this node has no RDMA subsystem",
                e.to_string(),
            ));
        }
        Err(RdmaError::NoRdma(_)) => return Ok(RdmaPlan::None),
        Err(e) => return Err(dp("RDMA netlink", e)),
    };
    if conf.rdma_isolation {
        let mode = nl
            .netns_mode()
            .map_err(|e| dp("reading the RDMA netns mode", e))?;
        if mode != NetnsMode::Exclusive {
            return Err(invalid(
                format!(
                    "network {} isolates RDMA devices (rdmaIsolation), and this node's RDMA netns mode is {mode}",
                    conf.name
                ),
                "switch the node to exclusive mode: `echo 'options ib_core netns_mode=0' > /etc/modprobe.d/ib_core.conf` \
                 and reboot (`rdma system set netns exclusive` works only while no pod exists); \
                 `railnetctl doctor --expect exclusive` checks it",
            ));
        }
        let bdf = conf.device_id.clone().unwrap_or_default();
        let Some(name) = rdma::devices_of_pci(sysfs, &bdf).into_iter().next() else {
            return Err(invalid(
                format!("no RDMA device for PCI address {bdf} (deviceID)"),
                format!(
                    "/sys/bus/pci/devices/{bdf}/infiniband is empty or missing: is the VF bound to its RDMA driver \
                     (mlx5_core with mlx5_ib loaded)? `rdma dev` lists the node's devices"
                ),
            ));
        };
        sriov::must_be_vf(sysfs, &bdf)
            .map_err(|e| invalid(format!("deviceID {bdf} cannot be given to a pod"), e))?;
        let dev = nl
            .device(&name)
            .map_err(|e| dp("looking up the VF's RDMA device", e))?;
        return Ok(RdmaPlan::Isolate(dev));
    }
    if conf.chained() || conf.sriov() {
        // The earlier plugin's interface, or a VF whose RDMA device (if
        // any) stays in the host in shared mode: nothing to check against
        // a master.
        return Ok(RdmaPlan::None);
    }
    let links = nl.links().map_err(|e| dp("listing RDMA devices", e))?;
    if links.is_empty() {
        return Ok(RdmaPlan::None);
    }
    match links
        .iter()
        .find(|p| p.netdev.as_deref() == Some(conf.master.as_str()))
    {
        Some(port) => Ok(RdmaPlan::Shared(port.clone())),
        None => {
            let with: Vec<String> = links
                .iter()
                .filter_map(|p| Some(format!("{} ({}/{})", p.netdev.clone()?, p.device, p.port)))
                .collect();
            Err(invalid(
                format!(
                    "master {} has no RDMA device: pods on network {} would get no RDMA on rail {}",
                    conf.master, conf.name, conf.rail
                ),
                format!(
                    "set \"master\" to a rail NIC with RDMA; on this node: {}",
                    if with.is_empty() {
                        "none in the agent's netns".to_owned()
                    } else {
                        with.join(", ")
                    }
                ),
            ))
        }
    }
}

/// The host-side name of the IPoIB child made for `container_id`'s
/// `ifname` before it is moved into the pod: `rn` and 12 hex digits of a
/// hash of the two.
pub fn ipoib_temp_name(container_id: &str, ifname: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (container_id, ifname).hash(&mut h);
    format!("rn{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Whether `name` is one [`ipoib_temp_name`] makes.
pub fn is_ipoib_temp_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("rn")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Removes IPoIB children an ADD made in the host and never moved into
/// its pod (the agent stopped in between); returns their names. Run
/// before the agent serves: no ADD is between the two steps then.
pub fn sweep_ipoib_leftovers() -> Vec<String> {
    let swept = with_rtnl(|h| async move {
        let mut gone = Vec::new();
        for (name, index) in rtnl::ipoib_links(&h).await.unwrap_or_default() {
            if is_ipoib_temp_name(&name) && h.link().del(index).execute().await.is_ok() {
                gone.push(name);
            }
        }
        gone
    });
    swept.unwrap_or_default()
}

/// Sets `alias` on interface `ifname` in the pod's netns.
fn label_interface(netns: &PodNetns, ifname: &str, alias: &str) -> Result<(), String> {
    let (ifname, alias) = (ifname.to_owned(), alias.to_owned());
    netns
        .run(move || {
            with_rtnl(|h| async move {
                let link = rtnl::link_by_name(&h, &ifname)
                    .await
                    .map_err(|e| describe(&e))?
                    .ok_or_else(|| format!("{ifname} is not in the pod"))?;
                rtnl::set_alias(&h, link.index, &alias)
                    .await
                    .map_err(|e| describe(&e))
            })
            .map_err(|e| e.to_string())?
        })
        .map_err(|e| e.to_string())?
}

impl RailService {
    /// The pins of `container_id`, attaching as this service does.
    fn pins(&self, container_id: &str) -> PodPins {
        PodPins::new(&self.pin_root, container_id).attaching_with(self.tc_attach)
    }

    /// CNI ADD. Must run on a thread of its own (it enters the pod netns on
    /// further threads and blocks on netlink). A Kubernetes pod's rail is
    /// also written where its workload reads it ([`crate::podinfo`]).
    pub fn add(&self, att: &Attachment, netns: &PodNetns) -> Result<AddResult, ApiError> {
        let _gate = self.sweep_gate.read().unwrap_or_else(|p| p.into_inner());
        let result = self.add_rail(att, netns)?;
        let rail = crate::podinfo::RailInfo::of(
            &att.container_id,
            &att.ifname,
            att.netconf["rail"].as_u64().unwrap_or(0) as u32,
            att.netconf["name"].as_str().unwrap_or_default(),
            &result,
        );
        // Best effort, like Multus's device info: the rail works without
        // them; the workload's files say what they have. On the interface
        // (the pod reads it there itself) and, with a pod-info directory,
        // in the pod's directory on the node.
        if let Err(e) = label_interface(netns, &att.ifname, &rail.alias()) {
            tracing::warn!(ifname = %att.ifname, error = %e, "could not write the rail's record on its interface");
        }
        if let (Some(info), Some(uid)) = (&self.pod_info, att.args.get("K8S_POD_UID"))
            && let Err(e) = info.record(uid, &rail)
        {
            tracing::warn!(pod_uid = %uid, ifname = %att.ifname, error = %e, "could not write the pod's rail info");
        }
        Ok(result)
    }

    fn add_rail(&self, att: &Attachment, netns: &PodNetns) -> Result<AddResult, ApiError> {
        let conf = NetConf::parse(att.netconf.to_string().as_bytes())
            .map_err(|e| invalid("invalid network config", e.to_string()))?;
        if !valid_container_id(&att.container_id) {
            return Err(ApiError::new(
                code::INVALID_ENV,
                "invalid CNI_CONTAINERID",
                format!(
                    "{:?}: use letters, digits, '-', '_' and '.'",
                    att.container_id
                ),
            ));
        }
        if !valid_ifname(&att.ifname) {
            return Err(ApiError::new(
                code::INVALID_ENV,
                "invalid CNI_IFNAME",
                format!("{:?}: 1 to 15 bytes, no '/', ':' or spaces", att.ifname),
            ));
        }
        if !conf.master.is_empty()
            && !self.allowed_masters.is_empty()
            && !self
                .allowed_masters
                .iter()
                .any(|m| crate::ipam::wildcard_match(m, &conf.master))
        {
            return Err(invalid(
                format!(
                    "master {} is not one this node allows for rails",
                    conf.master
                ),
                format!(
                    "the node allows {} (chart: agent.allowedMasters); name one of them in network {}",
                    self.allowed_masters.join(", "),
                    conf.name
                ),
            ));
        }
        // ib-kubernetes (when the network waits for it) must have given the
        // pod its GUID: "try again" until it has.
        if let Err(why) = conf.ib_kubernetes_ready() {
            return Err(ApiError::new(
                code::TRY_AGAIN,
                "InfiniBand VF not configured by ib-kubernetes yet",
                why,
            ));
        }
        // RDMA first: a node in the wrong mode or a master without an RDMA
        // device is refused before anything is made.
        let rdma = rdma_plan(&conf, &self.sysfs_root)?;
        // Read once: it takes a thread that enters the pod netns.
        let netns_id = netns.id();
        sweep_can_see(netns_id)?;
        same_netns(&self.ipam, &att.container_id, &att.ifname, netns_id)?;
        // A repeat of an ADD (same container and interface) gets the
        // addresses it holds already: a failure of this ADD must not
        // release what an earlier one made and a pod may be using.
        let held_before = !self
            .ipam
            .addresses_of(&att.container_id, &att.ifname)
            .is_empty();
        let release = || {
            if !held_before {
                let _ = self.ipam.release(&att.container_id, &att.ifname);
            }
        };
        let addrs = match self.allocate(
            &att.container_id,
            &att.ifname,
            &conf.ippools,
            conf.match_master_subnet.then_some(conf.master.as_str()),
            netns_id,
            (
                &conf.name,
                PodIds {
                    namespace: att.args.get("K8S_POD_NAMESPACE").map(String::as_str),
                    name: att.args.get("K8S_POD_NAME").map(String::as_str),
                    uid: att.args.get("K8S_POD_UID").map(String::as_str),
                },
                &conf.requested_ips(),
            ),
        ) {
            Ok(a) => a,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        // A VF is recorded and set up through its PF first: a new GUID
        // rebinds it, which makes its RDMA device anew.
        let mac = conf
            .runtime_config
            .mac
            .as_deref()
            .and_then(crate::netconf::parse_mac);
        let vf = if conf.sriov() {
            match self.prepare_vf(att, &conf, mac) {
                Ok(vf) => Some(vf),
                Err(e) => {
                    release();
                    return Err(e);
                }
            }
        } else {
            None
        };
        let took_vf = vf.is_some();
        let undo_vf = || {
            if took_vf && let Err(e) = self.give_vf_back(&att.container_id, &att.ifname, None) {
                tracing::warn!(error = %e, "could not put the VF back after a failed ADD");
            }
        };
        let rdma = match &vf {
            Some(v) if v.rebound => match rdma_plan(&conf, &self.sysfs_root) {
                Ok(plan) => plan,
                Err(e) => {
                    undo_vf();
                    release();
                    return Err(e);
                }
            },
            _ => rdma,
        };
        // Isolation moves the VF's RDMA device before its interface is
        // wired: a driver that cannot move it (EOPNOTSUPP) leaves nothing
        // to undo but the VF's settings and the addresses.
        if let RdmaPlan::Isolate(dev) = &rdma {
            // Recorded before the move: if the agent dies right after it,
            // DEL (or the next agent) still knows the device to restore —
            // the kernel returns it, maybe renamed, when the netns dies.
            let record = sriov::RdmaRecord {
                pci_address: conf.device_id.clone().unwrap_or_default(),
                device: dev.name.clone(),
                holder: sriov::Holder::of(&att.args, &att.container_id, &att.ifname),
                netns_inode: netns_id.inode,
            };
            if let Err(e) = sriov::save(
                &self.vf_records,
                "rdma",
                &att.container_id,
                &att.ifname,
                &record,
            ) {
                undo_vf();
                release();
                return Err(ApiError::new(
                    code::IO,
                    format!("cannot record RDMA device {} before moving it", dev.name),
                    format!("{e}; without the record a crash would leave it unrestorable"),
                ));
            }
            if let Err(e) = rdma::isolate(dev, netns) {
                sriov::forget(&self.vf_records, "rdma", &att.container_id, &att.ifname);
                undo_vf();
                release();
                return Err(ApiError::new(
                    code::DATAPLANE,
                    format!("RDMA isolation of {} failed", dev.name),
                    e.to_string(),
                ));
            }
            tracing::info!(device = %dev.name, ifname = %att.ifname, "RDMA device moved into the pod netns");
        }
        // Moving an InfiniBand VF's RDMA device makes its IPoIB netdev anew
        // in the host: the VF's netdev is looked up again before it moves.
        let vf = match (vf, &rdma) {
            (Some(_), RdmaPlan::Isolate(_)) if conf.ib_sriov() => {
                match self.vf_again(
                    conf.device_id.as_deref().unwrap_or_default(),
                    "its RDMA device moved",
                ) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        if let Err(back) = rdma::give_back(netns, &att.ifname) {
                            tracing::warn!(error = %back, "could not return the RDMA device after a failed ADD");
                        }
                        undo_vf();
                        release();
                        return Err(e);
                    }
                }
            }
            (vf, _) => vf,
        };
        match self.wire(att, &conf, netns, netns_id, addrs, vf.as_ref()) {
            Ok(mut result) => {
                let v4 = result.ips.iter().find_map(|ip| match ip.address {
                    IpNet::V4(a) => Some(a.addr()),
                    IpNet::V6(_) => None,
                });
                result.rdma = match &rdma {
                    RdmaPlan::None => None,
                    RdmaPlan::Shared(port) => Some(RailRdma {
                        device: port.device.clone(),
                        port: port.port,
                        pci_address: pci_address_of_netdev(&conf.master),
                        gid_index: v4
                            .and_then(|a| rdma::roce_gid_index(&port.device, port.port, a)),
                        isolated: false,
                    }),
                    RdmaPlan::Isolate(dev) => Some(RailRdma {
                        device: dev.name.clone(),
                        port: 1,
                        pci_address: conf.device_id.clone(),
                        // Its sysfs is visible only inside the pod now, so
                        // the GID table is read there. An InfiniBand port
                        // has no RoCE GIDs (NCCL uses its GID 0).
                        gid_index: match v4 {
                            Some(a) if !conf.ib_sriov() => {
                                rdma::roce_gid_index_in(netns.fd().as_fd(), &dev.name, 1, a)
                                    .unwrap_or_else(|e| {
                                        tracing::warn!(device = %dev.name, error = %e, "could not read the isolated device's GID table");
                                        None
                                    })
                            }
                            _ => None,
                        },
                        isolated: true,
                    }),
                };
                if let (RdmaPlan::Shared(_), Some(r)) = (&rdma, &result.rdma) {
                    tracing::info!(
                        container = %att.container_id,
                        ifname = %att.ifname,
                        device = %r.device,
                        port = r.port,
                        gid_index = ?r.gid_index,
                        master = %conf.master,
                        "pod shares the master's RDMA device"
                    );
                }
                Ok(result)
            }
            Err(e) => {
                if matches!(rdma, RdmaPlan::Isolate(_))
                    && let Err(back) = rdma::give_back(netns, &att.ifname)
                {
                    tracing::warn!(error = %back, "could not return the RDMA device after a failed ADD");
                }
                release();
                Err(e)
            }
        }
    }

    /// Modes sriov and ib-sriov, before anything else changes: records what
    /// the VF netdev of `deviceID` looks like and what its PF says of it,
    /// then sets what goes through the PF (VLAN, MAC, link state, GUIDs).
    /// A new GUID takes effect only when the VF's driver probes it again,
    /// so the VF is rebound, which makes its netdev and RDMA device anew —
    /// hence before RDMA isolation. On error nothing is left changed.
    fn prepare_vf(
        &self,
        att: &Attachment,
        conf: &NetConf,
        mac: Option<[u8; 6]>,
    ) -> Result<PreparedVf, ApiError> {
        let bdf = conf.device_id.clone().unwrap_or_default();
        sriov::must_be_vf(&self.sysfs_root, &bdf)
            .map_err(|e| invalid(format!("deviceID {bdf} cannot be given to a pod"), e))?;
        let vf = sriov::vf_netdev(&self.sysfs_root, &bdf)
            .map_err(|e| invalid(format!("VF {bdf} (deviceID) cannot be used"), e))?;
        // VF attributes go through the PF: find it before changing anything.
        let mut settings = conf
            .vf_settings()
            .map_err(|e| invalid("VF attributes", e.to_string()))?;
        // A MAC the pod asks for goes through the PF too: with spoof
        // checking on, the NIC drops frames from any other MAC.
        settings.mac = mac;
        let pf_side = if settings.is_empty() && settings.mac.is_none() {
            None
        } else {
            match sriov::pf_of(&self.sysfs_root, &bdf) {
                Ok(pf) => Some(pf),
                // A MAC alone needs no PF to work without spoof checking.
                Err(e) if settings.is_empty() => {
                    tracing::info!(vf = %bdf, why = %e, "no PF found: the MAC is set on the VF netdev only");
                    None
                }
                Err(e) => {
                    return Err(invalid(
                        format!(
                            "VF {bdf}: vlan, spoofchk, trust, link_state and GUIDs are set through its PF"
                        ),
                        e,
                    ));
                }
            }
        };
        let records = self.vf_records.clone();
        let holder = sriov::Holder::of(&att.args, &att.container_id, &att.ifname);
        let cid = att.container_id.clone();
        let ifname = att.ifname.clone();
        let ib = conf.ib_sriov();
        let vf_name = vf.clone();
        let bdf2 = bdf.clone();
        let prepared = with_rtnl(|h| async move {
            let (vf, bdf) = (vf_name, bdf2);
            let dp = |msg: String, details: String| ApiError::new(code::DATAPLANE, msg, details);
            let Some(link) = rtnl::link_by_name(&h, &vf)
                .await
                .map_err(|e| dp(format!("looking up VF netdev {vf}"), describe(&e)))?
            else {
                return Err(invalid(
                    format!("VF netdev {vf} of {bdf} is not in the agent's netns"),
                    "another pod may hold it: the device plugin should not hand out one VF twice",
                ));
            };
            let own_guid = sriov::ipoib_guid(&link.mac);
            if ib && !settings.sets_guid() && matches!(own_guid, Some(0) | Some(u64::MAX)) {
                return Err(invalid(
                    format!("InfiniBand VF {vf} ({bdf}) has no GUID"),
                    "give it one: runtimeConfig.infinibandGUID (ib-kubernetes sets it), \"guid\" in the network, \
                     or on the node `ip link set <pf> vf N node_guid G` and `… port_guid G`",
                ));
            }
            // The PF's view of the VF, for DEL to put back what ADD changes.
            let mut pf = None;
            if let Some((pf_name, vf_number)) = &pf_side {
                let pf_link = rtnl::link_by_name(&h, pf_name)
                    .await
                    .map_err(|e| dp(format!("looking up PF {pf_name}"), describe(&e)))?
                    .ok_or_else(|| {
                        invalid(
                            format!("PF {pf_name} of VF {bdf} is not in the agent's netns"),
                            "the agent runs in the host network namespace (hostNetwork)",
                        )
                    })?;
                let mut was = rtnl::vf_settings(&h, pf_link.index, *vf_number)
                    .await
                    .map_err(|e| dp(format!("reading VF {vf_number} of PF {pf_name}"), describe(&e)))?
                    .ok_or_else(|| {
                        invalid(
                            format!("PF {pf_name} lists no VF {vf_number} ({bdf})"),
                            "its driver reports no VFs: is SR-IOV enabled (sriov_numvfs)?",
                        )
                    })?;
                // A driver that does not report GUIDs: the VF's own address
                // holds its port GUID (ib-sriov-cni reads it there too).
                if was.port_guid.is_none() {
                    was.port_guid = own_guid;
                }
                if was.node_guid.is_none() {
                    was.node_guid = own_guid;
                }
                pf = Some((pf_link.index, sriov::PfSide {
                    pf: pf_name.clone(),
                    vf: *vf_number,
                    was: sriov::restore_of(&settings, &was),
                }));
            }
            let record = sriov::VfRecord {
                pci_address: bdf.clone(),
                name: vf.clone(),
                mac: link.mac.clone(),
                mtu: link.mtu,
                pf: pf.as_ref().map(|(_, side)| side.clone()),
                holder,
            };
            sriov::save(&records, "vf", &cid, &ifname, &record)
                .map_err(|e| dp(format!("recording VF {vf} before moving it"), e.to_string()))?;
            if let Some((pf_index, side)) = &pf {
                for req in rtnl::vf_requests(*pf_index, side.vf, &settings) {
                    if let Err(e) = h.link().set(req).execute().await {
                        // Put back whatever went through before the refusal.
                        for undo in rtnl::vf_requests(*pf_index, side.vf, &side.was) {
                            let _ = h.link().set(undo).execute().await;
                        }
                        sriov::forget(&records, "vf", &cid, &ifname);
                        let why = match errno(&e) {
                            Some(libc::EOPNOTSUPP) => format!(
                                "the driver of PF {} cannot set them (EOPNOTSUPP); set only what it supports, or use a NIC whose driver does",
                                side.pf
                            ),
                            _ => describe(&e),
                        };
                        return Err(ApiError::new(
                            code::DATAPLANE,
                            format!("setting VF {} attributes through PF {}", side.vf, side.pf),
                            why,
                        ));
                    }
                }
            }
            Ok(PreparedVf {
                name: vf,
                index: link.index,
                mtu: link.mtu,
                rebound: false,
            })
        })
        .map_err(|e| ApiError::new(code::DATAPLANE, "rtnetlink", e.to_string()))??;
        if !settings.sets_guid() {
            return Ok(prepared);
        }
        sriov::rebind(&self.sysfs_root, &bdf, std::time::Duration::from_secs(10))
            .map_err(|e| {
                ApiError::new(
                    code::DATAPLANE,
                    format!("rebinding VF {bdf} for its new GUID"),
                    e,
                )
            })
            .and_then(|_| self.vf_again(&bdf, "its driver was rebound"))
            .map(|vf| PreparedVf {
                rebound: true,
                ..vf
            })
            .inspect_err(|_| {
                if let Err(undo) = self.give_vf_back(&att.container_id, &att.ifname, None) {
                    tracing::warn!(error = %undo, "could not put the VF back after a failed rebind");
                }
            })
    }

    /// VF `bdf`'s netdev as it is now, made anew `after` something (its
    /// driver's rebind, its RDMA device's move): waits up to 10 s for sysfs
    /// to list it, then looks it up.
    fn vf_again(&self, bdf: &str, after: &str) -> Result<PreparedVf, ApiError> {
        let found =
            sriov::wait_for_netdev(&self.sysfs_root, bdf, std::time::Duration::from_secs(10))
                .and_then(|name| {
                    let n = name.clone();
                    with_rtnl(|h| async move { rtnl::link_by_name(&h, &n).await })
                        .map_err(|e| e.to_string())?
                        .map_err(|e| describe(&e))?
                        .map(|link| PreparedVf {
                            name: name.clone(),
                            index: link.index,
                            mtu: link.mtu,
                            rebound: false,
                        })
                        .ok_or_else(|| format!("{name} is not in the agent's netns"))
                });
        found.map_err(|why| {
            ApiError::new(
                code::DATAPLANE,
                format!("VF {bdf}'s netdev did not come back after {after}"),
                why,
            )
        })
    }

    /// Modes sriov and ib-sriov, after [`Self::prepare_vf`]: moves the VF
    /// netdev into the pod under the pod's interface name (with the MTU
    /// and MAC asked for) in one request. Returns its MTU. On error the VF
    /// is put back as it was.
    fn move_vf(
        &self,
        att: &Attachment,
        conf: &NetConf,
        netns: &PodNetns,
        vf: &PreparedVf,
        mac: Option<[u8; 6]>,
    ) -> Result<u32, ApiError> {
        let ifname = att.ifname.clone();
        let want_mtu = conf.mtu;
        let netns_fd = std::os::fd::AsRawFd::as_raw_fd(netns.fd());
        let (index, name, mtu) = (vf.index, vf.name.clone(), vf.mtu);
        let moved = with_rtnl(|h| async move {
            let mut msg = LinkUnspec::new_with_index(index)
                .down()
                .setns_by_fd(netns_fd)
                .name(ifname.clone());
            if let Some(m) = want_mtu {
                msg = msg.mtu(m);
            }
            if let Some(m) = mac {
                msg = msg.address(m.to_vec());
            }
            h.link()
                .set(msg.build())
                .execute()
                .await
                .map_err(|e| match errno(&e) {
                    Some(libc::EEXIST) => ApiError::new(
                        code::DATAPLANE,
                        format!("interface {ifname} already exists in the pod netns"),
                        "pick another CNI_IFNAME for this network",
                    ),
                    _ => ApiError::new(
                        code::DATAPLANE,
                        format!("moving VF {name} into the pod as {ifname}"),
                        describe(&e),
                    ),
                })
        })
        .map_err(|e| ApiError::new(code::DATAPLANE, "rtnetlink", e.to_string()))?;
        if let Err(e) = moved {
            if let Err(undo) = self.give_vf_back(&att.container_id, &att.ifname, None) {
                tracing::warn!(error = %undo, "could not put the VF back after a failed move");
            }
            return Err(e);
        }
        Ok(want_mtu.unwrap_or(mtu))
    }

    /// Mode sriov, DEL: moves the pod's VF back to the agent's netns under
    /// its old name (from inside the pod, where the kernel finds it) and
    /// restores its MTU and MAC. Without a netns the kernel has returned
    /// the VF already (possibly renamed): it is found by PCI address.
    fn give_vf_back(
        &self,
        container_id: &str,
        ifname: &str,
        netns: Option<&PodNetns>,
    ) -> Result<(), String> {
        let Some(record) =
            sriov::load::<sriov::VfRecord>(&self.vf_records, "vf", container_id, ifname)
        else {
            return Ok(()); // never taken, or already returned
        };
        if let Some(ns) = netns {
            let host = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("opening the agent's netns: {e}"))?;
            let ifname = ifname.to_owned();
            let name = record.name.clone();
            ns.run(move || {
                with_rtnl(|h| async move {
                    let host_fd = std::os::fd::AsRawFd::as_raw_fd(&host);
                    match rtnl::link_by_name(&h, &ifname).await {
                        Ok(Some(link)) => h
                            .link()
                            .set({
                                let mut back = LinkUnspec::new_with_index(link.index)
                                    .down()
                                    .setns_by_fd(host_fd)
                                    .name(name.clone())
                                    .build();
                                // The pod's rail record does not go with it.
                                back.attributes.push(
                                    rtnetlink::packet_route::link::LinkAttribute::IfAlias(
                                        String::new(),
                                    ),
                                );
                                back
                            })
                            .execute()
                            .await
                            .map_err(|e| {
                                format!(
                                    "moving {ifname} back to the host as {name}: {}",
                                    describe(&e)
                                )
                            }),
                        Ok(None) => Ok(()),
                        Err(e) => Err(format!("looking up {ifname}: {}", describe(&e))),
                    }
                })
                .map_err(|e| e.to_string())?
            })
            .map_err(|e| e.to_string())??;
        }
        // The PF's view of the VF first (a GUID put back rebinds the VF,
        // making its netdev anew). Best effort: a PF that refuses (or is
        // gone) must not keep the pod in Terminating; the VF comes back
        // either way.
        if let Some(side) = record.pf.clone() {
            let restored = with_rtnl(|h| async move {
                match rtnl::link_by_name(&h, &side.pf).await {
                    Ok(Some(pf)) => {
                        for req in rtnl::vf_requests(pf.index, side.vf, &side.was) {
                            h.link()
                                .set(req)
                                .execute()
                                .await
                                .map_err(|e| describe(&e))?;
                        }
                        Ok(())
                    }
                    Ok(None) => Err("the PF is gone".to_owned()),
                    Err(e) => Err(describe(&e)),
                }
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            let pf = record.pf.as_ref().expect("some");
            match restored {
                Err(why) => {
                    tracing::warn!(pf = %pf.pf, vf = pf.vf, %why,
                        "VF attributes not restored through the PF; the next pod's ADD sets its own");
                }
                Ok(()) if pf.was.sets_guid() => {
                    if let Err(e) = sriov::rebind(
                        &self.sysfs_root,
                        &record.pci_address,
                        std::time::Duration::from_secs(10),
                    ) {
                        tracing::warn!(vf = %record.pci_address, error = %e,
                            "VF not rebound after its GUID was put back; it keeps the pod's GUID until its driver probes it again");
                    }
                }
                Ok(()) => {}
            }
        }
        let current = sriov::vf_netdev(&self.sysfs_root, &record.pci_address).ok();
        let rec = record.clone();
        with_rtnl(|h| async move {
            let link = match rtnl::link_by_name(&h, &rec.name).await {
                Ok(Some(l)) => Some(l),
                _ => match &current {
                    Some(now) => rtnl::link_by_name(&h, now).await.ok().flatten(),
                    None => None,
                },
            };
            let Some(link) = link else {
                return Err(format!(
                    "VF {} ({}) is not back in the host",
                    rec.name, rec.pci_address
                ));
            };
            let mut msg = LinkUnspec::new_with_index(link.index)
                .down()
                .name(rec.name.clone())
                .mtu(rec.mtu);
            if let Some(mac) = sriov::mac_bytes(&rec.mac) {
                msg = msg.address(mac.to_vec());
            }
            h.link()
                .set(msg.build())
                .execute()
                .await
                .map_err(|e| format!("restoring VF {}: {}", rec.name, describe(&e)))
        })
        .map_err(|e| e.to_string())??;
        sriov::forget(&self.vf_records, "vf", container_id, ifname);
        Ok(())
    }

    /// IPAM only: addresses for an interface another plugin makes.
    pub fn ipam_add(
        &self,
        req: &IpamRequest,
        netns: Option<&PodNetns>,
    ) -> Result<IpamResult, ApiError> {
        check_ids(&req.container_id, &req.ifname)?;
        let _gate = self.sweep_gate.read().unwrap_or_else(|p| p.into_inner());
        let netns_id = netns.map(PodNetns::id).unwrap_or_default();
        sweep_can_see(netns_id)?;
        same_netns(&self.ipam, &req.container_id, &req.ifname, netns_id)?;
        let addrs = match self.allocate(
            &req.container_id,
            &req.ifname,
            &req.ippools,
            req.match_master.as_deref(),
            netns_id,
            (
                &req.network,
                PodIds {
                    namespace: req.namespace.as_deref(),
                    name: req.pod_name.as_deref(),
                    uid: req.pod_uid.as_deref(),
                },
                &req.ips,
            ),
        ) {
            Ok(a) => a,
            Err(e) => {
                let _ = self.ipam.release(&req.container_id, &req.ifname);
                return Err(e);
            }
        };
        let mut ips = Vec::new();
        if let Some(v4) = addrs.v4 {
            ips.push(ResultIp {
                address: IpNet::V4(v4),
                gateway: addrs.gw4.map(IpAddr::V4),
            });
        }
        if let Some(v6) = addrs.v6 {
            ips.push(ResultIp {
                address: IpNet::V6(v6),
                gateway: addrs.gw6.map(IpAddr::V6),
            });
        }
        let routes = addrs
            .extra_routes
            .iter()
            .map(|(dst, gw)| ResultRoute {
                dst: *dst,
                gw: Some(*gw),
                priority: 0,
            })
            .collect();
        Ok(IpamResult { ips, routes })
    }

    /// CNI CHECK: the interface is in the pod, up, with the addresses IPAM
    /// holds for it, as ADD reported it (`prevResult`: addresses, MAC,
    /// routes; see [`crate::check`]), and (eBPF mode) the program is
    /// attached to it.
    pub fn check(&self, att: &Attachment, netns: &PodNetns) -> Result<(), ApiError> {
        let conf = NetConf::parse(att.netconf.to_string().as_bytes())
            .map_err(|e| invalid("invalid network config", e.to_string()))?;
        check_ids(&att.container_id, &att.ifname)?;
        let held = self.ipam.addresses_of(&att.container_id, &att.ifname);
        if held.is_empty() {
            return Err(ApiError::new(
                code::UNKNOWN_CONTAINER,
                format!("no address is held for {}/{}", att.container_id, att.ifname),
                "was ADD run for this container and interface?",
            ));
        }
        let ifname = att.ifname.clone();
        let found = netns
            .run(move || {
                with_rtnl(|h| async move {
                    let Some(link) = rtnl::link_by_name(&h, &ifname)
                        .await
                        .map_err(|e| describe(&e))?
                    else {
                        return Ok(None);
                    };
                    let networks = rtnl::networks(&h, link.index)
                        .await
                        .map_err(|e| describe(&e))?;
                    let routes = rtnl::routes_on(&h, link.index)
                        .await
                        .map_err(|e| describe(&e))?;
                    Ok::<_, String>(Some(crate::check::Observed {
                        up: link.up,
                        mac: link.mac,
                        networks,
                        routes,
                    }))
                })
            })
            .map_err(|e| ApiError::new(code::DATAPLANE, "entering the pod netns", e.to_string()))?
            .map_err(|e| ApiError::new(code::DATAPLANE, "rtnetlink", e.to_string()))?
            .map_err(|e| ApiError::new(code::DATAPLANE, "reading the pod's interface", e))?;
        let Some(seen) = found else {
            return Err(ApiError::new(
                code::DATAPLANE,
                format!("interface {} is missing from the pod", att.ifname),
                "something removed it after ADD; delete and re-create the pod",
            ));
        };
        crate::check::compare(&att.ifname, &held, att.netconf.get("prevResult"), &seen)?;
        if conf.routing == Routing::Ebpf && held.iter().any(IpAddr::is_ipv4) {
            let pin = self
                .pin_root
                .join(&att.container_id)
                .join("links")
                .join(&att.ifname);
            if !pin.exists() {
                return Err(ApiError::new(
                    code::DATAPLANE,
                    format!("the rail program is not attached to {}", att.ifname),
                    format!("{} is missing; rail traffic is not steered", pin.display()),
                ));
            }
        }
        Ok(())
    }

    /// Finishes the DELs the CNI left while the agent was away. Returns how
    /// many were finished; a tombstone that cannot be finished stays.
    pub fn finish_tombstones(&self, dir: &std::path::Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut done = 0;
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let att: Attachment = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(a) => a,
                Err(why) => {
                    tracing::warn!(tombstone = %path.display(), %why, "unreadable DEL tombstone left in place");
                    continue;
                }
            };
            // The pod's netns is gone or going: only pins and addresses are
            // left to undo.
            match self.del(&att, None) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&path);
                    done += 1;
                }
                Err(e) => {
                    tracing::warn!(tombstone = %path.display(), error = %e, "DEL tombstone not finished yet")
                }
            }
        }
        done
    }

    /// CNI GC: releases every allocation of `req.network` whose attachment
    /// is not in the valid list, and removes its pins. Returns how many.
    pub fn gc(&self, req: &GcRequest) -> Result<usize, ApiError> {
        let valid: std::collections::HashSet<(&str, &str)> = req
            .valid
            .iter()
            .map(|(c, i)| (c.as_str(), i.as_str()))
            .collect();
        // An attachment whose pod netns is still alive is a live pod's,
        // whatever the list says: an empty or short list (a runtime's bug,
        // or a caller that is no runtime) must not take a running pod's
        // addresses. Its DEL, or the sweep once the netns is gone, does.
        let live = crate::netns::LiveNetns::scan();
        let kept = std::sync::Mutex::new(Vec::new());
        let released = self
            .ipam
            .release_where_allocation(|a| {
                let stale = a.network == req.network
                    && !valid.contains(&(a.key.container_id.as_str(), a.key.ifname.as_str()));
                if stale && a.netns_inode != 0 && live.contains(a.netns()) {
                    kept.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{}/{}", a.key.container_id, a.key.ifname));
                    return false;
                }
                stale
            })
            .map_err(|e| ApiError::new(code::IO, "GC", e.to_string()))?;
        let kept = kept.into_inner().unwrap_or_else(|p| p.into_inner());
        if !kept.is_empty() {
            tracing::warn!(network = %req.network, attachments = ?kept, "GC: not releasing attachments whose pod netns is alive");
        }
        for a in &released {
            if valid_container_id(&a.key.container_id) {
                let _ = self.pins(&a.key.container_id).detach(&a.key.ifname, None);
            }
        }
        if let Some(info) = &self.pod_info
            && !released.is_empty()
        {
            let _ = info.forget_matching(None, |r| {
                released
                    .iter()
                    .any(|a| a.key.container_id == r.container_id && a.key.ifname == r.interface)
            });
        }
        Ok(released.len())
    }

    /// IPAM only: release.
    pub fn ipam_del(&self, req: &IpamRequest) -> Result<(), ApiError> {
        check_ids(&req.container_id, &req.ifname)?;
        self.ipam
            .release(&req.container_id, &req.ifname)
            .map(|_| ())
            .map_err(|e| ApiError::new(code::IO, "IPAM release", e.to_string()))
    }

    /// One address per family the network has pools for.
    fn allocate(
        &self,
        container_id: &str,
        ifname: &str,
        ippools: &crate::netconf::IpPools,
        match_master: Option<&str>,
        netns: NetnsId,
        // The network, the pod, and the addresses it asked for.
        (network, pod, requested): (&str, PodIds<'_>, &[IpAddr]),
    ) -> Result<RailAddresses, ApiError> {
        let namespace = pod.namespace;
        let owner = crate::ipam::cluster::Owner {
            netns,
            network: network.to_owned(),
            pod_namespace: pod.namespace.unwrap_or_default().to_owned(),
            pod_name: pod.name.unwrap_or_default().to_owned(),
            pod_uid: pod.uid.unwrap_or_default().to_owned(),
        };
        let master_addresses = if let Some(master) = match_master {
            let name = master.to_owned();
            let addrs = with_rtnl(|h| async move {
                match rtnl::link_by_name(&h, &name).await {
                    Ok(Some(l)) => rtnl::networks(&h, l.index)
                        .await
                        .map(Some)
                        .map_err(|e| describe(&e)),
                    Ok(None) => Ok(None),
                    Err(e) => Err(describe(&e)),
                }
            })
            .map_err(|e| ApiError::new(code::DATAPLANE, "rtnetlink", e.to_string()))?
            .map_err(|e| ApiError::new(code::DATAPLANE, "reading the master's addresses", e))?;
            // A master that is not there is the config's fault, not the
            // pools': said as without matchMasterSubnet.
            let Some(addrs) = addrs else {
                return Err(ApiError::new(
                    code::INVALID_CONFIG,
                    format!("master {master:?} not found on this node"),
                    "set \"master\" to one of the node's rail NICs (`ip link` lists them)",
                ));
            };
            Some(addrs)
        } else {
            None
        };
        let mut addrs = RailAddresses::default();
        let pools = self.ipam.pools();
        for (patterns, family) in [(&ippools.ipv4, Family::V4), (&ippools.ipv6, Family::V6)] {
            if patterns.is_empty() {
                continue;
            }
            let candidates = crate::ipam::select(
                &pools,
                &PoolRequest {
                    patterns,
                    family,
                    node: &self.node_name,
                    namespace,
                    network,
                    master_addresses: master_addresses.as_deref(),
                },
            );
            let key = AllocationKey {
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
                family,
            };
            // An address the pod asked for (runtimeConfig.ips), else the
            // next free one.
            let wanted = requested
                .iter()
                .find(|a| a.is_ipv6() == (family == Family::V6));
            let alloc = self
                .ipam
                .allocate_owned(key, &candidates, wanted.copied(), &owner)
                .map_err(|e| match e {
                    // The API server is away: the runtime tries again.
                    IpamError::Unavailable(_) => {
                        ApiError::new(code::TRY_AGAIN, "IPAM", e.to_string())
                    }
                    _ => ApiError::new(code::POOL_EXHAUSTED, "IPAM", e.to_string()),
                })?;
            // A repeated ADD may name a pool removed since (its address
            // is still held): say so rather than guess its subnet.
            let Some(pool) = pools.get(&alloc.pool) else {
                return Err(ApiError::new(
                    code::POOL_EXHAUSTED,
                    "IPAM",
                    format!(
                        "{} is held from pool {}, which no longer exists; delete the pod",
                        alloc.address, alloc.pool
                    ),
                ));
            };
            let net = IpNet::new(alloc.address, pool.subnet.prefix_len())
                .expect("prefix comes from a valid subnet");
            let routes = pool.routes.iter().map(|r| (r.dst.trunc(), r.gw));
            addrs.extra_routes.extend(routes);
            match (net, pool.gateway) {
                (IpNet::V4(n), gw) => {
                    addrs.v4 = Some(n);
                    addrs.gw4 = match gw {
                        Some(IpAddr::V4(g)) => Some(g),
                        _ => None,
                    };
                }
                (IpNet::V6(n), gw) => {
                    addrs.v6 = Some(n);
                    addrs.gw6 = match gw {
                        Some(IpAddr::V6(g)) => Some(g),
                        _ => None,
                    };
                }
            }
        }
        Ok(addrs)
    }

    fn wire(
        &self,
        att: &Attachment,
        conf: &NetConf,
        netns: &PodNetns,
        netns_id: NetnsId,
        addrs: RailAddresses,
        vf: Option<&PreparedVf>,
    ) -> Result<AddResult, ApiError> {
        let dp = |msg: &str, details: String| ApiError::new(code::DATAPLANE, msg, details);
        // Node side: the master lives in the agent's netns (hostNetwork).
        let ifname = att.ifname.clone();
        let master = conf.master.clone();
        let want_mtu = conf.mtu;
        let netns_fd = std::os::fd::AsRawFd::as_raw_fd(netns.fd());
        let node_started = std::time::Instant::now();
        let chained = conf.chained();
        let ipvlan = conf.mode == "ipvlan";
        let ipoib = conf.ipoib();
        let pkey = conf.pkey.as_ref().and_then(crate::netconf::parse_pkey);
        // An IPoIB child is made in the host (where its parent is) under a
        // name of its own, then moved in under the pod's.
        let temp_name = ipoib_temp_name(&att.container_id, &att.ifname);
        let kind = conf.mode.clone();
        let mac = conf
            .runtime_config
            .mac
            .as_deref()
            .and_then(crate::netconf::parse_mac);
        // Chained: the interface is there already, made by an earlier
        // plugin; its MTU is whatever that plugin set (0: read it in the pod).
        let sriov = conf.sriov();
        let mtu = if chained {
            0
        } else if let Some(vf) = vf {
            self.move_vf(att, conf, netns, vf, mac)?
        } else {
            with_rtnl(|h| async move {
                let Some(m) = rtnl::link_by_name(&h, &master)
                    .await
                    .map_err(|e| dp("master lookup failed", describe(&e)))?
                else {
                    return Err(invalid(
                        format!("master {master:?} not found on this node"),
                        "set \"master\" to one of the node's rail NICs (`ip link` lists them)",
                    ));
                };
                let mtu = want_mtu.unwrap_or(m.mtu);
                if mtu < railnet_common::MIN_RAIL_MTU {
                    return Err(invalid(
                        format!(
                            "master {master}'s mtu {mtu} is below {}",
                            railnet_common::MIN_RAIL_MTU
                        ),
                        "rails need an MTU of at least 1280; raise the rail NIC's MTU",
                    ));
                }
                if mtu > m.mtu {
                    return Err(invalid(
                        format!("mtu {mtu} is above master {master}'s mtu {}", m.mtu),
                        "lower \"mtu\" or raise the rail NIC's MTU",
                    ));
                }
                if ipoib {
                    let Some((parent_pkey, parent_mode)) = m.ipoib else {
                        return Err(invalid(
                            format!("master {master} is not an IPoIB interface"),
                            "mode \"ipoib\" makes a child of an InfiniBand port's netdev (e.g. ib0; \
                             `ip -d link show` says ipoib); for a RoCE NIC use mode \"macvlan\"",
                        ));
                    };
                    // A child of this very attachment left in the host
                    // (the agent died between making and moving it): it
                    // goes, or the name is taken.
                    if let Ok(Some(old)) = rtnl::link_by_name(&h, &temp_name).await
                        && old.ipoib.is_some()
                    {
                        tracing::warn!(child = %temp_name, "removing an IPoIB child a crashed ADD left in the host");
                        let _ = h.link().del(old.index).execute().await;
                    }
                    // The network's partition, else the parent's; the
                    // parent's mode (datagram or connected).
                    let req = rtnl::ipoib_request(
                        m.index,
                        &temp_name,
                        pkey.unwrap_or(parent_pkey),
                        parent_mode,
                    );
                    h.link().add(req).execute().await.map_err(|e| match errno(&e) {
                        Some(libc::EOPNOTSUPP) => invalid(
                            "this kernel cannot make IPoIB children",
                            "load ib_ipoib (modprobe ib_ipoib)",
                        ),
                        _ => dp(&format!("creating the IPoIB child of {master}"), describe(&e)),
                    })?;
                    let child = rtnl::link_by_name(&h, &temp_name)
                        .await
                        .ok()
                        .flatten()
                        .ok_or_else(|| {
                            dp(
                                &format!("the IPoIB child {temp_name} of {master}"),
                                "made, then not found".to_owned(),
                            )
                        })?;
                    let moved = h
                        .link()
                        .set(
                            LinkUnspec::new_with_index(child.index)
                                .down()
                                .setns_by_fd(netns_fd)
                                .name(ifname.clone())
                                .mtu(mtu)
                                .build(),
                        )
                        .execute()
                        .await;
                    if let Err(e) = moved {
                        let _ = h.link().del(child.index).execute().await;
                        return Err(match errno(&e) {
                            Some(libc::EEXIST) => ApiError::new(
                                code::DATAPLANE,
                                format!("interface {ifname} already exists in the pod netns"),
                                "pick another CNI_IFNAME for this network",
                            ),
                            _ => dp(
                                &format!("moving the IPoIB child into the pod as {ifname}"),
                                describe(&e),
                            ),
                        });
                    }
                    return Ok(mtu);
                }
                // macvlan (bridge) for RoCE NICs; ipvlan (l2) where the NIC
                // or the switch allows one MAC only.
                let msg = if ipvlan {
                    LinkIpVlan::new(&ifname, m.index, IpVlanMode::L2)
                        .mtu(mtu)
                        .setns_by_fd(netns_fd)
                        .build()
                } else {
                    let builder = LinkMacVlan::new(&ifname, m.index, MacVlanMode::Bridge)
                        .mtu(mtu)
                        .setns_by_fd(netns_fd);
                    // The pod's own MAC (runtimeConfig.mac), checked at parse.
                    match mac {
                        Some(mac) => builder.address(mac.to_vec()).build(),
                        None => builder.build(),
                    }
                };
                h.link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(|e| match errno(&e) {
                        Some(libc::EEXIST) => ApiError::new(
                            code::DATAPLANE,
                            format!("interface {ifname} already exists in the pod netns"),
                            "pick another CNI_IFNAME for this network",
                        ),
                        Some(libc::EOPNOTSUPP) if ipvlan => invalid(
                            "this kernel has no ipvlan",
                            "load the ipvlan module (modprobe ipvlan) or use mode \"macvlan\"",
                        ),
                        _ => dp(&format!("creating the {kind} interface"), describe(&e)),
                    })?;
                Ok(mtu)
            })
            .map_err(|e| dp("rtnetlink", e.to_string()))??
        };

        tracing::debug!(ifname = %att.ifname, node_side_us = node_started.elapsed().as_micros() as u64, "node side of ADD");
        // Pod side: everything else, then the program.
        let plan = PodRail {
            ifname: att.ifname.clone(),
            rail: conf.rail,
            addrs,
            rdma_cidrs: conf.rdma_cidrs.clone(),
            routing: conf.routing,
            mtu,
            netns: netns_id,
            pins: self.pins(&att.container_id),
            detect: (conf.detect_ip_conflict, conf.detect_gateway),
            ethernet: !conf.ipoib(),
        };
        let pod_side = netns
            .run(move || plan.configure())
            .map_err(|e| dp("entering the pod netns", e.to_string()))?;
        match pod_side {
            Ok(result) => Ok(result),
            Err(e) => {
                // Undo: the macvlan (and with it its addresses, routes and
                // TCX link) goes; pins and rules of this interface go.
                let ifname = att.ifname.clone();
                let pins = self.pins(&att.container_id);
                let ours = self.ipam.addresses_of(&att.container_id, &att.ifname);
                let _ = netns.run(move || {
                    let _ = pins.detach(&ifname, None);
                    let _ = with_rtnl(|h| async move {
                        if chained || sriov {
                            strip_rail(&h, &ifname, &ours).await
                        } else {
                            remove_rail(&h, &ifname).await
                        }
                    });
                });
                if sriov
                    && let Err(back) =
                        self.give_vf_back(&att.container_id, &att.ifname, Some(netns))
                {
                    tracing::warn!(error = %back, "could not return the VF after a failed ADD");
                }
                Err(e)
            }
        }
    }

    /// CNI DEL: idempotent, best effort; releases the address even when the
    /// netns is gone, and forgets the rail in the pod's rail info. Returns
    /// the errors it met but kept going past.
    pub fn del(&self, att: &Attachment, netns: Option<&PodNetns>) -> Result<(), ApiError> {
        let done = self.del_rail(att, netns);
        // Records are only compared with the IDs, never made paths of them:
        // no need to repeat del_rail's check of the IDs here.
        if let Some(info) = &self.pod_info
            && let Err(e) = info.forget(
                att.args.get("K8S_POD_UID").map(String::as_str),
                &att.container_id,
                &att.ifname,
            )
        {
            tracing::warn!(ifname = %att.ifname, error = %e, "could not remove the pod's rail info");
        }
        done
    }

    fn del_rail(&self, att: &Attachment, netns: Option<&PodNetns>) -> Result<(), ApiError> {
        if !valid_container_id(&att.container_id) || !valid_ifname(&att.ifname) {
            return Err(ApiError::new(
                code::INVALID_ENV,
                "invalid CNI_CONTAINERID or CNI_IFNAME",
                format!("{:?} / {:?}", att.container_id, att.ifname),
            ));
        }
        let pins = self.pins(&att.container_id);
        let mut errors = Vec::new();
        // DEL gets the same config as ADD; a chained rail's interface belongs
        // to the earlier plugin, which removes it after us.
        let mode = att.netconf.get("mode").and_then(|m| m.as_str());
        // A VF is not ours to delete: it is stripped and goes home.
        let sriov = mode == Some("sriov") || mode == Some("ib-sriov");
        let chained = mode == Some("chained") || sriov;
        let isolated = att.netconf.get("rdmaIsolation").and_then(|m| m.as_bool()) == Some(true);
        let ours = self.ipam.addresses_of(&att.container_id, &att.ifname);
        // An isolated RDMA device goes home before the interface is
        // stripped (a gone netns has returned it already).
        if isolated {
            let record: Option<sriov::RdmaRecord> =
                sriov::load(&self.vf_records, "rdma", &att.container_id, &att.ifname);
            let done = match netns {
                Some(ns) => match rdma::give_back(ns, &att.ifname) {
                    Ok(moved) => {
                        if !moved.is_empty() {
                            tracing::info!(devices = ?moved, "RDMA devices returned to the host");
                        }
                        true
                    }
                    Err(e) => {
                        errors.push(format!("returning the RDMA device: {e}"));
                        false
                    }
                },
                // The kernel returned it when the netns died, maybe renamed.
                None => match &record {
                    Some(r) => match rdma::restore_name(
                        &self.sysfs_root,
                        &r.pci_address,
                        &r.device,
                        std::time::Duration::from_secs(10),
                    ) {
                        Ok(_) => true,
                        Err(e) => {
                            errors.push(e);
                            false
                        }
                    },
                    None => true,
                },
            };
            if done {
                sriov::forget(&self.vf_records, "rdma", &att.container_id, &att.ifname);
            }
        }
        match netns {
            Some(ns) => {
                let ifname = att.ifname.clone();
                let pins = pins.clone();
                match ns.run(move || {
                    let index = with_rtnl(|h| {
                        let ifname = ifname.clone();
                        async move { rtnl::link_by_name(&h, &ifname).await.ok().flatten() }
                    })
                    .ok()
                    .flatten()
                    .map(|l| l.index);
                    let mut errs = pins.detach(&ifname, index);
                    if index.is_some() {
                        match with_rtnl(|h| async move {
                            if chained {
                                strip_rail(&h, &ifname, &ours).await
                            } else {
                                remove_rail(&h, &ifname).await
                            }
                        }) {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => errs.push(e),
                            Err(e) => errs.push(e.to_string()),
                        }
                    }
                    errs
                }) {
                    Ok(errs) => errors.extend(errs),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            // The netns is gone: its interfaces went with it; only pins are
            // left to remove.
            None => errors.extend(pins.detach(&att.ifname, None)),
        }
        if sriov && let Err(e) = self.give_vf_back(&att.container_id, &att.ifname, netns) {
            errors.push(e);
        }
        if let Err(e) = self.ipam.release(&att.container_id, &att.ifname) {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::new(
                code::DATAPLANE,
                "DEL incomplete",
                errors.join("; "),
            ))
        }
    }
}

/// Takes railnet's part off an interface another plugin owns: the rules
/// naming our addresses, then the addresses (routes go with them).
async fn strip_rail(h: &Handle, ifname: &str, ours: &[IpAddr]) -> Result<(), String> {
    let link = match rtnl::link_by_name(h, ifname).await {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(()),
        Err(e) => return Err(format!("look up {ifname}: {}", describe(&e))),
    };
    let mut errors = Vec::new();
    for addr in ours {
        if let Err(e) = rtnl::delete_rules_from(h, *addr).await {
            errors.push(format!("rules from {addr}: {}", describe(&e)));
        }
    }
    if let Err(e) = rtnl::delete_addresses(h, link.index, ours).await {
        errors.push(format!("addresses on {ifname}: {}", describe(&e)));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Removes a rail interface and the rules that name its addresses (rules,
/// unlike routes, do not go away with the device).
async fn remove_rail(h: &Handle, ifname: &str) -> Result<(), String> {
    let link = match rtnl::link_by_name(h, ifname).await {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(()),
        Err(e) => return Err(format!("look up {ifname}: {}", describe(&e))),
    };
    let mut errors = Vec::new();
    let addrs = rtnl::addresses(h, link.index).await.unwrap_or_default();
    for addr in &addrs {
        if let Err(e) = rtnl::delete_rules_from(h, *addr).await {
            errors.push(format!("rules from {addr}: {}", describe(&e)));
        }
    }
    if let Err(e) = h.link().del(link.index).execute().await {
        errors.push(format!("delete {ifname}: {}", describe(&e)));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Has the kernel resolve the rail gateway now and keep it resolved
/// (a "managed" neighbour entry, Linux 5.16+; a one-shot resolution before
/// that). A steered packet that meets an unresolved gateway on its new rail
/// is lost (seen here: the first ping after ADD), so the first packet after
/// ADD must find the gateway resolved.
async fn resolve_gateway(h: &Handle, index: u32, gw: IpAddr, ifname: &str) {
    let mut managed = h
        .neighbours()
        .add(index, gw)
        .state(NeighbourState::None)
        .replace();
    managed
        .message_mut()
        .attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    if let Err(e) = managed.execute().await {
        let once = h
            .neighbours()
            .add(index, gw)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await;
        if let Err(e2) = once {
            tracing::warn!(%gw, ifname, managed = %describe(&e), once = %describe(&e2),
                "cannot pre-resolve the rail gateway; the first steered packet may be lost");
        }
    }
}

/// Writes a sysctl of this thread's netns; `Ok` if the knob does not exist
/// (IPv6 disabled).
/// Where the pods' interface sysctls are written (`/proc/sys` unless
/// [`set_sysctl_root`] said otherwise).
static SYSCTL_ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Chooses where interface sysctls are written (once, at start): an
/// unprivileged container's `/proc/sys` is read-only, so the chart mounts
/// the node's there instead. Entries under `net/` are the writing thread's
/// netns's, whichever procfs they are reached through.
pub fn set_sysctl_root(root: PathBuf) -> Result<(), String> {
    SYSCTL_ROOT
        .set(root)
        .map_err(|_| "the sysctl root is set once, at start".into())
}

/// Writes `value` to sysctl `key` (`net/ipv4/conf/…`, relative to the
/// sysctl root); one that does not exist (IPv6 off) is no error.
fn sysctl(key: &str, value: &str) -> Result<(), String> {
    let root = SYSCTL_ROOT
        .get()
        .map_or(Path::new("/proc/sys"), PathBuf::as_path);
    let path = root.join(key);
    let path = path.display().to_string();
    match fs::write(&path, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

/// A rail's addresses and gateways, per family.
#[derive(Clone, Debug, Default)]
struct RailAddresses {
    v4: Option<Ipv4Net>,
    gw4: Option<Ipv4Addr>,
    v6: Option<Ipv6Net>,
    gw6: Option<Ipv6Addr>,
    /// The pools' extra routes (`to`, `via`).
    extra_routes: Vec<(IpNet, IpAddr)>,
}

/// Everything ADD does inside the pod netns for one rail.
#[derive(Debug)]
struct PodRail {
    ifname: String,
    rail: u32,
    addrs: RailAddresses,
    rdma_cidrs: Vec<IpNet>,
    routing: Routing,
    mtu: u32,
    netns: NetnsId,
    pins: PodPins,
    /// The optional checks before ADD answers (netconf `detectIPConflict`,
    /// `detectGateway`).
    detect: (bool, bool),
    /// Ethernet framing (not IPoIB): ARP probes and announcements apply.
    ethernet: bool,
}

/// Whether `dst` lies inside the subnet `own` (so no gateway is needed).
fn on_link(dst: IpNet, own: IpNet) -> bool {
    own.trunc().contains(&dst.network()) && dst.prefix_len() >= own.prefix_len()
}

fn same_family(a: IpNet, b: IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

impl PodRail {
    /// The RDMA CIDRs of `own`'s family, or `own`'s subnet when the network
    /// declares none of that family.
    fn rdma_destinations(&self, own: IpNet) -> Vec<IpNet> {
        let same: Vec<IpNet> = self
            .rdma_cidrs
            .iter()
            .filter(|c| same_family(**c, own))
            .map(|c| c.trunc())
            .collect();
        if same.is_empty() {
            vec![own.trunc()]
        } else {
            same
        }
    }

    /// The rail's own addresses with their gateways, IPv4 first.
    fn own(&self) -> Vec<(IpNet, Option<IpAddr>)> {
        let mut own = Vec::new();
        if let Some(v4) = self.addrs.v4 {
            own.push((IpNet::V4(v4), self.addrs.gw4.map(IpAddr::V4)));
        }
        if let Some(v6) = self.addrs.v6 {
            own.push((IpNet::V6(v6), self.addrs.gw6.map(IpAddr::V6)));
        }
        own
    }

    /// Runs inside the pod netns.
    fn configure(self) -> Result<AddResult, ApiError> {
        let dp = |msg: String, details: String| ApiError::new(code::DATAPLANE, msg, details);
        let ifname = self.ifname.clone();
        // A strict rp_filter would drop replies arriving on a rail other than
        // the lowest-metric one; stable GID indexes need no RA/SLAAC
        // addresses. All before the link comes up.
        for (path, value) in [
            (format!("net/ipv4/conf/{ifname}/rp_filter"), "2"),
            // No ARP flux between rails: answer only for this rail's own
            // address, and ask with it as the sender even when the packet
            // that needs the ARP carries another rail's source (ipvlan
            // demultiplexes the reply by that address and drops it
            // otherwise, seen on Linux 6.1).
            (format!("net/ipv4/conf/{ifname}/arp_ignore"), "1"),
            (format!("net/ipv4/conf/{ifname}/arp_announce"), "2"),
            (format!("net/ipv6/conf/{ifname}/accept_ra"), "0"),
            (format!("net/ipv6/conf/{ifname}/autoconf"), "0"),
            // Without DAD the link-local address is valid at once, so the
            // gateway's neighbour solicitation (which needs it as source)
            // goes out at ADD instead of ~2 s later; rail addresses come
            // from IPAM and are unique by construction.
            (format!("net/ipv6/conf/{ifname}/accept_dad"), "0"),
            // Unsolicited neighbour advertisements when the IPv6 address
            // appears, so peers and switches learn the pod at once.
            (format!("net/ipv6/conf/{ifname}/ndisc_notify"), "1"),
        ] {
            sysctl(&path, value).map_err(|e| dp(format!("sysctl on {ifname}"), e))?;
        }
        let started = std::time::Instant::now();
        let (link, routes) =
            with_rtnl(|h| self.install(h)).map_err(|e| dp("rtnetlink".into(), e.to_string()))??;
        let installed = started.elapsed();
        if let Some(v4) = self.addrs.v4
            && self.ethernet
        {
            self.detect(link.index, &link.mac, v4.addr())?;
            // Peers may hold a stale MAC for this address (a previous pod):
            // announce ours. Best effort: a lost announcement costs an ARP.
            if let Err(e) = crate::garp::announce(link.index, &link.mac, v4.addr()) {
                tracing::warn!(ifname = %ifname, error = %e, "gratuitous ARP not sent");
            }
        }
        // The program steers IPv4; IPv6 always uses rules (DESIGN.md).
        if self.routing == Routing::Ebpf
            && let Some(v4) = self.addrs.v4
        {
            let rdma_cidrs = self
                .rdma_cidrs
                .iter()
                .filter_map(|c| match c {
                    IpNet::V4(c) => Some(*c),
                    IpNet::V6(_) => None,
                })
                .collect();
            self.pins
                .attach(&RailAttachment {
                    ifname: ifname.clone(),
                    ifindex: link.index,
                    rail: self.rail,
                    address: v4,
                    gateway: self.addrs.gw4,
                    rdma_cidrs,
                    netns: self.netns,
                })
                .map_err(|e| dp("rail program".into(), e.to_string()))?;
        }
        tracing::debug!(
            ifname = %ifname,
            install_us = installed.as_micros() as u64,
            program_us = (started.elapsed() - installed).as_micros() as u64,
            "pod side of ADD"
        );
        let ips = self
            .own()
            .into_iter()
            .map(|(address, gateway)| ResultIp { address, gateway })
            .collect();
        Ok(AddResult {
            interface: ResultInterface {
                name: ifname,
                mac: link.mac,
                mtu: if self.mtu == 0 { link.mtu } else { self.mtu },
            },
            ips,
            routes,
            rdma: None,
        })
    }

    /// The checks users may ask for before ADD answers; an error undoes
    /// the interface (the caller's undo path).
    fn detect(&self, ifindex: u32, mac: &str, addr: Ipv4Addr) -> Result<(), ApiError> {
        let (conflict, gateway) = self.detect;
        let ifname = &self.ifname;
        if conflict {
            let wait = std::time::Duration::from_millis(300);
            match crate::garp::who_has(ifindex, mac, Ipv4Addr::UNSPECIFIED, addr, wait) {
                Ok(Some(other)) => {
                    return Err(ApiError::new(
                        code::DATAPLANE,
                        format!(
                            "address {addr} is already used on rail {} by {}",
                            self.rail,
                            crate::garp::format_mac(other)
                        ),
                        format!(
                            "another host answered ARP for {addr} on {ifname}: remove it from the rail, \
                             or add it to the pool's excludeIPs"
                        ),
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(ApiError::new(
                        code::DATAPLANE,
                        "duplicate-address check failed",
                        format!("{ifname}: {e}"),
                    ));
                }
            }
        }
        if gateway && let Some(gw) = self.addrs.gw4 {
            let wait = std::time::Duration::from_secs(1);
            match crate::garp::who_has(ifindex, mac, addr, gw, wait) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(ApiError::new(
                        code::DATAPLANE,
                        format!(
                            "gateway {gw} of rail {} did not answer ARP on {ifname} within 1 s",
                            self.rail
                        ),
                        "check the rail switch/router and the pool's gateway (detectGateway is on for this network)",
                    ));
                }
                Err(e) => {
                    return Err(ApiError::new(
                        code::DATAPLANE,
                        "gateway check failed",
                        format!("{ifname}: {e}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Addresses (IPv4 first), link up, main-table routes, the rail's own
    /// table and rules where they are used, gateway neighbours.
    async fn install(&self, h: Handle) -> Result<(rtnl::Link, Vec<ResultRoute>), ApiError> {
        let dp = |msg: String, details: String| ApiError::new(code::DATAPLANE, msg, details);
        let name = &self.ifname;
        let link = rtnl::link_by_name(&h, name)
            .await
            .map_err(|e| dp(format!("look up {name}"), describe(&e)))?
            .ok_or_else(|| dp(format!("{name} vanished from the pod netns"), String::new()))?;
        let own = self.own();
        for (address, _) in &own {
            let mut req = h
                .address()
                .add(link.index, address.addr(), address.prefix_len());
            if matches!(address, IpNet::V6(_)) {
                // Usable at once: a tentative address cannot source traffic,
                // and rail addresses come from IPAM, not SLAAC.
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(|e| dp(format!("address {address} on {name}"), describe(&e)))?;
        }
        h.link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(|e| dp(format!("bringing {name} up"), describe(&e)))?;
        let metric = ROUTE_METRIC_BASE + self.rail;
        let table = RULE_TABLE_BASE + self.rail;
        // Two interfaces of one pod claiming the same rail number would
        // fight over one metric (and the kernel says only "File exists").
        if let Some(other) = rtnl::device_with_metric(&h, metric, link.index)
            .await
            .map_err(|e| dp("reading the pod's routes".into(), describe(&e)))?
        {
            return Err(ApiError::new(
                code::INVALID_CONFIG,
                format!(
                    "rail {} is already wired in this pod, on {other}",
                    self.rail
                ),
                "each rail network of a pod needs its own \"rail\" number",
            ));
        }
        let mut routes = Vec::new();
        for &(address, gw) in &own {
            // Main table: every RDMA CIDR via this rail's gateway at this
            // rail's metric (what oif-bound IPv4 lookups and source-less
            // lookups use).
            if let Some(gw) = gw {
                for cidr in self.rdma_cidrs.iter().map(|c| c.trunc()) {
                    if !same_family(cidr, address) || on_link(cidr, address) {
                        continue;
                    }
                    add_route(&h, cidr, gw, link.index, metric, None)
                        .await
                        .map_err(|e| {
                            dp(format!("route {cidr} via {gw} dev {name}"), describe(&e))
                        })?;
                    routes.push(ResultRoute {
                        dst: cidr,
                        gw: Some(gw),
                        priority: metric,
                    });
                }
            }
            // The pool's own extra routes, at this rail's metric.
            for &(dst, via) in &self.addrs.extra_routes {
                if !same_family(dst, address)
                    || routes
                        .iter()
                        .any(|r: &ResultRoute| r.dst == dst && r.gw == Some(via))
                {
                    continue;
                }
                add_route(&h, dst, via, link.index, metric, None)
                    .await
                    .map_err(|e| {
                        dp(
                            format!("pool route {dst} via {via} dev {name}"),
                            describe(&e),
                        )
                    })?;
                routes.push(ResultRoute {
                    dst,
                    gw: Some(via),
                    priority: metric,
                });
            }
            // IPv6 ignores oif for source-bound lookups, and rules mode
            // wants them for IPv4 too: rail K's own table, chosen by source,
            // only for RDMA destinations (`from ipK to CIDR lookup K` — what
            // Spiderpool's `not to CIDR lookup main` above `from ipK` means,
            // and still right with several CIDRs).
            if self.routing == Routing::Ebpf && matches!(address, IpNet::V4(_)) {
                continue;
            }
            let subnet = address.trunc();
            add_subnet_route(&h, subnet, link.index, table)
                .await
                .map_err(|e| {
                    dp(
                        format!("route {subnet} dev {name} table {table}"),
                        describe(&e),
                    )
                })?;
            for dst in self.rdma_destinations(address) {
                if let Some(gw) = gw
                    && !on_link(dst, address)
                {
                    add_route(&h, dst, gw, link.index, metric, Some(table))
                        .await
                        .map_err(|e| {
                            dp(format!("route {dst} via {gw} table {table}"), describe(&e))
                        })?;
                }
                add_rule(
                    &h,
                    address.addr(),
                    dst,
                    table,
                    RULE_PRIORITY_BASE + self.rail,
                )
                .await
                .map_err(|e| {
                    dp(
                        format!("rule from {} to {dst} lookup {table}", address.addr()),
                        describe(&e),
                    )
                })?;
            }
        }
        for (_, gw) in &own {
            if let Some(gw) = gw {
                resolve_gateway(&h, link.index, *gw, name).await;
            }
        }
        Ok((link, routes))
    }
}

async fn add_route(
    h: &Handle,
    dst: IpNet,
    gw: IpAddr,
    index: u32,
    metric: u32,
    table: Option<u32>,
) -> Result<(), rtnetlink::Error> {
    let msg = match (dst, gw) {
        (IpNet::V4(d), IpAddr::V4(g)) => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(g)
                .output_interface(index)
                .priority(metric);
            match table {
                Some(t) => b.table_id(t).build(),
                None => b.build(),
            }
        }
        (IpNet::V6(d), IpAddr::V6(g)) => {
            let b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(g)
                .output_interface(index)
                .priority(metric);
            match table {
                Some(t) => b.table_id(t).build(),
                None => b.build(),
            }
        }
        _ => return Ok(()),
    };
    h.route().add(msg).execute().await
}

async fn add_subnet_route(
    h: &Handle,
    subnet: IpNet,
    index: u32,
    table: u32,
) -> Result<(), rtnetlink::Error> {
    let mut msg = match subnet {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .table_id(table)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .table_id(table)
            .build(),
    };
    msg.header.protocol = RouteProtocol::Static;
    h.route().add(msg).execute().await
}

async fn add_rule(
    h: &Handle,
    src: IpAddr,
    dst: IpNet,
    table: u32,
    priority: u32,
) -> Result<(), rtnetlink::Error> {
    let req = h
        .rule()
        .add()
        .table_id(table)
        .action(RuleAction::ToTable)
        .priority(priority);
    match (src, dst) {
        (IpAddr::V4(s), IpNet::V4(d)) => {
            req.v4()
                .source_prefix(s, 32)
                .destination_prefix(d.network(), d.prefix_len())
                .execute()
                .await
        }
        (IpAddr::V6(s), IpNet::V6(d)) => {
            req.v6()
                .source_prefix(s, 128)
                .destination_prefix(d.network(), d.prefix_len())
                .execute()
                .await
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hardening 13: the startup sweep removes exactly the names an ADD
    /// makes for its IPoIB children, never a node's own IPoIB interfaces.
    #[test]
    fn the_ipoib_sweep_knows_its_own_children_by_name() {
        for (cid, ifname) in [("c1", "net1"), (&"f".repeat(64)[..], "net8")] {
            let name = ipoib_temp_name(cid, ifname);
            assert!(is_ipoib_temp_name(&name), "{name}");
            assert!(name.len() <= 15, "{name} is too long for a netdev");
        }
        for theirs in [
            "ib0",
            "ib0.8001",
            "rn0",
            "rn00000000000g",
            "rn0123456789ABC",
            "ibp59s0",
        ] {
            assert!(!is_ipoib_temp_name(theirs), "{theirs}");
        }
    }
}
