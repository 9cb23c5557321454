//! What an ADD does about RDMA: share the master's device, use the VF's
//! own device where it stays (shared mode), move it into the pod
//! (exclusive mode), or nothing (a node without RDMA).

use std::path::Path;

use crate::{
    api::ApiError,
    link::RailLink,
    netconf::NetConf,
    rdma::{self, NetnsMode, RdmaDevice, RdmaError, RdmaNetlink, RdmaPort},
    sriov,
};

/// What ADD does about RDMA for one interface.
pub(super) enum RdmaPlan {
    /// The node has no RDMA device at all (no RDMA subsystem, or none
    /// registered): a test or CPU node; the rail carries TCP only.
    None,
    /// The pod shares the master's device (macvlan/ipvlan, shared mode).
    Shared(RdmaPort),
    /// The pod's VF (at this PCI address) keeps its own device in the host
    /// (shared mode), where every pod of the node sees it — and every
    /// other pod's VF too: the pod's NCCL settings must name its own.
    /// Looked up when the ADD answers, since taking an InfiniBand VF
    /// rebinds it, which makes its RDMA device anew.
    Vf(String),
    /// The VF's device moves into the pod (exclusive mode).
    Isolate(RdmaDevice),
}

/// The PCI address of a netdev of the agent's netns, if it is a PCI
/// function (`/sys/class/net/<dev>/device` → `.../0000:3b:00.0`).
pub(super) fn pci_address_of_netdev(netdev: &str) -> Option<String> {
    let target = std::fs::read_link(format!("/sys/class/net/{netdev}/device")).ok()?;
    let name = target.file_name()?.to_string_lossy().into_owned();
    // domain:bus:device.function
    let pci = name.len() == 12 && name.as_bytes()[4] == b':' && name.as_bytes()[7] == b':';
    pci.then_some(name)
}

/// Looks at the node's RDMA devices from the agent's netns (the host's).
pub(super) fn rdma_plan(
    conf: &NetConf,
    link: &dyn RailLink,
    sysfs: &Path,
) -> Result<RdmaPlan, ApiError> {
    let dp = |msg: &str, e: RdmaError| ApiError::dataplane(msg, e.to_string());
    let mut nl = match RdmaNetlink::open() {
        Ok(nl) => nl,
        Err(e @ RdmaError::NoRdma(_)) if conf.rdma_isolation => {
            return Err(ApiError::invalid_config(
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
            return Err(ApiError::invalid_config(
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
            return Err(ApiError::invalid_config(
                format!("no RDMA device for PCI address {bdf} (deviceID)"),
                format!(
                    "/sys/bus/pci/devices/{bdf}/infiniband is empty or missing: is the VF bound to its RDMA driver \
                     (mlx5_core with mlx5_ib loaded)? `rdma dev` lists the node's devices"
                ),
            ));
        };
        sriov::must_be_vf(sysfs, &bdf).map_err(|e| {
            ApiError::invalid_config(format!("deviceID {bdf} cannot be given to a pod"), e)
        })?;
        let dev = nl
            .device(&name)
            .map_err(|e| dp("looking up the VF's RDMA device", e))?;
        return Ok(RdmaPlan::Isolate(dev));
    }
    if !link.shares_master_rdma() {
        // A VF (railnet's, or the earlier plugin's with Multus's deviceID)
        // whose RDMA device, if any, stays in the host; otherwise nothing
        // to check against a master.
        return Ok(match &conf.device_id {
            Some(bdf) if !bdf.is_empty() => RdmaPlan::Vf(bdf.clone()),
            _ => RdmaPlan::None,
        });
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
            Err(ApiError::invalid_config(
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
