//! Modes sriov and ib-sriov: the VF of `deviceID` moved into the pod.
//!
//! Before anything changes, what the VF looks like and what its PF says of
//! it are recorded (a crash between ADD and DEL leaves it restorable); its
//! settings go through the PF (VLAN, MAC, link state, GUIDs); it moves into
//! the pod under the pod's interface name. DEL (or a failed ADD) moves it
//! back under its old name and puts back what the PF said.

use std::path::Path;

use rtnetlink::LinkUnspec;

use super::{Holding, LinkCx, RailLink, Taken, netns_fd};
use crate::{
    api::ApiError,
    netconf::Mode,
    netns::PodNetns,
    rtnl::{self, describe, errno, with_rtnl},
    sriov,
};

/// A VF moved in whole.
pub struct Vf {
    /// An InfiniBand VF (its IPoIB netdev), not a RoCE one.
    infiniband: bool,
}

/// Mode sriov.
pub static ETHERNET: Vf = Vf { infiniband: false };
/// Mode ib-sriov.
pub static INFINIBAND: Vf = Vf { infiniband: true };

impl RailLink for Vf {
    fn mode(&self) -> Mode {
        if self.infiniband {
            Mode::IbSriov
        } else {
            Mode::Sriov
        }
    }

    fn ethernet(&self) -> bool {
        !self.infiniband
    }

    /// A VF is not railnet's to delete: it is stripped and goes home.
    fn owns_interface(&self) -> bool {
        false
    }

    fn takes_host(&self) -> bool {
        true
    }

    fn take_host(&self, cx: &LinkCx<'_>) -> Result<Option<Taken>, ApiError> {
        prepare_vf(cx, self.infiniband).map(Some)
    }

    fn create(&self, cx: &LinkCx<'_>, taken: Option<&Taken>) -> Result<u32, ApiError> {
        let Some(vf) = taken else {
            return Err(ApiError::dataplane(
                "no VF was taken for this interface",
                "a bug: please report it",
            ));
        };
        // Moving an InfiniBand VF's RDMA device makes its IPoIB netdev
        // anew in the host: it is looked up again before it moves.
        if self.infiniband && cx.rdma_moved {
            let bdf = cx.conf.device_id.as_deref().unwrap_or_default();
            let vf = vf_again(cx.who.sysfs_root, bdf, "its RDMA device moved")?;
            return move_vf(cx, &vf);
        }
        move_vf(cx, vf)
    }

    fn give_host_back(&self, who: &Holding<'_>, netns: Option<&PodNetns>) -> Result<(), String> {
        give_vf_back(who, netns)
    }
}

/// Modes sriov and ib-sriov, before anything else changes: records what
/// the VF netdev of `deviceID` looks like and what its PF says of it,
/// then sets what goes through the PF (VLAN, MAC, link state, GUIDs).
/// `ib`: an InfiniBand VF (its netdev must have, or be given, a GUID).
/// A new GUID takes effect only when the VF's driver probes it again,
/// so the VF is rebound, which makes its netdev and RDMA device anew —
/// hence before RDMA isolation. On error nothing is left changed.
fn prepare_vf(cx: &LinkCx<'_>, ib: bool) -> Result<Taken, ApiError> {
    let (conf, who) = (cx.conf, cx.who);
    let bdf = conf.device_id.clone().unwrap_or_default();
    sriov::must_be_vf(who.sysfs_root, &bdf).map_err(|e| {
        ApiError::invalid_config(format!("deviceID {bdf} cannot be given to a pod"), e)
    })?;
    let vf = sriov::vf_netdev(who.sysfs_root, &bdf)
        .map_err(|e| ApiError::invalid_config(format!("VF {bdf} (deviceID) cannot be used"), e))?;
    // VF attributes go through the PF: find it before changing anything.
    let mut settings = conf
        .vf_settings()
        .map_err(|e| ApiError::invalid_config("VF attributes", e.to_string()))?;
    // A MAC the pod asks for goes through the PF too: with spoof
    // checking on, the NIC drops frames from any other MAC.
    settings.mac = cx.mac();
    let pf_side = if settings.is_empty() && settings.mac.is_none() {
        None
    } else {
        match sriov::pf_of(who.sysfs_root, &bdf) {
            Ok(pf) => Some(pf),
            // A MAC alone needs no PF to work without spoof checking.
            Err(e) if settings.is_empty() => {
                tracing::info!(vf = %bdf, why = %e, "no PF found: the MAC is set on the VF netdev only");
                None
            }
            Err(e) => {
                return Err(ApiError::invalid_config(
                    format!(
                        "VF {bdf}: vlan, spoofchk, trust, link_state and GUIDs are set through its PF"
                    ),
                    e,
                ));
            }
        }
    };
    let records = who.vf_records.to_owned();
    let holder = sriov::Holder::of(cx.args, who.container_id, who.ifname);
    let cid = who.container_id.to_owned();
    let ifname = who.ifname.to_owned();
    let vf_name = vf.clone();
    let bdf2 = bdf.clone();
    let prepared = with_rtnl(|h| async move {
        let (vf, bdf) = (vf_name, bdf2);
        let dp = |msg: String, details: String| ApiError::dataplane(msg, details);
        let Some(link) = rtnl::link_by_name(&h, &vf)
            .await
            .map_err(|e| dp(format!("looking up VF netdev {vf}"), describe(&e)))?
        else {
            return Err(ApiError::invalid_config(
                format!("VF netdev {vf} of {bdf} is not in the agent's netns"),
                "another pod may hold it: the device plugin should not hand out one VF twice",
            ));
        };
        let own_guid = sriov::ipoib_guid(&link.mac);
        if ib && !settings.sets_guid() && matches!(own_guid, Some(0) | Some(u64::MAX)) {
            return Err(ApiError::invalid_config(
                format!("InfiniBand VF {vf} ({bdf}) has no GUID"),
                "give it one: runtimeConfig.infinibandGUID (ib-kubernetes sets it), \"guid\" in the network, \
                 or on the node `ip link set <pf> vf N node_guid G` and `… port_guid G`",
            ));
        }
        // The PF's view of the VF, for DEL to put back what ADD changes.
        let mut pf = None;
        if let Some((pf_name, vf_number)) = &pf_side {
            let pf_link = rtnl::link_by_name(&h, pf_name)
                .await
                .map_err(|e| dp(format!("looking up PF {pf_name}"), describe(&e)))?
                .ok_or_else(|| {
                    ApiError::invalid_config(
                        format!("PF {pf_name} of VF {bdf} is not in the agent's netns"),
                        "the agent runs in the host network namespace (hostNetwork)",
                    )
                })?;
            let mut was = rtnl::vf_settings(&h, pf_link.index, *vf_number)
                .await
                .map_err(|e| dp(format!("reading VF {vf_number} of PF {pf_name}"), describe(&e)))?
                .ok_or_else(|| {
                    ApiError::invalid_config(
                        format!("PF {pf_name} lists no VF {vf_number} ({bdf})"),
                        "its driver reports no VFs: is SR-IOV enabled (sriov_numvfs)?",
                    )
                })?;
            // A driver that does not report GUIDs: the VF's own address
            // holds its port GUID (ib-sriov-cni reads it there too).
            if was.port_guid.is_none() {
                was.port_guid = own_guid;
            }
            if was.node_guid.is_none() {
                was.node_guid = own_guid;
            }
            pf = Some((pf_link.index, sriov::PfSide {
                pf: pf_name.clone(),
                vf: *vf_number,
                was: sriov::restore_of(&settings, &was),
            }));
        }
        let record = sriov::VfRecord {
            pci_address: bdf.clone(),
            name: vf.clone(),
            mac: link.mac.clone(),
            mtu: link.mtu,
            pf: pf.as_ref().map(|(_, side)| side.clone()),
            holder,
        };
        sriov::save(&records, "vf", &cid, &ifname, &record)
            .map_err(|e| dp(format!("recording VF {vf} before moving it"), e.to_string()))?;
        if let Some((pf_index, side)) = &pf {
            for req in rtnl::vf_requests(*pf_index, side.vf, &settings) {
                if let Err(e) = h.link().set(req).execute().await {
                    // Put back whatever went through before the refusal.
                    for undo in rtnl::vf_requests(*pf_index, side.vf, &side.was) {
                        if let Err(e) = h.link().set(undo).execute().await {
                            tracing::warn!(pf = %side.pf, vf = side.vf, error = %describe(&e),
                                "a VF attribute set before the refusal was not put back");
                        }
                    }
                    sriov::forget(&records, "vf", &cid, &ifname);
                    let why = match errno(&e) {
                        Some(libc::EOPNOTSUPP) => format!(
                            "the driver of PF {} cannot set them (EOPNOTSUPP); set only what it supports, or use a NIC whose driver does",
                            side.pf
                        ),
                        _ => describe(&e),
                    };
                    return Err(ApiError::dataplane(format!("setting VF {} attributes through PF {}", side.vf, side.pf),
                        why,
                    ));
                }
            }
        }
        Ok(Taken {
            name: vf,
            index: link.index,
            mtu: link.mtu,
            rebound: false,
        })
    })
    .map_err(|e| ApiError::dataplane("rtnetlink", e.to_string()))??;
    if !settings.sets_guid() {
        return Ok(prepared);
    }
    sriov::rebind(who.sysfs_root, &bdf, std::time::Duration::from_secs(10))
        .map_err(|e| ApiError::dataplane(format!("rebinding VF {bdf} for its new GUID"), e))
        .and_then(|_| vf_again(who.sysfs_root, &bdf, "its driver was rebound"))
        .map(|vf| Taken {
            rebound: true,
            ..vf
        })
        .inspect_err(|_| {
            if let Err(undo) = give_vf_back(&who, None) {
                tracing::warn!(error = %undo, "could not put the VF back after a failed rebind");
            }
        })
}

/// VF `bdf`'s netdev as it is now, made anew `after` something (its
/// driver's rebind, its RDMA device's move): waits up to 10 s for sysfs
/// to list it, then looks it up.
fn vf_again(sysfs: &Path, bdf: &str, after: &str) -> Result<Taken, ApiError> {
    let found =
        sriov::wait_for_netdev(sysfs, bdf, std::time::Duration::from_secs(10)).and_then(|name| {
            let n = name.clone();
            with_rtnl(|h| async move { rtnl::link_by_name(&h, &n).await })
                .map_err(|e| e.to_string())?
                .map_err(|e| describe(&e))?
                .map(|link| Taken {
                    name: name.clone(),
                    index: link.index,
                    mtu: link.mtu,
                    rebound: false,
                })
                .ok_or_else(|| format!("{name} is not in the agent's netns"))
        });
    found.map_err(|why| {
        ApiError::dataplane(
            format!("VF {bdf}'s netdev did not come back after {after}"),
            why,
        )
    })
}

/// Modes sriov and ib-sriov, after [`Self::prepare_vf`]: moves the VF
/// netdev into the pod under the pod's interface name (with the MTU
/// and MAC asked for) in one request. Returns its MTU. On error the VF
/// is still in the host (the caller gives it back).
fn move_vf(cx: &LinkCx<'_>, vf: &Taken) -> Result<u32, ApiError> {
    let ifname = cx.who.ifname.to_owned();
    let want_mtu = cx.conf.mtu;
    let mac = cx.mac();
    let netns_fd = netns_fd(cx.netns);
    let (index, name, mtu) = (vf.index, vf.name.clone(), vf.mtu);
    let moved = with_rtnl(|h| async move {
        let mut msg = LinkUnspec::new_with_index(index)
            .down()
            .setns_by_fd(netns_fd)
            .name(ifname.clone());
        if let Some(m) = want_mtu {
            msg = msg.mtu(m);
        }
        if let Some(m) = mac {
            msg = msg.address(m.to_vec());
        }
        h.link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|e| match errno(&e) {
                Some(libc::EEXIST) => ApiError::interface_exists(&ifname),
                _ => ApiError::dataplane(
                    format!("moving VF {name} into the pod as {ifname}"),
                    describe(&e),
                ),
            })
    })
    .map_err(|e| ApiError::dataplane("rtnetlink", e.to_string()))?;
    moved?;
    Ok(want_mtu.unwrap_or(mtu))
}

/// Mode sriov, DEL: moves the pod's VF back to the agent's netns under
/// its old name (from inside the pod, where the kernel finds it) and
/// restores its MTU and MAC. Without a netns the kernel has returned
/// the VF already (possibly renamed): it is found by PCI address.
fn give_vf_back(who: &Holding<'_>, netns: Option<&PodNetns>) -> Result<(), String> {
    let (container_id, ifname) = (who.container_id, who.ifname);
    let Some(record) = sriov::load::<sriov::VfRecord>(who.vf_records, "vf", container_id, ifname)
    else {
        return Ok(()); // never taken, or already returned
    };
    if let Some(ns) = netns {
        let host = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| format!("opening the agent's netns: {e}"))?;
        let ifname = ifname.to_owned();
        let name = record.name.clone();
        ns.run(move || {
            with_rtnl(|h| async move {
                let host_fd = std::os::fd::AsRawFd::as_raw_fd(&host);
                match rtnl::link_by_name(&h, &ifname).await {
                    Ok(Some(link)) => h
                        .link()
                        .set({
                            let mut back = LinkUnspec::new_with_index(link.index)
                                .down()
                                .setns_by_fd(host_fd)
                                .name(name.clone())
                                .build();
                            // The pod's rail record does not go with it.
                            back.attributes.push(
                                rtnetlink::packet_route::link::LinkAttribute::IfAlias(
                                    String::new(),
                                ),
                            );
                            back
                        })
                        .execute()
                        .await
                        .map_err(|e| {
                            format!(
                                "moving {ifname} back to the host as {name}: {}",
                                describe(&e)
                            )
                        }),
                    Ok(None) => Ok(()),
                    Err(e) => Err(format!("looking up {ifname}: {}", describe(&e))),
                }
            })
            .map_err(|e| e.to_string())?
        })
        .map_err(|e| e.to_string())??;
    }
    // The PF's view of the VF first (a GUID put back rebinds the VF,
    // making its netdev anew). Best effort: a PF that refuses (or is
    // gone) must not keep the pod in Terminating; the VF comes back
    // either way.
    if let Some(side) = record.pf.clone() {
        let restored = with_rtnl(|h| async move {
            match rtnl::link_by_name(&h, &side.pf).await {
                Ok(Some(pf)) => {
                    for req in rtnl::vf_requests(pf.index, side.vf, &side.was) {
                        h.link()
                            .set(req)
                            .execute()
                            .await
                            .map_err(|e| describe(&e))?;
                    }
                    Ok(())
                }
                Ok(None) => Err("the PF is gone".to_owned()),
                Err(e) => Err(describe(&e)),
            }
        })
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let pf = record.pf.as_ref().expect("some");
        match restored {
            Err(why) => {
                tracing::warn!(pf = %pf.pf, vf = pf.vf, %why,
                    "VF attributes not restored through the PF; the next pod's ADD sets its own");
            }
            Ok(()) if pf.was.sets_guid() => {
                if let Err(e) = sriov::rebind(
                    who.sysfs_root,
                    &record.pci_address,
                    std::time::Duration::from_secs(10),
                ) {
                    tracing::warn!(vf = %record.pci_address, error = %e,
                        "VF not rebound after its GUID was put back; it keeps the pod's GUID until its driver probes it again");
                }
            }
            Ok(()) => {}
        }
    }
    let current = sriov::vf_netdev(who.sysfs_root, &record.pci_address).ok();
    let rec = record.clone();
    with_rtnl(|h| async move {
        let link = match rtnl::link_by_name(&h, &rec.name).await {
            Ok(Some(l)) => Some(l),
            _ => match &current {
                Some(now) => rtnl::link_by_name(&h, now).await.ok().flatten(),
                None => None,
            },
        };
        let Some(link) = link else {
            return Err(format!(
                "VF {} ({}) is not back in the host",
                rec.name, rec.pci_address
            ));
        };
        let mut msg = LinkUnspec::new_with_index(link.index)
            .down()
            .name(rec.name.clone())
            .mtu(rec.mtu);
        if let Some(mac) = sriov::mac_bytes(&rec.mac) {
            msg = msg.address(mac.to_vec());
        }
        h.link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|e| format!("restoring VF {}: {}", rec.name, describe(&e)))
    })
    .map_err(|e| e.to_string())??;
    sriov::forget(who.vf_records, "vf", container_id, ifname);
    Ok(())
}
