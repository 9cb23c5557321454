//! DEL's code: each [`Teardown`] of one rail on this node. A failed ADD
//! runs the same code for what it had made.

use super::{
    RailService,
    pod::{remove_rail, strip_rail},
    steps::{TakeDown, Teardown},
};
use crate::{
    api::Attachment,
    link::RailLink,
    netns::PodNetns,
    rdma,
    rtnl::{self, with_rtnl},
    sriov,
};

/// One rail of one pod on this node, as DEL sees it.
pub(super) struct Rail<'a> {
    /// The node's side.
    pub(super) service: &'a RailService,
    /// Container, interface, CNI_ARGS.
    pub(super) att: &'a Attachment,
    /// How its interface was made.
    pub(super) kind: &'static dyn RailLink,
    /// The pod's netns; `None` when it is gone (the kernel has taken its
    /// interfaces and returned what it held).
    pub(super) netns: Option<&'a PodNetns>,
}

impl TakeDown for Rail<'_> {
    fn teardown(&mut self, t: Teardown, all: &[Teardown]) -> Result<(), String> {
        match t {
            Teardown::ReturnRdma => self.return_rdma(),
            Teardown::ClearInterface => self.clear_interface(),
            Teardown::GiveHostBack => {
                // From the pod only if its interface was made there: else an
                // interface of that name in the pod is someone else's.
                let from = self
                    .netns
                    .filter(|_| all.contains(&Teardown::ClearInterface));
                let who = self
                    .service
                    .holding(&self.att.container_id, &self.att.ifname);
                self.kind.give_host_back(&who, from)
            }
            Teardown::Release => self
                .service
                .ipam
                .release(&self.att.container_id, &self.att.ifname)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }
}

impl Rail<'_> {
    /// The isolated RDMA device goes home (a gone netns has returned it
    /// already, maybe renamed: its name is put back from the record).
    fn return_rdma(&self) -> Result<(), String> {
        let (svc, att) = (self.service, self.att);
        let record: Option<sriov::RdmaRecord> =
            sriov::load(&svc.vf_records, "rdma", &att.container_id, &att.ifname);
        match self.netns {
            Some(ns) => {
                let moved = rdma::give_back(ns, &att.ifname)
                    .map_err(|e| format!("returning the RDMA device: {e}"))?;
                if !moved.is_empty() {
                    tracing::info!(devices = ?moved, "RDMA devices returned to the host");
                }
            }
            None => {
                if let Some(r) = &record {
                    rdma::restore_name(
                        &svc.sysfs_root,
                        &r.pci_address,
                        &r.device,
                        std::time::Duration::from_secs(10),
                    )?;
                }
            }
        }
        sriov::forget(&svc.vf_records, "rdma", &att.container_id, &att.ifname);
        Ok(())
    }

    /// The pod side goes: the program's pins, railnet's rules, and the
    /// interface (railnet's) or railnet's addresses on it (another's).
    fn clear_interface(&self) -> Result<(), String> {
        let pins = self.service.pins(&self.att.container_id);
        let ifname = self.att.ifname.clone();
        let Some(ns) = self.netns else {
            // The netns is gone: its interfaces went with it; only pins
            // are left to remove.
            return joined(pins.detach(&ifname, None));
        };
        let owned = self.kind.owns_interface();
        let ours = self
            .service
            .ipam
            .addresses_of(&self.att.container_id, &self.att.ifname);
        let errors = ns
            .run(move || {
                let index = with_rtnl(|h| {
                    let ifname = ifname.clone();
                    async move { rtnl::link_by_name(&h, &ifname).await.ok().flatten() }
                })
                .ok()
                .flatten()
                .map(|l| l.index);
                let mut errs = pins.detach(&ifname, index);
                if index.is_some() {
                    match with_rtnl(|h| async move {
                        if owned {
                            remove_rail(&h, &ifname).await
                        } else {
                            strip_rail(&h, &ifname, &ours).await
                        }
                    }) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => errs.push(e),
                        Err(e) => errs.push(e.to_string()),
                    }
                }
                errs
            })
            .map_err(|e| e.to_string())?;
        joined(errors)
    }
}

/// `Ok` when nothing went wrong, else every error in one line.
fn joined(errors: Vec<String>) -> Result<(), String> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
