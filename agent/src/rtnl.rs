//! Small rtnetlink helpers shared by the node side and the pod side.

use std::{future::Future, io, net::IpAddr};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, IpVersion,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkMessage},
        rule::RuleAttribute,
    },
};

/// Each link of the calling thread's netns and whether it has carrier
/// (`IFF_RUNNING`: up, and the link detected). Every link has an
/// `AF_PACKET` entry, addresses or not.
pub fn carriers() -> std::collections::HashMap<String, bool> {
    use nix::net::if_::InterfaceFlags;
    let mut all = std::collections::HashMap::new();
    for a in nix::ifaddrs::getifaddrs().into_iter().flatten() {
        let running = a.flags.contains(InterfaceFlags::IFF_RUNNING);
        *all.entry(a.interface_name).or_insert(false) |= running;
    }
    all
}

/// Runs `work` with an rtnetlink handle whose socket is in the calling
/// thread's netns. This runs on a dedicated thread (a request's, or a netns
/// job's, see [`crate::netns`]), never on the agent's tokio workers. Within
/// [`one_connection`] every call of the thread shares one single-threaded
/// runtime and one connection (an ADD makes several calls); outside it,
/// each call makes its own.
pub fn with_rtnl<T, F, Fut>(work: F) -> io::Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = T>,
{
    THREAD_RTNL.with(|cell| {
        let mut scope = cell.borrow_mut();
        let Some(slot) = scope.as_mut() else {
            let one = ThreadRtnl::open(None)?;
            return Ok(one.runtime.block_on(work(one.handle.clone())));
        };
        // A thread that moved to another netns since opening it (none of
        // railnet's do: a netns job gets a thread of its own) opens anew.
        let netns = std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok();
        if slot.as_ref().is_none_or(|c| c.netns != netns) {
            *slot = Some(ThreadRtnl::open(netns)?);
        }
        let c = slot.as_ref().expect("opened above");
        Ok(c.runtime.block_on(work(c.handle.clone())))
    })
}

/// Runs `f` with one rtnetlink connection for all the thread's
/// [`with_rtnl`] calls, opened at the first and closed when `f` returns
/// (or panics) — never left to the thread's exit, where a runtime cannot
/// be dropped safely.
pub fn one_connection<T>(f: impl FnOnce() -> T) -> T {
    /// Closes the thread's connection and puts back what was there before.
    struct Close(Option<Option<ThreadRtnl>>);
    impl Drop for Close {
        fn drop(&mut self) {
            let before = self.0.take();
            let ours = THREAD_RTNL.with(|cell| cell.replace(before));
            drop(ours);
        }
    }
    let before = THREAD_RTNL.with(|cell| cell.replace(Some(None)));
    let _close = Close(before);
    f()
}

thread_local! {
    /// `Some` within [`one_connection`]: the thread's connection, once
    /// opened.
    static THREAD_RTNL: std::cell::RefCell<Option<Option<ThreadRtnl>>> =
        const { std::cell::RefCell::new(None) };
}

/// One rtnetlink connection and the runtime that drives it.
struct ThreadRtnl {
    /// The netns (inode) the socket was opened in.
    netns: Option<u64>,
    handle: Handle,
    /// Declared last: dropped after the handle, taking the connection's
    /// task with it.
    runtime: tokio::runtime::Runtime,
}

impl ThreadRtnl {
    fn open(netns: Option<u64>) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let handle = runtime.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            io::Result::Ok(handle)
        })?;
        Ok(Self {
            netns,
            handle,
            runtime,
        })
    }
}

/// A link as railnet needs to know it.
#[derive(Clone, Debug)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// MTU.
    pub mtu: u32,
    /// MAC address, `aa:bb:…`.
    pub mac: String,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// An IPoIB interface's partition key and mode (0 datagram, 1
    /// connected); `None` for anything else.
    pub ipoib: Option<(u16, u16)>,
}

impl From<&LinkMessage> for Link {
    fn from(msg: &LinkMessage) -> Self {
        use rtnetlink::packet_route::link::{InfoData, InfoIpoib, InfoKind, LinkInfo};
        let mut link = Link {
            index: msg.header.index,
            mtu: 0,
            mac: String::new(),
            up: msg
                .header
                .flags
                .contains(rtnetlink::packet_route::link::LinkFlags::Up),
            ipoib: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::LinkInfo(infos)
                    if infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Ipoib))) =>
                {
                    let (mut pkey, mut mode) = (0xffff, 0);
                    for i in infos {
                        if let LinkInfo::Data(InfoData::Ipoib(data)) = i {
                            for d in data {
                                match d {
                                    InfoIpoib::Pkey(p) => pkey = *p,
                                    InfoIpoib::Mode(m) => mode = u16::from(*m),
                                    _ => {}
                                }
                            }
                        }
                    }
                    link.ipoib = Some((pkey, mode));
                }
                LinkAttribute::Address(a) => {
                    link.mac = a
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                }
                _ => {}
            }
        }
        link
    }
}

/// Looks a link up by name; `Ok(None)` when there is none.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from(&msg))),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every IPoIB link of the calling thread's netns: (name, index).
pub async fn ipoib_links(handle: &Handle) -> Result<Vec<(String, u32)>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await? {
        if Link::from(&msg).ipoib.is_none() {
            continue;
        }
        if let Some(name) = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        }) {
            out.push((name, msg.header.index));
        }
    }
    Ok(out)
}

/// The errno of a netlink error, if it is one.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(e) => Some(-e.raw_code()),
        _ => None,
    }
}

/// A netlink error in words: the kernel's errno text.
pub fn describe(err: &rtnetlink::Error) -> String {
    match err {
        rtnetlink::Error::NetlinkError(e) => e.to_io().to_string(),
        other => other.to_string(),
    }
}

/// The addresses on a link, both families.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<IpAddr>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut msgs = h.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = msgs.try_next().await? {
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(a) => out.push(*a),
                // IPv6 addresses carry only IFA_ADDRESS.
                AddressAttribute::Address(a @ IpAddr::V6(_)) => out.push(*a),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// The main-table routes leaving through link `index`, both families:
/// (destination, gateway).
pub async fn routes_on(
    h: &Handle,
    index: u32,
) -> Result<Vec<(ipnet::IpNet, Option<IpAddr>)>, rtnetlink::Error> {
    use rtnetlink::{
        RouteMessageBuilder,
        packet_route::route::{RouteAddress, RouteAttribute},
    };
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut out = Vec::new();
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let v6 = query.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
        let mut routes = h.route().get(query).execute();
        while let Some(r) = routes.try_next().await? {
            let mut table = u32::from(r.header.table);
            let (mut dst, mut gw, mut oif) = (None, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(d) => dst = ip(d),
                    RouteAttribute::Gateway(g) => gw = ip(g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if table != u32::from(libc::RT_TABLE_MAIN) || oif != Some(index) {
                continue;
            }
            let dst = dst.unwrap_or(if v6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            });
            if let Ok(net) = ipnet::IpNet::new(dst, r.header.destination_prefix_length) {
                out.push((net, gw));
            }
        }
    }
    Ok(out)
}

/// Deletes every rule whose source is exactly `addr`.
pub async fn delete_rules_from(h: &Handle, addr: IpAddr) -> Result<(), rtnetlink::Error> {
    let (version, len) = match addr {
        IpAddr::V4(_) => (IpVersion::V4, 32),
        IpAddr::V6(_) => (IpVersion::V6, 128),
    };
    let mut rules = h.rule().get(version).execute();
    let mut doomed = Vec::new();
    while let Some(rule) = rules.try_next().await? {
        let from_us = rule.header.src_len == len
            && rule
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Source(s) if *s == addr));
        if from_us {
            doomed.push(rule);
        }
    }
    for rule in doomed {
        h.rule().del(rule).execute().await?;
    }
    Ok(())
}

/// The addresses on a link with their prefix lengths (global scope only).
pub async fn networks(h: &Handle, index: u32) -> Result<Vec<ipnet::IpNet>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut msgs = h.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = msgs.try_next().await? {
        let len = msg.header.prefix_len;
        for attr in &msg.attributes {
            let a = match attr {
                AddressAttribute::Local(a) => *a,
                AddressAttribute::Address(a @ IpAddr::V6(_)) => *a,
                _ => continue,
            };
            if let Ok(n) = ipnet::IpNet::new(a, len) {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// Sets the alias (`IFLA_IFALIAS`) of link `index`.
pub async fn set_alias(h: &Handle, index: u32, alias: &str) -> Result<(), rtnetlink::Error> {
    let mut msg = rtnetlink::LinkUnspec::new_with_index(index).build();
    msg.attributes
        .push(LinkAttribute::IfAlias(alias.to_owned()));
    h.link().set(msg).execute().await
}

/// Deletes the given addresses from a link (others stay).
pub async fn delete_addresses(
    h: &Handle,
    index: u32,
    doomed: &[IpAddr],
) -> Result<(), rtnetlink::Error> {
    let mut msgs = h.address().get().set_link_index_filter(index).execute();
    let mut found = Vec::new();
    while let Some(msg) = msgs.try_next().await? {
        let ours = msg.attributes.iter().any(|a| match a {
            AddressAttribute::Local(a) | AddressAttribute::Address(a) => doomed.contains(a),
            _ => false,
        });
        if ours {
            found.push(msg);
        }
    }
    for msg in found {
        h.address().del(msg).execute().await?;
    }
    Ok(())
}

/// The name of another device than `ours` that has an IPv4 main-table
/// route at `metric`, if any.
pub async fn device_with_metric(
    h: &Handle,
    metric: u32,
    ours: u32,
) -> Result<Option<String>, rtnetlink::Error> {
    use rtnetlink::packet_route::route::RouteAttribute;
    let mut routes = h
        .route()
        .get(rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute();
    let mut other = None;
    while let Some(r) = routes.try_next().await? {
        let at_metric = r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Priority(p) if *p == metric));
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if at_metric
            && let Some(i) = oif
            && i != ours
        {
            other = Some(i);
        }
    }
    let Some(index) = other else {
        return Ok(None);
    };
    let mut links = h.link().get().match_index(index).execute();
    let name = match links.try_next().await? {
        Some(msg) => msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_else(|| format!("ifindex {index}")),
        None => format!("ifindex {index}"),
    };
    Ok(Some(name))
}

/// What PF `pf` (an ifindex) reports of its VF `vf`: the attributes railnet
/// sets (`ip link show <pf>` prints the same). `Ok(None)`: the PF lists no
/// such VF.
pub async fn vf_settings(
    handle: &Handle,
    pf: u32,
    vf: u32,
) -> Result<Option<crate::netconf::VfSettings>, rtnetlink::Error> {
    use rtnetlink::packet_route::{
        AddressFamily,
        link::{LinkExtentMask, VfInfo, VfLinkState},
    };

    use crate::netconf::{VfLinkMode, VfSettings};
    let mut links = handle
        .link()
        .get()
        .match_index(pf)
        .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::Vf])
        .execute();
    let Some(msg) = links.try_next().await? else {
        return Ok(None);
    };
    for attr in &msg.attributes {
        let LinkAttribute::VfInfoList(list) = attr else {
            continue;
        };
        for info in list {
            let mut out = VfSettings::default();
            let mut id = None;
            for i in &info.0 {
                match i {
                    VfInfo::Vlan(v) => {
                        id = Some(v.vf_id);
                        out.vlan = Some(v.vlan_id as u16);
                        out.qos = v.qos as u8;
                    }
                    VfInfo::SpoofCheck(v) => {
                        id = Some(v.vf_id);
                        out.spoofchk = Some(v.enabled);
                    }
                    VfInfo::Trust(v) => {
                        id = Some(v.vf_id);
                        out.trust = Some(v.enabled);
                    }
                    VfInfo::LinkState(v) => {
                        id = Some(v.vf_id);
                        out.link_state = Some(match v.state {
                            VfLinkState::Enable => VfLinkMode::Enable,
                            VfLinkState::Disable => VfLinkMode::Disable,
                            _ => VfLinkMode::Auto,
                        });
                    }
                    VfInfo::Mac(v) => {
                        id = Some(v.vf_id);
                        let mut mac = [0; 6];
                        mac.copy_from_slice(&v.mac[..6]);
                        out.mac = Some(mac);
                    }
                    // Only drivers that can report them (mlx5) send these.
                    VfInfo::IbNodeGuid(v) => out.node_guid = Some(v.guid),
                    VfInfo::IbPortGuid(v) => out.port_guid = Some(v.guid),
                    _ => {}
                }
            }
            if id == Some(vf) {
                return Ok(Some(out));
            }
        }
    }
    Ok(None)
}

/// The request that makes an IPoIB child of `parent` (an ifindex) named
/// `name` on partition `pkey` in `mode` (0 datagram, 1 connected), with
/// user multicast allowed, as iproute2's `ip link add link <parent> name
/// <name> type ipoib pkey P mode datagram|connected umcast 1` sends it.
pub fn ipoib_request(parent: u32, name: &str, pkey: u16, mode: u16) -> LinkMessage {
    use rtnetlink::packet_core::DefaultNla;
    use rtnetlink::packet_route::link::{InfoData, InfoIpoib, IpoibMode, LinkInfo};
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        // IFLA_INFO_KIND as iproute2 writes it, without the NUL (the kernel
        // reads either with nla_strscpy).
        LinkInfo::Other(DefaultNla::new(1, b"ipoib".to_vec())),
        LinkInfo::Data(InfoData::Ipoib(vec![
            InfoIpoib::Pkey(pkey),
            InfoIpoib::Mode(IpoibMode::from(mode)),
            InfoIpoib::UmCast(1),
        ])),
    ]));
    msg.attributes.push(LinkAttribute::Link(parent));
    msg
}

/// The requests that set VF `vf`'s attributes through PF `pf`: the
/// Ethernet ones and link state in one ([`vf_request`]), then the node
/// GUID, then the port GUID, each in a request of its own — the kernel
/// applies one GUID per request and ignores what follows it (hence
/// `ip link set dev <pf> vf N node_guid G` and `… port_guid G` are two
/// commands in every guide).
pub fn vf_requests(pf: u32, vf: u32, set: &crate::netconf::VfSettings) -> Vec<LinkMessage> {
    use rtnetlink::packet_route::link::{LinkVfInfo, VfInfo, VfInfoGuid};

    let mut out = Vec::new();
    let rest = crate::netconf::VfSettings {
        node_guid: None,
        port_guid: None,
        ..*set
    };
    if !rest.is_empty() || rest.mac.is_some() {
        out.push(vf_request(pf, vf, &rest));
    }
    for guid in [
        set.node_guid
            .map(|g| VfInfo::IbNodeGuid(VfInfoGuid::new(vf, g))),
        set.port_guid
            .map(|g| VfInfo::IbPortGuid(VfInfoGuid::new(vf, g))),
    ]
    .into_iter()
    .flatten()
    {
        let mut msg = rtnetlink::LinkUnspec::new_with_index(pf).build();
        msg.attributes
            .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![guid])]));
        out.push(msg);
    }
    out
}

/// The request that sets VF `vf`'s Ethernet attributes and link state
/// through PF `pf`, as iproute2's `ip link set dev <pf> vf <vf> mac M vlan
/// V qos Q spoofchk on|off trust on|off state auto|enable|disable` sends
/// them (one `IFLA_VF_INFO` in `IFLA_VFINFO_LIST`, in that order; only
/// those asked). GUIDs are not in it: see [`vf_requests`].
pub fn vf_request(pf: u32, vf: u32, set: &crate::netconf::VfSettings) -> LinkMessage {
    use rtnetlink::packet_route::link::{
        LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan,
        VfLinkState,
    };

    use crate::netconf::VfLinkMode;
    let mut info = Vec::new();
    if let Some(mac) = set.mac {
        info.push(VfInfo::Mac(VfInfoMac::new(vf, &mac)));
    }
    if let Some(v) = set.vlan {
        info.push(VfInfo::Vlan(VfInfoVlan::new(vf, v.into(), set.qos.into())));
    }
    if let Some(on) = set.spoofchk {
        info.push(VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, on)));
    }
    if let Some(on) = set.trust {
        info.push(VfInfo::Trust(VfInfoTrust::new(vf, on)));
    }
    if let Some(state) = set.link_state {
        let state = match state {
            VfLinkMode::Auto => VfLinkState::Auto,
            VfLinkMode::Enable => VfLinkState::Enable,
            VfLinkMode::Disable => VfLinkState::Disable,
        };
        info.push(VfInfo::LinkState(VfInfoLinkState::new(vf, state)));
    }
    let mut msg = rtnetlink::LinkUnspec::new_with_index(pf).build();
    msg.attributes
        .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(info)]));
    msg
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::{Emitable, Parseable};
    use rtnetlink::packet_route::link::{InfoData, InfoIpoib, InfoKind, IpoibMode, LinkInfo};

    use super::*;

    #[test]
    fn the_loopback_is_read_with_its_carrier() {
        // Every netns has `lo`, up (IFF_RUNNING) unless someone took it
        // down: the carrier read sees links without addresses too.
        assert_eq!(carriers().get("lo"), Some(&true));
    }

    /// An IPoIB parent as the kernel describes it (kind "ipoib", its
    /// partition and mode) is recognised after a round trip through the
    /// wire format; an Ethernet link is not.
    #[test]
    fn an_ipoib_link_is_known_by_its_kind_partition_and_mode() {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Ipoib),
            LinkInfo::Data(InfoData::Ipoib(vec![
                InfoIpoib::Pkey(0x8001),
                InfoIpoib::Mode(IpoibMode::Connected),
                InfoIpoib::UmCast(1),
            ])),
        ]));
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        let back = LinkMessage::parse(bytes.as_slice()).unwrap();
        assert_eq!(Link::from(&back).ipoib, Some((0x8001, 1)));
        assert_eq!(Link::from(&LinkMessage::default()).ipoib, None);
    }
}
