//! A node's side of `railnetctl check`: a throwaway netns wired by the
//! node's agent as a pod is, its own rails looked at, echoes sent on
//! request, everything given back with CNI DEL.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use railnet_wire::{
    api::{self, Attachment, Op, Response},
    netconf::{Mode, NetConf},
};

use super::{CONTAINER_ID, NodeSetup, Plan, RailSetup, RailState, Reach, SMALL, Target, ping};
use crate::netns::PodNetns;

/// How long one ADD or DEL may take (an agent busy with pods answers
/// slowly, never this slowly).
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fresh interface may take to show carrier.
const CARRIER_WAIT: Duration = Duration::from_secs(2);

/// One network as the probe wired it.
#[derive(Debug)]
struct Wired {
    netconf: serde_json::Value,
    conf: Option<NetConf>,
    ifname: String,
    /// IPv4 address and MAC, once the agent wired it.
    at: Option<(Ipv4Addr, Option<[u8; 6]>)>,
}

/// A node's probe: its netns and what the agent made in it.
#[derive(Debug)]
pub struct Probe {
    socket: PathBuf,
    netns: PodNetns,
    /// Keeps the netns where the agent looks for pods' (dropped last).
    _holder: Holder,
    wired: Vec<Wired>,
    finished: bool,
}

impl Probe {
    /// Makes the probe's netns, asks the agent at `socket` for one
    /// interface per network of `plan`, and looks at each rail.
    pub fn start(plan: &Plan, socket: &Path) -> Result<(Self, NodeSetup), String> {
        let fd = new_netns()?;
        let holder = Holder::new(&fd)?;
        let mut probe = Self {
            socket: socket.to_owned(),
            netns: PodNetns::from_fd(fd),
            _holder: holder,
            wired: Vec::new(),
            finished: false,
        };
        let mut rails = Vec::new();
        for (i, netconf) in plan.networks.iter().enumerate() {
            let ifname = format!("chk{i}");
            // A kind the probe cannot stand in for is skipped before its
            // config is checked (an SR-IOV config has no VF until Multus
            // adds the one the device plugin gave).
            let mode = netconf["mode"]
                .as_str()
                .and_then(|m| m.parse::<Mode>().ok());
            let parsed = serde_json::to_vec(netconf)
                .map_err(|e| e.to_string())
                .and_then(|b| NetConf::parse(&b).map_err(|e| e.to_string()))
                .and_then(|c| c.checked().map_err(|e| e.to_string()));
            let name = netconf["name"].as_str().unwrap_or_default().to_owned();
            let (rail, master) = match &parsed {
                Ok(c) => (c.rail, c.master.clone()),
                Err(_) => (netconf["rail"].as_u64().unwrap_or(0) as u32, String::new()),
            };
            let mut wired = Wired {
                netconf: netconf.clone(),
                conf: parsed.as_ref().ok().cloned(),
                ifname: ifname.clone(),
                at: None,
            };
            let state = match (mode.and_then(skipped), parsed) {
                (Some(reason), _) => {
                    wired.conf = None;
                    RailState::Skipped { reason }
                }
                (None, Err(e)) => RailState::Failed {
                    reason: format!("network {name:?}: {e}"),
                },
                (None, Ok(_)) => {
                    // A check that died half-way left this; DEL is
                    // idempotent.
                    let _ = probe.del(&wired, false);
                    probe.add(&mut wired)
                }
            };
            probe.wired.push(wired);
            rails.push(RailSetup {
                network: name,
                rail,
                master,
                state,
            });
        }
        probe.look(&mut rails)?;
        Ok((
            probe,
            NodeSetup {
                node: plan.node.clone(),
                rails,
            },
        ))
    }

    /// ADD for one network; its state as far as the agent's answer tells.
    fn add(&self, wired: &mut Wired) -> RailState {
        let att = self.attachment(wired, true);
        match api::call(
            &self.socket,
            Op::Add(att),
            Some(self.netns.fd().as_fd()),
            AGENT_TIMEOUT,
        ) {
            Err(e) => RailState::Failed {
                reason: format!("the agent at {} did not answer: {e}", self.socket.display()),
            },
            Ok(Response::Error(e)) => RailState::Failed {
                reason: e.to_string(),
            },
            Ok(Response::Ok { result, .. }) => {
                let Some(result) = result else {
                    return RailState::Failed {
                        reason: "the agent's ADD answered without a result".into(),
                    };
                };
                let v4 = result.ips.iter().find_map(|ip| match ip.address {
                    ipnet::IpNet::V4(net) => Some((net.addr(), ip.gateway)),
                    ipnet::IpNet::V6(_) => None,
                });
                let Some((address, gateway)) = v4 else {
                    return RailState::Skipped {
                        reason: "no IPv4 address on this rail: the check probes IPv4".into(),
                    };
                };
                wired.at = Some((address, railnet_wire::mac::parse(&result.interface.mac)));
                RailState::Ready {
                    address,
                    gateway: gateway.and_then(|g| match g {
                        std::net::IpAddr::V4(g) => Some(g),
                        std::net::IpAddr::V6(_) => None,
                    }),
                    mtu: result.interface.mtu,
                    carrier: false,
                    gateway_answers: false,
                    gateways_on_link: Vec::new(),
                }
            }
        }
    }

    fn attachment(&self, wired: &Wired, typed: bool) -> Attachment {
        Attachment {
            container_id: CONTAINER_ID.into(),
            ifname: wired.ifname.clone(),
            netconf: wired.netconf.clone(),
            conf: if typed { wired.conf.clone() } else { None },
            args: Default::default(),
        }
    }

    fn del(&self, wired: &Wired, with_netns: bool) -> Result<(), String> {
        let netns = with_netns.then(|| self.netns.fd().as_fd());
        match api::call(
            &self.socket,
            Op::Del(self.attachment(wired, false)),
            netns,
            AGENT_TIMEOUT,
        ) {
            Ok(Response::Ok { .. }) => Ok(()),
            Ok(Response::Error(e)) => Err(format!("DEL {}: {e}", wired.ifname)),
            Err(e) => Err(format!("DEL {}: {e}", wired.ifname)),
        }
    }

    /// Inside the netns: each ready rail's carrier, whether its gateway
    /// answers, and when it does not, whose gateway answers on its link.
    fn look(&self, rails: &mut [RailSetup]) -> Result<(), String> {
        let gateways: Vec<(String, Ipv4Addr)> = rails
            .iter()
            .filter_map(|r| match r.state {
                RailState::Ready {
                    gateway: Some(g), ..
                } => Some((r.network.clone(), g)),
                _ => None,
            })
            .collect();
        let jobs: Vec<OwnLink> = rails
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match (&r.state, self.wired[i].at) {
                (RailState::Ready { gateway, .. }, Some((address, mac))) => Some(OwnLink {
                    index: i,
                    ifname: self.wired[i].ifname.clone(),
                    address,
                    gateway: *gateway,
                    mac,
                }),
                _ => None,
            })
            .collect();
        let found = self
            .netns
            .run(move || {
                std::thread::scope(|s| {
                    let handles: Vec<_> = jobs
                        .iter()
                        .map(|link| {
                            let gateways = &gateways;
                            s.spawn(move || (link.index, look_at(link, gateways)))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .filter_map(|h| h.join().ok())
                        .collect::<Vec<_>>()
                })
            })
            .map_err(|e| e.to_string())?;
        for (i, (has_carrier, answers, on_link)) in found {
            if let RailState::Ready {
                carrier,
                gateway_answers,
                gateways_on_link,
                ..
            } = &mut rails[i].state
            {
                *carrier = has_carrier;
                *gateway_answers = answers;
                *gateways_on_link = on_link;
            }
        }
        Ok(())
    }

    /// Sends every target's echo (all at once) and says what each found:
    /// at full size first, and when nothing answers, small. What did not
    /// answer is asked once more, after the rest: a first echo across a
    /// router can wait on two ARP resolutions on a busy node.
    pub fn reach(&self, targets: &[Target]) -> Result<Vec<Reach>, String> {
        let mut found = self.reach_once(targets)?;
        let again: Vec<usize> = (0..targets.len())
            .filter(|&i| found[i] != Reach::Answered)
            .collect();
        if !again.is_empty() {
            let retry: Vec<Target> = again.iter().map(|&i| targets[i].clone()).collect();
            for (i, r) in again.into_iter().zip(self.reach_once(&retry)?) {
                found[i] = r;
            }
        }
        Ok(found)
    }

    fn reach_once(&self, targets: &[Target]) -> Result<Vec<Reach>, String> {
        let jobs: Vec<(Option<Ipv4Addr>, Ipv4Addr, u32)> = targets
            .iter()
            .map(|t| {
                let from = self.wired.get(t.from).and_then(|w| w.at).map(|(a, _)| a);
                (from, t.to, t.size)
            })
            .collect();
        self.netns
            .run(move || {
                std::thread::scope(|s| {
                    let handles: Vec<_> = jobs
                        .iter()
                        .map(|&(from, to, size)| s.spawn(move || reach(from, to, size)))
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or(Reach::Error))
                        .collect()
                })
            })
            .map_err(|e| e.to_string())
    }

    /// Gives back every interface and address (CNI DEL); the netns goes
    /// with the probe. The errors, if any.
    pub fn finish(mut self) -> Vec<String> {
        self.finished = true;
        self.take_down()
    }

    fn take_down(&self) -> Vec<String> {
        self.wired
            .iter()
            .filter(|w| w.conf.as_ref().is_some_and(|c| skipped(c.mode).is_none()))
            .filter_map(|w| self.del(w, true).err())
            .collect()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.finished {
            for e in self.take_down() {
                tracing::warn!("railnet check: {e}");
            }
        }
    }
}

/// Why a kind of rail is not probed, if it is not.
fn skipped(mode: Mode) -> Option<String> {
    match mode {
        Mode::Sriov | Mode::IbSriov => Some(
            "SR-IOV rails are not probed: their VFs are the device plugin's to hand out \
             (check them with a pod; `railnetctl doctor` checks the PF)"
                .into(),
        ),
        Mode::Chained => Some("chained rails are made by another plugin: not probed".into()),
        _ => None,
    }
}

/// A new network namespace, held by the returned fd (the thread that made
/// it ends at once).
fn new_netns() -> Result<OwnedFd, String> {
    std::thread::spawn(|| -> Result<OwnedFd, String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot make the probe's netns (needs root): {e}"))?;
        let file = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
        Ok(OwnedFd::from(file))
    })
    .join()
    .map_err(|_| "the netns thread panicked".to_owned())?
}

/// A ready rail's link, as looked at from inside the netns.
#[derive(Debug)]
struct OwnLink {
    index: usize,
    ifname: String,
    address: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
    mac: Option<[u8; 6]>,
}

/// A child process whose only thread sits in the probe's netns: the agent
/// takes a pod's netns for alive when a runtime pinned it or a process is
/// in it (`/proc/<pid>/ns/net`), and the probe has no pin. The child
/// waits for the end of a pipe only the probe holds, so it ends with the
/// probe, or with this process however it dies.
#[derive(Debug)]
struct Holder {
    pid: libc::pid_t,
    write: Option<OwnedFd>,
}

impl Holder {
    fn new(netns: &OwnedFd) -> Result<Self, String> {
        use std::os::fd::{AsFd, AsRawFd, FromRawFd};
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 just made these two descriptors; nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let ns = netns.as_raw_fd();
        let r = read.as_raw_fd();
        // SAFETY: the child calls only async-signal-safe system calls
        // (setns, dup2, close_range, read, _exit) before it exits, as a
        // fork of a threaded process must.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: see above; every descriptor but the pipe's read end
            // is closed so no other holder keeps this one's pipe open.
            unsafe {
                if libc::setns(ns, libc::CLONE_NEWNET) != 0 || libc::dup2(r, 0) < 0 {
                    libc::_exit(1);
                }
                libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32);
                let mut byte = 0u8;
                loop {
                    let n = libc::read(0, (&raw mut byte).cast(), 1);
                    if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                        libc::_exit(0);
                    }
                }
            }
        }
        drop(read);
        let holder = Self {
            pid,
            write: Some(write),
        };
        // Returned only once the child is in the netns: the agent looks
        // for a process there at the first ADD, and a child still on its
        // way (fork returned, setns not yet done) would not be found.
        let want = nix::sys::stat::fstat(netns.as_fd())
            .map_err(|e| format!("the probe's netns: {e}"))?
            .st_ino;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let there = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) == want)
                .unwrap_or(false);
            if there {
                return Ok(holder);
            }
            if std::time::Instant::now() > deadline {
                return Err("the probe's netns holder did not enter it within 5 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.write.take());
        // SAFETY: `pid` is our own child; reaping it frees its entry.
        unsafe {
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// One rail's own link, from inside the netns: (carrier, gateway answers,
/// networks whose gateway answers ARP here when its own does not).
fn look_at(link: &OwnLink, gateways: &[(String, Ipv4Addr)]) -> (bool, bool, Vec<String>) {
    let OwnLink {
        ifname,
        address,
        gateway,
        mac,
        ..
    } = link;
    let (address, gateway, mac) = (*address, *gateway, *mac);
    let carrier = wait_carrier(ifname);
    let Some(gateway) = gateway else {
        return (carrier, true, Vec::new());
    };
    let answers = matches!(
        ping::echo(address, gateway, SMALL),
        Ok(ping::Echo::Answered)
    );
    let mut on_link = Vec::new();
    if !answers
        && carrier
        && let Some(mac) = mac
        && let Ok(ifindex) = nix::net::if_::if_nametoindex(ifname.as_str())
    {
        let ips: Vec<Ipv4Addr> = gateways.iter().map(|(_, g)| *g).collect();
        if let Ok(seen) = ping::arp_who_answers(ifindex, mac, &ips) {
            on_link = gateways
                .iter()
                .filter(|(_, g)| seen.contains(g))
                .map(|(n, _)| n.clone())
                .collect();
        }
    }
    (carrier, answers, on_link)
}

/// Whether `ifname` has carrier (`IFF_RUNNING`), waiting a little for a
/// fresh interface.
fn wait_carrier(ifname: &str) -> bool {
    let deadline = Instant::now() + CARRIER_WAIT;
    loop {
        let running = crate::rtnl::carriers().get(ifname) == Some(&true);
        if running || Instant::now() >= deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One target: full size, then small when nothing answers.
fn reach(from: Option<Ipv4Addr>, to: Ipv4Addr, size: u32) -> Reach {
    let Some(from) = from else {
        return Reach::Error;
    };
    match ping::echo(from, to, size) {
        Ok(ping::Echo::Answered) => Reach::Answered,
        Ok(ping::Echo::PathMtu(mtu)) => Reach::PathMtu { mtu },
        Ok(ping::Echo::Silent) => match ping::echo(from, to, SMALL) {
            Ok(ping::Echo::Answered) => Reach::SmallOnly,
            Ok(_) => Reach::Silent,
            Err(_) => Reach::Error,
        },
        Err(_) => Reach::Error,
    }
}
