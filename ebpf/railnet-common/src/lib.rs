//! Map keys and values shared by railnet's tc program and the agent.
//!
//! Everything here is `#[repr(C)]` with padding written out, so the BPF side
//! and userspace agree on every byte. IPv4 addresses are stored as the `u32`
//! whose in-memory bytes are the address in network order
//! (`u32::from_ne_bytes(addr.octets())`): that is how the program reads them
//! out of the packet, and how an LPM trie compares them.
#![no_std]

/// Bumped whenever a map's name, key, value or size changes, so an upgraded
/// agent can tell pins it can adopt from pins it must replace.
pub const LAYOUT_VERSION: u32 = 2;

/// Highest rail number a pod can have (rails are numbered 1..=MAX_RAIL).
pub const MAX_RAIL: u32 = 64;

/// Most RDMA CIDRs a pod's rails may declare together (IPv4; the program
/// scans them inline, which beats an LPM trie for the one or two a
/// cluster has).
pub const MAX_RDMA_CIDRS: usize = 16;

/// Smallest MTU railnet accepts on a rail (IPv6's minimum). The program
/// relies on it: packets no longer than this always fit.
pub const MIN_RAIL_MTU: u32 = 1280;

/// Slots in the counter map: one row per rail number, row 0 for traffic that
/// belongs to no rail of the pod.
pub const COUNTER_ROWS: u32 = MAX_RAIL + 1;

/// Name of the hash map from a rail source address to its [`RailSource`].
pub const MAP_RAIL_SOURCES: &str = "RAIL_SOURCES";
/// Name of the one-entry array holding the pod's [`RdmaNets`].
pub const MAP_RDMA_NETS: &str = "RDMA_NETS";
/// Name of the per-CPU counter array indexed by [`counter_index`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Name of the one-entry array holding the [`Meta`] of this instance.
pub const MAP_META: &str = "META";
/// Name of the tc egress program.
pub const PROGRAM_RAIL_EGRESS: &str = "rail_egress";
/// Name of the program that says the rare events (see the program's docs).
pub const PROGRAM_RAIL_SAY: &str = "rail_say";
/// Name of the one-entry program array holding [`PROGRAM_RAIL_SAY`], one per
/// node (pinned by the agent).
pub const MAP_SAY: &str = "SAY";
/// Event in `cb[4]`: a packet too big for its rail's MTU (`cb[3]`: its
/// destination).
pub const SAY_TOO_BIG: u32 = 1;
/// Event in `cb[4]`: the rail's interface is gone (`cb[3]`: its ifindex).
pub const SAY_GONE: u32 = 2;

/// One of the pod's rails, looked up by its IPv4 source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RailSource {
    /// Interface index of the rail's netdev inside the pod netns.
    pub ifindex: u32,
    /// Rail number K (1..=[`MAX_RAIL`]), from configuration.
    pub rail: u32,
    /// Rail gateway, network order; 0 when the rail has none (on-link only).
    pub gateway: u32,
    /// Rail subnet address, network order.
    pub subnet: u32,
    /// Rail subnet mask, network order.
    pub mask: u32,
    /// Written out so the struct has no implicit padding.
    pub _pad: u32,
}

/// One IPv4 network, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net4 {
    /// Network address.
    pub addr: u32,
    /// Mask.
    pub mask: u32,
}

impl Net4 {
    /// Whether `ip` (network order) is inside.
    #[inline(always)]
    pub const fn contains(&self, ip: u32) -> bool {
        ip & self.mask == self.addr
    }
}

/// The destinations steered by source: the RDMA CIDRs of the pod's
/// networks, or each rail's own subnet when none is configured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdmaNets {
    /// How many of `nets` are in use.
    pub count: u32,
    /// Written out so the struct has no implicit padding.
    pub _pad: u32,
    /// The networks.
    pub nets: [Net4; MAX_RDMA_CIDRS],
}

impl RdmaNets {
    /// Whether `ip` (network order) is inside any of the networks.
    #[inline(always)]
    pub fn contains(&self, ip: u32) -> bool {
        let mut i = 0;
        while i < MAX_RDMA_CIDRS {
            if i as u32 >= self.count {
                return false;
            }
            if self.nets[i].contains(ip) {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Adds `net` unless present; false when full.
    pub fn insert(&mut self, net: Net4) -> bool {
        let n = self.count as usize;
        if self.nets[..n.min(MAX_RDMA_CIDRS)].contains(&net) {
            return true;
        }
        if n >= MAX_RDMA_CIDRS {
            return false;
        }
        self.nets[n] = net;
        self.count += 1;
        true
    }
}

/// Facts about one pod's instance that a restarted or upgraded agent reads
/// back from the pins.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// [`LAYOUT_VERSION`] of the agent that created the maps.
    pub layout_version: u32,
    /// Written out so the struct has no implicit padding.
    pub _pad: u32,
    /// Inode of the pod's netns (nsfs), so a sweep can tell when the pod
    /// is gone without any other record.
    pub netns_inode: u64,
    /// The netns cookie, which unlike the inode is never reused (since
    /// layout 2).
    pub netns_cookie: u64,
}

/// What the program did with a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected out of the source's own rail.
    Steered = 0,
    /// Sourced from rail K and already leaving on rail K.
    OnRail = 1,
    /// Rail source, but the destination is outside the RDMA CIDRs: left to
    /// the main table (the not-to-RDMA-CIDR rule).
    NotRdma = 2,
    /// Would have been steered, but does not fit the rail's MTU: passed.
    MtuExceeded = 3,
    /// IPv4 whose source is not one of the pod's rail addresses.
    NotRailSource = 4,
    /// Not steerable at all: ARP, IPv6, multicast, broadcast, link-local,
    /// truncated headers.
    Other = 5,
}

impl Verdict {
    /// Number of verdicts, the width of one counter row.
    pub const COUNT: u32 = 6;
    /// Every verdict in counter order.
    pub const ALL: [Verdict; 6] = [
        Verdict::Steered,
        Verdict::OnRail,
        Verdict::NotRdma,
        Verdict::MtuExceeded,
        Verdict::NotRailSource,
        Verdict::Other,
    ];

    /// Stable lowercase name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Steered => "steered",
            Verdict::OnRail => "on_rail",
            Verdict::NotRdma => "not_rdma",
            Verdict::MtuExceeded => "mtu_exceeded",
            Verdict::NotRailSource => "not_rail_source",
            Verdict::Other => "other",
        }
    }
}

/// Total number of entries in the counter map.
pub const COUNTER_ENTRIES: u32 = COUNTER_ROWS * Verdict::COUNT;

/// Index into the counter map for `rail` (0 = no rail) and `verdict`.
#[inline(always)]
pub const fn counter_index(rail: u32, verdict: Verdict) -> u32 {
    rail * Verdict::COUNT + verdict as u32
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are `#[repr(C)]`, `Copy`, made of `u32`s with no implicit
    // padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::RailSource {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Meta {}
    // SAFETY: as above (u32s and arrays of u32 pairs).
    unsafe impl aya::Pod for super::RdmaNets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_rows_do_not_overlap() {
        let last = counter_index(MAX_RAIL, Verdict::Other);
        assert_eq!(last + 1, COUNTER_ENTRIES);
        assert_eq!(counter_index(1, Verdict::Steered), Verdict::COUNT);
    }

    #[test]
    fn shared_structs_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<RailSource>(), 6 * 4);
        assert_eq!(core::mem::size_of::<Meta>(), 24);
        assert_eq!(core::mem::size_of::<RdmaNets>(), 8 + 8 * MAX_RDMA_CIDRS);
    }

    #[test]
    fn rdma_nets_match_and_dedupe() {
        let mut nets = RdmaNets::default();
        let n = |a: [u8; 4], m: [u8; 4]| Net4 {
            addr: u32::from_ne_bytes(a),
            mask: u32::from_ne_bytes(m),
        };
        assert!(nets.insert(n([172, 16, 0, 0], [255, 255, 0, 0])));
        assert!(nets.insert(n([172, 16, 0, 0], [255, 255, 0, 0])));
        assert_eq!(nets.count, 1);
        assert!(nets.contains(u32::from_ne_bytes([172, 16, 5, 1])));
        assert!(!nets.contains(u32::from_ne_bytes([172, 17, 5, 1])));
        for i in 1..MAX_RDMA_CIDRS as u8 {
            assert!(nets.insert(n([10, i, 0, 0], [255, 255, 0, 0])));
        }
        assert!(!nets.insert(n([11, 0, 0, 0], [255, 0, 0, 0])), "full");
    }
}
