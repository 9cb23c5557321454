//! Running work inside a pod's network namespace.
//!
//! `setns` changes only the calling thread, so each piece of netns work gets a
//! fresh OS thread that enters the namespace, opens its netlink sockets there
//! (a socket stays bound to the netns it was created in) and exits when done.
//! Never a tokio worker: one would go back to the pool in the wrong netns.

use std::{
    collections::HashMap,
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

    /// Wraps a received fd if it is a network namespace (`NS_GET_NSTYPE`);
    /// any other fd means nothing to the agent and is refused.
    pub fn checked(fd: OwnedFd) -> Result<Self, OwnedFd> {
        if is_network_namespace(fd.as_fd()) {
            Ok(Self { fd })
        } else {
            Err(fd)
        }
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

    /// The namespace's identity, recorded at ADD so the sweep can tell
    /// when the pod is gone. Zeroes where the kernel would not say.
    pub fn id(&self) -> NetnsId {
        let inode = nix::sys::stat::fstat(self.fd.as_fd())
            .map(|s| s.st_ino)
            .unwrap_or(0);
        let cookie = self.run(current_cookie).ok().flatten().unwrap_or(0);
        NetnsId { inode, cookie }
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
                Ok(crate::rtnl::one_connection(work))
            })
            .map_err(|e| NetnsError::Thread(e.to_string()))?;
        handle
            .join()
            .map_err(|_| NetnsError::Thread("panicked".into()))?
    }
}

/// Who a network namespace is. The nsfs inode alone is not enough: the
/// kernel hands a dead namespace's inode number to the next one created (an
/// IDA, lowest free first), so on a busy node a vanished pod's inode is soon
/// some other pod's. The netns cookie (`SO_NETNS_COOKIE`, Linux 5.14) is
/// never reused while the host runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetnsId {
    /// nsfs inode number; 0 if unknown.
    pub inode: u64,
    /// Netns cookie; 0 if unknown (then the inode alone decides).
    pub cookie: u64,
}

/// The cookie of the calling thread's current netns.
fn current_cookie() -> Option<u64> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a valid u64 buffer of `len` bytes that outlives
    // the call; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

pub use railnet_wire::netns::is_network_namespace;

/// A path that opens the network namespace with nsfs inode `inode`: one a
/// runtime pinned (`/run/netns`, `/var/run/netns`) or one a process is in
/// (`/proc/<pid>/ns/net`); `None` when nothing holds it any more.
pub fn path_of(inode: u64) -> Option<std::path::PathBuf> {
    let is = |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.ino() == inode);
    for dir in ["/run/netns", "/var/run/netns"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if is(&e.path()) {
                return Some(e.path());
            }
        }
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|p| p.path().join("ns/net"))
        .find(|p| is(p))
}

/// Every network namespace this host can see alive: those held by a
/// process (`/proc/*/ns/net`) and those pinned by a runtime (`/run/netns`,
/// `/var/run/netns`), each with its cookie where it could be read.
#[derive(Debug, Default)]
pub struct LiveNetns {
    cookies: HashMap<u64, Option<u64>>,
}

impl LiveNetns {
    /// Looks at every namespace now. The cookies are read on one thread
    /// that enters each namespace in turn and then ends.
    pub fn scan() -> Self {
        let mut paths: HashMap<u64, std::path::PathBuf> = HashMap::new();
        let mut note = |path: std::path::PathBuf| {
            if let Ok(m) = std::fs::metadata(&path) {
                paths.entry(m.ino()).or_insert(path);
            }
        };
        for dir in ["/run/netns", "/var/run/netns"] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    note(e.path());
                }
            }
        }
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                if p.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                {
                    note(p.path().join("ns/net"));
                }
            }
        }
        let unread: HashMap<u64, Option<u64>> = paths.keys().map(|ino| (*ino, None)).collect();
        let read = std::thread::Builder::new()
            .name("railnet-netns-scan".into())
            .spawn(move || {
                paths
                    .into_iter()
                    .map(|(ino, path)| {
                        // A namespace that cannot be entered counts as
                        // alive with an unknown cookie: never sweep a
                        // live pod on a guess.
                        let cookie = File::open(&path)
                            .ok()
                            .filter(|f| setns(f.as_fd(), CloneFlags::CLONE_NEWNET).is_ok())
                            .and_then(|_| current_cookie());
                        (ino, cookie)
                    })
                    .collect::<HashMap<_, _>>()
            })
            .and_then(|h| h.join().map_err(|_| std::io::Error::other("panicked")));
        match read {
            Ok(cookies) => Self { cookies },
            Err(e) => {
                tracing::warn!(error = %e, "could not read netns cookies; judging by inode only");
                Self { cookies: unread }
            }
        }
    }

    /// Whether the namespace recorded as `id` is still alive. Unknown parts
    /// of `id` (zero) are not held against it.
    pub fn contains(&self, id: NetnsId) -> bool {
        match self.cookies.get(&id.inode) {
            None => false,
            Some(None) => true,
            Some(Some(cookie)) => id.cookie == 0 || *cookie == id.cookie,
        }
    }
}
