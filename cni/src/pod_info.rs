//! `railnet pod-info [--out <dir>]`: run inside a pod (the webhook's init
//! container, with `controller.webhook.railInfo: initContainer`), writes
//! the pod's `rails.json` and `nccl.env` into `<dir>` (default
//! `/etc/railnet`, an emptyDir the pod's containers mount) from the records
//! the agent left on the pod's rail interfaces. Needs no hostPath, no API
//! access and no privilege: what Pod Security `baseline` and `restricted`
//! allow.

use std::{path::PathBuf, process::ExitCode};

const USAGE: &str = "usage: railnet pod-info [--out <dir>]
  inside a pod: writes <dir>/rails.json and <dir>/nccl.env (default /etc/railnet)
  from the records railnet left on the pod's rail interfaces";

/// Runs `railnet pod-info [--out <dir>]`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    let mut out = PathBuf::from(railnet_agent::webhook::RAIL_INFO_PATH);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), a.strip_prefix("--out=")) {
            (_, Some(dir)) => out = dir.into(),
            ("--out", None) => match it.next() {
                Some(dir) => out = dir.into(),
                None => return usage("--out needs a directory"),
            },
            ("-h" | "--help", None) => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            (other, None) => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let rails = match railnet_agent::podinfo::rails_here() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("railnet pod-info: reading this pod's interfaces: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = railnet_agent::podinfo::write_files(&out, &rails) {
        eprintln!("railnet pod-info: writing {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    // What the pod's log shows: one line per rail.
    for r in &rails {
        println!(
            "rail {} {} {} {}",
            r.rail,
            r.interface,
            r.ips.join(","),
            r.rdma.as_ref().map_or_else(
                || "no RDMA device".to_owned(),
                |d| format!("{} port {}", d.device, d.port)
            ),
        );
    }
    if rails.is_empty() {
        println!("no railnet rail in this pod");
    }
    ExitCode::SUCCESS
}

fn usage(why: &str) -> ExitCode {
    eprintln!("railnet pod-info: {why}\n{USAGE}");
    ExitCode::from(2)
}
