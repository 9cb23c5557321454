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
    let _ = std::fs::remove_file(record_path(dir, kind, container_id, ifname));
}

/// What an isolated RDMA device was called before a pod took it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct RdmaRecord {
    /// PCI address of the VF.
    pub pci_address: String,
    /// The device's name in the host.
    pub device: String,
}

/// The bytes of `aa:bb:cc:dd:ee:ff`; `None` for anything else and for the
/// all-zero MAC an unconfigured VF reports (which cannot be set back).
pub fn mac_bytes(text: &str) -> Option<[u8; 6]> {
    crate::garp::parse_mac(text).filter(|mac| *mac != [0; 6])
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
        };
        save(&root, "vf", "c1", "net1", &rec).unwrap();
        assert_eq!(load(&root, "vf", "c1", "net1"), Some(rec));
        forget(&root, "vf", "c1", "net1");
        assert_eq!(load::<VfRecord>(&root, "vf", "c1", "net1"), None);
        std::fs::remove_dir_all(root).unwrap();
    }
}
