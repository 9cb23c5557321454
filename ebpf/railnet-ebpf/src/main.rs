//! railnet's tc egress program, one instance per pod, attached to every
//! Ethernet rail interface of the pod.
//!
//! The kernel routes kernel-stack IPv4 traffic bound to rail K's address by
//! the lowest-metric route, which may be another rail. This program puts such
//! packets back on rail K (`bpf_redirect_neigh` to K's gateway, or to the
//! destination when it is on-link in K's subnet), and only when the
//! destination is inside the RDMA CIDRs: everything else is left to the main
//! table, which is what `ip rule not to <RDMA CIDR> lookup main` means in a
//! rules-based setup. IPv6 and InfiniBand rails get per-rail rules instead
//! (the agent installs them); this program sees only Ethernet IPv4.
//!
//! The rare events an operator must see — a packet left to the main table
//! because it would not fit the rail's MTU, a rail whose interface is gone —
//! are logged through aya-log into one ring buffer the node's pods share
//! (the agent pins it and reads it). Each record starts `netns <cookie> rail
//! <K>:` so the agent can name the pod; the steer and pass paths log nothing.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_UNSPEC, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    helpers::generated::{bpf_check_mtu, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::{error, warn};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use railnet_common::{
    COUNTER_ENTRIES, MAX_RAIL, MIN_RAIL_MTU, Meta, RailSource, RdmaNets, Verdict, counter_index,
};

/// The pod's rails by IPv4 source address (network-order bytes as `u32`).
#[map(name = "RAIL_SOURCES")]
static RAIL_SOURCES: HashMap<u32, RailSource> = HashMap::with_max_entries(MAX_RAIL, 0);

/// The RDMA CIDRs of the pod's networks; with none configured the agent
/// stores each rail's own subnet, so "inside the RDMA CIDRs" always has a
/// meaning.
#[map(name = "RDMA_NETS")]
static RDMA_NETS: Array<RdmaNets> = Array::with_max_entries(1, 0);

/// Per-CPU packet counters, `[rail][verdict]`, see `counter_index`.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

/// Layout version of the maps, written by the agent that created them.
#[map(name = "META")]
static META: Array<Meta> = Array::with_max_entries(1, 0);

const AF_INET: u32 = 2;
/// 169.254.0.0/16, 224.0.0.0/4 and limited broadcast, as first octets.
const LINK_LOCAL_FIRST: u8 = 169;
const LINK_LOCAL_SECOND: u8 = 254;

/// Entry point; see the crate docs for the verdicts.
#[classifier]
pub fn rail_egress(ctx: TcContext) -> i32 {
    let (rail, verdict, action) = classify(&ctx);
    count(rail, verdict);
    action
}

/// Decides one packet: the rail it is counted under, the verdict, and the tc
/// action. Every "leave it alone" answer is `TC_ACT_UNSPEC`, so under TCX the
/// next program on the device still runs.
#[inline(always)]
fn classify(ctx: &TcContext) -> (u32, Verdict, i32) {
    let pass_other = (0, Verdict::Other, TC_ACT_UNSPEC);
    // Direct packet access: at egress the headers are in the linear area;
    // if they are not, the packet is not one we steer.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass_other;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return pass_other;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return pass_other;
    };
    // SAFETY: as above.
    let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
    if dst[0] >= 224 || (dst[0] == LINK_LOCAL_FIRST && dst[1] == LINK_LOCAL_SECOND) {
        return pass_other;
    }
    let src = u32::from_ne_bytes(src);
    let Some(rail) = RAIL_SOURCES.get_ptr(src) else {
        return (0, Verdict::NotRailSource, TC_ACT_UNSPEC);
    };
    // SAFETY: the pointer comes from a successful map lookup and the value
    // is plain old data; we copy it out at once.
    let rail: RailSource = unsafe { *rail };
    let k = rail.rail;
    let dst = u32::from_ne_bytes(dst);
    let rdma = match RDMA_NETS.get_ptr(0) {
        // SAFETY: as above; read in place, the struct is large.
        Some(nets) => unsafe { (*nets).contains(dst) },
        None => false,
    };
    if !rdma {
        return (k, Verdict::NotRdma, TC_ACT_UNSPEC);
    }
    // SAFETY: the context pointer is the program's own `__sk_buff`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == rail.ifindex {
        return (k, Verdict::OnRail, TC_ACT_UNSPEC);
    }
    let on_link = dst & rail.mask == rail.subnet;
    // A directed broadcast of the rail's subnet is not unicast RDMA traffic.
    if on_link && dst | !rail.mask == dst {
        return (k, Verdict::Other, TC_ACT_UNSPEC);
    }
    // Every rail's MTU is at least MIN_RAIL_MTU (the agent refuses less),
    // so only longer packets can fail to fit; the helper, which resolves
    // the target device, is paid only by them (and by GSO packets, which
    // it checks per segment).
    if ctx.len() as usize > MIN_RAIL_MTU as usize + EthHdr::LEN {
        let mut mtu_len: u32 = 0;
        // SAFETY: helper call with the program's own context and a stack slot.
        let mtu = unsafe { bpf_check_mtu(ctx.as_ptr(), rail.ifindex, &mut mtu_len, 0, 0) };
        // One test on the way to a steer, as before there was a log.
        if mtu != 0 {
            if mtu < 0 {
                say_rail_gone(ctx, k, rail.ifindex);
                return (k, Verdict::Other, TC_ACT_UNSPEC);
            }
            say_too_big(ctx, k, dst);
            return (k, Verdict::MtuExceeded, TC_ACT_UNSPEC);
        }
    }
    let next_hop = if on_link || rail.gateway == 0 {
        dst
    } else {
        rail.gateway
    };
    let mut params = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: next_hop },
    };
    // SAFETY: helper call with a stack struct of the size we pass.
    let action = unsafe {
        bpf_redirect_neigh(
            rail.ifindex,
            &mut params,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    (k, Verdict::Steered, action as i32)
}

/// -ENODEV from the MTU check: the rail's interface left the pod but its
/// source entry stayed (a DEL that never reached the agent). Out of line,
/// as [`say_too_big`]: the steer path's code stays as it was.
#[inline(never)]
fn say_rail_gone(ctx: &TcContext, rail: u32, ifindex: u32) {
    error!(
        ctx,
        "netns {} rail {}: its interface (ifindex {}) is gone from the pod; packets from its address are left to the main table",
        netns_cookie(),
        rail,
        ifindex
    );
}

/// A packet that would not fit rail `rail`'s MTU, left to the main table.
#[inline(never)]
fn say_too_big(ctx: &TcContext, rail: u32, dst: u32) {
    warn!(
        ctx,
        "netns {} rail {}: a {}-byte packet to {:i} does not fit the rail's MTU; left to the main table",
        netns_cookie(),
        rail,
        ctx.len(),
        dst.to_ne_bytes()
    );
}

/// The pod's netns cookie as the agent recorded it, so a log record names
/// its pod (read only on the logging paths).
#[inline(always)]
fn netns_cookie() -> u64 {
    match META.get_ptr(0) {
        // SAFETY: a successful lookup of plain old data, copied out at once.
        Some(meta) => unsafe { (*meta).netns_cookie },
        None => 0,
    }
}

/// A bounds-checked pointer to a `T` at `offset` in the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn count(rail: u32, verdict: Verdict) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_index(rail, verdict)) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
