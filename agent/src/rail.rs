//! ADD and DEL of one rail interface: address, macvlan, routes, program.
//!
//! The order follows DESIGN.md's "A pod's ADD": allocate, create the
//! interface in the pod, address it, route it, attach the program — and on
//! any failure undo what was done, so a failed ADD leaves nothing behind.

use std::{fs, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkMacVlan, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        link::MacVlanMode,
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourState},
        route::{RouteProtocol, RouteScope},
        rule::RuleAction,
    },
};

use crate::{
    api::{AddResult, ApiError, Attachment, ResultInterface, ResultRoute, code},
    dataplane::{PodPins, RailAttachment},
    ipam::Ipam,
    netconf::{NetConf, Routing, valid_ifname},
    netns::PodNetns,
    rtnl::{self, describe, errno, with_rtnl},
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

/// What ADD and DEL need from the agent.
#[derive(Debug)]
pub struct RailService {
    /// The allocator.
    pub ipam: Ipam,
    /// Root of the pods' bpffs pins.
    pub pin_root: PathBuf,
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> ApiError {
    ApiError::new(code::INVALID_CONFIG, msg, details)
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

impl RailService {
    /// CNI ADD. Must run on a thread of its own (it enters the pod netns on
    /// further threads and blocks on netlink).
    pub fn add(&self, att: &Attachment, netns: &PodNetns) -> Result<AddResult, ApiError> {
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
        let alloc = self
            .ipam
            .allocate(&att.container_id, &att.ifname, &conf.ippools.ipv4)
            .map_err(|e| ApiError::new(code::POOL_EXHAUSTED, "IPAM", e.to_string()))?;
        let address = Ipv4Net::new(alloc.address, alloc.pool.subnet.prefix_len())
            .expect("prefix comes from a valid subnet");
        match self.wire(att, &conf, netns, address, alloc.pool.gateway) {
            Ok(result) => Ok(result),
            Err(e) => {
                self.ipam.release(&att.container_id, &att.ifname);
                Err(e)
            }
        }
    }

    fn wire(
        &self,
        att: &Attachment,
        conf: &NetConf,
        netns: &PodNetns,
        address: Ipv4Net,
        gateway: Option<Ipv4Addr>,
    ) -> Result<AddResult, ApiError> {
        let dp = |msg: &str, details: String| ApiError::new(code::DATAPLANE, msg, details);
        // Node side: the master lives in the agent's netns (hostNetwork).
        let ifname = att.ifname.clone();
        let master = conf.master.clone();
        let want_mtu = conf.mtu;
        let netns_fd = std::os::fd::AsRawFd::as_raw_fd(netns.fd());
        let mtu = with_rtnl(|h| async move {
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
            if mtu > m.mtu {
                return Err(invalid(
                    format!("mtu {mtu} is above master {master}'s mtu {}", m.mtu),
                    "lower \"mtu\" or raise the rail NIC's MTU",
                ));
            }
            let msg = LinkMacVlan::new(&ifname, m.index, MacVlanMode::Bridge)
                .mtu(mtu)
                .setns_by_fd(netns_fd)
                .build();
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
                    _ => dp("creating the macvlan", describe(&e)),
                })?;
            Ok(mtu)
        })
        .map_err(|e| dp("rtnetlink", e.to_string()))??;

        // Pod side: everything else, then the program.
        let plan = PodRail {
            ifname: att.ifname.clone(),
            rail: conf.rail,
            address,
            gateway,
            rdma_cidrs: conf.rdma_cidrs.clone(),
            routing: conf.routing,
            mtu,
            netns_inode: netns.inode().unwrap_or(0),
            pins: PodPins::new(&self.pin_root, &att.container_id),
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
                let pins = PodPins::new(&self.pin_root, &att.container_id);
                let _ = netns.run(move || {
                    let _ = pins.detach(&ifname, None);
                    let _ = with_rtnl(|h| async move { remove_rail(&h, &ifname).await });
                });
                Err(e)
            }
        }
    }

    /// CNI DEL: idempotent, best effort; releases the address even when the
    /// netns is gone. Returns the errors it met but kept going past.
    pub fn del(&self, att: &Attachment, netns: Option<&PodNetns>) -> Result<(), ApiError> {
        if !valid_container_id(&att.container_id) || !valid_ifname(&att.ifname) {
            return Err(ApiError::new(
                code::INVALID_ENV,
                "invalid CNI_CONTAINERID or CNI_IFNAME",
                format!("{:?} / {:?}", att.container_id, att.ifname),
            ));
        }
        let pins = PodPins::new(&self.pin_root, &att.container_id);
        let mut errors = Vec::new();
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
                        match with_rtnl(|h| async move { remove_rail(&h, &ifname).await }) {
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
        self.ipam.release(&att.container_id, &att.ifname);
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
async fn resolve_gateway(h: &Handle, index: u32, gw: Ipv4Addr, ifname: &str) {
    let mut managed = h
        .neighbours()
        .add(index, gw.into())
        .state(NeighbourState::None)
        .replace();
    managed
        .message_mut()
        .attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    if let Err(e) = managed.execute().await {
        let once = h
            .neighbours()
            .add(index, gw.into())
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
fn sysctl(path: &str, value: &str) -> Result<(), String> {
    match fs::write(path, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

/// Everything ADD does inside the pod netns for one rail.
#[derive(Debug)]
struct PodRail {
    ifname: String,
    rail: u32,
    address: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    rdma_cidrs: Vec<Ipv4Net>,
    routing: Routing,
    mtu: u32,
    netns_inode: u64,
    pins: PodPins,
}

impl PodRail {
    /// The destinations steered by source: the RDMA CIDRs, or the rail's
    /// own subnet when none are configured.
    fn rdma_destinations(&self) -> Vec<Ipv4Net> {
        if self.rdma_cidrs.is_empty() {
            vec![self.address.trunc()]
        } else {
            self.rdma_cidrs.iter().map(|c| c.trunc()).collect()
        }
    }

    /// Runs inside the pod netns.
    fn configure(self) -> Result<AddResult, ApiError> {
        let dp = |msg: String, details: String| ApiError::new(code::DATAPLANE, msg, details);
        let ifname = self.ifname.clone();
        // A strict rp_filter would drop replies arriving on a rail other than
        // the lowest-metric one; stable GID indexes need no RA/SLAAC addresses.
        for (path, value) in [
            (format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter"), "2"),
            (format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra"), "0"),
            (format!("/proc/sys/net/ipv6/conf/{ifname}/autoconf"), "0"),
        ] {
            sysctl(&path, value).map_err(|e| dp(format!("sysctl on {ifname}"), e))?;
        }
        let (link, routes) =
            with_rtnl(|h| self.install(h)).map_err(|e| dp("rtnetlink".into(), e.to_string()))??;
        if self.routing == Routing::Ebpf {
            self.pins
                .attach(&RailAttachment {
                    ifname: ifname.clone(),
                    ifindex: link.index,
                    rail: self.rail,
                    address: self.address,
                    gateway: self.gateway,
                    rdma_cidrs: self.rdma_cidrs.clone(),
                    netns_inode: self.netns_inode,
                })
                .map_err(|e| dp("rail program".into(), e.to_string()))?;
        }
        Ok(AddResult {
            interface: ResultInterface {
                name: ifname,
                mac: link.mac,
                mtu: self.mtu,
            },
            address: self.address,
            gateway: self.gateway,
            routes,
        })
    }

    /// Address, link up, routes (and in rules mode, the rail's table and
    /// rules), gateway neighbour.
    async fn install(&self, h: Handle) -> Result<(rtnl::Link, Vec<ResultRoute>), ApiError> {
        let dp = |msg: String, details: String| ApiError::new(code::DATAPLANE, msg, details);
        let name = &self.ifname;
        let address = self.address;
        let link = rtnl::link_by_name(&h, name)
            .await
            .map_err(|e| dp(format!("look up {name}"), describe(&e)))?
            .ok_or_else(|| dp(format!("{name} vanished from the pod netns"), String::new()))?;
        h.address()
            .add(link.index, address.addr().into(), address.prefix_len())
            .execute()
            .await
            .map_err(|e| dp(format!("address {address} on {name}"), describe(&e)))?;
        h.link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(|e| dp(format!("bringing {name} up"), describe(&e)))?;
        let metric = ROUTE_METRIC_BASE + self.rail;
        let table = RULE_TABLE_BASE + self.rail;
        let mut routes = Vec::new();
        if let Some(gw) = self.gateway {
            for cidr in &self.rdma_cidrs {
                let cidr = cidr.trunc();
                if cidr.contains(&address.addr()) && cidr.prefix_len() >= address.prefix_len() {
                    continue; // on-link already
                }
                add_route(&h, cidr, gw, link.index, metric, None)
                    .await
                    .map_err(|e| dp(format!("route {cidr} via {gw} dev {name}"), describe(&e)))?;
                routes.push(ResultRoute {
                    dst: cidr,
                    gw: Some(gw),
                    priority: metric,
                });
            }
        }
        if self.routing == Routing::Rules {
            // Spiderpool-style: rail K's own table, chosen by source, only
            // for RDMA destinations (`from ipK to CIDR`, which is what
            // `not to CIDR lookup main` above `from ipK` means, and stays
            // right with several CIDRs).
            let subnet = address.trunc();
            let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(subnet.network(), subnet.prefix_len())
                .output_interface(link.index)
                .scope(RouteScope::Link)
                .table_id(table)
                .build();
            msg.header.protocol = RouteProtocol::Static;
            h.route().add(msg).execute().await.map_err(|e| {
                dp(
                    format!("route {subnet} dev {name} table {table}"),
                    describe(&e),
                )
            })?;
            for dst in self.rdma_destinations() {
                if let Some(gw) = self.gateway
                    && !(dst.contains(&address.addr()) && dst.prefix_len() >= address.prefix_len())
                {
                    add_route(&h, dst, gw, link.index, metric, Some(table))
                        .await
                        .map_err(|e| {
                            dp(format!("route {dst} via {gw} table {table}"), describe(&e))
                        })?;
                }
                h.rule()
                    .add()
                    .v4()
                    .source_prefix(address.addr(), 32)
                    .destination_prefix(dst.network(), dst.prefix_len())
                    .table_id(table)
                    .action(RuleAction::ToTable)
                    .priority(RULE_PRIORITY_BASE + self.rail)
                    .execute()
                    .await
                    .map_err(|e| {
                        dp(
                            format!("rule from {} to {dst} lookup {table}", address.addr()),
                            describe(&e),
                        )
                    })?;
            }
        }
        if let Some(gw) = self.gateway {
            resolve_gateway(&h, link.index, gw, name).await;
        }
        Ok((link, routes))
    }
}

async fn add_route(
    h: &Handle,
    dst: Ipv4Net,
    gw: Ipv4Addr,
    index: u32,
    metric: u32,
    table: Option<u32>,
) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .gateway(gw)
        .output_interface(index)
        .priority(metric);
    if let Some(t) = table {
        b = b.table_id(t);
    }
    h.route().add(b.build()).execute().await
}
