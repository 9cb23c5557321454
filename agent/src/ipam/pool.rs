//! Pool definitions, their validation, and the per-pool free-address index.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use serde::Deserialize;

/// A pool as written in the agent's config (field names as SpiderIPPool's).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpec {
    /// Pool name, referenced by a network's `ippools`.
    pub name: String,
    /// The subnet, IPv4 or IPv6.
    pub subnet: IpNet,
    /// Address ranges `a-b` or single addresses; the whole subnet if empty.
    #[serde(default)]
    pub ips: Vec<String>,
    /// Addresses never handed out.
    #[serde(default, rename = "excludeIPs")]
    pub exclude_ips: Vec<IpAddr>,
    /// The rail gateway.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Extra routes for pods with an address from this pool (e.g. the
    /// seeds' `RDMA_CIDR via gw` on rail 1's pool).
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Nodes that may use the pool; all when empty.
    #[serde(default)]
    pub node_name: Vec<String>,
    /// A disabled pool hands out nothing new; what it gave stays.
    #[serde(default)]
    pub disable: bool,
    /// Pod namespaces that may use the pool; all when empty.
    #[serde(default)]
    pub namespace: Vec<String>,
    /// Networks that may use the pool, by the network name in the CNI
    /// config; all when empty. That name is whatever the NAD's author
    /// wrote (Multus passes the NAD's config unchanged, and no trusted
    /// word of the NAD's namespace), so this sorts networks, it does not
    /// keep tenants out: `namespace` (the pod's, from the runtime) does.
    #[serde(default)]
    pub networks: Vec<String>,
    /// `ipv4` or `ipv6`; optional, checked against the subnet.
    #[serde(default)]
    pub ip_version: Option<String>,
}

/// An extra route of a pool, written as SpiderIPPool's (`to`, `via`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Destination.
    #[serde(rename = "to")]
    pub dst: IpNet,
    /// Next hop, inside the pool's subnet.
    #[serde(rename = "via")]
    pub gw: IpAddr,
}

/// A validated pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// Subnet.
    pub subnet: IpNet,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Extra routes.
    pub routes: Vec<RouteSpec>,
    /// Node affinity; empty means every node.
    pub node_name: Vec<String>,
    /// Hands out nothing new.
    pub disable: bool,
    /// Namespace affinity; empty means every namespace.
    pub namespace: Vec<String>,
    /// Network affinity; empty means every network.
    pub networks: Vec<String>,
    ranges: Vec<(u128, u128)>,
    excluded: BTreeSet<u128>,
}

impl Pool {
    /// The first stretch of addresses both `self` and `other` can hand out
    /// (same family; excluded addresses are left out), if any.
    pub fn overlap(&self, other: &Pool) -> Option<(IpAddr, IpAddr)> {
        if self.subnet.addr().is_ipv4() != other.subnet.addr().is_ipv4() {
            return None;
        }
        let v4 = self.subnet.addr().is_ipv4();
        let addr = |n: u128| -> IpAddr {
            if v4 {
                IpAddr::V4(std::net::Ipv4Addr::from(n as u32))
            } else {
                IpAddr::V6(std::net::Ipv6Addr::from(n))
            }
        };
        for &(a_lo, a_hi) in &self.ranges {
            for &(b_lo, b_hi) in &other.ranges {
                let (lo, hi) = (a_lo.max(b_lo), a_hi.min(b_hi));
                if lo > hi {
                    continue;
                }
                // The shared stretch minus either pool's exclusions.
                let usable =
                    (lo..=hi).filter(|n| !self.excluded.contains(n) && !other.excluded.contains(n));
                let mut usable = usable.take(1 << 20);
                if let Some(first) = usable.next() {
                    let last = usable.last().unwrap_or(first);
                    return Some((addr(first), addr(last)));
                }
            }
        }
        None
    }
}

/// An address as a number, so IPv4 and IPv6 ranges share one allocator.
pub(crate) fn num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn addr(v6: bool, n: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    }
}

/// Pool definition and allocation errors.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IpamError {
    /// A range that does not parse or leaves the subnet.
    #[error("pool {pool}: range {range:?} {why}")]
    Range {
        /// Pool name.
        pool: String,
        /// The range as written.
        range: String,
        /// What is wrong.
        why: String,
    },
    /// Gateway outside the subnet.
    #[error("pool {pool}: gateway {gateway} is outside subnet {subnet}")]
    Gateway {
        /// Pool name.
        pool: String,
        /// Gateway.
        gateway: IpAddr,
        /// Subnet.
        subnet: IpNet,
    },
    /// Two pools of one name.
    #[error("pool {0} is defined twice")]
    Duplicate(String),
    /// Two pools that can hand out the same address.
    #[error(
        "pools {a} and {b} overlap ({shared} is in both): each would hand out the same \
         addresses to different pods; give each its own range (or excludeIPs the shared part of one)"
    )]
    Overlap {
        /// One pool.
        a: String,
        /// The other.
        b: String,
        /// The shared addresses, `first-last`.
        shared: String,
    },
    /// A route whose next hop is outside the pool's subnet.
    #[error("pool {pool}: route to {dst} via {gw}: the next hop is outside subnet {subnet}")]
    RouteGateway {
        /// Pool name.
        pool: String,
        /// Destination.
        dst: IpNet,
        /// Next hop.
        gw: IpAddr,
        /// Subnet.
        subnet: IpNet,
    },
    /// No pool could serve the request; each candidate with its reason.
    #[error("no pool can serve this rail: {}", describe(.0))]
    NoPool(Vec<super::Rejection>),
    /// A requested address (runtimeConfig.ips) no candidate pool can give.
    #[error("requested address {address} cannot be given: {}", describe(.rejected))]
    Requested {
        /// The address asked for.
        address: IpAddr,
        /// Each candidate pool with its reason.
        rejected: Vec<super::Rejection>,
    },
    /// The shared store (the Kubernetes API server) cannot be reached or
    /// did not answer in time; nothing was allocated. CNI code 11: the
    /// runtime tries again.
    #[error("{0}")]
    Unavailable(String),
    /// The store refused the write; nothing was allocated.
    #[error("allocation not recorded: {0}")]
    Store(String),
}

fn describe(rejected: &[super::Rejection]) -> String {
    if rejected.is_empty() {
        return "the network names no pool".into();
    }
    rejected
        .iter()
        .map(|r| format!("{}: {}", r.pool, r.why))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Pool {
    /// Validates a spec: every range and the gateway inside the subnet.
    pub fn new(spec: PoolSpec) -> Result<Self, IpamError> {
        let net = spec.subnet.trunc();
        let v6 = matches!(net, IpNet::V6(_));
        if let Some(v) = &spec.ip_version {
            let want = if v6 { "ipv6" } else { "ipv4" };
            if v != want {
                return Err(IpamError::Range {
                    pool: spec.name.clone(),
                    range: format!("ipVersion: {v}"),
                    why: format!("does not match subnet {net} ({want})"),
                });
            }
        }
        let inside = |a: IpAddr| net.contains(&a);
        let mut ranges = Vec::new();
        for range in &spec.ips {
            let bad = |why: &str| IpamError::Range {
                pool: spec.name.clone(),
                range: range.clone(),
                why: why.into(),
            };
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (range.trim(), range.trim()),
            };
            let a: IpAddr = a.parse().map_err(|_| bad("is not an address range"))?;
            let b: IpAddr = b.parse().map_err(|_| bad("is not an address range"))?;
            if !inside(a) || !inside(b) {
                return Err(bad(&format!("is not inside subnet {net}")));
            }
            if num(a) > num(b) {
                return Err(bad("ends before it starts"));
            }
            ranges.push((num(a), num(b)));
        }
        if ranges.is_empty() {
            ranges.push((num(net.network()), num(net.broadcast())));
        }
        if let Some(gateway) = spec.gateway
            && !inside(gateway)
        {
            return Err(IpamError::Gateway {
                pool: spec.name,
                gateway,
                subnet: net,
            });
        }
        let mut excluded: BTreeSet<u128> = spec.exclude_ips.iter().map(|a| num(*a)).collect();
        // IPv4's network and broadcast addresses, IPv6's subnet-router
        // anycast address: never a host's.
        excluded.insert(num(net.network()));
        if !v6 && net.prefix_len() < 31 {
            excluded.insert(num(net.broadcast()));
        }
        if let Some(gw) = spec.gateway {
            excluded.insert(num(gw));
        }
        for r in &spec.routes {
            if !inside(r.gw) {
                return Err(IpamError::RouteGateway {
                    pool: spec.name.clone(),
                    dst: r.dst,
                    gw: r.gw,
                    subnet: net,
                });
            }
        }
        Ok(Self {
            name: spec.name,
            subnet: net,
            gateway: spec.gateway,
            routes: spec.routes,
            node_name: spec.node_name,
            disable: spec.disable,
            namespace: spec.namespace,
            networks: spec.networks,
            ranges,
            excluded,
        })
    }

    /// Whether this is an IPv6 pool.
    pub fn is_v6(&self) -> bool {
        matches!(self.subnet, IpNet::V6(_))
    }
}

/// Ranges up to this many addresses get a bitmap; larger ones (IPv6) a
/// sparse set, so a /64 is never enumerated.
const BITMAP_LIMIT: u128 = 1 << 24;

/// Which addresses of one pool are taken, with a cursor so the next
/// allocation starts where the last one ended (a /16 at 99 % full finds a
/// free address in a few words, and released addresses are not reused at
/// once).
#[derive(Debug)]
pub(crate) struct PoolIndex {
    used: Used,
    /// Allocations (excluded addresses not counted).
    count: u128,
    capacity: u128,
    total: u128,
    cursor: u128,
}

#[derive(Debug)]
enum Used {
    /// One bit per offset into the pool's ranges; excluded offsets set.
    Bits(Vec<u64>),
    /// Offsets in use.
    Sparse(BTreeSet<u128>),
}

impl PoolIndex {
    pub(crate) fn new(pool: &Pool) -> Self {
        let total: u128 = pool.ranges.iter().map(|(a, b)| b - a + 1).sum();
        let excluded_inside: Vec<u128> = pool
            .excluded
            .iter()
            .filter_map(|n| pool.offset_of(*n))
            .collect();
        let used = if total <= BITMAP_LIMIT {
            let mut bits = vec![0u64; total.div_ceil(64) as usize];
            for o in &excluded_inside {
                bits[(*o / 64) as usize] |= 1 << (o % 64);
            }
            // Offsets past the end of the last word never exist.
            for o in total..(bits.len() as u128 * 64) {
                bits[(o / 64) as usize] |= 1 << (o % 64);
            }
            Used::Bits(bits)
        } else {
            Used::Sparse(BTreeSet::new())
        };
        Self {
            used,
            count: 0,
            capacity: total - excluded_inside.len() as u128,
            total,
            cursor: 0,
        }
    }

    pub(crate) fn used(&self) -> u128 {
        self.count
    }

    pub(crate) fn capacity(&self) -> u128 {
        self.capacity
    }

    /// Takes the next free address, or `None` if the pool is full or
    /// disabled.
    pub(crate) fn take(&mut self, pool: &Pool) -> Option<IpAddr> {
        if pool.disable || self.count >= self.capacity {
            return None;
        }
        let offset = match &mut self.used {
            Used::Bits(bits) => {
                let words = bits.len();
                let start = (self.cursor / 64) as usize % words.max(1);
                let mut found = None;
                for i in 0..=words {
                    let w = (start + i) % words;
                    let free = !bits[w];
                    if free != 0 {
                        let bit = free.trailing_zeros();
                        bits[w] |= 1 << bit;
                        found = Some(w as u128 * 64 + u128::from(bit));
                        break;
                    }
                }
                found?
            }
            Used::Sparse(set) => {
                let mut o = self.cursor % self.total;
                let mut tries = 0u128;
                loop {
                    if !set.contains(&o) && !pool.excluded.contains(&pool.at(o)) {
                        set.insert(o);
                        break o;
                    }
                    tries += 1;
                    if tries > self.total {
                        return None;
                    }
                    o = (o + 1) % self.total;
                }
            }
        };
        self.count += 1;
        self.cursor = (offset + 1) % self.total.max(1);
        Some(addr(pool.is_v6(), pool.at(offset)))
    }

    /// Takes one given address, or says why it cannot be had.
    pub(crate) fn take_exact(&mut self, pool: &Pool, address: IpAddr) -> Result<(), String> {
        if let Some(why) = pool.refusal(address) {
            return Err(why);
        }
        let n = num(address);
        let o = pool.offset_of(n).expect("refusal() checked the ranges");
        let taken = match &mut self.used {
            Used::Bits(bits) => {
                let (w, b) = ((o / 64) as usize, o % 64);
                let was = bits[w] & (1 << b) != 0;
                bits[w] |= 1 << b;
                was
            }
            Used::Sparse(set) => !set.insert(o),
        };
        if taken {
            return Err("already held by another pod".into());
        }
        self.count += 1;
        Ok(())
    }

    /// Marks an address taken (state loaded from the store).
    pub(crate) fn mark(&mut self, pool: &Pool, address: IpAddr) {
        let Some(o) = pool.offset_of(num(address)) else {
            return;
        };
        let newly = match &mut self.used {
            Used::Bits(bits) => {
                let (w, b) = ((o / 64) as usize, o % 64);
                let was = bits[w] & (1 << b) != 0;
                bits[w] |= 1 << b;
                !was
            }
            Used::Sparse(set) => set.insert(o),
        };
        if newly {
            self.count += 1;
        }
    }

    /// Frees an address.
    pub(crate) fn free(&mut self, pool: &Pool, address: IpAddr) {
        let n = num(address);
        let Some(o) = pool.offset_of(n) else {
            return;
        };
        if pool.excluded.contains(&n) {
            return;
        }
        let was = match &mut self.used {
            Used::Bits(bits) => {
                let (w, b) = ((o / 64) as usize, o % 64);
                let was = bits[w] & (1 << b) != 0;
                bits[w] &= !(1 << b);
                was
            }
            Used::Sparse(set) => set.remove(&o),
        };
        if was {
            self.count -= 1;
        }
    }
}

impl Pool {
    /// Offset of address number `n` in the pool's ranges.
    /// Whether `address` is one of the pool's (in its ranges, excluded or
    /// not).
    pub(crate) fn covers(&self, address: IpAddr) -> bool {
        self.offset_of(num(address)).is_some()
    }

    fn offset_of(&self, n: u128) -> Option<u128> {
        let mut base = 0;
        for &(a, b) in &self.ranges {
            if (a..=b).contains(&n) {
                return Some(base + (n - a));
            }
            base += b - a + 1;
        }
        None
    }

    /// Why this pool can never hand out `address` (whoever holds it now),
    /// or `None` if it can: the local index and the cluster store both ask.
    pub(crate) fn refusal(&self, address: IpAddr) -> Option<String> {
        if !self.subnet.contains(&address) {
            return Some(format!("{address} is outside its subnet {}", self.subnet));
        }
        if self.disable {
            return Some("the pool is disabled".into());
        }
        let n = num(address);
        if self.offset_of(n).is_none() {
            return Some("outside the pool's ranges".into());
        }
        if self.excluded.contains(&n) {
            return Some("excluded (network, broadcast, gateway or excludeIPs)".into());
        }
        None
    }

    /// Whether `address` is one this pool hands out (inside its ranges, not
    /// excluded): the cluster store walks its blocks with it.
    pub(crate) fn holds(&self, address: IpAddr) -> bool {
        let n = num(address);
        self.offset_of(n).is_some() && !self.excluded.contains(&n)
    }

    /// The pool's ranges as numbers, in order.
    pub(crate) fn ranges(&self) -> &[(u128, u128)] {
        &self.ranges
    }

    /// Address number at `offset`.
    fn at(&self, offset: u128) -> u128 {
        let mut left = offset;
        for &(a, b) in &self.ranges {
            let size = b - a + 1;
            if left < size {
                return a + left;
            }
            left -= size;
        }
        unreachable!("offset {offset} beyond the pool's ranges")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec(name: &str, subnet: &str, ips: &[&str], gw: Option<&str>) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            exclude_ips: vec![],
            gateway: gw.map(|g| g.parse().unwrap()),
            routes: vec![],
            node_name: vec![],
            disable: false,
            namespace: vec![],
            networks: vec![],
            ip_version: None,
        }
    }

    #[test]
    fn seed_solution2_ranges_overrunning_their_27_are_rejected() {
        let err = Pool::new(spec(
            "eno3np1-rail1-node1",
            "172.16.1.0/27",
            &["172.16.1.2-172.16.1.32"],
            None,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("172.16.1.2-172.16.1.32"), "{err}");
        let err = Pool::new(spec(
            "p",
            "172.16.1.0/27",
            &["172.16.1.2-172.16.1.256"],
            None,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("172.16.1.256"), "{err}");
    }

    #[test]
    fn route_next_hops_must_be_on_the_subnet() {
        let mut s = spec("p", "172.16.1.0/24", &[], Some("172.16.1.254"));
        s.routes.push(RouteSpec {
            dst: "172.16.0.0/16".parse().unwrap(),
            gw: "172.16.2.254".parse().unwrap(),
        });
        assert!(matches!(Pool::new(s), Err(IpamError::RouteGateway { .. })));
    }
}
