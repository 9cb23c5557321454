//! What sysfs says about a rail NIC that a claim may select or align on:
//! its PCI function, the PCIe root complex above it, its NUMA node, its
//! RDMA device and link layer. Read under a sysfs root (`--sysfs-root`) so
//! tests describe NICs as sysfs lays them out.

use std::path::{Component, Path};

/// A rail NIC's facts; each is absent where sysfs does not say (a veth has
/// no PCI function, a single-socket machine reports NUMA node -1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicFacts {
    /// PCI address (`0000:3b:00.0`).
    pub pci_address: Option<String>,
    /// The PCIe root complex (`pci0000:3a`), the standard
    /// `resource.kubernetes.io/pcieRoot` value GPU drivers publish too.
    pub pcie_root: Option<String>,
    /// NUMA node.
    pub numa_node: Option<i64>,
    /// RDMA device (`mlx5_3`).
    pub rdma_device: Option<String>,
    /// `ethernet` or `infiniband` (the netdev's ARP hardware type).
    pub link_layer: &'static str,
}

/// Reads `netdev`'s facts; `None` when the netdev does not exist.
pub fn read(sysfs: &Path, netdev: &str) -> Option<NicFacts> {
    let class = sysfs.join("class/net").join(netdev);
    // The netdev's directory (a real one or a symlink into devices/).
    if std::fs::symlink_metadata(&class).is_err() {
        return None;
    }
    let link_layer = match std::fs::read_to_string(class.join("type")) {
        // ARPHRD_INFINIBAND.
        Ok(t) if t.trim() == "32" => "infiniband",
        _ => "ethernet",
    };
    let pci_address = std::fs::read_link(class.join("device"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|bdf| is_bdf(bdf));
    Some(match pci_address {
        Some(bdf) => function(sysfs, &bdf, link_layer),
        None => NicFacts {
            link_layer,
            ..NicFacts::default()
        },
    })
}

/// The facts of PCI function `bdf` (a NIC's, or one of its VFs'), whose
/// netdevs' link layer is `link_layer`.
pub fn function(sysfs: &Path, bdf: &str, link_layer: &'static str) -> NicFacts {
    let dir = sysfs.join("bus/pci/devices").join(bdf);
    let numa_node = std::fs::read_to_string(dir.join("numa_node"))
        .ok()
        .and_then(|n| n.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0);
    NicFacts {
        pcie_root: pcie_root(sysfs, bdf),
        numa_node,
        rdma_device: crate::rdma::devices_of_pci(sysfs, bdf).into_iter().next(),
        pci_address: Some(bdf.to_owned()),
        link_layer,
    }
}

/// The root complex of PCI function `bdf`: the `pci<domain>:<bus>`
/// directory right under `devices/` on the path `bus/pci/devices/<bdf>`
/// links to (as Kubernetes' own `deviceattribute` helper reads it, so the
/// value equals what a GPU driver publishes for a GPU under the same root).
pub fn pcie_root(sysfs: &Path, bdf: &str) -> Option<String> {
    let link = Path::new("bus/pci/devices").join(bdf);
    let target = std::fs::read_link(sysfs.join(&link)).ok()?;
    // Relative to bus/pci/devices/: resolve the `..`s lexically.
    let mut path: Vec<String> = vec!["bus".into(), "pci".into(), "devices".into()];
    for part in target.components() {
        match part {
            Component::ParentDir => {
                path.pop();
            }
            Component::Normal(p) => path.push(p.to_string_lossy().into_owned()),
            Component::RootDir => path.clear(),
            _ => {}
        }
    }
    // An absolute target names /sys/devices/…; a relative one devices/….
    let start = path.iter().position(|p| p == "devices")?;
    let root = path.get(start + 1)?;
    (root.starts_with("pci") && path.last().map(String::as_str) == Some(bdf)).then(|| root.clone())
}

/// Whether `s` is a PCI address `dddd:bb:dd.f` (lowercase hex).
fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && hex(0..4)
        && hex(5..7)
        && hex(8..10)
        && hex(11..12)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Lays out a NIC as sysfs does: the function under its root complex,
    /// `bus/pci/devices/<bdf>` and `class/net/<netdev>/device` linking to it.
    pub(crate) fn fake_nic(
        sysfs: &Path,
        netdev: &str,
        root: &str,
        bdf: &str,
        numa: i64,
        rdma: Option<&str>,
    ) {
        let function = sysfs.join("devices").join(root).join(bdf);
        std::fs::create_dir_all(&function).unwrap();
        std::fs::write(function.join("numa_node"), format!("{numa}\n")).unwrap();
        if let Some(dev) = rdma {
            std::fs::create_dir_all(function.join("infiniband").join(dev)).unwrap();
        }
        let bus = sysfs.join("bus/pci/devices");
        std::fs::create_dir_all(&bus).unwrap();
        std::os::unix::fs::symlink(format!("../../../devices/{root}/{bdf}"), bus.join(bdf))
            .unwrap();
        let class = sysfs.join("class/net").join(netdev);
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(class.join("type"), "1\n").unwrap();
        std::os::unix::fs::symlink(
            format!("../../../devices/{root}/{bdf}"),
            class.join("device"),
        )
        .unwrap();
    }

    #[test]
    fn a_nic_under_a_root_complex_is_read_as_sysfs_lays_it_out() {
        let dir = tempfile_dir();
        fake_nic(
            &dir,
            "eth1",
            "pci0000:3a",
            "0000:3b:00.0",
            1,
            Some("mlx5_0"),
        );
        let facts = read(&dir, "eth1").unwrap();
        assert_eq!(
            facts,
            NicFacts {
                pci_address: Some("0000:3b:00.0".into()),
                pcie_root: Some("pci0000:3a".into()),
                numa_node: Some(1),
                rdma_device: Some("mlx5_0".into()),
                link_layer: "ethernet",
            }
        );
        assert_eq!(read(&dir, "eth9"), None, "no such netdev");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_nic_without_pci_has_no_placement() {
        let dir = tempfile_dir();
        let class = dir.join("class/net/veth0");
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(class.join("type"), "32\n").unwrap();
        let facts = read(&dir, "veth0").unwrap();
        assert_eq!(facts.pci_address, None);
        assert_eq!(facts.pcie_root, None);
        assert_eq!(facts.link_layer, "infiniband");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_pci_addresses_are_taken() {
        assert!(is_bdf("0000:3b:00.0"));
        assert!(!is_bdf("0000:3B:00.0"));
        assert!(!is_bdf("virtio0"));
    }

    pub(crate) fn tempfile_dir() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "railnet-dra-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
