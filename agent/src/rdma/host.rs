//! What the agent does with RDMA devices on a node: isolate one into a pod
//! and give it back, find a PCI function's devices and a RoCE GID, read
//! port counters from inside a netns.

use super::{RdmaDevice, RdmaError, RdmaNetlink, RdmaPort};

/// One port of a device and its hardware counters (name, value).
pub type PortCounters = (RdmaPort, Vec<(String, u64)>);

/// The hardware counters of `device`'s ports as the network namespace at
/// `netns` sees them: read over an RDMA netlink socket opened inside it
/// (on a thread of its own), where an isolated device alone is visible.
pub fn counters_in(netns: &std::path::Path, device: &str) -> Result<Vec<PortCounters>, String> {
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    let device = device.to_owned();
    std::thread::Builder::new()
        .name("railnet-rdma-stat".into())
        .spawn(move || -> Result<Vec<PortCounters>, String> {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the pod's netns: {e}"))?;
            let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
            let dev = nl.device(&device).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for port in nl.ports(&dev).map_err(|e| e.to_string())? {
                let counters = nl.counters(&dev, port.port).map_err(|e| e.to_string())?;
                out.push((port, counters));
            }
            Ok(out)
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the reading thread panicked".to_owned())?
}

/// The RDMA devices of a PCI function (`<sysfs>/bus/pci/devices/<bdf>/infiniband/`).
pub fn devices_of_pci(sysfs: &std::path::Path, bdf: &str) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(sysfs.join("bus/pci/devices").join(bdf).join("infiniband"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
    names.sort();
    names
}

/// The index of the RoCE GID the kernel derived from `addr` on a port
/// (`::ffff:a.b.c.d`), preferring RoCE v2, as seen in the host's sysfs.
/// The GID table follows address changes through a workqueue, so this
/// waits up to a second for the entry to appear.
pub fn roce_gid_index(device: &str, port: u32, addr: std::net::Ipv4Addr) -> Option<u32> {
    roce_gid_index_at(std::path::Path::new("/sys"), device, port, addr)
}

/// [`roce_gid_index`] of a device the network namespace `netns` sees — an
/// isolated device, which the host's sysfs no longer shows. Sysfs shows
/// the RDMA devices of the netns that mounted it, so a thread of its own
/// takes a private mount namespace, enters `netns`, mounts a sysfs of its
/// own over `/sys` and reads that; the mount goes with the thread and
/// never reaches the host's mounts (`/` is made private first).
pub fn roce_gid_index_in(
    netns: std::os::fd::BorrowedFd<'_>,
    device: &str,
    port: u32,
    addr: std::net::Ipv4Addr,
) -> Result<Option<u32>, String> {
    use nix::{
        mount::{MsFlags, mount},
        sched::{CloneFlags, setns, unshare},
    };
    let ns = netns
        .try_clone_to_owned()
        .map_err(|e| format!("dup netns fd: {e}"))?;
    let device = device.to_owned();
    std::thread::Builder::new()
        .name("railnet-rdma-gid".into())
        .spawn(move || -> Result<Option<u32>, String> {
            unshare(CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("a private mount namespace: {e}"))?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| format!("making / private: {e}"))?;
            setns(ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the pod's netns: {e}"))?;
            match mount(
                Some("sysfs"),
                "/sys",
                Some("sysfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            ) {
                // The kernel refuses to mount a superblock again where it
                // is already mounted: `/sys` is already this netns's view.
                Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
                Err(e) => return Err(format!("mounting the pod netns's sysfs: {e}")),
            }
            Ok(roce_gid_index_at(
                std::path::Path::new("/sys"),
                &device,
                port,
                addr,
            ))
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the reading thread panicked".to_owned())?
}

/// [`roce_gid_index`] under the sysfs mounted at `sysfs`.
fn roce_gid_index_at(
    sysfs: &std::path::Path,
    device: &str,
    port: u32,
    addr: std::net::Ipv4Addr,
) -> Option<u32> {
    let dir = sysfs.join(format!("class/infiniband/{device}/ports/{port}"));
    let want = addr.to_ipv6_mapped();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let mut found: Option<(u32, bool)> = None;
        if let Ok(entries) = std::fs::read_dir(dir.join("gids")) {
            for e in entries.flatten() {
                let Ok(index) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let gid = std::fs::read_to_string(e.path()).unwrap_or_default();
                let Ok(gid) = gid.trim().parse::<std::net::Ipv6Addr>() else {
                    continue;
                };
                if gid != want {
                    continue;
                }
                let v2 = std::fs::read_to_string(dir.join(format!("gid_attrs/types/{index}")))
                    .map(|t| t.trim() == "RoCE v2")
                    .unwrap_or(false);
                if found.is_none_or(|(_, had_v2)| v2 && !had_v2) {
                    found = Some((index, v2));
                }
            }
        }
        if let Some((index, _)) = found {
            return Some(index);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits up to `wait` for the RDMA device of PCI function `bdf` to be in
/// the calling thread's netns (one returned by a dead pod netns comes back
/// asynchronously) and renames it to `name` if it came back as another.
/// Returns whether it renamed.
pub fn restore_name(
    sysfs: &std::path::Path,
    bdf: &str,
    name: &str,
    wait: std::time::Duration,
) -> Result<bool, String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(current) = devices_of_pci(sysfs, bdf).into_iter().next() {
            if current == name {
                return Ok(false);
            }
            let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
            let dev = nl.device(&current).map_err(|e| e.to_string())?;
            nl.rename_device(&dev, name).map_err(|e| e.to_string())?;
            tracing::info!(from = %current, to = %name, pci = %bdf, "RDMA device back under its own name");
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the RDMA device of {bdf} ({name}) did not come back to the host within {} s",
                wait.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Device moves are serialized on a node: the kernel reassigns a device's
/// clients on each move, and DEL's "wait for it to come back" must not
/// see another pod's device come and go.
static MOVES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Moves `device` (seen from the calling thread's netns, the host's) into
/// `pod`.
pub fn isolate(device: &RdmaDevice, pod: &crate::netns::PodNetns) -> Result<(), RdmaError> {
    let _serial = MOVES.lock().unwrap_or_else(|e| e.into_inner());
    use std::os::fd::AsRawFd;
    RdmaNetlink::open()?.move_device(device, pod.fd().as_raw_fd())
}

/// Moves every RDMA device in `pod` whose port's netdev is `ifname` back to
/// the calling thread's netns (the host's), from a socket opened inside the
/// pod (the kernel looks the device up in the sender's netns), then waits
/// for each to be listed in the host again. Returns the devices moved.
pub fn give_back(pod: &crate::netns::PodNetns, ifname: &str) -> Result<Vec<String>, String> {
    let _serial = MOVES.lock().unwrap_or_else(|e| e.into_inner());
    let host = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("opening the host netns: {e}"))?;
    let ifname = ifname.to_owned();
    let moved = pod
        .run(move || -> Result<Vec<String>, String> {
            use std::os::fd::AsRawFd;
            let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
            let mut moved = Vec::new();
            for dev in nl.devices().map_err(|e| e.to_string())? {
                let ports = nl.ports(&dev).map_err(|e| e.to_string())?;
                if ports
                    .iter()
                    .any(|p| p.netdev.as_deref() == Some(ifname.as_str()))
                {
                    nl.move_device(&dev, host.as_raw_fd())
                        .map_err(|e| e.to_string())?;
                    moved.push(dev.name);
                }
            }
            Ok(moved)
        })
        .map_err(|e| e.to_string())??;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut nl = RdmaNetlink::open().map_err(|e| e.to_string())?;
    loop {
        let here = nl.devices().map_err(|e| e.to_string())?;
        let missing: Vec<&String> = moved
            .iter()
            .filter(|m| !here.iter().any(|d| &d.name == *m))
            .collect();
        if missing.is_empty() {
            return Ok(moved);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "RDMA devices {missing:?} did not reappear in the host within 10 s"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
