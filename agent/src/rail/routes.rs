//! A rail's routes and rules in the pod: a pure plan of what the rail
//! needs (its RDMA CIDRs, its pools' routes, its own table and rules where
//! the program does not steer), made in order by the pod side.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        route::{RouteProtocol, RouteScope},
        rule::RuleAction,
    },
};

use super::{ROUTE_METRIC_BASE, RULE_PRIORITY_BASE, RULE_TABLE_BASE, pod::PodRail};
use crate::netconf::Routing;

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

    /// The routes and rules of this rail, in the order they are made: a
    /// pure function of the rail's addresses, pools and routing mode.
    pub(super) fn plan(&self) -> Vec<Change> {
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
}

/// One route or rule a rail puts in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
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
    pub(super) async fn apply(&self, h: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
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
    pub(super) fn describe(&self, dev: &str) -> String {
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
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::{dataplane::PodPins, netns::NetnsId, rail::pod::RailAddresses};

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
