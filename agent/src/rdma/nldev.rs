//! The nldev wire format: commands, attributes, the requests railnet
//! sends and the attribute decoding of replies. Pure: no socket here, so
//! every message is unit-tested byte for byte.

use std::os::fd::RawFd;

use netlink_packet_core::{
    DefaultNla, Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, NlasIterator, parse_string, parse_u8, parse_u32,
    parse_u64,
};

use super::NetnsMode;

/// `RDMA_NL_NLDEV`: the nldev client of RDMA netlink.
const RDMA_NL_NLDEV: u16 = 5;

/// nldev commands (`enum rdma_nldev_command`).
mod cmd {
    pub const GET: u8 = 1;
    pub const SET: u8 = 2;
    pub const PORT_GET: u8 = 5;
    pub const SYS_GET: u8 = 6;
    pub const SYS_SET: u8 = 7;
    pub const STAT_GET: u8 = 17;
}

/// nldev attributes (`enum rdma_nldev_attr`).
pub(super) mod attr {
    pub const DEV_INDEX: u16 = 1;
    pub const DEV_NAME: u16 = 2;
    pub const PORT_INDEX: u16 = 3;
    pub const FW_VERSION: u16 = 5;
    pub const NODE_GUID: u16 = 6;
    pub const PORT_STATE: u16 = 12;
    pub const PORT_PHYS_STATE: u16 = 13;
    pub const DEV_NODE_TYPE: u16 = 14;
    pub const NDEV_INDEX: u16 = 50;
    pub const NDEV_NAME: u16 = 51;
    pub const SYS_NETNS_MODE: u16 = 66;
    pub const DEV_PROTOCOL: u16 = 67;
    pub const NET_NS_FD: u16 = 68;
    pub const STAT_HWCOUNTERS: u16 = 80;
    pub const STAT_HWCOUNTER_ENTRY: u16 = 81;
    pub const STAT_HWCOUNTER_ENTRY_NAME: u16 = 82;
    pub const STAT_HWCOUNTER_ENTRY_VALUE: u16 = 83;
}

/// One request railnet sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Dump every device (`rdma dev`).
    Devices,
    /// One port of a device (`rdma link show <dev>/<port>`; `rdma link`
    /// asks for each port in turn, as railnet does).
    Port {
        /// Device index.
        device: u32,
        /// Port number, from 1.
        port: u32,
    },
    /// Read the system settings (`rdma system`).
    SystemGet,
    /// Set the netns mode (`rdma system set netns <mode>`).
    SystemSetNetnsMode(NetnsMode),
    /// Move a device into the netns behind `netns_fd`
    /// (`rdma dev set <dev> netns <name>`).
    MoveDevice {
        /// Device index.
        device: u32,
        /// An fd of the target netns, valid in the sending process.
        netns_fd: RawFd,
    },
    /// Rename a device (`rdma dev set <dev> name <name>`): one that came
    /// back from a dead pod netns under another name.
    RenameDevice {
        /// Device index.
        device: u32,
        /// The new name, NUL-padded (at most 63 bytes).
        name: [u8; 64],
    },
    /// Hardware counters of one port (`rdma statistic show link <dev>/<port>`).
    Counters {
        /// Device index.
        device: u32,
        /// Port number.
        port: u32,
    },
}

impl Request {
    fn command(&self) -> u8 {
        match self {
            Self::Devices => cmd::GET,
            Self::Port { .. } => cmd::PORT_GET,
            Self::SystemGet => cmd::SYS_GET,
            Self::SystemSetNetnsMode(_) => cmd::SYS_SET,
            Self::MoveDevice { .. } | Self::RenameDevice { .. } => cmd::SET,
            Self::Counters { .. } => cmd::STAT_GET,
        }
    }

    fn flags(&self) -> u16 {
        match self {
            Self::Devices => NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP,
            Self::Port { .. }
            | Self::SystemGet
            | Self::SystemSetNetnsMode(_)
            | Self::MoveDevice { .. }
            | Self::RenameDevice { .. }
            | Self::Counters { .. } => NLM_F_REQUEST | NLM_F_ACK,
        }
    }

    fn attributes(&self) -> Vec<DefaultNla> {
        let u32_attr = |kind, v: u32| DefaultNla::new(kind, v.to_ne_bytes().to_vec());
        match *self {
            Self::Devices | Self::SystemGet => vec![],
            Self::Port { device, port } | Self::Counters { device, port } => vec![
                u32_attr(attr::DEV_INDEX, device),
                u32_attr(attr::PORT_INDEX, port),
            ],
            Self::SystemSetNetnsMode(mode) => vec![DefaultNla::new(
                attr::SYS_NETNS_MODE,
                vec![match mode {
                    NetnsMode::Exclusive => 0,
                    NetnsMode::Shared => 1,
                }],
            )],
            Self::RenameDevice { device, name } => {
                // A NUL-terminated string, as the kernel's nla_strscpy wants.
                let len = name.iter().position(|b| *b == 0).unwrap_or(63);
                let mut value = name[..len].to_vec();
                value.push(0);
                vec![
                    u32_attr(attr::DEV_INDEX, device),
                    DefaultNla::new(attr::DEV_NAME, value),
                ]
            }
            Self::MoveDevice { device, netns_fd } => vec![
                u32_attr(attr::DEV_INDEX, device),
                u32_attr(attr::NET_NS_FD, netns_fd as u32),
            ],
        }
    }

    /// The exact bytes sent for this request with sequence number `seq`
    /// (port id 0: the kernel fills in the sender).
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = self.flags();
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(Nldev {
                command: self.command(),
                attributes: self.attributes(),
            }),
        );
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }
}

/// An nldev message: a command and its attributes.
#[derive(Debug)]
struct Nldev {
    command: u8,
    attributes: Vec<DefaultNla>,
}

impl NetlinkSerializable for Nldev {
    fn message_type(&self) -> u16 {
        (RDMA_NL_NLDEV << 10) | u16::from(self.command)
    }
    fn buffer_len(&self) -> usize {
        self.attributes.as_slice().buffer_len()
    }
    fn serialize(&self, buffer: &mut [u8]) {
        self.attributes.as_slice().emit(buffer)
    }
}

/// A decoded attribute; its width comes from the kind (the table of
/// `enum rdma_nldev_attr`), checked against its length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Attr {
    U8(u16, u8),
    U32(u16, u32),
    U64(u16, u64),
    Str(u16, String),
    Nested(u16, Vec<Attr>),
    Other(u16),
}

pub(super) fn parse_attributes(buf: &[u8]) -> Result<Vec<Attr>, String> {
    let mut out = Vec::new();
    for nla in NlasIterator::new(buf) {
        let nla = nla.map_err(|e| e.to_string())?;
        let kind = nla.kind();
        let v = nla.value();
        let bad = |e: netlink_packet_core::DecodeError| format!("attribute {kind}: {e}");
        out.push(match kind {
            attr::DEV_INDEX | attr::PORT_INDEX | attr::NDEV_INDEX => {
                Attr::U32(kind, parse_u32(v).map_err(bad)?)
            }
            attr::NODE_GUID | attr::STAT_HWCOUNTER_ENTRY_VALUE => {
                Attr::U64(kind, parse_u64(v).map_err(bad)?)
            }
            attr::PORT_STATE
            | attr::PORT_PHYS_STATE
            | attr::DEV_NODE_TYPE
            | attr::SYS_NETNS_MODE => Attr::U8(kind, parse_u8(v).map_err(bad)?),
            attr::DEV_NAME
            | attr::NDEV_NAME
            | attr::FW_VERSION
            | attr::DEV_PROTOCOL
            | attr::STAT_HWCOUNTER_ENTRY_NAME => Attr::Str(kind, parse_string(v).map_err(bad)?),
            attr::STAT_HWCOUNTERS | attr::STAT_HWCOUNTER_ENTRY => {
                Attr::Nested(kind, parse_attributes(v)?)
            }
            _ => Attr::Other(kind),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_request_layout() {
        let bytes = Request::MoveDevice {
            device: 3,
            netns_fd: 9,
        }
        .encode(7);
        // header: len 32, type (5<<10)|2, flags REQUEST|ACK, seq 7, pid 0
        assert_eq!(&bytes[0..4], &32u32.to_ne_bytes());
        assert_eq!(&bytes[4..6], &((5u16 << 10) | 2).to_ne_bytes());
        assert_eq!(&bytes[6..8], &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        assert_eq!(&bytes[8..12], &7u32.to_ne_bytes());
        // DEV_INDEX=3 then NET_NS_FD=9, 8 bytes each
        assert_eq!(&bytes[16..20], &[8, 0, 1, 0]);
        assert_eq!(&bytes[20..24], &3u32.to_ne_bytes());
        assert_eq!(&bytes[24..28], &[8, 0, 68, 0]);
        assert_eq!(&bytes[28..32], &9u32.to_ne_bytes());
    }

    #[test]
    fn u8_attribute_is_padded() {
        let bytes = Request::SystemSetNetnsMode(NetnsMode::Exclusive).encode(1);
        assert_eq!(bytes.len(), 16 + 8);
        assert_eq!(&bytes[16..21], &[5, 0, 66, 0, 0]);
    }

    #[test]
    fn replies_parse_and_junk_is_an_error() {
        let mut buf = Vec::new();
        DefaultNla::new(attr::DEV_INDEX, 4u32.to_ne_bytes().to_vec());
        let attrs = [
            DefaultNla::new(attr::DEV_INDEX, 4u32.to_ne_bytes().to_vec()),
            DefaultNla::new(attr::DEV_NAME, b"rxe0\0".to_vec()),
            DefaultNla::new(attr::DEV_NODE_TYPE, vec![1]),
        ];
        buf.resize(attrs.as_slice().buffer_len(), 0);
        attrs.as_slice().emit(&mut buf);
        assert_eq!(
            parse_attributes(&buf).unwrap(),
            vec![
                Attr::U32(attr::DEV_INDEX, 4),
                Attr::Str(attr::DEV_NAME, "rxe0".into()),
                Attr::U8(attr::DEV_NODE_TYPE, 1)
            ]
        );
        // A u32 attribute two bytes long: named, not a panic.
        let err = parse_attributes(&[6, 0, 1, 0, 1, 2, 0, 0]).unwrap_err();
        assert!(err.contains("attribute 1"), "{err}");
        assert!(parse_attributes(&[200, 0, 1, 0]).is_err());
    }
}
