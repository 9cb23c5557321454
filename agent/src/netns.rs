//! Running work inside a pod's network namespace.
//!
//! `setns` changes only the calling thread, so each piece of netns work gets a
//! fresh OS thread that enters the namespace, opens its netlink sockets there
//! (a socket stays bound to the netns it was created in) and exits when done.
//! Never a tokio worker: one would go back to the pool in the wrong netns.

use std::{
    collections::HashSet,
    fs::File,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use nix::sched::{CloneFlags, setns};

/// A handle on a pod's network namespace (an open nsfs file).
#[derive(Debug)]
pub struct PodNetns {
    fd: OwnedFd,
}

/// Errors entering or running in a netns.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path could not be opened.
    #[error("cannot open netns {path}: {source}")]
    Open {
        /// What was asked for.
        path: String,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The fd is not a network namespace.
    #[error("{what} is not a network namespace ({source})")]
    NotNetns {
        /// What was passed.
        what: String,
        /// What `setns` said.
        source: nix::Error,
    },
    /// The worker thread could not start or panicked.
    #[error("netns worker thread failed: {0}")]
    Thread(String),
}

impl PodNetns {
    /// Wraps an fd received from the CNI (or opened locally).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Opens a netns by path (`/var/run/netns/x`, `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            fd: OwnedFd::from(file),
        })
    }

    /// The namespace's inode: its identity while it lives.
    pub fn inode(&self) -> Option<u64> {
        nix::sys::stat::fstat(self.fd.as_fd())
            .ok()
            .map(|s| s.st_ino)
    }

    /// The namespace's fd, e.g. for `IFLA_NET_NS_FD`.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Runs `work` on a new thread inside this netns and returns its result.
    /// The thread ends with the work, so no thread outlives it in the wrong
    /// namespace.
    pub fn run<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| NetnsError::Thread(format!("dup netns fd: {e}")))?;
        let handle = std::thread::Builder::new()
            .name("railnet-netns".into())
            .spawn(move || {
                setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::NotNetns {
                        what: "the fd passed by the CNI".into(),
                        source,
                    }
                })?;
                Ok(work())
            })
            .map_err(|e| NetnsError::Thread(e.to_string()))?;
        handle
            .join()
            .map_err(|_| NetnsError::Thread("panicked".into()))?
    }
}

/// Inodes of every network namespace this host can see alive: those held
/// by a process (`/proc/*/ns/net`) and those pinned by a runtime
/// (`/run/netns`, `/var/run/netns`).
pub fn live_netns_inodes() -> HashSet<u64> {
    let mut live = HashSet::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if let Ok(m) = std::fs::metadata(e.path()) {
                    live.insert(m.ino());
                }
            }
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let name = p.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit())
                && let Ok(m) = std::fs::metadata(p.path().join("ns/net"))
            {
                live.insert(m.ino());
            }
        }
    }
    live
}
