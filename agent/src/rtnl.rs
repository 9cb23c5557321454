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

/// Runs `work` with an rtnetlink handle whose socket is opened on the
/// calling thread, so it talks to the calling thread's netns. Builds a
/// single-threaded runtime for it: this runs on a dedicated thread (see
/// [`crate::netns`]), never on the agent's tokio workers.
pub fn with_rtnl<T, F, Fut>(work: F) -> io::Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let out = work(handle).await;
        task.abort();
        Ok(out)
    })
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
}

impl From<&LinkMessage> for Link {
    fn from(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            mtu: 0,
            mac: String::new(),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Mtu(m) => link.mtu = *m,
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
