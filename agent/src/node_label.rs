//! The node's `railnet.io/rdma-netns-mode` label: pods whose networks move
//! RDMA devices into them (`rdmaIsolation`) need a node in exclusive mode,
//! and the webhook schedules them by this label. Each agent labels its own
//! node, in either IPAM mode; the chart lets it patch Nodes and a
//! ValidatingAdmissionPolicy narrows that to its own node's one label.

use std::{path::PathBuf, time::Duration};

use kube::{Api, Client};

/// Node label saying the node's RDMA netns mode (`exclusive`, `shared`, or
/// `none` when the kernel has no RDMA subsystem): pods whose networks move
/// RDMA devices (`rdmaIsolation`) are scheduled by it.
pub const RDMA_MODE_LABEL: &str = "railnet.io/rdma-netns-mode";

/// Labels Node `node` with its RDMA netns mode (a merge patch of that one
/// label).
pub async fn label_node(client: &Client, node: &str, mode: &str) -> Result<(), kube::Error> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({
                "metadata": {"labels": {RDMA_MODE_LABEL: mode}}
            })),
        )
        .await
        .map(|_| ())
}

/// Labels `node` with `mode`, trying again with back-off (1 s doubling to
/// a minute) until the API server takes it: the agent serves pods either
/// way, only the scheduling of exclusive-mode pods waits for the label.
pub async fn keep_trying(kubeconfig: Option<PathBuf>, node: String, mode: String) {
    let mut wait = Duration::from_secs(1);
    let mut said = false;
    loop {
        let done =
            match crate::kube_api::client(kubeconfig.as_deref(), Duration::from_secs(10)).await {
                Ok(client) => label_node(&client, &node, &mode)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
        match done {
            Ok(()) => {
                tracing::info!(node = %node, label = RDMA_MODE_LABEL, %mode, "node labelled");
                return;
            }
            Err(e) if !said => {
                tracing::warn!(node = %node, error = %e, "cannot label the node with its RDMA netns mode yet (exclusive-mode pods are not scheduled here until it is); trying again");
                said = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// kube-rs over a mock service: the request is one merge patch of the
    /// one label, on the node named (the cluster test sees it on real Nodes).
    #[tokio::test]
    async fn the_node_label_is_one_merge_patch() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |req: hyper::Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = http_body_util::BodyExt::collect(body)
                    .await
                    .unwrap()
                    .to_bytes();
                log.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.path().to_owned(),
                    parts.headers["content-type"].to_str().unwrap().to_owned(),
                    String::from_utf8(body.to_vec()).unwrap(),
                ));
                let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-7"}});
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .header("Content-Type", "application/json")
                        .body(kube::client::Body::from(node.to_string().into_bytes()))
                        .unwrap(),
                )
            }
        });
        label_node(&Client::new(service, "default"), "gpu-7", "exclusive")
            .await
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (method, path, kind, body) = &seen[0];
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("PATCH", "/api/v1/nodes/gpu-7")
        );
        assert_eq!(kind, "application/merge-patch+json");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            serde_json::json!({"metadata": {"labels": {"railnet.io/rdma-netns-mode": "exclusive"}}})
        );
    }
}
