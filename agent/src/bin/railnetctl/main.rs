//! `railnetctl`: railnet's command-line tool, for the people who run it and
//! for pods that read their own rails. It ships in railnet's image beside
//! the agent, the controller and the CNI plugin; the CNI binary (`railnet`)
//! stays what Multus executes and nothing else.
//!
//! - `railnetctl doctor`: a node's host checks before it runs RDMA pods
//!   (with `--compare`, every node's, and what differs between them).
//! - `railnetctl pod-info`: inside a pod, its `rails.json` and `nccl.env`
//!   from the records railnet left on its interfaces (the webhook's init
//!   container runs it).
//! - `railnetctl import spiderpool FILE…`: SpiderIPPools and
//!   SpiderMultusConfigs as RailPools and RailNetworks.
//!
//! - `railnetctl check`: every rail of every node, probed as a pod would
//!   use it (reachability, gateway, full MTU with DF, cabling): a matrix.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

mod agents;
mod check;
mod check_kube;
mod doctor;
mod import;
mod pod_info;

/// railnet's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "railnetctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The host checks the AI-cluster guides ask for before a node runs
    /// RDMA pods (RDMA netns mode, link layer, MTU, …), each failure with
    /// its fix; exit 1 if any fails. Run on the node (as root).
    Doctor {
        /// The RDMA netns mode this node's networks need: exclusive for
        /// SR-IOV/InfiniBand with rdmaIsolation, shared for macvlan.
        /// Without it the mode is only reported.
        #[arg(long)]
        expect: Option<Mode>,
        /// Every node's doctor, run in its agent through the API server
        /// (`pods/exec`, the chart's checker roles): what differs between
        /// the nodes' rail NICs (PFC, DSCP trust, ECN, ToS), rail by rail.
        #[arg(long)]
        compare: bool,
        /// With `--compare`: the namespace of railnet's agents.
        #[arg(short, long, requires = "compare")]
        namespace: Option<String>,
        /// `text` or `json`.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Inside a pod: writes `<out>/rails.json` and `<out>/nccl.env` from the
    /// records railnet left on the pod's rail interfaces. Needs no
    /// privilege, no hostPath and no API access.
    PodInfo {
        /// Where to write the two files.
        #[arg(long, default_value = railnet_agent::webhook::RAIL_INFO_PATH)]
        out: PathBuf,
    },
    /// Every rail of every node probed as a pod uses it: each node's
    /// agent wires a throwaway netns, which echoes every other node on
    /// each rail at the rail's MTU with DF set and one other rail across
    /// the spine. Prints a matrix (rows nodes, columns rail networks);
    /// exit 1 on any fault, 2 if the check could not run.
    Check(check::Check),
    /// Turns another tool's objects into railnet's, on stdout as YAML;
    /// what could not be mapped goes to stderr with why (exit 1).
    Import {
        #[command(subcommand)]
        from: import::From,
    },
}

/// An RDMA netns mode, as `--expect` names it.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Exclusive,
    Shared,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Doctor {
            expect,
            compare,
            namespace,
            output,
        } => doctor(expect, compare, namespace.as_deref(), &output),
        Command::PodInfo { out } => pod_info::run(&out),
        Command::Import { from } => import::run(from),
        Command::Check(args) => check::run(args),
    }
}

fn doctor(expect: Option<Mode>, compare: bool, namespace: Option<&str>, output: &str) -> ExitCode {
    use railnet_agent::rdma::NetnsMode;
    let json = match output {
        "json" => true,
        "text" => false,
        other => {
            eprintln!("railnetctl doctor: -o {other:?}: use text or json");
            return ExitCode::from(2);
        }
    };
    if compare {
        return doctor::compare_nodes(namespace, json);
    }
    doctor::here(
        expect.map(|m| match m {
            Mode::Exclusive => NetnsMode::Exclusive,
            Mode::Shared => NetnsMode::Shared,
        }),
        json,
    )
}
