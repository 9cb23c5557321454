//! CDI (Container Device Interface) specs for the RDMA character devices
//! of a claim's VFs: what the SR-IOV device plugin mounts for an RDMA VF
//! (`/dev/infiniband/uverbs<N>` of the VF, and `rdma_cm`), handed to the
//! runtime through the kubelet instead.
//!
//! Prepare writes one spec file per claim (`railnet.io-<claim UID>.json`
//! in the runtime's CDI directory, kind `railnet.io/rdma`, one CDI device
//! per rail device: `<claim UID>-<device>`) and answers its CDI device
//! IDs; the kubelet passes them with the pod's containers to the runtime,
//! which adds the nodes to the container and allows them in its device
//! cgroup. Unprepare removes the file. The file is written to a temporary
//! name and renamed: the runtime watches the directory and must never
//! read half a spec.
//!
//! Each node is given with its type and numbers, read from sysfs (`dev`
//! of the `infiniband_verbs` class device under the VF's PCI function, and
//! of the `rdma_cm` misc device), so the runtime need not look at the
//! host's `/dev`. A VF without an RDMA device gets no CDI device: it is a
//! network interface only.
//!
//! The format is CDI's (cncf-tags/container-device-interface, `SPEC.md`):
//! written here with serde rather than through the Rust CDI crate, whose
//! library brings a JSON-schema validator, a CLI parser and OCI runtime
//! types (≈ 240 crates) to write one small file.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The CDI kind of railnet's devices (`vendor/class`).
pub const KIND: &str = "railnet.io/rdma";

/// The CDI spec version written: the oldest that has everything used.
const VERSION: &str = "0.6.0";

/// A character device a container gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceNode {
    /// Its path in the container (and on the host).
    pub path: String,
    /// `c`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Cgroup access: read and write, no mknod.
    pub permissions: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec<'a> {
    cdi_version: &'static str,
    kind: &'static str,
    devices: Vec<Device<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Device<'a> {
    name: String,
    container_edits: Edits<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Edits<'a> {
    device_nodes: &'a [DeviceNode],
}

/// The character devices that use the RDMA device of PCI function `bdf`:
/// its uverbs devices and, when it has any, the RDMA connection manager.
/// Empty when the function has no RDMA device.
pub fn rdma_nodes(sysfs: &Path, bdf: &str) -> Vec<DeviceNode> {
    let verbs = sysfs
        .join("bus/pci/devices")
        .join(bdf)
        .join("infiniband_verbs");
    let mut nodes: Vec<DeviceNode> = std::fs::read_dir(verbs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            char_node(&e.path(), &format!("/dev/infiniband/{name}"))
        })
        .collect();
    if nodes.is_empty() {
        return nodes;
    }
    nodes.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(cm) = char_node(&sysfs.join("class/misc/rdma_cm"), "/dev/infiniband/rdma_cm") {
        nodes.push(cm);
    }
    nodes
}

/// The node `path` of the class device at `dir` (its `dev`: `major:minor`).
fn char_node(dir: &Path, path: &str) -> Option<DeviceNode> {
    let dev = std::fs::read_to_string(dir.join("dev")).ok()?;
    let (major, minor) = dev.trim().split_once(':')?;
    Some(DeviceNode {
        path: path.to_owned(),
        kind: "c",
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        permissions: "rw",
    })
}

/// The CDI device name of `device` of claim `claim_uid`.
fn name(claim_uid: &str, device: &str) -> String {
    format!("{claim_uid}-{device}")
}

/// The fully-qualified CDI device ID the kubelet passes on.
pub fn device_id(claim_uid: &str, device: &str) -> String {
    format!("{KIND}={}", name(claim_uid, device))
}

/// The spec file of claim `claim_uid` in `dir`.
fn file(dir: &Path, claim_uid: &str) -> PathBuf {
    dir.join(format!("railnet.io-{claim_uid}.json"))
}

/// Writes claim `claim_uid`'s spec: one CDI device per `(device, nodes)`.
/// With no nodes at all, no file is written and any old one is removed.
pub fn write(
    dir: &Path,
    claim_uid: &str,
    devices: &[(String, Vec<DeviceNode>)],
) -> std::io::Result<()> {
    let devices: Vec<Device<'_>> = devices
        .iter()
        .filter(|(_, nodes)| !nodes.is_empty())
        .map(|(device, nodes)| Device {
            name: name(claim_uid, device),
            container_edits: Edits {
                device_nodes: nodes,
            },
        })
        .collect();
    if devices.is_empty() {
        return remove(dir, claim_uid);
    }
    let spec = Spec {
        cdi_version: VERSION,
        kind: KIND,
        devices,
    };
    std::fs::create_dir_all(dir)?;
    let path = file(dir, claim_uid);
    // A name the runtime's scan skips (it reads *.json and *.yaml).
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&spec).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// Removes claim `claim_uid`'s spec, if any.
pub fn remove(dir: &Path, claim_uid: &str) -> std::io::Result<()> {
    match std::fs::remove_file(file(dir, claim_uid)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dra::nic::tests::tempfile_dir;

    fn class_device(dir: &Path, dev: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
    }

    #[test]
    fn a_vf_with_rdma_gets_its_uverbs_and_rdma_cm_in_one_spec_per_claim() {
        let sysfs = tempfile_dir();
        let vf = sysfs.join("bus/pci/devices/0000:3c:00.1");
        class_device(&vf.join("infiniband_verbs/uverbs20"), "231:212");
        class_device(&sysfs.join("class/misc/rdma_cm"), "10:58");
        std::fs::create_dir_all(sysfs.join("bus/pci/devices/0000:3c:00.2")).unwrap();

        let nodes = rdma_nodes(&sysfs, "0000:3c:00.1");
        let paths: Vec<_> = nodes
            .iter()
            .map(|n| format!("{} {}:{}", n.path, n.major, n.minor))
            .collect();
        assert_eq!(
            paths,
            [
                "/dev/infiniband/uverbs20 231:212",
                "/dev/infiniband/rdma_cm 10:58"
            ]
        );
        assert!(
            rdma_nodes(&sysfs, "0000:3c:00.2").is_empty(),
            "a VF without RDMA gets no device node, not even rdma_cm"
        );

        let cdi = sysfs.join("cdi");
        write(
            &cdi,
            "uid-1",
            &[("vf2-vf0".into(), nodes), ("vf2-vf1".into(), Vec::new())],
        )
        .unwrap();
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cdi.join("railnet.io-uid-1.json")).unwrap())
                .unwrap();
        assert_eq!(spec["kind"], "railnet.io/rdma");
        assert_eq!(spec["cdiVersion"], "0.6.0");
        assert_eq!(spec["devices"].as_array().unwrap().len(), 1);
        assert_eq!(spec["devices"][0]["name"], "uid-1-vf2-vf0");
        assert_eq!(
            spec["devices"][0]["containerEdits"]["deviceNodes"][0],
            serde_json::json!({"path": "/dev/infiniband/uverbs20", "type": "c",
                               "major": 231, "minor": 212, "permissions": "rw"})
        );
        assert_eq!(
            device_id("uid-1", "vf2-vf0"),
            "railnet.io/rdma=uid-1-vf2-vf0"
        );
        assert_eq!(
            std::fs::read_dir(&cdi).unwrap().count(),
            1,
            "no temporary file left"
        );

        // Nothing to give: no file (and the old one goes).
        write(&cdi, "uid-1", &[("vf2-vf1".into(), Vec::new())]).unwrap();
        assert_eq!(std::fs::read_dir(&cdi).unwrap().count(), 0);
        remove(&cdi, "uid-1").unwrap();
        let _ = std::fs::remove_dir_all(&sysfs);
    }
}
