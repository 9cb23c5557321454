//! What a pod's workload needs to know of its rails, where the pod can read
//! it: `<dir>/<pod UID>/rails.json` and `<dir>/<pod UID>/nccl.env`.
//!
//! Multus's `network-status` annotation carries each rail's RDMA device
//! (the device-info record) but has no place for its GID index, and in
//! shared mode the RoCE GID index of a pod's address differs from pod to
//! pod (the seeds warn of it). So the agent writes, per pod, every rail's
//! interface, address, RDMA device, port and GID index, and the NCCL
//! settings they make (`NCCL_IB_HCA`, `NCCL_IB_GID_INDEX`). The webhook
//! mounts the pod's directory read-only at `/etc/railnet` (a hostPath with
//! `subPathExpr` of the pod's UID), so a job runs `. /etc/railnet/nccl.env`
//! before NCCL starts.
//!
//! One file per rail (`rail-<ifname>.json`) is the record; `rails.json` and
//! `nccl.env` are rewritten from them after every change, each through a
//! temporary file and a rename, so a reader never sees half a file.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::api::AddResult;

/// The pod's NCCL topology file, when the scheduler aligned its rails
/// with its GPUs (`crate::dra::topology`).
pub const TOPOLOGY: &str = crate::dra::topology::FILE;

/// A rail's RDMA device, as `rails.json` names it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RailDevice {
    /// RDMA device name (`mlx5_3`), what NCCL_IB_HCA names.
    pub device: String,
    /// Its port.
    pub port: u32,
    /// PCI address of the NIC or VF, when it is a PCI function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    /// Index of the RoCE GID of the rail's IPv4 address (NCCL_IB_GID_INDEX),
    /// when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid_index: Option<u32>,
    /// Whether the device was moved into the pod (exclusive mode).
    pub isolated: bool,
}

/// One rail of a pod, as `rails.json` lists it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RailInfo {
    /// `CNI_IFNAME` (`net1`).
    pub interface: String,
    /// The rail number of its network (0 when the network names none).
    pub rail: u32,
    /// The network's name.
    pub network: String,
    /// Its addresses, with prefix length.
    pub ips: Vec<String>,
    /// Its RDMA device, port and GID index, if the node has RDMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RailDevice>,
    /// The attachment's container ID (DEL without a pod UID finds it so);
    /// empty in what the pod writes of itself (`railnetctl pod-info`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// The pod as `namespace/name` (from CNI_ARGS; empty when the runtime
    /// did not say): what the metrics label its traffic with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
}

impl RailInfo {
    /// The record of a rail ADD made.
    pub fn of(
        container_id: &str,
        ifname: &str,
        rail: u32,
        network: &str,
        result: &AddResult,
        pod: &str,
    ) -> Self {
        RailInfo {
            interface: ifname.to_owned(),
            rail,
            network: network.to_owned(),
            ips: result.ips.iter().map(|a| a.address.to_string()).collect(),
            rdma: result.rdma.as_ref().map(|r| RailDevice {
                device: r.device.clone(),
                port: r.port,
                pci_address: r.pci_address.clone(),
                gid_index: r.gid_index,
                isolated: r.isolated,
            }),
            container_id: container_id.to_owned(),
            pod: pod.to_owned(),
        }
    }
}

/// How an interface alias (`IFLA_IFALIAS`, `ip link show` prints it)
/// written by railnet begins: the rest is the rail's record.
pub const ALIAS_PREFIX: &str = "railnet/v1 ";

/// The kernel's limit on an alias (IFALIASZ, with its terminating NUL).
const MAX_ALIAS: usize = 255;

/// What the alias carries: the rest of a [`RailInfo`] is on the interface
/// itself (its name and addresses) or the node's business (the container).
#[derive(Deserialize, Serialize)]
struct AliasRecord {
    rail: u32,
    network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rdma: Option<RailDevice>,
}

impl RailInfo {
    /// The record as the alias of its interface in the pod, which the pod
    /// reads itself (`railnetctl pod-info`: no hostPath, no API server, no
    /// privilege — what Pod Security `baseline` and `restricted` allow).
    /// Within the kernel's 255 bytes: a network name that does not fit is
    /// cut.
    pub fn alias(&self) -> String {
        let mut record = AliasRecord {
            rail: self.rail,
            network: self.network.clone(),
            rdma: self.rdma.clone(),
        };
        loop {
            let text = format!(
                "{ALIAS_PREFIX}{}",
                serde_json::to_string(&record).unwrap_or_default()
            );
            if text.len() <= MAX_ALIAS || record.network.is_empty() {
                return text;
            }
            let over = text.len() - MAX_ALIAS;
            let keep = record.network.len().saturating_sub(over);
            let mut cut = keep;
            while !record.network.is_char_boundary(cut) {
                cut -= 1;
            }
            record.network.truncate(cut);
        }
    }

    /// The record of interface `interface` with addresses `ips` from its
    /// alias; `None` if railnet did not write it.
    pub fn from_alias(interface: &str, ips: Vec<String>, alias: &str) -> Option<Self> {
        let record: AliasRecord = serde_json::from_str(alias.strip_prefix(ALIAS_PREFIX)?).ok()?;
        Some(RailInfo {
            interface: interface.to_owned(),
            rail: record.rail,
            network: record.network,
            ips,
            rdma: record.rdma,
            container_id: String::new(),
            pod: String::new(),
        })
    }
}

/// The rails of the network namespace this thread is in, from the aliases
/// railnet wrote on their interfaces: what a pod's init container reads
/// of itself. Unprivileged: a netlink dump of one's own namespace.
pub fn rails_here() -> io::Result<Vec<RailInfo>> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::link::LinkAttribute;
    crate::rtnl::with_rtnl(|h| async move {
        let mut rails = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(io::Error::other)? {
            let (mut name, mut alias) = (None, None);
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::IfAlias(a) => alias = Some(a.clone()),
                    _ => {}
                }
            }
            let (Some(name), Some(alias)) = (name, alias) else {
                continue;
            };
            if !alias.starts_with(ALIAS_PREFIX) {
                continue;
            }
            let ips = crate::rtnl::networks(&h, link.header.index)
                .await
                .map_err(io::Error::other)?
                .into_iter()
                // Link-local addresses are the link's, not the rail's.
                .filter(
                    |n| !matches!(n.addr(), std::net::IpAddr::V6(a) if a.is_unicast_link_local()),
                )
                .map(|n| n.to_string())
                .collect();
            if let Some(rail) = RailInfo::from_alias(&name, ips, &alias) {
                rails.push(rail);
            }
        }
        rails.sort_by(|a, b| (a.rail, &a.interface).cmp(&(b.rail, &b.interface)));
        Ok(rails)
    })?
}

/// Writes `rails.json` and `nccl.env` for `rails` into `dir` (made if
/// missing), each through a temporary file and a rename.
pub fn write_files(dir: &Path, rails: &[RailInfo]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    write_pod_files(dir, rails)
}

/// The per-pod directories under one root.
#[derive(Debug)]
pub struct PodInfo {
    root: PathBuf,
    /// One rewrite at a time: a pod's rails may be added concurrently.
    lock: std::sync::Mutex<()>,
}

/// A pod UID fit to be a directory name: what Kubernetes generates
/// (a UUID), never a path.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl PodInfo {
    /// Pod directories under `root` (made when first needed).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PodInfo {
            root: root.into(),
            lock: std::sync::Mutex::new(()),
        }
    }

    /// The directory of pod `uid`.
    pub fn dir(&self, uid: &str) -> PathBuf {
        self.root.join(uid)
    }

    /// The directory of pod `uid`, if `uid` is one.
    fn pod_dir(&self, uid: &str) -> io::Result<PathBuf> {
        if !valid_uid(uid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("K8S_POD_UID {uid:?} is not a pod UID"),
            ));
        }
        Ok(self.dir(uid))
    }

    /// Records `rail` for pod `uid` and rewrites the pod's files.
    pub fn record(&self, uid: &str, rail: &RailInfo) -> io::Result<()> {
        let dir = self.pod_dir(uid)?;
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        fs::create_dir_all(&dir)?;
        write_atomically(
            &dir.join(format!("rail-{}.json", rail.interface)),
            &serde_json::to_vec_pretty(rail).map_err(io::Error::other)?,
        )?;
        write_pod_files(&dir, &rails_in(&dir))
    }

    /// Writes pod `uid`'s NCCL topology file ([`TOPOLOGY`], what pairs its
    /// GPUs with their rails) and names it in its `nccl.env`. The pod's
    /// rails must be recorded first: the file goes with the last of them.
    pub fn record_topology(&self, uid: &str, xml: &str) -> io::Result<()> {
        let dir = self.pod_dir(uid)?;
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let rails = rails_in(&dir);
        if rails.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pod {uid} has no rail recorded"),
            ));
        }
        write_atomically(&dir.join(TOPOLOGY), xml.as_bytes())?;
        write_pod_files(&dir, &rails)
    }

    /// The pod (`namespace/name`) of every attachment recorded, by
    /// container ID.
    pub fn pods(&self) -> std::collections::HashMap<String, String> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Default::default();
        };
        entries
            .flatten()
            .flat_map(|e| rails_in(&e.path()))
            .filter(|r| !r.pod.is_empty())
            .map(|r| (r.container_id, r.pod))
            .collect()
    }

    /// Forgets interface `ifname` of the attachment `container_id` — in
    /// pod `uid`'s directory, or, without a UID (a DEL whose CNI_ARGS lack
    /// it), wherever that attachment is recorded — and rewrites what is
    /// left; a pod directory left empty goes.
    pub fn forget(&self, uid: Option<&str>, container_id: &str, ifname: &str) -> io::Result<()> {
        self.forget_matching(uid, |r| {
            r.container_id == container_id && r.interface == ifname
        })
    }

    /// Forgets every rail `matches` picks — in pod `uid`'s directory, or in
    /// every pod's — in one pass over the records (GC and the sweep forget
    /// many attachments at once), and rewrites what is left.
    pub fn forget_matching(
        &self,
        uid: Option<&str>,
        matches: impl Fn(&RailInfo) -> bool,
    ) -> io::Result<()> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dirs: Vec<PathBuf> = match uid {
            Some(uid) if valid_uid(uid) => vec![self.dir(uid)],
            _ => match fs::read_dir(&self.root) {
                Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            },
        };
        for dir in dirs {
            let (gone, kept): (Vec<RailInfo>, Vec<RailInfo>) =
                rails_in(&dir).into_iter().partition(|r| matches(r));
            if gone.is_empty() {
                continue;
            }
            for rail in &gone {
                fs::remove_file(dir.join(format!("rail-{}.json", rail.interface)))?;
            }
            if kept.is_empty() {
                for name in ["rails.json", "nccl.env", TOPOLOGY] {
                    // Absent already is as good as removed; anything else
                    // shows as the directory's removal failing below.
                    let _ = fs::remove_file(dir.join(name));
                }
                let _ = fs::remove_dir(&dir);
            } else {
                write_pod_files(&dir, &kept)?;
            }
        }
        Ok(())
    }
}

/// Writes `rails.json` and `nccl.env` of the pod directory `dir` from its
/// rail records `rails`.
fn write_pod_files(dir: &Path, rails: &[RailInfo]) -> io::Result<()> {
    // The pod's name is for the node's metrics: the pod knows who it is,
    // and its own view (`railnetctl pod-info`) has no such field.
    let shown: Vec<RailInfo> = rails
        .iter()
        .map(|r| RailInfo {
            pod: String::new(),
            ..r.clone()
        })
        .collect();
    write_atomically(
        &dir.join("rails.json"),
        &serde_json::to_vec_pretty(&shown).map_err(io::Error::other)?,
    )?;
    let mut env = nccl_env(rails);
    if dir.join(TOPOLOGY).exists() {
        // Where the pod sees it: the webhook mounts this directory there.
        env.push_str(&format!(
            "# The PCI switches of {TOPOLOGY} pair each GPU with the rail its claim aligned it with.\n\
             export NCCL_TOPO_FILE={}/{TOPOLOGY}\n",
            crate::webhook::RAIL_INFO_PATH
        ));
    }
    write_atomically(&dir.join("nccl.env"), env.as_bytes())
}

fn read_rail(file: &Path) -> Option<RailInfo> {
    serde_json::from_slice(&fs::read(file).ok()?).ok()
}

/// The rail records in `dir`, by rail then interface.
fn rails_in(dir: &Path) -> Vec<RailInfo> {
    let mut rails: Vec<RailInfo> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("rail-") && name.ends_with(".json")
                })
                .filter_map(|e| read_rail(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    rails.sort_by(|a, b| (a.rail, &a.interface).cmp(&(b.rail, &b.interface)));
    rails
}

/// The NCCL settings the rails make, as a shell file. `NCCL_IB_HCA` lists
/// the rails' devices exactly (`=` prefix: `mlx5_1` must not also match
/// `mlx5_10`); `NCCL_IB_GID_INDEX` is one value for every device, so it is
/// set only when every RoCE rail's GID index is known and the same.
pub fn nccl_env(rails: &[RailInfo]) -> String {
    let mut out = String::from(
        "# Written by railnet for this pod's rails; rewritten on every rail ADD/DEL.\n",
    );
    let with_rdma: Vec<(&RailInfo, &RailDevice)> = rails
        .iter()
        .filter_map(|r| r.rdma.as_ref().map(|d| (r, d)))
        .collect();
    for (r, d) in &with_rdma {
        out.push_str(&format!(
            "# {} (rail {}, {}): {} port {}, GID index {}\n",
            r.interface,
            r.rail,
            r.ips.first().map(String::as_str).unwrap_or("no address"),
            d.device,
            d.port,
            d.gid_index
                .map_or_else(|| "unknown".to_owned(), |g| g.to_string()),
        ));
    }
    if with_rdma.is_empty() {
        out.push_str("# No rail of this pod has an RDMA device.\n");
        return out;
    }
    let hcas: Vec<String> = with_rdma
        .iter()
        .map(|(_, d)| format!("{}:{}", d.device, d.port))
        .collect();
    out.push_str(&format!(
        "export NCCL_IB_HCA={}\n",
        shell_quote(&format!("={}", hcas.join(",")))
    ));
    let gids: Vec<Option<u32>> = with_rdma.iter().map(|(_, d)| d.gid_index).collect();
    match gids.first() {
        Some(Some(first)) if gids.iter().all(|g| *g == Some(*first)) => {
            out.push_str(&format!("export NCCL_IB_GID_INDEX={first}\n"));
        }
        _ => out.push_str(
            "# NCCL_IB_GID_INDEX is not set: it is one value for all devices, and the rails' \
             GID indexes differ or are unknown (InfiniBand ports have none); NCCL then picks.\n",
        ),
    }
    out
}

/// Single-quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, so a reader sees the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rail(ifname: &str, k: u32, dev: Option<(&str, Option<u32>)>) -> RailInfo {
        RailInfo {
            interface: ifname.into(),
            rail: k,
            network: format!("rail{k}"),
            ips: vec![format!("172.16.{k}.10/24")],
            rdma: dev.map(|(d, g)| RailDevice {
                device: d.into(),
                port: 1,
                pci_address: None,
                gid_index: g,
                isolated: false,
            }),
            container_id: "c1".into(),
            pod: String::new(),
        }
    }

    /// The record on the interface comes back as it was written (but the
    /// container ID, the node's), and never outgrows the kernel's alias.
    #[test]
    fn the_interface_alias_round_trips_and_fits() {
        let mut r = rail("net3", 3, Some(("mlx5_3", Some(5))));
        r.rdma.as_mut().unwrap().pci_address = Some("0000:3b:00.2".into());
        let alias = r.alias();
        assert!(
            alias.starts_with(ALIAS_PREFIX) && alias.len() <= MAX_ALIAS,
            "{alias}"
        );
        let back = RailInfo::from_alias("net3", r.ips.clone(), &alias).unwrap();
        assert_eq!(
            back,
            RailInfo {
                container_id: String::new(),
                ..r.clone()
            }
        );
        // A network name of a NAD's full 253 characters is cut to fit.
        r.network = "n".repeat(253);
        let alias = r.alias();
        assert!(alias.len() <= MAX_ALIAS, "{} bytes", alias.len());
        let back = RailInfo::from_alias("net3", vec![], &alias).unwrap();
        assert!(back.network.len() < 253 && back.rdma == r.rdma);
        // Not railnet's alias: not a rail.
        assert!(RailInfo::from_alias("eth0", vec![], "uplink to ToR 7").is_none());
    }

    #[test]
    fn nccl_env_names_the_devices_exactly_and_one_gid_index_only_when_shared() {
        let same = [
            rail("net1", 1, Some(("mlx5_1", Some(3)))),
            rail("net2", 2, Some(("mlx5_10", Some(3)))),
        ];
        let env = nccl_env(&same);
        assert!(
            env.contains("export NCCL_IB_HCA='=mlx5_1:1,mlx5_10:1'\n"),
            "{env}"
        );
        assert!(env.contains("export NCCL_IB_GID_INDEX=3\n"), "{env}");
        let differ = [
            rail("net1", 1, Some(("mlx5_1", Some(3)))),
            rail("net2", 2, Some(("mlx5_2", Some(5)))),
        ];
        let env = nccl_env(&differ);
        assert!(!env.contains("export NCCL_IB_GID_INDEX"), "{env}");
        assert!(env.contains("GID index 5"), "{env}");
        let unknown = [rail("net1", 1, Some(("mlx5_1", None)))];
        assert!(!nccl_env(&unknown).contains("export NCCL_IB_GID_INDEX"));
        let none = [rail("net1", 1, None)];
        assert!(!nccl_env(&none).contains("NCCL_IB_HCA"));
    }

    #[test]
    fn records_rewrite_the_pod_files_and_the_last_forget_removes_the_directory() {
        let root = std::env::temp_dir().join(format!("railnet-podinfo-{}", std::process::id()));
        let info = PodInfo::new(&root);
        let uid = "6f1e2c3a-0000-4000-8000-000000000001";
        info.record(uid, &rail("net2", 2, Some(("mlx5_2", Some(3)))))
            .unwrap();
        info.record(uid, &rail("net1", 1, Some(("mlx5_1", Some(3)))))
            .unwrap();
        let text = fs::read_to_string(info.dir(uid).join("rails.json")).unwrap();
        // The workload's view: camelCase keys, as Kubernetes writes them.
        assert!(
            text.contains(r#""gidIndex": 3"#) && text.contains(r#""device": "mlx5_1""#),
            "{text}"
        );
        let listed: Vec<RailInfo> = serde_json::from_str(&text).unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|r| r.interface.as_str())
                .collect::<Vec<_>>(),
            ["net1", "net2"],
            "by rail"
        );
        // Another attachment's DEL of the same name changes nothing.
        info.forget(Some(uid), "other", "net1").unwrap();
        assert!(info.dir(uid).join("rail-net1.json").exists());
        // A DEL without the pod UID still finds its record.
        info.forget(None, "c1", "net1").unwrap();
        let env = fs::read_to_string(info.dir(uid).join("nccl.env")).unwrap();
        assert!(
            env.contains("'=mlx5_2:1'") && !env.contains("mlx5_1"),
            "{env}"
        );
        info.forget(Some(uid), "c1", "net2").unwrap();
        assert!(
            !info.dir(uid).exists(),
            "the pod's directory goes with its last rail"
        );
        // A pod whose netns vanished: all its rails go at once.
        info.record(uid, &rail("net1", 1, None)).unwrap();
        info.record(uid, &rail("net2", 2, None)).unwrap();
        info.forget_matching(None, |r| r.container_id == "c1")
            .unwrap();
        assert!(!info.dir(uid).exists());
        assert!(info.record("../etc", &rail("net1", 1, None)).is_err());
        let _ = fs::remove_dir_all(&root);
    }
}
