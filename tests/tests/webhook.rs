//! The RDMA resource-injection webhook over TLS, as the API server calls it:
//! the real `railnet-controller` serving `POST /mutate-pods` with a
//! certificate from a CA of the test's own, reading RailNetworks from a real
//! API server (etcd + apiextensions-apiserver in a netns of the test's own).
//! AdmissionReviews are sent with curl, checking the CA; the JSON patches
//! that come back are applied to the pod here, as the API server would.
//!
//! The namespace-level annotation needs Namespace objects, which this API
//! server does not serve: that test runs the same TLS server in-process
//! with a kube client over a mock service that answers the lists and
//! watches of namespaces and RailNetworks (and says so). The real cluster
//! test covers the namespace annotation against kube-apiserver.

use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use railnet_tests::{Netns, ScratchDir, apiserver::ApiServer};
use serde_json::{Value, json};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and a serving certificate for 127.0.0.1 signed by it.
fn certificates(dir: &Path) {
    railnet_tests::test_ca(dir, "railnet-webhook-ca");
    railnet_tests::test_certificate(
        dir,
        "tls",
        "/CN=railnet-webhook",
        "subjectAltName=IP:127.0.0.1,DNS:railnet-controller.railnet.svc\n",
    );
}

fn network(name: &str, rail: u64, group: &str, resource: &str) -> Value {
    json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
           "metadata": {"name": name, "namespace": "railnet"},
           "spec": {"rail": rail, "type": "sriov", "resourceName": resource, "group": group,
                    "ippools": {"ipv4": [name]}}})
}

fn review(pod: Value) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
           "request": {"uid": "7f0b2c1e-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                       "resource": {"group": "", "version": "v1", "resource": "pods"},
                       "namespace": "ai", "operation": "CREATE", "object": pod}})
}

fn pod(annotations: Value, containers: &[&str]) -> Value {
    let containers: Vec<Value> = containers
        .iter()
        .map(|c| json!({"name": c, "image": "nccl-tests"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "trainer-0", "namespace": "ai", "annotations": annotations},
           "spec": {"containers": containers}})
}

/// POSTs an AdmissionReview as the API server does: HTTPS from inside
/// `ns`, the server checked against the caBundle `ca`.
fn post(ns: &Netns, ca: &Path, body: &Value) -> Result<Value, String> {
    let mut child = ns
        .command("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(ca)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ])
        .arg("https://127.0.0.1:9443/mutate-pods")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Waits until the webhook in `ns` answers `/healthz` over TLS.
fn wait_serving(ns: &Netns, ca: &Path, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = ns
            .command("curl")
            .args(["-s", "--cacert"])
            .arg(ca)
            .arg("https://127.0.0.1:9443/healthz")
            .output()
            .unwrap()
            .status
            .success();
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "webhook never served:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A real API server (in a netns of the test's own) that serves
/// RailNetworks.
fn networks_server() -> ApiServer {
    let api = ApiServer::start();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text =
        std::fs::read_to_string(root.join("../charts/railnet/crds/railnet.io_railnetworks.yaml"))
            .unwrap();
    api.install_crd(&serde_norway::from_str(&text).unwrap());
    api
}

/// The real `railnet-controller` serving the webhook on 127.0.0.1:9443
/// (and `/metrics` on :9466) in `api`'s netns, with a certificate from a
/// CA of the test's own in `dir` (`ca.crt`); its log in
/// `dir/controller.log`.
fn webhook_controller(api: &ApiServer, dir: &Path) -> Killed {
    certificates(dir);
    Killed(
        api.controller()
            .args(["--webhook-address", "127.0.0.1:9443"])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .args(["--rail-info-dir", "/run/railnet/pods"])
            // The networks are the administrator's, shared with every
            // namespace; the pods are in `ai`.
            .args(["--shared-networks-namespace", "railnet"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("controller.log")).unwrap())
            .spawn()
            .expect("railnet-controller"),
    )
}

/// Hardening 8: any pod can reach the webhook's Service, and the
/// controller's `/metrics` listens on its pod address. Idle connections,
/// a request sent a byte at a time and more connections than the cap
/// neither stop them answering nor are held past the deadlines.
#[test]
fn the_webhook_and_controller_metrics_bear_idle_slow_and_too_many_connections() {
    let api = networks_server();
    let dir = ScratchDir::new("webhook-bounds");
    let _controller = webhook_controller(&api, dir.path());
    let log = dir.path().join("controller.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ca = dir.path().join("ca.crt");
    wait_serving(&api.ns, &ca, log_text);
    let plain = pod(json!({}), &["main"]);
    railnet_tests::bounds::check(&api.ns, "127.0.0.1:9443".parse().unwrap(), || {
        post(&api.ns, &ca, &review(plain.clone())).is_ok_and(|a| a["response"]["allowed"] == true)
    });
    railnet_tests::bounds::check(&api.ns, "127.0.0.1:9466".parse().unwrap(), || {
        api.ns
            .command("curl")
            .args(["-sf", "http://127.0.0.1:9466/metrics"])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("railnet_")
            })
    });
}

/// Applies RFC 6902 `add` operations (all the webhook emits).
fn apply(mut doc: Value, patch: &Value) -> Value {
    for op in patch.as_array().unwrap() {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let mut parts: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = parts.pop().unwrap();
        let mut at = &mut doc;
        for p in &parts {
            at = match at {
                Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
                Value::Object(o) => o.get_mut(p).unwrap_or_else(|| panic!("{path}: no {p}")),
                _ => panic!("{path}: {p} is not a container"),
            };
        }
        match at {
            Value::Array(a) if last == "-" => a.push(op["value"].clone()),
            Value::Object(o) => {
                o.insert(last, op["value"].clone());
            }
            _ => panic!("{path}: cannot add {last} there"),
        }
    }
    doc
}

/// The pod's rail info mounted in container `c` (the one given the
/// resources): its own directory of the agents' pod-info directory, by UID.
#[track_caller]
fn assert_rail_info_mounted(pod: &Value, c: usize) {
    let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
    let v: Vec<&Value> = volumes
        .iter()
        .filter(|v| v["name"] == "railnet-rails")
        .collect();
    assert_eq!(v.len(), 1, "{volumes:?}");
    assert_eq!(
        v[0]["hostPath"],
        json!({"path": "/run/railnet/pods", "type": "DirectoryOrCreate"})
    );
    let container = &pod["spec"]["containers"][c];
    assert!(
        container["env"].as_array().unwrap().iter().any(|e| e
            == &json!({"name": "RAILNET_POD_UID",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})),
        "{container}"
    );
    assert!(
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m
                == &json!({"name": "railnet-rails", "mountPath": "/etc/railnet",
                "readOnly": true, "subPathExpr": "$(RAILNET_POD_UID)"})),
        "{container}"
    );
}

#[test]
fn pods_asking_for_a_group_get_its_networks_and_resources() {
    let api = networks_server();
    for n in [
        network("gpu2-sriov", 2, "rdma-network", "nvidia.com/gpu2rdma"),
        {
            let mut n = network("gpu1-sriov", 1, "rdma-network", "nvidia.com/gpu1rdma");
            n["spec"]["rdmaIsolation"] = true.into();
            n
        },
        network("storage", 9, "storage", "nvidia.com/storage"),
    ] {
        let (code, body) = api.post(
            "/apis/railnet.io/v1alpha1/namespaces/railnet/railnetworks",
            &n,
        );
        assert_eq!(code, 201, "{body}");
    }
    let dir = ScratchDir::new("webhook");
    let _controller = webhook_controller(&api, dir.path());
    let log = dir.path().join("controller.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ca = dir.path().join("ca.crt");
    let call = |body: &Value| -> Value {
        post(&api.ns, &ca, body).unwrap_or_else(|e| panic!("{e}\n{}", log_text()))
    };
    wait_serving(&api.ns, &ca, log_text);
    let patched = |p: &Value, answer: &Value| -> Value {
        let r = &answer["response"];
        assert_eq!(r["uid"], "7f0b2c1e-1");
        assert_eq!(r["allowed"], true, "{answer}");
        assert_eq!(r["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        apply(p.clone(), &serde_json::from_slice(&patch).unwrap())
    };

    // No annotation: untouched.
    let plain = pod(json!({}), &["main"]);
    let answer = call(&review(plain));
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");

    // The seeds' workflow: the group's networks, by rail, and one of each
    // network's resource in the (first) container's limits.
    let asking = pod(
        json!({"railnet.io/rdma-resource-inject": "rdma-network"}),
        &["main", "sidecar"],
    );
    let answer = call(&review(asking.clone()));
    assert!(answer["response"].get("warnings").is_none(), "{answer}");
    let after = patched(&asking, &answer);
    let networks: Value = serde_json::from_str(
        after["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        networks,
        json!([{"name": "gpu1-sriov", "namespace": "railnet"},
               {"name": "gpu2-sriov", "namespace": "railnet"}])
    );
    assert_eq!(
        after["spec"]["containers"][0]["resources"]["limits"],
        json!({"nvidia.com/gpu1rdma": "1", "nvidia.com/gpu2rdma": "1"})
    );
    assert!(after["spec"]["containers"][1].get("resources").is_none());
    // Its rails' info (rails.json, nccl.env) where that container reads it.
    assert_rail_info_mounted(&after, 0);
    assert!(after["spec"]["containers"][1].get("volumeMounts").is_none());
    // What the webhook added must be fields Kubernetes knows, where it
    // knows them.
    railnet_tests::validate_strict(&after.to_string());
    // gpu1-sriov moves its VF's RDMA device into the pod: only nodes in
    // exclusive mode (labelled so by their agents) can run it.
    assert_eq!(
        after["spec"]["nodeSelector"],
        json!({"railnet.io/rdma-netns-mode": "exclusive"})
    );

    // A pod that set its own networks (and limits): overwritten, with a
    // warning that says so; its other limits kept.
    let mut own = pod(
        json!({"railnet.io/rdma-resource-inject": "rdma-network",
               "railnet.io/rdma-resource-container": "trainer",
               "k8s.v1.cni.cncf.io/networks": "my-net"}),
        &["init-helper", "trainer"],
    );
    own["spec"]["containers"][1]["resources"] =
        json!({"limits": {"nvidia.com/gpu": "8", "nvidia.com/gpu1rdma": "2"}});
    // …and volumes, mounts and env of its own, which are kept.
    own["spec"]["volumes"] = json!([{"name": "dshm", "emptyDir": {"medium": "Memory"}}]);
    own["spec"]["containers"][1]["volumeMounts"] =
        json!([{"name": "dshm", "mountPath": "/dev/shm"}]);
    own["spec"]["containers"][1]["env"] = json!([{"name": "NCCL_DEBUG", "value": "INFO"}]);
    let answer = call(&review(own.clone()));
    let warnings = answer["response"]["warnings"].to_string();
    assert!(
        warnings.contains("my-net") && warnings.contains("replaced"),
        "{warnings}"
    );
    let after = patched(&own, &answer);
    assert_ne!(
        after["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"],
        "my-net"
    );
    assert_eq!(
        after["spec"]["containers"][1]["resources"]["limits"],
        json!({"nvidia.com/gpu": "8", "nvidia.com/gpu1rdma": "1", "nvidia.com/gpu2rdma": "1"})
    );
    assert!(after["spec"]["containers"][0].get("resources").is_none());
    assert_rail_info_mounted(&after, 1);
    assert_eq!(after["spec"]["volumes"][0]["name"], "dshm");
    assert_eq!(
        after["spec"]["containers"][1]["volumeMounts"][0]["name"],
        "dshm"
    );
    assert_eq!(
        after["spec"]["containers"][1]["env"][0]["name"],
        "NCCL_DEBUG"
    );
    // What the webhook added must be fields Kubernetes knows, where it
    // knows them.
    railnet_tests::validate_strict(&after.to_string());
    // Asked again (a reinvoked webhook): the mount is not added twice.
    let again = call(&review(after.clone()));
    let twice = patched(&after, &again);
    assert_rail_info_mounted(&twice, 1);

    // A group nobody defined: refused, naming it (the pod would otherwise
    // start without its RDMA interfaces).
    let typo = pod(
        json!({"railnet.io/rdma-resource-inject": "rdma-netwrok"}),
        &["main"],
    );
    let answer = call(&review(typo));
    assert_eq!(answer["response"]["allowed"], false);
    let msg = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("rdma-netwrok"), "{msg}");

    // Not JSON: a 400, not a crash; the next request is served.
    let bad = api
        .ns
        .command("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(dir.path().join("ca.crt"))
        .args([
            "--data-binary",
            "{not json",
            "https://127.0.0.1:9443/mutate-pods",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&bad.stdout), "400");
    let answer = call(&review(pod(json!({}), &["main"])));
    assert_eq!(answer["response"]["allowed"], true);
    // Each answer counted by result on the controller's /metrics.
    let out = api
        .ns
        .command("curl")
        .args(["-sf", "http://127.0.0.1:9466/metrics"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        r#"railnet_controller_webhook_requests_total{result="unchanged"} 2"#,
        r#"railnet_controller_webhook_requests_total{result="patched"} 3"#,
        r#"railnet_controller_webhook_requests_total{result="denied"} 1"#,
        r#"railnet_controller_webhook_requests_total{result="bad_request"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }
}

/// `railnet.io/rdma-resource-inject` on a namespace: every pod created in
/// it gets the group's networks and resources; a pod's own annotation wins;
/// pods of other namespaces are untouched. The CRD API server serves no
/// Namespace objects, so here — only here — the webhook's client talks to
/// kube-rs's mock service, which answers for two namespaces and the
/// RailNetworks as the API server would; the TLS server, its handling and
/// curl as the caller are the real ones.
#[test]
fn a_namespace_annotation_injects_its_group_into_every_pod_in_it() {
    use std::sync::{Arc, Mutex};

    let ns = Netns::new("webhook-ns");
    let dir = ScratchDir::new("webhook-ns");
    certificates(dir.path());
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = asked.clone();
    let mut evil = network("evil1", 1, "rdma-network", "nvidia.com/evil");
    evil["metadata"]["namespace"] = "web".into();
    let service = tower::service_fn(move |req: hyper::Request<kube::client::Body>| {
        let path = req.uri().path().to_owned();
        let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
        log.lock()
            .unwrap()
            .push(format!("{path}{}", if watch { " (watch)" } else { "" }));
        let meta = |name: &str, annotations: Value| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": name, "annotations": annotations}})
        };
        let (code, body) = match path.as_str() {
            // Lists, as the webhook's watches start; their watches then
            // wait (below) as an API server's do between events.
            "/api/v1/namespaces" => (
                200,
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                       "metadata": {"resourceVersion": "1"},
                       "items": [meta("ai", json!({"railnet.io/rdma-resource-inject": "rdma-network"})),
                                 meta("web", json!({}))]}),
            ),
            "/apis/railnet.io/v1alpha1/railnetworks" => (
                200,
                json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetworkList",
                       "metadata": {"resourceVersion": "1"},
                       "items": [network("gpu1-sriov", 1, "rdma-network", "nvidia.com/gpu1rdma"),
                                 network("gpu2-sriov", 2, "rdma-network", "nvidia.com/gpu2rdma"),
                                 network("storage", 9, "storage", "nvidia.com/storage"),
                                 // Another namespace's: never injected into `ai`.
                                 evil.clone()]}),
            ),
            _ => (
                404,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
            ),
        };
        async move {
            if watch && code == 200 {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(
                hyper::Response::builder()
                    .status(code)
                    .header("Content-Type", "application/json")
                    .body(kube::client::Body::from(body.to_string().into_bytes()))
                    .unwrap(),
            )
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let server = ns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tls = railnet_agent::webhook::tls(&cert, &key).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:9443")
                .await
                .unwrap();
            let client = kube::Client::new(service, "default");
            let metrics = Arc::new(railnet_agent::controller::Metrics::default());
            tokio::select! {
                _ = railnet_agent::webhook::serve(listener, tls, client, metrics, None, Some("railnet".into()), None) => {}
                _ = stopped => {}
            }
        })
    });
    let ca = dir.path().join("ca.crt");
    wait_serving(&ns, &ca, String::new);
    let in_ns = |namespace: &str, annotations: Value| {
        let mut p = pod(annotations, &["main"]);
        p["metadata"]["namespace"] = namespace.into();
        let mut r = review(p.clone());
        r["request"]["namespace"] = namespace.into();
        (p, post(&ns, &ca, &r).unwrap())
    };
    let networks_of = |p: &Value, answer: &Value| -> Value {
        let r = &answer["response"];
        assert_eq!(r["allowed"], true, "{answer}");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap_or_else(|| panic!("{answer}")))
            .unwrap();
        let after = apply(p.clone(), &serde_json::from_slice(&patch).unwrap());
        json!({
            "networks": serde_json::from_str::<Value>(
                after["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"].as_str().unwrap()
            ).unwrap(),
            "limits": after["spec"]["containers"][0]["resources"]["limits"],
        })
    };

    // A pod with no annotation in the annotated namespace: the group's.
    let (p, answer) = in_ns("ai", json!({}));
    assert_eq!(
        networks_of(&p, &answer),
        json!({"networks": [{"name": "gpu1-sriov", "namespace": "railnet"},
                            {"name": "gpu2-sriov", "namespace": "railnet"}],
               "limits": {"nvidia.com/gpu1rdma": "1", "nvidia.com/gpu2rdma": "1"}})
    );
    // Its own annotation wins over the namespace's.
    let (p, answer) = in_ns("ai", json!({"railnet.io/rdma-resource-inject": "storage"}));
    assert_eq!(
        networks_of(&p, &answer),
        json!({"networks": [{"name": "storage", "namespace": "railnet"}],
               "limits": {"nvidia.com/storage": "1"}})
    );
    // A namespace without the annotation: untouched.
    let (_, answer) = in_ns("web", json!({}));
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // Reviews cost no API request: the namespaces and RailNetworks were
    // listed once and are watched; no namespace was read by name.
    let asked = asked.lock().unwrap().clone();
    let mut kinds = asked.clone();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "/api/v1/namespaces",
            "/api/v1/namespaces (watch)",
            "/apis/railnet.io/v1alpha1/railnetworks",
            "/apis/railnet.io/v1alpha1/railnetworks (watch)"
        ],
        "{asked:?}"
    );
    assert_eq!(asked.len(), 4, "{asked:?}");
    let _ = stop.send(());
    server.join().unwrap();
}

#[test]
fn a_rail_info_dir_that_is_no_absolute_node_path_is_refused_at_start() {
    for bad in ["pods", "/run/../etc", "/"] {
        let out = std::process::Command::new(railnet_tests::binary(
            "RAILNET_CONTROLLER_BIN",
            "railnet-controller",
        ))
        .args(["--rail-info-dir", bad])
        .output()
        .expect("railnet-controller");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("--rail-info-dir") && err.contains("/run/railnet/pods"),
            "{bad}: {err}"
        );
    }
}
