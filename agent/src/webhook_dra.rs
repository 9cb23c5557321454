//! Pods the webhook would inject that claim their rails through DRA: they
//! name railnet's DRA network (`--dra-network`, the chart's
//! `<networks namespace>/railnet-dra`) in their networks annotation, and
//! their ResourceClaims say which rails they get. Replacing that
//! annotation with the group's networks would take the DRA network away
//! and give the pod every rail a second time, so such a pod keeps its
//! networks and gets no device-plugin limits; it still gets its rail info
//! at `/etc/railnet` (where `nccl.env` names the NCCL topology file that
//! pairs its GPUs with their rails). The admission warning says so.

use serde_json::Value;

use crate::webhook::{INJECT, Injection, NETWORKS, RailInfoSource};

/// Whether `pod` (in namespace `ns`) names `network` (`namespace/name`)
/// in its networks annotation, in either of Multus's forms: a comma list
/// of `[namespace/]name[@interface]`, or a JSON list of selections.
pub fn names_network(pod: &Value, ns: &str, network: &str) -> bool {
    let Some(text) = pod["metadata"]["annotations"]
        .get(NETWORKS)
        .and_then(Value::as_str)
    else {
        return false;
    };
    let Some((want_ns, want_name)) = network.split_once('/') else {
        return false;
    };
    let is_it =
        |sel_ns: Option<&str>, name: &str| sel_ns.unwrap_or(ns) == want_ns && name == want_name;
    let text = text.trim();
    if text.starts_with('[') {
        // A list Multus could not parse fails the pod there; here it is
        // simply not the DRA network.
        let Ok(Value::Array(selections)) = serde_json::from_str::<Value>(text) else {
            return false;
        };
        return selections.iter().any(|s| {
            s["name"]
                .as_str()
                .is_some_and(|name| is_it(s["namespace"].as_str(), name))
        });
    }
    text.split(',').any(|entry| {
        let entry = entry.trim();
        let entry = entry.split_once('@').map_or(entry, |(n, _)| n);
        match entry.split_once('/') {
            Some((sel_ns, name)) => is_it(Some(sel_ns), name),
            None => is_it(None, entry),
        }
    })
}

/// What the webhook does to `pod`, which asks for `group` and names the
/// DRA network: its rail info mounted in the container the pod names
/// (else the first) — nothing else. Err: the pod must be refused.
pub fn inject(
    pod: &Value,
    group: &str,
    network: &str,
    rail_info: Option<&RailInfoSource>,
) -> Result<Injection, String> {
    let mut out = Injection::default();
    out.warnings.push(format!(
        "{INJECT} ({group}) was not applied: the pod names railnet's DRA network {network}, so its rails \
         are the ones its ResourceClaims were allocated, not the group's networks"
    ));
    let (index, c) = crate::webhook::target_container(pod)?;
    crate::webhook::rail_info_patch(pod, c, index, rail_info, &mut out.patch);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::webhook::CONTAINER;

    const DRA: &str = "railnet/railnet-dra";

    fn pod(networks: &str) -> Value {
        json!({"metadata": {"annotations": {NETWORKS: networks}},
               "spec": {"containers": [{"name": "a"}, {"name": "b"}]}})
    }

    #[test]
    fn the_dra_network_is_found_in_every_form_multus_takes() {
        for named in [
            "railnet/railnet-dra",
            " other, railnet/railnet-dra@dra ",
            r#"[{"name": "railnet-dra", "namespace": "railnet"}]"#,
        ] {
            assert!(names_network(&pod(named), "ai", DRA), "{named}");
        }
        // Without a namespace a name is the pod's own namespace's.
        assert!(names_network(&pod("railnet-dra"), "railnet", DRA));
        for not in [
            "railnet-dra",
            "ai/railnet-dra",
            "railnet/rail1",
            r#"[{"name": "railnet-dra"}]"#,
            "[not json",
        ] {
            assert!(!names_network(&pod(not), "ai", DRA), "{not}");
        }
        assert!(!names_network(&json!({"metadata": {}}), "ai", DRA));
    }

    #[test]
    fn a_dra_pod_keeps_its_networks_and_gets_its_rail_info() {
        let mut p = pod(DRA);
        p["metadata"]["annotations"][CONTAINER] = json!("b");
        let inj = inject(
            &p,
            "gpu",
            DRA,
            Some(&RailInfoSource::NodeDir("/run/railnet/pods".into())),
        )
        .unwrap();
        let paths: Vec<&str> = inj
            .patch
            .iter()
            .filter_map(|op| op["path"].as_str())
            .collect();
        assert!(
            !paths
                .iter()
                .any(|p| p.contains("annotations") || p.contains("resources")),
            "{paths:?}"
        );
        assert!(
            paths
                .iter()
                .any(|p| p.starts_with("/spec/containers/1/volumeMounts")),
            "{paths:?}"
        );
        assert!(
            inj.warnings[0].contains("DRA network"),
            "{:?}",
            inj.warnings
        );
        assert!(inject(&p, "gpu", DRA, None).unwrap().patch.is_empty());
        p["metadata"]["annotations"][CONTAINER] = json!("c");
        assert!(inject(&p, "gpu", DRA, None).is_err());
    }
}
