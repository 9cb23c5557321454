//! Modes macvlan and ipvlan: an interface made on the master straight into
//! the pod, sharing the master's RDMA device (RoCE, shared mode).

use rtnetlink::{
    LinkIpVlan, LinkMacVlan,
    packet_route::link::{IpVlanMode, MacVlanMode},
};

use super::{LinkCx, RailLink, Taken, master_of, netns_fd};
use crate::{
    api::ApiError,
    netconf::Mode,
    rtnl::{describe, errno, with_rtnl},
};

/// Which of the two a [`Vlan`] makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// macvlan, bridge mode: a MAC of its own (RoCE NICs).
    Macvlan,
    /// ipvlan, l2 mode: the master's MAC, where the NIC or the switch
    /// allows one MAC only.
    Ipvlan,
}

/// A macvlan or ipvlan child of the master.
pub struct Vlan(Kind);

/// Mode macvlan.
pub static MACVLAN: Vlan = Vlan(Kind::Macvlan);
/// Mode ipvlan.
pub static IPVLAN: Vlan = Vlan(Kind::Ipvlan);

impl RailLink for Vlan {
    fn mode(&self) -> Mode {
        match self.0 {
            Kind::Macvlan => Mode::Macvlan,
            Kind::Ipvlan => Mode::Ipvlan,
        }
    }

    fn shares_master_rdma(&self) -> bool {
        true
    }

    fn create(&self, cx: &LinkCx<'_>, _taken: Option<&Taken>) -> Result<u32, ApiError> {
        let (conf, kind) = (cx.conf.clone(), self.0);
        let ifname = cx.who.ifname.to_owned();
        let fd = netns_fd(cx.netns);
        let mac = cx.mac();
        with_rtnl(|h| async move {
            let (master, mtu) = master_of(&h, &conf).await?;
            let msg = match kind {
                Kind::Ipvlan => LinkIpVlan::new(&ifname, master.index, IpVlanMode::L2)
                    .mtu(mtu)
                    .setns_by_fd(fd)
                    .build(),
                Kind::Macvlan => {
                    let b = LinkMacVlan::new(&ifname, master.index, MacVlanMode::Bridge)
                        .mtu(mtu)
                        .setns_by_fd(fd);
                    match mac {
                        Some(mac) => b.address(mac.to_vec()).build(),
                        None => b.build(),
                    }
                }
            };
            h.link()
                .add(msg)
                .execute()
                .await
                .map_err(|e| match errno(&e) {
                    Some(libc::EEXIST) => ApiError::interface_exists(&ifname),
                    Some(libc::EOPNOTSUPP) if kind == Kind::Ipvlan => ApiError::invalid_config(
                        "this kernel has no ipvlan",
                        "load the ipvlan module (modprobe ipvlan) or use mode \"macvlan\"",
                    ),
                    _ => ApiError::dataplane(
                        format!("creating the {} interface", conf.mode),
                        describe(&e),
                    ),
                })?;
            Ok(mtu)
        })
        .map_err(|e| ApiError::dataplane("rtnetlink", e.to_string()))?
    }
}
