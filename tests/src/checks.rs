//! Outside checkers run on what railnet writes: TLS material for test
//! servers, promtool on metrics, strict validation of manifests.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use crate::{ScratchDir, sh};

/// A throwaway CA: `ca.crt`/`ca.key` in `dir` (openssl, valid a day).
pub fn test_ca(dir: &Path, cn: &str) {
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj",
        ],
        &format!("/CN={cn}"),
    );
}

/// `<name>.crt`/`<name>.key` in `dir`, for `subject`, signed by
/// [`test_ca`]'s CA with the openssl extensions `ext` (usage, SANs).
pub fn test_certificate(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
        ],
        subject,
    );
    std::fs::write(dir.join(&extfile), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
        ],
        &extfile,
    );
}

fn openssl(dir: &Path, args: &[&str], last: &str) {
    sh(Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .arg(last));
}

/// `promtool check metrics` on an exposition: whether it passed, and what
/// it said (problems and lint warnings).
pub fn promtool_check(text: &str) -> (bool, String) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// kubernetes-validate --strict on manifests (YAML or JSON): unknown or
/// misplaced fields fail, naming them.
#[track_caller]
pub fn validate_strict(manifests: &str) {
    let dir = ScratchDir::new("validate");
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, manifests).unwrap();
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "--no-warn",
        ])
        .arg(&file)
        .output()
        .expect("python3 -m kubernetes_validate (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "kubernetes-validate --strict:\n{}{}\n{manifests}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
