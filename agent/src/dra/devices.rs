//! The node's rail devices: one per RailNetwork whose master NIC this node
//! has, with what a claim selects and aligns on, rendered into the
//! ResourceSlices the scheduler allocates from.
//!
//! A device is a *rail network on a NIC*, not the bare NIC: which pool,
//! MTU and routes an allocated device gets is its RailNetwork's, and whose
//! it is (the RailNetwork's namespace) is checked when it is prepared. The
//! devices of one namespace's RailNetworks form one pool, `<node>/<ns>`,
//! so claim status reads `node0/railnet` `rail1`.
//!
//! Shared kinds (macvlan, ipvlan, IPoIB child) allow multiple allocations
//! (consumable capacity, beta and on by default since Kubernetes 1.36):
//! any number of pods hang an interface off one master, so one device
//! serves them all and the scheduler still sees one NIC per PCIe root to
//! align with a GPU. Counted slots would put an arbitrary cap on pods per
//! NIC and 8 × N devices per node into every scheduling decision.
//!
//! VF kinds (sriov, ib-sriov) are one device per VF, allocated to one
//! claim at a time: a VF moves into its pod whole. A VF RailNetwork names
//! its PF in `master` and no `resourceName`; one with `resourceName` is
//! the SR-IOV device plugin's, and publishing its VFs here as well would
//! let the scheduler give one VF to two pods.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use kube::api::{DynamicObject, ObjectMeta};
use serde_json::Value;

use super::{DRIVER, nic::NicFacts};

/// The most devices one ResourceSlice may hold (`ResourceSliceMaxDevices`).
pub const MAX_DEVICES_PER_SLICE: usize = 128;

/// One allocatable rail device of this node.
#[derive(Clone, Debug, PartialEq)]
pub struct RailDevice {
    /// Its pool: `<node>/<RailNetwork namespace>`.
    pub pool: String,
    /// Its name in the pool (the RailNetwork's, as a DNS label).
    pub name: String,
    /// The RailNetwork's namespace.
    pub namespace: String,
    /// The RailNetwork's name.
    pub network: String,
    /// Rail number.
    pub rail: u32,
    /// The RailNetwork's type (`macvlan`, `ipvlan`, `ipoib`).
    pub kind: String,
    /// The master NIC (a VF's PF).
    pub master: String,
    /// The VF's number on its PF, for a VF device; `None` for a device
    /// many pods share (the master itself).
    pub vf: Option<u32>,
    /// What sysfs says of the device's PCI function (the master's, or the
    /// VF's).
    pub facts: NicFacts,
    /// The network config an allocated device is wired with (the
    /// RailNetwork rendered as its NAD would carry it).
    pub conf: Value,
}

/// What became of each RailNetwork: a device, or why not.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Devices, sorted by pool and name.
    pub devices: Vec<RailDevice>,
    /// `namespace/name: why` for RailNetworks that gave no device here.
    pub left_out: Vec<String>,
}

impl Inventory {
    /// The device `pool`/`name`, if this node publishes it.
    pub fn get(&self, pool: &str, name: &str) -> Option<&RailDevice> {
        self.devices
            .iter()
            .find(|d| d.pool == pool && d.name == name)
    }
}

/// What of the node the devices depend on.
#[derive(Clone, Copy, Debug)]
pub struct Host<'a> {
    /// The node's name.
    pub node: &'a str,
    /// sysfs, where the masters and VFs are read.
    pub sysfs: &'a Path,
    /// Whether the node's RDMA netns mode is exclusive: VFs whose RDMA
    /// device moves into the pod (`rdmaIsolation`) are published only
    /// then, so the scheduler never places such a claim where its ADD
    /// must fail.
    pub rdma_exclusive: bool,
    /// The administrator's namespace (`--dra-shared-namespace`): only its
    /// VF networks are published. A VF moves into a pod whole, so naming
    /// a PF hands out node hardware; whoever may write a RailNetwork in
    /// their own namespace is not trusted with that (a shared kind only
    /// hangs an interface off a NIC).
    pub admin_namespace: &'a str,
}

/// The devices `host` has for `networks` (RailNetworks, any namespace).
pub fn inventory(host: Host<'_>, networks: &[DynamicObject]) -> Inventory {
    let mut inv = Inventory::default();
    for net in networks {
        let ns = net.metadata.namespace.clone().unwrap_or_default();
        let name = net.metadata.name.clone().unwrap_or_default();
        match devices(host, &ns, &name, &net.data["spec"]) {
            Ok(d) => inv.devices.extend(d),
            Err(why) => inv.left_out.push(format!("{ns}/{name}: {why}")),
        }
    }
    inv.devices
        .sort_by(|a, b| (&a.pool, &a.name).cmp(&(&b.pool, &b.name)));
    // Two RailNetworks whose names map to one label: the second is left out.
    let mut seen = std::collections::BTreeSet::new();
    inv.devices.retain(|d| {
        let fresh = seen.insert((d.pool.clone(), d.name.clone()));
        if !fresh {
            inv.left_out.push(format!(
                "{}/{}: its device name {} is taken in pool {}",
                d.namespace, d.network, d.name, d.pool
            ));
        }
        fresh
    });
    inv
}

/// One RailNetwork's devices on this node: none when the node lacks its
/// master (not every node has every rail); an error when it cannot have
/// any.
fn devices(host: Host<'_>, ns: &str, name: &str, spec: &Value) -> Result<Vec<RailDevice>, String> {
    let (node, sysfs) = (host.node, host.sysfs);
    let kind = spec["type"].as_str().unwrap_or_default();
    let vfs = matches!(kind, "sriov" | "ib-sriov");
    if vfs && spec.get("resourceName").is_some_and(|r| !r.is_null()) {
        return Err(
            "its VFs are the device plugin's (spec.resourceName): pods attach it through its \
             NetworkAttachmentDefinition; name the PF in spec.master instead of resourceName to \
             have its VFs allocated through DRA claims"
                .into(),
        );
    }
    if !vfs && !matches!(kind, "macvlan" | "ipvlan" | "ipoib") {
        return Err(format!("type {kind:?} is not published for DRA"));
    }
    if vfs && ns != host.admin_namespace {
        return Err(format!(
            "VFs move into pods whole: only VF networks of namespace {} (the administrator's) are \
             published as DRA devices; create it there (claims of every namespace may use it)",
            host.admin_namespace
        ));
    }
    if vfs && spec["rdmaIsolation"] == true && !host.rdma_exclusive {
        return Err(
            "its VFs' RDMA devices move into pods (rdmaIsolation), and this node's RDMA netns mode \
             is not exclusive: not published here (`railnetctl doctor --expect exclusive` says how \
             to switch the node)"
                .into(),
        );
    }
    let master = spec["master"].as_str().unwrap_or_default();
    if vfs && master.is_empty() {
        return Err("spec.master (the PF whose VFs are the devices) is not set".into());
    }
    let Some(facts) = crate::dra::nic::read(sysfs, master) else {
        return Ok(Vec::new());
    };
    let rail = spec["rail"]
        .as_u64()
        .and_then(|r| u32::try_from(r).ok())
        .ok_or("spec.rail is not a rail number")?;
    let (mut conf, _) = crate::controller::render(spec)?;
    conf["name"] = Value::String(name.to_owned());
    let shared = RailDevice {
        pool: format!("{node}/{ns}"),
        name: label(name),
        namespace: ns.to_owned(),
        network: name.to_owned(),
        rail,
        kind: kind.to_owned(),
        master: master.to_owned(),
        vf: None,
        facts,
        conf,
    };
    if !vfs {
        return Ok(vec![shared]);
    }
    let pf = shared.facts.pci_address.clone().ok_or_else(|| {
        format!("master {master} is no PCI function here: it has no VFs to publish")
    })?;
    let listed = crate::sriov::vfs_of(sysfs, &pf);
    if listed.is_empty() {
        return Err(format!(
            "PF {master} ({pf}) has no VFs: create them (sriov_numvfs) or remove this RailNetwork"
        ));
    }
    let link_layer = if kind == "ib-sriov" {
        "infiniband"
    } else {
        shared.facts.link_layer
    };
    Ok(listed
        .into_iter()
        .map(|(n, bdf)| {
            let mut d = shared.clone();
            let suffix = format!("-vf{n}");
            d.name.truncate(63 - suffix.len());
            d.name = format!("{}{suffix}", d.name.trim_end_matches('-'));
            d.vf = Some(n);
            d.facts = crate::dra::nic::function(sysfs, &bdf, link_layer);
            // The VF is the device: what Multus's deviceID would say.
            if let Some(o) = d.conf.as_object_mut() {
                o.remove("master");
                o.insert("deviceID".into(), Value::String(bdf));
            }
            d
        })
        .collect())
}

/// A RailNetwork name (a DNS subdomain) as a device name (a DNS label).
fn label(name: &str) -> String {
    let mut s: String = name.replace('.', "-");
    s.truncate(63);
    s.trim_end_matches('-').to_owned()
}

/// The slice name of `node`'s pool for `namespace`.
pub fn slice_name(node: &str, namespace: &str) -> String {
    let mut s = format!("{node}-{}-{namespace}", DRIVER.replace('.', "-"));
    s.truncate(253);
    s
}

/// The ResourceSlices publishing `inv` (one per pool), each owned by the
/// node (`node_uid`) so it goes with it; `generation` orders the pools'
/// versions for the scheduler.
pub fn slices(node: &str, node_uid: &str, inv: &Inventory, generation: i64) -> Vec<ResourceSlice> {
    let mut pools: BTreeMap<(&str, &str), Vec<&RailDevice>> = BTreeMap::new();
    for d in &inv.devices {
        pools.entry((&d.pool, &d.namespace)).or_default().push(d);
    }
    pools
        .into_iter()
        .map(|((pool, ns), devices)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(node, ns)),
                labels: Some(BTreeMap::from([(
                    format!("{DRIVER}/node"),
                    node.to_owned(),
                )])),
                owner_references: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: node.to_owned(),
                        uid: node_uid.to_owned(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            },
            spec: ResourceSliceSpec {
                driver: DRIVER.into(),
                node_name: Some(node.to_owned()),
                pool: ResourcePool {
                    name: pool.to_owned(),
                    generation,
                    resource_slice_count: 1,
                },
                devices: Some(devices.into_iter().map(api_device).collect()),
                ..Default::default()
            },
        })
        .collect()
}

/// A device as the scheduler sees it.
fn api_device(d: &RailDevice) -> Device {
    let text = |s: &str| DeviceAttribute {
        string: Some(s.to_owned()),
        ..Default::default()
    };
    let int = |i: i64| DeviceAttribute {
        int: Some(i),
        ..Default::default()
    };
    let mut attrs = BTreeMap::from([
        ("rail".to_owned(), int(i64::from(d.rail))),
        (
            "network".to_owned(),
            text(&format!("{}/{}", d.namespace, d.network)),
        ),
        ("kind".to_owned(), text(&d.kind)),
        ("netdev".to_owned(), text(&d.master)),
        ("linkLayer".to_owned(), text(d.facts.link_layer)),
    ]);
    if let Some(n) = d.vf {
        attrs.insert("vf".into(), int(i64::from(n)));
    }
    if let Some(r) = &d.facts.rdma_device {
        attrs.insert("rdmaDevice".into(), text(r));
    }
    if let Some(p) = &d.facts.pci_address {
        attrs.insert("resource.kubernetes.io/pciBusID".into(), text(p));
    }
    if let Some(p) = &d.facts.pcie_root {
        attrs.insert("resource.kubernetes.io/pcieRoot".into(), text(p));
    }
    if let Some(n) = d.facts.numa_node {
        attrs.insert("resource.kubernetes.io/numaNode".into(), int(n));
    }
    Device {
        name: d.name.clone(),
        attributes: Some(attrs),
        // A VF moves into one pod; a master serves any number.
        allow_multiple_allocations: d.vf.is_none().then_some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dra::nic::tests::{fake_nic, tempfile_dir};
    use serde_json::json;

    fn network(ns: &str, name: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .unwrap()
    }

    fn host(sysfs: &Path, rdma_exclusive: bool) -> Host<'_> {
        Host {
            node: "node0",
            sysfs,
            rdma_exclusive,
            admin_namespace: "railnet",
        }
    }

    fn macvlan(rail: u32, master: &str) -> Value {
        json!({"rail": rail, "type": "macvlan", "master": master,
               "ippools": {"ipv4": [format!("rail{rail}")]}})
    }

    #[test]
    fn each_rail_network_on_a_nic_of_the_node_is_a_device_with_its_placement() {
        let sysfs = tempfile_dir();
        fake_nic(
            &sysfs,
            "eth1",
            "pci0000:3a",
            "0000:3b:00.0",
            0,
            Some("mlx5_0"),
        );
        fake_nic(&sysfs, "eth2", "pci0000:5d", "0000:5e:00.0", 1, None);
        let nets = [
            network("railnet", "rail1", macvlan(1, "eth1")),
            network("railnet", "rail2", macvlan(2, "eth2")),
            // This node has no eth3: no device, no complaint.
            network("railnet", "rail3", macvlan(3, "eth3")),
            network("team-a", "tenant.rail1", macvlan(1, "eth1")),
            network(
                "railnet",
                "vfs",
                json!({"rail": 4, "type": "sriov", "resourceName": "nvidia.com/rail4",
                       "ippools": {"ipv4": ["x"]}}),
            ),
        ];
        let inv = inventory(host(&sysfs, false), &nets);
        let names: Vec<_> = inv
            .devices
            .iter()
            .map(|d| format!("{} {} {}", d.pool, d.name, d.master))
            .collect();
        assert_eq!(
            names,
            [
                "node0/railnet rail1 eth1",
                "node0/railnet rail2 eth2",
                "node0/team-a tenant-rail1 eth1"
            ]
        );
        assert_eq!(inv.left_out.len(), 1, "{:?}", inv.left_out);
        assert!(
            inv.left_out[0].starts_with("railnet/vfs: its VFs are the device plugin's"),
            "{:?}",
            inv.left_out
        );
        assert_eq!(inv.devices[0].conf["name"], "rail1");
        assert_eq!(inv.devices[0].conf["master"], "eth1");

        let slices = slices("node0", "uid-1", &inv, 7);
        assert_eq!(slices.len(), 2, "one slice per namespace's pool");
        let s = serde_json::to_value(&slices[0]).unwrap();
        assert_eq!(s["metadata"]["name"], "node0-railnet-io-railnet");
        assert_eq!(s["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(s["spec"]["driver"], "railnet.io");
        assert_eq!(s["spec"]["nodeName"], "node0");
        assert_eq!(
            s["spec"]["pool"],
            json!({"name": "node0/railnet", "generation": 7, "resourceSliceCount": 1})
        );
        let d = &s["spec"]["devices"][0];
        assert_eq!(d["name"], "rail1");
        assert_eq!(d["allowMultipleAllocations"], true);
        assert_eq!(d["attributes"]["rail"], json!({"int": 1}));
        assert_eq!(
            d["attributes"]["resource.kubernetes.io/pcieRoot"],
            json!({"string": "pci0000:3a"})
        );
        assert_eq!(
            d["attributes"]["resource.kubernetes.io/numaNode"],
            json!({"int": 0})
        );
        assert_eq!(d["attributes"]["rdmaDevice"], json!({"string": "mlx5_0"}));
        assert_eq!(
            d["attributes"]["network"],
            json!({"string": "railnet/rail1"})
        );
        assert!(
            s["spec"]["devices"][1]["attributes"]
                .get("rdmaDevice")
                .is_none()
        );
        let _ = std::fs::remove_dir_all(&sysfs);
    }

    #[test]
    fn each_vf_of_a_dra_vf_network_is_a_device_of_its_own_for_one_claim() {
        let sysfs = tempfile_dir();
        fake_nic(&sysfs, "eth2", "pci0000:3a", "0000:3c:00.0", 0, None);
        for n in 0..2 {
            let bdf = format!("0000:3c:00.{}", n + 1);
            let function = sysfs.join("devices/pci0000:3a").join(&bdf);
            std::fs::create_dir_all(function.join("infiniband").join(format!("mlx5_{n}"))).unwrap();
            std::os::unix::fs::symlink(
                format!("../../../devices/pci0000:3a/{bdf}"),
                sysfs.join("bus/pci/devices").join(&bdf),
            )
            .unwrap();
            std::os::unix::fs::symlink(
                format!("../{bdf}"),
                sysfs
                    .join("devices/pci0000:3a/0000:3c:00.0")
                    .join(format!("virtfn{n}")),
            )
            .unwrap();
        }
        let nets = [
            network(
                "railnet",
                "vf2",
                json!({"rail": 2, "type": "sriov", "master": "eth2",
                       "ippools": {"ipv4": ["rail2"]}}),
            ),
            // A tenant naming the same PF hands out nothing.
            network(
                "team-a",
                "mine",
                json!({"rail": 2, "type": "sriov", "master": "eth2",
                       "ippools": {"ipv4": ["rail2"]}}),
            ),
            // No VFs on this PF: said, not silently nothing.
            network(
                "railnet",
                "novf",
                json!({"rail": 3, "type": "ib-sriov", "master": "eth1",
                       "ippools": {"ipv4": ["rail3"]}}),
            ),
        ];
        fake_nic(&sysfs, "eth1", "pci0000:5d", "0000:5e:00.0", 0, None);
        let inv = inventory(host(&sysfs, false), &nets);
        let got: Vec<_> = inv
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{} {} {}",
                    d.name,
                    d.conf["deviceID"].as_str().unwrap(),
                    d.facts.rdma_device.clone().unwrap()
                )
            })
            .collect();
        assert_eq!(
            got,
            ["vf2-vf0 0000:3c:00.1 mlx5_0", "vf2-vf1 0000:3c:00.2 mlx5_1"]
        );
        assert!(inv.devices[0].conf.get("master").is_none());
        assert_eq!(inv.left_out.len(), 2, "{:?}", inv.left_out);
        assert!(
            inv.left_out[0].starts_with("team-a/mine: VFs move into pods whole"),
            "{:?}",
            inv.left_out
        );
        assert!(inv.left_out[1].contains("has no VFs"), "{:?}", inv.left_out);

        let slices = slices("node0", "uid-1", &inv, 1);
        let d = serde_json::to_value(&slices[0]).unwrap()["spec"]["devices"][1].clone();
        assert_eq!(d["name"], "vf2-vf1");
        assert!(
            d.get("allowMultipleAllocations").is_none(),
            "a VF goes to one claim"
        );
        assert_eq!(d["attributes"]["vf"], json!({"int": 1}));
        assert_eq!(d["attributes"]["kind"], json!({"string": "sriov"}));
        assert_eq!(
            d["attributes"]["resource.kubernetes.io/pciBusID"],
            json!({"string": "0000:3c:00.2"})
        );
        assert_eq!(
            d["attributes"]["resource.kubernetes.io/pcieRoot"],
            json!({"string": "pci0000:3a"})
        );

        // VFs whose RDMA device moves into the pod: only where the node's
        // RDMA netns mode allows it.
        let isolated = [network(
            "railnet",
            "vf2",
            json!({"rail": 2, "type": "sriov", "master": "eth2", "rdmaIsolation": true,
                   "ippools": {"ipv4": ["rail2"]}}),
        )];
        let shared = inventory(host(&sysfs, false), &isolated);
        assert!(shared.devices.is_empty());
        assert!(
            shared.left_out[0].contains("not exclusive"),
            "{:?}",
            shared.left_out
        );
        let exclusive = inventory(host(&sysfs, true), &isolated);
        assert_eq!(exclusive.devices.len(), 2, "{:?}", exclusive.left_out);
        assert_eq!(exclusive.devices[0].conf["rdmaIsolation"], true);
        let _ = std::fs::remove_dir_all(&sysfs);
    }
}
