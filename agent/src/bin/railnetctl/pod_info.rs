//! `railnetctl pod-info [--out <dir>]`: run inside a pod (the webhook's
//! init container, with `controller.webhook.railInfoSource:
//! initContainer`), writes the pod's `rails.json` and `nccl.env` into
//! `<dir>` (default `/etc/railnet`, an emptyDir the pod's containers mount)
//! from the records the agent left on the pod's rail interfaces. Needs no
//! hostPath, no API access and no privilege: what Pod Security `baseline`
//! and `restricted` allow.

use std::{path::Path, process::ExitCode};

/// Reads this pod's rails and writes the two files into `out`.
pub(crate) fn run(out: &Path) -> ExitCode {
    let rails = match railnet_agent::podinfo::rails_here() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("railnetctl pod-info: reading this pod's interfaces: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = railnet_agent::podinfo::write_files(out, &rails) {
        eprintln!("railnetctl pod-info: writing {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    // What the pod's log shows: one line per rail.
    for r in &rails {
        let device = r.rdma.as_ref().map_or_else(
            || "no RDMA device".to_owned(),
            |d| format!("{} port {}", d.device, d.port),
        );
        println!(
            "rail {} {} {} {device}",
            r.rail,
            r.interface,
            r.ips.join(",")
        );
    }
    if rails.is_empty() {
        println!("no railnet rail in this pod");
    }
    ExitCode::SUCCESS
}
