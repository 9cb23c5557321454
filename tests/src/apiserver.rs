//! A real Kubernetes API server for tests, inside a netns of the test's own
//! on its loopback, with a throwaway CA and an admin client certificate;
//! requests go through curl. Two kinds:
//!
//! - [`ApiServer::start`]: Debian's etcd and the upstream
//!   apiextensions-apiserver (built from Debian's Go sources). It serves
//!   CRDs and custom resources only (no pods, nodes or namespaces objects),
//!   without API Priority and Fairness, everyone as the admin.
//! - [`ApiServer::start_kube`]: etcd and kube-apiserver as the real cluster
//!   runs them (`cargo xtask setup` builds both), RBAC and API Priority and
//!   Fairness on, and a bearer token per identity — what a cluster's agents
//!   meet.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Netns, ScratchDir};

/// Where the server binary is: `RAILNET_APISERVER_BIN`, else the shared
/// tools' build beside the repository (`../shared/bin`), else where
/// `cargo xtask setup` builds it.
pub fn apiserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RAILNET_APISERVER_BIN") {
        return PathBuf::from(p);
    }
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bin/apiextensions-apiserver");
    if shared.is_file() {
        return shared;
    }
    PathBuf::from("/var/tmp/railnet-tools/apiextensions-apiserver")
}

/// The user every identity of [`ApiServer::start_kube`] authenticates as:
/// the chart's agent ServiceAccount (its groups too), so API Priority and
/// Fairness classifies the requests as a cluster's agents' are.
pub const AGENT_USER: &str = "system:serviceaccount:railnet:railnet-agent";

/// Which server serves.
#[derive(Clone, Debug)]
enum Flavor {
    /// apiextensions-apiserver over Debian's etcd.
    Crd,
    /// kube-apiserver (this binary) over the cluster tests' etcd.
    Kube { bin: PathBuf, identities: usize },
}

/// A running etcd + API server; stopped on drop.
pub struct ApiServer {
    /// The netns both run in (loopback only).
    pub ns: Netns,
    dir: ScratchDir,
    flavor: Flavor,
    etcd: Child,
    server: Child,
}

const PORT: u16 = 6443;

impl ApiServer {
    /// Starts etcd and apiextensions-apiserver and waits until it answers.
    #[track_caller]
    pub fn start() -> Self {
        let bin = apiserver_bin();
        assert!(
            bin.is_file(),
            "{} is missing: `cargo xtask setup` builds it (or set RAILNET_APISERVER_BIN)",
            bin.display()
        );
        Self::start_flavor(Flavor::Crd, Path::new("etcd"))
    }

    /// Starts etcd and kube-apiserver (`RAILNET_KUBERNETES_DIR`,
    /// `RAILNET_ETCD_BIN`) with RBAC and API Priority and Fairness, and
    /// `identities` bearer tokens, each authenticating as [`AGENT_USER`]
    /// ([`ApiServer::identity_kubeconfig`]); waits until it answers.
    /// Grant them rights with [`ApiServer::post`] of RBAC objects.
    #[track_caller]
    pub fn start_kube(identities: usize) -> Self {
        let bin = crate::cluster::tool_path("RAILNET_KUBERNETES_DIR", "Kubernetes")
            .join("kube-apiserver");
        let etcd = crate::cluster::tool_path("RAILNET_ETCD_BIN", "etcd");
        Self::start_flavor(Flavor::Kube { bin, identities }, &etcd)
    }

    #[track_caller]
    fn start_flavor(flavor: Flavor, etcd_bin: &Path) -> Self {
        let ns = Netns::new("apiserver");
        let dir = ScratchDir::new("apiserver");
        let d = dir.path();
        let pki = d.join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        crate::test_ca(&pki, "railnet-test-ca");
        crate::test_certificate(
            &pki,
            "admin",
            "/O=system:masters/CN=admin",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        );
        let kubeconfig = d.join("admin.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"https://127.0.0.1:{PORT}\", insecure-skip-tls-verify: true}}}}]\n\
                 users: [{{name: admin, user: {{client-certificate: {p}/admin.crt, client-key: {p}/admin.key}}}}]\n\
                 contexts: [{{name: t, context: {{cluster: t, user: admin}}}}]\ncurrent-context: t\n",
                p = pki.display()
            ),
        )
        .unwrap();
        if let Flavor::Kube { identities, .. } = &flavor {
            crate::sh(
                Command::new("openssl")
                    .current_dir(&pki)
                    .args(["genrsa", "-out", "sa.key", "2048"]),
            );
            crate::sh(
                Command::new("openssl")
                    .current_dir(&pki)
                    .args(["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]),
            );
            let tokens: String = (0..*identities)
                .map(|n| {
                    format!(
                        "{},{AGENT_USER},agent-{n},\"system:serviceaccounts,system:serviceaccounts:railnet\"\n",
                        token(n)
                    )
                })
                .collect();
            std::fs::write(pki.join("tokens.csv"), tokens).unwrap();
        }
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        let etcd = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(etcd_bin)
            .args(["--name", "t"])
            .arg("--data-dir")
            .arg(d.join("etcd"))
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "t=http://127.0.0.1:2380",
            ])
            .stdout(log("etcd.log"))
            .die_with_parent()
            .stderr(log("etcd.err"))
            .spawn()
            .expect("etcd (Debian's etcd-server)");
        let server = spawn_server(&ns, &flavor, d);
        let api = Self {
            ns,
            dir,
            flavor,
            etcd,
            server,
        };
        api.wait_ready();
        api
    }

    /// Waits until the server answers.
    #[track_caller]
    fn wait_ready(&self) {
        let api = self;
        let deadline = Instant::now() + Duration::from_secs(60);
        while api.get("/apis/apiextensions.k8s.io/v1").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the API server did not come up:\n{}",
                std::fs::read_to_string(api.dir.path().join("apiserver.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The admin kubeconfig (server `https://127.0.0.1:6443`, reachable
    /// from inside [`ApiServer::ns`] only).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// A kubeconfig for identity `n` of [`ApiServer::start_kube`]: its own
    /// bearer token, authenticating as [`AGENT_USER`].
    pub fn identity_kubeconfig(&self, n: usize) -> PathBuf {
        let path = self.dir.path().join(format!("identity-{n}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"https://127.0.0.1:{PORT}\", insecure-skip-tls-verify: true}}}}]\n\
                 users: [{{name: agent-{n}, user: {{token: {}}}}}]\n\
                 contexts: [{{name: t, context: {{cluster: t, user: agent-{n}}}}}]\ncurrent-context: t\n",
                token(n)
            ),
        )
        .unwrap();
        path
    }

    /// Whether this is kube-apiserver ([`ApiServer::start_kube`]).
    pub fn is_kube(&self) -> bool {
        matches!(self.flavor, Flavor::Kube { .. })
    }

    /// The PIDs of the API server and of etcd (for their CPU and memory).
    pub fn pids(&self) -> (u32, u32) {
        (self.server.id(), self.etcd.id())
    }

    /// GET as text (e.g. `/metrics`); empty if it failed.
    pub fn get_text(&self, path: &str) -> String {
        let pki = self.dir.path().join("pki");
        let out = Command::new("ip")
            .args(["netns", "exec", self.ns.name(), "curl", "-sfk"])
            .arg("--cert")
            .arg(pki.join("admin.crt"))
            .arg("--key")
            .arg(pki.join("admin.key"))
            .arg(format!("https://127.0.0.1:{PORT}{path}"))
            .stderr(Stdio::null())
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the API server process (etcd keeps running): what clients see
    /// when the control plane goes away mid-request.
    pub fn kill_server(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }

    /// Starts the API server again over the same etcd and waits until it
    /// serves every installed custom resource again (a restarted server
    /// answers 404 for them for a moment after it is up).
    #[track_caller]
    pub fn restart_server(&mut self) {
        self.kill_server();
        self.server = spawn_server(&self.ns, &self.flavor, self.dir.path());
        self.wait_ready();
        let (_, crds) = self.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions");
        let deadline = Instant::now() + Duration::from_secs(60);
        for crd in crds["items"].as_array().into_iter().flatten() {
            let spec = &crd["spec"];
            let version = spec["versions"][0]["name"].as_str().unwrap_or_default();
            let path = format!(
                "/apis/{}/{version}/{}",
                spec["group"].as_str().unwrap_or_default(),
                spec["names"]["plural"].as_str().unwrap_or_default()
            );
            while self.get(&path).0 != 200 {
                assert!(
                    Instant::now() < deadline,
                    "{path} never served again after the restart"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `railnet-controller` run inside the server's netns, talking to it,
    /// its Lease in namespace `railnet`; the caller adds its own flags.
    pub fn controller(&self) -> Command {
        let mut cmd = self.ns.command(crate::binary(
            "RAILNET_CONTROLLER_BIN",
            "railnet-controller",
        ));
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["--lease-namespace", "railnet"]);
        cmd
    }

    /// Runs `f` on a thread inside the server's netns: a client made there
    /// reaches the server on 127.0.0.1.
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.ns.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let fd = std::fs::File::open(&path).expect("netns handle");
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the API server's netns");
                f()
            })
            .join()
            .expect("thread inside the API server's netns")
        })
    }

    fn curl(&self, method: &str, path: &str, body: Option<&Value>, accept: &str) -> (u16, Value) {
        let pki = self.dir.path().join("pki");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.name(), "curl", "-sk", "-X", method])
            .arg("--cert")
            .arg(pki.join("admin.crt"))
            .arg("--key")
            .arg(pki.join("admin.key"))
            .args(["-H", &format!("Accept: {accept}"), "-w", "\n%{http_code}"]);
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.arg(format!("https://127.0.0.1:{PORT}{path}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("curl");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            if let Some(b) = body {
                stdin.write_all(b.to_string().as_bytes()).unwrap();
            }
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(json).unwrap_or(Value::Null),
        )
    }

    /// GET; (HTTP status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.curl("GET", path, None, "application/json")
    }

    /// GET as a Table (what `kubectl get` prints, printer columns).
    pub fn get_table(&self, path: &str) -> (u16, Value) {
        self.curl(
            "GET",
            path,
            None,
            "application/json;as=Table;v=v1;g=meta.k8s.io",
        )
    }

    /// POST a JSON object.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.curl("POST", path, Some(body), "application/json")
    }

    /// PUT a JSON object.
    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.curl("PUT", path, Some(body), "application/json")
    }

    /// DELETE.
    pub fn delete(&self, path: &str) -> (u16, Value) {
        self.curl("DELETE", path, None, "application/json")
    }

    /// Creates a CRD and waits until the server serves its kind.
    #[track_caller]
    pub fn install_crd(&self, crd: &Value) {
        let (code, body) = self.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            crd,
        );
        assert_eq!(code, 201, "CRD {} refused: {body}", crd["metadata"]["name"]);
        let name = crd["metadata"]["name"].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, c) = self.get(&format!(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            ));
            let established = c["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|x| x["type"] == "Established" && x["status"] == "True")
            });
            if established {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "CRD {name} never established: {c}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The column names of a Table answer (what `kubectl get` prints).
pub fn columns(table: &Value) -> Vec<&str> {
    table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

/// Row `row`'s cell under column `column` of a Table answer.
#[track_caller]
pub fn cell<'a>(table: &'a Value, row: usize, column: &str) -> &'a Value {
    let at = columns(table)
        .iter()
        .position(|c| *c == column)
        .unwrap_or_else(|| panic!("no column {column}: {table}"));
    &table["rows"][row]["cells"][at]
}

/// Identity `n`'s bearer token (the server is reachable from its netns
/// only, so a guessable token protects nothing less than a random one).
fn token(n: usize) -> String {
    format!("railnet-test-identity-{n:06}")
}

/// Starts the API server in `ns` with the PKI and kubeconfig in `d`
/// (appending to its logs: a restart keeps the first run's).
fn spawn_server(ns: &Netns, flavor: &Flavor, d: &Path) -> Child {
    let pki = d.join("pki");
    let kubeconfig = d.join("admin.kubeconfig");
    let log = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join(name))
            .unwrap()
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]);
    match flavor {
        Flavor::Crd => {
            cmd.arg(apiserver_bin())
                .arg(format!("--authentication-kubeconfig={}", kubeconfig.display()))
                .arg("--authentication-skip-lookup")
                .arg(format!("--authorization-kubeconfig={}", kubeconfig.display()))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args([
                    "--enable-priority-and-fairness=false",
                    "--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy",
                ]);
        }
        Flavor::Kube { bin, .. } => {
            let f = |name: &str| pki.join(name).display().to_string();
            cmd.arg(bin).args([
                // Its default: the agents' requests meet the priority
                // levels and queues a cluster's do.
                "--enable-priority-and-fairness=true".into(),
                "--authorization-mode=RBAC".into(),
                format!("--token-auth-file={}", f("tokens.csv")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                // Nothing outside the netns reaches it, and no Service
                // endpoint needs to name it (it may not be a loopback one).
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", f("sa.pub")),
                format!("--service-account-signing-key-file={}", f("sa.key")),
                "--profiling=false".into(),
            ]);
        }
    }
    cmd.args([
        "--etcd-servers=http://127.0.0.1:2379",
        "--bind-address=127.0.0.1",
        &format!("--secure-port={PORT}"),
    ])
    .arg(format!("--cert-dir={}", d.join("certs").display()))
    .arg(format!("--client-ca-file={}", pki.join("ca.crt").display()))
    .stdout(log("apiserver.log"))
    .stderr(log("apiserver.err"))
    .spawn()
    .expect("apiextensions-apiserver")
}

/// A child that ends with the process that started it.
trait DieWithParent {
    /// A killed test or benchmark leaves no etcd or API server behind (its
    /// netns and scratch directory are named `rn<pid>-…` for removal).
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    fn die_with_parent(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec. `ip netns exec` execs the server, which keeps the
        // setting.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [&mut self.server, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
