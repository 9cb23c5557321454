//! The CNI network configuration railnet accepts, parsed once at the edge.
//!
//! Multus hands a delegate its NetworkAttachmentDefinition's config, often at
//! cniVersion 0.3.1, with fields railnet does not know (Multus and other
//! tools add their own); unknown fields are ignored, as the CNI spec asks.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use railnet_common::MAX_RAIL;

mod claimed;
mod error;
mod mode;
mod vf;

pub use claimed::ClaimedConf;
pub use error::NetConfError;
pub use mode::Mode;
pub use vf::{
    RuntimeConfig, VfLinkMode, VfSettings, format_guid, is_pci_address, parse_guid, parse_mac,
    parse_pkey, parse_requested,
};

/// CNI spec versions railnet reads and answers in.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// A rail network as the user declared it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The config's CNI spec version; the result is written in it.
    pub cni_version: String,
    /// Network name (the NetworkAttachmentDefinition's).
    pub name: String,
    /// Plugin type, `railnet`.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Rail number K: route metric base+K, counter row, table in rules mode.
    pub rail: u32,
    /// The node's rail NIC the pod interface is made from (not needed in
    /// chained mode).
    #[serde(default)]
    pub master: String,
    /// How the interface is made: `macvlan`, `ipvlan`, `sriov` (the VF of
    /// `deviceID` moved in), or `chained` (an earlier plugin in the chain
    /// made it, e.g. sriov-cni; railnet adds the address, routes and
    /// program).
    #[serde(default)]
    pub mode: Mode,
    /// MTU of the pod interface; the master's when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// RDMA destinations, either family; none of a family means "each
    /// rail's own subnet" for that family.
    #[serde(default, rename = "rdmaCIDRs")]
    pub rdma_cidrs: Vec<IpNet>,
    /// Pools to allocate from.
    pub ippools: IpPools,
    /// How rail traffic is kept on its rail.
    #[serde(default)]
    pub routing: Routing,
    /// Keep only pools whose subnet holds an address of the master on this
    /// node (pool-per-node-per-rail layouts, the seeds' Solution 2).
    #[serde(default)]
    pub match_master_subnet: bool,
    /// Move the VF's own RDMA device into the pod (RDMA netns exclusive
    /// mode: SR-IOV and InfiniBand VFs). Off, the pod shares its master's
    /// device (macvlan on a RoCE NIC, shared mode).
    #[serde(default)]
    pub rdma_isolation: bool,
    /// PCI address of the VF the device plugin allocated; Multus writes it
    /// into the delegate's config (as `deviceID`, some plugins `pciBusID`).
    #[serde(default, rename = "deviceID")]
    pub device_id: Option<String>,
    /// The same PCI address under the name some plugins use; Multus writes
    /// both keys into every delegate. Folded into `device_id` by
    /// [`NetConf::parse`] (equal, or refused naming both).
    #[serde(default, rename = "pciBusID", skip_serializing)]
    pub pci_bus_id: Option<String>,
    /// What the runtime passes per pod for the capabilities the network
    /// declares (Multus: `mac`, `deviceID`, ...).
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// Before ADD answers, probe the rail for another host using the
    /// pod's IPv4 address (RFC 5227) and fail if one answers. Off by
    /// default (Spiderpool's coordinator calls it the same).
    #[serde(default, rename = "detectIPConflict")]
    pub detect_ip_conflict: bool,
    /// Before ADD answers, check the rail's IPv4 gateway answers ARP, and
    /// fail if it does not. Off by default.
    #[serde(default)]
    pub detect_gateway: bool,
    /// sriov-cni's VF attributes, set through the PF before the VF moves
    /// in and restored on DEL (mode sriov only; see [`NetConf::vf_settings`]):
    /// VLAN ID 0-4094.
    #[serde(default)]
    pub vlan: Option<serde_json::Value>,
    /// See `vlan`.
    #[serde(default, rename = "vlanQoS")]
    pub vlan_qos: Option<serde_json::Value>,
    /// See `vlan`.
    #[serde(default)]
    pub trust: Option<serde_json::Value>,
    /// See `vlan`.
    #[serde(default)]
    pub spoofchk: Option<serde_json::Value>,
    /// See `vlan` (sriov-cni's key is `link_state`); mode ib-sriov too.
    #[serde(default, rename = "link_state", alias = "linkState")]
    pub link_state: Option<serde_json::Value>,
    /// Mode ib-sriov: the VF's InfiniBand GUID (`xx:xx:xx:xx:xx:xx:xx:xx`),
    /// set as its node and port GUID through the PF. A pod's
    /// `runtimeConfig.infinibandGUID` or `args.cni.guid` wins, as in
    /// ib-sriov-cni.
    #[serde(default)]
    pub guid: Option<String>,
    /// Mode ib-sriov: the partition key (`0x8001`). Checked and left to the
    /// subnet manager, as ib-sriov-cni does (ib-kubernetes with UFM adds the
    /// GUID to the partition); the VF's partitions are the SM's to give.
    #[serde(default)]
    pub pkey: Option<serde_json::Value>,
    /// Plugin-specific arguments (`args.cni`), which Multus fills from the
    /// pod's network selection (`cni-args`).
    #[serde(default)]
    pub args: Option<serde_json::Value>,
    /// Mode ib-sriov with ib-kubernetes (ib-sriov-cni's key): ADD waits
    /// until ib-kubernetes has configured the pod (`args.cni`
    /// `mellanox.infiniband.app: configured`) and given it a GUID.
    #[serde(default, rename = "ibKubernetesEnabled")]
    pub ib_kubernetes_enabled: bool,
}

/// How a rail's traffic is kept on its rail: a packet sourced from rail K's
/// address must leave on rail K, whichever rail the kernel's lowest-metric
/// route picks.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// The tc program steers; no IPv4 rules.
    #[default]
    Ebpf,
    /// Per-rail tables and `from ipK` rules, as Spiderpool does: for
    /// kernels without what the program needs, IPoIB rails, and as the
    /// benchmark baseline.
    Rules,
}

/// Pool names per family, as SpiderMultusConfig's `ippools`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct IpPools {
    /// IPv4 pool names.
    #[serde(default)]
    pub ipv4: Vec<String>,
    /// IPv6 pool names (a dual-stack rail gets one address of each).
    #[serde(default)]
    pub ipv6: Vec<String>,
}

impl NetConf {
    /// Whether an earlier plugin made the interface.
    pub fn chained(&self) -> bool {
        self.mode == Mode::Chained
    }

    /// Mode ib-sriov: the GUID to give the VF — `runtimeConfig.infinibandGUID`,
    /// else `args.cni.guid`, else `guid` (ib-sriov-cni's order). With
    /// `ibKubernetesEnabled` only ib-kubernetes's (`runtimeConfig`): a
    /// GUID the pod wrote in its own `cni-args` would let it pick another
    /// pod's GUID, and with it that pod's partitions.
    pub fn ib_guid(&self) -> Result<Option<u64>, NetConfError> {
        let from_args = self
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("guid"))
            .and_then(|g| g.as_str())
            .filter(|_| !self.ib_kubernetes_enabled);
        let own = self.guid.as_deref().filter(|_| !self.ib_kubernetes_enabled);
        let (field, text) = match (
            self.runtime_config.infiniband_guid.as_deref(),
            from_args,
            own,
        ) {
            (Some(g), _, _) => ("runtimeConfig.infinibandGUID", g),
            (None, Some(g), _) => ("args.cni.guid", g),
            (None, None, Some(g)) => ("guid", g),
            (None, None, None) => return Ok(None),
        };
        match parse_guid(text) {
            Some(g) if g != 0 && g != u64::MAX => Ok(Some(g)),
            _ => Err(NetConfError::Guid(field, text.to_owned())),
        }
    }

    /// With `ibKubernetesEnabled`, whether ib-kubernetes has configured
    /// this pod: it marks it `mellanox.infiniband.app: configured` in
    /// `args.cni` and gives it a GUID. Checked at ADD (a DEL must work
    /// either way); the error says what is missing.
    pub fn ib_kubernetes_ready(&self) -> Result<(), String> {
        if !self.ib_kubernetes_enabled {
            return Ok(());
        }
        let state = self
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("mellanox.infiniband.app"))
            .and_then(|v| v.as_str());
        if state != Some("configured") {
            return Err(format!(
                "ib-kubernetes has not configured this pod yet (args.cni \"mellanox.infiniband.app\" is {}, \
                 not \"configured\"): is ib-kubernetes running, and does it reach the subnet manager?",
                state.map_or("missing".to_owned(), |s| format!("{s:?}"))
            ));
        }
        if matches!(self.ib_guid(), Ok(None)) {
            return Err(
                "ib-kubernetes configured this pod but gave it no GUID (runtimeConfig.infinibandGUID); \
                 the network needs the infinibandGUID capability"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// The addresses asked for in `runtimeConfig.ips` (validated at parse).
    pub fn requested_ips(&self) -> Vec<std::net::IpAddr> {
        self.runtime_config
            .ips
            .iter()
            .filter_map(|s| parse_requested(s))
            .collect()
    }

    /// The VF attributes asked for (sriov-cni's fields and values: `vlan`
    /// 0-4094, `vlanQoS` 0-7 with a VLAN, `spoofchk` and `trust` "on" or
    /// "off", `link_state` "auto", "enable" or "disable").
    pub fn vf_settings(&self) -> Result<VfSettings, NetConfError> {
        use serde_json::Value;
        let int = |name: &'static str, v: &Option<Value>, max: u64, hint: &'static str| match v {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= max) => {
                Ok(n.as_u64().map(|n| n as u16))
            }
            Some(other) => Err(NetConfError::VfAttributeValue(
                name,
                other.to_string(),
                hint,
            )),
        };
        let on_off = |name: &'static str, v: &Option<Value>| match v.as_ref().map(|v| v.as_str()) {
            None => Ok(None),
            Some(Some("on")) => Ok(Some(true)),
            Some(Some("off")) => Ok(Some(false)),
            Some(_) => Err(NetConfError::VfAttributeValue(
                name,
                v.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                "write \"on\" or \"off\"",
            )),
        };
        let vlan = int("vlan", &self.vlan, 4094, "a VLAN ID is 0 to 4094")?;
        let qos = int("vlanQoS", &self.vlan_qos, 7, "a VLAN priority is 0 to 7")?;
        if qos.is_some_and(|q| q > 0) && vlan.is_none_or(|v| v == 0) {
            return Err(NetConfError::VfAttributeValue(
                "vlanQoS",
                self.vlan_qos
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                "a priority needs a VLAN: set \"vlan\" too",
            ));
        }
        let link_state = match self.link_state.as_ref().map(|v| v.as_str()) {
            None => None,
            Some(Some("auto")) => Some(VfLinkMode::Auto),
            Some(Some("enable")) => Some(VfLinkMode::Enable),
            Some(Some("disable")) => Some(VfLinkMode::Disable),
            Some(_) => {
                return Err(NetConfError::VfAttributeValue(
                    "link_state",
                    self.link_state
                        .as_ref()
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    "write \"auto\", \"enable\" or \"disable\"",
                ));
            }
        };
        let guid = if self.ib_sriov() {
            self.ib_guid()?
        } else {
            None
        };
        Ok(VfSettings {
            vlan,
            qos: qos.unwrap_or(0) as u8,
            spoofchk: on_off("spoofchk", &self.spoofchk)?,
            trust: on_off("trust", &self.trust)?,
            link_state,
            mac: None,
            node_guid: guid,
            port_guid: guid,
        })
    }

    /// Whether the interface is a VF railnet moves in (modes sriov and
    /// ib-sriov).
    pub fn sriov(&self) -> bool {
        self.mode.is_vf()
    }

    /// Whether the interface is an InfiniBand VF (its IPoIB netdev).
    pub fn ib_sriov(&self) -> bool {
        self.mode == Mode::IbSriov
    }

    /// Whether the interface is an IPoIB child of the master (an IB port).
    pub fn ipoib(&self) -> bool {
        self.mode == Mode::Ipoib
    }

    /// Parses and validates a config from CNI stdin bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, NetConfError> {
        let conf: NetConf =
            serde_json::from_slice(bytes).map_err(|e| NetConfError::Decode(e.to_string()))?;
        conf.checked()
    }

    /// Settles what the config leaves to be inferred (the VF's PCI address
    /// from its several keys, IB rails' routing) and validates the whole:
    /// what [`Self::parse`] does after decoding. A config that has been
    /// through it once comes back the same, so the agent checks a typed
    /// config the CNI sent it again, trusting nothing.
    pub fn checked(self) -> Result<Self, NetConfError> {
        let mut conf = self;
        match (conf.device_id.take(), conf.pci_bus_id.take()) {
            (Some(d), Some(p)) if d != p => return Err(NetConfError::DeviceIdMismatch(d, p)),
            (d, p) => conf.device_id = d.or(p),
        }
        if conf.device_id.is_none() {
            conf.device_id = conf.runtime_config.device_id.clone();
        }
        // It names a directory under the node's sysfs: whoever writes the
        // NAD must not be able to name any other path (or a netdev).
        if let Some(d) = &conf.device_id
            && !is_pci_address(d)
        {
            return Err(NetConfError::DeviceIdNotPci(d.clone()));
        }
        // The rail program reads Ethernet frames; IPoIB (an IPoIB child, or
        // an InfiniBand VF's netdev) carries none, so IB rails are kept on
        // their rail by per-rail rules.
        if conf.ipoib() || conf.ib_sriov() {
            conf.routing = Routing::Rules;
        }
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<(), NetConfError> {
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Err(NetConfError::Version(self.cni_version.clone()));
        }
        if !(1..=MAX_RAIL).contains(&self.rail) {
            return Err(NetConfError::Rail(self.rail));
        }
        if self.mode.needs_master() && self.master.is_empty() {
            return Err(NetConfError::Master);
        }
        if self.sriov() {
            if self.device_id.as_deref().unwrap_or("").is_empty() {
                return Err(NetConfError::SriovNeedsDevice(self.mode.to_string()));
            }
            if self.ib_sriov() {
                // InfiniBand has no VLANs and the PF cannot spoof-check or
                // trust an IB VF: partitions (pkey) do that job.
                for (name, set) in [
                    ("vlan", &self.vlan),
                    ("vlanQoS", &self.vlan_qos),
                    ("trust", &self.trust),
                    ("spoofchk", &self.spoofchk),
                ] {
                    if set.is_some() {
                        return Err(NetConfError::NotOnInfiniBand(name));
                    }
                }
                if self.runtime_config.mac.is_some() {
                    return Err(NetConfError::MacOnInfiniBand);
                }
                if let Some(p) = &self.pkey {
                    parse_pkey(p).ok_or_else(|| NetConfError::Pkey(p.to_string()))?;
                }
            } else if self.guid.is_some()
                || self.pkey.is_some()
                || self.runtime_config.infiniband_guid.is_some()
                || self.ib_kubernetes_enabled
            {
                return Err(NetConfError::InfiniBandOnly);
            }
            self.vf_settings()?;
        } else {
            for (name, set) in [
                ("vlan", &self.vlan),
                ("vlanQoS", &self.vlan_qos),
                ("trust", &self.trust),
                ("spoofchk", &self.spoofchk),
                ("link_state", &self.link_state),
                ("guid", &self.guid.clone().map(serde_json::Value::from)),
                (
                    "pkey",
                    &if self.ipoib() {
                        None
                    } else {
                        self.pkey.clone()
                    },
                ),
                (
                    "runtimeConfig.infinibandGUID",
                    &self
                        .runtime_config
                        .infiniband_guid
                        .clone()
                        .map(serde_json::Value::from),
                ),
                (
                    "ibKubernetesEnabled",
                    &self
                        .ib_kubernetes_enabled
                        .then_some(serde_json::Value::Bool(true)),
                ),
            ] {
                if set.is_some() {
                    return Err(NetConfError::VfAttribute(name));
                }
            }
        }
        if self.ipoib() {
            if let Some(p) = &self.pkey {
                parse_pkey(p).ok_or_else(|| NetConfError::Pkey(p.to_string()))?;
            }
            if self.runtime_config.mac.is_some() {
                return Err(NetConfError::MacOnInfiniBand);
            }
            if self.detect_ip_conflict || self.detect_gateway {
                return Err(NetConfError::ArpOnInfiniBand);
            }
        }
        if self.ippools.ipv4.is_empty() && self.ippools.ipv6.is_empty() {
            return Err(NetConfError::NoPool);
        }
        if let Some(mtu) = self.mtu
            && !(railnet_common::MIN_RAIL_MTU..=9216).contains(&mtu)
        {
            return Err(NetConfError::Mtu(mtu));
        }
        let (mut v4, mut v6) = (0, 0);
        for ip in &self.runtime_config.ips {
            let Some(a) = parse_requested(ip) else {
                return Err(NetConfError::RequestedIp(
                    ip.clone(),
                    "not an address; write 172.16.1.50/24 or 172.16.1.50",
                ));
            };
            let (count, pools) = if a.is_ipv4() {
                (&mut v4, &self.ippools.ipv4)
            } else {
                (&mut v6, &self.ippools.ipv6)
            };
            *count += 1;
            if *count > 1 {
                return Err(NetConfError::RequestedIp(
                    ip.clone(),
                    "one address per family per interface",
                ));
            }
            if pools.is_empty() {
                return Err(NetConfError::RequestedIp(
                    ip.clone(),
                    "ippools has no pool of that family",
                ));
            }
        }
        if let Some(mac) = &self.runtime_config.mac {
            if parse_mac(mac).is_none() {
                return Err(NetConfError::Mac(mac.clone()));
            }
            if self.mode == Mode::Ipvlan {
                return Err(NetConfError::MacOnIpvlan);
            }
        }
        if self.rdma_isolation {
            if !self.chained() && !self.sriov() {
                return Err(NetConfError::IsolationNeedsVf(self.mode.to_string()));
            }
            if self.device_id.as_deref().unwrap_or("").is_empty() {
                return Err(NetConfError::IsolationNeedsDevice);
            }
        }
        Ok(())
    }
}

/// Whether `name` can be a Linux interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"0.3.1","name":"rail1","type":"railnet","rail":1,
                "master":"eth1","ippools":{{"ipv4":["rail1"]}}{extra}}}"#
        )
        .into_bytes()
    }

    /// What crosses the socket: a parsed config, sent as JSON and checked
    /// again by the agent, is the config the CNI parsed — for every kind
    /// of rail and the keys each reads.
    #[test]
    fn a_parsed_config_sent_and_checked_again_is_the_same_config() {
        for extra in [
            r#","rdmaCIDRs":["172.16.0.0/16"],"routing":"rules","mtu":4200,"matchMasterSubnet":true"#,
            r#","mode":"ipvlan","detectIPConflict":true,"detectGateway":true"#,
            r#","runtimeConfig":{"mac":"02:aa:bb:cc:dd:ee","ips":["172.16.1.50/24"]}"#,
            r#","mode":"sriov","pciBusID":"0000:3b:00.2","vlan":100,"vlanQoS":3,"spoofchk":"off","trust":"on","link_state":"enable""#,
            r#","mode":"sriov","runtimeConfig":{"deviceID":"0000:3b:00.3"},"rdmaIsolation":true"#,
            r#","mode":"ib-sriov","deviceID":"0000:3b:00.4","guid":"00:00:00:00:00:00:00:0a","pkey":"0x8001","link_state":"enable""#,
            r#","mode":"ib-sriov","deviceID":"0000:3b:00.4","ibKubernetesEnabled":true,"runtimeConfig":{"infinibandGUID":"0c:00:00:00:00:00:00:0c"}"#,
            r#","mode":"ipoib","pkey":"0x8002""#,
            r#","mode":"chained""#,
        ] {
            let parsed = NetConf::parse(&conf(extra)).unwrap_or_else(|e| panic!("{extra}: {e}"));
            let sent = serde_json::to_value(&parsed).unwrap();
            let received: NetConf = serde_json::from_value(sent).unwrap();
            assert_eq!(received.checked().unwrap(), parsed, "{extra}");
        }
    }

    /// The agent checks a typed config as it checks text: a config the CNI
    /// would refuse is refused however it arrives.
    #[test]
    fn a_typed_config_is_checked_as_text_is() {
        let good = NetConf::parse(&conf("")).unwrap();
        let mut bad = good.clone();
        bad.rail = 0;
        assert_eq!(bad.checked().unwrap_err(), NetConfError::Rail(0));
        let mut bad = good;
        bad.mode = Mode::Sriov;
        bad.device_id = Some("../../etc".into());
        assert!(matches!(
            bad.checked(),
            Err(NetConfError::DeviceIdNotPci(_))
        ));
    }

    #[test]
    fn multus_style_config_parses_with_unknown_fields() {
        let c = NetConf::parse(&conf(
            r#","rdmaCIDRs":["172.16.0.0/16"],"logLevel":"debug""#,
        ))
        .unwrap();
        assert_eq!(c.rail, 1);
        assert_eq!(c.rdma_cidrs, vec!["172.16.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn rdma_isolation_needs_a_vf_and_its_pci_address() {
        assert_eq!(
            NetConf::parse(&conf(r#","rdmaIsolation":true"#)).unwrap_err(),
            NetConfError::IsolationNeedsVf("macvlan".into())
        );
        assert_eq!(
            NetConf::parse(&conf(r#","rdmaIsolation":true,"mode":"chained""#)).unwrap_err(),
            NetConfError::IsolationNeedsDevice
        );
        let c = NetConf::parse(&conf(
            r#","rdmaIsolation":true,"mode":"chained","pciBusID":"0000:3b:00.2""#,
        ))
        .unwrap();
        assert_eq!(c.device_id.as_deref(), Some("0000:3b:00.2"));
    }

    #[test]
    fn device_id_must_be_a_pci_address() {
        for bad in [
            "/sys/class/net/eth0",
            "../../../etc",
            "eth0",
            "0000:3b:00.8",
            "0000:3b:00",
        ] {
            assert_eq!(
                NetConf::parse(&conf(&format!(r#","mode":"sriov","deviceID":{bad:?}"#)))
                    .unwrap_err(),
                NetConfError::DeviceIdNotPci(bad.into()),
                "{bad}"
            );
        }
        for good in ["0000:3b:00.2", "10000:01:00.7", "0000:AF:1f.0"] {
            assert!(is_pci_address(good), "{good}");
        }
    }

    #[test]
    fn multus_writes_device_id_and_pci_bus_id_both() {
        // Multus's delegateAddDeviceID sets both keys in every delegate.
        let c = NetConf::parse(&conf(
            r#","mode":"sriov","deviceID":"0000:3b:00.2","pciBusID":"0000:3b:00.2""#,
        ))
        .unwrap();
        assert_eq!(c.device_id.as_deref(), Some("0000:3b:00.2"));
        assert_eq!(
            NetConf::parse(&conf(
                r#","mode":"sriov","deviceID":"0000:3b:00.2","pciBusID":"0000:3b:00.3""#,
            ))
            .unwrap_err(),
            NetConfError::DeviceIdMismatch("0000:3b:00.2".into(), "0000:3b:00.3".into())
        );
    }

    #[test]
    fn runtime_config_mac_and_device_id() {
        let c = NetConf::parse(&conf(
            r#","runtimeConfig":{"mac":"02:aa:bb:cc:dd:ee","deviceID":"0000:3b:00.3"}"#,
        ))
        .unwrap();
        assert_eq!(c.runtime_config.mac.as_deref(), Some("02:aa:bb:cc:dd:ee"));
        assert_eq!(c.device_id.as_deref(), Some("0000:3b:00.3"));
        for bad in [
            "03:00:00:00:00:01",
            "02:00:00:00:00",
            "zz:00:00:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert_eq!(
                NetConf::parse(&conf(&format!(r#","runtimeConfig":{{"mac":"{bad}"}}"#)))
                    .unwrap_err(),
                NetConfError::Mac(bad.into()),
                "{bad}"
            );
        }
        assert_eq!(
            NetConf::parse(&conf(
                r#","mode":"ipvlan","runtimeConfig":{"mac":"02:aa:bb:cc:dd:ee"}"#
            ))
            .unwrap_err(),
            NetConfError::MacOnIpvlan
        );
    }

    #[test]
    fn sriov_needs_its_vf_and_refuses_pf_attributes() {
        assert_eq!(
            NetConf::parse(&conf(r#","mode":"sriov""#)).unwrap_err(),
            NetConfError::SriovNeedsDevice("sriov".into())
        );
        let c = NetConf::parse(&conf(r#","mode":"sriov","deviceID":"0000:3b:00.2""#)).unwrap();
        assert!(c.sriov());
        let c = NetConf::parse(&conf(
            r#","mode":"sriov","deviceID":"0000:3b:00.2","vlan":100,"vlanQoS":3,"spoofchk":"off","trust":"on","link_state":"enable""#,
        ))
        .unwrap();
        assert_eq!(
            c.vf_settings().unwrap(),
            VfSettings {
                vlan: Some(100),
                qos: 3,
                spoofchk: Some(false),
                trust: Some(true),
                link_state: Some(VfLinkMode::Enable),
                mac: None,
                ..VfSettings::default()
            }
        );
        for (extra, field, hint) in [
            (r#","vlan":4095"#, "vlan", "0 to 4094"),
            (r#","vlan":"100""#, "vlan", "0 to 4094"),
            (r#","vlanQoS":2"#, "vlanQoS", "set \"vlan\" too"),
            (r#","vlan":5,"vlanQoS":8"#, "vlanQoS", "0 to 7"),
            (r#","trust":true"#, "trust", "\"on\" or \"off\""),
            (r#","link_state":"up""#, "link_state", "\"disable\""),
        ] {
            let e = NetConf::parse(&conf(&format!(
                r#","mode":"sriov","deviceID":"0000:3b:00.2"{extra}"#
            )))
            .unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(field) && text.contains(hint),
                "{extra}: {text}"
            );
        }
        // Nothing outside mode sriov would set them: refused, not ignored.
        assert_eq!(
            NetConf::parse(&conf(r#","vlan":100"#)).unwrap_err(),
            NetConfError::VfAttribute("vlan")
        );
    }

    /// ib-sriov-cni's keys: the GUID from runtimeConfig, then args.cni,
    /// then the config; pkey and link_state checked; Ethernet VF
    /// attributes and MACs refused by name.
    #[test]
    fn ib_sriov_takes_guids_and_refuses_ethernet_attributes() {
        let ib = |extra: &str| {
            NetConf::parse(&conf(&format!(
                r#","mode":"ib-sriov","deviceID":"0000:3b:00.2"{extra}"#
            )))
        };
        let c = ib(r#","guid":"00:00:00:00:00:00:00:0a","link_state":"enable","pkey":"0x8001""#)
            .unwrap();
        assert!(c.sriov() && c.ib_sriov());
        assert_eq!(
            c.routing,
            Routing::Rules,
            "no Ethernet frames for the program"
        );
        let s = c.vf_settings().unwrap();
        assert_eq!((s.node_guid, s.port_guid), (Some(10), Some(10)));
        assert_eq!(s.link_state, Some(VfLinkMode::Enable));
        let c = ib(r#","guid":"00:00:00:00:00:00:00:0a","args":{"cni":{"guid":"00:00:00:00:00:00:00:0b"}}"#)
            .unwrap();
        assert_eq!(c.ib_guid().unwrap(), Some(11));
        let c = ib(r#","args":{"cni":{"guid":"00:00:00:00:00:00:00:0b"}},"runtimeConfig":{"infinibandGUID":"0c:00:00:00:00:00:00:0c"}"#)
            .unwrap();
        assert_eq!(c.ib_guid().unwrap(), Some(0x0c00_0000_0000_000c));
        assert_eq!(
            ib("").unwrap().vf_settings().unwrap(),
            VfSettings::default()
        );
        for (extra, want) in [
            (
                r#","guid":"00:11:22""#,
                "guid \"00:11:22\" is not a usable GUID",
            ),
            (
                r#","runtimeConfig":{"infinibandGUID":"00:00:00:00:00:00:00:00"}"#,
                "runtimeConfig.infinibandGUID",
            ),
            (r#","guid":"ff:ff:ff:ff:ff:ff:ff:ff""#, "all ones"),
            (r#","pkey":"0x8000""#, "not a partition key"),
            (r#","pkey":"8001""#, "not a partition key"),
            (r#","vlan":100"#, "Ethernet VF attribute"),
            (r#","spoofchk":"on""#, "Ethernet VF attribute"),
            (
                r#","runtimeConfig":{"mac":"02:00:00:00:00:01"}"#,
                "infinibandGUID instead",
            ),
        ] {
            let text = ib(extra).unwrap_err().to_string();
            assert!(text.contains(want), "{extra}: {text}");
        }
        // GUIDs on an Ethernet VF, or outside a VF mode: refused.
        assert_eq!(
            NetConf::parse(&conf(
                r#","mode":"sriov","deviceID":"0000:3b:00.2","guid":"00:00:00:00:00:00:00:0a""#
            ))
            .unwrap_err(),
            NetConfError::InfiniBandOnly
        );
        assert_eq!(
            NetConf::parse(&conf(r#","pkey":"0x8001""#)).unwrap_err(),
            NetConfError::VfAttribute("pkey")
        );
        assert_eq!(
            NetConf::parse(&conf(r#","mode":"ib-sriov""#)).unwrap_err(),
            NetConfError::SriovNeedsDevice("ib-sriov".into())
        );
    }

    /// ipoib: a child of the master on the network's partition; rules
    /// routing (no Ethernet for the program), no MAC, no ARP probes.
    #[test]
    fn ipoib_children_use_rules_and_refuse_ethernet_requests() {
        let c = NetConf::parse(&conf(r#","mode":"ipoib","pkey":"0x8001""#)).unwrap();
        assert!(c.ipoib() && !c.sriov());
        assert_eq!(c.routing, Routing::Rules);
        for (extra, want) in [
            (r#","pkey":"0x0000""#, "not a partition key"),
            (
                r#","runtimeConfig":{"mac":"02:00:00:00:00:01"}"#,
                "infinibandGUID",
            ),
            (r#","detectGateway":true"#, "Ethernet ARP"),
            (
                r#","rdmaIsolation":true,"deviceID":"0000:3b:00.2""#,
                "shares its master",
            ),
            (r#","vlan":100"#, "\"vlan\" is a VF attribute"),
        ] {
            let text = NetConf::parse(&conf(&format!(r#","mode":"ipoib"{extra}"#)))
                .unwrap_err()
                .to_string();
            assert!(text.contains(want), "{extra}: {text}");
        }
    }

    /// ibKubernetesEnabled: ADD waits for ib-kubernetes's mark and GUID;
    /// parsing (and so DEL) does not.
    #[test]
    fn ib_kubernetes_must_have_configured_the_pod() {
        let ib = |extra: &str| {
            NetConf::parse(&conf(&format!(
                r#","mode":"ib-sriov","deviceID":"0000:3b:00.2","ibKubernetesEnabled":true{extra}"#
            )))
            .unwrap()
        };
        let e = ib("").ib_kubernetes_ready().unwrap_err();
        assert!(
            e.contains("is missing") && e.contains("ib-kubernetes running"),
            "{e}"
        );
        let e = ib(r#","args":{"cni":{"mellanox.infiniband.app":"pending"}}"#)
            .ib_kubernetes_ready()
            .unwrap_err();
        assert!(e.contains("\"pending\""), "{e}");
        let e = ib(r#","args":{"cni":{"mellanox.infiniband.app":"configured"}}"#)
            .ib_kubernetes_ready()
            .unwrap_err();
        assert!(e.contains("no GUID"), "{e}");
        ib(r#","args":{"cni":{"mellanox.infiniband.app":"configured"}},"runtimeConfig":{"infinibandGUID":"00:00:00:00:00:00:00:0a"}"#)
            .ib_kubernetes_ready()
            .unwrap();
        // A GUID the pod wrote into its own cni-args (or the network's
        // fixed one) is not ib-kubernetes's: ignored, the ADD waits.
        let own = ib(
            r#","guid":"00:00:00:00:00:00:00:0c","args":{"cni":{"mellanox.infiniband.app":"configured","guid":"00:00:00:00:00:00:00:0b"}}"#,
        );
        assert_eq!(own.ib_guid().unwrap(), None);
        assert!(own.ib_kubernetes_ready().unwrap_err().contains("no GUID"));
        let both = ib(
            r#","args":{"cni":{"mellanox.infiniband.app":"configured","guid":"00:00:00:00:00:00:00:0b"}},"runtimeConfig":{"infinibandGUID":"00:00:00:00:00:00:00:0a"}"#,
        );
        assert_eq!(both.ib_guid().unwrap(), Some(0x0a));
        assert_eq!(
            NetConf::parse(&conf(r#","ibKubernetesEnabled":true"#)).unwrap_err(),
            NetConfError::VfAttribute("ibKubernetesEnabled")
        );
    }

    #[test]
    fn guids_read_and_write_as_iproute2_does() {
        assert_eq!(
            parse_guid("00:11:22:33:44:55:66:77"),
            Some(0x0011_2233_4455_6677)
        );
        assert_eq!(
            format_guid(0x0011_2233_4455_6677),
            "00:11:22:33:44:55:66:77"
        );
        for bad in [
            "00:11:22:33:44:55:66",
            "0:11:22:33:44:55:66:77",
            "00:11:22:33:44:55:66:7g",
        ] {
            assert_eq!(parse_guid(bad), None, "{bad}");
        }
    }

    #[test]
    fn requested_ips_are_checked() {
        let c = NetConf::parse(&conf(r#","runtimeConfig":{"ips":["172.16.1.50/24"]}"#)).unwrap();
        assert_eq!(
            c.requested_ips(),
            vec!["172.16.1.50".parse::<std::net::IpAddr>().unwrap()]
        );
        for (bad, why) in [
            (r#"["x"]"#, "not an address"),
            (r#"["172.16.1.5","172.16.1.6"]"#, "one address per family"),
            (r#"["fd00::5/64"]"#, "no pool of that family"),
        ] {
            let err = NetConf::parse(&conf(&format!(r#","runtimeConfig":{{"ips":{bad}}}"#)))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let zero = br#"{"cniVersion":"1.0.0","name":"n","type":"railnet","rail":0,"master":"e","ippools":{"ipv4":["p"]}}"#;
        assert_eq!(NetConf::parse(zero).unwrap_err(), NetConfError::Rail(0));
        let bad = br#"{"cniVersion":"9.9.9","name":"n","type":"railnet","rail":1,"master":"e","ippools":{"ipv4":["p"]}}"#;
        assert_eq!(
            NetConf::parse(bad).unwrap_err(),
            NetConfError::Version("9.9.9".into())
        );
        let bad = br#"{"cniVersion":"1.0.0","name":"n","type":"railnet","rail":65,"master":"e","ippools":{"ipv4":["p"]}}"#;
        assert_eq!(NetConf::parse(bad).unwrap_err(), NetConfError::Rail(65));
        assert!(matches!(
            NetConf::parse(b"{not json").unwrap_err(),
            NetConfError::Decode(_)
        ));
    }

    #[test]
    fn interface_names() {
        assert!(valid_ifname("net1"));
        assert!(!valid_ifname("a-name-longer-than-15"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname(""));
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever Multus or a person writes on stdin: an answer, never a
        /// panic; an error always says something.
        #[test]
        fn any_bytes_parse_or_are_refused_with_words(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = NetConf::parse(&bytes) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// Configs that are almost right: every field mutated.
        #[test]
        fn near_miss_configs_are_refused_with_words(
            version in "[0-9.]{0,6}",
            rail in any::<i64>(),
            mode in "[a-z]{0,8}",
            mtu in any::<i64>(),
            pool in ".{0,12}",
        ) {
            let conf = serde_json::json!({
                "cniVersion": version, "name": "n", "type": "railnet", "rail": rail,
                "master": "eth1", "mode": mode, "mtu": mtu, "ippools": {"ipv4": [pool]},
            });
            match NetConf::parse(conf.to_string().as_bytes()) {
                Ok(c) => {
                    prop_assert!(SUPPORTED_VERSIONS.contains(&c.cni_version.as_str()));
                    prop_assert!((1..=MAX_RAIL).contains(&c.rail));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
