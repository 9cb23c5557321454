//! Network namespaces the tests make (and remove), and what is done
//! inside them.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{sh, unique};

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
