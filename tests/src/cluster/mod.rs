//! A real Kubernetes cluster for tests, from pinned upstream builds (`cargo
//! xtask setup`): etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler in a control-plane netns; per node a [`Node`] — a
//! [`RailFabric`] node with eight rail NICs on the rail routers, its own
//! mount namespace, bpffs and cgroup, containerd, kubelet and Multus.
//!
//! Addresses, all inside namespaces made here (the root namespace gets
//! none): management network 10.250.0.0/24 (API server .1, node n .10+n) on
//! a bridge in the control-plane netns; pods' primary network 10.244.n.0/24
//! on node n's `cbr0` (Multus → reference bridge + host-local), routed
//! from the control plane so the API server reaches webhook pods; rail K
//! 172.16.K.0/24 with a /27 per node (node n: 172.16.K.32n/27, gateway
//! .32n+1 on rail K's router, the node's NIC .32n+30) — the seeds' Solution 2.
//!
//! Everything is stopped and removed on drop, also when a test fails:
//! the nodes' processes by their cgroups, the control plane's by PID, the
//! nodes' mounts with their mount namespaces, the cgroups, the netns.

mod cgroup;
mod control_plane;
mod node;
mod pki;
mod railnet;
mod tools;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

pub use cgroup::NodeCgroup;
pub use control_plane::{ControlPlane, KUBERNETES_SERVICE_IP, SERVICE_RANGE};
pub use node::{NODE_PATHS, Node, STAND_IN_GPUS, STAND_IN_SYSFS, stand_in_nic, tail};
pub use pki::Pki;
pub use railnet::{
    NS, VF_NETWORK, WORKLOAD, helm_install, networks_pod, rail_addresses, rail_pod, values, vf_pod,
    wait_running,
};
pub use tools::Tools;
pub(crate) use tools::var as tool_path;

use serde_json::Value;

use crate::{Netns, RailFabric, ScratchDir, sh, veth_between};

/// The API server's address on the management network.
pub const API_IP: &str = "10.250.0.1";
/// The rails every node has.
pub const RAILS: u32 = 8;
/// The extended resource the tests' device plugin advertises: each node's
/// stand-in VFs of its rail-1 NIC ([`Node::add_stand_in_vfs`]).
pub const VF_RESOURCE: &str = "railnet.io/rail1-vf";
/// Stand-in VFs per node.
pub const VFS_PER_NODE: usize = 2;
/// The rail whose NIC's VFs (as many as rail 1's, with RDMA devices) no
/// device plugin serves: the DRA stage claims them.
pub const DRA_VF_RAIL: u32 = 2;
/// The prefix of every cgroup a test cluster makes (leftovers are found by it).
const CGROUP_PREFIX: &str = "railnet-cluster-";
/// Kernel settings kubelet rewrites at start (a kernel oops would then
/// reboot the machine): saved before, put back once the nodes are up and
/// at teardown.
const KUBELET_SYSCTLS: &[&str] = &[
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// What a running test cluster must put back on the host — the kernel
/// settings kubelet rewrites, the mount-point directories it created —
/// written before changing either, so that a run that was killed (no
/// teardown) is undone by the next one. On tmpfs: a reboot undoes it too.
const HOST_STATE: &str = "/run/railnet-test-cluster.json";

/// Puts back what a killed cluster left (its [`HOST_STATE`]), when the
/// process that wrote it is gone.
fn restore_host_state_of_dead_run() {
    let Ok(text) = std::fs::read_to_string(HOST_STATE) else {
        return;
    };
    let state: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let owner = state["pid"].as_u64().unwrap_or(0);
    if owner != 0 && Path::new(&format!("/proc/{owner}")).exists() {
        panic!(
            "another test cluster (pid {owner}) is running: one at a time (they share kubelet's fixed paths)"
        );
    }
    for (k, v) in state["sysctls"].as_object().into_iter().flatten() {
        eprintln!("cluster: putting back {k} = {v} (an earlier run was killed)");
        let _ = std::fs::write(format!("/proc/sys/{k}"), v.as_str().unwrap_or_default());
    }
    for d in state["created_dirs"].as_array().into_iter().flatten() {
        if let Some(d) = d.as_str() {
            let _ = std::fs::remove_dir(d);
        }
    }
    let _ = std::fs::remove_file(HOST_STATE);
}

/// Node `n`'s management address.
pub fn node_ip(n: usize) -> String {
    format!("10.250.0.{}", 10 + n)
}

/// Node `n`'s subnet on rail `k` (the seeds' Solution 2: a /27 per node
/// per rail), its gateway (on the rail router) and the node NIC's address.
pub fn rail_subnet(k: u32, n: usize) -> (String, String, String) {
    let base = 32 * n;
    (
        format!("172.16.{k}.{base}/27"),
        format!("172.16.{k}.{}", base + 1),
        format!("172.16.{k}.{}", base + 30),
    )
}

/// A running test cluster.
pub struct Cluster {
    /// The nodes, `node0`…
    pub nodes: Vec<Node>,
    control: ControlPlane,
    /// The control plane's netns (kubectl and helm run in it).
    pub cp: Netns,
    /// The rail fabric the nodes are part of.
    pub fabric: RailFabric,
    /// The components.
    pub tools: Tools,
    /// The cluster's PKI.
    pub pki: Pki,
    admin: PathBuf,
    created_dirs: Vec<PathBuf>,
    saved_sysctls: Vec<(String, String)>,
    dir: ScratchDir,
}

/// Whether `name` (`<prefix><pid>-…`, as [`crate::unique`] and the cluster's
/// cgroups name things) belongs to a test process that is gone.
fn of_dead_process(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|r| r.split('-').next())
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Finds what an earlier cluster left (its cgroups, with processes in
/// them) and removes it; panics naming what it cannot remove.
#[track_caller]
fn clean_leftovers() {
    let mut stale = Vec::new();
    for e in std::fs::read_dir("/sys/fs/cgroup/pids")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(CGROUP_PREFIX) {
            let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
            // Only a cluster of a test process that is gone is a leftover.
            let owner_alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !owner_alive {
                stale.push(name);
            }
        }
    }
    for name in stale {
        let cg = NodeCgroup::adopt(&name);
        eprintln!("cluster: removing the leftover cgroup /{name} and its processes");
        cg.kill_all_and_remove();
        let left = cg.leftovers();
        assert!(
            left.is_empty(),
            "an earlier test cluster left cgroups that cannot be removed: {left:?} (end the processes in them, then rmdir)"
        );
    }
    // Network namespaces of test processes that are gone (`unique` names
    // them rn<pid>-…): a killed test cannot delete its own.
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if of_dead_process(&name, "rn") {
            eprintln!("cluster: removing the leftover netns {name}");
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
    // Scratch directories of such processes (`ScratchDir`, named alike).
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with("-cluster") && of_dead_process(&name, "rn") {
            eprintln!(
                "cluster: removing the leftover directory {}",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    // `ip netns` itself makes /run/netns a mount point on the host.
    for (host, _) in NODE_PATHS.iter().filter(|(h, _)| *h != "/run/netns") {
        assert!(
            !mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(host)),
            "{host} is a mount point in the host's mount namespace: a test cluster never mounts there, so something else does — unmount it before running the cluster tests"
        );
    }
}

fn read_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{key}"))
        .ok()
        .map(|v| v.trim().to_owned())
}

/// Fails at once, saying why, when the disk the nodes keep their state on
/// is nearly full: their kubelets then evict pods (DiskPressure, below 1 %
/// free), which otherwise shows up minutes later as a `helm install` that
/// timed out with the controller's pods evicted.
#[track_caller]
fn assert_disk_room(path: &std::path::Path) {
    let Ok(st) = nix::sys::statvfs::statvfs(path) else {
        return;
    };
    let gb = |blocks: u64| (blocks as f64) * (st.fragment_size() as f64) / 1e9;
    let (free, size) = (gb(st.blocks_available()), gb(st.blocks()));
    let need = (size * 0.02).max(3.0);
    assert!(
        free >= need,
        "only {free:.1} GB free on the filesystem of {} (of {size:.0} GB): the test nodes' kubelets evict pods when it runs low; free at least {need:.1} GB (old target/ directories, clones) and run again",
        path.display()
    );
}

impl Cluster {
    /// Starts a cluster of `nodes` nodes and waits until every node is
    /// Ready.
    #[track_caller]
    pub fn start(nodes: usize) -> Self {
        let tools = Tools::from_env();
        restore_host_state_of_dead_run();
        clean_leftovers();
        let dir = ScratchDir::new("cluster");
        assert_disk_room(dir.path());
        let fabric = RailFabric::new(nodes, RAILS);
        for k in 1..=RAILS {
            let r = fabric.router(k);
            // Pods of different nodes reach each other through the router
            // on one bridge: no redirects telling them to go direct.
            r.sysctl("net.ipv4.conf.all.send_redirects", "0");
            r.sysctl("net.ipv4.conf.br0.send_redirects", "0");
            for n in 0..nodes {
                let (subnet, gw, nic) = rail_subnet(k, n);
                let len = subnet.rsplit('/').next().unwrap();
                r.ip(&["addr", "add", &format!("{gw}/{len}"), "dev", "br0"]);
                fabric.nodes[n].ip(&[
                    "addr",
                    "add",
                    &format!("{nic}/{len}"),
                    "dev",
                    &format!("eth{k}"),
                ]);
            }
        }
        let cp = Netns::new("cp");
        cp.ip(&["link", "add", "mgmt", "type", "bridge"]);
        cp.ip(&["addr", "add", &format!("{API_IP}/24"), "dev", "mgmt"]);
        cp.ip(&["link", "set", "mgmt", "up"]);
        for (n, node) in fabric.nodes.iter().enumerate() {
            let port = format!("m{n}");
            veth_between(node, "mgmt0", &cp, &port);
            cp.ip(&["link", "set", &port, "master", "mgmt", "up"]);
            node.ip(&["addr", "add", &format!("{}/24", node_ip(n)), "dev", "mgmt0"]);
            node.ip(&["link", "set", "mgmt0", "up"]);
            node.sysctl("net.ipv4.ip_forward", "1");
            cp.ip(&[
                "route",
                "add",
                &format!("10.244.{n}.0/24"),
                "via",
                &node_ip(n),
            ]);
            for m in (0..fabric.nodes.len()).filter(|&m| m != n) {
                node.ip(&[
                    "route",
                    "add",
                    &format!("10.244.{m}.0/24"),
                    "via",
                    &node_ip(m),
                ]);
            }
        }
        cp.wait_bridge_ports_forwarding();

        let pki = Pki::new(&dir.path().join("pki"), API_IP, KUBERNETES_SERVICE_IP);
        let admin = pki.client("admin", "admin", &["system:masters"]);
        let cgroup_base = format!("{CGROUP_PREFIX}{}", std::process::id());
        let control = ControlPlane::start(
            &cp,
            NodeCgroup::create(&format!("{cgroup_base}-cp")),
            API_IP,
            &tools,
            &pki,
            dir.path(),
        );
        let saved_sysctls = KUBELET_SYSCTLS
            .iter()
            .filter_map(|k| read_sysctl(k).map(|v| (k.to_string(), v)))
            .collect();
        let mut cluster = Self {
            nodes: Vec::new(),
            control,
            cp,
            fabric,
            tools,
            pki,
            admin,
            created_dirs: Vec::new(),
            saved_sysctls,
            dir,
        };
        cluster.make_mount_points();
        cluster.write_host_state();
        cluster.wait_api();
        cluster.bootstrap();
        for n in 0..nodes {
            let mut node = Node::prepare(
                n,
                &cluster.fabric.nodes[n],
                &node_ip(n),
                cluster.dir.path(),
                &format!("{cgroup_base}-node{n}"),
                &cluster.tools,
            );
            let multus = cluster.dir.path().join("pki/multus.kubeconfig");
            node.write_cni_config(&multus, &format!("10.244.{n}.1"));
            node.start_containerd(&cluster.tools);
            for image in ["pause.tar", "railnet.tar", "workload.tar"] {
                node.import_image(&cluster.tools, &cluster.tools.images.join(image));
            }
            let kubeconfig = cluster.pki.client(
                &format!("kubelet-{}", node.name),
                &format!("system:node:{}", node.name),
                &["system:nodes"],
            );
            node.start_kubelet(&cluster.tools, &kubeconfig, &cluster.pki);
            node.start_gpu_driver(&cluster.tools, &kubeconfig);
            node.add_stand_in_nics(RAILS);
            let vfs = node.add_stand_in_vfs(
                &cluster.fabric.nodes[n],
                cluster.fabric.router(1),
                n,
                1,
                VFS_PER_NODE,
                false,
            );
            // Rail 2's VFs are no device plugin's: DRA claims them.
            node.add_stand_in_vfs(
                &cluster.fabric.nodes[n],
                cluster.fabric.router(DRA_VF_RAIL),
                n,
                DRA_VF_RAIL,
                VFS_PER_NODE,
                true,
            );
            let bdfs: Vec<String> = vfs.into_iter().map(|(bdf, _)| bdf).collect();
            node.start_device_plugin(&cluster.tools, VF_RESOURCE, &bdfs);
            cluster.nodes.push(node);
        }
        cluster.wait_nodes_ready();
        cluster.restore_sysctls();
        cluster.wait_for("the default ServiceAccount", Duration::from_secs(60), |c| {
            c.kubectl_try(&["get", "serviceaccount", "default", "-n", "default"])
                .ok()
        });
        cluster
    }

    /// Waits until the API server is ready.
    #[track_caller]
    fn wait_api(&mut self) {
        self.wait_for("the API server", Duration::from_secs(120), |c| {
            c.kubectl_try(&["get", "--raw", "/readyz"]).ok()
        });
    }

    /// What every cluster needs before nodes join: Multus's CRD and RBAC
    /// (its identity: the client certificate `multus`).
    #[track_caller]
    fn bootstrap(&mut self) {
        self.pki.client("multus", "multus", &[]);
        let crd = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nad-crd.yaml"),
        )
        .unwrap();
        self.apply(&crd);
        // Multus's own ClusterRole (its daemonset manifest's).
        self.apply(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: multus}
rules:
  - apiGroups: [k8s.cni.cncf.io]
    resources: ["*"]
    verbs: ["*"]
  - apiGroups: [""]
    resources: [pods, pods/status]
    verbs: [get, list, update, watch]
  - apiGroups: ["", events.k8s.io]
    resources: [events]
    verbs: [create, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: multus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: multus}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: multus}
"#,
        );
    }

    /// Creates the host directories the nodes bind over, where missing
    /// (empty, removed at teardown).
    fn make_mount_points(&mut self) {
        for (host, _) in NODE_PATHS {
            let mut missing = Vec::new();
            let mut p = Path::new(host);
            while !p.exists() {
                missing.push(p.to_owned());
                p = p.parent().expect("an absolute path");
            }
            std::fs::create_dir_all(host).unwrap();
            self.created_dirs.extend(missing);
        }
        // The deepest first, for removal.
        self.created_dirs
            .sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    }

    #[track_caller]
    fn wait_nodes_ready(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.wait_for(
            "every node Ready, with its VFs",
            Duration::from_secs(180),
            |c| {
                let nodes = c.kubectl_json(&["get", "nodes"]);
                let ready = |name: &str| {
                    nodes["items"].as_array().into_iter().flatten().any(|n| {
                        n["metadata"]["name"] == name
                        && n["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        // …and lists the device plugin's VFs.
                        && n["status"]["allocatable"][VF_RESOURCE]
                            == VFS_PER_NODE.to_string().as_str()
                    })
                };
                names.iter().all(|n| ready(n)).then_some(())
            },
        );
    }

    /// Records what teardown must put back ([`HOST_STATE`]).
    fn write_host_state(&self) {
        let state = serde_json::json!({
            "pid": std::process::id(),
            "sysctls": self.saved_sysctls.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect::<serde_json::Map<String, Value>>(),
            "created_dirs": self.created_dirs,
        });
        std::fs::write(HOST_STATE, state.to_string()).unwrap();
    }

    fn restore_sysctls(&self) {
        for (k, v) in &self.saved_sysctls {
            let _ = std::fs::write(format!("/proc/sys/{k}"), v);
        }
    }

    /// Polls `f` until it gives a value, failing after `timeout` with what
    /// was awaited and the state of the processes.
    #[track_caller]
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&mut Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if let Err(e) = self.control.check_alive() {
                panic!("waiting for {what}: {e}\n{}", self.diagnostics());
            }
            for n in &mut self.nodes {
                if let Err(e) = n.kubelet_alive() {
                    panic!("waiting for {what}: {e}");
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not there after {}s\n{}",
                    timeout.as_secs(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The cluster's state and the logs' last lines, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            out.push_str(&format!("$ kubectl {}\n", args.join(" ")));
            match self.kubectl_try(args) {
                Ok(s) => out.push_str(&tail(&s, 40)),
                Err(e) => out.push_str(&e),
            }
            out.push('\n');
        }
        for c in [
            "kube-apiserver",
            "kube-scheduler",
            "kube-controller-manager",
        ] {
            out.push_str(&format!(
                "--- {c} (last lines)\n{}\n",
                tail(&self.control.log(c), 10)
            ));
        }
        for n in &self.nodes {
            for l in ["kubelet", "containerd"] {
                out.push_str(&format!(
                    "--- {} {l} (last lines)\n{}\n",
                    n.name,
                    tail(&n.log(l), 15)
                ));
            }
        }
        out
    }

    /// kubectl as the cluster admin, from the control-plane netns.
    pub fn kubectl(&self) -> Command {
        let mut cmd = self.cp.command(self.tools.kube("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.admin.display()));
        cmd
    }

    /// kubectl as the given kubeconfig's identity.
    pub fn kubectl_as(&self, kubeconfig: &Path) -> Command {
        let mut cmd = self.cp.command(self.tools.kube("kubectl"));
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()));
        cmd
    }

    /// Runs kubectl; its stdout, or its stderr as the error.
    pub fn kubectl_try(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .kubectl()
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs kubectl, panicking on failure.
    #[track_caller]
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl_try(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    /// `kubectl <args> -o json`, parsed.
    #[track_caller]
    pub fn kubectl_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&all)).unwrap_or(Value::Null)
    }

    /// `kubectl apply -f -` with `manifest`.
    #[track_caller]
    pub fn apply(&self, manifest: &str) -> String {
        self.kubectl_stdin(&["apply", "-f", "-"], manifest)
            .unwrap_or_else(|e| panic!("kubectl apply: {e}\n{manifest}"))
    }

    /// kubectl with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String, String> {
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// helm as the cluster admin, from the control-plane netns, its caches
    /// in the cluster's directory.
    pub fn helm(&self) -> Command {
        let mut cmd = self.cp.command(&self.tools.helm);
        let home = self.dir.path().join("helm");
        cmd.arg(format!("--kubeconfig={}", self.admin.display()))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// The API server's audit log (JSON lines).
    pub fn audit_log(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.control.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A file for the test's own use in the cluster's directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `cmd` (a kubectl) and panics with its output on failure.
    #[track_caller]
    pub fn run(&self, cmd: &mut Command) -> String {
        String::from_utf8_lossy(&sh(cmd).stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // For a person debugging a failure: keep the cluster up a while.
        if std::thread::panicking()
            && let Some(secs) = std::env::var("RAILNET_CLUSTER_HOLD")
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
        {
            eprintln!(
                "RAILNET_CLUSTER_HOLD: keeping the cluster {secs}s; kubectl --kubeconfig {} in netns {}; files in {}",
                self.admin.display(),
                self.cp.name(),
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_secs(secs));
        }
        for n in &mut self.nodes {
            n.stop();
        }
        self.control.stop();
        self.restore_sysctls();
        let left: Vec<PathBuf> = self.nodes.iter().flat_map(|n| n.leftovers()).collect();
        if !left.is_empty() {
            eprintln!("cluster teardown: cgroups left behind: {left:?}");
        }
        self.nodes.clear();
        for d in &self.created_dirs {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::fs::remove_file(HOST_STATE);
    }
}
