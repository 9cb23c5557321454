//! Test fabrics made of real network namespaces, and the real railnet
//! binaries run inside them. Shared by the privileged integration tests and
//! by `cargo xtask demo`.
//!
//! Every address lives inside a namespace this module created; the root
//! namespace never gets an address or a route. Everything is removed on
//! drop, processes are ended by PID.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

pub mod apiserver;
pub mod bounds;
pub mod cluster;
pub mod kube_scale;

mod agent;
mod checks;
mod fabric;
mod netlink;
mod netns;

pub use agent::*;
pub use checks::*;
pub use fabric::*;
pub use netlink::*;
pub use netns::*;

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
