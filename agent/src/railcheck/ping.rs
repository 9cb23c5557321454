//! The two questions `railnetctl check` asks a rail, answered by the
//! kernel's own packets: does this address answer an ICMP echo of this size
//! with DF set (and if not, what path MTU did a router report), and which
//! of these gateways answers ARP on this link.
//!
//! Written on raw sockets (socket2) rather than a ping crate: the check
//! needs DF, a chosen source, the kernel's learned path MTU and a bare ARP
//! request on one link, which no maintained ping crate offers together.
//! Every socket here must be made on a thread inside the probe's netns.

use std::{
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

/// How long one echo or ARP request waits for its answer.
pub const WAIT: Duration = Duration::from_millis(400);
/// Echo requests sent before a destination counts as not answering (the
/// first may wait on ARP at the far end).
pub const TRIES: u32 = 3;
/// IPv4 and ICMP headers in front of an echo's payload.
const HEADERS: usize = 28;

/// What an echo of a given size found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// It answered.
    Answered,
    /// Nothing came back.
    Silent,
    /// A router said the packet was too big (ICMP fragmentation needed):
    /// the path MTU the kernel learned.
    PathMtu(u32),
}

/// Unique echo identifiers: every raw ICMP socket of the netns sees every
/// reply from its peer, so each probe knows its own by this. Started from
/// the process ID, so two nodes' probes (which send each other echoes at
/// the same time) do not use the same identifiers in the same order.
static NEXT_ID: AtomicU16 = AtomicU16::new(0);

fn next_id() -> u16 {
    let _ = NEXT_ID.compare_exchange(
        0,
        (std::process::id() as u16).wrapping_mul(251) | 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Sends up to [`TRIES`] echo requests of `size` bytes (IP header
/// included) from `src` to `dst` with DF set.
pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, size: u32) -> std::io::Result<Echo> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    sock.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))?;
    // Connected: the kernel then hands this socket only its peer's ICMP,
    // and keeps the path MTU it learns on the socket's route.
    sock.connect(&SockAddr::from(SocketAddr::from((dst, 0))))?;
    set_int(
        &sock,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )?;
    let id = next_id();
    let payload = (size as usize).saturating_sub(HEADERS).max(8);
    for seq in 0..TRIES as u16 {
        let packet = echo_request(id, seq, payload);
        match sock.send(&packet) {
            Ok(_) => {}
            // The kernel already knows a smaller path MTU: a router said
            // so to an earlier try.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                return Ok(Echo::PathMtu(path_mtu(&sock).unwrap_or(0)));
            }
            Err(e) => return Err(e),
        }
        if wait_reply(&sock, id, seq)? {
            return Ok(Echo::Answered);
        }
    }
    Ok(match path_mtu(&sock) {
        Some(mtu) if (mtu as usize) < payload + HEADERS => Echo::PathMtu(mtu),
        _ => Echo::Silent,
    })
}

fn set_int(sock: &Socket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: `value` is a valid c_int for the call's duration.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `IP_MTU`: the path MTU of the connected socket's route.
fn path_mtu(sock: &Socket) -> Option<u32> {
    let mut mtu: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `mtu` is a valid c_int buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&raw mut mtu).cast(),
            &mut len,
        )
    };
    (rc == 0 && mtu > 0).then_some(mtu as u32)
}

/// An ICMP echo request with `payload` bytes of pattern.
fn echo_request(id: u16, seq: u16, payload: usize) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..payload).map(|i| i as u8));
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Waits up to [`WAIT`] for the echo reply `id`/`seq`.
fn wait_reply(sock: &Socket, id: u16, seq: u16) -> std::io::Result<bool> {
    let deadline = Instant::now() + WAIT;
    let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
    loop {
        match recv_before(sock, deadline, &mut buf) {
            Ok(Some(got)) if is_reply(got, id, seq) => return Ok(true),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(false),
            // An ICMP error for an earlier try (the socket is connected);
            // the path MTU it carried is on the route now.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// The next packet `sock` reads before `deadline`; `None` once it passed.
fn recv_before<'a>(
    sock: &Socket,
    deadline: Instant,
    buf: &'a mut [MaybeUninit<u8>],
) -> std::io::Result<Option<&'a [u8]>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv(buf) {
            // SAFETY: recv initialised the first `n` bytes.
            Ok(n) => {
                return Ok(Some(unsafe {
                    std::slice::from_raw_parts(buf.as_ptr().cast(), n)
                }));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Whether `packet` (IPv4 header and ICMP, as a raw socket reads it) is
/// the echo reply `id`/`seq`.
fn is_reply(packet: &[u8], id: u16, seq: u16) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let icmp = &packet[((first & 0x0f) as usize * 4).min(packet.len())..];
    icmp.len() >= 8
        && icmp[0] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// Which of `gateways` answer an ARP request on interface `ifindex`
/// (MAC `mac`). Asked as an RFC 5227 probe (sender address 0.0.0.0), so
/// no neighbour table on the link learns anything from it.
pub fn arp_who_answers(
    ifindex: u32,
    mac: [u8; 6],
    gateways: &[Ipv4Addr],
) -> std::io::Result<Vec<Ipv4Addr>> {
    const ETH_P_ARP: u16 = 0x0806;
    let sock = Socket::new(
        Domain::PACKET,
        Type::DGRAM,
        Some(Protocol::from(i32::from(ETH_P_ARP.to_be()))),
    )?;
    sock.bind(&link_addr(ifindex, ETH_P_ARP, [0; 6]))?;
    let broadcast = link_addr(ifindex, ETH_P_ARP, [0xff; 6]);
    for gw in gateways {
        let mut req = vec![0, 1, 8, 0, 6, 4, 0, 1];
        req.extend_from_slice(&mac);
        req.extend_from_slice(&[0; 4]);
        req.extend_from_slice(&[0; 6]);
        req.extend_from_slice(&gw.octets());
        sock.send_to(&req, &broadcast)?;
    }
    let mut answered = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while let Some(got) = recv_before(&sock, deadline, &mut buf)? {
        // A reply (op 2) for IPv4 over Ethernet: sender address at 14..18.
        if got.len() >= 28 && got[6..8] == [0, 2] {
            let sender = Ipv4Addr::new(got[14], got[15], got[16], got[17]);
            if gateways.contains(&sender) && !answered.contains(&sender) {
                answered.push(sender);
            }
        }
    }
    Ok(answered)
}

/// A `sockaddr_ll` for `ifindex`, protocol `proto`, link address `addr`.
fn link_addr(ifindex: u32, proto: u16, addr: [u8; 6]) -> SockAddr {
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: sockaddr_ll is one of this platform's sockaddr types.
    let ll: &mut libc::sockaddr_ll = unsafe { storage.view_as() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = proto.to_be();
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&addr);
    // SAFETY: the family is AF_PACKET and the storage holds a sockaddr_ll.
    unsafe {
        SockAddr::new(
            storage,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_request_carries_its_id_sequence_and_a_valid_checksum() {
        let p = echo_request(0x1234, 2, 20);
        assert_eq!(p.len(), 28);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 2]);
        // A packet with its checksum in place sums to zero.
        assert_eq!(checksum(&p), 0);
    }

    #[test]
    fn only_the_matching_echo_reply_counts() {
        let mut reply = vec![0x45; 20];
        reply.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 2]);
        assert!(is_reply(&reply, 0x1234, 2));
        assert!(!is_reply(&reply, 0x1234, 3));
        reply[20] = 8; // a request, not a reply
        assert!(!is_reply(&reply, 0x1234, 2));
        assert!(!is_reply(&[], 1, 1));
    }
}
