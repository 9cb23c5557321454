//! The RDMA netlink socket: one request, its replies, decoded.

use std::os::fd::RawFd;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_RDMA};

use super::nldev::{Attr, Request, attr, parse_attributes};
use super::{NetnsMode, RdmaDevice, RdmaError, RdmaPort, explain};

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
