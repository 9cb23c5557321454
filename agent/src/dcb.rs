//! The kernel's DCB netlink (dcbnl, `RTM_GETDCB`), as much of it as the
//! lossless-RoCE checks read: a rail NIC's IEEE 802.1Qaz state — which
//! priorities PFC pauses, and the application table whose DSCP entries
//! mean the NIC trusts DSCP (what `mlnx_qos --trust dscp` and `dcb app`
//! set). One request, the one iproute2's `dcb pfc show` sends (checked
//! byte for byte in the tests); replies parsed here, tested with messages
//! laid out as the kernel's `dcbnl_ieee_fill` writes them (no device on
//! these machines implements DCB: veth and soft RoCE answer EOPNOTSUPP).

use std::fmt;

/// `RTM_GETDCB`.
pub const RTM_GETDCB: u16 = 78;
/// `DCB_CMD_IEEE_GET`.
pub const DCB_CMD_IEEE_GET: u8 = 21;
const DCB_ATTR_IFNAME: u16 = 1;
const DCB_ATTR_IEEE: u16 = 13;
const DCB_ATTR_DCBX: u16 = 14;
const DCB_ATTR_IEEE_PFC: u16 = 2;
const DCB_ATTR_IEEE_APP_TABLE: u16 = 3;
const DCB_ATTR_IEEE_APP: u16 = 1;
/// `IEEE_8021QAZ_APP_SEL_DSCP`.
pub const APP_SEL_DSCP: u8 = 5;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;

/// A NIC's IEEE DCB state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ieee {
    /// PFC: (capability — how many priorities may pause, enabled bitmap).
    pub pfc: Option<Pfc>,
    /// The application table's DSCP entries: (DSCP, priority).
    pub dscp: Vec<(u8, u8)>,
    /// DCBX mode bits (`DCB_CAP_DCBX_*`), when the driver says.
    pub dcbx: Option<u8>,
}

/// PFC as the NIC reports it (`struct ieee_pfc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pfc {
    /// How many traffic classes may have PFC at once.
    pub cap: u8,
    /// Enabled priorities, bit P for priority P.
    pub enabled: u8,
}

impl Pfc {
    /// The priorities PFC pauses, lowest first.
    pub fn priorities(&self) -> Vec<u8> {
        (0..8).filter(|p| self.enabled & (1 << p) != 0).collect()
    }
}

/// Why the state could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum DcbError {
    /// The driver has no DCB netlink operations (veth, soft RoCE, many
    /// virtual NICs).
    Unsupported,
    /// The kernel refused with this errno.
    Kernel(i32),
    /// A reply railnet could not read.
    Malformed(String),
    /// The netlink socket failed.
    Io(String),
}

impl fmt::Display for DcbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported => write!(
                f,
                "no DCB support (its driver has no DCB netlink operations)"
            ),
            Self::Kernel(e) => write!(
                f,
                "the kernel refused the DCB request: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
            Self::Malformed(m) => write!(f, "an unreadable DCB reply: {m}"),
            Self::Io(m) => write!(f, "DCB netlink: {m}"),
        }
    }
}

/// The `DCB_CMD_IEEE_GET` request for `ifname`, with netlink sequence
/// number `seq` (port id 0: the kernel fills it in).
pub fn ieee_get_request(ifname: &str, seq: u32) -> Vec<u8> {
    let mut attr = Vec::new();
    let name_len = ifname.len() + 1;
    attr.extend_from_slice(&((4 + name_len) as u16).to_ne_bytes());
    attr.extend_from_slice(&DCB_ATTR_IFNAME.to_ne_bytes());
    attr.extend_from_slice(ifname.as_bytes());
    attr.push(0);
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    let len = 16 + 4 + attr.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_GETDCB.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct dcbmsg: family AF_UNSPEC, the command, padding.
    msg.extend_from_slice(&[0, DCB_CMD_IEEE_GET, 0, 0]);
    msg.extend_from_slice(&attr);
    msg
}

/// Netlink attributes in `buf`: (type without flags, payload).
fn attributes(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, DcbError> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return Err(DcbError::Malformed(format!(
                "attribute {kind} of length {len} in {} bytes",
                buf.len()
            )));
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(out)
}

/// Reads the kernel's answer to [`ieee_get_request`]: one or more netlink
/// messages (the `RTM_GETDCB` reply, then the ACK; or an error).
pub fn parse_reply(mut buf: &[u8]) -> Result<Option<Ieee>, DcbError> {
    let mut found = None;
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            return Err(DcbError::Malformed(format!(
                "a message of length {len} in {} bytes",
                buf.len()
            )));
        }
        let body = &buf[16..len];
        match kind {
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| DcbError::Malformed("a short error message".into()))?;
                match -errno {
                    0 => return Ok(found),
                    libc::EOPNOTSUPP => return Err(DcbError::Unsupported),
                    e => return Err(DcbError::Kernel(e)),
                }
            }
            NLMSG_DONE => return Ok(found),
            RTM_GETDCB => found = Some(ieee_of(body)?),
            _ => {}
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(found)
}

/// The `struct dcbmsg` and attributes of a `DCB_CMD_IEEE_GET` reply.
fn ieee_of(body: &[u8]) -> Result<Ieee, DcbError> {
    if body.len() < 4 || body[1] != DCB_CMD_IEEE_GET {
        return Err(DcbError::Malformed("not an IEEE_GET reply".into()));
    }
    let mut ieee = Ieee::default();
    for (kind, payload) in attributes(&body[4..])? {
        match kind {
            DCB_ATTR_DCBX => ieee.dcbx = payload.first().copied(),
            DCB_ATTR_IEEE => {
                for (k, p) in attributes(payload)? {
                    match k {
                        // struct ieee_pfc: pfc_cap, pfc_en, mbc, delay, …
                        DCB_ATTR_IEEE_PFC if p.len() >= 2 => {
                            ieee.pfc = Some(Pfc {
                                cap: p[0],
                                enabled: p[1],
                            });
                        }
                        DCB_ATTR_IEEE_APP_TABLE => {
                            for (a, app) in attributes(p)? {
                                // struct dcb_app: selector, priority, protocol.
                                if a == DCB_ATTR_IEEE_APP
                                    && app.len() >= 4
                                    && app[0] == APP_SEL_DSCP
                                {
                                    let dscp = u16::from_ne_bytes([app[2], app[3]]);
                                    ieee.dscp.push((dscp as u8, app[1]));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(ieee)
}

/// Asks the kernel for `ifname`'s IEEE DCB state (in the caller's netns).
pub fn ieee_get(ifname: &str) -> Result<Ieee, DcbError> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let io = |e: std::io::Error| DcbError::Io(e.to_string());
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(io)?;
    sock.bind_auto().map_err(io)?;
    sock.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    let req = ieee_get_request(ifname, 1);
    sock.send(&req, 0).map_err(io)?;
    let mut all = Vec::new();
    loop {
        let mut buf = vec![0u8; 16384];
        let n = sock.recv(&mut &mut buf[..], 0).map_err(io)?;
        all.extend_from_slice(&buf[..n]);
        // An error or the ACK (an error message with 0) ends the exchange.
        if ends_with_ack(&all) {
            return parse_reply(&all)?
                .ok_or_else(|| DcbError::Malformed("an ACK without a reply".into()));
        }
    }
}

/// Whether the last message in `buf` is an error message (an ACK is one
/// with errno 0).
fn ends_with_ack(mut buf: &[u8]) -> bool {
    let mut last = None;
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            return false;
        }
        last = Some(&buf[..len]);
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    last.is_some_and(|m| u16::from_ne_bytes([m[4], m[5]]) == NLMSG_ERROR)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    fn error(errno: i32) -> Vec<u8> {
        let mut body = (-errno).to_ne_bytes().to_vec();
        body.extend_from_slice(&ieee_get_request("eth1", 1)[..16]);
        message(NLMSG_ERROR, &body)
    }

    /// A reply as `dcbnl_ieee_fill` lays it out for a NIC with PFC on
    /// priority 3 of 8 and DSCP 26 and 46 mapped to priorities 3 and 5,
    /// then the ACK.
    pub(crate) fn mlx5_like_reply() -> Vec<u8> {
        let mut pfc = vec![8u8, 1 << 3, 0, 0, 0, 0, 0, 0];
        pfc.extend_from_slice(&[0u8; 128]);
        let mut apps = Vec::new();
        for (dscp, prio) in [(26u16, 3u8), (46, 5)] {
            let mut app = vec![APP_SEL_DSCP, prio];
            app.extend_from_slice(&dscp.to_ne_bytes());
            apps.extend(nla(DCB_ATTR_IEEE_APP, &app));
        }
        let mut ieee = nla(1, &[0u8; 59]); // ETS, not read
        ieee.extend(nla(DCB_ATTR_IEEE_PFC, &pfc));
        ieee.extend(nla(DCB_ATTR_IEEE_APP_TABLE | NLA_F_NESTED, &apps));
        let mut body = vec![0, DCB_CMD_IEEE_GET, 0, 0];
        body.extend(nla(DCB_ATTR_IFNAME, b"eth1\0"));
        body.extend(nla(DCB_ATTR_IEEE | NLA_F_NESTED, &ieee));
        body.extend(nla(DCB_ATTR_DCBX, &[0x08 | 0x04]));
        let mut all = message(RTM_GETDCB, &body);
        all.extend(error(0));
        all
    }

    #[test]
    fn the_request_is_iproute2s_layout() {
        let req = ieee_get_request("v0", 7);
        assert_eq!(req.len(), 28);
        assert_eq!(&req[4..8], &[78, 0, 5, 0]);
        assert_eq!(&req[16..], &[0, 21, 0, 0, 7, 0, 1, 0, b'v', b'0', 0, 0]);
    }

    #[test]
    fn a_reply_gives_pfc_priorities_and_the_dscp_map() {
        let ieee = parse_reply(&mlx5_like_reply()).unwrap().unwrap();
        assert_eq!(ieee.pfc.unwrap().priorities(), vec![3]);
        assert_eq!(ieee.pfc.unwrap().cap, 8);
        assert_eq!(ieee.dscp, vec![(26, 3), (46, 5)]);
        assert_eq!(ieee.dcbx, Some(0x0c));
        assert!(ends_with_ack(&mlx5_like_reply()));
    }

    #[test]
    fn no_dcb_support_and_broken_replies_are_named() {
        assert_eq!(
            parse_reply(&error(libc::EOPNOTSUPP)),
            Err(DcbError::Unsupported)
        );
        assert_eq!(
            parse_reply(&error(libc::ENODEV)),
            Err(DcbError::Kernel(libc::ENODEV))
        );
        let mut cut = mlx5_like_reply();
        cut[0] = 200; // a length past the end
        assert!(matches!(parse_reply(&cut), Err(DcbError::Malformed(_))));
        let mut bad_attr = mlx5_like_reply();
        bad_attr[20] = 2; // IFNAME's length below its header
        assert!(matches!(
            parse_reply(&bad_attr),
            Err(DcbError::Malformed(_))
        ));
    }
}
