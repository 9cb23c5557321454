//! How a rail's pod interface is made: the `mode` of a network, parsed once.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use super::NetConfError;

/// The kind of interface a rail network gives a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Mode {
    /// A macvlan (bridge) on the master: RoCE NICs, the master's RDMA
    /// device shared.
    #[default]
    Macvlan,
    /// An ipvlan (l2) on the master: where the NIC or switch allows one
    /// MAC only.
    Ipvlan,
    /// The Ethernet VF of `deviceID`, moved in (RoCE SR-IOV).
    Sriov,
    /// The InfiniBand VF of `deviceID` (its IPoIB netdev), moved in.
    IbSriov,
    /// An IPoIB child of the master (an InfiniBand port).
    Ipoib,
    /// An earlier plugin in the chain made it (e.g. sriov-cni); railnet
    /// adds addresses, routes and the program.
    Chained,
}

impl Mode {
    /// Every mode, in the order the docs list them.
    pub const ALL: [Mode; 6] = [
        Mode::Macvlan,
        Mode::Ipvlan,
        Mode::Sriov,
        Mode::IbSriov,
        Mode::Ipoib,
        Mode::Chained,
    ];

    /// The name a network config uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Macvlan => "macvlan",
            Mode::Ipvlan => "ipvlan",
            Mode::Sriov => "sriov",
            Mode::IbSriov => "ib-sriov",
            Mode::Ipoib => "ipoib",
            Mode::Chained => "chained",
        }
    }

    /// A VF railnet moves into the pod (modes sriov and ib-sriov).
    pub fn is_vf(self) -> bool {
        matches!(self, Mode::Sriov | Mode::IbSriov)
    }

    /// The interface carries IPoIB, not Ethernet: no ARP, no rail program
    /// (it reads Ethernet frames); rules keep the rail on its rail.
    pub fn is_infiniband(self) -> bool {
        matches!(self, Mode::IbSriov | Mode::Ipoib)
    }

    /// The node's rail NIC is named in `master` (not for a VF, which
    /// `deviceID` names, nor for an interface another plugin made).
    pub fn needs_master(self) -> bool {
        !self.is_vf() && self != Mode::Chained
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = NetConfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| NetConfError::Mode(s.to_owned()))
    }
}

impl TryFrom<String> for Mode {
    type Error = NetConfError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Mode> for String {
    fn from(m: Mode) -> String {
        m.as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_reads_back_as_itself_and_others_are_refused_by_name() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Mode>(&json).unwrap(), m);
        }
        for bad in ["bridge", "MACVLAN", "", "sriov "] {
            assert_eq!(bad.parse::<Mode>(), Err(NetConfError::Mode(bad.into())));
        }
        let e = serde_json::from_str::<Mode>("\"bridge\"").unwrap_err();
        assert!(e.to_string().contains("use \"macvlan\""), "{e}");
    }
}
