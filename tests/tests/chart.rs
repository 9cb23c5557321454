//! The Helm chart, rendered by the real helm for every values file the
//! README documents: helm lint, kubernetes-validate --strict on every
//! object, and what railnet itself must accept: the pools ConfigMap loads
//! in the agent's config parser, every NetworkAttachmentDefinition's config
//! parses as railnet's network config, and the DaemonSet and the NADs agree
//! on the agent's socket.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use railnet_agent::{config::parse_pools, netconf::NetConf};
use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/railnet")
}

fn helm() -> PathBuf {
    std::env::var_os("RAILNET_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/railnet-tools/helm"))
}

/// `helm template` with `args`, as objects; Err is helm's stderr.
fn render(args: &[&str]) -> Result<Vec<Value>, String> {
    let out = Command::new(helm())
        .args(["template", "rn", chart().to_str().unwrap(), "-n", "railnet"])
        .args(args)
        .output()
        .expect("helm (cargo xtask setup installs it)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    railnet_tests::validate_strict(&text);
    let mut objects = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("helm output is YAML");
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// railnet's own part of a NAD's config (the config itself, or its entry
/// in a conflist), with the list's name and version as the runtime passes
/// them.
fn railnet_conf(nad: &Value) -> Value {
    let config: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
    match config.get("plugins") {
        None => config,
        Some(plugins) => {
            let mut ours = plugins
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["type"] == "railnet")
                .expect("railnet in the conflist")
                .clone();
            ours["cniVersion"] = config["cniVersion"].clone();
            ours["name"] = config["name"].clone();
            ours
        }
    }
}

/// Checks what every rendering must satisfy; returns the NADs.
#[track_caller]
fn check(objects: &[Value], deviceid: bool) -> Vec<Value> {
    let ds = of_kind(objects, "DaemonSet");
    assert_eq!(ds.len(), 1, "one agent DaemonSet");
    let agent = &ds[0]["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let socket = args
        .iter()
        .find_map(|a| a.strip_prefix("--socket="))
        .expect("--socket");
    // The CNI calls the socket the node's settings name (railnet install).
    let install = ds[0]["spec"]["template"]["spec"]["initContainers"][0]["command"].to_string();
    assert!(
        install.contains(&format!("\"--socket={socket}\"")),
        "the CNI would call a socket the agent does not serve: {install}"
    );
    let cm = of_kind(objects, "ConfigMap");
    let pools_yaml = cm[0]["data"]["pools.yaml"].as_str().unwrap();
    parse_pools(Path::new("pools.yaml"), pools_yaml)
        .unwrap_or_else(|e| panic!("the agent refuses the chart's pools.yaml: {e}\n{pools_yaml}"));
    let nads: Vec<Value> = of_kind(objects, "NetworkAttachmentDefinition")
        .into_iter()
        .cloned()
        .collect();
    for nad in &nads {
        let mut conf = railnet_conf(nad);
        assert_eq!(
            conf["name"], nad["metadata"]["name"],
            "NAD and network names"
        );
        // The node says where its agent is (railnet install), not the NAD.
        assert!(
            conf.get("agentSocket").is_none() && conf.get("tombstoneDir").is_none(),
            "a NAD names node paths: {conf}"
        );
        if deviceid {
            // Multus adds the VF's PCI address at runtime.
            conf["deviceID"] = "0000:3b:00.2".into();
        }
        NetConf::parse(conf.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("railnet refuses NAD {}: {e}", nad["metadata"]["name"]));
    }
    nads
}

#[test]
fn helm_lint_passes_for_every_documented_values_file() {
    for values in [
        None,
        Some("examples/8-rail-roce.yaml"),
        Some("examples/sriov-exclusive.yaml"),
        Some("examples/kubernetes-ipam.yaml"),
        Some("examples/infiniband.yaml"),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["lint", "--strict", chart().to_str().unwrap()]);
        if let Some(v) = values {
            cmd.arg("-f").arg(chart().join(v));
        }
        let out = cmd.output().expect("helm");
        assert!(
            out.status.success(),
            "helm lint {values:?}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn defaults_install_an_agent_on_every_node_and_no_networks() {
    let objects = render(&["--include-crds"]).unwrap();
    let nads = check(&objects, false);
    assert!(nads.is_empty());
    let crds: Vec<&str> = of_kind(&objects, "CustomResourceDefinition")
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        crds,
        [
            "railblocks.railnet.io",
            "railnetworks.railnet.io",
            "railpools.railnet.io"
        ]
    );
    // Local IPAM: the agent's only business with the API server is its
    // node's RDMA mode label; the controller reads RailNetworks and writes
    // NADs, nothing about addresses.
    let roles: Vec<&Value> = of_kind(&objects, "ClusterRole")
        .into_iter()
        // The uninstall hook's (its own test).
        .filter(|r| r["metadata"]["annotations"]["helm.sh/hook"].is_null())
        .collect();
    assert_eq!(
        roles.len(),
        3,
        "the controller's, the agent's and the checker's"
    );
    // `railnetctl check`'s roles, bound to no one: list NADs anywhere;
    // list and exec into pods only in railnet's own namespace.
    let checker = roles
        .iter()
        .find(|r| {
            r["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-checker")
        })
        .expect("the checker ClusterRole");
    assert_eq!(
        checker["rules"],
        serde_json::json!([{"apiGroups": ["k8s.cni.cncf.io"], "resources": ["network-attachment-definitions"], "verbs": ["list"]}])
    );
    let role = of_kind(&objects, "Role")
        .into_iter()
        .find(|r| {
            r["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-checker")
        })
        .expect("the checker Role");
    assert_eq!(role["metadata"]["namespace"], "railnet");
    assert!(
        of_kind(&objects, "RoleBinding")
            .iter()
            .chain(of_kind(&objects, "ClusterRoleBinding").iter())
            .all(|b| !b["roleRef"]["name"].as_str().unwrap().ends_with("-checker")),
        "the chart binds the checker roles to no one"
    );
    let roles: Vec<&Value> = roles
        .into_iter()
        .filter(|r| {
            !r["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-checker")
        })
        .collect();
    let named = |suffix: &str| {
        *roles
            .iter()
            .find(|r| r["metadata"]["name"].as_str().unwrap().ends_with(suffix))
            .unwrap_or_else(|| panic!("the {suffix} ClusterRole"))
    };
    assert_eq!(
        named("-agent")["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}])
    );
    // …narrowed by the admission policy to its own node's one label (the
    // cluster test shows the refusals).
    let policy = &of_kind(&objects, "ValidatingAdmissionPolicy")[0];
    assert_eq!(
        policy["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:railnet:rn-railnet-agent'"
    );
    assert_eq!(
        of_kind(&objects, "ValidatingAdmissionPolicyBinding")[0]["spec"]["policyName"],
        policy["metadata"]["name"]
    );
    assert_eq!(
        named("-controller")["rules"],
        serde_json::json!([
            {"apiGroups": ["railnet.io"], "resources": ["railnetworks"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["railnet.io"], "resources": ["railnetworks/status"], "verbs": ["patch"]},
            {"apiGroups": ["k8s.cni.cncf.io"], "resources": ["network-attachment-definitions"],
             "verbs": ["get", "list", "watch", "create", "update"]}
        ])
    );
    // The controller: two replicas electing a leader with a Lease in the
    // release namespace (the only place its Role reaches).
    let ctl = &of_kind(&objects, "Deployment")[0]["spec"];
    assert_eq!(ctl["replicas"], 2);
    let env = ctl["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "POD_NAMESPACE"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"),
        "{env:?}"
    );
    let roles = of_kind(&objects, "Role");
    let role = roles
        .iter()
        .find(|r| {
            r["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-controller")
        })
        .expect("the controller's Role");
    assert_eq!(role["rules"][0]["resources"], serde_json::json!(["leases"]));
    // In local mode the agent's only API access: reading its own DaemonSet
    // at exit (the node's share of helm uninstall).
    let agent_role = roles
        .iter()
        .find(|r| r["metadata"]["name"].as_str().unwrap().ends_with("-agent"))
        .expect("the agent's Role");
    assert_eq!(
        agent_role["rules"],
        serde_json::json!([{"apiGroups": ["apps"], "resources": ["daemonsets"],
                            "resourceNames": ["rn-railnet-agent"], "verbs": ["get", "list", "watch"]}])
    );
    let spec = &of_kind(&objects, "DaemonSet")[0]["spec"];
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 0);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert!(
        pod["containers"][0]["args"]
            .to_string()
            .contains("--label-node")
    );
    let off = render(&["--set", "cni.removeOnUninstall=false"]).unwrap();
    let off_pod = &of_kind(&off, "DaemonSet")[0]["spec"]["template"]["spec"];
    assert!(
        !off_pod["containers"][0]["args"]
            .to_string()
            .contains("--remove-cni-on-uninstall")
    );
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    // Not privileged: the capabilities values.yaml explains, railnet's own
    // bpffs directory, the PCI bus writable; /lib/modules not at all.
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!([
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "BPF",
            "PERFMON",
            "NET_RAW"
        ])
    );
    assert!(mounts.iter().any(|m| m["mountPath"] == "/sys/bus/pci"));
    assert!(!mounts.iter().any(|m| m["mountPath"] == "/lib/modules"));
    for path in ["/run/netns", "/var/run/netns", "/host/bpf/railnet"] {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path} not mounted"));
        assert_eq!(m["mountPropagation"], "HostToContainer", "{path}");
    }
}

#[test]
fn kubernetes_ipam_gives_the_agent_railblocks_and_railpools_and_nothing_else() {
    let objects = render(&[
        "-f",
        chart()
            .join("examples/kubernetes-ipam.yaml")
            .to_str()
            .unwrap(),
    ])
    .unwrap();
    assert_eq!(check(&objects, false).len(), 2);
    let roles = of_kind(&objects, "ClusterRole");
    let agent_role = roles
        .iter()
        .find(|r| r["metadata"]["name"].as_str().unwrap().ends_with("-agent"))
        .expect("the agent's ClusterRole");
    assert_eq!(
        agent_role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]},
                           {"apiGroups": ["railnet.io"], "resources": ["railblocks"],
                            "verbs": ["get", "list", "watch", "create", "update", "delete"]},
                           {"apiGroups": ["railnet.io"], "resources": ["railpools"],
                            "verbs": ["list"]}])
    );
    let named_agent = |kind: &str| {
        of_kind(&objects, kind)
            .into_iter()
            .find(|o| o["metadata"]["name"].as_str().unwrap().ends_with("-agent"))
            .unwrap_or_else(|| panic!("the agent's {kind}"))
            .clone()
    };
    let (binding, sa) = (
        named_agent("ClusterRoleBinding"),
        named_agent("ServiceAccount"),
    );
    let pod = &of_kind(&objects, "DaemonSet")[0]["spec"]["template"]["spec"];
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], true);
    let args = pod["containers"][0]["args"].as_array().unwrap();
    assert!(args.contains(&"--ipam-store=kubernetes".into()), "{args:?}");
    // The controller sweeps claims of deleted pods: it lists pods and
    // updates blocks.
    let ctl_role = roles
        .iter()
        .find(|r| {
            r["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-controller")
        })
        .unwrap()["rules"]
        .to_string();
    assert!(
        ctl_role.contains(r#""resources":["pods","nodes"],"verbs":["list"]"#),
        "{ctl_role}"
    );
    let ctl =
        of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            .to_string();
    assert!(ctl.contains("--claim-grace-seconds=300"), "{ctl}");
    assert!(args.contains(&"--block-prefix-v4=28".into()), "{args:?}");
}

#[test]
fn eight_rail_roce_example_renders_eight_networks_railnet_accepts() {
    let objects = render(&[
        "-f",
        chart().join("examples/8-rail-roce.yaml").to_str().unwrap(),
    ])
    .unwrap();
    let nads = check(&objects, false);
    assert_eq!(nads.len(), 8);
    for (k, nad) in nads.iter().enumerate() {
        let conf = railnet_conf(nad);
        assert_eq!(conf["rail"], k as u64 + 1);
        assert_eq!(conf["mode"], "macvlan");
        assert_eq!(conf["capabilities"]["CNIDeviceInfoFile"], true);
        assert_eq!(nad["metadata"]["namespace"], "railnet");
    }
    let cm = of_kind(&objects, "ConfigMap");
    let pools = parse_pools(
        Path::new("pools.yaml"),
        cm[0]["data"]["pools.yaml"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(pools.len(), 16, "8 rails x 2 nodes");
}

#[test]
fn sriov_example_chains_after_sriov_and_names_the_resource() {
    let objects = render(&[
        "-f",
        chart()
            .join("examples/sriov-exclusive.yaml")
            .to_str()
            .unwrap(),
    ])
    .unwrap();
    let nads = check(&objects, true);
    assert_eq!(nads.len(), 2);
    for nad in &nads {
        assert!(
            nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
                .as_str()
                .is_some_and(|r| r.starts_with("spidernet.io/")),
            "{nad}"
        );
        let config: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
        assert_eq!(config["plugins"][0]["type"], "sriov");
        assert_eq!(config["plugins"][1]["mode"], "chained");
        assert_eq!(config["plugins"][1]["rdmaIsolation"], true);
    }
    let pod = &of_kind(&objects, "DaemonSet")[0]["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
}

/// The InfiniBand example: ib-sriov networks railnet accepts, each with
/// its device plugin resource, isolation, and ib-sriov-cni's keys; with a
/// GUID from the pod (the infinibandGUID capability) the VF settings are
/// the link state and the GUID.
#[test]
fn infiniband_example_renders_ib_sriov_networks_railnet_accepts() {
    let objects = render(&[
        "-f",
        chart().join("examples/infiniband.yaml").to_str().unwrap(),
    ])
    .unwrap();
    let nads = check(&objects, true);
    assert_eq!(nads.len(), 2);
    for nad in &nads {
        assert!(
            nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
                .as_str()
                .is_some_and(|r| r.starts_with("spidernet.io/gpu")),
            "{nad}"
        );
        let mut conf = railnet_conf(nad);
        assert_eq!(conf["mode"], "ib-sriov");
        assert_eq!(conf["pkey"], "0x8001");
        assert_eq!(conf["link_state"], "enable");
        assert_eq!(conf["rdmaIsolation"], true);
        assert_eq!(
            conf["capabilities"]["infinibandGUID"], true,
            "Multus passes no GUID without it"
        );
        assert_eq!(conf["capabilities"]["CNIDeviceInfoFile"], true);
        conf["deviceID"] = "0000:3b:00.2".into();
        conf["runtimeConfig"] = serde_json::json!({"infinibandGUID": "00:11:22:33:44:55:66:77"});
        let parsed = NetConf::parse(conf.to_string().as_bytes()).unwrap();
        let set = parsed.vf_settings().unwrap();
        assert_eq!(set.node_guid, Some(0x0011_2233_4455_6677));
        assert_eq!(
            set.link_state,
            Some(railnet_agent::netconf::VfLinkMode::Enable)
        );
    }
}

#[test]
fn a_moved_socket_or_state_dir_reaches_the_node_s_cni_settings() {
    let objects = render(&[
        "-f",
        chart().join("examples/8-rail-roce.yaml").to_str().unwrap(),
        "--set",
        "agent.socketDir=/run/railnet-b",
        "--set",
        "agent.stateDir=/var/lib/railnet-b",
    ])
    .unwrap();
    check(&objects, false);
    let pod = &of_kind(&objects, "DaemonSet")[0]["spec"]["template"]["spec"];
    let install = pod["initContainers"][0]["command"].to_string();
    assert!(
        install.contains("--socket=/run/railnet-b/agent.sock")
            && install.contains("--tombstones=/var/lib/railnet-b/tombstones"),
        "{install}"
    );
    let agent = pod["containers"][0]["args"].to_string();
    assert!(
        agent.contains("--socket=/run/railnet-b/agent.sock")
            && agent.contains("--tombstones=/var/lib/railnet-b/tombstones"),
        "{agent}"
    );
}

#[test]
fn bad_values_are_refused_naming_the_key() {
    let err = render(&[
        "--set",
        "networks[0].name=rail1",
        "--set",
        "networks[0].rail=0",
        "--set",
        "networks[0].ippools.ipv4[0]=p",
    ])
    .unwrap_err();
    assert!(err.contains("rail"), "{err}");
    let err = render(&[
        "--set",
        "networks[0].name=rail1",
        "--set",
        "networks[0].rail=1",
        "--set",
        "networks[0].ippools.ipv4[0]=p",
        "--set",
        "networks[0].mode=bridge",
    ])
    .unwrap_err();
    assert!(err.contains("mode"), "{err}");
    let err = render(&["--set", "agent.metricsPort=70000"]).unwrap_err();
    assert!(err.contains("metricsPort"), "{err}");
    let err = render(&["--set", "ipam.store=etcd"]).unwrap_err();
    assert!(err.contains("store"), "{err}");
}

#[test]
fn the_webhook_is_served_by_the_controller_under_a_certificate_it_owns() {
    let objects = render(&[
        "--set",
        "controller.webhook.enabled=true",
        "--set",
        "controller.webhook.namespacesInclude={ai,training}",
    ])
    .unwrap();
    let hook = &of_kind(&objects, "MutatingWebhookConfiguration")[0]["webhooks"][0];
    let svc = &of_kind(&objects, "Service")[0];
    let ctl = &of_kind(&objects, "Deployment")[0]["spec"]["template"];
    // The API server reaches the Service, the Service the controller's
    // port; the controller makes and serves the certificate (the cluster
    // test shows it through helm upgrade): Helm renders none, so an upgrade
    // or `helm template` cannot rotate it.
    assert_eq!(
        hook["clientConfig"]["service"]["name"],
        svc["metadata"]["name"]
    );
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate-pods");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&ctl["metadata"]["labels"][k], v, "Service selector {k}");
    }
    let container = &ctl["spec"]["containers"][0];
    let target = &svc["spec"]["ports"][0]["targetPort"];
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| &p["name"] == target)
        .unwrap_or_else(|| panic!("the Service targets port {target}, which the controller lacks"));
    assert_eq!(port["containerPort"], 9443);
    assert!(
        of_kind(&objects, "Secret").is_empty(),
        "Helm renders no certificate"
    );
    assert!(hook["clientConfig"].get("caBundle").is_none());
    let args = container["args"].to_string();
    assert!(args.contains("--webhook-address=0.0.0.0:9443"), "{args}");
    let name = svc["metadata"]["name"].as_str().unwrap();
    assert!(
        args.contains(&format!("--webhook-service={name}")),
        "{args}"
    );
    assert!(
        args.contains(&format!("--webhook-secret={name}-webhook-tls")),
        "{args}"
    );
    // Pods get their rail info from where the agents write it: `pods/` in
    // the node directory the DaemonSet mounts for the agent's socket.
    let ds = &of_kind(&objects, "DaemonSet")[0]["spec"]["template"]["spec"];
    let socket_dir = ds["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "socket-dir")
        .map(|v| {
            v["hostPath"]["path"]
                .as_str()
                .unwrap()
                .trim_end_matches('/')
                .to_owned()
        })
        .expect("the agent's socket-dir volume");
    assert!(
        args.contains(&format!("--rail-info-dir={socket_dir}/pods")),
        "{args}"
    );
    let off = render(&[
        "--set",
        "controller.webhook.enabled=true",
        "--set",
        "controller.webhook.railInfo=false",
    ])
    .unwrap();
    let off_args =
        of_kind(&off, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            .to_string();
    assert!(!off_args.contains("--rail-info-dir"), "{off_args}");
    // Its own namespace is never subject to it; include lists pass through.
    let exprs = hook["namespaceSelector"]["matchExpressions"].to_string();
    assert!(
        exprs.contains(r#""NotIn","values":["railnet","kube-system"]"#),
        "{exprs}"
    );
    assert!(
        exprs.contains(r#""In","values":["ai","training"]"#),
        "{exprs}"
    );
    // It may read namespaces (their inject annotation), nothing more.
    let role = of_kind(&objects, "ClusterRole")
        .into_iter()
        .find(|r| {
            r["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-controller")
        })
        .expect("the controller's ClusterRole");
    assert!(role["rules"].to_string().contains("namespaces"));
}

#[test]
fn helm_uninstall_first_runs_the_cleanup_job_with_only_what_it_deletes() {
    let objects = render(&[]).unwrap();
    let hook = |o: &Value| {
        (
            o["metadata"]["annotations"]["helm.sh/hook"].clone(),
            o["metadata"]["annotations"]["helm.sh/hook-weight"]
                .as_str()
                .and_then(|w| w.parse::<i32>().ok()),
        )
    };
    let cleanup = |kind: &str| {
        of_kind(&objects, kind)
            .into_iter()
            .find(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .ends_with("-cleanup")
            })
            .unwrap_or_else(|| panic!("the cleanup {kind}"))
            .clone()
    };
    let job = cleanup("Job");
    let (sa, role, binding) = (
        cleanup("ServiceAccount"),
        cleanup("ClusterRole"),
        cleanup("ClusterRoleBinding"),
    );
    assert_eq!(hook(&job), ("pre-delete".into(), Some(0)));
    // Its account and rights exist before it runs (lower weight).
    for o in [&sa, &role, &binding] {
        assert_eq!(hook(o), ("pre-delete".into(), Some(-5)), "{o}");
    }
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        pod["containers"][0]["command"],
        serde_json::json!([
            "/usr/local/bin/railnet-controller",
            "--uninstall",
            "--stop-deployment=rn-railnet-controller",
            "--mark-daemonset=rn-railnet-agent"
        ])
    );
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": ["k8s.cni.cncf.io"], "resources": ["network-attachment-definitions"],
                            "verbs": ["list", "delete"]},
                           {"apiGroups": ["railnet.io"], "resources": ["railblocks"],
                            "verbs": ["list", "delete"]}])
    );
    let off = render(&["--set", "cleanup.enabled=false"]).unwrap();
    assert!(of_kind(&off, "Job").is_empty());
}

/// The values schema's pools are the agent's pools file: every field the
/// schema offers is one the agent reads, and the agent's every field is in
/// the schema, which refuses the rest as the agent does. (The schema once
/// said `disabled` where the agent reads `disable`: a user following it
/// crash-looped every agent.)
#[test]
fn the_schema_offers_exactly_the_pool_fields_the_agent_reads() {
    use railnet_agent::{
        config::field_names,
        ipam::{PoolSpec, RouteSpec},
    };
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let pool = &schema["properties"]["pools"]["items"];
    for (what, object, fields) in [
        ("pools[]", pool, field_names::<PoolSpec>()),
        (
            "pools[].routes[]",
            &pool["properties"]["routes"]["items"],
            field_names::<RouteSpec>(),
        ),
    ] {
        let mut offered: Vec<&str> = object["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{what} has no properties in the schema"))
            .keys()
            .map(String::as_str)
            .collect();
        let mut read = fields.to_vec();
        offered.sort_unstable();
        read.sort_unstable();
        assert_eq!(offered, read, "{what}: the schema's fields vs the agent's");
        assert_eq!(
            object["additionalProperties"], false,
            "{what}: the agent refuses unknown fields, the schema must too"
        );
    }
    // And a pool using every field renders and is accepted by the agent.
    let objects = render(&[
        "--set-json",
        r#"pools=[{"name":"p","subnet":"172.16.1.0/24","ips":["172.16.1.10-172.16.1.20"],"excludeIPs":["172.16.1.11"],"gateway":"172.16.1.1","routes":[{"to":"172.17.0.0/16","via":"172.16.1.1"}],"nodeName":["n"],"namespace":["ai"],"networks":["rail1"],"disable":true,"ipVersion":"ipv4"}]"#,
    ])
    .unwrap();
    let cm = of_kind(&objects, "ConfigMap")
        .into_iter()
        .find(|c| c["data"]["pools.yaml"].is_string())
        .expect("the pools ConfigMap");
    parse_pools(
        std::path::Path::new("pools.yaml"),
        cm["data"]["pools.yaml"].as_str().unwrap(),
    )
    .unwrap_or_else(|e| panic!("the agent refuses the schema's pool: {e:?}"));
    // The schema refuses the old spelling.
    assert!(
        render(&[
            "--set-json",
            r#"pools=[{"name":"p","subnet":"172.16.1.0/24","disabled":true}]"#
        ])
        .is_err()
    );
}

/// With the default local store each node allocates on its own: a pool
/// shared by nodes would hand the same address to pods on two nodes. The
/// chart refuses it naming the pool and both ways out, and tells the agent
/// to refuse it too (a pools file edited by hand).
#[test]
fn a_local_store_pool_shared_by_nodes_is_refused() {
    for pool in [
        r#"pools=[{"name":"rail1","subnet":"172.16.1.0/24"}]"#,
        r#"pools=[{"name":"rail1","subnet":"172.16.1.0/24","nodeName":["a","b"]}]"#,
    ] {
        let err = render(&["--set-json", pool]).unwrap_err();
        assert!(
            err.contains("pools[0] (rail1) is not pinned to one node")
                && err.contains("nodeName: [<node>]")
                && err.contains("ipam.store: kubernetes"),
            "{err}"
        );
        render(&["--set-json", pool, "--set", "ipam.store=kubernetes"])
            .unwrap_or_else(|e| panic!("a shared pool with the kubernetes store: {e}"));
    }
    let objects = render(&[]).unwrap();
    let args =
        of_kind(&objects, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            .to_string();
    assert!(args.contains("--require-pinned-pools"), "{args}");
}

/// agent.allowedMasters reaches the agent as one flag; unset, no flag (any
/// master).
#[test]
fn allowed_masters_reach_the_agent() {
    let args = |objects: &[Value]| {
        of_kind(objects, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            .to_string()
    };
    let set = render(&["--set", "agent.allowedMasters={eno*np1,ib*}"]).unwrap();
    assert!(
        args(&set).contains("\"--allowed-masters=eno*np1,ib*\""),
        "{}",
        args(&set)
    );
    assert!(!args(&render(&[]).unwrap()).contains("--allowed-masters"));
}

/// The chart's README (`helm show readme`) lists every value: each key of
/// `values.yaml` down to where the schema stops describing fields (a map
/// the schema takes whole, like `resources`, is one row), with the default
/// `values.yaml` gives it and a sentence. A key added to `values.yaml`
/// without a row or a schema entry, a schema field `values.yaml` lacks, a
/// row for a key that is gone, or a default that changed on one side
/// fails here, naming it.
#[test]
fn the_chart_readme_lists_every_value_with_its_default() {
    let read = |name: &str| std::fs::read_to_string(chart().join(name)).unwrap();
    let values: Value = serde_norway::from_str(&read("values.yaml")).unwrap();
    let schema: Value = serde_json::from_str(&read("values.schema.json")).unwrap();
    let readme = read("README.md");

    fn leaves(
        value: &Value,
        schema: &Value,
        path: &str,
        out: &mut Vec<(String, Value)>,
        drift: &mut Vec<String>,
    ) {
        let (Some(map), Some(fields)) = (value.as_object(), schema["properties"].as_object())
        else {
            out.push((path.to_owned(), value.clone()));
            return;
        };
        let join = |k: &str| {
            if path.is_empty() {
                k.to_owned()
            } else {
                format!("{path}.{k}")
            }
        };
        for (k, v) in map {
            match fields.get(k) {
                Some(s) => leaves(v, s, &join(k), out, drift),
                None => {
                    drift.push(format!(
                        "{} is in values.yaml, not in values.schema.json",
                        join(k)
                    ));
                    out.push((join(k), v.clone()));
                }
            }
        }
        for k in fields.keys().filter(|k| !map.contains_key(*k)) {
            drift.push(format!(
                "{} is in values.schema.json, not in values.yaml (give it its default there)",
                join(k)
            ));
        }
    }
    let mut keys = Vec::new();
    let mut drift = Vec::new();
    leaves(&values, &schema, "", &mut keys, &mut drift);

    // Rows under "## Values": | `key` | `default` | sentence |
    let table = readme
        .split_once("\n## Values\n")
        .expect("the README has a \"## Values\" section")
        .1;
    let mut rows = std::collections::BTreeMap::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        let [key, default, what] = cells[..] else {
            drift.push(format!(
                "README row {line:?}: not `| key | default | what |`"
            ));
            continue;
        };
        let key = key.trim_matches('`');
        if what.is_empty() {
            drift.push(format!("README row {key}: says nothing about it"));
        }
        let default: Value = serde_norway::from_str(default.trim_matches('`'))
            .unwrap_or_else(|e| panic!("README row {key}: default {default} is not YAML: {e}"));
        if rows.insert(key.to_owned(), default).is_some() {
            drift.push(format!("README lists {key} twice"));
        }
    }
    assert!(rows.len() > 10, "the README's values table is missing");
    for (key, default) in &keys {
        match rows.remove(key) {
            None => drift.push(format!(
                "{key} is in values.yaml but not in the README's table"
            )),
            Some(d) if &d != default => drift.push(format!(
                "{key}: the README says the default is {d}, values.yaml {default}"
            )),
            Some(_) => {}
        }
    }
    for key in rows.keys() {
        drift.push(format!(
            "the README lists {key}, which values.yaml does not have"
        ));
    }
    assert!(
        drift.is_empty(),
        "the chart's README, values.yaml and values.schema.json disagree:\n{}",
        drift.join("\n")
    );

    // It is what `helm show readme` prints.
    let out = Command::new(helm())
        .args(["show", "readme", chart().to_str().unwrap()])
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), readme.trim());
}

/// `dra.enabled`: the DeviceClasses claims name, the one DRA network the
/// CNI takes for one (never for a rail network), and the agent's DRA
/// rights: status only through the associated-node verbs of driver
/// railnet.io, slices only its own node's (the admission policy); none of
/// it without the value.
#[test]
fn dra_installs_device_classes_the_dra_network_and_node_scoped_rights() {
    let objects = render(&["--set", "dra.enabled=true"]).unwrap();
    let classes: Vec<&str> = of_kind(&objects, "DeviceClass")
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        classes,
        [
            "rail.railnet.io",
            "macvlan.railnet.io",
            "ipvlan.railnet.io",
            "ipoib.railnet.io",
            "sriov.railnet.io",
            "ib-sriov.railnet.io"
        ]
    );
    let nad = of_kind(&objects, "NetworkAttachmentDefinition")
        .into_iter()
        .find(|n| n["metadata"]["name"] == "railnet-dra")
        .expect("the DRA network");
    let config = nad["spec"]["config"].as_str().unwrap();
    let claimed = railnet_agent::netconf::ClaimedConf::detect(config.as_bytes())
        .expect("the CNI takes it for the DRA network")
        .expect("and accepts it");
    assert_eq!(claimed.name, "railnet-dra");
    let role = of_kind(&objects, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "rn-railnet-agent-dra")
        .expect("the agent's DRA ClusterRole");
    let driver_rule = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == serde_json::json!(["resourceclaims/driver"]))
        .expect("the network status rule");
    assert_eq!(
        driver_rule["resourceNames"],
        serde_json::json!(["railnet.io"])
    );
    assert_eq!(
        driver_rule["verbs"],
        serde_json::json!(["associated-node:patch", "associated-node:update"])
    );
    let policy = of_kind(&objects, "ValidatingAdmissionPolicy")
        .into_iter()
        .find(|p| p["metadata"]["name"] == "rn-railnet-agent-own-slices")
        .expect("the own-slices policy");
    assert!(
        policy["spec"]["validations"][0]["expression"]
            .as_str()
            .unwrap()
            .contains("spec.nodeName"),
        "{policy}"
    );
    let pod = &of_kind(&objects, "DaemonSet")[0]["spec"]["template"]["spec"];
    let args = pod["containers"][0]["args"].to_string();
    assert!(args.contains("\"--dra\""), "{args}");
    assert!(args.contains("--dra-shared-namespace=railnet"), "{args}");
    // CDI specs of claimed VFs' RDMA devices, where the runtime reads them.
    assert!(args.contains("--dra-cdi-dir=/var/run/cdi"), "{args}");
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hostPath"]["path"] == "/var/run/cdi"),
        "{pod}"
    );
    // The uninstall's cleanup deletes the agents' slices (they cannot).
    let job = of_kind(&objects, "Job")
        .into_iter()
        .find(|j| j["metadata"]["name"] == "rn-railnet-cleanup")
        .expect("the cleanup Job");
    let command = job["spec"]["template"]["spec"]["containers"][0]["command"].to_string();
    assert!(
        command.contains("--delete-slices-of=railnet.io"),
        "{command}"
    );
    let cleanup = of_kind(&objects, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "rn-railnet-cleanup")
        .expect("the cleanup ClusterRole");
    assert!(
        cleanup["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"] == serde_json::json!(["resourceslices"])
                && r["verbs"] == serde_json::json!(["list", "delete"])),
        "{cleanup}"
    );
    // The webhook knows the DRA network (a pod naming it keeps it).
    let with_webhook = render(&[
        "--set",
        "dra.enabled=true",
        "--set",
        "controller.webhook.enabled=true",
    ])
    .unwrap();
    let controller = of_kind(&with_webhook, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "rn-railnet-controller")
        .expect("the controller");
    let args = controller["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--dra-network=railnet/railnet-dra"), "{args}");

    let off = render(&[]).unwrap();
    assert!(of_kind(&off, "DeviceClass").is_empty());
    assert!(
        !serde_json::to_string(&off)
            .unwrap()
            .contains("resourceslices"),
        "DRA rights without dra.enabled"
    );
}
