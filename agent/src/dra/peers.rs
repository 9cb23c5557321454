//! The other drivers' devices of a claim (the GPUs a claim aligned its
//! rails with), placed as their own ResourceSlices say: the standard
//! attributes `resource.kubernetes.io/pciBusID`, `pcieRoot`, `numaNode`.
//! Read once, at prepare, and recorded with the claim.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    DeviceAttribute, DeviceRequestAllocationResult, ResourceClaim, ResourceSlice,
};
use kube::api::ListParams;
use tracing::warn;

use super::{
    DRIVER,
    prepared::{PeerDevice, Placement},
};

/// The standard attributes' names (Kubernetes' `deviceattribute` package).
const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
const NUMA_NODE: &str = "resource.kubernetes.io/numaNode";

/// The claim's devices of drivers other than railnet, each with its
/// placement where its driver's slices give one. A slice that cannot be
/// read leaves its devices unplaced (logged): the rails work all the
/// same, NCCL just pairs them by its own detection.
pub async fn of(client: &kube::Client, claim: &ResourceClaim) -> Vec<PeerDevice> {
    let results: Vec<&DeviceRequestAllocationResult> = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .into_iter()
        .flatten()
        .filter(|r| r.driver != DRIVER)
        .collect();
    let mut by_driver: BTreeMap<&str, Vec<&DeviceRequestAllocationResult>> = BTreeMap::new();
    for r in results {
        by_driver.entry(r.driver.as_str()).or_default().push(r);
    }
    let api: kube::Api<ResourceSlice> = kube::Api::all(client.clone());
    let mut out = Vec::new();
    for (driver, results) in by_driver {
        let slices = match api
            .list(&ListParams::default().fields(&format!("spec.driver={driver}")))
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                warn!(driver, error = %e, "cannot read the driver's ResourceSlices: its devices stay unplaced for NCCL");
                Vec::new()
            }
        };
        for r in results {
            out.push(PeerDevice {
                driver: driver.to_owned(),
                request: r.request.clone(),
                pool: r.pool.clone(),
                device: r.device.clone(),
                placement: placement(&slices, &r.pool, &r.device).unwrap_or_default(),
            });
        }
    }
    out
}

/// Where `pool`/`device` sits, from the pool's newest slices.
fn placement(slices: &[ResourceSlice], pool: &str, device: &str) -> Option<Placement> {
    let newest = slices
        .iter()
        .filter(|s| s.spec.pool.name == pool)
        .map(|s| s.spec.pool.generation)
        .max()?;
    let attrs = slices
        .iter()
        .filter(|s| s.spec.pool.name == pool && s.spec.pool.generation == newest)
        .flat_map(|s| s.spec.devices.iter().flatten())
        .find(|d| d.name == device)?
        .attributes
        .as_ref()?;
    let text = |k: &str| {
        attrs
            .get(k)
            .and_then(|a: &DeviceAttribute| a.string.clone())
    };
    Some(Placement {
        pci_bus_id: text(PCI_BUS_ID),
        pcie_root: text(PCIE_ROOT),
        numa_node: attrs.get(NUMA_NODE).and_then(|a| a.int),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn slice(pool: &str, generation: i64, devices: serde_json::Value) -> ResourceSlice {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{pool}-{generation}")},
            "spec": {"driver": "gpu.example.com", "nodeName": "node0",
                     "pool": {"name": pool, "generation": generation, "resourceSliceCount": 1},
                     "devices": devices},
        }))
        .unwrap()
    }

    #[test]
    fn a_device_is_placed_by_its_pools_newest_slice() {
        let gpu = |bdf: &str| {
            json!([{"name": "gpu0", "attributes": {
                "resource.kubernetes.io/pciBusID": {"string": bdf},
                "resource.kubernetes.io/pcieRoot": {"string": "pci0000:3a"},
                "resource.kubernetes.io/numaNode": {"int": 1},
            }}])
        };
        let slices = [
            slice("node0", 1, gpu("0000:3b:00.0")),
            slice("node0", 2, gpu("0000:3d:00.0")),
            slice("node1", 9, gpu("0000:99:00.0")),
        ];
        assert_eq!(
            placement(&slices, "node0", "gpu0"),
            Some(Placement {
                pci_bus_id: Some("0000:3d:00.0".into()),
                pcie_root: Some("pci0000:3a".into()),
                numa_node: Some(1),
            })
        );
        assert_eq!(placement(&slices, "node0", "gpu7"), None);
        assert_eq!(placement(&slices, "node2", "gpu0"), None);
    }
}
