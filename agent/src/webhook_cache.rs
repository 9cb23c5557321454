//! What the webhook reads, kept by watches: every RailNetwork, and every
//! namespace's metadata (its inject annotation).
//!
//! Any pod can POST an AdmissionReview to the webhook's Service. Were each
//! review answered by reading the API server, a pod posting in a loop
//! would list RailNetworks cluster-wide under the controller's identity as
//! fast as it can; from the cache, a review costs no API request at all,
//! and a pod CREATE no namespace read.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{DynamicObject, PartialObjectMeta},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde_json::Value;

use crate::controller::railnetworks;

/// The watched RailNetworks and namespaces.
#[derive(Clone)]
pub struct Cache {
    networks: Store<DynamicObject>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    /// RailNetworks listed once.
    ready: Arc<AtomicBool>,
    /// Namespaces listed once.
    namespaces_ready: Arc<AtomicBool>,
    /// For a namespace read before the namespaces are listed.
    client: Client,
}

impl Cache {
    /// Starts the two watches on the current runtime (they run until the
    /// runtime ends, resuming after errors with back-off).
    pub fn start(client: &Client) -> Self {
        let nets = Writer::new(railnetworks());
        let networks = nets.as_reader();
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &railnetworks());
        tokio::spawn(drain(
            "RailNetworks",
            watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(nets),
        ));
        let (namespaces, ns_writer) = reflector::store();
        // Metadata only: the annotations are all the webhook reads.
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        tokio::spawn(drain(
            "namespaces",
            watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(ns_writer),
        ));
        let ready = Arc::new(AtomicBool::new(false));
        let namespaces_ready = Arc::new(AtomicBool::new(false));
        tokio::spawn(mark_ready("RailNetworks", networks.clone(), ready.clone()));
        tokio::spawn(mark_ready(
            "namespaces",
            namespaces.clone(),
            namespaces_ready.clone(),
        ));
        Self {
            networks,
            namespaces,
            ready,
            namespaces_ready,
            client: client.clone(),
        }
    }

    /// Whether the RailNetworks have been listed once: until then the
    /// webhook refuses (a pod admitted now would start without its rails).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Waits up to `within` for [`Cache::is_ready`].
    pub async fn wait_ready(&self, within: Duration) -> bool {
        // Polls the flag: a second `wait_until_ready` on the same store
        // (beside `mark_ready`'s) never resolved here (kube-runtime 5), and
        // the webhook then started 30 s late.
        let deadline = tokio::time::Instant::now() + within;
        while !self.is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// The RailNetworks of namespace `ns`, as JSON.
    pub fn networks_in(&self, ns: &str) -> Vec<Value> {
        let mut nets: Vec<Value> = self
            .networks
            .state()
            .iter()
            .filter(|n| n.metadata.namespace.as_deref() == Some(ns))
            .map(|n| serde_json::to_value(n.as_ref()).unwrap_or_default())
            .collect();
        // The store is a map: its order is not the API server's (by name).
        nets.sort_by(|a, b| {
            a["metadata"]["name"]
                .as_str()
                .cmp(&b["metadata"]["name"].as_str())
        });
        nets
    }

    /// Namespace `ns`'s value of annotation `key`, if it has one; `None`
    /// too when it cannot be read (the pod is then judged by its own
    /// annotation). From the watch once namespaces are listed; read from
    /// the API server until then, and for a namespace the watch has not
    /// brought yet (an API server that serves no namespaces, or a role
    /// without `list`, stays on reads).
    pub async fn namespace_annotation(&self, ns: &str, key: &str) -> Option<String> {
        if self.namespaces_ready.load(Ordering::Acquire)
            && let Some(n) = self.namespaces.get(&reflector::ObjectRef::new(ns))
        {
            return n.metadata.annotations.as_ref()?.get(key).cloned();
        }
        // Not listed yet, or a namespace made a moment ago that the watch
        // has not brought yet: read it.
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(self.client.clone());
        match api.get_metadata_opt(ns).await {
            Ok(n) => n?.metadata.annotations?.get(key).cloned(),
            Err(e) => {
                tracing::warn!(namespace = ns, error = %e, "cannot read the namespace's annotations");
                None
            }
        }
    }
}

/// Sets `flag` once `store` is filled.
async fn mark_ready<K>(what: &'static str, store: Store<K>, flag: Arc<AtomicBool>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    if store.wait_until_ready().await.is_ok() {
        flag.store(true, Ordering::Release);
        tracing::info!("the webhook watches {what}");
    }
}

/// Runs a reflector's stream, saying when its watch fails (it resumes).
async fn drain<S, T>(what: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        if let Err(e) = event {
            tracing::warn!(error = %e, "watching {what} for the webhook; resuming");
        }
    }
}
