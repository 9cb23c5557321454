//! The controller role against a real API server (etcd +
//! apiextensions-apiserver in a netns of the test's own, with Multus's NAD
//! CRD and — because this server has no built-in types — the Lease as a
//! CRD): two real `railnet-controller` processes, one leads; RailNetworks
//! become NADs railnet's CNI accepts, with the resourceName annotation for
//! SR-IOV; a hand-edited NAD is put back; when the leader dies the other
//! replica takes over.

use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use railnet_agent::netconf::NetConf;
use railnet_tests::{
    ScratchDir,
    apiserver::{ApiServer, cell},
};
use serde_json::{Value, json};

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn server() -> ApiServer {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let api = ApiServer::start();
    api.install_crd(&yaml(
        &root.join("../charts/railnet/crds/railnet.io_railnetworks.yaml"),
    ));
    api.install_crd(&yaml(&root.join("fixtures/nad-crd.yaml")));
    api.install_crd(&yaml(&root.join("fixtures/lease-crd.yaml")));
    api
}

/// A controller process, killed on drop.
struct Controller {
    child: Child,
    log: std::path::PathBuf,
}

impl Controller {
    fn start(api: &ApiServer, identity: &str, metrics_port: u16, dir: &ScratchDir) -> Self {
        Self::start_every(api, identity, metrics_port, dir, 1)
    }

    /// A controller whose periodic pass comes every `interval` seconds.
    fn start_every(
        api: &ApiServer,
        identity: &str,
        metrics_port: u16,
        dir: &ScratchDir,
        interval: u64,
    ) -> Self {
        let log = dir.path().join(format!("{identity}.log"));
        let child = api
            .controller()
            .args([
                "--identity",
                identity,
                "--lease-seconds",
                &interval.max(3).to_string(),
                "--interval",
                &interval.to_string(),
                "--metrics-address",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("railnet-controller");
        Self { child, log }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NADS: &str = "/apis/k8s.cni.cncf.io/v1/namespaces/ai/network-attachment-definitions";
const NETS: &str = "/apis/railnet.io/v1alpha1/namespaces/ai/railnetworks";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/railnet/leases/railnet-controller";

/// Polls `f` until it gives `Some`, or panics with `what` after 30 s.
#[track_caller]
fn eventually<T>(what: &str, logs: &dyn Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn network(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailNetwork",
           "metadata": {"name": name, "namespace": "ai"}, "spec": spec})
}

#[test]
fn rail_networks_become_nads_that_stay_as_rendered_across_a_leader_change() {
    let api = server();
    let dir = ScratchDir::new("controller");
    let mut a = Some(Controller::start(&api, "ctl-a", 9466, &dir));
    let mut b = Some(Controller::start(&api, "ctl-b", 9467, &dir));
    let paths = [
        a.as_ref().unwrap().log.clone(),
        b.as_ref().unwrap().log.clone(),
    ];
    let logs = move || {
        paths
            .iter()
            .map(|p| {
                format!(
                    "{}:\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (name, spec) in [
        (
            "rail1",
            json!({"rail": 1, "type": "macvlan", "master": "eno3np1",
                   "ippools": {"ipv4": ["rail1"]}, "rdmaCIDRs": ["172.16.0.0/16"], "mtu": 4200}),
        ),
        (
            "rail2",
            json!({"rail": 2, "type": "sriov", "resourceName": "nvidia.com/rail2_vfs",
                   "ippools": {"ipv4": ["rail2"]}}),
        ),
        (
            "rail3",
            json!({"rail": 3, "type": "ipoib", "master": "ib0",
                   "ippools": {"ipv4": ["rail3"]}, "ib": {"linkState": "enable"}}),
        ),
    ] {
        let (code, body) = api.post(NETS, &network(name, spec));
        assert_eq!(code, 201, "{body}");
    }
    let nad = |name: &str| {
        let (code, body) = api.get(&format!("{NADS}/{name}"));
        (code == 200).then_some(body)
    };
    let rail1 = eventually("NAD rail1 rendered", &logs, || nad("rail1"));
    let rail2 = eventually("NAD rail2 rendered", &logs, || nad("rail2"));
    let conf1: Value = serde_json::from_str(rail1["spec"]["config"].as_str().unwrap()).unwrap();
    NetConf::parse(rail1["spec"]["config"].as_str().unwrap().as_bytes())
        .expect("railnet's CNI accepts the rendered config");
    assert_eq!(conf1["name"], "rail1");
    assert_eq!(conf1["master"], "eno3np1");
    assert_eq!(conf1["mtu"], 4200);
    assert_eq!(conf1["rdmaCIDRs"], json!(["172.16.0.0/16"]));
    assert_eq!(
        rail2["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"], "nvidia.com/rail2_vfs",
        "without it Multus passes no deviceID"
    );
    assert_eq!(
        rail1["metadata"]["ownerReferences"][0]["kind"],
        "RailNetwork"
    );
    // What cannot be served is said on the RailNetwork, not rendered.
    let why = eventually("rail3's status", &logs, || {
        let (_, n) = api.get(&format!("{NETS}/rail3"));
        n["status"]["conditions"][0]["message"]
            .as_str()
            .map(str::to_owned)
    });
    assert!(why.contains("ib.linkState"), "{why}");
    assert!(nad("rail3").is_none());
    let (_, n1) = api.get(&format!("{NETS}/rail1"));
    assert_eq!(n1["status"]["networkAttachmentDefinition"], "rail1");
    assert_eq!(n1["status"]["conditions"][0]["status"], "True");

    // `kubectl get railnetworks` says which are served.
    let (_, table) = api.get_table(NETS);
    let rows = table["rows"].as_array().unwrap().len();
    let by_name: std::collections::BTreeMap<&str, &Value> = (0..rows)
        .map(|r| {
            (
                cell(&table, r, "Name").as_str().unwrap(),
                cell(&table, r, "Ready"),
            )
        })
        .collect();
    assert_eq!(by_name["rail1"], "True", "{table}");
    assert_eq!(by_name["rail3"], "False", "{table}");

    // One leader.
    let leader = eventually("a leader", &logs, || {
        let (_, l) = api.get(LEASE);
        l["spec"]["holderIdentity"].as_str().map(str::to_owned)
    });
    assert!(leader == "ctl-a" || leader == "ctl-b", "{leader}");

    // A hand edit is put back.
    let edit = |api: &ApiServer| {
        let mut live = nad("rail1").unwrap();
        live["spec"]["config"] = json!({"cniVersion": "0.3.1", "name": "rail1", "type": "macvlan"})
            .to_string()
            .into();
        let (code, body) = api.put(&format!("{NADS}/rail1"), &live);
        assert_eq!(code, 200, "{body}");
    };
    edit(&api);
    eventually("the edited NAD put back", &logs, || {
        (nad("rail1")?["spec"]["config"] == rail1["spec"]["config"]).then_some(())
    });

    // The leader's /metrics says so, and what it did; promtool accepts it.
    let scrape = |port: u16| {
        let out = api
            .ns
            .command("curl")
            .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (lead_port, other_port) = if leader == "ctl-a" {
        (9466, 9467)
    } else {
        (9467, 9466)
    };
    let text = eventually("the repair counted", &logs, || {
        let t = scrape(lead_port);
        t.contains("railnet_controller_nads_repaired_total 1")
            .then_some(t)
    });
    for line in [
        "railnet_controller_leader 1",
        "railnet_controller_nads_created_total 2",
        "railnet_controller_networks_refused 1",
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }
    assert!(scrape(other_port).contains("railnet_controller_leader 0"));
    let (passed, said) = railnet_tests::promtool_check(&text);
    assert!(passed, "{said}");

    // The leader dies: the other replica takes the Lease once it expires,
    // and repairs from then on.
    let survivor = if leader == "ctl-a" {
        a.take();
        "ctl-b"
    } else {
        b.take();
        "ctl-a"
    };
    eventually("the survivor leads", &logs, || {
        let (_, l) = api.get(LEASE);
        (l["spec"]["holderIdentity"] == survivor).then_some(())
    });
    edit(&api);
    eventually("the edited NAD put back by the new leader", &logs, || {
        (nad("rail1")?["spec"]["config"] == rail1["spec"]["config"]).then_some(())
    });
}

/// `helm uninstall`'s pre-delete hook (`railnet-controller --uninstall`):
/// the NADs rendered from RailNetworks and the RailBlocks nobody holds an
/// address in are deleted; a block with a running pod's claim is kept and
/// named with the pod; a NAD someone wrote by hand and the RailNetworks
/// (the user's) stay.
#[test]
fn uninstall_deletes_what_railnet_made_and_keeps_addresses_pods_still_hold() {
    let api = server();
    api.install_crd(&yaml(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/railnet/crds/railnet.io_railblocks.yaml"),
    ));
    let dir = ScratchDir::new("uninstall");
    let (code, body) = api.post(
        NETS,
        &network(
            "rail1",
            json!({"rail": 1, "type": "macvlan", "master": "eno3np1", "ippools": {"ipv4": ["rail1"]}}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    {
        let ctl = Controller::start(&api, "ctl", 9466, &dir);
        let log = ctl.log.clone();
        eventually(
            "the NAD is rendered",
            &move || std::fs::read_to_string(&log).unwrap_or_default(),
            || (api.get(&format!("{NADS}/rail1")).0 == 200).then_some(()),
        );
    }
    let (code, body) = api.post(
        NADS,
        &json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": "by-hand", "namespace": "ai"},
                "spec": {"config": "{\"cniVersion\":\"1.0.0\",\"type\":\"macvlan\"}"}}),
    );
    assert_eq!(code, 201, "{body}");
    const BLOCKS: &str = "/apis/railnet.io/v1alpha1/railblocks";
    let block = |name: &str, cidr: &str, claims: Value| {
        json!({"apiVersion": "railnet.io/v1alpha1", "kind": "RailBlock",
               "metadata": {"name": name},
               "spec": {"pool": "rail1", "cidr": cidr, "node": "gpu-1",
                        "held": ["172.16.1.1", "172.16.1.2"], "claims": claims}})
    };
    for b in [
        block("rail1.172-16-1-0-28", "172.16.1.0/28", json!({})),
        block(
            "rail1.172-16-1-16-28",
            "172.16.1.16/28",
            json!({"172.16.1.17": {"containerID": "c1", "interface": "net1", "node": "gpu-1",
                                   "podNamespace": "ai", "podName": "trainer-0"}}),
        ),
    ] {
        let (code, body) = api.post(BLOCKS, &b);
        assert_eq!(code, 201, "{body}");
    }
    let out = api.controller().arg("--uninstall").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("deleted 1 NetworkAttachmentDefinition")
            && stdout.contains("1 empty RailBlock"),
        "{stdout}"
    );
    assert!(
        stdout.contains("kept RailBlock rail1.172-16-1-16-28") && stdout.contains("ai/trainer-0"),
        "{stdout}"
    );
    assert_eq!(api.get(&format!("{NADS}/rail1")).0, 404, "the rendered NAD");
    assert_eq!(
        api.get(&format!("{NADS}/by-hand")).0,
        200,
        "a NAD railnet did not make"
    );
    assert_eq!(
        api.get(&format!("{NETS}/rail1")).0,
        200,
        "the user's RailNetwork"
    );
    assert_eq!(api.get(&format!("{BLOCKS}/rail1.172-16-1-0-28")).0, 404);
    assert_eq!(api.get(&format!("{BLOCKS}/rail1.172-16-1-16-28")).0, 200);
}

/// Changes reach the NADs through watches, not the periodic pass: with
/// passes an hour apart, a RailNetwork created after the first pass gets
/// its NAD, a NAD edited by hand is put back, a RailNetwork's spec
/// change (a new MTU) reaches its NAD, and a VF network handed from the
/// device plugin to DRA loses its NAD — each within seconds.
#[test]
fn changes_are_rendered_when_they_happen_not_at_the_next_interval() {
    let api = server();
    let dir = ScratchDir::new("controller-watch");
    let ctl = Controller::start_every(&api, "ctl-w", 9468, &dir, 3600);
    let log = ctl.log.clone();
    let logs = move || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the controller leads", &logs, || {
        let (_, l) = api.get(LEASE);
        (l["spec"]["holderIdentity"] == "ctl-w").then_some(())
    });
    let nad = |name: &str| {
        let (code, body) = api.get(&format!("{NADS}/{name}"));
        (code == 200).then_some(body)
    };
    let spec = json!({"rail": 4, "type": "macvlan", "master": "eno3np4",
                      "ippools": {"ipv4": ["rail4"]}, "mtu": 4200});
    let (code, body) = api.post(NETS, &network("rail4", spec));
    assert_eq!(code, 201, "{body}");
    let rendered = eventually("NAD rail4 rendered", &logs, || nad("rail4"));
    let mut live = rendered.clone();
    live["spec"]["config"] = json!({"cniVersion": "0.3.1", "name": "rail4", "type": "macvlan"})
        .to_string()
        .into();
    let (code, body) = api.put(&format!("{NADS}/rail4"), &live);
    assert_eq!(code, 200, "{body}");
    eventually("the edited NAD put back", &logs, || {
        (nad("rail4")?["spec"]["config"] == rendered["spec"]["config"]).then_some(())
    });
    let (_, mut net) = api.get(&format!("{NETS}/rail4"));
    net["spec"]["mtu"] = 9000.into();
    let (code, body) = api.put(&format!("{NETS}/rail4"), &net);
    assert_eq!(code, 200, "{body}");
    eventually("the new MTU in the NAD", &logs, || {
        let conf: Value = serde_json::from_str(nad("rail4")?["spec"]["config"].as_str()?).ok()?;
        (conf["mtu"] == 9000).then_some(())
    });
    // The device plugin's VFs (resourceName) are named through a NAD;
    // once the network names its PF instead, its VFs are DRA devices and
    // a pod naming the old NAD would get a VF-less ADD.
    let spec = json!({"rail": 5, "type": "sriov", "resourceName": "nvidia.com/rail5",
                      "ippools": {"ipv4": ["rail5"]}});
    let (code, body) = api.post(NETS, &network("rail5", spec));
    assert_eq!(code, 201, "{body}");
    eventually("NAD rail5 rendered", &logs, || nad("rail5"));
    let (_, mut net) = api.get(&format!("{NETS}/rail5"));
    net["spec"].as_object_mut().unwrap().remove("resourceName");
    net["spec"]["master"] = "ens5f0np0".into();
    let (code, body) = api.put(&format!("{NETS}/rail5"), &net);
    assert_eq!(code, 200, "{body}");
    eventually(
        "NAD rail5 deleted, rail5's status DRADevices",
        &logs,
        || {
            let (_, net) = api.get(&format!("{NETS}/rail5"));
            (nad("rail5").is_none() && net["status"]["conditions"][0]["reason"] == "DRADevices")
                .then_some(())
        },
    );
    assert!(nad("rail4").is_some(), "another network's NAD went too");
}
