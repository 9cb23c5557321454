//! Where the cluster's components are: built at pinned versions by `cargo
//! xtask setup` and handed to the tests in the environment.

use std::path::{Path, PathBuf};

/// The components a test cluster runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl.
    pub kubernetes: PathBuf,
    /// The etcd binary.
    pub etcd: PathBuf,
    /// containerd, containerd-shim-runc-v2, ctr.
    pub containerd: PathBuf,
    /// The Multus thin plugin binary.
    pub multus: PathBuf,
    /// helm.
    pub helm: PathBuf,
    /// The tests' device plugin (`tests/cluster/deviceplugin`).
    pub device_plugin: PathBuf,
    /// The tests' GPU driver (`tests/cluster/gpudriver`, DRA).
    pub gpu_driver: PathBuf,
    /// OCI archives: railnet.tar (`cargo xtask image`), pause.tar, workload.tar.
    pub images: PathBuf,
    /// Debian's reference CNI plugins (bridge, host-local, loopback, macvlan).
    pub cni_plugins: PathBuf,
    /// whereabouts, for the benchmark only (`cargo xtask bench cluster`
    /// builds it and sets `RAILNET_WHEREABOUTS_BIN`); `None` in the tests.
    pub whereabouts: Option<PathBuf>,
}

/// The path in environment variable `name` (`cargo xtask` sets it for the
/// cluster tests and benchmarks), which must exist.
#[track_caller]
pub(crate) fn var(name: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{name} is not set: run through `cargo xtask test` (or `cargo xtask bench`), which builds {what} and sets it")
    });
    assert!(
        p.exists(),
        "{name}={} does not exist: `cargo xtask setup` builds {what}",
        p.display()
    );
    p
}

impl Tools {
    /// Reads the paths `cargo xtask test` sets.
    #[track_caller]
    pub fn from_env() -> Self {
        let tools = Self {
            kubernetes: var("RAILNET_KUBERNETES_DIR", "Kubernetes"),
            etcd: var("RAILNET_ETCD_BIN", "etcd"),
            containerd: var("RAILNET_CONTAINERD_DIR", "containerd"),
            multus: var("RAILNET_MULTUS_BIN", "Multus"),
            helm: var("RAILNET_HELM", "helm"),
            device_plugin: var("RAILNET_DEVICE_PLUGIN_BIN", "the tests' device plugin"),
            gpu_driver: var("RAILNET_GPU_DRIVER_BIN", "the tests' GPU driver"),
            images: var("RAILNET_IMAGES_DIR", "the images"),
            cni_plugins: PathBuf::from("/usr/lib/cni"),
            whereabouts: std::env::var_os("RAILNET_WHEREABOUTS_BIN").map(PathBuf::from),
        };
        for image in ["railnet.tar", "pause.tar", "workload.tar"] {
            assert!(
                tools.images.join(image).is_file(),
                "{} is missing: `cargo xtask image` writes railnet.tar, `cargo xtask test` the others",
                tools.images.join(image).display()
            );
        }
        tools
    }

    /// A Kubernetes binary.
    pub fn kube(&self, name: &str) -> PathBuf {
        self.kubernetes.join(name)
    }

    /// The chart in this repository.
    pub fn chart() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/railnet")
    }
}
