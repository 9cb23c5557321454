//! What the agent must remember across restarts as a DRA driver: the
//! claims the kubelet had it prepare (which devices, for which pods) and
//! the rails it wired into each pod sandbox from them. One JSON file each,
//! written to a temporary name and renamed, beside the allocations.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A claim the kubelet had prepared on this node.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PreparedClaim {
    /// The claim's UID.
    pub uid: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// UIDs of the pods it was reserved for when last read.
    pub pods: Vec<String>,
    /// The railnet devices allocated to it, in allocation order.
    pub devices: Vec<PreparedDevice>,
    /// The other drivers' devices allocated to it (a GPU beside the rail),
    /// placed as their ResourceSlices say: what pairs a GPU with its NIC
    /// for NCCL ([`super::topology`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerDevice>,
}

/// Where a PCI device sits, in the standard attributes' terms
/// (`resource.kubernetes.io/pciBusID`, `pcieRoot`, `numaNode`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Placement {
    /// PCI address (`0000:3b:00.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    /// Root complex (`pci0000:3a`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_root: Option<String>,
    /// NUMA node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<i64>,
}

/// Another driver's device allocated to a claim railnet prepared.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PeerDevice {
    /// Its driver (`gpu.nvidia.com`).
    pub driver: String,
    /// The claim's request it was allocated for.
    pub request: String,
    /// Its pool.
    pub pool: String,
    /// Its name.
    pub device: String,
    /// Where it sits, when its slice says.
    #[serde(default)]
    pub placement: Placement,
}

/// One allocated rail device of a prepared claim.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PreparedDevice {
    /// The claim's request it was allocated for.
    pub request: String,
    /// Its pool.
    pub pool: String,
    /// Its name.
    pub device: String,
    /// Which share of a device allocated many times.
    #[serde(default)]
    pub share_id: Option<String>,
    /// Its rail.
    pub rail: u32,
    /// The config it is wired with (its RailNetwork's, at prepare time).
    pub conf: serde_json::Value,
    /// Where its NIC sits.
    #[serde(default)]
    pub placement: Placement,
    /// Whether its link layer is InfiniBand.
    #[serde(default)]
    pub infiniband: bool,
}

/// The rails wired into one pod sandbox.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Wired {
    /// The pod's UID.
    pub pod_uid: String,
    /// The rails, in interface order.
    pub rails: Vec<WiredRail>,
}

/// One rail wired from a claim's device.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct WiredRail {
    /// The pod interface.
    pub ifname: String,
    /// The claim it came from (namespace, name, UID).
    pub claim: (String, String, String),
    /// The device.
    pub pool: String,
    /// The device.
    pub device: String,
    /// Its share.
    #[serde(default)]
    pub share_id: Option<String>,
    /// The config it was wired with (what DEL undoes).
    pub conf: serde_json::Value,
}

/// The files.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The records under `dir` (`claims/`, `sandboxes/`).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Records a prepared claim (replacing an earlier record of it).
    pub fn save_claim(&self, claim: &PreparedClaim) -> std::io::Result<()> {
        write(&self.path("claims", &claim.uid)?, claim)
    }

    /// Forgets a claim; forgetting one never recorded is not an error.
    pub fn forget_claim(&self, uid: &str) -> std::io::Result<()> {
        remove(&self.path("claims", uid)?)
    }

    /// Every prepared claim.
    pub fn claims(&self) -> Vec<PreparedClaim> {
        read_all(&self.dir.join("claims"))
    }

    /// Records the rails wired into sandbox `container_id`.
    pub fn save_wired(&self, container_id: &str, wired: &Wired) -> std::io::Result<()> {
        write(&self.path("sandboxes", container_id)?, wired)
    }

    /// The rails wired into sandbox `container_id`, if any.
    pub fn wired(&self, container_id: &str) -> Option<Wired> {
        let text = std::fs::read(self.path("sandboxes", container_id).ok()?).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Forgets sandbox `container_id`'s rails.
    pub fn forget_wired(&self, container_id: &str) -> std::io::Result<()> {
        remove(&self.path("sandboxes", container_id)?)
    }

    /// Every sandbox with rails.
    pub fn all_wired(&self) -> Vec<Wired> {
        read_all(&self.dir.join("sandboxes"))
    }

    /// `<dir>/<kind>/<id>.json`, for an id that is a plain name (a UID or
    /// a container ID; never a path).
    fn path(&self, kind: &str, id: &str) -> std::io::Result<PathBuf> {
        let plain = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !plain {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{id:?} is not a plain name"),
            ));
        }
        Ok(self.dir.join(kind).join(format!("{id}.json")))
    }
}

fn write<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path.parent().expect("under a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(value).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn read_all<T: for<'de> Deserialize<'de>>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let text = std::fs::read(e.path()).ok()?;
            serde_json::from_slice(&text)
                .map_err(|err| {
                    tracing::warn!(file = %e.path().display(), error = %err, "unreadable DRA record left alone");
                })
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_and_sandboxes_survive_a_new_store_and_ids_stay_names() {
        let dir = crate::dra::nic::tests::tempfile_dir();
        let store = Store::new(dir.clone());
        let claim = PreparedClaim {
            uid: "0b8c6a70-0000-4000-8000-000000000001".into(),
            namespace: "default".into(),
            name: "job-rails".into(),
            pods: vec!["p1".into()],
            devices: vec![PreparedDevice {
                request: "nic0".into(),
                pool: "node0/railnet".into(),
                device: "rail1".into(),
                share_id: Some("s1".into()),
                rail: 1,
                conf: serde_json::json!({"name": "rail1"}),
                placement: Placement {
                    pci_bus_id: Some("0000:3b:00.0".into()),
                    pcie_root: Some("pci0000:3a".into()),
                    numa_node: Some(0),
                },
                infiniband: false,
            }],
            peers: vec![PeerDevice {
                driver: "gpu.example.com".into(),
                request: "gpu0".into(),
                pool: "node0".into(),
                device: "gpu0".into(),
                placement: Placement::default(),
            }],
        };
        store.save_claim(&claim).unwrap();
        assert_eq!(
            Store::new(dir.clone()).claims(),
            std::slice::from_ref(&claim)
        );
        assert!(
            store
                .save_wired(
                    "../../etc/passwd",
                    &Wired {
                        pod_uid: "p".into(),
                        rails: vec![]
                    }
                )
                .is_err()
        );
        store.forget_claim(&claim.uid).unwrap();
        store.forget_claim(&claim.uid).unwrap();
        assert!(store.claims().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
