//! Which pools may serve one rail of one pod, in order, and why the others
//! may not (the error a person reads when nothing fits).

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{Family, Pool};

/// What the network asks of IPAM for one family.
#[derive(Clone, Debug)]
pub struct PoolRequest<'a> {
    /// Pool names or wildcards (`eno3np1-rail1*`), in preference order.
    pub patterns: &'a [String],
    /// The family wanted.
    pub family: Family,
    /// This node's name, for node affinity.
    pub node: &'a str,
    /// The pod's namespace, when the runtime said (`K8S_POD_NAMESPACE`).
    pub namespace: Option<&'a str>,
    /// The network's name.
    pub network: &'a str,
    /// With `matchMasterSubnet`: the master's addresses on this node; only
    /// pools whose subnet holds one of them qualify.
    pub master_addresses: Option<&'a [IpNet]>,
}

/// A pool that was considered and refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Pool name (or the pattern that matched nothing).
    pub pool: String,
    /// Why.
    pub why: String,
}

/// The pools to try, in order, and the ones refused with reasons.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    /// Pool names to try in order.
    pub pools: Vec<String>,
    /// Refused pools.
    pub rejected: Vec<Rejection>,
}

/// Whether `name` matches `pattern`, where `*` matches any run of
/// characters (SpiderMultusConfig's wildcard pool names).
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// Picks the candidate pools for `req`.
pub fn select(pools: &BTreeMap<String, Pool>, req: &PoolRequest<'_>) -> Candidates {
    let mut out = Candidates::default();
    for pattern in req.patterns {
        let matched: Vec<&Pool> = pools
            .values()
            .filter(|p| wildcard_match(pattern, &p.name))
            .collect();
        if matched.is_empty() {
            out.rejected.push(Rejection {
                pool: pattern.clone(),
                why: format!(
                    "no pool by that name in the agent's config (known: {})",
                    pools.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        for pool in matched {
            if out.pools.contains(&pool.name) || out.rejected.iter().any(|r| r.pool == pool.name) {
                continue;
            }
            let family = if pool.is_v6() { Family::V6 } else { Family::V4 };
            let why = if family != req.family {
                Some(format!(
                    "is {family:?}, the request is for {:?}",
                    req.family
                ))
            } else if pool.disable {
                Some("disabled".into())
            } else if !pool.node_name.is_empty() && !pool.node_name.iter().any(|n| n == req.node) {
                Some(format!(
                    "node affinity [{}] excludes this node ({})",
                    pool.node_name.join(", "),
                    req.node
                ))
            } else if !pool.namespace.is_empty()
                && !req
                    .namespace
                    .is_some_and(|ns| pool.namespace.iter().any(|n| n == ns))
            {
                Some(format!(
                    "namespace affinity [{}] excludes namespace {}",
                    pool.namespace.join(", "),
                    req.namespace.unwrap_or("(unknown: no K8S_POD_NAMESPACE)")
                ))
            } else if !pool.networks.is_empty() && !pool.networks.iter().any(|n| n == req.network) {
                Some(format!(
                    "reserved for networks [{}], not {}",
                    pool.networks.join(", "),
                    req.network
                ))
            } else if let Some(addrs) = req.master_addresses
                && !addrs.iter().any(|a| pool.subnet.contains(&a.addr()))
            {
                Some(format!(
                    "matchMasterSubnet: subnet {} holds none of the master's addresses ({})",
                    pool.subnet,
                    if addrs.is_empty() {
                        "it has none".to_owned()
                    } else {
                        addrs
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ))
            } else {
                None
            };
            match why {
                Some(why) => out.rejected.push(Rejection {
                    pool: pool.name.clone(),
                    why,
                }),
                None => out.pools.push(pool.name.clone()),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::pool::tests::spec;

    #[test]
    fn wildcards_match_as_spiderpool_users_write_them() {
        assert!(wildcard_match("eno3np1-rail1*", "eno3np1-rail1-node1"));
        // A plain glob, as in Spiderpool: rail1* also matches rail10.
        assert!(wildcard_match("eno3np1-rail1*", "eno3np1-rail10-node1"));
        assert!(!wildcard_match("eno3np1-rail1*", "eno3np2-rail1-node1"));
        assert!(wildcard_match("*-node1", "eno3np1-rail1-node1"));
        assert!(wildcard_match("rail1", "rail1"));
        assert!(!wildcard_match("rail1", "rail12"));
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let mut pools = BTreeMap::new();
        let mut a = spec("r1-node1", "172.16.1.0/27", &[], None);
        a.node_name = vec!["node1".into()];
        let mut b = spec("r1-node2", "172.16.1.32/27", &[], None);
        b.node_name = vec!["node2".into()];
        let mut c = spec("r1-off", "172.16.1.64/27", &[], None);
        c.disable = true;
        for s in [a, b, c] {
            let p = Pool::new(s).unwrap();
            pools.insert(p.name.clone(), p);
        }
        let master: Vec<IpNet> = vec!["172.16.1.40/27".parse().unwrap()];
        let got = select(
            &pools,
            &PoolRequest {
                patterns: &["r1-*".into(), "nope".into()],
                family: Family::V4,
                node: "node2",
                namespace: Some("default"),
                network: "rail1",
                master_addresses: Some(&master),
            },
        );
        assert_eq!(got.pools, vec!["r1-node2".to_owned()]);
        let why: Vec<_> = got
            .rejected
            .iter()
            .map(|r| (r.pool.as_str(), r.why.as_str()))
            .collect();
        assert!(
            why.iter()
                .any(|(p, w)| *p == "r1-node1" && w.contains("node affinity")),
            "{why:?}"
        );
        assert!(
            why.iter()
                .any(|(p, w)| *p == "r1-off" && w.contains("disabled")),
            "{why:?}"
        );
        assert!(
            why.iter()
                .any(|(p, w)| *p == "nope" && w.contains("no pool")),
            "{why:?}"
        );
    }
}
