//! SR-IOV VFs as rail interfaces (`"mode": "sriov"`): the VF netdev of the
//! PCI function the device plugin allocated (`deviceID`, which Multus
//! passes) moves into the pod under the pod's interface name; DEL moves it
//! back and restores the name, MAC and MTU it had.
//!
//! What the VF had is written to a record on the node's disk *before*
//! anything changes, so a DEL after an agent crash (or a restart between
//! ADD and DEL) still restores it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a VF netdev looked like in the host before ADD took it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct VfRecord {
    /// PCI address of the VF.
    pub pci_address: String,
    /// Its netdev name in the host.
    pub name: String,
    /// Its MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its attributes as its PF had them, when ADD changed any (restored
    /// on DEL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pf: Option<PfSide>,
    /// Whose it is now.
    #[serde(default)]
    pub holder: Holder,
}

/// Who holds a VF or an RDMA device: what the metrics label it with.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Holder {
    /// `namespace/name` of the pod (its container ID when the runtime did
    /// not say).
    pub pod: String,
    /// The pod's interface.
    pub interface: String,
}

impl Holder {
    /// From CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME) and the attachment.
    pub fn of(
        args: &std::collections::BTreeMap<String, String>,
        container_id: &str,
        ifname: &str,
    ) -> Self {
        let pod = Self::pod_of(args);
        Self {
            pod: if pod.is_empty() {
                container_id.to_owned()
            } else {
                pod
            },
            interface: ifname.to_owned(),
        }
    }

    /// `namespace/name` from CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME);
    /// empty when the runtime did not say.
    pub fn pod_of(args: &std::collections::BTreeMap<String, String>) -> String {
        match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
            (Some(ns), Some(name)) if !name.is_empty() => format!("{ns}/{name}"),
            _ => String::new(),
        }
    }
}

/// The holder of each VF (by PCI address) recorded in `dir`: the VFs and
/// isolated RDMA devices pods hold now.
pub fn holders(dir: &Path) -> std::collections::HashMap<String, Holder> {
    let mut out = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read(entry.path()) else {
            continue;
        };
        #[derive(Deserialize)]
        struct Any {
            pci_address: String,
            #[serde(default)]
            holder: Holder,
        }
        if let Ok(r) = serde_json::from_slice::<Any>(&text)
            && !r.pci_address.is_empty()
            && !r.holder.pod.is_empty()
        {
            out.insert(r.pci_address, r.holder);
        }
    }
    out
}

/// The PCI address of RDMA device `device`, from
/// `<sysfs>/class/infiniband/<device>/device`; `None` for soft devices.
pub fn rdma_device_pci(sysfs: &Path, device: &str) -> Option<String> {
    let dev =
        std::fs::canonicalize(sysfs.join("class/infiniband").join(device).join("device")).ok()?;
    Some(dev.file_name()?.to_string_lossy().into_owned())
}

/// A VF as its PF sees it: which PF, which VF number, and the attributes
/// set through the PF.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct PfSide {
    /// The PF's netdev in the host.
    pub pf: String,
    /// The VF's number on the PF.
    pub vf: u32,
    /// The attributes as they were.
    pub was: crate::netconf::VfSettings,
}

/// What to set on DEL to undo `set`: for each attribute `set` changes, the
/// value the VF had (`was`); the rest left alone.
pub fn restore_of(
    set: &crate::netconf::VfSettings,
    was: &crate::netconf::VfSettings,
) -> crate::netconf::VfSettings {
    use crate::netconf::{VfLinkMode, VfSettings};
    VfSettings {
        vlan: set.vlan.map(|_| was.vlan.unwrap_or(0)),
        qos: if set.vlan.is_some() { was.qos } else { 0 },
        spoofchk: set.spoofchk.map(|_| was.spoofchk.unwrap_or(true)),
        trust: set.trust.map(|_| was.trust.unwrap_or(false)),
        link_state: set
            .link_state
            .map(|_| was.link_state.unwrap_or(VfLinkMode::Auto)),
        mac: set.mac.map(|_| was.mac.unwrap_or([0; 6])),
        // A GUID the PF did not report (or reported as none) goes back to
        // all ones: the driver's "no GUID assigned", what ib-sriov-cni
        // restores.
        node_guid: set.node_guid.map(|_| known_guid(was.node_guid)),
        port_guid: set.port_guid.map(|_| known_guid(was.port_guid)),
    }
}

fn known_guid(g: Option<u64>) -> u64 {
    match g {
        Some(g) if g != 0 => g,
        _ => u64::MAX,
    }
}

/// The port GUID in an IPoIB hardware address (20 bytes: flags and QPN,
/// then the 16-byte GID whose lower 8 bytes are the port GUID), from its
/// `aa:bb:…` text; `None` for other addresses (Ethernet).
pub fn ipoib_guid(hwaddr: &str) -> Option<u64> {
    let bytes: Vec<u8> = hwaddr
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    (bytes.len() == 20).then(|| u64::from_be_bytes(bytes[12..].try_into().expect("8 bytes")))
}

/// Rebinds VF `bdf` to its driver (`<sysfs>/bus/pci/devices/<bdf>/driver`:
/// write the address to its `unbind`, then `bind`), as ib-sriov-cni does:
/// an InfiniBand VF takes a new GUID only when its driver probes it again.
/// Its netdev and RDMA device are made anew; returns the netdev's name once
/// it is back (within `wait`).
pub fn rebind(sysfs: &Path, bdf: &str, wait: std::time::Duration) -> Result<String, String> {
    let dev = sysfs.join("bus/pci/devices").join(bdf);
    let driver = std::fs::canonicalize(dev.join("driver")).map_err(|e| {
        format!(
            "{}: {e}; the VF must be bound to its driver (mlx5_core) for its GUID to be set",
            dev.join("driver").display()
        )
    })?;
    for op in ["unbind", "bind"] {
        std::fs::write(driver.join(op), bdf).map_err(|e| {
            format!(
                "writing {bdf} to {}: {e} (rebinding the VF so that it takes its new GUID)",
                driver.join(op).display()
            )
        })?;
    }
    wait_for_netdev(sysfs, bdf, wait).map_err(|e| format!("{e} (after its driver was rebound)"))
}

/// VF `bdf`'s netdev name once sysfs lists it, waiting up to `wait` (a
/// driver probing it, or an RDMA device's move, makes it anew).
pub fn wait_for_netdev(
    sysfs: &Path,
    bdf: &str,
    wait: std::time::Duration,
) -> Result<String, String> {
    let start = std::time::Instant::now();
    loop {
        match vf_netdev(sysfs, bdf) {
            Ok(name) => return Ok(name),
            Err(e) if start.elapsed() >= wait => {
                return Err(format!("VF {bdf} has no netdev after {wait:.0?}: {e}"));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// Refuses a PCI address that is not a VF (`<sysfs>/bus/pci/devices/<bdf>/physfn`
/// missing): the sriov modes move the netdev of `deviceID` into a pod, and
/// RDMA isolation its RDMA device — named by a NAD, a PF would take the
/// node's own NIC (its uplink, say) away from it.
pub fn must_be_vf(sysfs: &Path, bdf: &str) -> Result<(), String> {
    let physfn = sysfs.join("bus/pci/devices").join(bdf).join("physfn");
    if std::fs::symlink_metadata(&physfn).is_ok() {
        return Ok(());
    }
    Err(format!(
        "{bdf} is not a VF ({} is missing): railnet moves only VFs into pods, never a PF or another device of the node",
        physfn.display()
    ))
}

/// The PF netdev and VF number of VF `bdf`: `<sysfs>/bus/pci/devices/<bdf>/physfn`
/// is the PF's PCI function, whose `net/` holds its netdev and whose
/// `virtfn<N>` links name its VFs.
pub fn pf_of(sysfs: &Path, bdf: &str) -> Result<(String, u32), String> {
    let dev = sysfs.join("bus/pci/devices").join(bdf);
    let physfn = dev.join("physfn");
    let pf_dir = std::fs::canonicalize(&physfn).map_err(|e| {
        format!(
            "{}: {e}; VF attributes are set through the PF, and {bdf} names no PF (is it a VF?)",
            physfn.display()
        )
    })?;
    let pf_bdf = pf_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pf = vf_netdev(sysfs, &pf_bdf).map_err(|e| format!("the PF of {bdf}: {e}"))?;
    let mut vf = None;
    for entry in std::fs::read_dir(&pf_dir).map_err(|e| format!("{}: {e}", pf_dir.display()))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("virtfn")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.file_name().is_some_and(|t| t == bdf) {
            vf = Some(n);
        }
    }
    let vf = vf.ok_or_else(|| {
        format!(
            "{} has no virtfn link to {bdf}: the PF does not list it as its VF",
            pf_dir.display()
        )
    })?;
    Ok((pf, vf))
}

/// The VFs of PF `pf_bdf`, by VF number: its `virtfn<N>` links under
/// `<sysfs>/bus/pci/devices/<pf_bdf>/`, each naming a VF's PCI function.
/// None when the function has no VFs (or is no PF).
pub fn vfs_of(sysfs: &Path, pf_bdf: &str) -> Vec<(u32, String)> {
    let dir = sysfs.join("bus/pci/devices").join(pf_bdf);
    let mut vfs: Vec<(u32, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("virtfn")?
                .parse::<u32>()
                .ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.file_name()?.to_string_lossy().into_owned()))
        })
        .collect();
    vfs.sort();
    vfs
}

/// The netdev of PCI function `bdf`, from `<sysfs>/bus/pci/devices/<bdf>/net/`.
/// `sysfs` is `/sys` on a node; tests point it at a tree of their own.
pub fn vf_netdev(sysfs: &Path, bdf: &str) -> Result<String, String> {
    let dir = sysfs.join("bus/pci/devices").join(bdf).join("net");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| {
            format!(
                "{}: {e}; is {bdf} a VF of this node, bound to its network driver?",
                dir.display()
            )
        })?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "{} is empty: VF {bdf} has no netdev in the host (already given to a pod, or bound to vfio-pci?)",
            dir.display()
        )),
        many => Err(format!(
            "VF {bdf} has several netdevs ({}); railnet expects one",
            many.join(", ")
        )),
    }
}

/// Where the record of one pod interface's `kind` of thing (`vf`, `rdma`)
/// is kept.
pub fn record_path(dir: &Path, kind: &str, container_id: &str, ifname: &str) -> PathBuf {
    dir.join(format!("{kind}-{container_id}-{ifname}.json"))
}

/// Writes a record (temporary file, fsync, rename: never half a record).
pub fn save<T: Serialize>(
    dir: &Path,
    kind: &str,
    container_id: &str,
    ifname: &str,
    record: &T,
) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = record_path(dir, kind, container_id, ifname);
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// A record ADD made, if any.
pub fn load<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    kind: &str,
    container_id: &str,
    ifname: &str,
) -> Option<T> {
    let bytes = std::fs::read(record_path(dir, kind, container_id, ifname)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Drops a record once what it describes is back.
pub fn forget(dir: &Path, kind: &str, container_id: &str, ifname: &str) {
    let path = record_path(dir, kind, container_id, ifname);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Left behind, it is acted on again: restoring what is restored
        // already is harmless, but say so.
        Err(e) => tracing::warn!(record = %path.display(), error = %e, "record not removed"),
    }
}

/// What an isolated RDMA device was called before a pod took it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct RdmaRecord {
    /// PCI address of the VF.
    pub pci_address: String,
    /// The device's name in the host.
    pub device: String,
    /// Whose it is now.
    #[serde(default)]
    pub holder: Holder,
    /// The pod netns it was moved into (nsfs inode; 0: not recorded), where
    /// the metrics read its counters: from the host it is not visible.
    #[serde(default)]
    pub netns_inode: u64,
}

/// Every isolated-device record in `dir` (the devices pods hold now).
pub fn rdma_records(dir: &Path) -> Vec<RdmaRecord> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("rdma-")
            && name.ends_with(".json")
            && let Ok(bytes) = std::fs::read(entry.path())
            && let Ok(r) = serde_json::from_slice::<RdmaRecord>(&bytes)
        {
            out.push(r);
        }
    }
    out
}

/// The bytes of `aa:bb:cc:dd:ee:ff`; `None` for anything else and for the
/// all-zero MAC an unconfigured VF reports (which cannot be set back).
pub fn mac_bytes(text: &str) -> Option<[u8; 6]> {
    railnet_wire::mac::parse(text).filter(|mac| *mac != [0; 6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vf_netdev_is_found_or_the_error_says_why() {
        let root = std::env::temp_dir().join(format!("railnet-sysfs-{}", std::process::id()));
        let dev = root.join("bus/pci/devices/0000:3b:00.2/net");
        std::fs::create_dir_all(dev.join("ens1f0v2")).unwrap();
        assert_eq!(vf_netdev(&root, "0000:3b:00.2").unwrap(), "ens1f0v2");
        let err = vf_netdev(&root, "0000:3b:00.3").unwrap_err();
        assert!(err.contains("0000:3b:00.3"), "{err}");
        std::fs::remove_dir(dev.join("ens1f0v2")).unwrap();
        let err = vf_netdev(&root, "0000:3b:00.2").unwrap_err();
        assert!(err.contains("no netdev"), "{err}");
        let rec = VfRecord {
            pci_address: "0000:3b:00.2".into(),
            name: "ens1f0v2".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 9000,
            pf: None,
            holder: Holder::default(),
        };
        save(&root, "vf", "c1", "net1", &rec).unwrap();
        assert_eq!(load(&root, "vf", "c1", "net1"), Some(rec));
        forget(&root, "vf", "c1", "net1");
        assert_eq!(load::<VfRecord>(&root, "vf", "c1", "net1"), None);
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The PF and VF number come from `physfn` and the PF's `virtfn<N>`
    /// links, as sysfs lays them out.
    #[test]
    fn a_vf_s_pf_and_number_come_from_sysfs_links() {
        let root = std::env::temp_dir().join(format!("railnet-pf-{}", std::process::id()));
        let devs = root.join("bus/pci/devices");
        for (bdf, net) in [("0000:3b:00.0", "ens1f0"), ("0000:3b:00.3", "ens1f0v1")] {
            std::fs::create_dir_all(devs.join(bdf).join("net").join(net)).unwrap();
        }
        let link = |from: &str, to: &str| {
            std::os::unix::fs::symlink(format!("../{to}"), devs.join(from)).unwrap()
        };
        link("0000:3b:00.3/physfn", "0000:3b:00.0");
        link("0000:3b:00.0/virtfn0", "0000:3b:00.2");
        link("0000:3b:00.0/virtfn1", "0000:3b:00.3");
        assert_eq!(pf_of(&root, "0000:3b:00.3").unwrap(), ("ens1f0".into(), 1));
        // A PF (no physfn) or a VF its PF does not list: said so.
        let e = pf_of(&root, "0000:3b:00.0").unwrap_err();
        assert!(e.contains("names no PF"), "{e}");
        std::fs::remove_file(devs.join("0000:3b:00.0/virtfn1")).unwrap();
        let e = pf_of(&root, "0000:3b:00.3").unwrap_err();
        assert!(e.contains("no virtfn link to 0000:3b:00.3"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn del_puts_back_only_what_add_changed() {
        use crate::netconf::{VfLinkMode, VfSettings};
        let set = VfSettings {
            vlan: Some(100),
            qos: 2,
            trust: Some(true),
            ..VfSettings::default()
        };
        let was = VfSettings {
            vlan: Some(0),
            qos: 0,
            spoofchk: Some(true),
            trust: Some(false),
            link_state: Some(VfLinkMode::Auto),
            mac: None,
            ..VfSettings::default()
        };
        assert_eq!(
            restore_of(&set, &was),
            VfSettings {
                vlan: Some(0),
                qos: 0,
                trust: Some(false),
                ..VfSettings::default()
            }
        );
        // A GUID the PF did not report goes back to all ones, a reported
        // one as it was.
        let set = VfSettings {
            node_guid: Some(7),
            port_guid: Some(7),
            ..VfSettings::default()
        };
        let was = VfSettings {
            port_guid: Some(0x1122),
            ..VfSettings::default()
        };
        let back = restore_of(&set, &was);
        assert_eq!(
            (back.node_guid, back.port_guid),
            (Some(u64::MAX), Some(0x1122))
        );
    }

    #[test]
    fn an_ipoib_address_holds_the_port_guid() {
        let hw = "00:00:10:49:fe:80:00:00:00:00:00:00:0c:42:a1:03:00:6e:2b:40";
        assert_eq!(ipoib_guid(hw), Some(0x0c42_a103_006e_2b40));
        assert_eq!(ipoib_guid("02:00:00:00:00:01"), None);
    }

    /// Rebinding writes the VF's address to its driver's unbind, then bind,
    /// and returns its netdev; a VF with no driver is said so.
    #[test]
    fn rebinding_goes_through_the_driver() {
        let root = std::env::temp_dir().join(format!("railnet-rebind-{}", std::process::id()));
        let bdf = "0000:3b:00.2";
        let devs = root.join("bus/pci/devices");
        let drv = root.join("bus/pci/drivers/mlx5_core");
        std::fs::create_dir_all(devs.join(bdf).join("net/ib2")).unwrap();
        std::fs::create_dir_all(&drv).unwrap();
        let e = rebind(&root, bdf, std::time::Duration::ZERO).unwrap_err();
        assert!(e.contains("bound to its driver"), "{e}");
        std::os::unix::fs::symlink("../../drivers/mlx5_core", devs.join(bdf).join("driver"))
            .unwrap();
        assert_eq!(
            rebind(&root, bdf, std::time::Duration::ZERO).unwrap(),
            "ib2"
        );
        for op in ["unbind", "bind"] {
            assert_eq!(std::fs::read_to_string(drv.join(op)).unwrap(), bdf, "{op}");
        }
        std::fs::remove_dir_all(root).unwrap();
    }
}
