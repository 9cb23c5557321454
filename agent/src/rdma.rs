//! RDMA netlink (`NETLINK_RDMA`, the nldev client): list devices and ports,
//! read and set the system netns mode, move a device into a netns, read
//! port counters. No crate speaks nldev, so the messages are built here on
//! netlink-packet-core's framing; every one of them is checked byte for
//! byte against iproute2's `rdma` on a kernel that has RDMA (the qemu
//! tests).
//!
//! nldev messages carry no family header: attributes follow the netlink
//! header directly, and the message type is `(RDMA_NL_NLDEV << 10) | cmd`.
//! The kernel looks devices up in the netns of the sending socket, so a
//! [`RdmaNetlink`] talks about the netns it was opened in.

use std::{fmt, os::fd::RawFd};

use netlink_packet_core::{
    DefaultNla, Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, NlasIterator, parse_string, parse_u8, parse_u32,
    parse_u64,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_RDMA};

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
mod attr {
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

/// Whether RDMA devices are shared by every netns or each belongs to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsMode {
    /// Each device lives in exactly one netns and can be moved (SR-IOV,
    /// InfiniBand: `rdmaIsolation`).
    Exclusive,
    /// Every netns sees every device (macvlan on a RoCE NIC).
    Shared,
}

impl fmt::Display for NetnsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exclusive => "exclusive",
            Self::Shared => "shared",
        })
    }
}

/// One RDMA device as the kernel lists it (`rdma dev`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RdmaDevice {
    /// Kernel index.
    pub index: u32,
    /// Name, e.g. `mlx5_0`, `rxe0`.
    pub name: String,
    /// Number of ports (ports are numbered from 1).
    pub ports: u32,
    /// Node GUID.
    pub node_guid: Option<u64>,
    /// Node type (1 CA, 2 switch, 3 router, 4 RNIC, ...).
    pub node_type: Option<u8>,
    /// Firmware version.
    pub fw_version: Option<String>,
    /// `ib`, `roce`, `iw`, `opa` (Linux 5.14+).
    pub protocol: Option<String>,
}

/// One port of a device with the netdev behind it (`rdma link`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RdmaPort {
    /// Device index.
    pub device_index: u32,
    /// Device name.
    pub device: String,
    /// Port number, from 1.
    pub port: u32,
    /// Port state (4 = ACTIVE).
    pub state: Option<u8>,
    /// Physical state (5 = LINK_UP).
    pub phys_state: Option<u8>,
    /// ifindex of the netdev (RoCE, IPoIB), in the netns the device is in.
    pub netdev_index: Option<u32>,
    /// Name of that netdev.
    pub netdev: Option<String>,
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

/// Errors talking RDMA netlink, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// The kernel has no RDMA subsystem (or ib_core is not loaded).
    #[error(
        "this kernel has no RDMA netlink ({0}); load ib_core (modprobe ib_core) or run on a node with RDMA NICs"
    )]
    NoRdma(std::io::Error),
    /// The socket failed.
    #[error("RDMA netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused a request.
    #[error("{what}: {why}")]
    Kernel {
        /// The operation and the device it was about.
        what: String,
        /// The kernel's errno, put in words.
        why: String,
        /// The raw errno.
        errno: i32,
    },
    /// A reply did not parse.
    #[error("RDMA netlink reply to {what} did not parse: {why}")]
    Reply {
        /// The request.
        what: String,
        /// What was wrong with the reply.
        why: String,
    },
    /// No device of that name.
    #[error(
        "no RDMA device {0:?} in this netns; `rdma dev` lists them (in exclusive mode a device is visible only in the netns that holds it)"
    )]
    NoDevice(String),
}

impl RdmaError {
    /// The errno behind a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Puts a refusal in words for the request that met it.
fn explain(req: &Request, device: &str, errno: i32) -> RdmaError {
    let what = match req {
        Request::Devices => "listing RDMA devices".to_owned(),
        Request::Port { .. } => format!("reading a port of RDMA device {device}"),
        Request::SystemGet => "reading the RDMA netns mode".to_owned(),
        Request::SystemSetNetnsMode(m) => format!("setting the RDMA netns mode to {m}"),
        Request::MoveDevice { .. } => format!("moving RDMA device {device} to the pod netns"),
        Request::RenameDevice { .. } => format!("renaming RDMA device {device}"),
        Request::Counters { .. } => format!("reading the counters of RDMA device {device}"),
    };
    let why = match (req, errno) {
        (Request::MoveDevice { .. }, libc::EOPNOTSUPP) => {
            "the device driver cannot change netns, or the system is in shared mode \
             (`rdma system` shows it; exclusive mode needs `options ib_core netns_mode=0` and a reboot)"
                .to_owned()
        }
        (Request::SystemSetNetnsMode(_), libc::EBUSY) => {
            "pod network namespaces exist; set `options ib_core netns_mode=0` \
             (for exclusive) in /etc/modprobe.d and reboot"
                .to_owned()
        }
        (_, libc::EPERM) => "not permitted: needs CAP_NET_ADMIN in the initial user namespace".into(),
        (_, e) => std::io::Error::from_raw_os_error(e).to_string(),
    };
    RdmaError::Kernel { what, why, errno }
}

/// A client on an RDMA netlink socket, bound to the netns of the thread
/// that opened it.
pub struct RdmaNetlink {
    socket: Socket,
    seq: u32,
}

impl RdmaNetlink {
    /// Opens a socket in the calling thread's current netns.
    pub fn open() -> Result<Self, RdmaError> {
        let mut socket = Socket::new(NETLINK_RDMA).map_err(RdmaError::NoRdma)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 1 })
    }

    /// Sends `req` and collects the attribute lists of every reply
    /// message until the dump ends or the ACK comes.
    fn exchange(&mut self, req: &Request, device: &str) -> Result<Vec<Vec<Attr>>, RdmaError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.send(&req.encode(seq), 0)?;
        let reply_err = |why: String| RdmaError::Reply {
            what: format!("{req:?}"),
            why,
        };
        let mut replies = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < buf.len() {
                let rest = &buf[at..];
                if rest.len() < 16 {
                    return Err(reply_err(format!("{} stray bytes", rest.len())));
                }
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let their_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < 16 || len > rest.len() {
                    return Err(reply_err(format!(
                        "message length {len} with {} bytes left",
                        rest.len()
                    )));
                }
                let body = &rest[16..len];
                at += (len + 3) & !3;
                if their_seq != seq {
                    continue; // a late reply to an earlier request
                }
                match kind {
                    // NLMSG_ERROR: 0 is the ACK, else a negative errno.
                    2 => {
                        let code = body
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .ok_or_else(|| reply_err("short error message".into()))?;
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(explain(req, device, -code));
                    }
                    // NLMSG_DONE ends a dump.
                    3 => return Ok(replies),
                    1 => continue, // NLMSG_NOOP
                    _ => replies.push(parse_attributes(body).map_err(reply_err)?),
                }
            }
        }
    }

    /// Every RDMA device this netns sees.
    pub fn devices(&mut self) -> Result<Vec<RdmaDevice>, RdmaError> {
        let replies = self.exchange(&Request::Devices, "")?;
        let mut devices: Vec<RdmaDevice> = replies
            .iter()
            .map(|attrs| {
                let mut d = RdmaDevice::default();
                for a in attrs {
                    match a {
                        Attr::U32(attr::DEV_INDEX, v) => d.index = *v,
                        Attr::Str(attr::DEV_NAME, v) => d.name = v.clone(),
                        Attr::U32(attr::PORT_INDEX, v) => d.ports = *v,
                        Attr::U64(attr::NODE_GUID, v) => d.node_guid = Some(*v),
                        Attr::U8(attr::DEV_NODE_TYPE, v) => d.node_type = Some(*v),
                        Attr::Str(attr::FW_VERSION, v) => d.fw_version = Some(v.clone()),
                        Attr::Str(attr::DEV_PROTOCOL, v) => d.protocol = Some(v.clone()),
                        _ => {}
                    }
                }
                d
            })
            .collect();
        devices.sort_by_key(|d| d.index);
        Ok(devices)
    }

    /// The device named `name`.
    pub fn device(&mut self, name: &str) -> Result<RdmaDevice, RdmaError> {
        self.devices()?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| RdmaError::NoDevice(name.to_owned()))
    }

    /// The ports of one device.
    pub fn ports(&mut self, device: &RdmaDevice) -> Result<Vec<RdmaPort>, RdmaError> {
        let mut ports = Vec::new();
        for port in 1..=device.ports {
            let replies = self.exchange(
                &Request::Port {
                    device: device.index,
                    port,
                },
                &device.name,
            )?;
            for attrs in &replies {
                let mut p = RdmaPort {
                    device_index: device.index,
                    device: device.name.clone(),
                    port,
                    ..RdmaPort::default()
                };
                for a in attrs {
                    match a {
                        Attr::U8(attr::PORT_STATE, v) => p.state = Some(*v),
                        Attr::U8(attr::PORT_PHYS_STATE, v) => p.phys_state = Some(*v),
                        Attr::U32(attr::NDEV_INDEX, v) => p.netdev_index = Some(*v),
                        Attr::Str(attr::NDEV_NAME, v) => p.netdev = Some(v.clone()),
                        _ => {}
                    }
                }
                ports.push(p);
            }
        }
        Ok(ports)
    }

    /// Every port of every device (`rdma link`).
    pub fn links(&mut self) -> Result<Vec<RdmaPort>, RdmaError> {
        let mut all = Vec::new();
        for d in self.devices()? {
            all.extend(self.ports(&d)?);
        }
        Ok(all)
    }

    /// The ports whose netdev is `netdev` (in this netns).
    pub fn ports_of_netdev(&mut self, netdev: &str) -> Result<Vec<RdmaPort>, RdmaError> {
        Ok(self
            .links()?
            .into_iter()
            .filter(|p| p.netdev.as_deref() == Some(netdev))
            .collect())
    }

    /// The system netns mode.
    pub fn netns_mode(&mut self) -> Result<NetnsMode, RdmaError> {
        let replies = self.exchange(&Request::SystemGet, "")?;
        for attrs in &replies {
            for a in attrs {
                if let Attr::U8(attr::SYS_NETNS_MODE, v) = a {
                    return Ok(if *v == 0 {
                        NetnsMode::Exclusive
                    } else {
                        NetnsMode::Shared
                    });
                }
            }
        }
        Err(RdmaError::Reply {
            what: "SystemGet".into(),
            why: "no netns mode in the reply".into(),
        })
    }

    /// Sets the system netns mode (EBUSY while other netns exist).
    pub fn set_netns_mode(&mut self, mode: NetnsMode) -> Result<(), RdmaError> {
        self.exchange(&Request::SystemSetNetnsMode(mode), "")
            .map(drop)
    }

    /// Moves `device` (looked up in this socket's netns) into the netns
    /// behind `netns_fd`.
    pub fn move_device(&mut self, device: &RdmaDevice, netns_fd: RawFd) -> Result<(), RdmaError> {
        self.exchange(
            &Request::MoveDevice {
                device: device.index,
                netns_fd,
            },
            &device.name,
        )
        .map(drop)
    }

    /// Renames `device` to `name` (1 to 63 bytes).
    pub fn rename_device(&mut self, device: &RdmaDevice, name: &str) -> Result<(), RdmaError> {
        let mut buf = [0u8; 64];
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > 63 || bytes.contains(&0) {
            return Err(RdmaError::Kernel {
                what: format!("renaming RDMA device {}", device.name),
                why: format!("{name:?} is not a device name (1 to 63 bytes, no NUL)"),
                errno: libc::EINVAL,
            });
        }
        buf[..bytes.len()].copy_from_slice(bytes);
        self.exchange(
            &Request::RenameDevice {
                device: device.index,
                name: buf,
            },
            &device.name,
        )
        .map(drop)
    }

    /// Hardware counters of one port, by name.
    pub fn counters(
        &mut self,
        device: &RdmaDevice,
        port: u32,
    ) -> Result<Vec<(String, u64)>, RdmaError> {
        let replies = self.exchange(
            &Request::Counters {
                device: device.index,
                port,
            },
            &device.name,
        )?;
        let mut out = Vec::new();
        for attrs in &replies {
            for a in attrs {
                if let Attr::Nested(attr::STAT_HWCOUNTERS, entries) = a {
                    for e in entries {
                        if let Attr::Nested(attr::STAT_HWCOUNTER_ENTRY, fields) = e {
                            let name = fields.iter().find_map(|f| match f {
                                Attr::Str(attr::STAT_HWCOUNTER_ENTRY_NAME, n) => Some(n.clone()),
                                _ => None,
                            });
                            let value = fields.iter().find_map(|f| match f {
                                Attr::U64(attr::STAT_HWCOUNTER_ENTRY_VALUE, v) => Some(*v),
                                _ => None,
                            });
                            if let (Some(n), Some(v)) = (name, value) {
                                out.push((n, v));
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A decoded attribute; its width comes from the kind (the table of
/// `enum rdma_nldev_attr`), checked against its length.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Attr {
    U8(u16, u8),
    U32(u16, u32),
    U64(u16, u64),
    Str(u16, String),
    Nested(u16, Vec<Attr>),
    Other(u16),
}

fn parse_attributes(buf: &[u8]) -> Result<Vec<Attr>, String> {
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

/// One port of a device and its hardware counters (name, value).
pub type PortCounters = (RdmaPort, Vec<(String, u64)>);

/// The hardware counters of `device`'s ports as the network namespace at
/// `netns` sees them: read over an RDMA netlink socket opened inside it
/// (on a thread of its own), where an isolated device alone is visible.
pub fn counters_in(netns: &std::path::Path, device: &str) -> Result<Vec<PortCounters>, String> {
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    let device = device.to_owned();
    std::thread::Builder::new()
        .name("railnet-rdma-stat".into())
        .spawn(move || -> Result<Vec<PortCounters>, String> {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the pod's netns: {e}"))?;
            let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
            let dev = nl.device(&device).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for port in nl.ports(&dev).map_err(|e| e.to_string())? {
                let counters = nl.counters(&dev, port.port).map_err(|e| e.to_string())?;
                out.push((port, counters));
            }
            Ok(out)
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the reading thread panicked".to_owned())?
}

/// The RDMA devices of a PCI function (`<sysfs>/bus/pci/devices/<bdf>/infiniband/`).
pub fn devices_of_pci(sysfs: &std::path::Path, bdf: &str) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(sysfs.join("bus/pci/devices").join(bdf).join("infiniband"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
    names.sort();
    names
}

/// The index of the RoCE GID the kernel derived from `addr` on a port
/// (`::ffff:a.b.c.d`), preferring RoCE v2, as seen in the host's sysfs.
/// The GID table follows address changes through a workqueue, so this
/// waits up to a second for the entry to appear.
pub fn roce_gid_index(device: &str, port: u32, addr: std::net::Ipv4Addr) -> Option<u32> {
    roce_gid_index_at(std::path::Path::new("/sys"), device, port, addr)
}

/// [`roce_gid_index`] of a device the network namespace `netns` sees — an
/// isolated device, which the host's sysfs no longer shows. Sysfs shows
/// the RDMA devices of the netns that mounted it, so a thread of its own
/// takes a private mount namespace, enters `netns`, mounts a sysfs of its
/// own over `/sys` and reads that; the mount goes with the thread and
/// never reaches the host's mounts (`/` is made private first).
pub fn roce_gid_index_in(
    netns: std::os::fd::BorrowedFd<'_>,
    device: &str,
    port: u32,
    addr: std::net::Ipv4Addr,
) -> Result<Option<u32>, String> {
    use nix::{
        mount::{MsFlags, mount},
        sched::{CloneFlags, setns, unshare},
    };
    let ns = netns
        .try_clone_to_owned()
        .map_err(|e| format!("dup netns fd: {e}"))?;
    let device = device.to_owned();
    std::thread::Builder::new()
        .name("railnet-rdma-gid".into())
        .spawn(move || -> Result<Option<u32>, String> {
            unshare(CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("a private mount namespace: {e}"))?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| format!("making / private: {e}"))?;
            setns(ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the pod's netns: {e}"))?;
            match mount(
                Some("sysfs"),
                "/sys",
                Some("sysfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            ) {
                // The kernel refuses to mount a superblock again where it
                // is already mounted: `/sys` is already this netns's view.
                Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
                Err(e) => return Err(format!("mounting the pod netns's sysfs: {e}")),
            }
            Ok(roce_gid_index_at(
                std::path::Path::new("/sys"),
                &device,
                port,
                addr,
            ))
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the reading thread panicked".to_owned())?
}

/// [`roce_gid_index`] under the sysfs mounted at `sysfs`.
fn roce_gid_index_at(
    sysfs: &std::path::Path,
    device: &str,
    port: u32,
    addr: std::net::Ipv4Addr,
) -> Option<u32> {
    let dir = sysfs.join(format!("class/infiniband/{device}/ports/{port}"));
    let want = addr.to_ipv6_mapped();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let mut found: Option<(u32, bool)> = None;
        if let Ok(entries) = std::fs::read_dir(dir.join("gids")) {
            for e in entries.flatten() {
                let Ok(index) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let gid = std::fs::read_to_string(e.path()).unwrap_or_default();
                let Ok(gid) = gid.trim().parse::<std::net::Ipv6Addr>() else {
                    continue;
                };
                if gid != want {
                    continue;
                }
                let v2 = std::fs::read_to_string(dir.join(format!("gid_attrs/types/{index}")))
                    .map(|t| t.trim() == "RoCE v2")
                    .unwrap_or(false);
                if found.is_none_or(|(_, had_v2)| v2 && !had_v2) {
                    found = Some((index, v2));
                }
            }
        }
        if let Some((index, _)) = found {
            return Some(index);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits up to `wait` for the RDMA device of PCI function `bdf` to be in
/// the calling thread's netns (one returned by a dead pod netns comes back
/// asynchronously) and renames it to `name` if it came back as another.
/// Returns whether it renamed.
pub fn restore_name(
    sysfs: &std::path::Path,
    bdf: &str,
    name: &str,
    wait: std::time::Duration,
) -> Result<bool, String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(current) = devices_of_pci(sysfs, bdf).into_iter().next() {
            if current == name {
                return Ok(false);
            }
            let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
            let dev = nl.device(&current).map_err(|e| e.to_string())?;
            nl.rename_device(&dev, name).map_err(|e| e.to_string())?;
            tracing::info!(from = %current, to = %name, pci = %bdf, "RDMA device back under its own name");
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the RDMA device of {bdf} ({name}) did not come back to the host within {} s",
                wait.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Device moves are serialized on a node: the kernel reassigns a device's
/// clients on each move, and DEL's "wait for it to come back" must not
/// see another pod's device come and go.
static MOVES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Moves `device` (seen from the calling thread's netns, the host's) into
/// `pod`.
pub fn isolate(device: &RdmaDevice, pod: &crate::netns::PodNetns) -> Result<(), RdmaError> {
    let _serial = MOVES.lock().unwrap_or_else(|e| e.into_inner());
    use std::os::fd::AsRawFd;
    RdmaNetlink::open()?.move_device(device, pod.fd().as_raw_fd())
}

/// Moves every RDMA device in `pod` whose port's netdev is `ifname` back to
/// the calling thread's netns (the host's), from a socket opened inside the
/// pod (the kernel looks the device up in the sender's netns), then waits
/// for each to be listed in the host again. Returns the devices moved.
pub fn give_back(pod: &crate::netns::PodNetns, ifname: &str) -> Result<Vec<String>, String> {
    let _serial = MOVES.lock().unwrap_or_else(|e| e.into_inner());
    let host = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("opening the host netns: {e}"))?;
    let ifname = ifname.to_owned();
    let moved = pod
        .run(move || -> Result<Vec<String>, String> {
            use std::os::fd::AsRawFd;
            let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
            let mut moved = Vec::new();
            for dev in nl.devices().map_err(|e| e.to_string())? {
                let ports = nl.ports(&dev).map_err(|e| e.to_string())?;
                if ports
                    .iter()
                    .any(|p| p.netdev.as_deref() == Some(ifname.as_str()))
                {
                    nl.move_device(&dev, host.as_raw_fd())
                        .map_err(|e| e.to_string())?;
                    moved.push(dev.name);
                }
            }
            Ok(moved)
        })
        .map_err(|e| e.to_string())??;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
    loop {
        let here = nl.devices().map_err(|e| e.to_string())?;
        let missing: Vec<&String> = moved
            .iter()
            .filter(|m| !here.iter().any(|d| &d.name == *m))
            .collect();
        if missing.is_empty() {
            return Ok(moved);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "RDMA devices {missing:?} did not reappear in the host within 10 s"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
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
