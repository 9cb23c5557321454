//! Device health for the kubelet (`v1.DRAResourceHealth`): a rail device
//! is healthy while its NIC — the master, a VF's PF — has carrier in the
//! agent's netns (the node's). The kubelet shows each device's health in
//! the status of the containers that name its claim in `resources.claims`
//! (`allocatedResourcesStatus`), so a rail whose link went down is seen in
//! `kubectl get pod -o yaml` instead of only as a slow or hung collective.
//!
//! Who may call: as the DRA service it is served beside (root, the
//! kubelet, or the agent's user). It reads nothing of the caller's.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tonic::{Request, Response, Status};

use super::{
    Dra,
    devices::{Inventory, RailDevice},
    pb::health::{
        DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesRequest,
        NodeWatchResourcesResponse, dra_resource_health_server::DraResourceHealth,
    },
};

/// The service name the kubelet matches in the plugin's registration.
pub const HEALTH_SERVICE: &str = "v1.DRAResourceHealth";

/// How often every device's health is sent: a change reaches the pods
/// within this, and each report renews the kubelet's [`TIMEOUT`].
const EVERY: Duration = Duration::from_secs(5);

/// After this long without a report (six missed) the kubelet says
/// Unknown: the agent is gone or stuck, and nobody knows the link.
const TIMEOUT: i64 = 30;

/// One device's health, with why.
fn health_of(device: &RailDevice, carriers: &HashMap<String, bool>) -> (HealthStatus, String) {
    let (nic, rail) = (&device.master, device.rail);
    match carriers.get(nic) {
        Some(true) => (HealthStatus::Healthy, format!("{nic} has carrier")),
        Some(false) => (
            HealthStatus::Unhealthy,
            format!(
                "{nic} has no carrier (down, or its link lost): pods holding this device cannot reach rail {rail}; \
                 `ip link show {nic}` on the node, then its cable and switch port"
            ),
        ),
        None => (
            HealthStatus::Unhealthy,
            format!(
                "{nic} is not a link of this node any more (renamed or removed): pods holding this device \
                 have no rail {rail}"
            ),
        ),
    }
}

/// The report of every device of `inventory`, determined at `now` (Unix
/// seconds) from `carriers` ([`crate::rtnl::carriers`]).
pub fn report(
    inventory: &Inventory,
    carriers: &HashMap<String, bool>,
    now: i64,
) -> NodeWatchResourcesResponse {
    let devices = inventory
        .devices
        .iter()
        .map(|d| {
            let (health, message) = health_of(d, carriers);
            DeviceHealth {
                device: Some(DeviceIdentifier {
                    pool_name: d.pool.clone(),
                    device_name: d.name.clone(),
                }),
                health: health.into(),
                last_updated_time: now,
                health_check_timeout_seconds: TIMEOUT,
                message,
            }
        })
        .collect();
    NodeWatchResourcesResponse { devices }
}

/// The health service, over the devices the agent last published.
pub struct Health {
    /// The driver's shared state (its inventory).
    pub dra: Arc<Dra>,
}

type Reports = Pin<Box<dyn Stream<Item = Result<NodeWatchResourcesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DraResourceHealth for Health {
    type NodeWatchResourcesStream = Reports;

    /// Every [`EVERY`], the health of every device published now; the
    /// stream ends when the kubelet hangs up (tonic drops it).
    async fn node_watch_resources(
        &self,
        _: Request<NodeWatchResourcesRequest>,
    ) -> Result<Response<Reports>, Status> {
        use futures::StreamExt;
        let dra = self.dra.clone();
        let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(EVERY));
        let reports = ticks.then(move |_| {
            let dra = dra.clone();
            async move {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                // getifaddrs is a netlink dump: off the runtime's threads.
                let carriers = tokio::task::spawn_blocking(crate::rtnl::carriers)
                    .await
                    .map_err(|e| Status::internal(format!("reading the NICs' carrier: {e}")))?;
                Ok(report(&dra.inventory(), &carriers, now))
            }
        });
        Ok(Response::new(Box::pin(reports)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dra::nic::NicFacts;

    fn device(name: &str, master: &str, rail: u32) -> RailDevice {
        RailDevice {
            pool: "node0/ai".into(),
            name: name.into(),
            namespace: "ai".into(),
            network: name.into(),
            rail,
            kind: "macvlan".into(),
            master: master.into(),
            vf: None,
            facts: NicFacts::default(),
            conf: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_device_is_as_healthy_as_its_nic_s_carrier() {
        let inventory = Inventory {
            devices: vec![
                device("rail1", "eth1", 1),
                device("rail2", "eth2", 2),
                device("rail3", "eth3", 3),
            ],
            left_out: vec![],
        };
        let carriers = HashMap::from([("eth1".to_owned(), true), ("eth2".to_owned(), false)]);
        let r = report(&inventory, &carriers, 1_700_000_000);
        let got: Vec<(&str, &str, HealthStatus, i64, i64)> = r
            .devices
            .iter()
            .map(|d| {
                let id = d.device.as_ref().unwrap();
                (
                    id.pool_name.as_str(),
                    id.device_name.as_str(),
                    d.health(),
                    d.last_updated_time,
                    d.health_check_timeout_seconds,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "node0/ai",
                    "rail1",
                    HealthStatus::Healthy,
                    1_700_000_000,
                    TIMEOUT
                ),
                (
                    "node0/ai",
                    "rail2",
                    HealthStatus::Unhealthy,
                    1_700_000_000,
                    TIMEOUT
                ),
                (
                    "node0/ai",
                    "rail3",
                    HealthStatus::Unhealthy,
                    1_700_000_000,
                    TIMEOUT
                ),
            ]
        );
        assert!(r.devices[1].message.contains("eth2 has no carrier"));
        assert!(r.devices[1].message.contains("rail 2"));
        assert!(
            r.devices[2]
                .message
                .contains("eth3 is not a link of this node")
        );
        // The kubelet keeps 1024 characters.
        assert!(r.devices.iter().all(|d| d.message.len() <= 1024));
    }
}
