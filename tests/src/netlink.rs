//! What goes over netlink, for golden comparisons with iproute2 and rdma.

use std::process::Command;

use crate::Netns;

/// The netlink messages `program <args>` sends from inside `ns`, from
/// strace's dump of its sendto/sendmsg calls: what a reference tool (rdma,
/// ip) puts on the wire, for golden comparisons.
pub fn netlink_sends(ns: &Netns, program: &str, args: &[&str]) -> Vec<Vec<u8>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args([
            "strace",
            "-f",
            "-e",
            "trace=sendto,sendmsg",
            "-e",
            "write=all",
        ])
        .arg(program)
        .args(args)
        .output()
        .expect("strace");
    let text = String::from_utf8_lossy(&out.stderr);
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for line in text.lines() {
        if line.contains("sendto(") || line.contains("sendmsg(") {
            messages.push(Vec::new());
        } else if let Some(dump) = line.trim_start().strip_prefix("| ")
            && let Some(last) = messages.last_mut()
        {
            // " | 00010  08 00 01 00 ...  ascii |": offset, then up to 16 bytes.
            let hex = dump
                .get(7..7 + 16 * 3 + 1)
                .unwrap_or(&dump[7.min(dump.len())..]);
            last.extend(
                hex.split_whitespace()
                    .take(16)
                    .map(|b| u8::from_str_radix(b, 16).expect("hex byte")),
            );
        }
    }
    assert!(!messages.is_empty(), "no sends seen:\n{text}");
    messages
}

/// The id of the BPF program on `dev`'s egress in `ns`, as `tc filter
/// show` prints it; `None` when none is attached.
pub fn egress_program_id(ns: &Netns, dev: &str) -> Option<String> {
    let out = Command::new("tc")
        .args(["-n", ns.name(), "filter", "show", "dev", dev, "egress"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .map(str::to_owned)
}

/// The RTM_NEWLINK `ip <args>` sends from inside `ns`, without its netlink
/// header (the ifinfomsg and attributes): what railnet's own request must
/// equal.
pub fn iproute2_newlink(ns: &Netns, args: &[&str]) -> Vec<u8> {
    const RTM_NEWLINK: u16 = 16;
    let sends = netlink_sends(ns, "ip", args);
    sends
        .iter()
        .find(|m| m.len() > 32 && u16::from_ne_bytes([m[4], m[5]]) == RTM_NEWLINK)
        .unwrap_or_else(|| panic!("ip {args:?} sent no RTM_NEWLINK: {sends:?}"))[16..]
        .to_vec()
}

/// A link message of railnet's as the kernel receives it (the ifinfomsg
/// and attributes).
pub fn emitted(msg: &rtnetlink::packet_route::link::LinkMessage) -> Vec<u8> {
    use rtnetlink::packet_core::Emitable;
    let mut bytes = vec![0; msg.buffer_len()];
    msg.emit(&mut bytes);
    bytes
}

/// The attributes of kinds `kinds` in a link message, sorted: what two
/// requests are compared by when their other attributes may differ in
/// order or presence.
pub fn link_attributes_of(ifinfo_and_attrs: &[u8], kinds: &[u16]) -> Vec<(u16, Vec<u8>)> {
    let mut v: Vec<(u16, Vec<u8>)> = link_attributes(ifinfo_and_attrs)
        .into_iter()
        .filter(|(t, _)| kinds.contains(t))
        .collect();
    v.sort();
    v
}

/// The attributes of an rtnetlink link message (`ifinfomsg` first, then
/// attributes), by type, as raw bytes (header included).
pub fn link_attributes(ifinfo_and_attrs: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 16; // struct ifinfomsg
    while at + 4 <= ifinfo_and_attrs.len() {
        let len = u16::from_ne_bytes([ifinfo_and_attrs[at], ifinfo_and_attrs[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([ifinfo_and_attrs[at + 2], ifinfo_and_attrs[at + 3]]);
        if len < 4 || at + len > ifinfo_and_attrs.len() {
            break;
        }
        out.push((ty, ifinfo_and_attrs[at..at + len].to_vec()));
        at += (len + 3) & !3;
    }
    out
}
