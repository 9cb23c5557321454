//! Mode ipoib: an IPoIB child of the master (an InfiniBand port's netdev),
//! made in the host under a name of its own, then moved into the pod under
//! the pod's.

use rtnetlink::LinkUnspec;

use super::{LinkCx, RailLink, Taken, master_of, netns_fd};
use crate::{
    api::ApiError,
    netconf::Mode,
    rtnl::{self, describe, errno, with_rtnl},
};

/// An IPoIB child of the master.
pub struct Ipoib;

/// The host-side name of the IPoIB child made for `container_id`'s
/// `ifname` before it is moved into the pod: `rn` and 12 hex digits of a
/// hash of the two.
pub fn ipoib_temp_name(container_id: &str, ifname: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (container_id, ifname).hash(&mut h);
    format!("rn{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Whether `name` is one [`ipoib_temp_name`] makes.
pub fn is_ipoib_temp_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("rn")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Removes IPoIB children an ADD made in the host and never moved into
/// its pod (the agent stopped in between); returns their names. Run
/// before the agent serves: no ADD is between the two steps then.
pub fn sweep_ipoib_leftovers() -> Vec<String> {
    let swept = with_rtnl(|h| async move {
        let mut gone = Vec::new();
        for (name, index) in rtnl::ipoib_links(&h).await.unwrap_or_default() {
            if is_ipoib_temp_name(&name) && h.link().del(index).execute().await.is_ok() {
                gone.push(name);
            }
        }
        gone
    });
    swept.unwrap_or_default()
}

impl RailLink for Ipoib {
    fn mode(&self) -> Mode {
        Mode::Ipoib
    }

    fn ethernet(&self) -> bool {
        false
    }

    fn create(&self, cx: &LinkCx<'_>, _taken: Option<&Taken>) -> Result<u32, ApiError> {
        let conf = cx.conf.clone();
        let ifname = cx.who.ifname.to_owned();
        let temp = ipoib_temp_name(cx.who.container_id, cx.who.ifname);
        let fd = netns_fd(cx.netns);
        let pkey = conf.pkey.as_ref().and_then(crate::netconf::parse_pkey);
        with_rtnl(|h| async move {
            let (m, mtu) = master_of(&h, &conf).await?;
            let master = &conf.master;
            let Some((parent_pkey, parent_mode)) = m.ipoib else {
                return Err(ApiError::invalid_config(
                    format!("master {master} is not an IPoIB interface"),
                    "mode \"ipoib\" makes a child of an InfiniBand port's netdev (e.g. ib0; \
                     `ip -d link show` says ipoib); for a RoCE NIC use mode \"macvlan\"",
                ));
            };
            // A child of this very attachment left in the host (the agent
            // died between making and moving it): it goes, or the name is
            // taken.
            if let Ok(Some(old)) = rtnl::link_by_name(&h, &temp).await
                && old.ipoib.is_some()
            {
                tracing::warn!(child = %temp, "removing an IPoIB child a crashed ADD left in the host");
                if let Err(e) = h.link().del(old.index).execute().await {
                    tracing::warn!(child = %temp, error = %describe(&e), "could not remove it");
                }
            }
            // The network's partition, else the parent's; the parent's
            // mode (datagram or connected).
            let req = rtnl::ipoib_request(m.index, &temp, pkey.unwrap_or(parent_pkey), parent_mode);
            h.link().add(req).execute().await.map_err(|e| match errno(&e) {
                Some(libc::EOPNOTSUPP) => ApiError::invalid_config(
                    "this kernel cannot make IPoIB children",
                    "load ib_ipoib (modprobe ib_ipoib)",
                ),
                _ => ApiError::dataplane(
                    format!("creating the IPoIB child of {master}"),
                    describe(&e),
                ),
            })?;
            let child = rtnl::link_by_name(&h, &temp)
                .await
                .ok()
                .flatten()
                .ok_or_else(|| {
                    ApiError::dataplane(
                        format!("the IPoIB child {temp} of {master}"),
                        "made, then not found",
                    )
                })?;
            let moved = h
                .link()
                .set(
                    LinkUnspec::new_with_index(child.index)
                        .down()
                        .setns_by_fd(fd)
                        .name(ifname.clone())
                        .mtu(mtu)
                        .build(),
                )
                .execute()
                .await;
            if let Err(e) = moved {
                if let Err(del) = h.link().del(child.index).execute().await {
                    tracing::warn!(child = %temp, error = %describe(&del), "could not remove the IPoIB child a failed move left");
                }
                return Err(match errno(&e) {
                    Some(libc::EEXIST) => ApiError::interface_exists(&ifname),
                    _ => ApiError::dataplane(
                        format!("moving the IPoIB child into the pod as {ifname}"),
                        describe(&e),
                    ),
                });
            }
            Ok(mtu)
        })
        .map_err(|e| ApiError::dataplane("rtnetlink", e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hardening 13: the startup sweep removes exactly the names an ADD
    /// makes for its IPoIB children, never a node's own IPoIB interfaces.
    #[test]
    fn the_ipoib_sweep_knows_its_own_children_by_name() {
        for (cid, ifname) in [("c1", "net1"), (&"f".repeat(64)[..], "net8")] {
            let name = ipoib_temp_name(cid, ifname);
            assert!(is_ipoib_temp_name(&name), "{name}");
            assert!(name.len() <= 15, "{name} is too long for a netdev");
        }
        for theirs in [
            "ib0",
            "ib0.8001",
            "rn0",
            "rn00000000000g",
            "rn0123456789ABC",
            "ibp59s0",
        ] {
            assert!(!is_ipoib_temp_name(theirs), "{theirs}");
        }
    }
}
