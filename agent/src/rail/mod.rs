//! ADD, DEL, CHECK and GC of one rail of a pod.
//!
//! An ADD allocates, takes what its interface kind needs of the host,
//! isolates RDMA, makes the interface and configures the pod side — as a
//! list of [`steps`], each pushing its undo, so a failed ADD leaves
//! nothing behind; DEL runs the same undos. How an interface is made is
//! its kind's ([`crate::link`]).

use std::path::PathBuf;

use crate::{
    api::{AddResult, ApiError, Attachment, code},
    dataplane::PodPins,
    ipam::Ipam,
    link,
    netconf::{Mode, NetConf, valid_ifname},
    netns::{NetnsId, PodNetns},
    rtnl::{self, describe, with_rtnl},
};

mod add;
mod addresses;
mod pod;
mod rdma_plan;
mod routes;
pub mod steps;
mod take_down;
mod upkeep;

use addresses::PodIds;
pub use link::{ipoib_temp_name, is_ipoib_temp_name, sweep_ipoib_leftovers};
use rdma_plan::rdma_plan;
use take_down::Rail;

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
    /// This node's name (pool node affinity).
    pub node_name: String,
    /// sysfs, for PCI address lookups (`/sys`).
    pub sysfs_root: PathBuf,
    /// Records of VFs given to pods (mode sriov), to restore them on DEL.
    pub vf_records: PathBuf,
    /// Where each pod's rails are written for its workload
    /// (`<dir>/<pod UID>/`); `None`: nowhere.
    pub pod_info: Option<crate::podinfo::PodInfo>,
    /// ADDs hold it shared, the sweep exclusively from its look at the
    /// live namespaces to its last release: an ADD finishing in between
    /// (its netns made after the look) would otherwise be taken for a
    /// pod that is gone.
    pub sweep_gate: std::sync::RwLock<()>,
    /// The masters (names, `*` wildcards) a network may name; empty: any.
    /// The node's operator sets it: a NAD author may otherwise hang pods
    /// off any interface of the node (its management NIC, say).
    pub allowed_masters: Vec<String>,
    /// How rail programs are attached (chosen once, at start).
    pub tc_attach: crate::dataplane::TcAttach,
    /// Where pods' interface sysctls are written (`/proc/sys`): an
    /// unprivileged container's `/proc/sys` is read-only, so the chart
    /// mounts the node's elsewhere and names it here.
    pub sysctl_root: PathBuf,
    /// The DRA driver, once started (`--dra`): the DRA network's ADD and
    /// DEL go to it.
    pub dra: std::sync::OnceLock<std::sync::Arc<crate::dra::Dra>>,
}

/// Refuses an ADD for (container, ifname) from another netns than the one
/// its addresses were allocated for: a repeat ADD comes from the same pod;
/// another caller naming that container would be handed the pod's
/// addresses, wired into its own netns. Unknown (zero) parts are not held
/// against it.
fn same_netns(ipam: &Ipam, container_id: &str, ifname: &str, now: NetnsId) -> Result<(), ApiError> {
    let Some(then) = ipam.netns_of(container_id, ifname) else {
        return Ok(());
    };
    let differs = (then.inode != 0 && now.inode != 0 && then.inode != now.inode)
        || (then.cookie != 0 && now.cookie != 0 && then.cookie != now.cookie);
    if differs {
        return Err(ApiError::new(
            code::INVALID_ENV,
            format!("{container_id}/{ifname} holds addresses made for another network namespace"),
            "an ADD repeated for a container must come from its own netns: is CNI_CONTAINERID another pod's?",
        ));
    }
    Ok(())
}

/// Refuses a pod netns the sweep could not find later (not pinned under
/// `/run/netns` or `/var/run/netns`, and no process of it visible in
/// `/proc`): the sweep would release its addresses and pins within one
/// interval, taking the pod for gone.
fn sweep_can_see(id: NetnsId) -> Result<(), ApiError> {
    if id.inode == 0 || crate::netns::path_of(id.inode).is_some() {
        return Ok(());
    }
    Err(ApiError::new(
        code::INVALID_ENV,
        "the pod's network namespace is not visible to the agent",
        "it is neither pinned under /run/netns or /var/run/netns nor held by a process the agent can see \
         (its CNI_NETNS is likely /proc/<pid>/ns/net): run the agent with the host's PID namespace \
         (chart: agent.hostPID=true), or the agent would take the pod for gone",
    ))
}

/// The one check of the ids a request names, before either is used (a
/// container ID becomes a directory name, an interface name a netdev's).
fn check_ids(container_id: &str, ifname: &str) -> Result<(), ApiError> {
    if !valid_container_id(container_id) {
        return Err(ApiError::new(
            code::INVALID_ENV,
            "invalid CNI_CONTAINERID",
            format!("{container_id:?}: use letters, digits, '-', '_' and '.'"),
        ));
    }
    if !valid_ifname(ifname) {
        return Err(ApiError::new(
            code::INVALID_ENV,
            "invalid CNI_IFNAME",
            format!("{ifname:?}: 1 to 15 bytes, no '/', ':' or spaces"),
        ));
    }
    Ok(())
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

/// The network config of an ADD or CHECK, checked: the typed one the CNI
/// sent, checked again, or (an older CNI sent only the text) parsed here.
fn conf_of(att: &Attachment) -> Result<NetConf, ApiError> {
    let conf = match &att.conf {
        Some(conf) => conf.clone().checked(),
        None => NetConf::parse(att.netconf.to_string().as_bytes()),
    };
    conf.map_err(|e| ApiError::invalid_config("invalid network config", e.to_string()))
}

/// Sets `alias` on interface `ifname` in the pod's netns.
fn label_interface(netns: &PodNetns, ifname: &str, alias: &str) -> Result<(), String> {
    let (ifname, alias) = (ifname.to_owned(), alias.to_owned());
    netns
        .run(move || {
            with_rtnl(|h| async move {
                let link = rtnl::link_by_name(&h, &ifname)
                    .await
                    .map_err(|e| describe(&e))?
                    .ok_or_else(|| format!("{ifname} is not in the pod"))?;
                rtnl::set_alias(&h, link.index, &alias)
                    .await
                    .map_err(|e| describe(&e))
            })
            .map_err(|e| e.to_string())?
        })
        .map_err(|e| e.to_string())?
}

impl RailService {
    /// The pins of `container_id`, attaching as this service does.
    fn pins(&self, container_id: &str) -> PodPins {
        PodPins::new(&self.pin_root, container_id).attaching_with(self.tc_attach)
    }

    /// CNI ADD. Must run on a thread of its own (it enters the pod netns on
    /// further threads and blocks on netlink). A Kubernetes pod's rail is
    /// also written where its workload reads it ([`crate::podinfo`]).
    pub fn add(&self, att: &Attachment, netns: &PodNetns) -> Result<AddResult, ApiError> {
        let _gate = self.sweep_gate.read().unwrap_or_else(|p| p.into_inner());
        let conf = conf_of(att)?;
        let result = self.add_rail(att, &conf, netns)?;
        let rail = crate::podinfo::RailInfo::of(
            &att.container_id,
            &att.ifname,
            conf.rail,
            &conf.name,
            &result,
            &crate::sriov::Holder::pod_of(&att.args),
        );
        // Best effort, like Multus's device info: the rail works without
        // them; the workload's files say what they have. On the interface
        // (the pod reads it there itself) and, with a pod-info directory,
        // in the pod's directory on the node.
        if let Err(e) = label_interface(netns, &att.ifname, &rail.alias()) {
            tracing::warn!(ifname = %att.ifname, error = %e, "could not write the rail's record on its interface");
        }
        if let (Some(info), Some(uid)) = (&self.pod_info, att.args.get("K8S_POD_UID"))
            && let Err(e) = info.record(uid, &rail)
        {
            tracing::warn!(pod_uid = %uid, ifname = %att.ifname, error = %e, "could not write the pod's rail info");
        }
        Ok(result)
    }

    fn add_rail(
        &self,
        att: &Attachment,
        conf: &NetConf,
        netns: &PodNetns,
    ) -> Result<AddResult, ApiError> {
        check_ids(&att.container_id, &att.ifname)?;
        self.master_allowed(conf)?;
        // ib-kubernetes (when the network waits for it) must have given the
        // pod its GUID: "try again" until it has.
        if let Err(why) = conf.ib_kubernetes_ready() {
            return Err(ApiError::new(
                code::TRY_AGAIN,
                "InfiniBand VF not configured by ib-kubernetes yet",
                why,
            ));
        }
        let kind = link::of(conf.mode);
        // RDMA first: a node in the wrong mode or a master without an RDMA
        // device is refused before anything is made.
        let rdma = rdma_plan(conf, kind, &self.sysfs_root)?;
        // Read once: it takes a thread that enters the pod netns.
        let netns_id = netns.id();
        sweep_can_see(netns_id)?;
        same_netns(&self.ipam, &att.container_id, &att.ifname, netns_id)?;
        // A repeat of an ADD (same container and interface) gets the
        // addresses it holds already: a failure of this ADD must not
        // release what an earlier one made and a pod may be using.
        let held_before = !self
            .ipam
            .addresses_of(&att.container_id, &att.ifname)
            .is_empty();
        let steps = steps::add_plan(kind, conf.rdma_isolation);
        let mut adding = add::Adding::new(
            Rail {
                service: self,
                att,
                kind,
                netns: Some(netns),
            },
            conf,
            netns_id,
            rdma,
            held_before,
        );
        steps::run_add(&mut adding, &steps, held_before)?;
        Ok(adding.finish())
    }

    /// Refuses a master the node's operator did not allow for rails.
    fn master_allowed(&self, conf: &NetConf) -> Result<(), ApiError> {
        if conf.master.is_empty()
            || self.allowed_masters.is_empty()
            || self
                .allowed_masters
                .iter()
                .any(|m| crate::ipam::wildcard_match(m, &conf.master))
        {
            return Ok(());
        }
        Err(ApiError::invalid_config(
            format!(
                "master {} is not one this node allows for rails",
                conf.master
            ),
            format!(
                "the node allows {} (chart: agent.allowedMasters); name one of them in network {}",
                self.allowed_masters.join(", "),
                conf.name
            ),
        ))
    }

    /// The records a rail's kind keeps of `container_id`'s `ifname`.
    fn holding<'a>(&'a self, container_id: &'a str, ifname: &'a str) -> link::Holding<'a> {
        link::Holding {
            container_id,
            ifname,
            sysfs_root: &self.sysfs_root,
            vf_records: &self.vf_records,
        }
    }

    /// CNI DEL: idempotent, best effort; releases the address even when the
    /// netns is gone, and forgets the rail in the pod's rail info. Returns
    /// the errors it met but kept going past.
    pub fn del(&self, att: &Attachment, netns: Option<&PodNetns>) -> Result<(), ApiError> {
        let done = self.del_rail(att, netns);
        // Records are only compared with the IDs, never made paths of them:
        // no need to repeat del_rail's check of the IDs here.
        if let Some(info) = &self.pod_info
            && let Err(e) = info.forget(
                att.args.get("K8S_POD_UID").map(String::as_str),
                &att.container_id,
                &att.ifname,
            )
        {
            tracing::warn!(ifname = %att.ifname, error = %e, "could not remove the pod's rail info");
        }
        done
    }

    fn del_rail(&self, att: &Attachment, netns: Option<&PodNetns>) -> Result<(), ApiError> {
        check_ids(&att.container_id, &att.ifname)?;
        // DEL gets the same config as ADD, but must take the rail down even
        // when that config no longer parses (an upgrade, an edited NAD):
        // only the two keys it needs are read, and a mode it cannot read
        // is taken for railnet's own interface (removed).
        let mode = att
            .netconf
            .get("mode")
            .and_then(|m| m.as_str()?.parse::<Mode>().ok())
            .unwrap_or_default();
        let isolated = att.netconf.get("rdmaIsolation").and_then(|m| m.as_bool()) == Some(true);
        let kind = link::of(mode);
        let mut rail = Rail {
            service: self,
            att,
            kind,
            netns,
        };
        let errors = steps::take_down(&mut rail, steps::del_plan(kind, isolated));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::dataplane("DEL incomplete", errors.join("; ")))
        }
    }
}
