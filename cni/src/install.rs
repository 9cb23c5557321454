//! `railnet install <dir>`: the DaemonSet's init container puts this very
//! binary on the node as `<dir>/railnet` and `<dir>/railnet-ipam`. The image
//! has no shell, so the binary does it itself; each copy is written under a
//! temporary name and renamed, so a runtime never executes half a file.

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// The names the binary is installed under.
const NAMES: [&str; 2] = ["railnet", "railnet-ipam"];

/// Runs `railnet install <dir>`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    let [dir] = args else {
        eprintln!(
            "usage: railnet install <cni-bin-dir>\n  copies this binary to <cni-bin-dir>/railnet and \
             <cni-bin-dir>/railnet-ipam (the chart's init container runs it)"
        );
        return ExitCode::from(2);
    };
    match install(Path::new(dir)) {
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

fn install(dir: &Path) -> Result<Vec<PathBuf>, String> {
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory: mount the node's CNI bin dir there (chart: cni.binDir)",
            dir.display()
        ));
    }
    let me = std::fs::read("/proc/self/exe").map_err(|e| format!("reading /proc/self/exe: {e}"))?;
    let mut done = Vec::new();
    for name in NAMES {
        let tmp = dir.join(format!(".{name}.tmp"));
        let dst = dir.join(name);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&me)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dst)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("writing {}: {e}", dst.display()));
        }
        done.push(dst);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_both_names_executable_and_refuses_a_missing_dir() {
        let dir = std::env::temp_dir().join(format!("railnet-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let done = install(&dir).unwrap();
        assert_eq!(done.len(), 2);
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
        let err = install(&dir.join("missing")).unwrap_err();
        assert!(
            err.contains("not a directory") && err.contains("cni.binDir"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
