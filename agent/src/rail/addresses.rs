//! A rail's addresses: allocation for an ADD, and the IPAM-only requests
//! of an interface another plugin makes (railnet as the IPAM plugin).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{RailService, check_ids, pod::RailAddresses, same_netns, sweep_can_see};
use crate::{
    api::{ApiError, IpamRequest, IpamResult, ResultIp, ResultRoute, code},
    ipam::{AllocationKey, Family, IpamError, PoolRequest},
    netns::{NetnsId, PodNetns},
    rtnl::{self, describe, with_rtnl},
};

/// Who a pod is, as the runtime said (CNI_ARGS).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PodIds<'a> {
    pub(super) namespace: Option<&'a str>,
    pub(super) name: Option<&'a str>,
    pub(super) uid: Option<&'a str>,
}

impl RailService {
    /// IPAM only: addresses for an interface another plugin makes.
    pub fn ipam_add(
        &self,
        req: &IpamRequest,
        netns: Option<&PodNetns>,
    ) -> Result<IpamResult, ApiError> {
        check_ids(&req.container_id, &req.ifname)?;
        let _gate = self.sweep_gate.read().unwrap_or_else(|p| p.into_inner());
        let netns_id = netns.map(PodNetns::id).unwrap_or_default();
        sweep_can_see(netns_id)?;
        same_netns(&self.ipam, &req.container_id, &req.ifname, netns_id)?;
        let addrs = match self.allocate(
            &req.container_id,
            &req.ifname,
            &req.ippools,
            req.match_master.as_deref(),
            netns_id,
            (
                &req.network,
                PodIds {
                    namespace: req.namespace.as_deref(),
                    name: req.pod_name.as_deref(),
                    uid: req.pod_uid.as_deref(),
                },
                &req.ips,
            ),
        ) {
            Ok(a) => a,
            Err(e) => {
                // One family may have been given before the other failed.
                if let Err(undo) = self.ipam.release(&req.container_id, &req.ifname) {
                    tracing::warn!(error = %undo, "could not release a failed IPAM ADD's first address");
                }
                return Err(e);
            }
        };
        let mut ips = Vec::new();
        if let Some(v4) = addrs.v4 {
            ips.push(ResultIp {
                address: IpNet::V4(v4),
                gateway: addrs.gw4.map(IpAddr::V4),
            });
        }
        if let Some(v6) = addrs.v6 {
            ips.push(ResultIp {
                address: IpNet::V6(v6),
                gateway: addrs.gw6.map(IpAddr::V6),
            });
        }
        let routes = addrs
            .extra_routes
            .iter()
            .map(|(dst, gw)| ResultRoute {
                dst: *dst,
                gw: Some(*gw),
                priority: 0,
            })
            .collect();
        Ok(IpamResult { ips, routes })
    }

    /// IPAM only: release.
    pub fn ipam_del(&self, req: &IpamRequest) -> Result<(), ApiError> {
        check_ids(&req.container_id, &req.ifname)?;
        self.ipam
            .release(&req.container_id, &req.ifname)
            .map(|_| ())
            .map_err(|e| ApiError::new(code::IO, "IPAM release", e.to_string()))
    }

    /// One address per family the network has pools for.
    pub(super) fn allocate(
        &self,
        container_id: &str,
        ifname: &str,
        ippools: &crate::netconf::IpPools,
        match_master: Option<&str>,
        netns: NetnsId,
        // The network, the pod, and the addresses it asked for.
        (network, pod, requested): (&str, PodIds<'_>, &[IpAddr]),
    ) -> Result<RailAddresses, ApiError> {
        let namespace = pod.namespace;
        let owner = crate::ipam::cluster::Owner {
            netns,
            network: network.to_owned(),
            pod_namespace: pod.namespace.unwrap_or_default().to_owned(),
            pod_name: pod.name.unwrap_or_default().to_owned(),
            pod_uid: pod.uid.unwrap_or_default().to_owned(),
        };
        let master_addresses = if let Some(master) = match_master {
            let name = master.to_owned();
            let addrs = with_rtnl(|h| async move {
                match rtnl::link_by_name(&h, &name).await {
                    Ok(Some(l)) => rtnl::networks(&h, l.index)
                        .await
                        .map(Some)
                        .map_err(|e| describe(&e)),
                    Ok(None) => Ok(None),
                    Err(e) => Err(describe(&e)),
                }
            })
            .map_err(|e| ApiError::dataplane("rtnetlink", e.to_string()))?
            .map_err(|e| ApiError::dataplane("reading the master's addresses", e))?;
            // A master that is not there is the config's fault, not the
            // pools': said as without matchMasterSubnet.
            let Some(addrs) = addrs else {
                return Err(ApiError::new(
                    code::INVALID_CONFIG,
                    format!("master {master:?} not found on this node"),
                    "set \"master\" to one of the node's rail NICs (`ip link` lists them)",
                ));
            };
            Some(addrs)
        } else {
            None
        };
        let mut addrs = RailAddresses::default();
        let pools = self.ipam.pools();
        for (patterns, family) in [(&ippools.ipv4, Family::V4), (&ippools.ipv6, Family::V6)] {
            if patterns.is_empty() {
                continue;
            }
            let candidates = crate::ipam::select(
                &pools,
                &PoolRequest {
                    patterns,
                    family,
                    node: &self.node_name,
                    namespace,
                    network,
                    master_addresses: master_addresses.as_deref(),
                },
            );
            let key = AllocationKey {
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
                family,
            };
            // An address the pod asked for (runtimeConfig.ips), else the
            // next free one.
            let wanted = requested
                .iter()
                .find(|a| a.is_ipv6() == (family == Family::V6));
            let alloc = self
                .ipam
                .allocate_owned(key, &candidates, wanted.copied(), &owner)
                .map_err(|e| match e {
                    // The API server is away: the runtime tries again.
                    IpamError::Unavailable(_) => {
                        ApiError::new(code::TRY_AGAIN, "IPAM", e.to_string())
                    }
                    _ => ApiError::new(code::POOL_EXHAUSTED, "IPAM", e.to_string()),
                })?;
            // A repeated ADD may name a pool removed since (its address
            // is still held): say so rather than guess its subnet.
            let Some(pool) = pools.get(&alloc.pool) else {
                return Err(ApiError::new(
                    code::POOL_EXHAUSTED,
                    "IPAM",
                    format!(
                        "{} is held from pool {}, which no longer exists; delete the pod",
                        alloc.address, alloc.pool
                    ),
                ));
            };
            let net = IpNet::new(alloc.address, pool.subnet.prefix_len())
                .expect("prefix comes from a valid subnet");
            let routes = pool.routes.iter().map(|r| (r.dst.trunc(), r.gw));
            addrs.extra_routes.extend(routes);
            match (net, pool.gateway) {
                (IpNet::V4(n), gw) => {
                    addrs.v4 = Some(n);
                    addrs.gw4 = match gw {
                        Some(IpAddr::V4(g)) => Some(g),
                        _ => None,
                    };
                }
                (IpNet::V6(n), gw) => {
                    addrs.v6 = Some(n);
                    addrs.gw6 = match gw {
                        Some(IpAddr::V6(g)) => Some(g),
                        _ => None,
                    };
                }
            }
        }
        Ok(addrs)
    }
}
