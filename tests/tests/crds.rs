//! The chart's CRDs (charts/railnet/crds) in a real API server (etcd +
//! apiextensions-apiserver, in a netns of the test's own): accepted as
//! structural schemas whose CEL rules compile; objects users write from the
//! seeds accepted; what railnet would refuse refused by the API server with
//! a message naming it; printer columns and the status subresource served.

use std::path::Path;

use railnet_tests::apiserver::{ApiServer, columns};
use serde_json::{Value, json};

fn crd(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/railnet/crds")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn server() -> ApiServer {
    let api = ApiServer::start();
    api.install_crd(&crd("railnet.io_railpools.yaml"));
    api.install_crd(&crd("railnet.io_railnetworks.yaml"));
    api
}

const POOLS: &str = "/apis/railnet.io/v1alpha1/railpools";
const NETWORKS: &str = "/apis/railnet.io/v1alpha1/namespaces/ai/railnetworks";

fn pool(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailPool",
           "metadata": {"name": name}, "spec": spec})
}

fn network(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
           "metadata": {"name": name, "namespace": "ai"}, "spec": spec})
}

/// Asserts the API server refused `obj` with 422 and a message containing
/// `says`.
#[track_caller]
fn refused(api: &ApiServer, path: &str, obj: &Value, says: &str) {
    let (code, body) = api.post(path, obj);
    assert_eq!(code, 422, "accepted or failed otherwise: {body}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(msg.contains(says), "message {msg:?} does not say {says:?}");
}

#[test]
fn rail_pools_as_the_seeds_write_them_and_the_mistakes_they_print() {
    let api = server();
    // Solution 2, corrected: a /27 per node per rail.
    let good = pool(
        "eno3np1-rail1-node1",
        json!({"subnet": "172.16.1.0/27", "gateway": "172.16.1.1",
               "ips": ["172.16.1.2-172.16.1.30"],
               "routes": [{"to": "172.16.0.0/16", "via": "172.16.1.1"}],
               "nodeName": ["node1"]}),
    );
    let (code, body) = api.post(POOLS, &good);
    assert_eq!(code, 201, "{body}");
    let v6 = pool(
        "rail1-v6",
        json!({"subnet": "fd00:16:1::/64", "gateway": "fd00:16:1::1", "ips": ["fd00:16:1::10-fd00:16:1::ff"]}),
    );
    assert_eq!(api.post(POOLS, &v6).0, 201);
    // As printed in seed 001: the range overruns its /27.
    refused(
        &api,
        POOLS,
        &pool(
            "seed-printed",
            json!({"subnet": "172.16.1.0/27", "gateway": "172.16.1.1", "ips": ["172.16.1.2-172.16.1.32"]}),
        ),
        "inside subnet",
    );
    refused(
        &api,
        POOLS,
        &pool("host-bits", json!({"subnet": "172.16.1.5/27"})),
        "network address",
    );
    refused(
        &api,
        POOLS,
        &pool(
            "far-gw",
            json!({"subnet": "172.16.1.0/27", "gateway": "172.16.2.1"}),
        ),
        "gateway must be an address inside subnet",
    );
    refused(
        &api,
        POOLS,
        &pool(
            "far-via",
            json!({"subnet": "172.16.1.0/27", "routes": [{"to": "172.16.0.0/16", "via": "172.16.9.1"}]}),
        ),
        "via must be an address inside subnet",
    );
    refused(
        &api,
        POOLS,
        &pool(
            "mixed",
            json!({"subnet": "172.16.1.0/27", "ips": ["172.16.1.2-fd00::1"]}),
        ),
        "inside subnet",
    );
    // What `kubectl get railpools` prints, with the status the agents keep.
    let path = format!("{POOLS}/eno3np1-rail1-node1");
    let (_, mut current) = api.get(&path);
    current["status"] = json!({"allocatedIPCount": 3, "totalIPCount": 29});
    let (code, body) = api.put(&format!("{path}/status"), &current);
    assert_eq!(code, 200, "{body}");
    let (code, table) = api.get_table(POOLS);
    assert_eq!(code, 200, "{table}");
    let columns = columns(&table);
    assert_eq!(
        columns,
        [
            "Name",
            "Subnet",
            "Gateway",
            "Allocated",
            "Total",
            "Nodes",
            "Disable",
            "Age"
        ]
    );
    let row = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == "eno3np1-rail1-node1")
        .expect("the pool's row");
    assert_eq!(row["cells"][1], "172.16.1.0/27");
    assert_eq!(row["cells"][3], 3);
    assert_eq!(row["cells"][4], 29);
}

#[test]
fn rail_networks_refuse_what_railnet_would_refuse() {
    let api = server();
    let macvlan = network(
        "rail1",
        json!({"rail": 1, "type": "macvlan", "master": "eno3np1",
               "ippools": {"ipv4": ["eno3np1-rail1*"]}, "matchMasterSubnet": true,
               "rdmaCIDRs": ["172.16.0.0/16"], "mtu": 4200}),
    );
    let (code, body) = api.post(NETWORKS, &macvlan);
    assert_eq!(code, 201, "{body}");
    let sriov = network(
        "gpu1-sriov",
        json!({"rail": 1, "type": "sriov", "resourceName": "spidernet.io/gpu1sriov",
               "ippools": {"ipv4": ["gpu1-net11"]}, "rdmaIsolation": true,
               "vf": {"trust": "on", "spoofchk": "off"}}),
    );
    let (code, body) = api.post(NETWORKS, &sriov);
    assert_eq!(code, 201, "{body}");

    let bad =
        |name: &str, spec: Value, says: &str| refused(&api, NETWORKS, &network(name, spec), says);
    bad(
        "no-master",
        json!({"rail": 2, "type": "macvlan", "ippools": {"ipv4": ["p"]}}),
        "need master",
    );
    bad(
        "no-resource",
        json!({"rail": 2, "type": "sriov", "ippools": {"ipv4": ["p"]}}),
        "need one of resourceName",
    );
    bad(
        "both-servers",
        json!({"rail": 2, "type": "sriov", "resourceName": "nvidia.com/rail2", "master": "eno4np1",
               "ippools": {"ipv4": ["p"]}}),
        "not both",
    );
    // The PF named instead: its VFs are DRA devices.
    let (code, body) = api.post(
        NETWORKS,
        &network(
            "dra-vfs",
            json!({"rail": 2, "type": "sriov", "master": "eno4np1", "ippools": {"ipv4": ["p"]}}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    bad(
        "isolated-macvlan",
        json!({"rail": 2, "type": "macvlan", "master": "eno4np1", "rdmaIsolation": true, "ippools": {"ipv4": ["p"]}}),
        "share their master's",
    );
    bad(
        "no-pool",
        json!({"rail": 2, "type": "macvlan", "master": "eno4np1", "ippools": {}}),
        "at least one pool",
    );
    bad(
        "rail-zero",
        json!({"rail": 0, "type": "macvlan", "master": "eno4np1", "ippools": {"ipv4": ["p"]}}),
        "spec.rail",
    );
    bad(
        "tiny-mtu",
        json!({"rail": 2, "type": "macvlan", "master": "eno4np1", "mtu": 1000, "ippools": {"ipv4": ["p"]}}),
        "spec.mtu",
    );
    bad(
        "bad-cidr",
        json!({"rail": 2, "type": "macvlan", "master": "eno4np1", "rdmaCIDRs": ["172.16.0.0/33"], "ippools": {"ipv4": ["p"]}}),
        "must be a CIDR",
    );
    let (code, table) = api.get_table(NETWORKS);
    assert_eq!(code, 200, "{table}");
    let columns = columns(&table);
    assert_eq!(
        columns,
        [
            "Name", "Rail", "Type", "Master", "Resource", "Isolated", "NAD", "Ready", "Reason",
            "Age"
        ]
    );
    assert_eq!(table["rows"].as_array().unwrap().len(), 3, "{table}");
}
