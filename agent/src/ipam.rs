//! Address pools and allocation.
//!
//! This is the foundation's allocator: pools come from the agent's config
//! file, allocations live in memory keyed by (container ID, interface). The
//! durable embedded store and the Kubernetes store go behind the same calls.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
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
    ranges: Vec<(u128, u128)>,
    excluded: BTreeSet<u128>,
}

/// An address as a number, so IPv4 and IPv6 ranges share one allocator.
fn num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr(v6: bool, n: u128) -> IpAddr {
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
    /// A network names a pool that does not exist.
    #[error("no pool named {0:?} in the agent's config; known pools: {1}")]
    UnknownPool(String, String),
    /// Every pool tried is full.
    #[error("no free address in pools {0}")]
    Exhausted(String),
}

impl Pool {
    /// Validates a spec: every range and the gateway inside the subnet.
    pub fn new(spec: PoolSpec) -> Result<Self, IpamError> {
        let net = spec.subnet.trunc();
        let v6 = matches!(net, IpNet::V6(_));
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
        Ok(Self {
            name: spec.name,
            subnet: net,
            gateway: spec.gateway,
            ranges,
            excluded,
        })
    }

    /// Whether this is an IPv6 pool.
    pub fn is_v6(&self) -> bool {
        matches!(self.subnet, IpNet::V6(_))
    }

    /// Free candidates in order; lazy, so an IPv6 /64 is never enumerated
    /// beyond the first free address.
    fn first_free(&self, used: &BTreeSet<u128>) -> Option<IpAddr> {
        for &(a, b) in &self.ranges {
            let mut n = a;
            loop {
                if !self.excluded.contains(&n) && !used.contains(&n) {
                    return Some(addr(self.is_v6(), n));
                }
                if n == b {
                    break;
                }
                n += 1;
            }
        }
        None
    }
}

/// An address handed to one attachment.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// The pool it came from.
    pub pool: Pool,
    /// The address.
    pub address: IpAddr,
}

/// Which family an allocation is for.
type Key = (String, String, bool);

/// Pools plus the allocations made from them.
#[derive(Debug, Default)]
pub struct Ipam {
    pools: BTreeMap<String, Pool>,
    held: Mutex<BTreeMap<Key, (String, IpAddr)>>,
}

impl Ipam {
    /// Builds the allocator over validated pools.
    pub fn new(specs: Vec<PoolSpec>) -> Result<Self, IpamError> {
        let mut pools = BTreeMap::new();
        for spec in specs {
            let pool = Pool::new(spec)?;
            if pools.contains_key(&pool.name) {
                return Err(IpamError::Duplicate(pool.name));
            }
            pools.insert(pool.name.clone(), pool);
        }
        Ok(Self {
            pools,
            held: Mutex::default(),
        })
    }

    /// Allocates for (container, ifname) from the first pool of `names` with
    /// room; a repeated call for the same key returns the same address.
    /// All of `names` must be pools of one family.
    pub fn allocate(
        &self,
        container_id: &str,
        ifname: &str,
        names: &[String],
    ) -> Result<Allocation, IpamError> {
        let pools = names
            .iter()
            .map(|name| {
                self.pools.get(name).ok_or_else(|| {
                    IpamError::UnknownPool(
                        name.clone(),
                        self.pools.keys().cloned().collect::<Vec<_>>().join(", "),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let v6 = pools.first().is_some_and(|p| p.is_v6());
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let key = (container_id.to_owned(), ifname.to_owned(), v6);
        if let Some((pool, address)) = held.get(&key) {
            return Ok(Allocation {
                pool: self.pools[pool].clone(),
                address: *address,
            });
        }
        for pool in pools {
            let used: BTreeSet<u128> = held
                .values()
                .filter(|(p, _)| *p == pool.name)
                .map(|(_, a)| num(*a))
                .collect();
            if let Some(address) = pool.first_free(&used) {
                held.insert(key, (pool.name.clone(), address));
                return Ok(Allocation {
                    pool: pool.clone(),
                    address,
                });
            }
        }
        Err(IpamError::Exhausted(names.join(", ")))
    }

    /// Releases whatever (container, ifname) holds, both families; true if
    /// it held anything.
    pub fn release(&self, container_id: &str, ifname: &str) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let before = held.len();
        held.retain(|(c, i, _), _| !(c == container_id && i == ifname));
        held.len() != before
    }

    /// Releases everything a container holds; returns how many addresses.
    pub fn release_container(&self, container_id: &str) -> usize {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let before = held.len();
        held.retain(|(cid, _, _), _| cid != container_id);
        before - held.len()
    }

    /// Number of addresses held.
    pub fn allocated(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, subnet: &str, ips: &[&str], gw: Option<&str>) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            exclude_ips: vec![],
            gateway: gw.map(|g| g.parse().unwrap()),
        }
    }

    #[test]
    fn ipv6_pools_allocate_without_enumerating_a_64() {
        let ipam = Ipam::new(vec![spec(
            "v6",
            "fd00:16:1::/64",
            &[],
            Some("fd00:16:1::254"),
        )])
        .unwrap();
        let a = ipam.allocate("c1", "net1", &["v6".into()]).unwrap();
        assert_eq!(a.address, "fd00:16:1::1".parse::<IpAddr>().unwrap());
        let b = ipam.allocate("c2", "net1", &["v6".into()]).unwrap();
        assert_eq!(b.address, "fd00:16:1::2".parse::<IpAddr>().unwrap());
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
        assert!(Pool::new(spec("p", "172.16.1.0/27", &["172.16.1.256"], None)).is_err());
    }

    #[test]
    fn never_hands_out_gateway_network_broadcast_or_twice() {
        let ipam = Ipam::new(vec![spec("p", "10.0.0.0/30", &[], Some("10.0.0.1"))]).unwrap();
        let a = ipam.allocate("c1", "net1", &["p".into()]).unwrap();
        assert_eq!(a.address, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            ipam.allocate("c1", "net1", &["p".into()]).unwrap().address,
            a.address,
            "a repeated ADD gets the same address"
        );
        assert_eq!(
            ipam.allocate("c2", "net1", &["p".into()]).unwrap_err(),
            IpamError::Exhausted("p".into())
        );
        assert!(ipam.release("c1", "net1"));
        assert_eq!(
            ipam.allocate("c2", "net1", &["p".into()]).unwrap().address,
            a.address
        );
    }
}
