//! The CNI binary's answers to bad input and a missing agent: CNI error JSON
//! with the spec's codes and a message a person can act on.

use railnet_tests::{Netns, cni, unique};
use serde_json::json;

fn conf(socket: &str) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0", "name": "rail1", "type": "railnet", "rail": 1,
        "master": "eth1", "ippools": {"ipv4": ["rail1"]}, "agentSocket": socket,
    })
}

#[test]
fn version_lists_every_supported_spec_version() {
    let out = cni("VERSION", &json!({}), "x", None, "net1");
    assert!(out.ok);
    let versions = out.json["supportedVersions"].as_array().unwrap();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&json!(v)), "{}", out.stdout);
    }
}

#[test]
fn add_with_the_agent_down_says_try_again_and_names_the_socket() {
    let ns = Netns::new("pod");
    let socket = format!("/tmp/{}.sock", unique("absent"));
    let out = cni("ADD", &conf(&socket), "c1", Some(&ns.path()), "net1");
    assert!(!out.ok);
    assert_eq!(out.json["code"], 11, "{}", out.stdout);
    assert!(out.json["msg"].as_str().unwrap().contains(&socket));
}

#[test]
fn malformed_and_unsupported_configs_get_their_codes() {
    let ns = Netns::new("pod");
    let mut bad = conf("/nonexistent");
    bad["cniVersion"] = "0.2.0".into();
    let out = cni("ADD", &bad, "c1", Some(&ns.path()), "net1");
    assert_eq!(out.json["code"], 1, "{}", out.stdout);
    let mut bad = conf("/nonexistent");
    bad["rail"] = 99.into();
    let out = cni("ADD", &bad, "c1", Some(&ns.path()), "net1");
    assert_eq!(out.json["code"], 7, "{}", out.stdout);
    assert!(out.json["details"].as_str().unwrap().contains("rail 99"));
    let out = cni(
        "ADD",
        &json!("not a config"),
        "c1",
        Some(&ns.path()),
        "net1",
    );
    assert_eq!(out.json["code"], 6, "{}", out.stdout);
}

#[test]
fn add_with_a_netns_path_that_does_not_exist_is_an_env_error() {
    let out = cni(
        "ADD",
        &conf("/nonexistent"),
        "c1",
        Some(std::path::Path::new("/run/netns/nope-railnet")),
        "net1",
    );
    assert!(!out.ok);
    assert_eq!(out.json["code"], 4, "{}", out.stdout);
}

#[test]
fn add_with_a_netns_path_that_is_no_network_namespace_is_refused_before_anything() {
    // A regular file, and a namespace of another kind: refused at the edge
    // (code 4, naming the path), before the agent is asked for an address.
    let dir = railnet_tests::ScratchDir::new("netns-file");
    let file = dir.path().join("not-a-netns");
    std::fs::write(&file, b"").unwrap();
    let mnt = std::path::PathBuf::from("/proc/self/ns/mnt");
    for path in [&file, &mnt] {
        let out = cni("ADD", &conf("/nonexistent"), "c1", Some(path), "net1");
        assert!(!out.ok);
        assert_eq!(out.json["code"], 4, "{}: {}", path.display(), out.stdout);
        let said = format!("{} {}", out.json["msg"], out.json["details"]);
        assert!(
            said.contains(&path.display().to_string()) && said.contains("network namespace"),
            "{said}"
        );
    }
}
