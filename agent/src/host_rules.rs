//! The host side of the not-to-RDMA-CIDR rule, opt-in (`--host-rules`):
//! what the AI-cluster guides do by hand with `setNicAddr.sh` and
//! `setRdmaRule.sh`. For every address the node's own NICs carry inside
//! the RDMA CIDR (a rail NIC's host address), a table with the rail's
//! gateway and a `from <address> lookup <table>` rule, so the host's
//! rail-sourced RDMA traffic (hostNetwork jobs, NCCL's bootstrap) leaves on
//! its own rail; above them `not to <RDMA CIDR> lookup main`, so traffic
//! to anything else (the cluster network, whose source the kernel may pick
//! from a rail NIC) follows the main table and never a rail.
//!
//! Kept, not flapped: [`plan`] is a pure function of the node's addresses
//! and the pools, [`reconcile`] changes only what differs from it, and
//! nothing is removed when the agent stops — only by the per-node uninstall
//! step ([`remove`]). railnet's rules and routes carry their own protocol
//! number ([`PROTO`]), so railnet never touches anyone else's.

use std::{collections::BTreeSet, net::Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
    },
};

/// The protocol railnet's host rules and routes carry (`ip rule` shows
/// `proto 214`): how railnet knows its own from the node's.
pub const PROTO: u8 = 214;
/// Priority of `not to <RDMA CIDR> lookup main` (the guides' 32762, one
/// below so both can coexist while moving over).
pub const NOT_TO_PRIORITY: u32 = 32760;
/// Priority of the per-address `from` rules (the guides' 32763, likewise).
pub const FROM_PRIORITY: u32 = 32761;
/// Tables are this plus the NIC's interface index.
pub const TABLE_BASE: u32 = 5000;

/// A rule railnet keeps on the host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// `not to <cidr> lookup main`.
    NotTo(Ipv4Net),
    /// `from <address> lookup <table>`.
    From(Ipv4Addr, u32),
}

/// A route railnet keeps in one of its tables.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// The table.
    pub table: u32,
    /// Destination (`0.0.0.0/0` for the default route).
    pub dst: Ipv4Net,
    /// Gateway; none for the NIC's own subnet.
    pub gateway: Option<Ipv4Addr>,
    /// Output interface index.
    pub index: u32,
}

/// What the host should carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Rules, sorted.
    pub rules: BTreeSet<Rule>,
    /// Routes, sorted.
    pub routes: BTreeSet<Route>,
    /// Addresses left out, and why.
    pub skipped: Vec<String>,
}

/// One of the node's NICs with its IPv4 networks.
#[derive(Clone, Debug)]
pub struct Nic {
    /// Its name.
    pub name: String,
    /// Its interface index.
    pub index: u32,
    /// Its IPv4 addresses with their prefixes.
    pub networks: Vec<Ipv4Net>,
}

/// The rules and routes for `nics`, given the RDMA CIDR and the pools'
/// (subnet, gateway) pairs: an address inside the CIDR gets the gateway of
/// the pool whose subnet holds it.
pub fn plan(nics: &[Nic], cidr: Ipv4Net, pools: &[(Ipv4Net, Option<Ipv4Addr>)]) -> Plan {
    let mut out = Plan::default();
    out.rules.insert(Rule::NotTo(cidr));
    for nic in nics {
        for net in &nic.networks {
            let addr = net.addr();
            if !cidr.contains(&addr) {
                continue;
            }
            let gateway = pools
                .iter()
                .find(|(subnet, _)| subnet.contains(&addr))
                .and_then(|(_, gw)| *gw);
            let Some(gateway) = gateway else {
                out.skipped.push(format!(
                    "{addr} on {}: no pool with a gateway holds it, so its rail's gateway is unknown (add the rail's pool)",
                    nic.name
                ));
                continue;
            };
            let table = TABLE_BASE + nic.index;
            out.rules.insert(Rule::From(addr, table));
            out.routes.insert(Route {
                table,
                dst: net.trunc(),
                gateway: None,
                index: nic.index,
            });
            out.routes.insert(Route {
                table,
                dst: Ipv4Net::default(),
                gateway: Some(gateway),
                index: nic.index,
            });
        }
    }
    out
}

/// What [`reconcile`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Rules and routes added, as `ip` would say them.
    pub added: Vec<String>,
    /// Rules and routes removed.
    pub removed: Vec<String>,
}

/// The node's NICs with their IPv4 networks, as the kernel lists them:
/// one link dump and one address dump, whatever the number of links (a
/// node with a veth per pod has hundreds).
pub async fn nics(h: &Handle) -> Result<Vec<Nic>, rtnetlink::Error> {
    use rtnetlink::packet_route::{address::AddressAttribute, link::LinkAttribute};
    let mut networks: std::collections::BTreeMap<u32, Vec<Ipv4Net>> = Default::default();
    let mut addrs = h.address().get().execute();
    while let Some(msg) = addrs.try_next().await? {
        for attr in &msg.attributes {
            if let AddressAttribute::Local(std::net::IpAddr::V4(a)) = attr
                && let Ok(net) = Ipv4Net::new(*a, msg.header.prefix_len)
            {
                networks.entry(msg.header.index).or_default().push(net);
            }
        }
    }
    let mut links = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(link) = links.try_next().await? {
        let name = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let index = link.header.index;
        out.push(Nic {
            name,
            index,
            networks: networks.remove(&index).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Brings the host's railnet rules and routes to `plan`, touching only
/// what differs.
pub async fn reconcile(h: &Handle, plan: &Plan) -> Result<Changes, rtnetlink::Error> {
    let mut changes = Changes::default();
    let (rules, routes) = (ours_rules(h).await?, ours_routes(h).await?);
    let have_rules: BTreeSet<Rule> = rules.iter().map(|(r, _)| r.clone()).collect();
    let have_routes: BTreeSet<Route> = routes.iter().map(|(r, _)| r.clone()).collect();
    for (rule, msg) in rules {
        if !plan.rules.contains(&rule) {
            h.rule().del(msg).execute().await?;
            changes.removed.push(describe_rule(&rule));
        }
    }
    for (route, msg) in routes {
        if !plan.routes.contains(&route) {
            h.route().del(msg).execute().await?;
            changes.removed.push(describe_route(&route));
        }
    }
    // Routes before the rules that send traffic to their tables.
    for route in plan.routes.difference(&have_routes) {
        add_route(h, route).await?;
        changes.added.push(describe_route(route));
    }
    for rule in plan.rules.difference(&have_rules) {
        add_rule(h, rule).await?;
        changes.added.push(describe_rule(rule));
    }
    Ok(changes)
}

/// Removes every railnet rule and route from the host (the per-node
/// uninstall step). What it removed.
pub async fn remove(h: &Handle) -> Result<Vec<String>, rtnetlink::Error> {
    Ok(reconcile(h, &Plan::default()).await?.removed)
}

async fn ours_rules(h: &Handle) -> Result<Vec<(Rule, RuleMessage)>, rtnetlink::Error> {
    let mut all = h.rule().get(rtnetlink::IpVersion::V4).execute();
    let mut out = Vec::new();
    while let Some(msg) = all.try_next().await? {
        let attr = |f: &dyn Fn(&RuleAttribute) -> bool| msg.attributes.iter().any(f);
        if !attr(&|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == PROTO)) {
            continue;
        }
        let table = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(msg.header.table));
        let src = msg.attributes.iter().find_map(|a| match a {
            RuleAttribute::Source(std::net::IpAddr::V4(s)) => Some(*s),
            _ => None,
        });
        let dst = msg.attributes.iter().find_map(|a| match a {
            RuleAttribute::Destination(std::net::IpAddr::V4(d)) => {
                Ipv4Net::new(*d, msg.header.dst_len).ok()
            }
            _ => None,
        });
        let rule = match (src, dst, msg.header.flags.contains(RuleFlags::Invert)) {
            (None, Some(dst), true) => Rule::NotTo(dst),
            (Some(src), None, false) => Rule::From(src, table),
            // Ours by its protocol but no shape railnet makes: removed.
            _ => Rule::From(Ipv4Addr::UNSPECIFIED, 0),
        };
        out.push((rule, msg));
    }
    Ok(out)
}

async fn ours_routes(h: &Handle) -> Result<Vec<(Route, RouteMessage)>, rtnetlink::Error> {
    let mut all = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = all.try_next().await? {
        if u8::from(msg.header.protocol) != PROTO {
            continue;
        }
        let mut route = Route {
            table: u32::from(msg.header.table),
            dst: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, msg.header.destination_prefix_length)
                .unwrap_or_default(),
            gateway: None,
            index: 0,
        };
        for a in &msg.attributes {
            match a {
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::Destination(
                    rtnetlink::packet_route::route::RouteAddress::Inet(d),
                ) => {
                    route.dst =
                        Ipv4Net::new(*d, msg.header.destination_prefix_length).unwrap_or_default();
                }
                RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet(g)) => {
                    route.gateway = Some(*g);
                }
                RouteAttribute::Oif(i) => route.index = *i,
                _ => {}
            }
        }
        out.push((route, msg));
    }
    Ok(out)
}

async fn add_route(h: &Handle, r: &Route) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.addr(), r.dst.prefix_len())
        .output_interface(r.index)
        .table_id(r.table)
        .protocol(RouteProtocol::from(PROTO));
    b = match r.gateway {
        Some(g) => b.gateway(g),
        None => b.scope(RouteScope::Link),
    };
    h.route().add(b.build()).replace().execute().await
}

async fn add_rule(h: &Handle, rule: &Rule) -> Result<(), rtnetlink::Error> {
    let mut req = h.rule().add().v4();
    req = match rule {
        Rule::NotTo(cidr) => req
            .destination_prefix(cidr.addr(), cidr.prefix_len())
            .table_id(254)
            .priority(NOT_TO_PRIORITY),
        Rule::From(src, table) => req
            .source_prefix(*src, 32)
            .table_id(*table)
            .priority(FROM_PRIORITY),
    };
    req = req.action(RuleAction::ToTable);
    let msg = req.message_mut();
    msg.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(PROTO)));
    if matches!(rule, Rule::NotTo(_)) {
        msg.header.flags |= RuleFlags::Invert;
    }
    req.execute().await
}

/// As `ip rule` says it.
pub fn describe_rule(rule: &Rule) -> String {
    match rule {
        Rule::NotTo(cidr) => format!("rule {NOT_TO_PRIORITY}: not to {cidr} lookup main"),
        Rule::From(src, table) => format!("rule {FROM_PRIORITY}: from {src} lookup {table}"),
    }
}

/// As `ip route` says it.
pub fn describe_route(r: &Route) -> String {
    match r.gateway {
        Some(g) => format!(
            "route {} via {g} ifindex {} table {}",
            r.dst, r.index, r.table
        ),
        None => format!("route {} ifindex {} table {}", r.dst, r.index, r.table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, index: u32, nets: &[&str]) -> Nic {
        Nic {
            name: name.into(),
            index,
            networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn each_rail_address_gets_its_gateway_table_and_rule_under_one_not_to_rule() {
        let nics = [
            nic("eth0", 2, &["10.0.0.5/24"]),
            nic("eth1", 3, &["172.16.1.5/24"]),
            nic("eth2", 4, &["172.16.2.5/24"]),
        ];
        let pools = [
            (
                "172.16.1.0/24".parse().unwrap(),
                Some("172.16.1.254".parse().unwrap()),
            ),
            (
                "172.16.2.0/24".parse().unwrap(),
                Some("172.16.2.254".parse().unwrap()),
            ),
        ];
        let p = plan(&nics, "172.16.0.0/16".parse().unwrap(), &pools);
        assert_eq!(
            p.rules.iter().map(describe_rule).collect::<Vec<_>>(),
            [
                "rule 32760: not to 172.16.0.0/16 lookup main",
                "rule 32761: from 172.16.1.5 lookup 5003",
                "rule 32761: from 172.16.2.5 lookup 5004",
            ]
        );
        assert_eq!(
            p.routes.iter().map(describe_route).collect::<Vec<_>>(),
            [
                "route 0.0.0.0/0 via 172.16.1.254 ifindex 3 table 5003",
                "route 172.16.1.0/24 ifindex 3 table 5003",
                "route 0.0.0.0/0 via 172.16.2.254 ifindex 4 table 5004",
                "route 172.16.2.0/24 ifindex 4 table 5004",
            ]
        );
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn an_address_no_pool_holds_is_left_out_and_said() {
        let nics = [nic("eth3", 5, &["172.16.3.5/24"])];
        let p = plan(&nics, "172.16.0.0/16".parse().unwrap(), &[]);
        assert_eq!(p.rules.len(), 1, "only the not-to rule");
        assert!(p.routes.is_empty());
        assert!(
            p.skipped[0].contains("172.16.3.5 on eth3"),
            "{:?}",
            p.skipped
        );
    }
}
