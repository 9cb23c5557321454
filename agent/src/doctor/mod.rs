//! `railnetctl doctor`: the host checks the AI-cluster guides ask for before a
//! node runs RDMA pods, in one command, each failure with its fix.

use std::{fmt, path::Path};

use crate::rdma::{NetnsMode, RdmaNetlink};

pub mod compare;
pub mod lossless;

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// As it should be.
    Ok,
    /// Works, but not as the guides recommend.
    Warn,
    /// RDMA pods will fail or run slow.
    Fail,
}

/// One finding.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// How it came out.
    pub outcome: Outcome,
    /// What was looked at and what was found.
    pub what: String,
    /// What to do, when something is to be done.
    pub fix: Option<String>,
}

/// Every finding, in the order checked.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
    /// Each RoCE rail NIC's lossless settings, by netdev (what
    /// `--compare` lines up across nodes).
    #[serde(default)]
    pub lossless: std::collections::BTreeMap<String, lossless::Lossless>,
}

impl Report {
    fn push(&mut self, outcome: Outcome, what: impl Into<String>, fix: Option<String>) {
        self.findings.push(Finding {
            outcome,
            what: what.into(),
            fix,
        });
    }

    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.outcome == Outcome::Fail)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            let tag = match finding.outcome {
                Outcome::Ok => "ok  ",
                Outcome::Warn => "WARN",
                Outcome::Fail => "FAIL",
            };
            writeln!(f, "{tag}  {}", finding.what)?;
            if let Some(fix) = &finding.fix {
                writeln!(f, "      fix: {fix}")?;
            }
        }
        Ok(())
    }
}

/// Netdev MTU a RoCE port needs for an active MTU of 4096: the IB payload
/// plus GRH, UDP, BTH, XRC and atomic extension headers and the ICRC
/// (the kernel's `iboe_get_mtu`).
pub const ROCE_4096_NETDEV_MTU: u32 = 4096 + 40 + 8 + 12 + 4 + 28 + 4;

/// What `options ib_core netns_mode=` says in the modprobe configuration,
/// and in which file.
fn persisted_mode(modprobe_dirs: &[&Path]) -> Option<(NetnsMode, String)> {
    for dir in modprobe_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            for line in text.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() == Some(&"options") && words.get(1) == Some(&"ib_core") {
                    for w in &words[2..] {
                        match *w {
                            "netns_mode=0" => {
                                return Some((NetnsMode::Exclusive, file.display().to_string()));
                            }
                            "netns_mode=1" => {
                                return Some((NetnsMode::Shared, file.display().to_string()));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    None
}

fn mode_flag(mode: NetnsMode) -> u8 {
    match mode {
        NetnsMode::Exclusive => 0,
        NetnsMode::Shared => 1,
    }
}

/// Runs every check. `expect` is the RDMA netns mode the node's networks
/// need (exclusive for SR-IOV/IB isolation, shared for macvlan), if known.
pub fn run(expect: Option<NetnsMode>) -> Report {
    let mut report = Report::default();
    let mut nl = match RdmaNetlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            report.push(
                Outcome::Fail,
                format!("RDMA subsystem: {e}"),
                Some("install the NIC's driver (mlx5_ib, ...) and load ib_core".into()),
            );
            return report;
        }
    };
    // 1. The netns mode, live and persisted.
    match nl.netns_mode() {
        Ok(mode) => {
            let persisted =
                persisted_mode(&[Path::new("/etc/modprobe.d"), Path::new("/lib/modprobe.d")]);
            let want = expect.unwrap_or(mode);
            if mode != want {
                report.push(
                    Outcome::Fail,
                    format!("RDMA netns mode is {mode}; these networks need {want}"),
                    Some(format!(
                        "echo 'options ib_core netns_mode={}' > /etc/modprobe.d/ib_core.conf, then reboot \
                         (`rdma system set netns {want}` works only while no pod netns exists)",
                        mode_flag(want)
                    )),
                );
            } else {
                report.push(Outcome::Ok, format!("RDMA netns mode is {mode}"), None);
            }
            match persisted {
                Some((p, file)) if p == want => report.push(
                    Outcome::Ok,
                    format!("netns mode {p} persisted in {file}"),
                    None,
                ),
                Some((p, file)) => report.push(
                    Outcome::Fail,
                    format!("{file} sets netns mode {p} for the next boot; this node needs {want}"),
                    Some(format!(
                        "set `options ib_core netns_mode={}` there",
                        mode_flag(want)
                    )),
                ),
                None => report.push(
                    Outcome::Warn,
                    format!(
                        "netns mode {want} is not persisted: a reboot returns to the kernel default"
                    ),
                    Some(format!(
                        "echo 'options ib_core netns_mode={}' > /etc/modprobe.d/ib_core.conf",
                        mode_flag(want)
                    )),
                ),
            }
        }
        Err(e) => report.push(Outcome::Fail, format!("RDMA netns mode: {e}"), None),
    }
    // 2. Each device's ports: link layer, state, the netdev's MTU.
    match nl.links() {
        Ok(ports) if ports.is_empty() => report.push(
            Outcome::Fail,
            "no RDMA device on this node (in this netns)",
            Some("check the NIC driver (`rdma dev` should list the rail NICs)".into()),
        ),
        Ok(ports) => {
            for p in ports {
                let sys = format!("/sys/class/infiniband/{}/ports/{}", p.device, p.port);
                let link_layer = std::fs::read_to_string(format!("{sys}/link_layer"))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|_| "unknown".into());
                let name = format!("{}/{}", p.device, p.port);
                let active = p.state == Some(4);
                let netdev = p.netdev.clone().unwrap_or_default();
                report.push(
                    if active { Outcome::Ok } else { Outcome::Warn },
                    format!(
                        "{name}: link layer {link_layer}, state {}, netdev {}",
                        port_state(p.state),
                        if netdev.is_empty() { "-" } else { &netdev }
                    ),
                    (!active).then(|| format!("check the cable and switch port of {name}")),
                );
                if link_layer == "Ethernet" && !netdev.is_empty() {
                    let mtu: Option<u32> =
                        std::fs::read_to_string(format!("/sys/class/net/{netdev}/mtu"))
                            .ok()
                            .and_then(|s| s.trim().parse().ok());
                    match mtu {
                        Some(m) if m >= ROCE_4096_NETDEV_MTU => report.push(
                            Outcome::Ok,
                            format!("{netdev}: MTU {m} allows RoCE MTU 4096"),
                            None,
                        ),
                        Some(m) => report.push(
                            Outcome::Warn,
                            format!(
                                "{netdev}: MTU {m} limits RoCE to MTU {} (4096 needs {ROCE_4096_NETDEV_MTU})",
                                roce_mtu(m)
                            ),
                            Some(format!(
                                "ip link set {netdev} mtu 9000 (and the switch ports), or at least {ROCE_4096_NETDEV_MTU}"
                            )),
                        ),
                        None => {}
                    }
                    // 2b. Lossless RoCE on it: PFC, DSCP trust, ECN, ToS.
                    let seen = lossless::check(
                        &mut report,
                        &netdev,
                        &p.device,
                        p.port,
                        crate::dcb::ieee_get(&netdev),
                        &lossless::Sources::default(),
                    );
                    report.lossless.insert(netdev.clone(), seen);
                }
            }
        }
        Err(e) => report.push(Outcome::Fail, format!("RDMA devices: {e}"), None),
    }
    // 3. GPUDirect RDMA: the peer-memory module NCCL needs.
    let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
    if loaded("nvidia_peermem") || loaded("gdrdrv") {
        let which: Vec<&str> = ["nvidia_peermem", "gdrdrv"]
            .into_iter()
            .filter(|m| loaded(m))
            .collect();
        report.push(
            Outcome::Ok,
            format!("GPUDirect RDMA: {} loaded", which.join(", ")),
            None,
        );
    } else {
        report.push(
            Outcome::Warn,
            "GPUDirect RDMA: neither nvidia_peermem nor gdrdrv is loaded; NCCL will copy through host memory",
            Some("modprobe nvidia_peermem (GPU operator: driver.rdma.enabled=true)".into()),
        );
    }
    report
}

fn port_state(state: Option<u8>) -> &'static str {
    match state {
        Some(1) => "DOWN",
        Some(2) => "INIT",
        Some(3) => "ARMED",
        Some(4) => "ACTIVE",
        Some(5) => "ACTIVE_DEFER",
        _ => "unknown",
    }
}

/// The largest IB MTU a netdev MTU carries.
fn roce_mtu(netdev_mtu: u32) -> u32 {
    let room = netdev_mtu.saturating_sub(ROCE_4096_NETDEV_MTU - 4096);
    [4096, 2048, 1024, 512, 256]
        .into_iter()
        .find(|m| *m <= room)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roce_mtu_follows_the_kernel() {
        assert_eq!(roce_mtu(9000), 4096);
        assert_eq!(roce_mtu(4192), 4096);
        assert_eq!(roce_mtu(4191), 2048);
        assert_eq!(roce_mtu(1500), 1024);
    }

    #[test]
    fn persisted_mode_is_found() {
        let dir = std::env::temp_dir().join(format!("railnet-doctor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(persisted_mode(&[&dir]), None);
        std::fs::write(dir.join("ib.conf"), "# x\noptions ib_core netns_mode=0\n").unwrap();
        let (mode, file) = persisted_mode(&[&dir]).unwrap();
        assert_eq!(mode, NetnsMode::Exclusive);
        assert!(file.ends_with("ib.conf"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
