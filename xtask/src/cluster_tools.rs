//! The real Kubernetes components the cluster tests run, built from the Go
//! module proxy at pinned versions (nothing is downloaded from anywhere
//! else) into the tool cache, once: `/var/tmp/railnet-tools/<name>-<version>/`.
//!
//! Each is built from a small module of ours under `tests/cluster/build/`
//! whose committed go.mod/go.sum pin it: Kubernetes and etcd replace their
//! sibling modules with local paths, which `go install m@v` refuses, so
//! those modules require the matching releases instead.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run;

/// The tool cache.
pub const TOOLS: &str = "/var/tmp/railnet-tools";

/// One component built with `go build`.
pub struct GoComponent {
    /// Directory name in the tool cache (with the version).
    pub name: &'static str,
    /// The pinned release.
    pub version: &'static str,
    /// Our build module, under `tests/cluster/build/`.
    module: &'static str,
    /// (package, output binary name).
    packages: &'static [(&'static str, &'static str)],
    /// `-X` settings so the binaries report their real version.
    version_vars: &'static [&'static str],
}

/// Kubernetes' own version variables (hack/lib/version.sh sets these).
const KUBE_VERSION_VARS: &[&str] = &[
    "k8s.io/component-base/version.gitVersion=v1.37.2",
    "k8s.io/component-base/version.gitMajor=1",
    "k8s.io/component-base/version.gitMinor=37",
    "k8s.io/component-base/version.gitTreeState=clean",
    "k8s.io/client-go/pkg/version.gitVersion=v1.37.2",
];

/// Every component, in build order.
pub const COMPONENTS: &[GoComponent] = &[
    GoComponent {
        name: "kubernetes",
        version: "v1.37.2",
        module: "kubernetes",
        packages: &[
            ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
            (
                "k8s.io/kubernetes/cmd/kube-controller-manager",
                "kube-controller-manager",
            ),
            ("k8s.io/kubernetes/cmd/kube-scheduler", "kube-scheduler"),
            ("k8s.io/kubernetes/cmd/kubelet", "kubelet"),
            ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
        ],
        version_vars: KUBE_VERSION_VARS,
    },
    GoComponent {
        name: "etcd",
        version: "v3.6.16",
        module: "etcd",
        packages: &[("go.etcd.io/etcd/server/v3", "etcd")],
        version_vars: &[],
    },
    GoComponent {
        name: "containerd",
        version: "v2.4.2",
        module: "containerd",
        packages: &[
            (
                "github.com/containerd/containerd/v2/cmd/containerd",
                "containerd",
            ),
            (
                "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
                "containerd-shim-runc-v2",
            ),
            ("github.com/containerd/containerd/v2/cmd/ctr", "ctr"),
        ],
        version_vars: &["github.com/containerd/containerd/v2/version.Version=v2.4.2"],
    },
    GoComponent {
        name: "multus",
        version: "v4.3.0",
        module: "multus",
        packages: &[(
            "gopkg.in/k8snetworkplumbingwg/multus-cni.v4/cmd/multus",
            "multus",
        )],
        version_vars: &[],
    },
];

/// Built for `cargo xtask bench cluster` only: whereabouts, the cluster-wide
/// reference IPAM railnet is compared with (the tests do not need it).
pub const BENCH_COMPONENTS: &[GoComponent] = &[GoComponent {
    name: "whereabouts",
    version: "v0.9.2",
    module: "whereabouts",
    packages: &[(
        "github.com/k8snetworkplumbingwg/whereabouts/cmd",
        "whereabouts",
    )],
    version_vars: &[],
}];

/// The directory of whereabouts's CRDs in the module cache (the module is
/// there once [`BENCH_COMPONENTS`] are built).
pub fn whereabouts_crds(root: &Path) -> Result<PathBuf> {
    let out = go()?
        .current_dir(root.join("tests/cluster/build/whereabouts"))
        .args(["env", "GOMODCACHE"])
        .output()?;
    let cache = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(Path::new(&cache).join("github.com/k8snetworkplumbingwg/whereabouts@v0.9.2/doc/crds"))
}

/// The Go toolchain that builds them: the machine's own (1.26, in
/// /usr/local/go), not Debian's golang-go (1.19, which builds the libcni
/// client) that may sit beside it on PATH.
pub fn go() -> Result<Command> {
    let local = Path::new("/usr/local/go/bin/go");
    let bin = if local.is_file() {
        local
    } else {
        Path::new("go")
    };
    let out = Command::new(bin)
        .arg("env")
        .arg("GOVERSION")
        .output()
        .with_context(|| {
            format!(
                "cannot run {}: the cluster components need Go 1.26 or newer",
                bin.display()
            )
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let minor = version
        .strip_prefix("go1.")
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    if minor.is_none_or(|m| m < 26) {
        bail!(
            "{} is {version}; Kubernetes 1.37 needs Go 1.26 or newer (install it at /usr/local/go, or export GOTOOLCHAIN=go1.27.3)",
            bin.display()
        );
    }
    Ok(Command::new(bin))
}

impl GoComponent {
    /// Where its binaries are.
    pub fn dir(&self) -> PathBuf {
        Path::new(TOOLS).join(format!("{}-{}", self.name, self.version))
    }

    /// Whether every binary is there.
    pub fn present(&self) -> bool {
        self.packages
            .iter()
            .all(|(_, bin)| self.dir().join(bin).is_file())
    }

    /// Builds it (static, no cgo) into a temporary directory renamed into
    /// place, so an interrupted build is never taken for a finished one.
    pub fn build(&self, root: &Path) -> Result<()> {
        let module = root.join("tests/cluster/build").join(self.module);
        let tmp = Path::new(TOOLS).join(format!(".{}-{}.tmp", self.name, self.version));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let mut ldflags = String::from("-s -w");
        for v in self.version_vars {
            ldflags.push_str(" -X ");
            ldflags.push_str(v);
        }
        for (pkg, bin) in self.packages {
            run(go()?
                .current_dir(&module)
                .env("CGO_ENABLED", "0")
                // go.sum is committed: a changed dependency is an error.
                .env("GOFLAGS", "-mod=readonly -buildvcs=false")
                .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
                .arg(tmp.join(bin))
                .arg(pkg))
            .with_context(|| format!("building {pkg} {}", self.version))?;
        }
        let _ = std::fs::remove_dir_all(self.dir());
        std::fs::rename(&tmp, self.dir())?;
        Ok(())
    }
}

/// The pause image's binary: Kubernetes' own `build/pause/linux/pause.c`
/// (in the Kubernetes module download), compiled static.
pub fn pause_binary(root: &Path) -> Result<PathBuf> {
    let out = Path::new(TOOLS).join("pause-3.10.2/pause");
    if out.is_file() {
        return Ok(out);
    }
    let modcache = go()?
        .current_dir(root.join("tests/cluster/build/kubernetes"))
        .args(["env", "GOMODCACHE"])
        .output()?;
    let modcache = String::from_utf8_lossy(&modcache.stdout).trim().to_owned();
    let src = Path::new(&modcache).join("k8s.io/kubernetes@v1.37.2/build/pause/linux/pause.c");
    if !src.is_file() {
        run(go()?
            .current_dir(root.join("tests/cluster/build/kubernetes"))
            .args(["mod", "download", "k8s.io/kubernetes"]))?;
    }
    if !src.is_file() {
        bail!("{} is missing after go mod download", src.display());
    }
    std::fs::create_dir_all(out.parent().expect("a parent"))?;
    let tmp = out.with_extension("tmp");
    run(Command::new("gcc")
        .args(["-Os", "-Wall", "-static", "-DVERSION=v3.10.2", "-o"])
        .arg(&tmp)
        .arg(&src))?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// Where [`device_plugin`] puts the tests' device plugin.
pub fn device_plugin_path(root: &Path) -> PathBuf {
    root.join("target/railnet-test-deviceplugin")
}

/// Where [`gpu_driver`] puts the tests' GPU driver.
pub fn gpu_driver_path(root: &Path) -> PathBuf {
    root.join("target/railnet-test-gpudriver")
}

/// Builds the cluster tests' own device plugin (`tests/cluster/deviceplugin`,
/// Go, on kubelet's device plugin API).
pub fn device_plugin(root: &Path) -> Result<PathBuf> {
    go_test_tool(root, "deviceplugin", device_plugin_path(root))
}

/// Builds the cluster tests' own GPU driver (`tests/cluster/gpudriver`, Go,
/// a DRA driver on Kubernetes' kubelet plugin library): stand-in GPUs
/// the scheduler aligns railnet's rails with.
pub fn gpu_driver(root: &Path) -> Result<PathBuf> {
    go_test_tool(root, "gpudriver", gpu_driver_path(root))
}

/// Builds `tests/cluster/<dir>` into `out`: railnet's source, so it is
/// built like railnet's, every setup (Go's build cache makes that a
/// second), not cached by version.
fn go_test_tool(root: &Path, dir: &str, out: PathBuf) -> Result<PathBuf> {
    run(go()?
        .current_dir(root.join("tests/cluster").join(dir))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        .args(["build", "-trimpath", "-o"])
        .arg(&out)
        .arg("."))
    .with_context(|| format!("building the tests' tests/cluster/{dir}"))?;
    Ok(out)
}
