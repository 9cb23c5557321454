//! ARP on a rail interface: the gratuitous announcement after ADD (a
//! reused address would otherwise be sent to the previous pod's MAC until
//! caches expire), and the optional checks before ADD answers — is the
//! address already someone else's (an RFC 5227 probe), does the gateway
//! answer.

use std::{io, net::Ipv4Addr};

const ETH_P_ARP: u16 = 0x0806;

/// A packet socket for ARP (the kernel adds and strips Ethernet headers).
fn arp_socket() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket(2); the fd is wrapped into an OwnedFd at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor we own.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Sends one gratuitous ARP request (sender = target = `ip`) out of the
/// interface `ifindex` of the calling thread's netns.
pub fn announce(ifindex: u32, mac: &str, ip: Ipv4Addr) -> io::Result<()> {
    let mac = railnet_wire::mac::parse(mac)
        .ok_or_else(|| io::Error::other(format!("bad MAC {mac:?}")))?;
    let frame = arp_request(mac, ip);
    let fd = arp_socket()?;
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the buffer and address outlive the call; sizes are theirs.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // Closing a packet socket waits for an RCU grace period (~10 ms here,
    // measured on the ADD path): close it off the caller's thread.
    std::thread::spawn(move || drop(fd));
    Ok(())
}

/// Asks `target` for its MAC on interface `ifindex` (sender `sender`;
/// 0.0.0.0 makes it an RFC 5227 probe that updates no cache) up to three
/// times within `wait`, and returns the MAC of the first other host that
/// answers for `target`, or `None` if nobody did.
pub fn who_has(
    ifindex: u32,
    mac: &str,
    sender: Ipv4Addr,
    target: Ipv4Addr,
    wait: std::time::Duration,
) -> io::Result<Option<[u8; 6]>> {
    let ours = railnet_wire::mac::parse(mac)
        .ok_or_else(|| io::Error::other(format!("bad MAC {mac:?}")))?;
    let fd = arp_socket()?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    at.sll_family = libc::AF_PACKET as u16;
    at.sll_protocol = ETH_P_ARP.to_be();
    at.sll_ifindex = ifindex as i32;
    // Receive only this interface's ARP.
    // SAFETY: `at` outlives the call; the size is its own.
    if unsafe {
        libc::bind(
            raw,
            (&raw const at).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut frame = arp_request(ours, target);
    frame[14..18].copy_from_slice(&sender.octets());
    at.sll_halen = 6;
    at.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let deadline = std::time::Instant::now() + wait;
    let mut answer = None;
    'asking: for round in 0..3u32 {
        // SAFETY: the buffer and address outlive the call; sizes are theirs.
        if unsafe {
            libc::sendto(
                raw,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const at).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let until = (std::time::Instant::now() + wait / 3).min(deadline);
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: raw,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if ready <= 0 {
                continue;
            }
            let mut buf = [0u8; 64];
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
            // An ARP reply (opcode 2) from another MAC for the target.
            if n >= 28
                && buf[6..8] == 2u16.to_be_bytes()
                && buf[14..18] == target.octets()
                && buf[8..14] != ours
            {
                let mut from = [0u8; 6];
                from.copy_from_slice(&buf[8..14]);
                answer = Some(from);
                break 'asking;
            }
        }
        if std::time::Instant::now() >= deadline || round == 2 {
            break;
        }
    }
    std::thread::spawn(move || drop(fd));
    Ok(answer)
}

/// The ARP payload (the kernel adds the Ethernet header for SOCK_DGRAM).
fn arp_request(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    // Target MAC unknown (zero), target IP = our own: a gratuitous request.
    p[24..28].copy_from_slice(&ip.octets());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_names_us_twice() {
        let p = arp_request(
            railnet_wire::mac::parse("02:00:00:00:00:01").unwrap(),
            "172.16.1.10".parse().unwrap(),
        );
        assert_eq!(&p[14..18], &[172, 16, 1, 10]);
        assert_eq!(&p[24..28], &[172, 16, 1, 10]);
        assert_eq!(&p[8..14], &[2, 0, 0, 0, 0, 1]);
        assert!(railnet_wire::mac::parse("02:00:00:00:00").is_none());
    }
}
