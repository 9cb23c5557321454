//! What can be wrong with a network config, each in words that say how to
//! fix it.

use railnet_common::MAX_RAIL;

/// What is wrong with a network config.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NetConfError {
    /// Not JSON, or a field of the wrong type.
    #[error("network config is not valid: {0}")]
    Decode(String),
    /// A version railnet does not speak.
    #[error("cniVersion {0:?} is not supported; use one of 0.3.1, 0.4.0, 1.0.0, 1.1.0")]
    Version(String),
    /// `rail` outside 1..=64.
    #[error("rail {0} is out of range; rails are numbered 1 to {MAX_RAIL}")]
    Rail(u32),
    /// A mode that is not built yet.
    #[error(
        "mode {0:?} is not supported; use \"macvlan\", \"ipvlan\", \"sriov\", \"ib-sriov\", \"ipoib\" or \"chained\""
    )]
    Mode(String),
    /// Missing master.
    #[error("\"master\" is empty; name the node's rail NIC, e.g. \"eno3np1\"")]
    Master,
    /// No pool.
    #[error("\"ippools\" names no pool; add e.g. {{\"ipv4\": [\"rail1\"]}}")]
    NoPool,
    /// `rdmaIsolation` on an interface that has no RDMA device of its own.
    #[error(
        "\"rdmaIsolation\" moves a VF's own RDMA device into the pod, and a {0} shares its master's device: \
         use it with mode \"chained\" after sriov-cni (or ib-sriov-cni), or leave it off for shared mode"
    )]
    IsolationNeedsVf(String),
    /// `rdmaIsolation` without the VF's PCI address.
    #[error(
        "\"rdmaIsolation\" needs the VF's PCI address in \"deviceID\"; Multus adds it when the \
         NetworkAttachmentDefinition has the k8s.v1.cni.cncf.io/resourceName annotation of the VF's device plugin"
    )]
    IsolationNeedsDevice,
    /// A `deviceID` that is not a PCI address.
    #[error(
        "\"deviceID\" {0:?} is not a PCI address (domain:bus:device.function, e.g. 0000:3b:00.2); \
         Multus passes the VF's address from the device plugin — remove a value set by hand"
    )]
    DeviceIdNotPci(String),
    /// `deviceID` and `pciBusID` that name different devices.
    #[error(
        "\"deviceID\" ({0}) and \"pciBusID\" ({1}) name different devices; Multus writes the \
         same PCI address into both — remove the one set by hand from the NetworkAttachmentDefinition"
    )]
    DeviceIdMismatch(String, String),
    /// `sriov` or `ib-sriov` without the VF's PCI address.
    #[error(
        "mode \"{0}\" needs the VF's PCI address in \"deviceID\"; Multus adds it when the \
         NetworkAttachmentDefinition has the k8s.v1.cni.cncf.io/resourceName annotation of the SR-IOV device plugin"
    )]
    SriovNeedsDevice(String),
    /// An Ethernet VF attribute on an InfiniBand VF.
    #[error(
        "\"{0}\" is an Ethernet VF attribute; an InfiniBand VF has none (partitions, \"pkey\", \
         separate IB traffic): remove it, or use mode \"sriov\" for a RoCE VF"
    )]
    NotOnInfiniBand(&'static str),
    /// A GUID or pkey on an Ethernet VF.
    #[error(
        "\"guid\", \"pkey\", \"ibKubernetesEnabled\" and runtimeConfig.infinibandGUID are InfiniBand \
         VF attributes: use mode \"ib-sriov\" for an IB VF, or remove them"
    )]
    InfiniBandOnly,
    /// A MAC asked of an IPoIB interface.
    #[error(
        "runtimeConfig.mac: an InfiniBand VF's address comes from its GUID; \
         ask for runtimeConfig.infinibandGUID instead"
    )]
    MacOnInfiniBand,
    /// ARP probes asked of an IPoIB rail.
    #[error(
        "\"detectIPConflict\" and \"detectGateway\" probe with Ethernet ARP, which an IPoIB \
         interface does not carry; remove them for mode \"ipoib\""
    )]
    ArpOnInfiniBand,
    /// A GUID that does not parse.
    #[error(
        "{0} {1:?} is not a usable GUID; write 8 bytes as 00:11:22:33:44:55:66:77 \
         (all zeros and all ones are not GUIDs)"
    )]
    Guid(&'static str, String),
    /// A partition key that does not parse.
    #[error(
        "pkey {0} is not a partition key; write it as \"0x8001\" (16 bits, not 0x0000 or 0x8000)"
    )]
    Pkey(String),
    /// A VF attribute outside mode sriov (nothing would set it).
    #[error(
        "\"{0}\" is a VF attribute set through the PF, which only modes \"sriov\" and \"ib-sriov\" do; \
         with \"chained\", set it in sriov-cni's (or ib-sriov-cni's) config before railnet, or remove it"
    )]
    VfAttribute(&'static str),
    /// A VF attribute whose value is not one sriov-cni accepts.
    #[error("\"{0}\": {1} is not valid; {2}")]
    VfAttributeValue(&'static str, String, &'static str),
    /// `runtimeConfig.ips` that does not parse, or asks twice per family,
    /// or for a family with no pools.
    #[error("runtimeConfig.ips {0:?}: {1}")]
    RequestedIp(String, &'static str),
    /// `runtimeConfig.mac` is not a unicast MAC.
    #[error("runtimeConfig.mac {0:?} is not a unicast MAC address; write it as 02:00:00:00:00:01")]
    Mac(String),
    /// A MAC asked of an ipvlan, which has its master's.
    #[error(
        "runtimeConfig.mac: an ipvlan interface has its master's MAC; use mode \"macvlan\" or drop the mac request"
    )]
    MacOnIpvlan,
    /// MTU outside what Ethernet allows.
    #[error("mtu {0} is out of range 1280..=9216 (rails carry IPv6, whose minimum is 1280)")]
    Mtu(u32),
}
