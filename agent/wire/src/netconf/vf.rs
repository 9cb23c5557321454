//! The VF side of a rail config: the attributes set through the PF, the
//! runtime's device ID, and the parsers for the identifiers a VF and an
//! InfiniBand port are named by (GUID, P_Key, MAC, PCI address).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// VF attributes set through the PF (what sriov-cni sets); `None`: left
/// as the VF has it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfSettings {
    /// VLAN ID (0: none).
    pub vlan: Option<u16>,
    /// VLAN priority.
    pub qos: u8,
    /// MAC spoof checking.
    pub spoofchk: Option<bool>,
    /// Trusted (may change its MAC, enter promiscuous mode).
    pub trust: Option<bool>,
    /// Link state the PF reports to the VF.
    pub link_state: Option<VfLinkMode>,
    /// The VF's MAC as its PF knows it (the one spoof checking allows):
    /// the pod's `runtimeConfig.mac`, set on the netdev and through the PF.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// An InfiniBand VF's node GUID (`ip link set … vf N node_guid`).
    #[serde(default)]
    pub node_guid: Option<u64>,
    /// An InfiniBand VF's port GUID (`ip link set … vf N port_guid`).
    #[serde(default)]
    pub port_guid: Option<u64>,
}

impl VfSettings {
    /// Whether anything is asked of the PF besides the MAC.
    pub fn is_empty(&self) -> bool {
        self.vlan.is_none()
            && self.spoofchk.is_none()
            && self.trust.is_none()
            && self.link_state.is_none()
            && self.node_guid.is_none()
            && self.port_guid.is_none()
    }

    /// Whether a GUID is asked (the VF's driver must be rebound for it).
    pub fn sets_guid(&self) -> bool {
        self.node_guid.is_some() || self.port_guid.is_some()
    }
}

/// A VF's link state as its PF reports it (`ip link set … vf N state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VfLinkMode {
    /// Follows the PF's link.
    Auto,
    /// Always up.
    Enable,
    /// Always down.
    Disable,
}

/// `runtimeConfig`: per-pod values from the runtime.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RuntimeConfig {
    /// The MAC the pod asked for (the `mac` capability; Multus takes it from
    /// the pod's networks annotation).
    #[serde(default)]
    pub mac: Option<String>,
    /// The device plugin's VF (some runtimes pass it here instead of the
    /// top level).
    #[serde(default, rename = "deviceID")]
    pub device_id: Option<String>,
    /// Addresses the pod asked for (the `ips` capability; Multus takes
    /// them from the pod's networks annotation), `a.b.c.d/len` or bare.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The GUID for an InfiniBand VF (the `infinibandGUID` capability;
    /// ib-kubernetes puts it in the pod's networks annotation).
    #[serde(default, rename = "infinibandGUID")]
    pub infiniband_guid: Option<String>,
}

/// Parses a GUID as iproute2 does (`xx:xx:xx:xx:xx:xx:xx:xx`, the first
/// byte most significant).
pub fn parse_guid(text: &str) -> Option<u64> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 8 {
        return None;
    }
    let mut guid = 0u64;
    for p in parts {
        if p.len() != 2 {
            return None;
        }
        guid = guid << 8 | u64::from(u8::from_str_radix(p, 16).ok()?);
    }
    Some(guid)
}

/// Writes a GUID as `xx:xx:xx:xx:xx:xx:xx:xx`.
pub fn format_guid(guid: u64) -> String {
    guid.to_be_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A partition key: `"0x8001"` (or a number), 16 bits, not the invalid
/// key 0 (with or without the membership bit).
pub fn parse_pkey(v: &serde_json::Value) -> Option<u16> {
    let n = match v {
        serde_json::Value::String(s) => {
            let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
            u16::from_str_radix(hex, 16).ok()?
        }
        serde_json::Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        _ => return None,
    };
    (n & 0x7fff != 0).then_some(n)
}

/// `a.b.c.d/len` (as the `ips` capability carries it) or a bare address.
pub fn parse_requested(s: &str) -> Option<std::net::IpAddr> {
    s.parse::<IpNet>()
        .map(|n| n.addr())
        .or_else(|_| s.parse())
        .ok()
}

/// Parses `aa:bb:cc:dd:ee:ff` as a unicast MAC.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    crate::mac::parse(text).filter(|mac| mac[0] & 1 == 0 && *mac != [0; 6])
}

/// Whether `s` is a PCI address as sysfs names devices: `DDDD:BB:dd.f`
/// in hex (a domain of 4 to 8 digits: VMD domains have 5).
pub fn is_pci_address(s: &str) -> bool {
    let hex = |p: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit())
    };
    let mut parts = s.split(':');
    let (Some(domain), Some(bus), Some(rest), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((dev, func)) = rest.split_once('.') else {
        return false;
    };
    hex(domain, 4..=8)
        && hex(bus, 2..=2)
        && hex(dev, 2..=2)
        && func.len() == 1
        && matches!(func.as_bytes()[0], b'0'..=b'7')
}
