//! What keeps a node's rails true after ADD: CHECK, the DELs left as
//! tombstones while the agent was away, and CNI GC.

use std::net::IpAddr;

use super::{RailService, check_ids, conf_of, valid_container_id};
use crate::{
    api::{ApiError, Attachment, GcRequest, code},
    netconf::Routing,
    netns::PodNetns,
    rtnl::{self, describe, with_rtnl},
};

impl RailService {
    /// CNI CHECK: the interface is in the pod, up, with the addresses IPAM
    /// holds for it, as ADD reported it (`prevResult`: addresses, MAC,
    /// routes; see [`crate::check`]), and (eBPF mode) the program is
    /// attached to it.
    pub fn check(&self, att: &Attachment, netns: &PodNetns) -> Result<(), ApiError> {
        let conf = conf_of(att)?;
        check_ids(&att.container_id, &att.ifname)?;
        let held = self.ipam.addresses_of(&att.container_id, &att.ifname);
        if held.is_empty() {
            return Err(ApiError::new(
                code::UNKNOWN_CONTAINER,
                format!("no address is held for {}/{}", att.container_id, att.ifname),
                "was ADD run for this container and interface?",
            ));
        }
        let ifname = att.ifname.clone();
        let found = netns
            .run(move || {
                with_rtnl(|h| async move {
                    let Some(link) = rtnl::link_by_name(&h, &ifname)
                        .await
                        .map_err(|e| describe(&e))?
                    else {
                        return Ok(None);
                    };
                    let networks = rtnl::networks(&h, link.index)
                        .await
                        .map_err(|e| describe(&e))?;
                    let routes = rtnl::routes_on(&h, link.index)
                        .await
                        .map_err(|e| describe(&e))?;
                    Ok::<_, String>(Some(crate::check::Observed {
                        up: link.up,
                        mac: link.mac,
                        networks,
                        routes,
                    }))
                })
            })
            .map_err(|e| ApiError::dataplane("entering the pod netns", e.to_string()))?
            .map_err(|e| ApiError::dataplane("rtnetlink", e.to_string()))?
            .map_err(|e| ApiError::dataplane("reading the pod's interface", e))?;
        let Some(seen) = found else {
            return Err(ApiError::dataplane(
                format!("interface {} is missing from the pod", att.ifname),
                "something removed it after ADD; delete and re-create the pod",
            ));
        };
        crate::check::compare(&att.ifname, &held, att.netconf.get("prevResult"), &seen)?;
        if conf.routing == Routing::Ebpf && held.iter().any(IpAddr::is_ipv4) {
            let pin = self
                .pin_root
                .join(&att.container_id)
                .join("links")
                .join(&att.ifname);
            if !pin.exists() {
                return Err(ApiError::dataplane(
                    format!("the rail program is not attached to {}", att.ifname),
                    format!("{} is missing; rail traffic is not steered", pin.display()),
                ));
            }
        }
        Ok(())
    }

    /// Finishes the DELs the CNI left while the agent was away. Returns how
    /// many were finished; a tombstone that cannot be finished stays.
    pub fn finish_tombstones(&self, dir: &std::path::Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut done = 0;
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let att: Attachment = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(a) => a,
                Err(why) => {
                    tracing::warn!(tombstone = %path.display(), %why, "unreadable DEL tombstone left in place");
                    continue;
                }
            };
            // The pod's netns is gone or going: only pins and addresses are
            // left to undo.
            let undone = if crate::netconf::ClaimedConf::is_claimed(&att.netconf) {
                // The DRA network's: its driver knows the rails (not
                // started yet at the agent's first pass: the next does it).
                match self.dra.get() {
                    Some(dra) => crate::dra::claimed::del(dra, self, &att, None),
                    None => continue,
                }
            } else {
                self.del(&att, None)
            };
            match undone {
                Ok(()) => {
                    // Left in place, it is finished again (a no-op) next time.
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(tombstone = %path.display(), error = %e, "finished DEL tombstone not removed");
                    }
                    done += 1;
                }
                Err(e) => {
                    tracing::warn!(tombstone = %path.display(), error = %e, "DEL tombstone not finished yet")
                }
            }
        }
        done
    }

    /// CNI GC: releases every allocation of `req.network` whose attachment
    /// is not in the valid list, and removes its pins. Returns how many.
    pub fn gc(&self, req: &GcRequest) -> Result<usize, ApiError> {
        let valid: std::collections::HashSet<(&str, &str)> = req
            .valid
            .iter()
            .map(|(c, i)| (c.as_str(), i.as_str()))
            .collect();
        // An attachment whose pod netns is still alive is a live pod's,
        // whatever the list says: an empty or short list (a runtime's bug,
        // or a caller that is no runtime) must not take a running pod's
        // addresses. Its DEL, or the sweep once the netns is gone, does.
        let live = crate::netns::LiveNetns::scan();
        let kept = std::sync::Mutex::new(Vec::new());
        let released = self
            .ipam
            .release_where_allocation(|a| {
                let stale = a.network == req.network
                    && !valid.contains(&(a.key.container_id.as_str(), a.key.ifname.as_str()));
                if stale && a.netns_inode != 0 && live.contains(a.netns()) {
                    kept.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{}/{}", a.key.container_id, a.key.ifname));
                    return false;
                }
                stale
            })
            .map_err(|e| ApiError::new(code::IO, "GC", e.to_string()))?;
        let kept = kept.into_inner().unwrap_or_else(|p| p.into_inner());
        if !kept.is_empty() {
            tracing::warn!(network = %req.network, attachments = ?kept, "GC: not releasing attachments whose pod netns is alive");
        }
        for a in &released {
            if valid_container_id(&a.key.container_id) {
                let left = self.pins(&a.key.container_id).detach(&a.key.ifname, None);
                if !left.is_empty() {
                    tracing::warn!(container = %a.key.container_id, ifname = %a.key.ifname,
                        errors = %left.join("; "), "GC: pins not all removed; the sweep tries again");
                }
            }
        }
        if let Some(info) = &self.pod_info
            && !released.is_empty()
        {
            let forgot = info.forget_matching(None, |r| {
                released
                    .iter()
                    .any(|a| a.key.container_id == r.container_id && a.key.ifname == r.interface)
            });
            if let Err(e) = forgot {
                tracing::warn!(error = %e, "GC: released rails left in the pods' rail info");
            }
        }
        Ok(released.len())
    }
}
