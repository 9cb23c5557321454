//! `railnetctl import spiderpool` on the AI-cluster guides' own examples,
//! verbatim (tests/fixtures/spiderpool): what maps is written as RailPools
//! and RailNetworks that the real API server's CRD schemas admit and the
//! controller renders; what the guides got wrong — Solution 2's ranges
//! that run past their /27s (and one to 172.16.1.256), the InfiniBand
//! example's network naming pool gpu1-net91 where the pool is gpu1-net11 —
//! is left out and named, with the exit code saying so.

use std::{path::PathBuf, process::Command};

use railnet_tests::apiserver::ApiServer;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/spiderpool")
        .join(name)
}

/// Runs the import on `files`: (exit code, objects written, stderr).
fn import(files: &[&str]) -> (i32, Vec<Value>, String) {
    let out = Command::new(railnet_tests::binary("RAILNET_CTL_BIN", "railnetctl"))
        .args(["import", "spiderpool"])
        .args(files.iter().map(|f| fixture(f)))
        .output()
        .expect("railnetctl");
    let mut objects = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout)) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("the output is YAML");
        if !v.is_null() {
            objects.push(v);
        }
    }
    (
        out.status.code().unwrap_or(-1),
        objects,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn names(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{} {}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// Solution 1 (Ethernet) and the VF MTU example: one pool per rail shared
/// by every node and an SR-IOV network using it. Both map, and the real
/// API server takes what was written.
#[test]
fn the_guides_solution_1_becomes_objects_the_api_server_admits() {
    let (code, objects, err) = import(&["solution1-ethernet.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        names(&objects),
        ["RailPool gpu1-net11", "RailNetwork gpu1-sriov"]
    );
    let (pool, net) = (&objects[0]["spec"], &objects[1]["spec"]);
    // 172.16.11.0/16 has host bits set: written as the network Spiderpool
    // reads, and said so.
    assert_eq!(pool["subnet"], "172.16.0.0/16");
    assert!(err.contains("172.16.11.0/16 has host bits set"), "{err}");
    assert_eq!(pool["ips"][0], "172.16.11.1-172.16.11.200");
    assert_eq!(net["type"], "sriov");
    assert_eq!(net["rail"], 1, "gpu1- names rail 1");
    assert_eq!(net["resourceName"], "spidernet.io/eno3np2");
    assert_eq!(net["ippools"]["ipv4"][0], "gpu1-net11");
    assert_eq!(objects[1]["metadata"]["namespace"], "spiderpool");

    // The MTU example is another gpu1-sriov: with the pool it maps too.
    let (code, mtu, err) = import(&["solution1-ethernet.yaml", "vf-mtu.yaml"]);
    assert_eq!(code, 1, "two gpu1-sriov with different specs: {err}");
    assert!(err.contains("came earlier with another spec"), "{err}");
    let (code, alone, err) = import(&["vf-mtu.yaml"]);
    assert_eq!(code, 1);
    assert!(alone.is_empty());
    assert!(
        err.contains("ippools names gpu1-net11, which no SpiderIPPool given defines"),
        "{err}"
    );
    drop(mtu);

    let api = ApiServer::start();
    for crd in ["railnet.io_railpools.yaml", "railnet.io_railnetworks.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/railnet/crds")
            .join(crd);
        api.install_crd(&serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap());
    }
    let (code, body) = api.post("/apis/railnet.io/v1alpha1/railpools", &objects[0]);
    assert_eq!(code, 201, "the RailPool was refused: {body}");
    let (code, body) = api.post(
        "/apis/railnet.io/v1alpha1/namespaces/spiderpool/railnetworks",
        &objects[1],
    );
    assert_eq!(code, 201, "the RailNetwork was refused: {body}");
    // And the controller renders the stored network into a NAD railnet's
    // CNI accepts (with the VF's PCI address Multus adds).
    let (mut conf, annotations) =
        railnet_agent::controller::render(&body["spec"]).expect("the controller renders it");
    assert_eq!(
        annotations[railnet_agent::controller::RESOURCE_NAME],
        "spidernet.io/eno3np2"
    );
    conf["name"] = "gpu1-sriov".into();
    conf["deviceID"] = "0000:3b:00.2".into();
    railnet_agent::netconf::NetConf::parse(conf.to_string().as_bytes())
        .expect("railnet's CNI accepts the rendered config");
}

/// Solution 2's per-node pools, as printed: every range runs one address
/// past its /27 (and rail 8's to 172.16.1.256). None is copied; each is
/// named with the subnet's real host range, and the networks that use them
/// are left out saying why.
#[test]
fn the_guides_solution_2_ranges_are_refused_each_naming_its_pool_and_range() {
    let (code, objects, err) = import(&["solution2-pools.yaml", "solution2-networks.yaml"]);
    assert_eq!(code, 1, "{err}");
    assert!(objects.is_empty(), "copied: {:?}", names(&objects));
    for (rail, range, hosts) in [
        (1, "172.16.1.2-172.16.1.32", "172.16.1.1-172.16.1.30"),
        (2, "172.16.1.34-172.16.1.64", "172.16.1.33-172.16.1.62"),
        (7, "172.16.1.194-172.16.1.224", "172.16.1.193-172.16.1.222"),
    ] {
        let line = err
            .lines()
            .find(|l| {
                l.contains(&format!("eno3np{rail}-rail{rail}-node1")) && l.contains("SpiderIPPool")
            })
            .unwrap_or_else(|| panic!("rail {rail}'s pool not named:\n{err}"));
        assert!(line.contains(range) && line.contains(hosts), "{line}");
    }
    assert!(
        err.contains("\"172.16.1.226-172.16.1.256\" is not an address range"),
        "{err}"
    );
    assert!(
        err.contains("sriov-eno3np1")
            && err.contains("eno3np1-rail1*, whose pools were not imported"),
        "{err}"
    );
    assert!(err.contains("0 objects imported, 10 left out"), "{err}");
}

/// The InfiniBand examples' network names pool gpu1-net91; the pool beside
/// it is gpu1-net11. The pool is imported, the network is not, and the
/// message suggests the name.
#[test]
fn a_network_naming_a_pool_nobody_defines_is_left_out_with_the_likely_name() {
    for file in ["solution1-infiniband.yaml", "webhook-infiniband.yaml"] {
        let (code, objects, err) = import(&[file]);
        assert_eq!(code, 1, "{file}: {err}");
        assert_eq!(names(&objects), ["RailPool gpu1-net11"], "{file}");
        assert!(
            err.contains("ippools names gpu1-net91, which no SpiderIPPool given defines (a typo for gpu1-net11?)"),
            "{file}: {err}"
        );
    }
}
