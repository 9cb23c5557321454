//! `railnetctl check`: the rail matrix of every node, as a person reads it
//! or as JSON, exit 1 on any fault.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand, ValueEnum};
use railnet_agent::railcheck::run::{self, Local, Session};
use railnet_wire::api::DEFAULT_SOCKET;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Check {
    #[command(subcommand)]
    side: Option<Side>,
    /// A rail network's CNI config (JSON, as a NAD's `spec.config`), one
    /// per rail: checks this box's fabric through the agents named by
    /// `--node`. Without it, the cluster's RailNetworks through the API
    /// server.
    #[arg(long = "conf")]
    confs: Vec<PathBuf>,
    /// `NAME=SOCKET`: a node of this box's fabric and its agent's socket
    /// (repeat per node). Default: this host and the agent's usual socket.
    #[arg(long = "node", requires = "confs")]
    nodes: Vec<String>,
    /// In Kubernetes: the namespace of railnet's agents (default: found
    /// in any namespace by their labels).
    #[arg(short, long, conflicts_with = "confs")]
    namespace: Option<String>,
    /// How to print the matrix.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Side {
    /// The node's end of a check (what `pods/exec` runs in an agent's
    /// container): JSON lines on stdin and stdout.
    #[command(hide = true)]
    Node {
        /// The agent's socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

pub fn run(args: Check) -> ExitCode {
    if let Some(Side::Node { socket }) = args.side {
        let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
        return match run::serve(&socket, &mut stdin.lock(), &mut stdout.lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("railnetctl check node: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let prepared = if args.confs.is_empty() {
        crate::check_kube::sessions(args.namespace.as_deref())
    } else {
        local(&args.confs, &args.nodes)
    };
    let (sessions, networks) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("railnetctl check: {e}");
            return ExitCode::from(2);
        }
    };
    let nodes = sessions.len();
    let matrix = run::check(sessions, &networks);
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&matrix).expect("the matrix serialises")
        ),
        Output::Table => {
            println!(
                "railnet check: {nodes} node(s) × {} rail network(s), {} echoes\n",
                networks.len(),
                matrix.echoes
            );
            print!("{matrix}");
        }
    }
    if matrix.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

use crate::check_kube::Prepared;

/// This box: the configs from files, a session per `--node`.
fn local(confs: &[PathBuf], nodes: &[String]) -> Result<Prepared, String> {
    let networks = confs
        .iter()
        .map(|path| {
            let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_slice::<serde_json::Value>(&text)
                .map_err(|e| format!("{}: not a CNI config (JSON): {e}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sessions: Vec<Box<dyn Session>> = if nodes.is_empty() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "this-node".into());
        vec![Box::new(Local::new(host, DEFAULT_SOCKET))]
    } else {
        nodes
            .iter()
            .map(|spec| {
                let (name, socket) = spec.split_once('=').ok_or_else(|| {
                    format!(
                        "--node {spec:?}: write it NAME=SOCKET (the node and its agent's socket)"
                    )
                })?;
                Ok(Box::new(Local::new(name, socket)) as Box<dyn Session>)
            })
            .collect::<Result<_, String>>()?
    };
    Ok((sessions, networks))
}
