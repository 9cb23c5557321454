//! The kubelet plugin: the registration socket the kubelet's plugin
//! watcher finds (`<registry dir>/railnet.io-reg.sock`), and the DRA
//! service it then dials (`<plugin dir>/dra.sock`), with the device health
//! service beside it.
//!
//! Who may call: root (the kubelet) or the agent's own user — checked on
//! each connection's peer credentials, as on the CNI socket; both sockets
//! are 0600 as well. A request names claims only; what is prepared is
//! what the API server says the claim was allocated, and only devices of
//! this node whose RailNetwork the claim's namespace may use.

use std::{path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::resource::v1::ResourceClaim;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    DRIVER, Dra, cdi,
    pb::{dra, registration},
    prepared::{Placement, PreparedClaim, PreparedDevice},
};

/// The service name the kubelet matches (`v1.DRAPlugin`).
pub const DRA_SERVICE: &str = "v1.DRAPlugin";

/// How long the API server may take over one claim.
const CLAIM_READ: Duration = Duration::from_secs(10);

/// Where the sockets go.
#[derive(Clone, Debug)]
pub struct Sockets {
    /// The DRA service's socket (`/var/lib/kubelet/plugins/railnet.io/dra.sock`).
    pub plugin: PathBuf,
    /// The registration socket (`/var/lib/kubelet/plugins_registry/railnet.io-reg.sock`).
    pub registration: PathBuf,
}

/// Serves both sockets until `shutdown` resolves; the registration socket
/// goes first on the way out, so the kubelet stops calling.
pub async fn serve(
    dra: Arc<Dra>,
    sockets: Sockets,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let plugin = crate::server::bind(&sockets.plugin)?;
    // The registration service itself listens beside the DRA socket; the
    // kubelet reaches it through the forwarder on the registration socket
    // (see `authority`).
    let inner = sockets.plugin.with_file_name("registration.sock");
    let reg = crate::server::bind(&inner)?;
    let forwarder = tokio::spawn(super::authority::forward(
        crate::server::bind(&sockets.registration)?,
        inner.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let health = super::pb::health::dra_resource_health_server::DraResourceHealthServer::new(
        super::health::Health { dra: dra.clone() },
    );
    let dra_server = tonic::transport::Server::builder()
        .add_service(dra::dra_plugin_server::DraPluginServer::new(Plugin { dra }))
        .add_service(health)
        .serve_with_incoming_shutdown(root_only(plugin), wait(stop_rx.clone()));
    let registrar = tonic::transport::Server::builder()
        .add_service(registration::registration_server::RegistrationServer::new(
            Registrar {
                endpoint: sockets.plugin.to_string_lossy().into_owned(),
            },
        ))
        .serve_with_incoming_shutdown(root_only(reg), wait(stop_rx));
    info!(plugin = %sockets.plugin.display(), registration = %sockets.registration.display(), "DRA driver {DRIVER} serving");
    let stopper = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let (a, b, ()) = tokio::join!(dra_server, registrar, stopper);
    forwarder.abort();
    for path in [&sockets.registration, &inner, &sockets.plugin] {
        let _ = std::fs::remove_file(path);
    }
    a.and(b).map_err(std::io::Error::other)
}

/// The connections of root or the agent's user; others are dropped.
fn root_only(
    listener: tokio::net::UnixListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(|conn| async move {
        match conn {
            Ok(stream) => match stream.peer_cred() {
                Ok(c) if crate::server::may_call(c.uid()) => {
                    Some(Ok(stream))
                }
                Ok(c) => {
                    warn!(uid = c.uid(), "refused a connection to the DRA plugin: only root (the kubelet) may call");
                    None
                }
                Err(e) => {
                    warn!(error = %e, "refused a connection to the DRA plugin: no peer credentials");
                    None
                }
            },
            Err(e) => Some(Err(e)),
        }
    })
}

struct Registrar {
    endpoint: String,
}

#[tonic::async_trait]
impl registration::registration_server::Registration for Registrar {
    async fn get_info(
        &self,
        _: Request<registration::InfoRequest>,
    ) -> Result<Response<registration::PluginInfo>, Status> {
        Ok(Response::new(registration::PluginInfo {
            r#type: "DRAPlugin".into(),
            name: DRIVER.into(),
            endpoint: self.endpoint.clone(),
            // The health service is optional: listing it is how the
            // kubelet learns to open its stream.
            supported_versions: vec![DRA_SERVICE.into(), super::health::HEALTH_SERVICE.into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<registration::RegistrationStatus>,
    ) -> Result<Response<registration::RegistrationStatusResponse>, Status> {
        let status = req.into_inner();
        if status.plugin_registered {
            info!("the kubelet registered DRA driver {DRIVER}");
        } else {
            warn!(error = %status.error, "the kubelet refused to register DRA driver {DRIVER}");
        }
        Ok(Response::new(registration::RegistrationStatusResponse {}))
    }
}

struct Plugin {
    dra: Arc<Dra>,
}

#[tonic::async_trait]
impl dra::dra_plugin_server::DraPlugin for Plugin {
    async fn node_prepare_resources(
        &self,
        req: Request<dra::NodePrepareResourcesRequest>,
    ) -> Result<Response<dra::NodePrepareResourcesResponse>, Status> {
        let mut claims = std::collections::HashMap::new();
        for claim in req.into_inner().claims {
            let answer = match prepare(&self.dra, &claim).await {
                Ok(devices) => dra::NodePrepareResourceResponse {
                    devices,
                    error: String::new(),
                },
                Err(why) => {
                    warn!(claim = %format!("{}/{}", claim.namespace, claim.name), error = %why, "claim not prepared");
                    dra::NodePrepareResourceResponse {
                        devices: vec![],
                        error: why,
                    }
                }
            };
            claims.insert(claim.uid, answer);
        }
        Ok(Response::new(dra::NodePrepareResourcesResponse { claims }))
    }

    async fn node_unprepare_resources(
        &self,
        req: Request<dra::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<dra::NodeUnprepareResourcesResponse>, Status> {
        let mut claims = std::collections::HashMap::new();
        for claim in req.into_inner().claims {
            let forgotten = cdi::remove(&self.dra.cdi_dir, &claim.uid)
                .and_then(|()| self.dra.store.forget_claim(&claim.uid));
            let error = match forgotten {
                Ok(()) => {
                    info!(claim = %format!("{}/{}", claim.namespace, claim.name), "claim unprepared");
                    String::new()
                }
                Err(e) => format!("forgetting claim {}: {e}", claim.uid),
            };
            claims.insert(claim.uid, dra::NodeUnprepareResourceResponse { error });
        }
        Ok(Response::new(dra::NodeUnprepareResourcesResponse {
            claims,
        }))
    }
}

/// Prepares one claim: reads its allocation, checks and records its
/// railnet devices. Idempotent (the kubelet retries).
async fn prepare(dra: &Dra, claim: &dra::Claim) -> Result<Vec<dra::Device>, String> {
    let name = format!("{}/{}", claim.namespace, claim.name);
    let api: kube::Api<ResourceClaim> = kube::Api::namespaced(dra.client.clone(), &claim.namespace);
    let live = tokio::time::timeout(CLAIM_READ, api.get(&claim.name))
        .await
        .map_err(|_| {
            format!("reading claim {name}: no answer from the API server in {CLAIM_READ:?}")
        })?
        .map_err(|e| format!("reading claim {name}: {e}"))?;
    if live.metadata.uid.as_deref() != Some(claim.uid.as_str()) {
        return Err(format!(
            "claim {name} is not the one the kubelet asked for (UID {}); it was replaced",
            claim.uid
        ));
    }
    let mut prepared = plan(dra, &live)?;
    prepared.peers = super::peers::of(&dra.client, &live).await;
    // The RDMA character devices of the claim's VFs, for the runtime.
    let nodes: Vec<(String, Vec<cdi::DeviceNode>)> = prepared
        .devices
        .iter()
        .map(|d| {
            let vf = d.conf["deviceID"].as_str().unwrap_or_default();
            let nodes = if vf.is_empty() {
                Vec::new()
            } else {
                cdi::rdma_nodes(&dra.sysfs_root, vf)
            };
            (d.device.clone(), nodes)
        })
        .collect();
    cdi::write(&dra.cdi_dir, &prepared.uid, &nodes).map_err(|e| {
        format!(
            "writing the CDI spec of claim {name} in {}: {e}",
            dra.cdi_dir.display()
        )
    })?;
    dra.store
        .save_claim(&prepared)
        .map_err(|e| format!("recording claim {name}: {e}"))?;
    info!(claim = %name, devices = ?prepared.devices.iter().map(|d| format!("{}/{}", d.pool, d.device)).collect::<Vec<_>>(), "claim prepared");
    Ok(prepared
        .devices
        .iter()
        .zip(&nodes)
        .map(|(d, (_, nodes))| dra::Device {
            request_names: vec![d.request.clone()],
            pool_name: d.pool.clone(),
            device_name: d.device.clone(),
            cdi_device_ids: if nodes.is_empty() {
                vec![]
            } else {
                vec![cdi::device_id(&prepared.uid, &d.device)]
            },
            share_id: d.share_id.clone(),
        })
        .collect())
}

/// What a claim's allocation gives this node: its railnet devices, each
/// checked to be published here and usable from the claim's namespace.
pub fn plan(dra: &Dra, live: &ResourceClaim) -> Result<PreparedClaim, String> {
    let ns = live.metadata.namespace.clone().unwrap_or_default();
    let name = format!("{ns}/{}", live.metadata.name.clone().unwrap_or_default());
    let status = live.status.as_ref();
    let results = status
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .ok_or_else(|| format!("claim {name} is not allocated"))?;
    let inv = dra.inventory();
    let mut devices = Vec::new();
    for r in results.iter().filter(|r| r.driver == DRIVER) {
        let d = inv.get(&r.pool, &r.device).ok_or_else(|| {
            format!(
                "claim {name} was allocated {}/{}, which this node ({}) does not publish (any more): \
                 was its RailNetwork deleted or its NIC removed?",
                r.pool, r.device, dra.node
            )
        })?;
        if !dra.may_use(&ns, &d.namespace) {
            return Err(format!(
                "claim {name} may not use {}/{}: it belongs to RailNetwork {}/{}, and a claim may use its own \
                 namespace's rail networks and {}'s only",
                r.pool, r.device, d.namespace, d.network, dra.shared_namespace
            ));
        }
        devices.push(PreparedDevice {
            request: r.request.clone(),
            pool: r.pool.clone(),
            device: r.device.clone(),
            share_id: r.share_id.clone(),
            rail: d.rail,
            conf: d.conf.clone(),
            placement: Placement {
                pci_bus_id: d.facts.pci_address.clone(),
                pcie_root: d.facts.pcie_root.clone(),
                numa_node: d.facts.numa_node,
            },
            infiniband: d.facts.link_layer == "infiniband",
        });
    }
    let pods = status
        .and_then(|s| s.reserved_for.as_ref())
        .map(|r| r.iter().map(|c| c.uid.clone()).collect())
        .unwrap_or_default();
    Ok(PreparedClaim {
        uid: live.metadata.uid.clone().unwrap_or_default(),
        namespace: ns,
        name: live.metadata.name.clone().unwrap_or_default(),
        pods,
        devices,
        peers: Vec::new(),
    })
}
