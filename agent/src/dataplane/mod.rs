//! The pod's tc program: load, attach, fill, pin, and take it all away.
//!
//! Each pod gets its own maps, pinned under `<pin root>/<containerID>/maps/`,
//! and its program attached to each Ethernet rail interface as a clsact
//! filter, the program pinned under `…/links/<ifname>` — or, with
//! [`TcAttach::Tcx`], one TCX link per interface pinned there. A filter
//! stays with its device (which lives and dies with the pod); pins keep the
//! maps (and TCX links) alive while the agent restarts; DEL removes the
//! filter and the pins. Everything here runs on a thread inside the pod's
//! netns: interface names resolve there, and a TCX link binds the ifindex
//! of the calling thread's netns. The program is loaded once per pod and
//! pinned as `…/prog-<object id>`; the pod's other rails attach that one.
//!
//! Why clsact by default: attaching a TCX link waits for an RCU grace
//! period (the kernel swaps the device's program array and synchronizes
//! before returning), which costs every ADD ~9 ms here and serializes
//! parallel ADDs behind each other — `cargo xtask bench cni`: ADD p50
//! 17.3 ms with TCX, 8.6 ms with clsact; 100 pods × 8 rails 9.9 s vs 4.2 s.
//!
//! The one map the pods share is the programs' log buffer ([`log`]).

pub mod log;

use crate::netns::{LiveNetns, NetnsId};
use std::{
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{self, TcAttachOptions},
    },
};
use ipnet::Ipv4Net;
use railnet_common::{
    LAYOUT_VERSION, MAP_COUNTERS, MAP_META, MAP_RAIL_SOURCES, MAP_RDMA_NETS, Meta, Net4,
    PROGRAM_RAIL_EGRESS, RailSource, RdmaNets, Verdict, counter_index,
};

use crate::bpf_object;

/// Default directory for the pods' pins.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/railnet";

/// The pod's loaded program, pinned next to its maps (`<pod>/prog-<id>`):
/// the pod's later rails attach it instead of loading (verifying) their
/// own. `<id>` names this agent's object (FNV-1a of its bytes), so after an
/// upgrade a pod's new rails get the new program, not the one an older
/// agent left.
pub(crate) fn program_pin(object: &'static [u8]) -> &'static str {
    // One object per agent binary: hashed once.
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let hash = object.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("prog-{hash:016x}")
    })
}

/// One rail of one pod, as the program needs it.
#[derive(Clone, Debug)]
pub struct RailAttachment {
    /// Pod interface name.
    pub ifname: String,
    /// Its ifindex in the pod netns.
    pub ifindex: u32,
    /// Rail number K.
    pub rail: u32,
    /// The pod's address on the rail, with the rail subnet's prefix.
    pub address: Ipv4Net,
    /// Rail gateway.
    pub gateway: Option<Ipv4Addr>,
    /// RDMA CIDRs; empty means the rail's own subnet.
    pub rdma_cidrs: Vec<Ipv4Net>,
    /// The pod's netns, recorded for the sweep.
    pub netns: NetnsId,
}

/// Errors loading, attaching or pinning.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The agent was built without the program.
    #[error(transparent)]
    Stub(#[from] bpf_object::StubObject),
    /// The pin directory.
    #[error("bpffs {path}: {source}; is bpffs mounted (`mount -t bpf bpf /sys/fs/bpf`)?")]
    Pins {
        /// Path.
        path: String,
        /// Error.
        source: io::Error,
    },
    /// aya refused to load the object.
    #[error("loading the rail program: {0}")]
    Load(String),
    /// Attaching to an interface.
    #[error("attaching the rail program to {ifname} egress: {why}")]
    Attach {
        /// Interface.
        ifname: String,
        /// aya's error.
        why: String,
    },
    /// Programming a map.
    #[error("programming map {map}: {why}")]
    Map {
        /// Map name.
        map: &'static str,
        /// aya's error.
        why: String,
    },
}

fn ip_key(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Where one pod's pins live.
#[derive(Clone, Debug)]
pub struct PodPins {
    dir: PathBuf,
    /// How [`PodPins::attach`] attaches (and `detach` detaches).
    attach_kind: TcAttach,
}

impl PodPins {
    /// The pins of `container_id` under `root`, attaching with
    /// [`TcAttach::Clsact`]. The ID was validated by the caller to be a
    /// plain file name.
    pub fn new(root: &Path, container_id: &str) -> Self {
        Self {
            dir: root.join(container_id),
            attach_kind: TcAttach::Clsact,
        }
    }

    /// The same pins, attaching with `kind` (the service's choice).
    pub fn attaching_with(self, kind: TcAttach) -> Self {
        Self {
            attach_kind: kind,
            ..self
        }
    }

    /// The pod's pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    fn link_path(&self, ifname: &str) -> PathBuf {
        self.dir.join("links").join(ifname)
    }

    fn pin_err(path: &Path) -> impl FnOnce(io::Error) -> DataplaneError + '_ {
        move |source| DataplaneError::Pins {
            path: path.display().to_string(),
            source,
        }
    }

    /// Loads (or re-opens) the pod's maps, programs rail `att` into them,
    /// attaches a program instance to `att.ifname` egress and pins its link.
    /// Must run inside the pod netns.
    pub fn attach(&self, att: &RailAttachment) -> Result<(), DataplaneError> {
        let t_start = std::time::Instant::now();
        let object = bpf_object::object()?;
        for sub in ["maps", "links"] {
            let p = self.dir.join(sub);
            fs::create_dir_all(&p).map_err(Self::pin_err(&p))?;
        }
        let mut paths: Vec<(&'static str, PathBuf)> =
            [MAP_RAIL_SOURCES, MAP_RDMA_NETS, MAP_COUNTERS, MAP_META]
                .into_iter()
                .map(|n| (n, self.map_path(n)))
                .collect();
        // The node's log buffer and its program that says the rare
        // events, not the pod's (see `log`).
        if let Some(root) = self.dir.parent() {
            paths.push((log::MAP_LOGS, log::pin_path(root)));
            paths.push((railnet_common::MAP_SAY, log::say_pin(root, object)));
        }
        let t0 = std::time::Instant::now();
        tracing::debug!(
            prepare_us = (t0 - t_start).as_micros() as u64,
            "pin directories ready"
        );
        let mut ebpf = with_loader(|loader| {
            for (name, path) in &paths {
                loader.map_pin_path(name, path.clone());
            }
            loader.load(object)
        })
        .map_err(|e| DataplaneError::Load(format!("{e:#}")))?;

        let t1 = std::time::Instant::now();
        fill(&mut ebpf, att)?;
        let t2 = std::time::Instant::now();
        self.hook(&mut ebpf, object, att)?;
        let t3 = std::time::Instant::now();
        drop(ebpf);
        tracing::debug!(
            load_us = (t1 - t0).as_micros() as u64,
            maps_us = (t2 - t1).as_micros() as u64,
            verify_attach_pin_us = (t3 - t2).as_micros() as u64,
            drop_us = t3.elapsed().as_micros() as u64,
            "rail program attached"
        );
        Ok(())
    }

    /// Attaches the pod's program to `att.ifname` egress and pins the
    /// attachment: the program the pod's first rail loaded if it is pinned,
    /// else the one in `ebpf`, verified now.
    fn hook(
        &self,
        ebpf: &mut aya::Ebpf,
        object: &'static [u8],
        att: &RailAttachment,
    ) -> Result<(), DataplaneError> {
        let attach_err = |why: String| DataplaneError::Attach {
            ifname: att.ifname.clone(),
            why,
        };
        // The verifier is most of an ADD's CPU: a pod's later rails attach
        // the program its first rail loaded (pinned with the pod's maps,
        // which it references), so an 8-rail pod is verified once.
        let prog_pin = self.dir.join(program_pin(object));
        let mut pinned = SchedClassifier::from_pin(&prog_pin).ok();
        let prog: &mut SchedClassifier = match pinned.as_mut() {
            Some(p) => p,
            None => {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(PROGRAM_RAIL_EGRESS)
                    .expect("rail_egress in object")
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
                prog.load()
                    .map_err(|e| attach_err(format!("verifier: {e:#}")))?;
                // Best effort: without the pin the next rail loads its own.
                if let Err(e) = prog.pin(&prog_pin) {
                    tracing::debug!(error = %e, "rail program not pinned for the pod's next rails");
                }
                tracing::debug!("rail program verified (the pod's first rail)");
                prog
            }
        };
        let link_path = self.link_path(&att.ifname);
        // A stale pin of the same name (a retried ADD) is replaced; none
        // there is the usual case, and a pin that cannot go fails the pin
        // below, saying why.
        let _ = fs::remove_file(&link_path);
        if self.attach_kind == TcAttach::Tcx {
            let id = prog
                .attach_with_options(
                    &att.ifname,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| attach_err(format!("{e:#}")))?;
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            let link: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| attach_err(e.to_string()))?;
            link.pin(&link_path)
                .map_err(|e| attach_err(format!("pin {}: {e}", link_path.display())))?;
        } else {
            // A clsact filter stays with the device on its own; there is no
            // link to pin. Drop any filter of ours a retried ADD left, then
            // attach.
            // EEXIST when the device has one already; a real failure shows
            // up as the attach error below.
            let _ = tc::qdisc_add_clsact(&att.ifname);
            let _ =
                tc::qdisc_detach_program(&att.ifname, TcAttachType::Egress, PROGRAM_RAIL_EGRESS);
            let id = prog
                .attach_with_options(
                    &att.ifname,
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(tc::NlOptions::default()),
                )
                .map_err(|e| attach_err(format!("{e:#}")))?;
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            // Dropping the link would delete the filter: it must outlive us.
            std::mem::forget(link);
            // The filter holds the program; a pin under the same name a TCX
            // link would have keeps the pod's bookkeeping uniform (adoption
            // counts it, DEL and the sweep remove it).
            prog.pin(&link_path)
                .map_err(|e| attach_err(format!("pin {}: {e}", link_path.display())))?;
        }
        Ok(())
    }

    /// Detaches the program from `ifname` and forgets the rail's source
    /// entry. When no rail of the pod is left, removes the pod's pins.
    /// Best effort and idempotent: returns every error, keeps going.
    pub fn detach(&self, ifname: &str, ifindex: Option<u32>) -> Vec<String> {
        let mut errors = Vec::new();
        if ifindex.is_some() && self.attach_kind == TcAttach::Clsact {
            // clsact: the filter lives on the device, not in a pin. Err:
            // none there (a failed ADD's), or the device is going anyway.
            let _ = tc::qdisc_detach_program(ifname, TcAttachType::Egress, PROGRAM_RAIL_EGRESS);
        }
        match fs::remove_file(self.link_path(ifname)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("unpin link of {ifname}: {e}")),
        }
        if let Some(ifindex) = ifindex
            && let Ok(data) = MapData::from_pin(self.map_path(MAP_RAIL_SOURCES))
            && let Ok(map) = Map::from_map_data(data)
            && let Ok(mut sources) = HashMap::<_, u32, RailSource>::try_from(map)
        {
            let stale: Vec<u32> = sources
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| v.ifindex == ifindex)
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                if let Err(e) = sources.remove(&k) {
                    errors.push(format!("forget rail source of {ifname}: {e}"));
                }
            }
        }
        let links_left = fs::read_dir(self.dir.join("links"))
            .map(|d| d.count())
            .unwrap_or(0);
        if links_left == 0 {
            errors.extend(self.remove());
        }
        errors
    }

    /// Removes every pin of the pod (its links detach, its maps are freed).
    pub fn remove(&self) -> Vec<String> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => vec![],
            Err(e) if e.kind() == io::ErrorKind::NotFound => vec![],
            Err(e) => vec![format!("remove {}: {e}", self.dir.display())],
        }
    }

    /// The pod's counters summed over CPUs: (rail, verdict, packets), only
    /// the non-zero ones.
    pub fn counters(&self) -> Result<Vec<(u32, Verdict, u64)>, DataplaneError> {
        let err = |e: aya::maps::MapError| DataplaneError::Map {
            map: MAP_COUNTERS,
            why: e.to_string(),
        };
        let data = MapData::from_pin(self.map_path(MAP_COUNTERS)).map_err(err)?;
        let map = Map::from_map_data(data).map_err(err)?;
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(err)?;
        let mut out = Vec::new();
        for rail in 0..=railnet_common::MAX_RAIL {
            for verdict in Verdict::ALL {
                let per_cpu = counters
                    .get(&counter_index(rail, verdict), 0)
                    .map_err(err)?;
                let total: u64 = per_cpu.iter().sum();
                if total > 0 {
                    out.push((rail, verdict, total));
                }
            }
        }
        Ok(out)
    }
}

/// Programs rail `att` into the pod's maps: the netns it belongs to, the
/// RDMA CIDRs (merged across the pod's rails), the rail's source entry.
fn fill(ebpf: &mut aya::Ebpf, att: &RailAttachment) -> Result<(), DataplaneError> {
    let map_err = |map: &'static str| {
        move |e: aya::maps::MapError| DataplaneError::Map {
            map,
            why: e.to_string(),
        }
    };
    let mut meta: Array<_, Meta> = Array::try_from(ebpf.map_mut(MAP_META).expect("META in object"))
        .map_err(map_err(MAP_META))?;
    meta.set(
        0,
        Meta {
            layout_version: LAYOUT_VERSION,
            _pad: 0,
            netns_inode: att.netns.inode,
            netns_cookie: att.netns.cookie,
        },
        0,
    )
    .map_err(map_err(MAP_META))?;
    // RDMA CIDRs are network-level and the same for every rail; with
    // none, each rail's subnet is added. Merged across the pod's ADDs.
    let mut nets_map: Array<_, RdmaNets> =
        Array::try_from(ebpf.map_mut(MAP_RDMA_NETS).expect("RDMA_NETS in object"))
            .map_err(map_err(MAP_RDMA_NETS))?;
    let mut nets = nets_map.get(&0, 0).map_err(map_err(MAP_RDMA_NETS))?;
    let rdma: Vec<Ipv4Net> = if att.rdma_cidrs.is_empty() {
        vec![att.address.trunc()]
    } else {
        att.rdma_cidrs.iter().map(|c| c.trunc()).collect()
    };
    for net in &rdma {
        let added = nets.insert(Net4 {
            addr: ip_key(net.network()),
            mask: ip_key(net.netmask()),
        });
        if !added {
            return Err(DataplaneError::Map {
                map: MAP_RDMA_NETS,
                why: format!(
                    "more than {} IPv4 RDMA CIDRs across the pod's rails; merge them into fewer, wider CIDRs",
                    railnet_common::MAX_RDMA_CIDRS
                ),
            });
        }
    }
    nets_map.set(0, nets, 0).map_err(map_err(MAP_RDMA_NETS))?;
    let mut sources: HashMap<_, u32, RailSource> = HashMap::try_from(
        ebpf.map_mut(MAP_RAIL_SOURCES)
            .expect("RAIL_SOURCES in object"),
    )
    .map_err(map_err(MAP_RAIL_SOURCES))?;
    let subnet = att.address.trunc();
    let source = RailSource {
        ifindex: att.ifindex,
        rail: att.rail,
        gateway: att.gateway.map(ip_key).unwrap_or(0),
        subnet: ip_key(subnet.network()),
        mask: ip_key(subnet.netmask()),
        _pad: 0,
    };
    sources
        .insert(ip_key(att.address.addr()), source, 0)
        .map_err(map_err(MAP_RAIL_SOURCES))?;
    Ok(())
}

/// aya's `EbpfLoader::new()` parses the kernel's BTF (megabytes, ~30 ms
/// here) every time; ADD must not wait for it. A loader can load many
/// times (what differs per pod — the map pin paths — is set before each
/// load), so parsed loaders are kept and reused: after the first few ADDs,
/// none parses BTF again. At most [`KEPT_LOADERS`] are kept (each holds
/// the parsed BTF); more ADDs at once than that make their own.
fn with_loader<T>(f: impl FnOnce(&mut EbpfLoader<'static>) -> T) -> T {
    let mut loader = LOADERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_default();
    let out = f(&mut loader);
    let mut kept = LOADERS.lock().unwrap_or_else(|p| p.into_inner());
    if kept.len() < KEPT_LOADERS {
        kept.push(loader);
    }
    out
}

/// Parsed loaders kept for reuse.
const KEPT_LOADERS: usize = 4;

static LOADERS: std::sync::Mutex<Vec<EbpfLoader<'static>>> = std::sync::Mutex::new(Vec::new());

/// Parses one loader in the background, so the first ADD finds it ready.
pub fn warm_up() {
    // Err (no thread): the first ADD parses its own loader, a little later.
    let _ = std::thread::Builder::new()
        .name("railnet-loader".into())
        .spawn(|| {
            let loader = EbpfLoader::new();
            let mut kept = LOADERS.lock().unwrap_or_else(|p| p.into_inner());
            if kept.is_empty() {
                kept.push(loader);
            }
        });
}

/// How the rail program is attached to a rail interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// A clsact egress filter (direct action), its program pinned: no RCU
    /// wait on attach. Every kernel.
    #[default]
    Clsact,
    /// A TCX link, pinned (Linux 6.6+): the link owns the attachment, and
    /// other TCX programs on the device keep their order.
    Tcx,
}

impl TcAttach {
    /// `self`, if this kernel supports it.
    pub fn supported(self) -> Result<Self, String> {
        if self == TcAttach::Tcx && !tcx_supported() {
            return Err(
                "TCX needs Linux 6.6 or newer; use --tc-attach clsact on this kernel".into(),
            );
        }
        Ok(self)
    }
}

/// Whether this kernel attaches tc programs through TCX links (Linux 6.6+).
pub fn tcx_supported() -> bool {
    aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
        .unwrap_or(false)
}

/// One pod found under the pin root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedPod {
    /// Container ID (the directory name).
    pub container_id: String,
    /// The layout version its maps were created with; `None` if META is
    /// unreadable.
    pub layout_version: Option<u32>,
    /// Its netns, as recorded at ADD.
    pub netns: Option<NetnsId>,
    /// Interfaces with a pinned link.
    pub links: Vec<String>,
}

impl PodPins {
    /// The pod's META record.
    pub fn meta(&self) -> Option<Meta> {
        let data = MapData::from_pin(self.map_path(MAP_META)).ok()?;
        let map = Map::from_map_data(data).ok()?;
        let meta: Array<_, Meta> = Array::try_from(map).ok()?;
        meta.get(&0, 0).ok()
    }
}

/// Every pod with pins under `root` (what a restarted agent adopts).
pub fn pinned_pods(root: &Path) -> Vec<PinnedPod> {
    let Ok(dir) = fs::read_dir(root) else {
        return vec![];
    };
    let mut pods: Vec<PinnedPod> = dir
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| {
            let container_id = e.file_name().to_string_lossy().into_owned();
            let pins = PodPins::new(root, &container_id);
            let meta = pins.meta();
            let mut links: Vec<String> = fs::read_dir(pins.dir.join("links"))
                .map(|d| {
                    d.flatten()
                        .map(|l| l.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            links.sort();
            PinnedPod {
                container_id,
                layout_version: meta.map(|m| m.layout_version),
                netns: meta.map(|m| NetnsId {
                    inode: m.netns_inode,
                    cookie: m.netns_cookie,
                }),
                links,
            }
        })
        .collect();
    pods.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    pods
}

/// Removes the pins of every pod whose netns no longer exists (a pod
/// deleted without a DEL reaching us). Returns the container IDs removed.
pub fn sweep(root: &Path, live_netns: &LiveNetns) -> Vec<String> {
    let mut removed = Vec::new();
    for pod in pinned_pods(root) {
        let alive = match pod.netns {
            Some(id) if id.inode != 0 => live_netns.contains(id),
            // META not written yet: an ADD may be under way. Only pins
            // older than any ADD can take are removed.
            _ => fs::metadata(root.join(&pod.container_id))
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() < std::time::Duration::from_secs(300))
                .unwrap_or(false),
        };
        if !alive {
            let errors = PodPins::new(root, &pod.container_id).remove();
            if errors.is_empty() {
                removed.push(pod.container_id);
            } else {
                tracing::warn!(container = %pod.container_id, errors = ?errors, "sweep could not remove pins");
            }
        }
    }
    removed
}
