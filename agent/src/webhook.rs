//! The RDMA resource-injection webhook (the seeds' "Webhook-based automatic
//! RDMA resource injection"): a pod annotated
//! `railnet.io/rdma-resource-inject: <group>` — or created in a namespace
//! annotated so — gets every RailNetwork of that group (`spec.group`) in its
//! networks annotation, ordered by rail, and one of each network's
//! `resourceName` in its container's limits. A networks annotation the pod
//! set itself is overwritten, as the seeds say, and the admission response
//! warns that it was.
//!
//! A group is resolved in the pod's own namespace and in one shared
//! namespace an administrator owns (the chart's: the release namespace):
//! a RailNetwork made in namespace A is never injected into a pod of
//! namespace B. Multus, separately, lets a pod name `otherns/nad` unless its
//! `namespaceIsolation` is on (with the shared namespace among its
//! `globalNamespaces`).

use std::{sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use kube::Client;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
};

use crate::webhook_cache::Cache;

/// The annotation that asks for injection; its value names the group.
pub const INJECT: &str = "railnet.io/rdma-resource-inject";
/// The container that gets the resources (default: the first).
pub const CONTAINER: &str = "railnet.io/rdma-resource-container";
/// Multus's networks annotation.
pub const NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";

/// What the webhook does to one pod.
#[derive(Debug, Default, PartialEq)]
pub struct Injection {
    /// RFC 6902 operations.
    pub patch: Vec<Value>,
    /// Admission warnings (kubectl prints them).
    pub warnings: Vec<String>,
}

/// JSON-pointer escaping of one path segment (`/` and `~` in keys such as
/// `k8s.v1.cni.cncf.io/networks`).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The volume that carries a pod's rail info ([`crate::podinfo`]).
pub const RAIL_INFO_VOLUME: &str = "railnet-rails";
/// Where the container sees it.
pub const RAIL_INFO_PATH: &str = "/etc/railnet";

/// Where a pod's containers read its rail info at [`RAIL_INFO_PATH`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RailInfoSource {
    /// The agents' pod-info directory on the node (their
    /// `--pod-info-dir`), the pod's own `<UID>/` of it by a hostPath
    /// volume: kept current by the agent, refused where Pod Security
    /// `baseline` or `restricted` is enforced.
    NodeDir(String),
    /// An init container of this image (railnet's own) writes it into an
    /// in-memory emptyDir from the records on the pod's interfaces
    /// (`railnetctl pod-info`), unprivileged: allowed by every Pod Security
    /// level.
    InitContainer(String),
}

/// The injected init container's name.
pub const RAIL_INFO_INIT: &str = "railnet-rail-info";

/// Where a pod's group is looked up: its own namespace and the shared one.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The pod's namespace.
    pub pod: &'a str,
    /// The administrator's namespace whose RailNetworks every namespace
    /// may use (`None`: only the pod's own).
    pub shared: Option<&'a str>,
}

impl Scope<'_> {
    fn admits(&self, network: &Value) -> bool {
        let ns = network["metadata"]["namespace"].as_str();
        ns == Some(self.pod) || (ns.is_some() && ns == self.shared)
    }

    fn describe(&self) -> String {
        match self.shared {
            Some(s) if s != self.pod => {
                format!("namespace {} or the shared namespace {s}", self.pod)
            }
            _ => format!("namespace {}", self.pod),
        }
    }
}

/// Decides the patch for `pod` asking for `group`, given RailNetworks
/// (those outside `scope` are never used); `rail_info`: where the chosen
/// container reads the pod's rail info at [`RAIL_INFO_PATH`] (`None`: it
/// does not). Err: the pod must be refused (with this message).
pub fn inject(
    pod: &Value,
    group: &str,
    networks: &[Value],
    scope: Scope<'_>,
    rail_info: Option<&RailInfoSource>,
) -> Result<Injection, String> {
    let mut members: Vec<&Value> = networks
        .iter()
        .filter(|n| n["spec"]["group"].as_str() == Some(group) && scope.admits(n))
        // VFs allocated through DRA claims have no NAD to name.
        .filter(|n| !crate::controller::dra_vfs(&n["spec"]))
        .collect();
    if members.is_empty() {
        return Err(format!(
            "{INJECT}: {group:?} names no RailNetwork in {} (set spec.group: {group} on rail networks there, or fix the annotation; another namespace's networks are never injected); without them the pod would start with no RDMA interfaces",
            scope.describe()
        ));
    }
    members.sort_by_key(|n| n["spec"]["rail"].as_u64().unwrap_or(u64::MAX));
    let mut out = Injection::default();
    let listed: Vec<Value> = members
        .iter()
        .map(|n| json!({"name": n["metadata"]["name"], "namespace": n["metadata"]["namespace"]}))
        .collect();
    let annotations = &pod["metadata"]["annotations"];
    if let Some(own) = annotations.get(NETWORKS).and_then(Value::as_str) {
        out.warnings.push(format!(
            "{NETWORKS} ({own}) was replaced by the networks of group {group:?} ({INJECT})"
        ));
    }
    let networks_value = Value::from(listed).to_string();
    // A pod with no annotations at all (most Deployment templates, pods of
    // an injected namespace): JSON patch cannot add a key to a map that is
    // not there, so the map comes whole.
    if annotations.is_object() {
        out.patch.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape(NETWORKS)),
            "value": networks_value,
        }));
    } else {
        out.patch.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": {NETWORKS: networks_value},
        }));
    }
    // Networks that move the VF's RDMA device into the pod work only on
    // nodes in exclusive mode: schedule there (agents label their nodes).
    if members.iter().any(|n| n["spec"]["rdmaIsolation"] == true) {
        let label = crate::node_label::RDMA_MODE_LABEL;
        if pod["spec"].get("nodeSelector").is_none() {
            out.patch
                .push(json!({"op": "add", "path": "/spec/nodeSelector",
                "value": {label: "exclusive"}}));
        } else {
            out.patch.push(json!({"op": "add",
                "path": format!("/spec/nodeSelector/{}", escape(label)), "value": "exclusive"}));
        }
    }
    // The resources: one per network that names one, in the container the
    // pod names, else the first.
    let (index, c) = target_container(pod)?;
    rail_info_patch(pod, c, index, rail_info, &mut out.patch);
    let wanted: Vec<&str> = members
        .iter()
        .filter_map(|n| n["spec"]["resourceName"].as_str())
        .collect();
    if wanted.is_empty() {
        return Ok(out);
    }
    let base = format!("/spec/containers/{index}/resources");
    let mut count: std::collections::BTreeMap<&str, u64> = Default::default();
    for r in wanted {
        *count.entry(r).or_default() += 1;
    }
    let limits: serde_json::Map<String, Value> = count
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(v.to_string())))
        .collect();
    match (c.get("resources"), c["resources"].get("limits")) {
        (None, _) => out
            .patch
            .push(json!({"op": "add", "path": base, "value": {"limits": limits}})),
        (Some(_), None) => out
            .patch
            .push(json!({"op": "add", "path": format!("{base}/limits"), "value": limits})),
        (Some(_), Some(existing)) => {
            for (k, v) in limits {
                if let Some(old) = existing.get(&k)
                    && old != &v
                {
                    out.warnings
                        .push(format!("limit {k}: {old} was replaced by {v} ({INJECT})"));
                }
                out.patch.push(json!({"op": "add",
                    "path": format!("{base}/limits/{}", escape(&k)), "value": v}));
            }
        }
    }
    Ok(out)
}

/// The container that gets the resources and rail info: the one the pod
/// names ([`CONTAINER`]), else the first; with its index.
pub fn target_container(pod: &Value) -> Result<(usize, &Value), String> {
    let containers = pod["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let index = match pod["metadata"]["annotations"]
        .get(CONTAINER)
        .and_then(Value::as_str)
    {
        Some(name) => containers
            .iter()
            .position(|c| c["name"] == name)
            .ok_or_else(|| format!("{CONTAINER}: the pod has no container {name:?}"))?,
        None if containers.is_empty() => return Err("the pod has no containers".into()),
        None => 0,
    };
    Ok((index, &containers[index]))
}

/// Gives container `index` (`c`) of `pod` its rail info at
/// [`RAIL_INFO_PATH`] from `rail_info` (nothing when `None`).
pub fn rail_info_patch(
    pod: &Value,
    c: &Value,
    index: usize,
    rail_info: Option<&RailInfoSource>,
    patch: &mut Vec<Value>,
) {
    match rail_info {
        Some(RailInfoSource::NodeDir(dir)) => mount_rail_info(pod, c, index, dir, patch),
        Some(RailInfoSource::InitContainer(image)) => rail_info_init(pod, c, index, image, patch),
        None => {}
    }
}

/// Mounts the pod's own directory of `dir` (on its node) read-only at
/// [`RAIL_INFO_PATH`] in container `index`: a hostPath volume with
/// `subPathExpr` of the pod's UID, which only the kubelet knows (the API
/// server assigns it after admission), passed in through the downward API.
/// Nothing when the pod has the volume already (the webhook ran before).
fn mount_rail_info(pod: &Value, c: &Value, index: usize, dir: &str, patch: &mut Vec<Value>) {
    let volumes = pod["spec"]["volumes"].as_array();
    if volumes.is_some_and(|v| v.iter().any(|v| v["name"] == RAIL_INFO_VOLUME)) {
        return;
    }
    let volume = json!({"name": RAIL_INFO_VOLUME,
        "hostPath": {"path": dir, "type": "DirectoryOrCreate"}});
    let env = json!({"name": "RAILNET_POD_UID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}});
    let mount = json!({"name": RAIL_INFO_VOLUME, "mountPath": RAIL_INFO_PATH,
        "readOnly": true, "subPathExpr": "$(RAILNET_POD_UID)"});
    let base = format!("/spec/containers/{index}");
    push_to(patch, "/spec/volumes", volumes.is_some(), volume);
    push_to(patch, &format!("{base}/env"), c["env"].is_array(), env);
    push_to(
        patch,
        &format!("{base}/volumeMounts"),
        c["volumeMounts"].is_array(),
        mount,
    );
}

/// Adds `item` to the list at `path` (the whole list if the pod has none).
fn push_to(patch: &mut Vec<Value>, path: &str, exists: bool, item: Value) {
    patch.push(if exists {
        json!({"op": "add", "path": format!("{path}/-"), "value": item})
    } else {
        json!({"op": "add", "path": path, "value": [item]})
    });
}

/// Gives container `index` the pod's rail info at [`RAIL_INFO_PATH`] from
/// an in-memory emptyDir that an init container of `image` fills first
/// (before any other init container: they may want it too). The init
/// container runs after the pod's interfaces are made (the sandbox's CNI
/// ADD comes before every container) and asks for nothing Pod Security
/// `restricted` forbids. Nothing when the pod has the volume already.
fn rail_info_init(pod: &Value, c: &Value, index: usize, image: &str, patch: &mut Vec<Value>) {
    let volumes = pod["spec"]["volumes"].as_array();
    if volumes.is_some_and(|v| v.iter().any(|v| v["name"] == RAIL_INFO_VOLUME)) {
        return;
    }
    push_to(
        patch,
        "/spec/volumes",
        volumes.is_some(),
        json!({"name": RAIL_INFO_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
    );
    let init = json!({
        "name": RAIL_INFO_INIT,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/usr/local/bin/railnetctl", "pod-info", "--out", RAIL_INFO_PATH],
        "volumeMounts": [{"name": RAIL_INFO_VOLUME, "mountPath": RAIL_INFO_PATH}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                      "limits": {"cpu": "100m", "memory": "32Mi"}},
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    });
    if pod["spec"]["initContainers"].is_array() {
        patch.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
    } else {
        patch.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init]}));
    }
    push_to(
        patch,
        &format!("/spec/containers/{index}/volumeMounts"),
        c["volumeMounts"].is_array(),
        json!({"name": RAIL_INFO_VOLUME, "mountPath": RAIL_INFO_PATH, "readOnly": true}),
    );
}

/// The AdmissionReview answer for `review`, with `networks` RailNetworks
/// (of the pod's namespace and `shared`, the shared namespace; any others
/// are ignored), `namespace_group` the pod namespace's inject annotation,
/// if any, `rail_info` as [`inject`] takes it, and `dra_network`
/// railnet's DRA network (`namespace/name`; a pod naming it keeps its
/// networks: [`crate::webhook_dra`]).
pub fn answer(
    review: &Value,
    networks: &[Value],
    namespace_group: Option<&str>,
    shared: Option<&str>,
    rail_info: Option<&RailInfoSource>,
    dra_network: Option<&str>,
) -> Value {
    let uid = review["request"]["uid"].clone();
    let pod = &review["request"]["object"];
    let scope = Scope {
        pod: review["request"]["namespace"].as_str().unwrap_or_default(),
        shared,
    };
    let group = pod["metadata"]["annotations"]
        .get(INJECT)
        .and_then(Value::as_str)
        .or(namespace_group);
    let dra = dra_network.filter(|d| crate::webhook_dra::names_network(pod, scope.pod, d));
    let response = match group.map(|g| match dra {
        Some(d) => crate::webhook_dra::inject(pod, g, d, rail_info),
        None => inject(pod, g, networks, scope, rail_info),
    }) {
        None => json!({"uid": uid, "allowed": true}),
        Some(Ok(inj)) => {
            let mut r = json!({"uid": uid, "allowed": true});
            if !inj.patch.is_empty() {
                r["patchType"] = "JSONPatch".into();
                r["patch"] = base64::engine::general_purpose::STANDARD
                    .encode(Value::from(inj.patch).to_string())
                    .into();
            }
            if !inj.warnings.is_empty() {
                r["warnings"] = inj.warnings.into();
            }
            r
        }
        Some(Err(why)) => json!({"uid": uid, "allowed": false,
            "status": {"code": 422, "reason": "Invalid", "message": why}}),
    };
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// TLS config from PEM files (the chart's Secret).
pub fn tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect())
        .map_err(|e| format!("certificate {}: {e}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("certificate and key do not match: {e}"))?;
    Ok(Arc::new(config))
}

/// The response, and how to count it (`None`: not a review).
async fn handle(
    cache: &Cache,
    rail_info: Option<&RailInfoSource>,
    shared: Option<&str>,
    dra_network: Option<&str>,
    req: Request<hyper::body::Incoming>,
) -> (Response<Full<Bytes>>, Option<&'static str>) {
    let reply = |code: u16, body: String| {
        Response::builder()
            .status(code)
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => return (reply(200, "\"ok\"".into()), None),
        ("POST", "/mutate-pods") => {}
        _ => return (reply(404, "\"POST /mutate-pods\"".into()), None),
    }
    // The API server caps objects at 3 MiB; so do we.
    let body = match Limited::new(req.into_body(), 3 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return (
                reply(400, json!(format!("body: {e}")).to_string()),
                Some("bad_request"),
            );
        }
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return (
                reply(
                    400,
                    json!(format!("not an AdmissionReview: {e}")).to_string(),
                ),
                Some("bad_request"),
            );
        }
    };
    let ns = review["request"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let asks = review["request"]["object"]["metadata"]["annotations"]
        .get(INJECT)
        .is_some();
    if !cache.is_ready() {
        // Refuse rather than start the pod without its rails.
        let uid = review["request"]["uid"].clone();
        return (
            reply(
                200,
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {"uid": uid, "allowed": false, "status": {"code": 503,
                        "message": "railnet has not read the RailNetworks and namespaces yet (is the API server reachable from railnet-controller?); try again"}}})
                .to_string(),
            ),
            Some("denied"),
        );
    }
    let ns_group = if asks {
        None
    } else {
        cache.namespace_annotation(&ns, INJECT).await
    };
    if !asks && ns_group.is_none() {
        return (
            reply(
                200,
                answer(&review, &[], None, None, None, None).to_string(),
            ),
            Some("unchanged"),
        );
    }
    // Only the namespaces a pod's group may come from are read.
    let mut networks = cache.networks_in(&ns);
    if let Some(shared) = shared.filter(|s| *s != ns) {
        networks.extend(cache.networks_in(shared));
    }
    let a = answer(
        &review,
        &networks,
        ns_group.as_deref(),
        shared,
        rail_info,
        dra_network,
    );
    let result = match (&a["response"]["allowed"], a["response"].get("patch")) {
        (Value::Bool(false), _) => "denied",
        (_, Some(_)) => "patched",
        _ => "unchanged",
    };
    (reply(200, a.to_string()), Some(result))
}

/// Serves `POST /mutate-pods` (and `GET /healthz`) over TLS until the task
/// is dropped, within the bounds of [`crate::http::Limits`] (any pod can
/// reach the webhook's Service); `client` watches RailNetworks and
/// namespaces (a client without a read timeout: see
/// [`crate::kube_api::watch_client`]); `rail_info` as [`inject`]
/// takes it, `shared` the shared networks' namespace ([`Scope`]),
/// `dra_network` railnet's DRA network ([`answer`]).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    client: Client,
    metrics: Arc<crate::controller::Metrics>,
    rail_info: Option<RailInfoSource>,
    shared: Option<String>,
    dra_network: Option<String>,
) {
    let rail_info: Option<Arc<RailInfoSource>> = rail_info.map(Arc::new);
    let shared: Option<Arc<str>> = shared.map(Into::into);
    let dra_network: Option<Arc<str>> = dra_network.map(Into::into);
    let cache = Cache::start(&client);
    // Serving before the first lists are in would only refuse pods.
    if !cache.wait_ready(Duration::from_secs(30)).await {
        tracing::warn!(
            "the webhook's RailNetworks and namespaces are not listed yet; refusing pods until they are"
        );
    }
    let handler = move |req| {
        let (cache, metrics) = (cache.clone(), metrics.clone());
        let (rail_info, shared) = (rail_info.clone(), shared.clone());
        let dra_network = dra_network.clone();
        async move {
            let (response, result) = handle(
                &cache,
                rail_info.as_deref(),
                shared.as_deref(),
                dra_network.as_deref(),
                req,
            )
            .await;
            if let Some(r) = result {
                metrics.webhook_answer(r);
            }
            response
        }
    };
    crate::http::serve(
        listener,
        crate::http::Limits::default(),
        TlsAcceptor::from(tls),
        handler,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, rail: u64, group: &str, resource: Option<&str>) -> Value {
        let mut spec = json!({"rail": rail, "type": "macvlan", "master": "eth1", "group": group});
        if let Some(r) = resource {
            spec = json!({"rail": rail, "type": "sriov", "group": group, "resourceName": r});
        }
        json!({"metadata": {"name": name, "namespace": "railnet"}, "spec": spec})
    }

    /// The tests' pods are in namespace `ai`; the networks in `railnet`,
    /// the shared namespace.
    const SCOPE: Scope<'static> = Scope {
        pod: "ai",
        shared: Some("railnet"),
    };

    #[test]
    fn vfs_allocated_through_dra_are_not_injected_as_networks() {
        let mut dra_vfs = net("vf2", 2, "g", None);
        dra_vfs["spec"] = json!({"rail": 2, "type": "sriov", "master": "eth2", "group": "g"});
        let nets = [net("r1", 1, "g", Some("r/a")), dra_vfs];
        let pod = json!({"metadata": {}, "spec": {"containers": [{"name": "c"}]}});
        let got = inject(&pod, "g", &nets, SCOPE, None).unwrap();
        let value = got.patch[0]["value"].to_string();
        assert!(value.contains("r1"), "{value}");
        assert!(
            !value.contains("vf2"),
            "a DRA VF network has no NAD: {value}"
        );
    }

    #[test]
    fn a_namespace_annotation_applies_unless_the_pod_names_its_own_group() {
        let nets = [
            net("a1", 1, "ns-group", Some("r/a")),
            net("b1", 1, "pod-group", Some("r/b")),
        ];
        let review = |annotations: Value| {
            json!({"request": {"uid": "u", "namespace": "ai", "object": {"metadata": {"annotations": annotations},
                   "spec": {"containers": [{"name": "c"}]}}}})
        };
        let networks_of = |answer: &Value| -> String {
            let patch = base64::engine::general_purpose::STANDARD
                .decode(answer["response"]["patch"].as_str().unwrap())
                .unwrap();
            let patch: Value = serde_json::from_slice(&patch).unwrap();
            patch[0]["value"].as_str().unwrap().to_owned()
        };
        let from_ns = answer(
            &review(json!({})),
            &nets,
            Some("ns-group"),
            Some("railnet"),
            None,
            None,
        );
        assert!(networks_of(&from_ns).contains("a1"));
        let own = answer(
            &review(json!({INJECT: "pod-group"})),
            &nets,
            Some("ns-group"),
            Some("railnet"),
            None,
            None,
        );
        assert!(networks_of(&own).contains("b1"));
        let none = answer(&review(json!({})), &nets, None, Some("railnet"), None, None);
        assert!(none["response"].get("patch").is_none());
        // A pod of the namespace naming the DRA network keeps it.
        let dra = answer(
            &review(json!({NETWORKS: "railnet/railnet-dra"})),
            &nets,
            Some("ns-group"),
            Some("railnet"),
            None,
            Some("railnet/railnet-dra"),
        );
        assert_eq!(dra["response"]["allowed"], true);
        assert!(dra["response"].get("patch").is_none(), "{dra}");
        assert!(
            dra["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("DRA network")
        );
    }

    #[test]
    fn isolated_networks_schedule_on_exclusive_nodes() {
        let mut iso = net("gpu1", 1, "g", Some("r/1"));
        iso["spec"]["rdmaIsolation"] = true.into();
        let pod = json!({"metadata": {"annotations": {INJECT: "g"}},
                         "spec": {"containers": [{"name": "c"}], "nodeSelector": {"gpu": "h100"}}});
        let inj = inject(&pod, "g", &[iso], SCOPE, None).unwrap();
        assert!(
            inj.patch.iter().any(|op| op["path"]
                == "/spec/nodeSelector/railnet.io~1rdma-netns-mode"
                && op["value"] == "exclusive"),
            "{:?}",
            inj.patch
        );
        let shared = net("gpu1", 1, "g", Some("r/1"));
        let inj = inject(&pod, "g", &[shared], SCOPE, None).unwrap();
        assert!(
            !inj.patch
                .iter()
                .any(|op| op["path"].as_str().unwrap().contains("nodeSelector"))
        );
    }

    #[test]
    fn a_pod_without_annotations_gets_the_whole_map() {
        // Namespace-level injection: the pod itself has no annotations.
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let inj = inject(&pod, "g", &[net("gpu1", 1, "g", None)], SCOPE, None).unwrap();
        assert_eq!(inj.patch[0]["path"], "/metadata/annotations");
        let listed: Value =
            serde_json::from_str(inj.patch[0]["value"][NETWORKS].as_str().unwrap()).unwrap();
        assert_eq!(listed[0]["name"], "gpu1");
    }

    #[test]
    fn keys_with_slashes_are_escaped_in_paths() {
        assert_eq!(
            escape("k8s.v1.cni.cncf.io/networks"),
            "k8s.v1.cni.cncf.io~1networks"
        );
        assert_eq!(escape("a~b/c"), "a~0b~1c");
    }

    #[test]
    fn networks_are_ordered_by_rail_and_shared_resources_counted() {
        let nets = [
            net("gpu2", 2, "g", Some("nvidia.com/shared")),
            net("gpu1", 1, "g", Some("nvidia.com/shared")),
            net("other", 3, "h", Some("x/y")),
        ];
        let pod = json!({"metadata": {"annotations": {INJECT: "g"}},
                         "spec": {"containers": [{"name": "c"}]}});
        let inj = inject(&pod, "g", &nets, SCOPE, None).unwrap();
        let listed: Value = serde_json::from_str(inj.patch[0]["value"].as_str().unwrap()).unwrap();
        assert_eq!(listed[0]["name"], "gpu1");
        assert_eq!(listed[1]["name"], "gpu2");
        assert_eq!(listed.as_array().unwrap().len(), 2);
        assert_eq!(inj.patch[1]["value"]["limits"]["nvidia.com/shared"], "2");
    }

    /// A group is resolved in the pod's namespace and the shared one: a
    /// RailNetwork another tenant made in its own namespace is never given
    /// to this pod, even under the same group name.
    #[test]
    fn another_namespace_s_networks_are_never_injected() {
        let mut theirs = net("evil1", 1, "g", Some("r/x"));
        theirs["metadata"]["namespace"] = "tenant-b".into();
        let mut own = net("gpu1", 1, "g", Some("r/1"));
        own["metadata"]["namespace"] = "ai".into();
        let pod = json!({"metadata": {"annotations": {INJECT: "g"}},
                         "spec": {"containers": [{"name": "c"}]}});
        let inj = inject(&pod, "g", &[theirs.clone(), own], SCOPE, None).unwrap();
        let listed = inj.patch[0]["value"].as_str().unwrap();
        assert!(
            listed.contains("gpu1") && !listed.contains("evil1"),
            "{listed}"
        );
        let only_theirs = inject(&pod, "g", &[theirs], SCOPE, None).unwrap_err();
        assert!(
            only_theirs
                .contains("names no RailNetwork in namespace ai or the shared namespace railnet"),
            "{only_theirs}"
        );
        // Without a shared namespace, only the pod's own.
        let alone = Scope {
            pod: "ai",
            shared: None,
        };
        let shared_net = net("gpu1", 1, "g", None);
        assert!(inject(&pod, "g", &[shared_net], alone, None).is_err());
    }

    /// Hardening 15: with the init-container source, nothing Pod Security
    /// `baseline` or `restricted` refuses is added (no hostPath, no
    /// privilege), the init container comes before the pod's own, and the
    /// chosen container mounts what it writes.
    #[test]
    fn rail_info_from_an_init_container_needs_no_host_path() {
        let pod = json!({"metadata": {"annotations": {}}, "spec": {
            "initContainers": [{"name": "theirs", "image": "x"}],
            "containers": [{"name": "main", "volumeMounts": [{"name": "data", "mountPath": "/d"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]}});
        let source = RailInfoSource::InitContainer("ghcr.io/railnet/railnet:0.1.0".into());
        let inj = inject(
            &pod,
            "g",
            &[net("gpu1", 1, "g", None)],
            SCOPE,
            Some(&source),
        )
        .unwrap();
        let op = |path: &str| {
            inj.patch
                .iter()
                .find(|p| p["path"] == path)
                .unwrap_or_else(|| panic!("no {path} in {:#}", Value::from(inj.patch.clone())))
                .clone()
        };
        let text = Value::from(inj.patch.clone()).to_string();
        assert!(!text.contains("hostPath"), "{text}");
        assert_eq!(
            op("/spec/volumes/-")["value"]["emptyDir"]["medium"],
            "Memory"
        );
        let init = op("/spec/initContainers/0")["value"].clone();
        assert_eq!(init["name"], RAIL_INFO_INIT);
        assert_eq!(init["image"], "ghcr.io/railnet/railnet:0.1.0");
        assert_eq!(init["command"][1], "pod-info");
        let sc = &init["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        let mount = op("/spec/containers/0/volumeMounts/-")["value"].clone();
        assert_eq!(mount["mountPath"], RAIL_INFO_PATH);
        assert_eq!(mount["readOnly"], true);
        // A pod with no init containers gets the list.
        let bare = json!({"metadata": {}, "spec": {"containers": [{"name": "main"}]}});
        let inj = inject(
            &bare,
            "g",
            &[net("gpu1", 1, "g", None)],
            SCOPE,
            Some(&source),
        )
        .unwrap();
        assert!(inj.patch.iter().any(
            |p| p["path"] == "/spec/initContainers" && p["value"][0]["name"] == RAIL_INFO_INIT
        ));
    }
}
