//! Rail interface kinds: how each makes a pod's rail interface, what it
//! takes from the host first and how it gives that back.
//!
//! One [`RailLink`] per [`Mode`], chosen once per request by [`of`]; ADD and
//! DEL ([`crate::rail`]) ask the kind and never branch on the mode.

use std::{collections::BTreeMap, path::Path};

use rtnetlink::Handle;

use crate::{
    api::ApiError,
    netconf::{Mode, NetConf},
    netns::PodNetns,
    rtnl::{self, describe},
};

mod chained;
mod ipoib;
mod vf;
mod vlan;

pub use ipoib::{ipoib_temp_name, is_ipoib_temp_name, sweep_ipoib_leftovers};

/// One kind of rail interface.
pub trait RailLink: Send + Sync {
    /// The mode it serves.
    fn mode(&self) -> Mode;

    /// The interface carries Ethernet frames: ARP applies and the rail
    /// program can read them. IPoIB does not (its rail is kept by rules).
    fn ethernet(&self) -> bool {
        true
    }

    /// The interface is railnet's: DEL removes it. Otherwise (another
    /// plugin's, or a VF that goes home) railnet's addresses and rules are
    /// stripped off it.
    fn owns_interface(&self) -> bool {
        true
    }

    /// The pod uses its master's RDMA device (shared mode): ADD checks the
    /// master has one before anything is made.
    fn shares_master_rdma(&self) -> bool {
        false
    }

    /// It takes something of the host before the interface exists
    /// ([`Self::take_host`]), given back by [`Self::give_host_back`].
    fn takes_host(&self) -> bool {
        false
    }

    /// Records and prepares what it takes of the host. On error nothing is
    /// left changed.
    fn take_host(&self, _cx: &LinkCx<'_>) -> Result<Option<Taken>, ApiError> {
        Ok(None)
    }

    /// Makes (or moves in, or finds) the pod's interface. Returns its MTU,
    /// 0 when the pod side must read it. On error nothing of it is left
    /// (what [`Self::take_host`] took is given back by the caller).
    fn create(&self, cx: &LinkCx<'_>, taken: Option<&Taken>) -> Result<u32, ApiError>;

    /// Gives back what [`Self::take_host`] took, from the pod netns when
    /// `netns` is given (its interface was made), else from the host (a
    /// gone netns has returned it already).
    fn give_host_back(&self, _who: &Holding<'_>, _netns: Option<&PodNetns>) -> Result<(), String> {
        Ok(())
    }
}

/// The kind that serves `mode`.
pub fn of(mode: Mode) -> &'static dyn RailLink {
    match mode {
        Mode::Macvlan => &vlan::MACVLAN,
        Mode::Ipvlan => &vlan::IPVLAN,
        Mode::Sriov => &vf::ETHERNET,
        Mode::IbSriov => &vf::INFINIBAND,
        Mode::Ipoib => &ipoib::Ipoib,
        Mode::Chained => &chained::Chained,
    }
}

/// Whose rail this is and where the node keeps its records.
#[derive(Clone, Copy, Debug)]
pub struct Holding<'a> {
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// sysfs (`/sys`), for PCI lookups.
    pub sysfs_root: &'a Path,
    /// Where VF records are kept until DEL.
    pub vf_records: &'a Path,
}

/// What a kind is given to make an interface.
#[derive(Clone, Copy)]
pub struct LinkCx<'a> {
    /// Whose it is; the node's records.
    pub who: Holding<'a>,
    /// CNI_ARGS (the pod's name, for records).
    pub args: &'a BTreeMap<String, String>,
    /// The network.
    pub conf: &'a NetConf,
    /// The pod's netns.
    pub netns: &'a PodNetns,
    /// This ADD moved the interface's RDMA device into the pod (which
    /// makes an InfiniBand VF's netdev anew in the host).
    pub rdma_moved: bool,
}

impl LinkCx<'_> {
    /// The MAC the pod asked for (`runtimeConfig.mac`, checked at parse).
    fn mac(&self) -> Option<[u8; 6]> {
        self.conf
            .runtime_config
            .mac
            .as_deref()
            .and_then(crate::netconf::parse_mac)
    }
}

/// A host netdev taken for the pod (a VF), ready to move in.
#[derive(Clone, Debug)]
pub struct Taken {
    /// Its name in the host now (a rebind may have renamed it).
    pub name: String,
    /// Its ifindex in the host.
    pub index: u32,
    /// Its MTU.
    pub mtu: u32,
    /// Its driver was rebound (a new GUID): its RDMA device is new too.
    pub rebound: bool,
}

/// The master named by the network, in the agent's netns, and the MTU the
/// pod's interface gets on it (the network's, else the master's).
async fn master_of(h: &Handle, conf: &NetConf) -> Result<(rtnl::Link, u32), ApiError> {
    let master = &conf.master;
    let Some(m) = rtnl::link_by_name(h, master)
        .await
        .map_err(|e| ApiError::dataplane("master lookup failed", describe(&e)))?
    else {
        return Err(ApiError::invalid_config(
            format!("master {master:?} not found on this node"),
            "set \"master\" to one of the node's rail NICs (`ip link` lists them)",
        ));
    };
    let mtu = conf.mtu.unwrap_or(m.mtu);
    if mtu < railnet_common::MIN_RAIL_MTU {
        return Err(ApiError::invalid_config(
            format!(
                "master {master}'s mtu {mtu} is below {}",
                railnet_common::MIN_RAIL_MTU
            ),
            "rails need an MTU of at least 1280; raise the rail NIC's MTU",
        ));
    }
    if mtu > m.mtu {
        return Err(ApiError::invalid_config(
            format!("mtu {mtu} is above master {master}'s mtu {}", m.mtu),
            "lower \"mtu\" or raise the rail NIC's MTU",
        ));
    }
    Ok((m, mtu))
}

/// The pod netns's fd, as netlink's `IFLA_NET_NS_FD` wants it.
fn netns_fd(netns: &PodNetns) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(netns.fd())
}
