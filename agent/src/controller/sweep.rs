//! The sweeps of what pods and nodes left behind: RailBlock claims of pods
//! that no longer exist, and blocks of nodes that are gone. Each acts only
//! on a complete list, and only on what stayed missing across passes.

use std::time::Duration;

use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

/// The UIDs of every pod in the cluster (metadata only). An error is an
/// error: the sweep must never run on a partial or failed list.
pub async fn pod_uids(client: &Client) -> Result<std::collections::HashSet<String>, kube::Error> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());
    all_of(&pods, |m| m.uid).await
}

/// The names of every Node (metadata only); an error as for [`pod_uids`].
pub async fn node_names(client: &Client) -> Result<std::collections::HashSet<String>, kube::Error> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    all_of(&nodes, |m| m.name).await
}

/// `pick` of every object `api` lists, page by page (metadata only).
async fn all_of<K>(
    api: &Api<K>,
    pick: impl Fn(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<String>,
) -> Result<std::collections::HashSet<String>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = std::collections::HashSet::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api.list_metadata(&lp).await?;
        out.extend(page.items.into_iter().filter_map(|p| pick(p.metadata)));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => return Ok(out),
        }
    }
}

/// How long each thing (a claim's pod, a block's node) has been missing
/// from the lists, pass after pass: what is seen again starts over.
#[derive(Debug)]
struct Missing<K> {
    grace: Duration,
    since: std::collections::HashMap<K, std::time::Instant>,
    seen: std::collections::HashSet<K>,
}

impl<K: Eq + std::hash::Hash + Clone> Missing<K> {
    fn new(grace: Duration) -> Self {
        Self {
            grace,
            since: Default::default(),
            seen: Default::default(),
        }
    }

    /// Starts a pass.
    fn start(&mut self) {
        self.seen.clear();
    }

    /// Notes `key` missing at `now`; whether it has been for the grace.
    fn for_grace(&mut self, key: K, now: std::time::Instant) -> bool {
        self.seen.insert(key.clone());
        let since = *self.since.entry(key).or_insert(now);
        now.duration_since(since) >= self.grace
    }

    /// Ends a pass: what it did not find missing is forgotten.
    fn end(&mut self) {
        let seen = &self.seen;
        self.since.retain(|k, _| seen.contains(k));
    }
}

/// Gives back the blocks of nodes that are gone: a node deleted (replaced,
/// scaled in) never releases what it held. After its name has been
/// missing from every Node list for `grace`, its blocks' held addresses
/// are released (any node may then take their free addresses) and a
/// block with no claim left is deleted — the claims themselves go with
/// their pods ([`ClaimSweeper`]). Every write has the block's
/// resourceVersion as a precondition.
#[derive(Debug)]
pub struct BlockSweeper {
    missing: Missing<String>,
}

impl BlockSweeper {
    /// A sweeper with `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            missing: Missing::new(grace),
        }
    }

    /// One pass against the nodes that exist now; returns the blocks
    /// given back (held addresses released, or deleted).
    pub async fn pass(
        &mut self,
        client: &Client,
        live: &std::collections::HashSet<String>,
    ) -> Result<usize, kube::Error> {
        use crate::ipam::cluster::{RailBlock, if_unchanged};
        let blocks: Api<RailBlock> = Api::all(client.clone());
        let now = std::time::Instant::now();
        self.missing.start();
        let mut given = 0;
        for block in blocks.list(&ListParams::default()).await?.items {
            let node = &block.spec.node;
            if live.contains(node) {
                continue;
            }
            if !self.missing.for_grace(node.clone(), now)
                || (block.spec.held.is_empty() && !block.spec.claims.is_empty())
            {
                continue;
            }
            let name = block.metadata.name.clone().unwrap_or_default();
            let result = if block.spec.claims.is_empty() {
                blocks
                    .delete(&name, &if_unchanged(&block.metadata))
                    .await
                    .map(|_| ())
            } else {
                let mut next = block.clone();
                next.spec.held.clear();
                next.spec.lend_requested = false;
                blocks
                    .replace(&name, &PostParams::default(), &next)
                    .await
                    .map(|_| ())
            };
            match result {
                Ok(()) => {
                    tracing::info!(block = %name, node = %node, claims = block.spec.claims.len(),
                        "gave back the block of a node that is gone");
                    given += 1;
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        self.missing.end();
        Ok(given)
    }
}

/// Releases claims whose pod is gone: cluster-scoped claims cannot be
/// owned by pods (owner references may not cross scopes), so nothing else
/// frees the address of a pod deleted while its node was down. A claim is
/// released only after its pod UID has been missing from every list for
/// `grace` (a pod created a moment ago may not be listed yet); claims
/// without a pod UID are left to their node.
#[derive(Debug)]
pub struct ClaimSweeper {
    missing: Missing<(String, String)>,
}

impl ClaimSweeper {
    /// A sweeper with `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            missing: Missing::new(grace),
        }
    }

    /// One pass against the pods alive now; returns the claims released.
    pub async fn pass(
        &mut self,
        client: &Client,
        live: &std::collections::HashSet<String>,
    ) -> Result<usize, kube::Error> {
        use crate::ipam::cluster::RailBlock;
        let blocks: Api<RailBlock> = Api::all(client.clone());
        let now = std::time::Instant::now();
        self.missing.start();
        let mut released = 0;
        for block in blocks.list(&ListParams::default()).await?.items {
            let name = block.metadata.name.clone().unwrap_or_default();
            let mut doomed = Vec::new();
            for (address, claim) in &block.spec.claims {
                if claim.pod_uid.is_empty() || live.contains(&claim.pod_uid) {
                    continue;
                }
                let key = (name.clone(), format!("{address}/{}", claim.pod_uid));
                if self.missing.for_grace(key, now) {
                    doomed.push(address.clone());
                }
            }
            if doomed.is_empty() {
                continue;
            }
            let mut next = block.clone();
            for a in &doomed {
                next.spec.claims.remove(a);
            }
            // With the block's resourceVersion: a node that wrote since
            // wins, and we look again next pass.
            match blocks.replace(&name, &PostParams::default(), &next).await {
                Ok(_) => {
                    for a in &doomed {
                        let c = &block.spec.claims[a];
                        tracing::info!(block = %name, address = %a, pod = %format!("{}/{}", c.pod_namespace, c.pod_name),
                            pod_uid = %c.pod_uid, node = %c.node, "released the claim of a pod that is gone");
                    }
                    released += doomed.len();
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        // Forget claims that were released or whose pod came back.
        self.missing.end();
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// kube-rs over a mock service (no pods API exists in the test API
    /// server): every page of the pod list is read, and a failed list is
    /// an error, never an empty set.
    #[tokio::test]
    async fn pod_uids_reads_every_page_and_fails_loudly() {
        let service = tower::service_fn(|req: hyper::Request<kube::client::Body>| async move {
            let q = req.uri().query().unwrap_or_default().to_owned();
            let body = if req.uri().path() != "/api/v1/pods" {
                return Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .status(404)
                        .body(kube::client::Body::empty())
                        .unwrap(),
                );
            } else if q.contains("continue=page2") {
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                       "items": [{"metadata": {"name": "c", "uid": "uid-c"}}]})
            } else {
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"continue": "page2"},
                       "items": [{"metadata": {"name": "a", "uid": "uid-a"}},
                                 {"metadata": {"name": "b", "uid": "uid-b"}}]})
            };
            Ok(hyper::Response::builder()
                .header("Content-Type", "application/json")
                .body(kube::client::Body::from(body.to_string().into_bytes()))
                .unwrap())
        });
        let client = Client::new(service, "default");
        let uids = pod_uids(&client).await.unwrap();
        assert_eq!(uids.len(), 3);
        assert!(uids.contains("uid-c"));
        let failing = tower::service_fn(|_req: hyper::Request<kube::client::Body>| async move {
            Ok::<_, std::convert::Infallible>(
                hyper::Response::builder()
                    .status(503)
                    .body(kube::client::Body::from(b"{}".to_vec()))
                    .unwrap(),
            )
        });
        assert!(pod_uids(&Client::new(failing, "default")).await.is_err());
    }
}
