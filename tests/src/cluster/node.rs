//! A test node: a network namespace (a [`crate::RailFabric`] node, its rail
//! NICs cabled to the rail routers), a mount namespace of its own that
//! binds per-node directories over the paths kubelet, containerd, Multus
//! and railnet use (several of them ignore any root-dir setting), a bpffs
//! of its own, a cgroup of its own, and its containerd and kubelet.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{NodeCgroup, Pki, Tools};
use crate::{Netns, sh};

/// Host paths each node gets its own copy of (bound over them in its mount
/// namespace), with the directory name under the node's root.
pub const NODE_PATHS: &[(&str, &str)] = &[
    ("/var/lib/kubelet", "var-lib-kubelet"),
    ("/var/log/pods", "var-log-pods"),
    ("/var/log/containers", "var-log-containers"),
    ("/etc/cni/net.d", "etc-cni-net.d"),
    ("/opt/cni/bin", "opt-cni-bin"),
    ("/var/lib/cni", "var-lib-cni"),
    ("/run/railnet", "run-railnet"),
    ("/var/lib/railnet", "var-lib-railnet"),
    ("/var/lib/containerd", "var-lib-containerd"),
    ("/run/containerd", "run-containerd"),
    // containerd pins pod netns here; the agent watches it.
    ("/run/netns", "run-netns"),
    // CDI specs, where containerd reads them (/var/run/cdi).
    ("/run/cdi", "run-cdi"),
    // The stand-in VFs' sysfs tree (see `Node::add_stand_in_vfs`).
    (STAND_IN_SYSFS, "stand-in-sysfs"),
];

/// Where a node's stand-in VFs are described as sysfs lays out PCI devices
/// (`bus/pci/devices/<bdf>/net/<netdev>`, `physfn`, `virtfn<n>`): no
/// machine here has SR-IOV, so the agent is pointed at this tree
/// (`RAILNET_SYSFS_ROOT`, through the chart's `agent.extraEnv`).
pub const STAND_IN_SYSFS: &str = "/var/lib/railnet-test-sysfs";

/// Rail `k`'s stand-in NIC: its PCIe root complex, PCI address and NUMA
/// node. Rails 2k-1 and 2k share a root, as two NICs behind one PCIe
/// switch beside two GPUs do.
pub fn stand_in_nic(k: u32) -> (&'static str, String, u32) {
    let (root, bus) = match (k - 1) / 2 {
        0 => ("pci0000:3a", 0x3b),
        1 => ("pci0000:5d", 0x5e),
        2 => ("pci0000:9a", 0x9b),
        _ => ("pci0000:c3", 0xc4),
    };
    let bdf = format!("0000:{:02x}:00.0", bus + (k - 1) % 2);
    (root, bdf, u32::from(k > 4))
}

/// Lays PCI function `bdf` out under `sysfs` as the kernel does: its
/// directory under its root complex (with its NUMA node), and
/// `bus/pci/devices/<bdf>` linking there. Returns the link's target,
/// relative to a directory three levels under `sysfs` (as `class/net/<dev>`).
fn stand_in_function(sysfs: &Path, root: &str, bdf: &str, numa: u32) -> String {
    let function = sysfs.join("devices").join(root).join(bdf);
    std::fs::create_dir_all(&function).unwrap();
    std::fs::write(function.join("numa_node"), format!("{numa}\n")).unwrap();
    let bus = sysfs.join("bus/pci/devices");
    std::fs::create_dir_all(&bus).unwrap();
    let target = format!("../../../devices/{root}/{bdf}");
    std::os::unix::fs::symlink(&target, bus.join(bdf)).unwrap();
    target
}

/// The stand-in GPUs of every node (`gpu0`…: PCIe root, NUMA node, PCI
/// address), as an 8-GPU node's driver would publish half of them: one per
/// root complex, each root shared with two rail NICs ([`stand_in_nic`]),
/// the GPU two buses past the root's first NIC.
pub const STAND_IN_GPUS: &[(&str, u32, &str)] = &[
    ("pci0000:3a", 0, "0000:3d:00.0"),
    ("pci0000:5d", 0, "0000:60:00.0"),
    ("pci0000:9a", 1, "0000:9d:00.0"),
    ("pci0000:c3", 1, "0000:c6:00.0"),
];

/// The reference plugins a node's CNI bin dir holds besides Multus.
const REFERENCE_PLUGINS: &[&str] = &["bridge", "host-local", "loopback", "macvlan", "portmap"];

/// One node.
pub struct Node {
    /// Its Kubernetes name (`node0`, `node1`, …).
    pub name: String,
    /// Its address on the management network (the kubelet's node IP).
    pub ip: String,
    /// Its pod CIDR on the primary network (`10.244.<n>.0/24`).
    pub pod_cidr: String,
    root: PathBuf,
    holder: Child,
    cgroup: NodeCgroup,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    device_plugin: Option<Child>,
    gpu_driver: Option<Child>,
}

impl Node {
    /// Makes the node's namespaces and directories (nothing runs yet but
    /// the process holding its mount namespace).
    #[track_caller]
    pub fn prepare(
        index: usize,
        net: &Netns,
        ip: &str,
        cluster_dir: &Path,
        cgroup_name: &str,
        tools: &Tools,
    ) -> Self {
        let name = format!("node{index}");
        let root = cluster_dir.join(&name);
        for (_, dir) in NODE_PATHS {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let cgroup = NodeCgroup::create(cgroup_name);
        // The holder: a process in the node's netns and a new mount
        // namespace whose mounts receive the host's but send none back.
        let mut cmd = net.command("unshare");
        cmd.args(["--mount", "--propagation", "slave", "sleep", "infinity"])
            .stdin(Stdio::null());
        cgroup.start_inside(&mut cmd);
        let holder = cmd.spawn().expect("unshare (util-linux)");
        let mut node = Self {
            name,
            ip: ip.to_owned(),
            pod_cidr: format!("10.244.{index}.0/24"),
            root,
            holder,
            cgroup,
            containerd: None,
            kubelet: None,
            device_plugin: None,
            gpu_driver: None,
        };
        node.wait_holder();
        for (host, dir) in NODE_PATHS {
            node.in_mounts("mount")
                .arg("--bind")
                .arg(node.root.join(dir))
                .arg(host)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .unwrap_or_else(|| panic!("binding {dir} over {host} in {}", node.name));
        }
        sh(node
            .in_mounts("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
        // As on a systemd host: the node's mounts are shared among its own
        // mount namespaces (containers' HostToContainer mounts need that),
        // still slaves of the host's, never sending it anything.
        sh(node.in_mounts("mount").args(["--make-rshared", "/"]));
        let bin = node.root.join("opt-cni-bin");
        for plugin in REFERENCE_PLUGINS {
            std::os::unix::fs::symlink(tools.cni_plugins.join(plugin), bin.join(plugin)).unwrap();
        }
        std::os::unix::fs::symlink(&tools.multus, bin.join("multus")).unwrap();
        if let Some(wb) = &tools.whereabouts {
            std::os::unix::fs::symlink(wb, bin.join("whereabouts")).unwrap();
            // Its flat file, which it will not run without (its DaemonSet
            // writes the same): the API server through Multus's identity.
            let conf = node.root.join("etc-cni-net.d/whereabouts.d");
            std::fs::create_dir_all(&conf).unwrap();
            std::fs::write(
                conf.join("whereabouts.conf"),
                serde_json::json!({
                    "datastore": "kubernetes",
                    "kubernetes": {"kubeconfig": "/etc/cni/net.d/multus.d/multus.kubeconfig"},
                })
                .to_string(),
            )
            .unwrap();
        }
        node
    }

    /// Waits until the holder has its own mount namespace (`unshare` has
    /// exec'd `sleep`): mounting before would change the host's.
    #[track_caller]
    fn wait_holder(&mut self) {
        let pid = self.holder.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let mine = std::fs::read_link("/proc/self/ns/mnt").ok();
            let its = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            if comm.trim() == "sleep" && its.is_some() && its != mine {
                return;
            }
            if let Ok(Some(status)) = self.holder.try_wait() {
                panic!("{}'s namespace holder exited with {status}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{}'s mount namespace did not appear",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A command run in the node's mount and network namespaces.
    pub fn in_mounts(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "-n", "--"])
            .arg(program);
        cmd
    }

    /// A host path as the node sees it (its own copy when bound).
    pub fn path(&self, host: &str) -> PathBuf {
        for (h, dir) in NODE_PATHS {
            if let Ok(rest) = Path::new(host).strip_prefix(h) {
                return self.root.join(dir).join(rest);
            }
        }
        PathBuf::from(host)
    }

    /// Writes the primary network (Multus delegating to the reference
    /// bridge on the node's `cbr0`) and Multus's kubeconfig.
    pub fn write_cni_config(&self, multus_kubeconfig: &Path, pod_gateway: &str) {
        let dir = self.path("/etc/cni/net.d");
        std::fs::create_dir_all(dir.join("multus.d")).unwrap();
        std::fs::copy(multus_kubeconfig, dir.join("multus.d/multus.kubeconfig")).unwrap();
        let conf = serde_json::json!({
            "cniVersion": "0.3.1",
            "name": "multus-cni-network",
            "type": "multus",
            "kubeconfig": "/etc/cni/net.d/multus.d/multus.kubeconfig",
            // A pod may name only its own namespace's NADs and railnet's
            // (the release namespace, where the administrator's are): the
            // multi-tenancy model the README asks of Multus.
            "namespaceIsolation": true,
            "globalNamespaces": super::NS,
            "delegates": [{
                "cniVersion": "0.3.1",
                "name": "podnet",
                "type": "bridge",
                "bridge": "cbr0",
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": self.pod_cidr,
                        "rangeStart": self.pod_cidr.replace(".0/24", ".10"),
                        "gateway": pod_gateway,
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        });
        // containerd loads one conf file (the first by name): Multus's.
        std::fs::write(dir.join("00-multus.conf"), conf.to_string()).unwrap();
    }

    /// Starts containerd and waits for its socket.
    #[track_caller]
    pub fn start_containerd(&mut self, tools: &Tools) {
        let config = self.root.join("containerd.toml");
        std::fs::write(
            &config,
            r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  # Built here and imported: nothing is ever pulled.
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "registry.k8s.io/pause:3.10.2"
[plugins.'io.containerd.cri.v1.runtime']
  # These machines' root lacks CAP_SYS_RESOURCE: nothing may lower an OOM
  # score, and kubelet asks -998 for every sandbox. Kept at containerd's
  # own score instead (as for rootless containerd).
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#,
        )
        .unwrap();
        let log = std::fs::File::create(self.root.join("containerd.log")).unwrap();
        let mut cmd = self.in_mounts(tools.containerd.join("containerd"));
        cmd.arg("--config")
            .arg(&config)
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    tools.containerd.display()
                ),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.cgroup.start_inside(&mut cmd);
        self.containerd = Some(cmd.spawn().expect("containerd"));
        let sock = self.path("/run/containerd/containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "{}'s containerd did not start:\n{}",
                self.name,
                self.log("containerd")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Imports an OCI archive into the node's containerd (CRI's namespace).
    #[track_caller]
    pub fn import_image(&self, tools: &Tools, archive: &Path) {
        sh(self
            .in_mounts(tools.containerd.join("ctr"))
            .args([
                "--address",
                "/run/containerd/containerd.sock",
                "-n",
                "k8s.io",
                "images",
                "import",
            ])
            .arg(archive));
    }

    /// Starts kubelet (the caller waits for the Node to be Ready).
    #[track_caller]
    pub fn start_kubelet(&mut self, tools: &Tools, kubeconfig: &Path, pki: &Pki) {
        let config = self.root.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# These machines mount cgroup v1.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: {ip}
readOnlyPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
serializeImagePulls: false
maxPods: 200
nodeStatusUpdateFrequency: 4s
"#,
                cgroup_root = self.cgroup.pods_root(),
                ip = self.ip,
                ca = pki.file("ca.crt").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.root.join("kubelet.log")).unwrap();
        let mut cmd = self.in_mounts(tools.kube("kubelet"));
        cmd.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--hostname-override={}", self.name))
            .arg(format!("--node-ip={}", self.ip))
            .arg("--v=1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.cgroup.start_inside(&mut cmd);
        self.kubelet = Some(cmd.spawn().expect("kubelet"));
    }

    /// Describes the node's rail NICs `eth1`…`eth<rails>` in
    /// [`STAND_IN_SYSFS`] as PCI functions the way sysfs lays them out on
    /// an 8-GPU node: two NICs per PCIe root complex
    /// ([`stand_in_nic`]), the first four rails on NUMA node 0.
    pub fn add_stand_in_nics(&self, rails: u32) {
        let sysfs = self.path(STAND_IN_SYSFS);
        for k in 1..=rails {
            let (root, bdf, numa) = stand_in_nic(k);
            let target = stand_in_function(&sysfs, root, &bdf, numa);
            let class = sysfs.join("class/net").join(format!("eth{k}"));
            std::fs::create_dir_all(&class).unwrap();
            std::fs::write(class.join("type"), "1\n").unwrap();
            std::os::unix::fs::symlink(&target, class.join("device")).unwrap();
        }
    }

    /// Makes `count` stand-in VFs of the node's rail-`rail` NIC: veths
    /// named `r<rail>vf<i>` in the node whose other ends are ports of the
    /// rail router's bridge (where a VF's traffic reaches the rail switch),
    /// described in [`STAND_IN_SYSFS`] as sysfs lays VFs out: functions
    /// `<NIC's bus>:00.<i+1>` under the NIC's root complex, each with its
    /// netdev under `net/` and a `physfn` link, the NIC with `virtfn<i>`
    /// links. With `rdma`, each VF also has an RDMA device
    /// `mlx5_<10·rail+i>` and its verbs device `uverbs<10·rail+i>` (char
    /// 231:192+…), and the node an `rdma_cm` (char 10:58), as a node with
    /// mlx5 VFs does. Returns their PCI addresses and netdev names.
    #[track_caller]
    pub fn add_stand_in_vfs(
        &self,
        net: &Netns,
        router: &Netns,
        index: usize,
        rail: u32,
        count: usize,
        rdma: bool,
    ) -> Vec<(String, String)> {
        let sysfs = self.path(STAND_IN_SYSFS);
        let (root, pf, numa) = stand_in_nic(rail);
        let pf_dir = sysfs.join("devices").join(root).join(&pf);
        std::fs::create_dir_all(pf_dir.join("net").join(format!("eth{rail}"))).unwrap();
        let mut vfs = Vec::new();
        for i in 0..count {
            let bdf = format!("{}.{}", &pf[..pf.len() - 2], i + 1);
            let vf = format!("r{rail}vf{i}");
            let port = format!("n{index}r{rail}vf{i}");
            crate::veth_between(net, &vf, router, &port);
            router.ip(&["link", "set", &port, "master", "br0", "up"]);
            stand_in_function(&sysfs, root, &bdf, numa);
            let dir = sysfs.join("devices").join(root).join(&bdf);
            std::fs::create_dir_all(dir.join("net").join(&vf)).unwrap();
            std::os::unix::fs::symlink(format!("../{pf}"), dir.join("physfn")).unwrap();
            std::os::unix::fs::symlink(format!("../{bdf}"), pf_dir.join(format!("virtfn{i}")))
                .unwrap();
            if rdma {
                let n = 10 * rail + i as u32;
                std::fs::create_dir_all(dir.join("infiniband").join(format!("mlx5_{n}"))).unwrap();
                let verbs = dir.join("infiniband_verbs").join(format!("uverbs{n}"));
                std::fs::create_dir_all(&verbs).unwrap();
                std::fs::write(verbs.join("dev"), format!("231:{}\n", 192 + n)).unwrap();
                let cm = sysfs.join("class/misc/rdma_cm");
                std::fs::create_dir_all(&cm).unwrap();
                std::fs::write(cm.join("dev"), "10:58\n").unwrap();
            }
            vfs.push((bdf, vf));
        }
        // The router's ports forward once a pod sets its VF up (no carrier
        // before): the bridge learns that within a second.
        vfs
    }

    /// Starts the tests' device plugin advertising `devices` (PCI
    /// addresses) as `resource`; the caller waits for the node to list it.
    #[track_caller]
    pub fn start_device_plugin(&mut self, tools: &Tools, resource: &str, devices: &[String]) {
        let log = std::fs::File::create(self.root.join("device-plugin.log")).unwrap();
        let mut cmd = self.in_mounts(&tools.device_plugin);
        cmd.arg(format!("--resource={resource}"))
            .arg(format!("--devices={}", devices.join(",")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.cgroup.start_inside(&mut cmd);
        self.device_plugin = Some(cmd.spawn().expect("the tests' device plugin"));
    }

    /// Starts the tests' GPU driver publishing [`STAND_IN_GPUS`] through
    /// the kubelet's identity (`kubeconfig`: a node may publish its own
    /// ResourceSlices and read the claims of its pods).
    #[track_caller]
    pub fn start_gpu_driver(&mut self, tools: &Tools, kubeconfig: &Path) {
        let log = std::fs::File::create(self.root.join("gpu-driver.log")).unwrap();
        let gpus: Vec<String> = STAND_IN_GPUS
            .iter()
            .map(|(root, numa, bdf)| format!("{root}/{numa}/{bdf}"))
            .collect();
        let mut cmd = self.in_mounts(&tools.gpu_driver);
        cmd.arg(format!("--node={}", self.name))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg(format!("--gpus={}", gpus.join(",")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.cgroup.start_inside(&mut cmd);
        self.gpu_driver = Some(cmd.spawn().expect("the tests' GPU driver"));
    }

    /// Stops kubelet and containerd (pods keep running in their cgroups:
    /// a node whose agents died, as the sweep tests need).
    pub fn stop_kubelet_and_containerd(&mut self) {
        for child in [
            self.gpu_driver.take(),
            self.device_plugin.take(),
            self.kubelet.take(),
            self.containerd.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A log of the node's (`kubelet`, `containerd`).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Whether kubelet still runs.
    pub fn kubelet_alive(&mut self) -> Result<(), String> {
        match self.kubelet.as_mut().map(|k| k.try_wait()) {
            Some(Ok(Some(status))) => Err(format!(
                "{}'s kubelet exited with {status}:\n{}",
                self.name,
                tail(&self.log("kubelet"), 30)
            )),
            _ => Ok(()),
        }
    }

    /// Ends everything the node runs (kubelet, containerd, shims, pods: all
    /// in its cgroup) and with it its mount namespace and pod netns.
    pub fn stop(&mut self) {
        self.stop_kubelet_and_containerd();
        self.cgroup.kill_all_and_remove();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }

    /// What the node failed to remove.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        self.cgroup.leftovers()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
