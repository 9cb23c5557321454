//! The DRA network's ADD and DEL: every rail device the pod's prepared
//! claims hold, wired as the rail networks of NADs are (same steps, same
//! undo, same pod info), in one request; then each device's interface,
//! addresses and MAC in its claim's status.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::json;
use tracing::{info, warn};

use super::{
    DRIVER, Dra,
    prepared::{PreparedClaim, Wired, WiredRail},
};
use crate::{
    api::{AddResult, ApiError, Attachment, code},
    netns::PodNetns,
    rail::RailService,
};

/// How long the claim status write may take (it is informational: the
/// rails work without it, so ADD never waits on it).
const STATUS_WRITE: Duration = Duration::from_secs(10);

/// Wires the rails of the pod (`K8S_POD_UID`) into `netns`. On failure
/// nothing stays: the rails already made are taken down again.
pub fn add(
    dra: &Dra,
    service: &RailService,
    att: &Attachment,
    netns: &PodNetns,
) -> Result<Vec<AddResult>, ApiError> {
    let pod = pod_uid(att)?;
    let claims = claims_of(dra, &pod);
    if claims.iter().all(|c| c.devices.is_empty()) {
        return Err(ApiError::invalid_config(
            format!(
                "pod {pod} has no railnet device prepared on node {}",
                dra.node
            ),
            "the DRA network wires the rails a pod's ResourceClaims were allocated from driver railnet.io: \
             add a claim whose requests use a railnet.io DeviceClass, or name rail networks through their NADs instead",
        ));
    }
    let wired = Wired {
        pod_uid: pod.clone(),
        rails: rails(&claims),
    };
    // Recorded first: a DEL after a crash half-way undoes what was made.
    dra.store
        .save_wired(&att.container_id, &wired)
        .map_err(|e| ApiError::new(code::IO, "cannot record the pod's DRA rails", e.to_string()))?;
    let mut results = Vec::new();
    for rail in &wired.rails {
        match service.add(&attachment(att, rail), netns) {
            Ok(r) => results.push(r),
            Err(e) => {
                for done in wired.rails.iter().take(results.len()) {
                    if let Err(undo) = service.del(&attachment(att, done), Some(netns)) {
                        warn!(ifname = %done.ifname, error = %undo, "undoing a DRA rail failed; DEL will retry");
                    }
                }
                return Err(ApiError::new(
                    e.code,
                    format!(
                        "rail device {}/{} ({}): {}",
                        rail.pool, rail.device, rail.ifname, e.msg
                    ),
                    e.details,
                ));
            }
        }
    }
    if let (Some(info), Some(xml)) = (&service.pod_info, super::topology::render(&claims)) {
        // Without it NCCL still runs, pairing by what it detects.
        match info.record_topology(&pod, &xml) {
            Ok(()) => info!(pod_uid = %pod, "NCCL topology written: each GPU paired with its rail"),
            Err(e) => warn!(pod_uid = %pod, error = %e, "cannot write the pod's NCCL topology"),
        }
    }
    info!(pod_uid = %pod, rails = ?wired.rails.iter().map(|r| format!("{}={}/{}", r.ifname, r.pool, r.device)).collect::<Vec<_>>(), "DRA rails wired");
    let (rails, out) = (wired.rails.clone(), results.clone());
    let client = dra.client.clone();
    dra.runtime.spawn(async move {
        if let Err(e) =
            tokio::time::timeout(STATUS_WRITE, write_status(&client, &rails, &out)).await
        {
            warn!(error = %e, "the claims' network status was not written in time");
        }
    });
    Ok(results)
}

/// Undoes [`add`] for the sandbox; nothing recorded is nothing to undo.
pub fn del(
    dra: &Dra,
    service: &RailService,
    att: &Attachment,
    netns: Option<&PodNetns>,
) -> Result<(), ApiError> {
    let Some(wired) = dra.store.wired(&att.container_id) else {
        return Ok(());
    };
    let mut failed = None;
    for rail in &wired.rails {
        if let Err(e) = service.del(&attachment(att, rail), netns) {
            warn!(ifname = %rail.ifname, error = %e, "DEL of a DRA rail failed");
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    dra.store
        .forget_wired(&att.container_id)
        .map_err(|e| ApiError::new(code::IO, "cannot forget the pod's DRA rails", e.to_string()))
}

fn pod_uid(att: &Attachment) -> Result<String, ApiError> {
    att.args
        .get("K8S_POD_UID")
        .filter(|u| !u.is_empty())
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                code::INVALID_ENV,
                "the DRA network needs the pod's UID (CNI_ARGS K8S_POD_UID)",
                "Multus passes it; call railnet's DRA network through Multus",
            )
        })
}

/// The prepared claims reserved for `pod`, by name. A claim prepared
/// before the pod was added to it (a shared claim) is read again.
fn claims_of(dra: &Dra, pod: &str) -> Vec<PreparedClaim> {
    let mut all = dra.store.claims();
    if !all.iter().any(|c| c.pods.iter().any(|p| p == pod)) {
        for claim in &mut all {
            if let Some(pods) = reserved_for(dra, claim) {
                claim.pods = pods;
                if let Err(e) = dra.store.save_claim(claim) {
                    warn!(claim = %claim.name, error = %e, "cannot record the claim's pods");
                }
            }
        }
    }
    let mut mine: Vec<_> = all
        .into_iter()
        .filter(|c| c.pods.iter().any(|p| p == pod))
        .collect();
    mine.sort_by(|a, b| a.name.cmp(&b.name));
    mine
}

/// The pods a claim is reserved for now, from the API server.
fn reserved_for(dra: &Dra, claim: &PreparedClaim) -> Option<Vec<String>> {
    let api: kube::Api<ResourceClaim> = kube::Api::namespaced(dra.client.clone(), &claim.namespace);
    let live = dra
        .runtime
        .block_on(async { tokio::time::timeout(STATUS_WRITE, api.get(&claim.name)).await })
        .ok()?
        .ok()?;
    (live.metadata.uid.as_deref() == Some(claim.uid.as_str())).then(|| {
        live.status
            .and_then(|s| s.reserved_for)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.uid)
            .collect()
    })
}

/// The pod interfaces: `rail<K>` per device, in claim and allocation
/// order (`rail<K>-2`, … when a pod has two devices of one rail).
fn rails(claims: &[PreparedClaim]) -> Vec<WiredRail> {
    let mut taken = BTreeSet::new();
    let mut out = Vec::new();
    for claim in claims {
        for d in &claim.devices {
            let base = format!("rail{}", d.rail);
            let ifname = (1..)
                .map(|n| {
                    if n == 1 {
                        base.clone()
                    } else {
                        format!("{base}-{n}")
                    }
                })
                .find(|n| !taken.contains(n))
                .expect("a free name");
            taken.insert(ifname.clone());
            out.push(WiredRail {
                ifname,
                claim: (
                    claim.namespace.clone(),
                    claim.name.clone(),
                    claim.uid.clone(),
                ),
                pool: d.pool.clone(),
                device: d.device.clone(),
                share_id: d.share_id.clone(),
                conf: d.conf.clone(),
            });
        }
    }
    out
}

/// The request for one rail: the sandbox's IDs and args, the rail's
/// interface name and config.
fn attachment(att: &Attachment, rail: &WiredRail) -> Attachment {
    Attachment {
        container_id: att.container_id.clone(),
        ifname: rail.ifname.clone(),
        netconf: rail.conf.clone(),
        conf: None,
        args: att.args.clone(),
    }
}

/// Writes each rail's network data into its claim's status
/// (`status.devices`, the standard network device status), by
/// server-side apply: entries of other drivers stay.
async fn write_status(client: &kube::Client, rails: &[WiredRail], results: &[AddResult]) {
    let mut by_claim: std::collections::BTreeMap<
        &(String, String, String),
        Vec<serde_json::Value>,
    > = Default::default();
    for (rail, r) in rails.iter().zip(results) {
        let mut entry = json!({
            "driver": DRIVER, "pool": rail.pool, "device": rail.device,
            "networkData": {
                "interfaceName": r.interface.name,
                "ips": r.ips.iter().map(|ip| ip.address.to_string()).collect::<Vec<_>>(),
                "hardwareAddress": r.interface.mac,
            },
        });
        if let Some(s) = &rail.share_id {
            entry["shareID"] = json!(s);
        }
        by_claim.entry(&rail.claim).or_default().push(entry);
    }
    for ((ns, name, uid), devices) in by_claim {
        let api: kube::Api<ResourceClaim> = kube::Api::namespaced(client.clone(), ns);
        let patch = json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "status": {"devices": devices},
        });
        let params = kube::api::PatchParams::apply(DRIVER).force();
        match api
            .patch_status(name, &params, &kube::api::Patch::Apply(&patch))
            .await
        {
            Ok(_) => info!(claim = %format!("{ns}/{name}"), "network status written"),
            Err(e) => {
                warn!(claim = %format!("{ns}/{name}"), error = %e, "the claim's network status was not written")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dra::prepared::PreparedDevice;

    fn claim(name: &str, rails: &[u32]) -> PreparedClaim {
        PreparedClaim {
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            name: name.into(),
            pods: vec!["pod".into()],
            devices: rails
                .iter()
                .map(|r| PreparedDevice {
                    request: format!("nic{r}"),
                    pool: "node0/railnet".into(),
                    device: format!("rail{r}"),
                    share_id: None,
                    rail: *r,
                    conf: json!({"rail": r}),
                    placement: Default::default(),
                    infiniband: false,
                })
                .collect(),
            peers: vec![],
        }
    }

    #[test]
    fn interfaces_are_named_after_their_rails_and_never_twice() {
        let names: Vec<_> = rails(&[claim("a", &[3, 1]), claim("b", &[1])])
            .into_iter()
            .map(|r| r.ifname)
            .collect();
        assert_eq!(names, ["rail3", "rail1", "rail1-2"]);
    }
}
