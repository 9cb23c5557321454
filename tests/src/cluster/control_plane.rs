//! The control plane of a test cluster: etcd, kube-apiserver (Node and RBAC
//! authorization, audit log on), kube-controller-manager and kube-scheduler,
//! all in one netns of their own.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use super::{NodeCgroup, Pki, Tools};
use crate::Netns;

/// The `kubernetes` Service's address (first of the service range); no
/// kube-proxy makes it reachable: in-cluster clients are given the API
/// server's own address (the chart's `k8sServiceHost`).
pub const SERVICE_RANGE: &str = "10.96.0.0/16";
/// The first address of [`SERVICE_RANGE`].
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// The running control-plane processes.
pub struct ControlPlane {
    procs: Vec<(&'static str, Child)>,
    // All of them, so a killed test's control plane is found and ended by
    // the next run, like its nodes.
    cgroup: NodeCgroup,
    /// The API server's audit log (JSON lines).
    pub audit_log: PathBuf,
    logs: PathBuf,
}

fn spawn(
    ns: &Netns,
    cgroup: &NodeCgroup,
    name: &'static str,
    bin: &Path,
    args: &[String],
    logs: &Path,
) -> Child {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    let mut cmd = ns.command(bin);
    cgroup.start_inside(&mut cmd);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

impl ControlPlane {
    /// Starts etcd, the API server, the controller manager and the
    /// scheduler in `ns` (whose address is `api_ip`); returns once started
    /// (the caller waits for the API server to answer).
    #[track_caller]
    pub fn start(
        ns: &Netns,
        cgroup: NodeCgroup,
        api_ip: &str,
        tools: &Tools,
        pki: &Pki,
        dir: &Path,
    ) -> Self {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let s = |p: PathBuf| p.display().to_string();
        let mut procs = Vec::new();
        procs.push((
            "etcd",
            spawn(
                ns,
                &cgroup,
                "etcd",
                &tools.etcd,
                &[
                    "--name=cp".into(),
                    format!("--data-dir={}", s(dir.join("etcd"))),
                    "--listen-client-urls=http://127.0.0.1:2379".into(),
                    "--advertise-client-urls=http://127.0.0.1:2379".into(),
                    "--listen-peer-urls=http://127.0.0.1:2380".into(),
                    "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                    "--initial-cluster=cp=http://127.0.0.1:2380".into(),
                    // A test cluster's etcd: fsync costs seconds on a busy
                    // 2-core machine and protects nothing the test keeps.
                    "--unsafe-no-fsync".into(),
                ],
                &logs,
            ),
        ));
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(
            &audit_policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        )
        .unwrap();
        let audit_log = dir.join("audit.log");
        // The API server's identity towards kubelets (exec, logs).
        pki.client(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            &["system:masters"],
        );
        procs.push((
            "kube-apiserver",
            spawn(
                ns,
                &cgroup,
                "kube-apiserver",
                &tools.kube("kube-apiserver"),
                &[
                    "--etcd-servers=http://127.0.0.1:2379".into(),
                    "--bind-address=0.0.0.0".into(),
                    "--secure-port=6443".into(),
                    format!("--advertise-address={api_ip}"),
                    format!("--service-cluster-ip-range={SERVICE_RANGE}"),
                    format!("--client-ca-file={}", s(pki.file("ca.crt"))),
                    format!("--tls-cert-file={}", s(pki.file("apiserver.crt"))),
                    format!("--tls-private-key-file={}", s(pki.file("apiserver.key"))),
                    "--service-account-issuer=https://kubernetes.default.svc".into(),
                    format!("--service-account-key-file={}", s(pki.file("sa.pub"))),
                    format!(
                        "--service-account-signing-key-file={}",
                        s(pki.file("sa.key"))
                    ),
                    "--authorization-mode=Node,RBAC".into(),
                    "--enable-admission-plugins=NodeRestriction".into(),
                    "--allow-privileged=true".into(),
                    format!(
                        "--kubelet-client-certificate={}",
                        s(pki.file("apiserver-kubelet-client.crt"))
                    ),
                    format!(
                        "--kubelet-client-key={}",
                        s(pki.file("apiserver-kubelet-client.key"))
                    ),
                    "--kubelet-preferred-address-types=InternalIP".into(),
                    // No kube-proxy: webhook Services are reached through
                    // their endpoints (the pod's address, routed from here).
                    "--enable-aggregator-routing=true".into(),
                    format!("--audit-log-path={}", s(audit_log.clone())),
                    format!("--audit-policy-file={}", s(audit_policy)),
                    "--profiling=false".into(),
                ],
                &logs,
            ),
        ));
        let cm = pki.client("controller-manager", "system:kube-controller-manager", &[]);
        procs.push((
            "kube-controller-manager",
            spawn(
                ns,
                &cgroup,
                "kube-controller-manager",
                &tools.kube("kube-controller-manager"),
                &[
                    format!("--kubeconfig={}", s(cm)),
                    "--secure-port=0".into(),
                    "--leader-elect=false".into(),
                    format!("--root-ca-file={}", s(pki.file("ca.crt"))),
                    format!(
                        "--service-account-private-key-file={}",
                        s(pki.file("sa.key"))
                    ),
                    "--use-service-account-credentials=true".into(),
                ],
                &logs,
            ),
        ));
        let sched = pki.client("scheduler", "system:kube-scheduler", &[]);
        procs.push((
            "kube-scheduler",
            spawn(
                ns,
                &cgroup,
                "kube-scheduler",
                &tools.kube("kube-scheduler"),
                &[
                    format!("--kubeconfig={}", s(sched)),
                    "--secure-port=0".into(),
                    "--leader-elect=false".into(),
                ],
                &logs,
            ),
        ));
        Self {
            procs,
            cgroup,
            audit_log,
            logs,
        }
    }

    /// A component's log.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Whether every process still runs; the first that exited otherwise.
    pub fn check_alive(&mut self) -> Result<(), String> {
        for (name, child) in &mut self.procs {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("{name} exited with {status}"));
            }
        }
        Ok(())
    }

    /// Ends every process, last started first (SIGKILL: nothing here keeps
    /// state the test needs).
    pub fn stop(&mut self) {
        while let Some((_, mut child)) = self.procs.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cgroup.kill_all_and_remove();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
