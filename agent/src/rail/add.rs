//! The real node's side of an ADD: each [`Step`] of one rail, and what the
//! ADD answers once they have all run.

use std::os::fd::AsFd;

use ipnet::IpNet;

use super::{
    PodIds,
    pod::{PodRail, RailAddresses},
    rdma_plan::{RdmaPlan, pci_address_of_netdev, rdma_plan},
    steps::{Node, Step, TakeDown, Teardown},
    take_down::Rail,
};
use crate::{
    api::{AddResult, ApiError, RailRdma, code},
    link::{LinkCx, Taken},
    netconf::NetConf,
    netns::{NetnsId, PodNetns},
    rdma, sriov,
};

/// One rail's ADD under way: what its steps have made so far.
pub(super) struct Adding<'a> {
    rail: Rail<'a>,
    conf: &'a NetConf,
    netns_id: NetnsId,
    rdma: RdmaPlan,
    held_before: bool,
    addrs: Option<RailAddresses>,
    taken: Option<Taken>,
    mtu: u32,
    result: Option<AddResult>,
}

impl<'a> Adding<'a> {
    /// An ADD of `rail` (whose netns is given) for network `conf`, with the
    /// RDMA plan made before anything changed.
    pub(super) fn new(
        rail: Rail<'a>,
        conf: &'a NetConf,
        netns_id: NetnsId,
        rdma: RdmaPlan,
        held_before: bool,
    ) -> Self {
        Self {
            rail,
            conf,
            netns_id,
            rdma,
            held_before,
            addrs: None,
            taken: None,
            mtu: 0,
            result: None,
        }
    }

    fn netns(&self) -> &'a PodNetns {
        self.rail.netns.expect("an ADD has its pod's netns")
    }

    fn cx(&self) -> LinkCx<'_> {
        let att = self.rail.att;
        LinkCx {
            who: self.rail.service.holding(&att.container_id, &att.ifname),
            args: &att.args,
            conf: self.conf,
            netns: self.netns(),
            rdma_moved: matches!(self.rdma, RdmaPlan::Isolate(_)),
        }
    }

    fn allocate(&mut self) -> Result<(), ApiError> {
        let (svc, att, conf) = (self.rail.service, self.rail.att, self.conf);
        let addrs = svc.allocate(
            &att.container_id,
            &att.ifname,
            &conf.ippools,
            conf.match_master_subnet.then_some(conf.master.as_str()),
            self.netns_id,
            (
                &conf.name,
                PodIds {
                    namespace: att.args.get("K8S_POD_NAMESPACE").map(String::as_str),
                    name: att.args.get("K8S_POD_NAME").map(String::as_str),
                    uid: att.args.get("K8S_POD_UID").map(String::as_str),
                },
                &conf.requested_ips(),
            ),
        );
        match addrs {
            Ok(a) => {
                self.addrs = Some(a);
                Ok(())
            }
            Err(e) => {
                // One family may have been given before the other failed.
                if !self.held_before
                    && let Err(undo) = self.teardown(Teardown::Release, &[])
                {
                    tracing::warn!(error = %undo, "could not release a failed ADD's first address");
                }
                Err(e)
            }
        }
    }

    /// Moves the VF's RDMA device into the pod, recorded first: if the
    /// agent dies right after the move, DEL (or the next agent) still
    /// knows the device to restore — the kernel returns it, maybe renamed,
    /// when the netns dies.
    fn isolate_rdma(&mut self) -> Result<(), ApiError> {
        let (svc, att) = (self.rail.service, self.rail.att);
        // A rebound VF (a new GUID) has a new RDMA device.
        if self.taken.as_ref().is_some_and(|t| t.rebound) {
            self.rdma = rdma_plan(self.conf, self.rail.kind, &svc.sysfs_root)?;
        }
        let RdmaPlan::Isolate(dev) = &self.rdma else {
            return Err(ApiError::dataplane(
                "RDMA isolation was planned without a device",
                "a bug: please report it",
            ));
        };
        let record = sriov::RdmaRecord {
            pci_address: self.conf.device_id.clone().unwrap_or_default(),
            device: dev.name.clone(),
            holder: sriov::Holder::of(&att.args, &att.container_id, &att.ifname),
            netns_inode: self.netns_id.inode,
        };
        sriov::save(
            &svc.vf_records,
            "rdma",
            &att.container_id,
            &att.ifname,
            &record,
        )
        .map_err(|e| {
            ApiError::new(
                code::IO,
                format!("cannot record RDMA device {} before moving it", dev.name),
                format!("{e}; without the record a crash would leave it unrestorable"),
            )
        })?;
        if let Err(e) = rdma::isolate(dev, self.netns()) {
            sriov::forget(&svc.vf_records, "rdma", &att.container_id, &att.ifname);
            return Err(ApiError::dataplane(
                format!("RDMA isolation of {} failed", dev.name),
                e.to_string(),
            ));
        }
        tracing::info!(device = %dev.name, ifname = %att.ifname, "RDMA device moved into the pod netns");
        Ok(())
    }

    fn configure_pod(&mut self) -> Result<(), ApiError> {
        let (svc, att, conf) = (self.rail.service, self.rail.att, self.conf);
        let plan = PodRail {
            ifname: att.ifname.clone(),
            rail: conf.rail,
            addrs: self.addrs.clone().unwrap_or_default(),
            rdma_cidrs: conf.rdma_cidrs.clone(),
            routing: conf.routing,
            mtu: self.mtu,
            netns: self.netns_id,
            pins: svc.pins(&att.container_id),
            detect: (conf.detect_ip_conflict, conf.detect_gateway),
            ethernet: self.rail.kind.ethernet(),
            sysctl_root: svc.sysctl_root.clone(),
        };
        let result = self
            .netns()
            .run(move || plan.configure())
            .map_err(|e| ApiError::dataplane("entering the pod netns", e.to_string()))??;
        self.result = Some(result);
        Ok(())
    }

    /// What the ADD answers, once every step has run: the pod side's
    /// result and the RDMA device the pod uses on this rail.
    pub(super) fn finish(mut self) -> AddResult {
        let mut result = self.result.take().expect("the pod side was configured");
        result.rdma = self.rdma_result(&result);
        let (container, ifname) = (&self.rail.att.container_id, &self.rail.att.ifname);
        match (&self.rdma, &result.rdma) {
            (RdmaPlan::Shared(_), Some(r)) => tracing::info!(
                container = %container,
                ifname = %ifname,
                device = %r.device,
                port = r.port,
                gid_index = ?r.gid_index,
                master = %self.conf.master,
                "pod shares the master's RDMA device"
            ),
            (RdmaPlan::Vf(bdf), Some(r)) => tracing::info!(
                container = %container,
                ifname = %ifname,
                device = %r.device,
                gid_index = ?r.gid_index,
                vf = %bdf,
                "pod uses its VF's RDMA device, left in the host (shared mode)"
            ),
            (RdmaPlan::Vf(bdf), None) => tracing::warn!(
                container = %container,
                ifname = %ifname,
                vf = %bdf,
                "the pod's VF has no RDMA device (is it bound to its RDMA driver, mlx5_ib?): this rail carries TCP only"
            ),
            _ => {}
        }
        result
    }

    fn rdma_result(&self, result: &AddResult) -> Option<RailRdma> {
        let v4 = result.ips.iter().find_map(|ip| match ip.address {
            IpNet::V4(a) => Some(a.addr()),
            IpNet::V6(_) => None,
        });
        match &self.rdma {
            RdmaPlan::None => None,
            RdmaPlan::Shared(port) => Some(RailRdma {
                device: port.device.clone(),
                port: port.port,
                pci_address: pci_address_of_netdev(&self.conf.master),
                gid_index: v4.and_then(|a| rdma::roce_gid_index(&port.device, port.port, a)),
                isolated: false,
            }),
            RdmaPlan::Vf(bdf) => {
                let device = rdma::devices_of_pci(&self.rail.service.sysfs_root, bdf)
                    .into_iter()
                    .next()?;
                Some(RailRdma {
                    // A VF's device has one port. The host's sysfs shows
                    // it: in shared mode it stays there.
                    gid_index: v4
                        .filter(|_| self.rail.kind.ethernet())
                        .and_then(|a| rdma::roce_gid_index(&device, 1, a)),
                    device,
                    port: 1,
                    pci_address: Some(bdf.clone()),
                    isolated: false,
                })
            }
            RdmaPlan::Isolate(dev) => Some(RailRdma {
                device: dev.name.clone(),
                port: 1,
                pci_address: self.conf.device_id.clone(),
                // Its sysfs is visible only inside the pod now, so the GID
                // table is read there. An InfiniBand port has no RoCE GIDs
                // (NCCL uses its GID 0).
                gid_index: match v4 {
                    Some(a) if self.rail.kind.ethernet() => {
                        rdma::roce_gid_index_in(self.netns().fd().as_fd(), &dev.name, 1, a)
                            .unwrap_or_else(|e| {
                                tracing::warn!(device = %dev.name, error = %e, "could not read the isolated device's GID table");
                                None
                            })
                    }
                    _ => None,
                },
                isolated: true,
            }),
        }
    }
}

impl Node for Adding<'_> {
    fn run(&mut self, step: Step) -> Result<(), ApiError> {
        match step {
            Step::Allocate => self.allocate(),
            Step::TakeHost => {
                self.taken = self.rail.kind.take_host(&self.cx())?;
                Ok(())
            }
            Step::IsolateRdma => self.isolate_rdma(),
            Step::CreateInterface => {
                let started = std::time::Instant::now();
                self.mtu = self.rail.kind.create(&self.cx(), self.taken.as_ref())?;
                tracing::debug!(ifname = %self.rail.att.ifname, node_side_us = started.elapsed().as_micros() as u64, "node side of ADD");
                Ok(())
            }
            Step::ConfigurePod => self.configure_pod(),
        }
    }
}

impl TakeDown for Adding<'_> {
    fn teardown(&mut self, t: Teardown, all: &[Teardown]) -> Result<(), String> {
        self.rail.teardown(t, all)
    }
}
