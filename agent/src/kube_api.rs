//! Clients of the Kubernetes API server for the agent, the controller and
//! the webhook: from a kubeconfig or the pod's service account, every
//! request bounded (watches aside), and the dynamic resources railnet
//! reads and writes.

use std::{path::Path, time::Duration};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// A client could not be made: what was wrong, and what to do.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

/// The API resource `plural` of `group`/`version` (`kind`), for dynamic
/// objects (RailNetworks, NADs, RailPools, Namespaces).
pub fn resource(group: &str, version: &str, kind: &str, plural: &str) -> kube::core::ApiResource {
    kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk(group, version, kind),
        plural,
    )
}

/// A client from `kubeconfig` (else inferred: KUBECONFIG, ~/.kube/config,
/// the in-cluster service account) with every request bounded by
/// `timeout`. Call inside a runtime.
pub async fn client(kubeconfig: Option<&Path>, timeout: Duration) -> Result<Client, ClientError> {
    client_waiting(kubeconfig, timeout, timeout).await
}

/// As [`client`], but an answer may take `answer` once a request is sent
/// (connecting and sending stay bounded by `timeout`): for requests a
/// busy kube-apiserver queues (API Priority and Fairness holds a request
/// up to a quarter of its 60 s request timeout before refusing it with
/// 429, which the client retries as the server says).
pub async fn client_waiting(
    kubeconfig: Option<&Path>,
    timeout: Duration,
    answer: Duration,
) -> Result<Client, ClientError> {
    let mut config = config(kubeconfig).await?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(answer);
    config.write_timeout = Some(timeout);
    Client::try_from(config).map_err(|e| ClientError(format!("client: {e}")))
}

/// A client for watches: like [`client`], but without a read timeout (a
/// watch waits minutes between events).
pub async fn watch_client(
    kubeconfig: Option<&Path>,
    timeout: Duration,
) -> Result<Client, ClientError> {
    let mut config = config(kubeconfig).await?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = None;
    Client::try_from(config).map_err(|e| ClientError(format!("client: {e}")))
}

/// The client configuration: `kubeconfig`, else inferred.
async fn config(kubeconfig: Option<&Path>) -> Result<Config, ClientError> {
    match kubeconfig {
        Some(path) => from_file(path).await,
        None => Config::infer().await.map_err(|e| {
            ClientError(format!(
                "no Kubernetes configuration found ({e}); run in a pod with a service account, or pass --kubeconfig"
            ))
        }),
    }
}

async fn from_file(path: &Path) -> Result<Config, ClientError> {
    let kc = Kubeconfig::read_from(path)
        .map_err(|e| ClientError(format!("kubeconfig {}: {e}", path.display())))?;
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| ClientError(format!("kubeconfig {}: {e}", path.display())))
}
