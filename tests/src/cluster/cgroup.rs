//! A test node's own cgroup, `/<name>` in every cgroup hierarchy the machine
//! mounts (cgroup v1 here, plus the empty v2 one). Everything the node runs
//! — containerd, its shims, kubelet, the pods' containers under the
//! `pods` child that is kubelet's `cgroupRoot` — lives below it, so the node
//! is stopped by ending exactly the processes listed there, and removed
//! with it. Two kubelets sharing a cgroup root would kill each other's pods.

use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// A cgroup created in every hierarchy, with a `pods` child.
#[derive(Debug)]
pub struct NodeCgroup {
    name: String,
    hierarchies: Vec<PathBuf>,
}

/// The cgroup hierarchies mounted under /sys/fs/cgroup.
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2
                && (f[2] == "cgroup" || f[2] == "cgroup2")
                && f[1].starts_with("/sys/fs/cgroup"))
            .then(|| PathBuf::from(f[1]))
        })
        .collect()
}

impl NodeCgroup {
    /// Creates `/<name>` and `/<name>/pods` in every hierarchy. A cpuset
    /// cgroup starts with no CPUs in v1: both get their parent's.
    #[track_caller]
    pub fn create(name: &str) -> Self {
        let hierarchies = hierarchies();
        assert!(
            !hierarchies.is_empty(),
            "no cgroup hierarchy under /sys/fs/cgroup"
        );
        let cg = Self {
            name: name.to_owned(),
            hierarchies,
        };
        for h in &cg.hierarchies {
            for dir in [h.join(name), h.join(name).join("pods")] {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    if dir.join(file).exists() {
                        let v = std::fs::read_to_string(h.join(file)).unwrap();
                        std::fs::write(dir.join(file), v.trim()).unwrap();
                    }
                }
            }
        }
        cg
    }

    /// An existing cgroup of that name (an earlier cluster's leftover).
    pub fn adopt(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            hierarchies: hierarchies(),
        }
    }

    /// kubelet's `cgroupRoot`.
    pub fn pods_root(&self) -> String {
        format!("/{}/pods", self.name)
    }

    /// Makes `cmd` start inside this cgroup (in every hierarchy), before it
    /// runs anything: what it starts later is inside too.
    pub fn start_inside(&self, cmd: &mut Command) {
        let procs: Vec<CString> = self
            .hierarchies
            .iter()
            .map(|h| {
                CString::new(
                    h.join(&self.name)
                        .join("cgroup.procs")
                        .as_os_str()
                        .as_bytes(),
                )
                .expect("no NUL in a cgroup path")
            })
            .collect();
        // SAFETY: between fork and exec only async-signal-safe calls (open,
        // write, close) on strings made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // "0": the writing process (cgroup v1 and v2).
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// Every process in the cgroup or below.
    pub fn pids(&self) -> Vec<i32> {
        fn walk(dir: &Path, out: &mut Vec<i32>) {
            if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        for h in &self.hierarchies {
            walk(&h.join(&self.name), &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Ends every process in the cgroup (SIGKILL, until none is left: a
    /// dying shim may start nothing new, but one forked a moment ago must
    /// be caught too), then removes the cgroups, deepest first.
    pub fn kill_all_and_remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a PID read from our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for h in &self.hierarchies {
            let mut dirs = Vec::new();
            fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
                for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        collect(&e.path(), out);
                    }
                }
                out.push(dir.to_owned());
            }
            collect(&h.join(&self.name), &mut dirs);
            for d in dirs {
                // A cgroup whose last task just exited can be busy a moment.
                for _ in 0..50 {
                    if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Cgroup directories still left (for the leftover check).
    pub fn leftovers(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.join(&self.name))
            .filter(|p| p.exists())
            .collect()
    }
}
