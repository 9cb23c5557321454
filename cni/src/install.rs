//! `railnet install <dir> [--socket <path>] [--tombstones <dir>]`: the
//! DaemonSet's init container puts this very binary on the node as
//! `<dir>/railnet` and `<dir>/railnet-ipam`, `railnetctl` (the operator
//! tool, from beside it in the image) as `<dir>/railnetctl`, and the node's
//! settings (where its agent listens and takes tombstones, see
//! [`crate::node`]) beside them.
//! The image has no shell, so the binary does it itself; each file is
//! written under a temporary name and renamed, so a runtime never executes
//! or reads half a file.

use crate::node::{NodeSettings, SETTINGS_FILE};
use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// The names the binary is installed under.
const NAMES: [&str; 2] = ["railnet", "railnet-ipam"];

/// The operator tool, installed beside them when the image has it.
const CTL: &str = "railnetctl";

const USAGE: &str = "usage: railnet install <cni-bin-dir> [--socket <path>] [--tombstones <dir>]
  copies this binary to <cni-bin-dir>/railnet and <cni-bin-dir>/railnet-ipam and writes
  the node's agent socket and tombstone directory beside them (the chart's init container
  runs it; defaults: /run/railnet/agent.sock, /var/lib/railnet/tombstones)";

/// Runs `railnet install <dir> [--socket <path>] [--tombstones <dir>]`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    let (dir, settings) = match parse(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("railnet install: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match install(Path::new(&dir), &settings) {
        Ok(done) => {
            for p in done {
                println!("installed {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("railnet install: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The directory and the node's settings from the arguments.
fn parse(args: &[String]) -> Result<(String, NodeSettings), String> {
    let mut settings = NodeSettings::default();
    let mut dir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, value) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            value
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{key} needs a value"))
        };
        match key {
            "--socket" => settings.agent_socket = absolute(key, value()?)?,
            "--tombstones" => settings.tombstone_dir = absolute(key, value()?)?,
            k if k.starts_with('-') => return Err(format!("unknown option {k}")),
            _ if dir.is_none() => dir = Some(a.clone()),
            _ => return Err(format!("unexpected argument {a}")),
        }
    }
    Ok((dir.ok_or("the CNI bin dir is missing")?, settings))
}

fn absolute(key: &str, value: String) -> Result<PathBuf, String> {
    let p = PathBuf::from(&value);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!(
            "{key} {value} must be an absolute path without '..'"
        ));
    }
    Ok(p)
}

fn install(dir: &Path, settings: &NodeSettings) -> Result<Vec<PathBuf>, String> {
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory: mount the node's CNI bin dir there (chart: cni.binDir)",
            dir.display()
        ));
    }
    let me = std::fs::read("/proc/self/exe").map_err(|e| format!("reading /proc/self/exe: {e}"))?;
    let mut done = Vec::new();
    for name in NAMES {
        done.push(write_file(dir, name, &me, 0o755)?);
    }
    // The operator tool, where the image has it beside this binary: on
    // the node too, for `railnetctl doctor` there.
    let ctl = std::fs::read_link("/proc/self/exe")
        .ok()
        .and_then(|p| Some(p.parent()?.join(CTL)))
        .filter(|p| p.is_file());
    if let Some(ctl) = ctl {
        let bytes = std::fs::read(&ctl).map_err(|e| format!("reading {}: {e}", ctl.display()))?;
        done.push(write_file(dir, CTL, &bytes, 0o755)?);
    }
    let body = serde_json::to_vec_pretty(settings).map_err(|e| e.to_string())?;
    done.push(write_file(dir, SETTINGS_FILE, &body, 0o644)?);
    Ok(done)
}

/// Writes `dir/name` under a temporary name, then renames it.
fn write_file(dir: &Path, name: &str, body: &[u8], mode: u32) -> Result<PathBuf, String> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("writing {}: {e}", dst.display()));
    }
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_both_names_executable_and_refuses_a_missing_dir() {
        let dir = std::env::temp_dir().join(format!("railnet-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let settings = NodeSettings {
            agent_socket: "/run/rn/agent.sock".into(),
            tombstone_dir: "/var/lib/rn/tombstones".into(),
        };
        let done = install(&dir, &settings).unwrap();
        assert_eq!(done.len(), 3);
        assert_eq!(
            crate::node::read_settings(&dir).unwrap(),
            Some(settings.clone()),
            "the node's settings beside the binaries"
        );
        let me = std::fs::read("/proc/self/exe").unwrap();
        for name in NAMES {
            let p = dir.join(name);
            assert_eq!(
                std::fs::read(&p).unwrap(),
                me,
                "{name} is a copy of the binary"
            );
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755);
        }
        assert!(!dir.join(".railnet.tmp").exists());
        let err = install(&dir.join("missing"), &settings).unwrap_err();
        assert!(
            err.contains("not a directory") && err.contains("cni.binDir"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn arguments_set_the_node_s_paths_absolute_only() {
        let args = |a: &[&str]| parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (dir, s) = args(&[
            "/host/cni",
            "--socket=/run/x/agent.sock",
            "--tombstones",
            "/var/lib/x/t",
        ])
        .unwrap();
        assert_eq!(dir, "/host/cni");
        assert_eq!(s.agent_socket, PathBuf::from("/run/x/agent.sock"));
        assert_eq!(s.tombstone_dir, PathBuf::from("/var/lib/x/t"));
        assert_eq!(args(&["/host/cni"]).unwrap().1, NodeSettings::default());
        assert!(
            args(&["/host/cni", "--socket", "x.sock"])
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            args(&["/host/cni", "--tombstones", "/a/../etc"])
                .unwrap_err()
                .contains("'..'")
        );
        assert!(
            args(&["/host/cni", "--bogus"])
                .unwrap_err()
                .contains("unknown option")
        );
        assert!(args(&[]).unwrap_err().contains("missing"));
    }
}
