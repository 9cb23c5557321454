//! railnet driven by Debian's libcni (tests/libcni, built by `cargo xtask
//! test`), the library container runtimes and Multus use: an 8-rail pod on
//! each of two nodes, network configs in the versions NADs carry, CNI_ARGS
//! as Multus sends them, CHECK and DEL from libcni's cached results.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use railnet_tests::{Agent, FabricPod, RailFabric, ScratchDir, binary};
use serde_json::Value;

const RAILS: u32 = 8;
/// The address pod A asks for on rail 2 (inside node A's range).
const ASKED: &str = "172.16.2.77";

fn libcni() -> PathBuf {
    std::env::var_os("RAILNET_LIBCNI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/railnet-libcni"))
}

/// One libcni call; Ok(stdout) or Err(stderr).
fn call(
    op: &str,
    conf: &Path,
    container_id: &str,
    pod: &FabricPod,
    ifname: &str,
    cache: &Path,
    capabilities: &str,
) -> Result<String, String> {
    let cni = binary("RAILNET_CNI_BIN", "railnet");
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container_id};\
         K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id}"
    );
    let out = Command::new(libcni())
        .env("CNI_PATH", cni.parent().unwrap())
        .env("CNI_CACHE_DIR", cache)
        .arg(op)
        .arg(conf)
        .arg(container_id)
        .arg(pod.ns.path())
        .arg(ifname)
        .arg(args)
        .arg(capabilities)
        .output()
        .expect("railnet-libcni (cargo xtask test builds it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Rail K's config in the version a NAD might carry (libcni 1.1 speaks up
/// to 1.0.0; Multus NADs are often 0.3.1).
fn version(k: u32) -> &'static str {
    ["0.3.1", "0.4.0", "1.0.0"][(k % 3) as usize]
}

/// The MAC pod `n` asks for on rail 1.
fn mac(n: usize) -> String {
    format!("02:11:22:33:44:{:02x}", 0x55 + n)
}

#[test]
fn eight_rails_round_trip_through_libcni() {
    let fabric = RailFabric::new(2, RAILS);
    let agents: Vec<Agent> = (0..2)
        .map(|n| Agent::start(&fabric.nodes[n], &fabric.pools(n)))
        .collect();
    let dir = ScratchDir::new("libcni");
    let cache = dir.path().join("cache");
    let pods = [fabric.pod(0), fabric.pod(1)];
    let ids = ["libcni-a", "libcni-b"];
    let mut addrs = [Vec::new(), Vec::new()];
    let mut confs = [Vec::new(), Vec::new()];
    for (n, pod) in pods.iter().enumerate() {
        for k in 1..=RAILS {
            let mut conf = fabric.netconf(k, &agents[n], "ebpf");
            conf["cniVersion"] = version(k).into();
            // Rail 1 declares the mac capability: libcni hands the pod's
            // MAC to railnet in runtimeConfig, as Multus does for a MAC in
            // the networks annotation.
            let caps = if k == 1 {
                conf["capabilities"] = serde_json::json!({"mac": true});
                format!(r#"{{"mac":"{}"}}"#, mac(n))
            } else if k == 2 && n == 0 {
                // Rail 2 of pod A: the ips capability, an address the pod
                // asked for in its networks annotation.
                conf["capabilities"] = serde_json::json!({"ips": true});
                format!(r#"{{"ips":["{ASKED}/24"]}}"#)
            } else {
                String::new()
            };
            let file = dir.path().join(format!("{}-rail{k}.json", ids[n]));
            std::fs::write(&file, conf.to_string()).unwrap();
            let out = call("add", &file, ids[n], pod, &format!("net{k}"), &cache, &caps)
                .unwrap_or_else(|e| panic!("libcni ADD rail {k} ({}): {e}", version(k)));
            let result: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(
                result["cniVersion"],
                version(k),
                "answered in the asked version"
            );
            let addr = result["ips"][0]["address"].as_str().unwrap().to_owned();
            assert!(
                addr.starts_with(&format!("172.16.{k}.")),
                "rail {k} got {addr}"
            );
            addrs[n].push(addr.split('/').next().unwrap().to_owned());
            confs[n].push(file);
        }
    }
    for (n, pod) in pods.iter().enumerate() {
        let link = pod.ns.ip_json(&["link", "show", "dev", "net1"]);
        assert_eq!(link[0]["address"], mac(n), "runtimeConfig.mac");
    }
    assert_eq!(addrs[0][1], ASKED, "runtimeConfig.ips");
    // Another pod on node A asking for the same address is refused, naming
    // why, and keeps nothing.
    let before = agents[0].allocations(&fabric.nodes[0]);
    let third = fabric.pod(0);
    let err = call(
        "add",
        &confs[0][1],
        "libcni-c",
        &third,
        "net2",
        &cache,
        &format!(r#"{{"ips":["{ASKED}/24"]}}"#),
    )
    .unwrap_err();
    assert!(err.contains(ASKED) && err.contains("already held"), "{err}");
    assert!(!third.ns.has_link("net2"));
    assert_eq!(agents[0].allocations(&fabric.nodes[0]), before);
    // What the workload reads (the webhook mounts the directory at
    // /etc/railnet): every rail, in rail order, with its address; nothing
    // for the refused pod.
    let info = agents[0].pod_info("uid-libcni-a");
    let rails: Value =
        serde_json::from_str(&std::fs::read_to_string(info.join("rails.json")).unwrap()).unwrap();
    let listed: Vec<(String, String)> = rails
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ip = r["ips"][0].as_str().unwrap().split('/').next().unwrap();
            (r["interface"].as_str().unwrap().to_owned(), ip.to_owned())
        })
        .collect();
    let expected: Vec<(String, String)> = (1..=RAILS as usize)
        .map(|k| (format!("net{k}"), addrs[0][k - 1].clone()))
        .collect();
    assert_eq!(listed, expected, "rails.json");
    let env = std::fs::read_to_string(info.join("nccl.env")).unwrap();
    assert!(
        env.contains("No rail of this pod has an RDMA device") && !env.contains("NCCL_IB_HCA"),
        "this kernel has no RDMA: {env}"
    );
    assert!(!agents[0].pod_info("uid-libcni-c").exists());
    // The same, as the pod reads it of itself from its interfaces (the
    // webhook's init container under Pod Security baseline/restricted):
    // unprivileged, no hostPath, identical files but for the container ID.
    let own = railnet_tests::ScratchDir::new("pod-info");
    std::fs::set_permissions(
        own.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = pods[0]
        .ns
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(railnet_tests::binary("RAILNET_CTL_BIN", "railnetctl"))
        .args(["pod-info", "--out"])
        .arg(own.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut from_node = rails.clone();
    for r in from_node.as_array_mut().unwrap() {
        r.as_object_mut().unwrap().remove("containerId");
    }
    let from_pod: Value =
        serde_json::from_str(&std::fs::read_to_string(own.path().join("rails.json")).unwrap())
            .unwrap();
    assert_eq!(from_pod, from_node, "rails.json as the pod reads it");
    assert_eq!(
        std::fs::read_to_string(own.path().join("nccl.env")).unwrap(),
        env,
        "nccl.env as the pod reads it"
    );
    // Every rail carries traffic between the two pods: three replies
    // within a second, ARP included.
    for (k, (a, b)) in addrs[0].iter().zip(&addrs[1]).enumerate() {
        let replied = pods[0]
            .ns
            .command("ping")
            .args(["-q", "-n", "-c", "3", "-i", "0.01", "-w", "1", "-I", a, b])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(replied, "rail {} from {a} to {b}", k + 1);
    }
    // The pod's rails run one program, loaded (verified) for its first
    // rail and attached by the others: one id in every rail's filter.
    let ids_of = |pod: &railnet_tests::FabricPod| -> std::collections::BTreeSet<String> {
        (1..=RAILS)
            .map(|k| {
                railnet_tests::egress_program_id(&pod.ns, &format!("net{k}"))
                    .unwrap_or_else(|| panic!("no program on net{k}"))
            })
            .collect()
    };
    assert_eq!(ids_of(&pods[0]).len(), 1, "{:?}", ids_of(&pods[0]));
    assert_ne!(
        ids_of(&pods[0]),
        ids_of(&pods[1]),
        "each pod has its own program"
    );
    // CHECK through libcni (it passes the cached result as prevResult);
    // 0.3.1 has no CHECK.
    for (k, file) in (1..=RAILS).zip(&confs[0]) {
        if version(k) != "0.3.1" {
            call(
                "check",
                file,
                ids[0],
                &pods[0],
                &format!("net{k}"),
                &cache,
                "",
            )
            .unwrap_or_else(|e| panic!("libcni CHECK rail {k}: {e}"));
        }
    }
    // A rail that lost its address fails CHECK, naming it.
    pods[0].ns.ip(&["addr", "flush", "dev", "net2"]);
    let err = call("check", &confs[0][1], ids[0], &pods[0], "net2", &cache, "").unwrap_err();
    assert!(err.contains("net2"), "{err}");
    // DEL through libcni, twice (runtimes retry): nothing left.
    for _ in 0..2 {
        for (n, pod) in pods.iter().enumerate() {
            for (k, file) in (1..=RAILS).zip(&confs[n]) {
                call("del", file, ids[n], pod, &format!("net{k}"), &cache, "")
                    .unwrap_or_else(|e| panic!("libcni DEL rail {k}: {e}"));
            }
        }
    }
    for (n, pod) in pods.iter().enumerate() {
        for k in 1..=RAILS {
            assert!(!pod.ns.has_link(&format!("net{k}")), "net{k} left");
        }
        assert_eq!(agents[n].allocations(&fabric.nodes[n]), 0, "addresses left");
        assert!(
            !agents[n].pod_info(&format!("uid-{}", ids[n])).exists(),
            "the pod's rail info outlived its rails"
        );
    }
}
