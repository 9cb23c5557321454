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

use std::fmt;

mod client;
mod host;
mod nldev;

pub use client::RdmaNetlink;
pub use host::{
    PortCounters, counters_in, devices_of_pci, give_back, isolate, restore_name, roce_gid_index,
    roce_gid_index_in,
};
pub use nldev::Request;

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
