//! Test fabrics made of real network namespaces, and the real railnet
//! binaries run inside them. Shared by the privileged integration tests and
//! by `cargo xtask demo`.
//!
//! Every address lives inside a namespace this module created; the root
//! namespace never gets an address or a route. Everything is removed on
//! drop, processes are ended by PID.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod apiserver;
pub mod bounds;
pub mod cluster;
pub mod kube_scale;

use serde_json::Value;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Raises this process's open-file limit to its hard limit (a simulation
/// of many nodes holds thousands of sockets).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit for the call to fill and read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A name no other fabric of this or another process uses.
pub fn unique(tag: &str) -> String {
    format!(
        "rn{}-{}-{tag}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output if it fails.
#[track_caller]
pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A throwaway CA: `ca.crt`/`ca.key` in `dir` (openssl, valid a day).
pub fn test_ca(dir: &Path, cn: &str) {
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj",
        ],
        &format!("/CN={cn}"),
    );
}

/// `<name>.crt`/`<name>.key` in `dir`, for `subject`, signed by
/// [`test_ca`]'s CA with the openssl extensions `ext` (usage, SANs).
pub fn test_certificate(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
        ],
        subject,
    );
    std::fs::write(dir.join(&extfile), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
        ],
        &extfile,
    );
}

fn openssl(dir: &Path, args: &[&str], last: &str) {
    sh(Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .arg(last));
}

/// `promtool check metrics` on an exposition: whether it passed, and what
/// it said (problems and lint warnings).
pub fn promtool_check(text: &str) -> (bool, String) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A network namespace created with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `rn<pid>-<n>-<tag>` with its loopback up.
    #[track_caller]
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A name for the initial network namespace (`ip netns attach <name> 1`),
    /// for tests inside a qemu guest that need what only it sees (RDMA
    /// devices in exclusive mode). Dropping it removes the name only.
    /// Panics unless the caller has checked it runs in such a guest: the
    /// machine's own initial namespace is never a test's.
    #[track_caller]
    pub fn initial_in_guest(tag: &str, in_guest: bool) -> Self {
        assert!(
            in_guest,
            "the initial netns is used only inside a test guest"
        );
        let name = unique(tag);
        sh(Command::new("ip").args(["netns", "attach", &name, "1"]));
        let ns = Self { name };
        // A guest boots with its loopback down; the agent serves /metrics there.
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name for `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its nsfs path, as a runtime passes in `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`, panicking on failure.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        let out = sh(Command::new("ip").arg("-n").arg(&self.name).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -j -n <ns> <args>` parsed.
    #[track_caller]
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let out = sh(Command::new("ip").args(["-j", "-n", &self.name]).args(args));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// A command that runs in this netns only (not its mount namespace:
    /// `ip netns exec` would remount /sys and hide bpffs).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Received packets of `dev`, from the kernel's interface counters.
    #[track_caller]
    pub fn rx_packets(&self, dev: &str) -> u64 {
        let v = self.ip_json(&["-s", "link", "show", "dev", dev]);
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rx counter for {dev} in {}: {v}", self.name))
    }

    /// Received bytes of `dev` (robust to GSO, where one skb is many packets).
    #[track_caller]
    pub fn rx_bytes(&self, dev: &str) -> u64 {
        let v = self.ip_json(&["-s", "link", "show", "dev", dev]);
        v[0]["stats64"]["rx"]["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rx counter for {dev} in {}: {v}", self.name))
    }

    /// Whether `dev` exists in this netns.
    pub fn has_link(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair with one end, `a`, in netns `a_ns` and the other, `b`, in
/// `b_ns`, made directly in place (the root netns never holds either).
#[track_caller]
pub fn veth_between(a_ns: &Netns, a: &str, b_ns: &Netns, b: &str) {
    sh(Command::new("ip").args([
        "link", "add", a, "netns", &a_ns.name, "type", "veth", "peer", "name", b, "netns",
        &b_ns.name,
    ]));
}

/// Path of a railnet binary: from the env var xtask sets, else the debug
/// build next to this crate.
pub fn binary(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/debug")
            .join(name)
    })
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Self(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real `railnet-agent`, running inside a node netns.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    /// Its socket.
    pub socket: PathBuf,
    /// Its bpffs pin root (unique per agent, removed on drop).
    pub pin_root: PathBuf,
    /// Its pools file.
    pub config: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    node_name: Option<String>,
    _dir: ScratchDir,
}

impl Agent {
    /// Starts the agent in `node` with `pools` as its pools file and waits
    /// until it serves.
    #[track_caller]
    pub fn start(node: &Netns, pools: &Value) -> Self {
        Self::start_with(node, pools, &[])
    }

    /// As [`Agent::start_with`], the agent calling its node `node_name`
    /// (several "nodes" sharing one netns, as Kubernetes-mode tests do).
    #[track_caller]
    pub fn start_named(node: &Netns, node_name: &str, pools: &Value, extra: &[&str]) -> Self {
        Self::start_inner(node, Some(node_name), pools, extra)
    }

    /// As [`Agent::start`], with extra flags.
    #[track_caller]
    pub fn start_with(node: &Netns, pools: &Value, extra: &[&str]) -> Self {
        Self::start_inner(node, None, pools, extra)
    }

    #[track_caller]
    fn start_inner(node: &Netns, node_name: Option<&str>, pools: &Value, extra: &[&str]) -> Self {
        let dir = ScratchDir::new("agent");
        let config = dir.path().join("pools.yaml");
        std::fs::write(&config, pools.to_string()).expect("write pools");
        let socket = dir.path().join("agent.sock");
        let pin_root = PathBuf::from("/sys/fs/bpf").join(unique("pins"));
        let log = dir.path().join("agent.log");
        let mut agent = Self {
            child: None,
            socket,
            pin_root,
            config,
            log,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            node_name: node_name.map(str::to_owned),
            _dir: dir,
        };
        agent.spawn(node);
        agent
    }

    /// The command line this agent runs with in `node` (its socket,
    /// files, node name and extra flags): also what a second agent for the
    /// same node would run.
    pub fn command(&self, node: &Netns) -> Command {
        let mut cmd = node.command(binary("RAILNET_AGENT_BIN", "railnet-agent"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--state")
            .arg(self._dir.path().join("ipam.redb"))
            .arg("--node-name")
            .arg(self.node_name.as_deref().unwrap_or(node.name()))
            .arg("--tombstones")
            .arg(self.tombstones())
            // Tests read counters right after the traffic or request that
            // moves them: a fresh render per scrape (still one at a time).
            .args(["--metrics-max-age-ms", "0"])
            .args(&self.extra);
        cmd
    }

    /// (Re)starts the process.
    #[track_caller]
    pub fn spawn(&mut self, node: &Netns) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let _ = std::fs::remove_file(&self.socket);
        let child = self
            .command(node)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start railnet-agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("railnet-agent exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not bind:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the process (SIGTERM, then waits), leaving pins in place.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// GETs `path` from the agent's metrics endpoint (inside `node`).
    #[track_caller]
    pub fn scrape(&self, node: &Netns, path: &str) -> String {
        self.scrape_accepting(node, path, None)
    }

    /// As [`Agent::scrape`], sending an `Accept` header as Prometheus does.
    pub fn scrape_accepting(&self, node: &Netns, path: &str, accept: Option<&str>) -> String {
        let path = path.to_owned();
        // The agent's own --metrics-address if it was given one.
        let address = self
            .extra
            .iter()
            .position(|f| f == "--metrics-address")
            .and_then(|i| self.extra.get(i + 1).cloned())
            .unwrap_or_else(|| "127.0.0.1:9465".into());
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        node.run(move || {
            use std::io::{Read, Write};
            let get = || -> std::io::Result<String> {
                let mut s = std::net::TcpStream::connect(&address)?;
                s.write_all(
                    format!(
                        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n{accept}\r\n"
                    )
                    .as_bytes(),
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            };
            // A connection reset now and then under a loaded test run is
            // the network's business, not the endpoint's: retry a few times.
            let mut last = None;
            for _ in 0..5 {
                match get() {
                    Ok(out) => return out,
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("scraping {path}: {last:?}")
        })
    }

    /// Where the CNI leaves DELs for this agent.
    pub fn tombstones(&self) -> PathBuf {
        self._dir.path().join("tombstones")
    }

    /// The agent's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The directory where this agent writes pod `uid`'s rails for its
    /// workload (`pods/` beside the socket).
    pub fn pod_info(&self, uid: &str) -> PathBuf {
        self.socket.parent().unwrap().join("pods").join(uid)
    }

    /// Path of the agent's allocation database.
    pub fn state_path(&self) -> PathBuf {
        self._dir.path().join("ipam.redb")
    }

    /// Kills the process with SIGKILL, as a crash or OOM would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `railnet_ipam_allocations` from the agent's /metrics: addresses held
    /// on the node.
    #[track_caller]
    pub fn allocations(&self, node: &Netns) -> u64 {
        self.scrape(node, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("railnet_ipam_allocations "))
            .and_then(|v| v.trim().parse().ok())
            .expect("railnet_ipam_allocations in /metrics")
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// What one CNI invocation printed and how it ended.
#[derive(Debug)]
pub struct CniOutcome {
    /// Exit status success.
    pub ok: bool,
    /// stdout parsed as JSON (Null when empty).
    pub json: Value,
    /// stdout as text.
    pub stdout: String,
}

/// Executes the real `railnet` CNI binary the way a runtime does: the
/// spec's environment variables and the config on stdin.
pub fn cni(
    command: &str,
    conf: &Value,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
) -> CniOutcome {
    plugin(
        &binary("RAILNET_CNI_BIN", "railnet"),
        command,
        conf,
        container_id,
        netns,
        ifname,
        "/opt/cni/bin",
    )
}

/// Executes any CNI plugin (railnet's or a reference plugin) with the
/// spec's environment, `CNI_PATH` set to `cni_path`.
pub fn plugin(
    program: &Path,
    command: &str,
    conf: &Value,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
    cni_path: &str,
) -> CniOutcome {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", cni_path)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=true;K8S_POD_NAMESPACE=default;K8S_POD_NAME=demo;K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write CNI stdin");
    let out = child.wait_with_output().expect("CNI output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    CniOutcome {
        ok: out.status.success(),
        json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stdout,
    }
}

/// kubernetes-validate --strict on manifests (YAML or JSON): unknown or
/// misplaced fields fail, naming them.
#[track_caller]
pub fn validate_strict(manifests: &str) {
    let dir = ScratchDir::new("validate");
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, manifests).unwrap();
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "--no-warn",
        ])
        .arg(&file)
        .output()
        .expect("python3 -m kubernetes_validate (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "kubernetes-validate --strict:\n{}{}\n{manifests}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node with rail NICs cabled to one router netns per fabric, plus a pod
/// netns: the smallest rail-optimized network that shows steering.
///
/// Rail K: node `ethK` ⇄ router `railK` (172.16.1K.254/24, rail K's
/// gateway). The router also holds 172.16.100.1/32, a "remote GPU" inside
/// the RDMA CIDR 172.16.0.0/16, reachable through every rail.
#[derive(Debug)]
pub struct Fabric {
    /// The pod.
    pub pod: Netns,
    /// The node (the agent runs here).
    pub node: Netns,
    /// The rail router.
    pub router: Netns,
    /// Rail numbers.
    pub rails: Vec<u32>,
}

/// The fabric's remote RDMA destination.
pub const REMOTE: &str = "172.16.100.1";
/// The fabric's RDMA CIDR.
pub const RDMA_CIDR: &str = "172.16.0.0/16";
/// The fabric's IPv6 RDMA CIDR.
pub const RDMA_CIDR6: &str = "fd00:16::/32";

impl Fabric {
    /// Builds the fabric for `rails` (each 1..=89).
    #[track_caller]
    pub fn new(rails: &[u32]) -> Self {
        let node = Netns::new("node");
        let router = Netns::new("rtr");
        let pod = Netns::new("pod");
        for &k in rails {
            let (nic, port) = (format!("eth{k}"), format!("rail{k}"));
            veth_between(&node, &nic, &router, &port);
            node.ip(&["link", "set", &nic, "up"]);
            router.ip(&[
                "addr",
                "add",
                &format!("{}/24", Self::gateway(k)),
                "dev",
                &port,
            ]);
            router.ip(&["link", "set", &port, "up"]);
        }
        router.ip(&["addr", "add", &format!("{REMOTE}/32"), "dev", "lo"]);
        Self {
            pod,
            node,
            router,
            rails: rails.to_vec(),
        }
    }

    /// Rail K's gateway.
    pub fn gateway(k: u32) -> String {
        format!("172.16.{}.254", 10 + k)
    }

    /// The agent's pools file: one pool per rail.
    pub fn pools(&self) -> Value {
        let pools: Vec<Value> = self
            .rails
            .iter()
            .map(|k| {
                serde_json::json!({
                    "name": format!("rail{k}"),
                    "subnet": format!("172.16.{}.0/24", 10 + k),
                    "ips": [format!("172.16.{0}.10-172.16.{0}.99", 10 + k)],
                    "gateway": Self::gateway(*k),
                })
            })
            .collect();
        serde_json::json!({ "pools": pools })
    }

    /// Rail K's network config, as a NetworkAttachmentDefinition carries it.
    pub fn netconf(&self, k: u32, agent: &Agent) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("rail{k}"),
            "type": "railnet",
            "rail": k,
            "master": format!("eth{k}"),
            "rdmaCIDRs": [RDMA_CIDR],
            "ippools": { "ipv4": [format!("rail{k}")] },
            "agentSocket": agent.socket,
        })
    }

    /// Pings `dst` from the pod, bound to `src`, `count` times, quickly.
    /// Returns whether every reply came back.
    pub fn ping_from(&self, src: &str, dst: &str, count: u32) -> bool {
        self.pod
            .command("ping")
            .args([
                "-q",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.01",
                "-W",
                "1",
                "-I",
                src,
                dst,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// The issue-3 fabric: two or more nodes, `R` rails, one router netns per
/// rail (a bridge holding rail K's gateway 172.16.K.254/24, with a port to
/// every node's `ethK`), a spine routing between the rail routers, and per
/// node a pod bridge (10.244.N.1/24) for the pods' default `eth0`, with a
/// "service" address 10.96.0.10 outside the RDMA CIDR on the node.
#[derive(Debug)]
pub struct RailFabric {
    /// Rail routers, index K-1.
    pub routers: Vec<Netns>,
    /// The spine.
    pub spine: Netns,
    /// The nodes.
    pub nodes: Vec<Netns>,
    /// Number of rails.
    pub rails: u32,
    pods_made: AtomicU32,
}

/// A service address outside the RDMA CIDR, on every node.
pub const SERVICE: &str = "10.96.0.10";

/// A pod of a [`RailFabric`]: its netns and default `eth0`.
#[derive(Debug)]
pub struct FabricPod {
    /// The pod netns.
    pub ns: Netns,
    /// Index of its node.
    pub node: usize,
    /// Node-side end of its eth0 veth (count its rx for eth0 traffic).
    pub host_veth: String,
}

impl RailFabric {
    /// Builds `nodes` nodes and `rails` rails (each ≤ 9).
    #[track_caller]
    pub fn new(nodes: usize, rails: u32) -> Self {
        let spine = Netns::new("spine");
        spine.sysctl("net.ipv4.ip_forward", "1");
        spine.sysctl("net.ipv6.conf.all.forwarding", "1");
        // The fabric stands in for switches that have been up for days:
        // no IPv6 duplicate-address detection delaying its first seconds.
        spine.sysctl("net.ipv6.conf.default.accept_dad", "0");
        let nodes: Vec<Netns> = (0..nodes).map(|_| Netns::new("node")).collect();
        let mut routers = Vec::new();
        for k in 1..=rails {
            let r = Netns::new(&format!("rtr{k}"));
            r.sysctl("net.ipv4.ip_forward", "1");
            r.sysctl("net.ipv6.conf.all.forwarding", "1");
            r.sysctl("net.ipv6.conf.default.accept_dad", "0");
            r.ip(&["link", "add", "br0", "type", "bridge"]);
            for (n, node) in nodes.iter().enumerate() {
                let (nic, port) = (format!("eth{k}"), format!("n{n}"));
                veth_between(node, &nic, &r, &port);
                node.ip(&["link", "set", &nic, "up"]);
                r.ip(&["link", "set", &port, "master", "br0", "up"]);
            }
            r.ip(&["addr", "add", &format!("172.16.{k}.254/24"), "dev", "br0"]);
            r.ip(&[
                "addr",
                "add",
                &format!("fd00:16:{k}::254/64"),
                "dev",
                "br0",
                "nodad",
            ]);
            r.ip(&["link", "set", "br0", "up"]);
            let up = format!("r{k}");
            veth_between(&r, "uplink", &spine, &up);
            r.ip(&["addr", "add", &format!("172.31.{k}.1/30"), "dev", "uplink"]);
            r.ip(&[
                "addr",
                "add",
                &format!("fd00:31:{k}::1/64"),
                "dev",
                "uplink",
                "nodad",
            ]);
            r.ip(&["link", "set", "uplink", "up"]);
            r.ip(&["route", "add", "default", "via", &format!("172.31.{k}.2")]);
            r.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:31:{k}::2"),
            ]);
            spine.ip(&["addr", "add", &format!("172.31.{k}.2/30"), "dev", &up]);
            spine.ip(&[
                "addr",
                "add",
                &format!("fd00:31:{k}::2/64"),
                "dev",
                &up,
                "nodad",
            ]);
            spine.ip(&["link", "set", &up, "up"]);
            spine.ip(&[
                "route",
                "add",
                &format!("172.16.{k}.0/24"),
                "via",
                &format!("172.31.{k}.1"),
            ]);
            spine.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:16:{k}::/64"),
                "via",
                &format!("fd00:31:{k}::1"),
            ]);
            routers.push(r);
        }
        for (n, node) in nodes.iter().enumerate() {
            node.ip(&["link", "add", "cbr0", "type", "bridge"]);
            node.ip(&["addr", "add", &format!("10.244.{n}.1/24"), "dev", "cbr0"]);
            node.ip(&["link", "set", "cbr0", "up"]);
            node.ip(&["addr", "add", &format!("{SERVICE}/32"), "dev", "lo"]);
        }
        for r in &routers {
            r.wait_bridge_ports_forwarding();
        }
        Self {
            routers,
            spine,
            nodes,
            rails,
            pods_made: AtomicU32::new(0),
        }
    }

    /// Rail K's router.
    pub fn router(&self, k: u32) -> &Netns {
        &self.routers[(k - 1) as usize]
    }

    /// Packets rail K's router received from node `n`'s rail NIC.
    pub fn rail_rx(&self, k: u32, n: usize) -> u64 {
        self.router(k).rx_packets(&format!("n{n}"))
    }

    /// Rx counters of every rail router's port to node `n`, index K-1.
    pub fn rails_rx(&self, n: usize) -> Vec<u64> {
        (1..=self.rails).map(|k| self.rail_rx(k, n)).collect()
    }

    /// Node `n`'s pools file: per rail a pool of 90 addresses no other node
    /// uses (172.16.K.(10+100n)…).
    pub fn pools(&self, n: usize) -> Value {
        let pools: Vec<Value> = (1..=self.rails)
            .flat_map(|k| {
                let lo = 10 + 100 * n;
                [
                    serde_json::json!({
                        "name": format!("rail{k}"),
                        "subnet": format!("172.16.{k}.0/24"),
                        "ips": [format!("172.16.{k}.{lo}-172.16.{k}.{}", lo + 89)],
                        "gateway": format!("172.16.{k}.254"),
                    }),
                    serde_json::json!({
                        "name": format!("rail{k}-v6"),
                        "subnet": format!("fd00:16:{k}::/64"),
                        "ips": [format!("fd00:16:{k}::{n}:10-fd00:16:{k}::{n}:99")],
                        "gateway": format!("fd00:16:{k}::254"),
                    }),
                ]
            })
            .collect();
        serde_json::json!({ "pools": pools })
    }

    /// Rail K's network config (IPv4 only).
    pub fn netconf(&self, k: u32, agent: &Agent, routing: &str) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("rail{k}"),
            "type": "railnet",
            "rail": k,
            "master": format!("eth{k}"),
            "rdmaCIDRs": [RDMA_CIDR],
            "ippools": { "ipv4": [format!("rail{k}")] },
            "routing": routing,
            "agentSocket": agent.socket,
            "tombstoneDir": agent.tombstones(),
        })
    }

    /// Rail K's dual-stack network config (IPv6 RDMA CIDR fd00:16::/32).
    pub fn netconf_dual(&self, k: u32, agent: &Agent, routing: &str) -> Value {
        let mut conf = self.netconf(k, agent, routing);
        conf["rdmaCIDRs"] = serde_json::json!([RDMA_CIDR, RDMA_CIDR6]);
        conf["ippools"]["ipv6"] = serde_json::json!([format!("rail{k}-v6")]);
        conf
    }

    /// A pod on node `n` with a default `eth0` on the node's pod bridge.
    #[track_caller]
    pub fn pod(&self, n: usize) -> FabricPod {
        let i = self.pods_made.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::new("pod");
        let node = &self.nodes[n];
        let host_veth = format!("vp{i}");
        veth_between(node, &host_veth, &ns, "eth0");
        node.ip(&["link", "set", &host_veth, "master", "cbr0", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("10.244.{n}.{}/24", i + 2),
            "dev",
            "eth0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &format!("10.244.{n}.1")]);
        node.wait_bridge_ports_forwarding();
        FabricPod {
            ns,
            node: n,
            host_veth,
        }
    }
}

impl Netns {
    /// Waits (up to 3 s) until every bridge port in this netns forwards.
    /// The bridge learns of a port's carrier through the kernel's linkwatch,
    /// which handles such events at most once a second: a port that came
    /// up right after another can stay "disabled" for most of a second and
    /// drop all it receives. A test fabric is used at once, a real switch
    /// has been up for days — so the fabric waits before it is used.
    #[track_caller]
    pub fn wait_bridge_ports_forwarding(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let links = self.ip_json(&["-d", "link", "show"]);
            let waiting: Vec<String> = links
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["linkinfo"]["info_slave_kind"] == "bridge")
                .filter(|l| l["linkinfo"]["info_slave_data"]["state"] != "forwarding")
                .map(|l| {
                    format!(
                        "{} {}",
                        l["ifname"], l["linkinfo"]["info_slave_data"]["state"]
                    )
                })
                .collect();
            if waiting.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bridge ports in {} still not forwarding after 3 s: {waiting:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets a sysctl inside this netns.
    #[track_caller]
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        let shown = path.clone();
        self.run(move || std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("sysctl {shown}: {e}"));
    }

    /// Pings `dst` from address `src`, `count` times at 10 ms; true if
    /// every reply came back.
    pub fn ping(&self, src: &str, dst: &str, count: u32, size: u32) -> bool {
        self.command("ping")
            .args([
                "-q",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.01",
                "-W",
                "1",
                "-s",
                &size.to_string(),
                "-I",
                src,
                dst,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Starts `work` on a thread inside this netns and returns at once.
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            work()
        })
    }

    /// Runs `work` on a thread inside this netns (sockets it opens belong
    /// to the netns).
    pub fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            work()
        })
        .join()
        .expect("netns thread")
    }
}

/// An IPAM-only request for `net1` of `container_id` from IPv4 pool
/// `rail1` (network `rail1`), as the load tests send them.
pub fn rail1_ipam_request(container_id: String) -> railnet_agent::api::IpamRequest {
    railnet_agent::api::IpamRequest {
        container_id,
        ifname: "net1".into(),
        ippools: railnet_agent::netconf::IpPools {
            ipv4: vec!["rail1".into()],
            ipv6: vec![],
        },
        match_master: None,
        network: "rail1".into(),
        namespace: None,
        pod_name: None,
        pod_uid: None,
        ips: vec![],
    }
}

/// Sends one request to an agent's socket, as the CNI binary does.
pub fn agent_call(
    socket: &Path,
    op: railnet_agent::api::Op,
) -> Result<railnet_agent::api::Response, railnet_agent::api::WireError> {
    agent_call_with_fd(socket, op, None)
}

/// [`agent_call`] with a file descriptor passed along (the CNI passes the
/// pod's netns).
pub fn agent_call_with_fd(
    socket: &Path,
    op: railnet_agent::api::Op,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<railnet_agent::api::Response, railnet_agent::api::WireError> {
    use railnet_agent::api;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    api::send(
        &mut stream,
        &api::Request {
            api: api::API_VERSION,
            client: "railnet-tests".into(),
            op,
        },
        fd,
    )?;
    Ok(api::recv(&mut stream)?.0)
}

/// The netlink messages `program <args>` sends from inside `ns`, from
/// strace's dump of its sendto/sendmsg calls: what a reference tool (rdma,
/// ip) puts on the wire, for golden comparisons.
pub fn netlink_sends(ns: &Netns, program: &str, args: &[&str]) -> Vec<Vec<u8>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args([
            "strace",
            "-f",
            "-e",
            "trace=sendto,sendmsg",
            "-e",
            "write=all",
        ])
        .arg(program)
        .args(args)
        .output()
        .expect("strace");
    let text = String::from_utf8_lossy(&out.stderr);
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for line in text.lines() {
        if line.contains("sendto(") || line.contains("sendmsg(") {
            messages.push(Vec::new());
        } else if let Some(dump) = line.trim_start().strip_prefix("| ")
            && let Some(last) = messages.last_mut()
        {
            // " | 00010  08 00 01 00 ...  ascii |": offset, then up to 16 bytes.
            let hex = dump
                .get(7..7 + 16 * 3 + 1)
                .unwrap_or(&dump[7.min(dump.len())..]);
            last.extend(
                hex.split_whitespace()
                    .take(16)
                    .map(|b| u8::from_str_radix(b, 16).expect("hex byte")),
            );
        }
    }
    assert!(!messages.is_empty(), "no sends seen:\n{text}");
    messages
}

/// The id of the BPF program on `dev`'s egress in `ns`, as `tc filter
/// show` prints it; `None` when none is attached.
pub fn egress_program_id(ns: &Netns, dev: &str) -> Option<String> {
    let out = Command::new("tc")
        .args(["-n", ns.name(), "filter", "show", "dev", dev, "egress"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .map(str::to_owned)
}

/// The RTM_NEWLINK `ip <args>` sends from inside `ns`, without its netlink
/// header (the ifinfomsg and attributes): what railnet's own request must
/// equal.
pub fn iproute2_newlink(ns: &Netns, args: &[&str]) -> Vec<u8> {
    const RTM_NEWLINK: u16 = 16;
    let sends = netlink_sends(ns, "ip", args);
    sends
        .iter()
        .find(|m| m.len() > 32 && u16::from_ne_bytes([m[4], m[5]]) == RTM_NEWLINK)
        .unwrap_or_else(|| panic!("ip {args:?} sent no RTM_NEWLINK: {sends:?}"))[16..]
        .to_vec()
}

/// A link message of railnet's as the kernel receives it (the ifinfomsg
/// and attributes).
pub fn emitted(msg: &rtnetlink::packet_route::link::LinkMessage) -> Vec<u8> {
    use rtnetlink::packet_core::Emitable;
    let mut bytes = vec![0; msg.buffer_len()];
    msg.emit(&mut bytes);
    bytes
}

/// The attributes of kinds `kinds` in a link message, sorted: what two
/// requests are compared by when their other attributes may differ in
/// order or presence.
pub fn link_attributes_of(ifinfo_and_attrs: &[u8], kinds: &[u16]) -> Vec<(u16, Vec<u8>)> {
    let mut v: Vec<(u16, Vec<u8>)> = link_attributes(ifinfo_and_attrs)
        .into_iter()
        .filter(|(t, _)| kinds.contains(t))
        .collect();
    v.sort();
    v
}

/// The attributes of an rtnetlink link message (`ifinfomsg` first, then
/// attributes), by type, as raw bytes (header included).
pub fn link_attributes(ifinfo_and_attrs: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 16; // struct ifinfomsg
    while at + 4 <= ifinfo_and_attrs.len() {
        let len = u16::from_ne_bytes([ifinfo_and_attrs[at], ifinfo_and_attrs[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([ifinfo_and_attrs[at + 2], ifinfo_and_attrs[at + 3]]);
        if len < 4 || at + len > ifinfo_and_attrs.len() {
            break;
        }
        out.push((ty, ifinfo_and_attrs[at..at + len].to_vec()));
        at += (len + 3) & !3;
    }
    out
}
