//! railnet's agents as an operator reaches them: through the API server,
//! found by their labels, a command run in each with `pods/exec` — the
//! API server's authentication and RBAC decide who may (the chart's
//! `<release>-checker` roles), and the agents open no port of their own.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{AttachParams, ListParams},
};
use tokio::io::AsyncReadExt;

/// The agents' pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=railnet,app.kubernetes.io/component=agent";

/// One running agent.
#[derive(Clone, Debug)]
pub struct Agent {
    /// Its node.
    pub node: String,
    /// `namespace/name`, for messages.
    pub pod: String,
    /// Its pod's name.
    pub name: String,
    /// Pods of its namespace.
    pub api: Api<Pod>,
}

/// A tokio runtime for the API calls and the running agents, sorted by
/// node. `who` names the command in messages.
pub fn find(
    namespace: Option<&str>,
    who: &str,
) -> Result<(tokio::runtime::Runtime, Client, Vec<Agent>), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (client, agents) = rt.block_on(async {
        let client = Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes access (KUBECONFIG or in-cluster): {e}"))?;
        let pods: Api<Pod> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let list = pods
            .list(&ListParams::default().labels(AGENT_SELECTOR))
            .await
            .map_err(|e| {
                let hint = if namespace.is_none() {
                    " (pass -n with railnet's namespace: the chart's checker Role is namespaced)"
                } else {
                    " (bind the chart's <release>-checker Role and ClusterRole to yourself)"
                };
                format!("listing railnet's agents ({AGENT_SELECTOR}): {e}{hint}")
            })?;
        let mut agents = Vec::new();
        for pod in list.items {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let (Some(name), Some(ns), Some(node)) = (
                pod.metadata.name.clone(),
                pod.metadata.namespace.clone(),
                pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            ) else {
                continue;
            };
            if !running {
                eprintln!(
                    "{who}: agent {ns}/{name} on {node} is not running: its node is left out"
                );
                continue;
            }
            agents.push(Agent {
                node,
                pod: format!("{ns}/{name}"),
                api: Api::namespaced(client.clone(), &ns),
                name,
            });
        }
        agents.sort_by(|a, b| a.node.cmp(&b.node));
        Ok::<_, String>((client, agents))
    })?;
    if agents.is_empty() {
        return Err(format!("no running railnet agent ({AGENT_SELECTOR})"));
    }
    Ok((rt, client, agents))
}

/// The agent container's exec parameters.
pub fn exec_params(stdin: bool) -> AttachParams {
    AttachParams::default()
        .container("agent")
        .stdin(stdin)
        .stdout(true)
        .stderr(true)
}

impl Agent {
    /// Runs `command` in the agent's container to its end: its stdout, or
    /// its stderr as the error when it printed nothing.
    pub async fn output(&self, command: &[&str]) -> Result<String, String> {
        let mut process = self
            .api
            .exec(&self.name, command.to_vec(), &exec_params(false))
            .await
            .map_err(|e| format!("exec into {}: {e}", self.pod))?;
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = process.stdout() {
            let _ = o.read_to_string(&mut out).await;
        }
        if let Some(mut e) = process.stderr() {
            let _ = e.read_to_string(&mut err).await;
        }
        let _ = process.join().await;
        if out.is_empty() {
            Err(format!("{}: {}", self.pod, err.trim()))
        } else {
            Ok(out)
        }
    }
}
