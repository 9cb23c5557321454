//! The controller role: renders each `RailNetwork` into the Multus
//! NetworkAttachmentDefinition of the same name and keeps it so (a NAD
//! edited by hand is put back), reporting on the RailNetwork's status.
//! Several replicas may run; one leads, through a `Lease`
//! (coordination.k8s.io/v1) taken and renewed with resourceVersion
//! preconditions, and only the leader writes.

use std::collections::BTreeMap;

use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    core::{ApiResource, DynamicObject},
};
use serde_json::{Value, json};

use crate::kube_api::resource;

mod leader;
mod metrics;
mod pool_status;
mod sweep;
mod uninstall;

pub use leader::Leader;
pub use metrics::{Metrics, serve_metrics};
pub use pool_status::pool_status;
pub use sweep::{BlockSweeper, ClaimSweeper, node_names, pod_uids};
pub use uninstall::{Uninstalled, delete_slices, mark_uninstalling, stop_controller, uninstall};

/// `railnetworks.railnet.io/v1alpha1`.
pub fn railnetworks() -> ApiResource {
    resource("railnet.io", "v1alpha1", "RailNetwork", "railnetworks")
}

/// `network-attachment-definitions.k8s.cni.cncf.io/v1` (Multus).
pub fn nads() -> ApiResource {
    resource(
        "k8s.cni.cncf.io",
        "v1",
        "NetworkAttachmentDefinition",
        "network-attachment-definitions",
    )
}

/// Annotation without which Multus passes no `deviceID` to the plugin.
pub const RESOURCE_NAME: &str = "k8s.v1.cni.cncf.io/resourceName";
/// Label marking NADs this controller renders.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// The CNI config (`spec.config` of the NAD) and annotations for one
/// RailNetwork's spec, or why this version cannot serve it.
pub fn render(spec: &Value) -> Result<(Value, BTreeMap<String, String>), String> {
    let ty = spec["type"].as_str().unwrap_or_default();
    let mode = match ty {
        "macvlan" | "ipvlan" | "sriov" | "ib-sriov" | "ipoib" => ty,
        other => return Err(format!("type {other:?} is unknown")),
    };
    if ty == "ipoib" && spec["ib"].get("ibKubernetesEnabled").is_some() {
        return Err(
            "ib.ibKubernetesEnabled is for ib-sriov VFs (ib-kubernetes gives each a GUID): remove it"
                .to_owned(),
        );
    }
    if ty == "ipoib" && spec["ib"].get("linkState").is_some() {
        return Err(
            "ib.linkState is set through a VF's PF (type ib-sriov); an IPoIB child follows its port: remove it"
                .to_owned(),
        );
    }
    let mut conf = json!({
        "cniVersion": spec.get("cniVersion").cloned().unwrap_or_else(|| "0.3.1".into()),
        "name": Value::Null,
        "type": "railnet",
        "rail": spec["rail"],
        "mode": mode,
        "ippools": spec["ippools"],
    });
    let o = conf.as_object_mut().expect("an object");
    for k in [
        "master",
        "mtu",
        "routing",
        "rdmaCIDRs",
        "matchMasterSubnet",
        "rdmaIsolation",
        "detectIPConflict",
        "detectGateway",
    ] {
        if let Some(v) = spec.get(k)
            && !v.is_null()
            && v != &Value::Bool(false)
        {
            o.insert(k.into(), v.clone());
        }
    }
    // VF attributes under sriov-cni's keys (the CRD allows them on sriov
    // networks only).
    for (from, to) in [
        ("vlan", "vlan"),
        ("vlanQoS", "vlanQoS"),
        ("trust", "trust"),
        ("spoofchk", "spoofchk"),
        ("linkState", "link_state"),
    ] {
        if let Some(v) = spec["vf"].get(from) {
            o.insert(to.into(), v.clone());
        }
    }
    // Multus passes the pod's GUID (ib-kubernetes sets it) only when asked.
    if mode == "ib-sriov" {
        o.insert("capabilities".into(), json!({"infinibandGUID": true}));
    }
    // InfiniBand VF settings under ib-sriov-cni's keys.
    for (from, to) in [
        ("linkState", "link_state"),
        ("pkey", "pkey"),
        ("ibKubernetesEnabled", "ibKubernetesEnabled"),
    ] {
        if let Some(v) = spec["ib"].get(from) {
            o.insert(to.into(), v.clone());
        }
    }
    let mut annotations = BTreeMap::new();
    if let Some(r) = spec.get("resourceName").and_then(Value::as_str) {
        annotations.insert(RESOURCE_NAME.to_owned(), r.to_owned());
    }
    Ok((conf, annotations))
}

/// Whether a RailNetwork's VFs are DRA devices (a VF type naming its PF
/// in `master`, no device plugin `resourceName`): pods claim them through
/// ResourceClaims, and it has no NAD — Multus would pass no `deviceID`.
pub fn dra_vfs(spec: &Value) -> bool {
    matches!(spec["type"].as_str(), Some("sriov" | "ib-sriov"))
        && spec.get("resourceName").is_none_or(Value::is_null)
}

/// What the NAD for RailNetwork `net` must be (name, namespace, owner,
/// labels, annotations, config).
pub fn desired_nad(net: &DynamicObject) -> Result<DynamicObject, String> {
    let name = net.metadata.name.clone().unwrap_or_default();
    let ns = net.metadata.namespace.clone().unwrap_or_default();
    let (mut conf, annotations) = render(&net.data["spec"])?;
    conf["name"] = name.clone().into();
    let mut nad = DynamicObject::new(&name, &nads()).within(&ns).data(json!({
        "spec": {"config": conf.to_string()}
    }));
    nad.metadata.labels = Some(BTreeMap::from([
        (MANAGED_BY.to_owned(), "railnet".to_owned()),
        (
            "railnet.io/rail".to_owned(),
            net.data["spec"]["rail"].to_string(),
        ),
    ]));
    nad.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    // Deleting the RailNetwork deletes its NAD (same namespace: an owner
    // reference is allowed here, unlike for cluster-scoped claims).
    if let Some(uid) = &net.metadata.uid {
        nad.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "railnet.io/v1alpha1".into(),
                kind: "RailNetwork".into(),
                name: name.clone(),
                uid: uid.clone(),
                controller: Some(true),
                block_owner_deletion: None,
            },
        ]);
    }
    Ok(nad)
}

/// Watches RailNetworks and the NADs rendered from them, and wakes
/// `changed` at every event: a new network gets its NAD, and a hand edit
/// is put back, within a pass rather than an `--interval`. Each watch
/// lists first (for the version to watch from) and starts over when it
/// ends or fails (a second later). `client` must have no read timeout.
pub async fn watch_changes(client: Client, changed: std::sync::Arc<tokio::sync::Notify>) {
    let nets: Api<DynamicObject> = Api::all_with(client.clone(), &railnetworks());
    let rendered: Api<DynamicObject> = Api::all_with(client, &nads());
    tokio::join!(
        watch_one(nets, ListParams::default(), changed.clone()),
        watch_one(
            rendered,
            ListParams::default().labels(&format!("{MANAGED_BY}=railnet")),
            changed,
        ),
    );
}

async fn watch_one(
    api: Api<DynamicObject>,
    lp: ListParams,
    changed: std::sync::Arc<tokio::sync::Notify>,
) {
    use futures::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    loop {
        let started = async {
            let version = api
                .list_metadata(&lp.clone().limit(1))
                .await?
                .metadata
                .resource_version
                .unwrap_or_default();
            let mut wp = WatchParams::default().timeout(290);
            if let Some(l) = &lp.label_selector {
                wp = wp.labels(l);
            }
            api.watch(&wp, &version).await
        }
        .await;
        let stream = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch; again in a second");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Deleted(_)) => {
                    changed.notify_one();
                }
                Ok(WatchEvent::Bookmark(_)) => {}
                Ok(WatchEvent::Error(_)) | Err(_) => break,
            }
        }
    }
}

/// Whether `live` already is what `want` says (the fields we own).
fn in_sync(live: &DynamicObject, want: &DynamicObject) -> bool {
    let annotations = |o: &DynamicObject| {
        let mut a = o.metadata.annotations.clone().unwrap_or_default();
        a.retain(|k, _| k == RESOURCE_NAME);
        a
    };
    live.data["spec"]["config"] == want.data["spec"]["config"]
        && annotations(live) == annotations(want)
        && live
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .is_some()
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// NADs created.
    pub created: usize,
    /// NADs put back after they drifted.
    pub repaired: usize,
    /// NADs deleted because their network's VFs became DRA devices.
    pub removed: usize,
    /// RailNetworks that cannot be rendered (status says why).
    pub refused: usize,
    /// RailNetworks whose NAD or status the API server did not take this
    /// pass (each logged; the others were still rendered).
    pub failed: usize,
}

/// Renders every RailNetwork once: creates missing NADs, repairs drifted
/// ones, writes each RailNetwork's status. `vf_namespace`: the namespace
/// whose VF networks the agents publish as DRA devices (the release's,
/// when DRA is on).
pub async fn reconcile(client: &Client, vf_namespace: Option<&str>) -> Result<Pass, kube::Error> {
    let nets: Api<DynamicObject> = Api::all_with(client.clone(), &railnetworks());
    let mut pass = Pass::default();
    for net in nets.list(&ListParams::default()).await?.items {
        // One network the API server refuses (a NAD another tool holds, a
        // namespace being deleted, a conflict) must not stop the others.
        if let Err(e) = reconcile_one(client, &net, vf_namespace, &mut pass).await {
            pass.failed += 1;
            tracing::warn!(
                network = net.metadata.name.as_deref().unwrap_or_default(),
                namespace = net.metadata.namespace.as_deref().unwrap_or_default(),
                error = %e,
                "cannot render this RailNetwork this pass; the others go on"
            );
        }
    }
    Ok(pass)
}

/// Deletes the NAD rendered from `net` while it was a device plugin's
/// network, now that its VFs are DRA devices: a pod naming it would get
/// no `deviceID` from Multus. Only railnet's own (labelled, owned by this
/// RailNetwork) — a NAD of that name someone else made stays.
async fn remove_rendered_nad(
    client: &Client,
    net: &DynamicObject,
    pass: &mut Pass,
) -> Result<(), kube::Error> {
    let (Some(name), Some(ns)) = (&net.metadata.name, &net.metadata.namespace) else {
        return Ok(());
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &nads());
    let Some(live) = api.get_opt(name).await? else {
        return Ok(());
    };
    let ours = live
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY))
        .is_some_and(|v| v == "railnet");
    let owned = live
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "RailNetwork" && Some(&o.uid) == net.metadata.uid.as_ref());
    if ours && owned {
        api.delete(name, &Default::default()).await?;
        tracing::info!(network = %name, namespace = %ns,
            "deleted the NetworkAttachmentDefinition of a network whose VFs are now DRA devices");
        pass.removed += 1;
    }
    Ok(())
}

/// Renders one RailNetwork: its NAD, then its status.
async fn reconcile_one(
    client: &Client,
    net: &DynamicObject,
    vf_namespace: Option<&str>,
    pass: &mut Pass,
) -> Result<(), kube::Error> {
    let name = net.metadata.name.clone().unwrap_or_default();
    let ns = net.metadata.namespace.clone().unwrap_or_default();
    let status = match desired_nad(net) {
        Ok(_) if dra_vfs(&net.data["spec"]) => {
            remove_rendered_nad(client, net, pass).await?;
            match vf_namespace {
                Some(admin) if admin != ns => json!({"conditions": [
                {"type": "Ready", "status": "False", "reason": "NotPublished",
                 "message": format!("VFs move into pods whole: only VF networks of namespace {admin} (the administrator's) \
                                     are published as DRA devices; create it there (claims of every namespace may use it)")}]}),
                _ => json!({"conditions": [
                {"type": "Ready", "status": "True", "reason": "DRADevices",
                 "message": "its VFs are published as DRA devices (DeviceClass sriov.railnet.io or ib-sriov.railnet.io): \
                             pods claim them through ResourceClaims and name the railnet-dra network; it has no NetworkAttachmentDefinition"}]}),
            }
        }
        Ok(want) => {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &nads());
            match api.get_opt(&name).await? {
                None => {
                    api.create(&PostParams::default(), &want).await?;
                    tracing::info!(network = %name, namespace = %ns, "rendered NetworkAttachmentDefinition");
                    pass.created += 1;
                }
                Some(live) if !in_sync(&live, &want) => {
                    let mut fixed = want.clone();
                    fixed.metadata.resource_version = live.metadata.resource_version.clone();
                    // Keep annotations others put there (Multus
                    // tooling), ours win.
                    let mut a = live.metadata.annotations.clone().unwrap_or_default();
                    a.remove(RESOURCE_NAME);
                    a.extend(want.metadata.annotations.clone().unwrap_or_default());
                    fixed.metadata.annotations = (!a.is_empty()).then_some(a);
                    api.replace(&name, &PostParams::default(), &fixed).await?;
                    tracing::warn!(network = %name, namespace = %ns, "NetworkAttachmentDefinition differed from its RailNetwork; put back");
                    pass.repaired += 1;
                }
                Some(_) => {}
            }
            json!({"networkAttachmentDefinition": name, "conditions": [
                {"type": "Ready", "status": "True", "reason": "Rendered",
                 "message": format!("NetworkAttachmentDefinition {ns}/{name} is in sync")}]})
        }
        Err(why) => {
            pass.refused += 1;
            json!({"conditions": [
                {"type": "Ready", "status": "False", "reason": "Unsupported", "message": why}]})
        }
    };
    if net.data.get("status") != Some(&status) {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &railnetworks());
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconf::NetConf;

    /// One RailNetwork whose NAD the API server refuses does not stop the
    /// pass: the other's NAD is made and its status written (kube-rs over
    /// a mock service: the test API server cannot be made to refuse one
    /// create).
    #[tokio::test]
    async fn a_network_the_api_server_refuses_does_not_stop_the_others() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |req: hyper::Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                log.lock().unwrap().push(format!("{method} {path}"));
                let net = |name: &str| {
                    json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
                           "metadata": {"name": name, "namespace": "ai"},
                           "spec": {"rail": 1, "type": "macvlan", "master": "eth1",
                                    "ippools": {"ipv4": ["rail1"]}}})
                };
                let (code, body) = match (method.as_str(), path.as_str()) {
                    ("GET", "/apis/railnet.io/v1alpha1/railnetworks") => (
                        200,
                        json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetworkList",
                               "metadata": {}, "items": [net("a"), net("b")]}),
                    ),
                    ("POST", p) if p.ends_with("/network-attachment-definitions") => {
                        let body = http_body_util::BodyExt::collect(req.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        let obj: Value = serde_json::from_slice(&body).unwrap();
                        if obj["metadata"]["name"] == "a" {
                            (
                                500,
                                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "message": "etcdserver: request timed out", "code": 500}),
                            )
                        } else {
                            (201, obj)
                        }
                    }
                    ("PATCH", _) => (200, net("b")),
                    _ => (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "NotFound", "code": 404}),
                    ),
                };
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .status(code)
                        .header("Content-Type", "application/json")
                        .body(kube::client::Body::from(body.to_string().into_bytes()))
                        .unwrap(),
                )
            }
        });
        let pass = reconcile(&Client::new(service, "default"), None)
            .await
            .unwrap();
        assert_eq!((pass.created, pass.failed), (1, 1), "{pass:?}");
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter()
                .any(|r| r == "PATCH /apis/railnet.io/v1alpha1/namespaces/ai/railnetworks/b/status"),
            "b's status not written: {seen:?}"
        );
    }

    #[test]
    fn a_rendered_network_is_one_railnet_accepts() {
        let spec = json!({"rail": 3, "type": "macvlan", "master": "eno5np1",
            "ippools": {"ipv4": ["rail3"]}, "mtu": 4200, "rdmaCIDRs": ["172.16.0.0/16"],
            "matchMasterSubnet": false, "group": "gpu"});
        let (mut conf, annotations) = render(&spec).unwrap();
        conf["name"] = "rail3".into();
        let parsed = NetConf::parse(conf.to_string().as_bytes()).expect("railnet accepts it");
        assert_eq!(parsed.name, "rail3");
        assert!(annotations.is_empty());
        assert!(
            conf.get("matchMasterSubnet").is_none(),
            "false is the default"
        );
        assert!(
            conf.get("group").is_none(),
            "group is the webhook's, not the CNI's"
        );
    }

    #[test]
    fn sriov_carries_the_resource_and_ipoib_its_partition() {
        let spec = json!({"rail": 1, "type": "sriov", "resourceName": "nvidia.com/rail1",
            "ippools": {"ipv4": ["rail1"]}, "rdmaIsolation": true});
        let (_, a) = render(&spec).unwrap();
        assert_eq!(a[RESOURCE_NAME], "nvidia.com/rail1");
        let ib = json!({"rail": 1, "type": "ipoib", "master": "ib0", "ippools": {"ipv4": ["p"]},
            "ib": {"pkey": "0x8001"}});
        let (mut conf, a) = render(&ib).unwrap();
        assert!(a.is_empty());
        conf["name"] = "ib1".into();
        let parsed = crate::netconf::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert!(parsed.ipoib());
        assert_eq!(parsed.pkey, Some("0x8001".into()));
        let mut bad = ib.clone();
        bad["ib"]["linkState"] = "enable".into();
        assert!(render(&bad).unwrap_err().contains("ib.linkState"));
    }

    /// A VF network names its VFs' server: the device plugin
    /// (`resourceName`, a NAD) or DRA (`master`, the PF; no NAD).
    #[test]
    fn vf_networks_naming_their_pf_are_dra_devices() {
        let dra = json!({"rail": 2, "type": "sriov", "master": "eth2", "ippools": {"ipv4": ["p"]}});
        assert!(dra_vfs(&dra));
        let ib =
            json!({"rail": 2, "type": "ib-sriov", "master": "ib0", "ippools": {"ipv4": ["p"]}});
        assert!(dra_vfs(&ib));
        let plugin = json!({"rail": 2, "type": "sriov", "resourceName": "nvidia.com/rail2",
                            "ippools": {"ipv4": ["p"]}});
        assert!(!dra_vfs(&plugin));
        let macvlan =
            json!({"rail": 2, "type": "macvlan", "master": "eth2", "ippools": {"ipv4": ["p"]}});
        assert!(!dra_vfs(&macvlan));
    }

    /// An ib-sriov RailNetwork (the seeds' InfiniBand rails) renders into a
    /// NAD railnet's parser takes: the VF's resource, isolation, and the
    /// `ib` settings under ib-sriov-cni's keys.
    #[test]
    fn ib_sriov_networks_render_for_the_cni() {
        let spec = json!({"rail": 1, "type": "ib-sriov", "resourceName": "spidernet.io/eno3np2",
            "ippools": {"ipv4": ["gpu1-net91"]}, "rdmaIsolation": true,
            "ib": {"pkey": "0x8001", "linkState": "enable", "ibKubernetesEnabled": true}});
        let (mut conf, a) = render(&spec).unwrap();
        assert_eq!(a[RESOURCE_NAME], "spidernet.io/eno3np2");
        assert_eq!(conf["capabilities"]["infinibandGUID"], true);
        conf["name"] = "gpu1".into();
        conf["deviceID"] = "0000:3b:00.2".into();
        conf["runtimeConfig"] = json!({"infinibandGUID": "00:11:22:33:44:55:66:77"});
        let parsed = crate::netconf::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert!(parsed.ib_sriov() && parsed.rdma_isolation && parsed.ib_kubernetes_enabled);
        let set = parsed.vf_settings().unwrap();
        assert_eq!(set.link_state, Some(crate::netconf::VfLinkMode::Enable));
        assert_eq!(set.node_guid, Some(0x0011_2233_4455_6677));
        assert_eq!(set.port_guid, Some(0x0011_2233_4455_6677));
    }

    /// A RailNetwork's `vf` settings reach the NAD under sriov-cni's keys,
    /// and railnet's own parser reads them back as set.
    #[test]
    fn vf_settings_are_rendered_for_the_cni() {
        let spec = json!({"rail": 2, "type": "sriov", "resourceName": "nvidia.com/rail2",
            "ippools": {"ipv4": ["rail2"]},
            "vf": {"vlan": 100, "vlanQoS": 2, "trust": "on", "spoofchk": "off", "linkState": "enable"}});
        let (mut conf, _) = render(&spec).unwrap();
        conf["name"] = "rail2".into();
        conf["deviceID"] = "0000:3b:00.2".into();
        let parsed = crate::netconf::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert_eq!(
            parsed.vf_settings().unwrap(),
            crate::netconf::VfSettings {
                vlan: Some(100),
                qos: 2,
                spoofchk: Some(false),
                trust: Some(true),
                link_state: Some(crate::netconf::VfLinkMode::Enable),
                mac: None,
                ..Default::default()
            }
        );
    }
}
