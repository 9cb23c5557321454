//! The pod side of a rail: inside the pod netns, what ADD sets on the
//! interface (sysctls, addresses, routes, rules, neighbours, the rail
//! program) and what DEL (or a failed ADD) takes off it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourState},
    },
};

use super::{ROUTE_METRIC_BASE, routes::Change};
use crate::{
    api::{AddResult, ApiError, ResultInterface, ResultIp, ResultRoute, code},
    dataplane::{PodPins, RailAttachment},
    netconf::Routing,
    netns::NetnsId,
    rtnl::{self, describe, with_rtnl},
};

/// Takes railnet's part off an interface another plugin owns: the rules
/// naming our addresses, then the addresses (routes go with them).
pub(super) async fn strip_rail(h: &Handle, ifname: &str, ours: &[IpAddr]) -> Result<(), String> {
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
pub(super) async fn remove_rail(h: &Handle, ifname: &str) -> Result<(), String> {
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

/// Writes `value` to sysctl `key` (`net/ipv4/conf/…`) under `root` (the
/// service's sysctl root, see [`super::RailService::sysctl_root`]); one
/// that does not exist (IPv6 off) is no error. Entries under `net/` are the
/// writing thread's netns's, whichever procfs they are reached through.
fn sysctl(root: &Path, key: &str, value: &str) -> Result<(), String> {
    let path = root.join(key);
    match fs::write(&path, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A rail's addresses and gateways, per family.
#[derive(Clone, Debug, Default)]
pub(super) struct RailAddresses {
    pub(super) v4: Option<Ipv4Net>,
    pub(super) gw4: Option<Ipv4Addr>,
    pub(super) v6: Option<Ipv6Net>,
    pub(super) gw6: Option<Ipv6Addr>,
    /// The pools' extra routes (`to`, `via`).
    pub(super) extra_routes: Vec<(IpNet, IpAddr)>,
}

/// Everything ADD does inside the pod netns for one rail.
#[derive(Debug)]
pub(super) struct PodRail {
    pub(super) ifname: String,
    pub(super) rail: u32,
    pub(super) addrs: RailAddresses,
    pub(super) rdma_cidrs: Vec<IpNet>,
    pub(super) routing: Routing,
    pub(super) mtu: u32,
    pub(super) netns: NetnsId,
    pub(super) pins: PodPins,
    /// The optional checks before ADD answers (netconf `detectIPConflict`,
    /// `detectGateway`).
    pub(super) detect: (bool, bool),
    /// Ethernet framing (not IPoIB): ARP probes and announcements apply.
    pub(super) ethernet: bool,
    /// Where the interface's sysctls are written.
    pub(super) sysctl_root: PathBuf,
}

impl PodRail {
    /// The rail's own addresses with their gateways, IPv4 first.
    pub(super) fn own(&self) -> Vec<(IpNet, Option<IpAddr>)> {
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
    pub(super) fn configure(self) -> Result<AddResult, ApiError> {
        let dp = |msg: String, details: String| ApiError::dataplane(msg, details);
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
            // A rail whose link has no carrier drops out of route
            // selection: the kernel sends routed rail traffic out of the
            // lowest-metric rail first (the program then steers it to its
            // own rail), and through a dead rail it would wait on an ARP
            // no one answers — one pulled cable stopping every rail.
            (
                format!("net/ipv4/conf/{ifname}/ignore_routes_with_linkdown"),
                "1",
            ),
            (
                format!("net/ipv6/conf/{ifname}/ignore_routes_with_linkdown"),
                "1",
            ),
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
            sysctl(&self.sysctl_root, &path, value)
                .map_err(|e| dp(format!("sysctl on {ifname}"), e))?;
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
        // The program steers IPv4; IPv6 always uses rules (IPv6 route
        // lookups ignore the output device a program would pick).
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
                    return Err(ApiError::dataplane(
                        format!(
                            "address {addr} is already used on rail {} by {}",
                            self.rail,
                            railnet_wire::mac::format(other)
                        ),
                        format!(
                            "another host answered ARP for {addr} on {ifname}: remove it from the rail, \
                             or add it to the pool's excludeIPs"
                        ),
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(ApiError::dataplane(
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
                    return Err(ApiError::dataplane(
                        format!(
                            "gateway {gw} of rail {} did not answer ARP on {ifname} within 1 s",
                            self.rail
                        ),
                        "check the rail switch/router and the pool's gateway (detectGateway is on for this network)",
                    ));
                }
                Err(e) => {
                    return Err(ApiError::dataplane(
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
        let dp = |msg: String, details: String| ApiError::dataplane(msg, details);
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
        for change in self.plan() {
            change
                .apply(&h, link.index)
                .await
                .map_err(|e| dp(change.describe(name), describe(&e)))?;
            if let Change::Route {
                dst,
                gw,
                metric,
                table: None,
            } = change
            {
                routes.push(ResultRoute {
                    dst,
                    gw: Some(gw),
                    priority: metric,
                });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Sysctls go under the service's root (the chart mounts the node's
    /// /proc/sys elsewhere); a knob the kernel lacks (IPv6 off) is no error.
    #[test]
    fn sysctls_are_written_under_the_services_root() {
        let root = std::env::temp_dir().join(format!("railnet-sysctl-{}", std::process::id()));
        let knob = root.join("net/ipv4/conf/net1");
        fs::create_dir_all(&knob).unwrap();
        fs::write(knob.join("rp_filter"), "1").unwrap();
        sysctl(&root, "net/ipv4/conf/net1/rp_filter", "2").unwrap();
        assert_eq!(fs::read_to_string(knob.join("rp_filter")).unwrap(), "2");
        sysctl(&root, "net/ipv6/conf/net1/accept_ra", "0").unwrap();
        assert!(!root.join("net/ipv6").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
