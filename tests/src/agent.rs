//! The real agent and CNI binaries, run as a node runs them.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Netns, ScratchDir, binary, unique};

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
