//! The node daemon behind `railnet-agent`: checks its flags against the
//! node, opens the allocation store, takes over what an earlier agent left,
//! and serves the CNI socket and `/metrics` until SIGTERM.
//!
//! - `args`: the flags.
//! - `start`: everything before the first request (checks, the node lock,
//!   the store, adoption of pins and tombstones).
//! - `serve`: the socket, the metrics endpoint, the background tasks, and
//!   what is done on the way out.
//! - `upkeep`: the sweep, adoption, the RailPool reader.

mod args;
mod serve;
mod start;
mod upkeep;

use std::process::ExitCode;

pub use args::{Args, AttachKind, StoreKind};

/// Exit codes a supervisor can act on.
pub mod exit {
    /// Anything not listed below.
    pub const FAILURE: u8 = 1;
    /// A flag or the pools file is wrong.
    pub const CONFIG: u8 = 2;
    /// The binary was built without the BPF program.
    pub const STUB_BPF: u8 = 3;
    /// The socket or the metrics address cannot be bound.
    pub const BIND: u8 = 4;
    /// The allocation store cannot be opened.
    pub const STORE: u8 = 5;
    /// Another agent serves this node.
    pub const LOCKED: u8 = 6;
}

/// Why the agent stops before serving: the exit code and what to say.
#[derive(Debug)]
pub struct Failure {
    /// One of [`exit`]'s codes.
    pub code: u8,
    /// One line each, said on stderr after `railnet-agent: `.
    pub lines: Vec<String>,
}

impl Failure {
    fn new(code: u8, line: impl Into<String>) -> Self {
        Failure {
            code,
            lines: vec![line.into()],
        }
    }
}

/// Runs the agent; returns when it is told to stop or cannot go on.
pub fn run(args: Args) -> ExitCode {
    let started = match start::start(&args) {
        Ok(s) => s,
        Err(f) => {
            for line in f.lines {
                eprintln!("railnet-agent: {line}");
            }
            return ExitCode::from(f.code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("railnet-agent: tokio runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = runtime.block_on(serve::serve(args, started.service.clone()));
    drop(started);
    ExitCode::from(code)
}
