//! `railnet-agent`: the node daemon. Thin: the process's own settings,
//! the flags, then [`railnet_agent::daemon::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Each CNI request is served on a thread of its own, and glibc gives
    // threads malloc arenas of their own (up to 8 per CPU) whose freed
    // fragments stay resident for the agent's life (~5 MB at 65 000
    // allocations in `bench ipam`). Two suffice for an agent that mostly
    // waits on netlink and fsync.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt with a valid parameter, before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    railnet_agent::daemon::run(railnet_agent::daemon::Args::parse())
}
