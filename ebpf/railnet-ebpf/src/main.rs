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
//! are said by a second program, [`rail_say`], through aya-log into one ring
//! buffer the node's pods share (the agent pins both). The pod's program
//! tail-calls it on those paths only, leaving what happened in the packet's
//! `cb`: the logging code is verified once per node, not at every pod's ADD,
//! and the steer and pass paths carry none of it. Each record starts
//! `netns <cookie> rail <K>:` so the agent can name the pod.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_UNSPEC, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    helpers::generated::{bpf_check_mtu, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
    programs::TcContext,
};
use aya_log_ebpf::{error, warn};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use railnet_common::{
    COUNTER_ENTRIES, MAX_RAIL, MIN_RAIL_MTU, Meta, RailSource, RdmaNets, SAY_GONE, SAY_TOO_BIG,
    Verdict, counter_index,
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

/// [`rail_say`] at index 0, put there by the agent (one per node, pinned).
#[map(name = "SAY")]
static SAY: ProgramArray = ProgramArray::with_max_entries(1, 0);

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
    let (rail, verdict, action, said) = classify(&ctx);
    count(rail, verdict);
    if said {
        // SAFETY: a tail call into the node's `rail_say`, which returns the
        // same action; on failure (none loaded) we go on here.
        unsafe { SAY.tail_call(&ctx, 0) };
    }
    action
}

/// Says what [`rail_egress`] left in the packet's `cb` (see [`say`]), and
/// leaves the packet to the main table as `rail_egress` would have.
#[classifier]
pub fn rail_say(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the program's own `__sk_buff`.
    let cb = unsafe { (*ctx.skb.skb).cb };
    let cookie = u64::from(cb[0]) | (u64::from(cb[1]) << 32);
    match cb[4] {
        SAY_TOO_BIG => warn!(
            &ctx,
            "netns {} rail {}: a {}-byte packet to {:i} does not fit the rail's MTU; left to the main table",
            cookie,
            cb[2],
            ctx.len(),
            cb[3].to_ne_bytes()
        ),
        SAY_GONE => error!(
            &ctx,
            "netns {} rail {}: its interface (ifindex {}) is gone from the pod; packets from its address are left to the main table",
            cookie,
            cb[2],
            cb[3]
        ),
        _ => {}
    }
    TC_ACT_UNSPEC
}

/// Decides one packet: the rail it is counted under, the verdict, the tc
/// action, and whether there is something to say ([`leave`]). Every "leave
/// it alone" answer is `TC_ACT_UNSPEC`, so under TCX the next program on the
/// device still runs.
#[inline(always)]
fn classify(ctx: &TcContext) -> (u32, Verdict, i32, bool) {
    let pass_other = (0, Verdict::Other, TC_ACT_UNSPEC, false);
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
        return (0, Verdict::NotRailSource, TC_ACT_UNSPEC, false);
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
        return (k, Verdict::NotRdma, TC_ACT_UNSPEC, false);
    }
    // SAFETY: the context pointer is the program's own `__sk_buff`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == rail.ifindex {
        return (k, Verdict::OnRail, TC_ACT_UNSPEC, false);
    }
    let on_link = dst & rail.mask == rail.subnet;
    // A directed broadcast of the rail's subnet is not unicast RDMA traffic.
    if on_link && dst | !rail.mask == dst {
        return (k, Verdict::Other, TC_ACT_UNSPEC, false);
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
                // -ENODEV: the rail's interface left the pod but its
                // source entry stayed (a DEL that never reached the agent).
                leave(ctx, SAY_GONE, k, rail.ifindex);
                return (k, Verdict::Other, TC_ACT_UNSPEC, true);
            }
            leave(ctx, SAY_TOO_BIG, k, dst);
            return (k, Verdict::MtuExceeded, TC_ACT_UNSPEC, true);
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
    (k, Verdict::Steered, action as i32, false)
}

/// Leaves event `what` of rail `rail` (with `value`: the destination, or
/// the gone interface's index) in the packet's `cb` for [`rail_say`].
#[inline(always)]
fn leave(ctx: &TcContext, what: u32, rail: u32, value: u32) {
    let cookie = netns_cookie();
    // SAFETY: the context pointer is the program's own `__sk_buff`, whose
    // `cb` a tc program may write.
    unsafe {
        let skb = ctx.skb.skb;
        (*skb).cb[0] = cookie as u32;
        (*skb).cb[1] = (cookie >> 32) as u32;
        (*skb).cb[2] = rail;
        (*skb).cb[3] = value;
        (*skb).cb[4] = what;
    }
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
