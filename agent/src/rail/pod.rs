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
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourState},
        route::{RouteProtocol, RouteScope},
        rule::RuleAction,
    },
};

use super::{ROUTE_METRIC_BASE, RULE_PRIORITY_BASE, RULE_TABLE_BASE};
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
    pub(super) fn configure(self) -> Result<AddResult, ApiError> {
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

    /// The routes and rules of this rail, in the order they are made: a
    /// pure function of the rail's addresses, pools and routing mode.
    fn plan(&self) -> Vec<Change> {
        let metric = ROUTE_METRIC_BASE + self.rail;
        let table = RULE_TABLE_BASE + self.rail;
        let mut changes = Vec::new();
        for (address, gw) in self.own() {
            let mut main = Vec::new();
            // Main table: every RDMA CIDR via this rail's gateway at this
            // rail's metric (what oif-bound IPv4 lookups and source-less
            // lookups use).
            if let Some(gw) = gw {
                for cidr in self.rdma_cidrs.iter().map(|c| c.trunc()) {
                    if same_family(cidr, address) && !on_link(cidr, address) {
                        main.push((cidr, gw));
                    }
                }
            }
            // The pool's own extra routes, at this rail's metric.
            for &(dst, via) in &self.addrs.extra_routes {
                if same_family(dst, address) && !main.contains(&(dst, via)) {
                    main.push((dst, via));
                }
            }
            changes.extend(main.into_iter().map(|(dst, gw)| Change::Route {
                dst,
                gw,
                metric,
                table: None,
            }));
            // IPv6 ignores oif for source-bound lookups, and rules mode
            // wants them for IPv4 too: rail K's own table, chosen by source,
            // only for RDMA destinations (`from ipK to CIDR lookup K` — what
            // Spiderpool's `not to CIDR lookup main` above `from ipK` means,
            // and still right with several CIDRs).
            if self.routing == Routing::Ebpf && matches!(address, IpNet::V4(_)) {
                continue;
            }
            changes.push(Change::SubnetRoute {
                subnet: address.trunc(),
                table,
            });
            for dst in self.rdma_destinations(address) {
                if let Some(gw) = gw
                    && !on_link(dst, address)
                {
                    changes.push(Change::Route {
                        dst,
                        gw,
                        metric,
                        table: Some(table),
                    });
                }
                changes.push(Change::Rule {
                    src: address.addr(),
                    dst,
                    table,
                    priority: RULE_PRIORITY_BASE + self.rail,
                });
            }
        }
        changes
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

/// One route or rule a rail puts in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// `dst via gw dev <rail> metric M [table T]`.
    Route {
        dst: IpNet,
        gw: IpAddr,
        metric: u32,
        table: Option<u32>,
    },
    /// `subnet dev <rail> scope link table T`: the rail's own subnet in
    /// its table.
    SubnetRoute { subnet: IpNet, table: u32 },
    /// `from src to dst lookup T priority P`.
    Rule {
        src: IpAddr,
        dst: IpNet,
        table: u32,
        priority: u32,
    },
}

impl Change {
    async fn apply(&self, h: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
        match *self {
            Change::Route {
                dst,
                gw,
                metric,
                table,
            } => add_route(h, dst, gw, index, metric, table).await,
            Change::SubnetRoute { subnet, table } => {
                add_subnet_route(h, subnet, index, table).await
            }
            Change::Rule {
                src,
                dst,
                table,
                priority,
            } => add_rule(h, src, dst, table, priority).await,
        }
    }

    /// What it is, as `ip route`/`ip rule` would say it, for errors.
    fn describe(&self, dev: &str) -> String {
        match self {
            Change::Route {
                dst,
                gw,
                table: None,
                ..
            } => format!("route {dst} via {gw} dev {dev}"),
            Change::Route {
                dst,
                gw,
                table: Some(t),
                ..
            } => format!("route {dst} via {gw} table {t}"),
            Change::SubnetRoute { subnet, table } => {
                format!("route {subnet} dev {dev} table {table}")
            }
            Change::Rule {
                src, dst, table, ..
            } => {
                format!("rule from {src} to {dst} lookup {table}")
            }
        }
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

    fn rail(routing: Routing, v4: Option<&str>, v6: Option<&str>, rdma: &[&str]) -> PodRail {
        let addrs = RailAddresses {
            v4: v4.map(|a| a.parse().unwrap()),
            gw4: v4.map(|_| "172.16.1.1".parse().unwrap()),
            v6: v6.map(|a| a.parse().unwrap()),
            gw6: v6.map(|_| "fd00:1::1".parse().unwrap()),
            extra_routes: Vec::new(),
        };
        PodRail {
            ifname: "net1".into(),
            rail: 1,
            addrs,
            rdma_cidrs: rdma.iter().map(|c| c.parse().unwrap()).collect(),
            routing,
            mtu: 0,
            netns: NetnsId::default(),
            pins: PodPins::new(Path::new("/nonexistent"), "c1"),
            detect: (false, false),
            ethernet: true,
            sysctl_root: PathBuf::from("/proc/sys"),
        }
    }

    fn said(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| c.describe("net1")).collect()
    }

    /// The program steers IPv4 in eBPF mode: only main-table routes, one
    /// per RDMA CIDR off the rail's own subnet, at the rail's metric.
    #[test]
    fn an_ebpf_rail_gets_main_table_routes_and_no_rules() {
        let r = rail(
            Routing::Ebpf,
            Some("172.16.1.5/24"),
            None,
            &["172.16.0.0/16", "172.16.1.0/24"],
        );
        let plan = r.plan();
        assert_eq!(said(&plan), ["route 172.16.0.0/16 via 172.16.1.1 dev net1"]);
        assert!(matches!(
            plan[0],
            Change::Route {
                metric: 101,
                table: None,
                ..
            }
        ));
    }

    /// Rules mode (Spiderpool's layout): the rail's subnet and its RDMA
    /// destinations in table 100+K, chosen by `from ipK to CIDR` rules.
    #[test]
    fn a_rules_rail_gets_its_own_table_and_a_rule_per_rdma_destination() {
        let r = rail(
            Routing::Rules,
            Some("172.16.1.5/24"),
            None,
            &["172.16.0.0/16"],
        );
        assert_eq!(
            said(&r.plan()),
            [
                "route 172.16.0.0/16 via 172.16.1.1 dev net1",
                "route 172.16.1.0/24 dev net1 table 101",
                "route 172.16.0.0/16 via 172.16.1.1 table 101",
                "rule from 172.16.1.5 to 172.16.0.0/16 lookup 101",
            ]
        );
        let rule = r
            .plan()
            .into_iter()
            .find(|c| matches!(c, Change::Rule { .. }))
            .unwrap();
        assert!(matches!(rule, Change::Rule { priority: 1001, .. }));
    }

    /// IPv6 route lookups ignore the output device: an IPv6 rail gets
    /// rules even in eBPF mode; with no RDMA CIDR of its family its own
    /// subnet is the destination, reached on-link (no gateway route).
    #[test]
    fn ipv6_always_gets_rules_and_no_cidr_means_the_rails_own_subnet() {
        let r = rail(
            Routing::Ebpf,
            Some("172.16.1.5/24"),
            Some("fd00:1::5/64"),
            &["172.16.0.0/16"],
        );
        assert_eq!(
            said(&r.plan()),
            [
                "route 172.16.0.0/16 via 172.16.1.1 dev net1",
                "route fd00:1::/64 dev net1 table 101",
                "rule from fd00:1::5 to fd00:1::/64 lookup 101",
            ]
        );
    }

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

    /// A pool route that repeats an RDMA CIDR's is made once.
    #[test]
    fn a_pool_route_the_rdma_cidrs_already_give_is_made_once() {
        let mut r = rail(
            Routing::Ebpf,
            Some("172.16.1.5/24"),
            None,
            &["172.16.0.0/16"],
        );
        r.addrs.extra_routes = vec![
            (
                "172.16.0.0/16".parse().unwrap(),
                "172.16.1.1".parse().unwrap(),
            ),
            (
                "10.200.0.0/16".parse().unwrap(),
                "172.16.1.254".parse().unwrap(),
            ),
            ("fd00:9::/64".parse().unwrap(), "fd00:1::1".parse().unwrap()),
        ];
        assert_eq!(
            said(&r.plan()),
            [
                "route 172.16.0.0/16 via 172.16.1.1 dev net1",
                "route 10.200.0.0/16 via 172.16.1.254 dev net1",
            ]
        );
    }
}
