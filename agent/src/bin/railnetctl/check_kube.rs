//! `railnetctl check` in Kubernetes: the rail networks are the cluster's
//! railnet NADs (the chart's networks, the controller's RailNetworks), and each
//! node's probe runs in that node's agent container through `pods/exec` —
//! the API server's authentication and RBAC decide who may check, and the
//! agents open no port of their own. The caller needs `list` on NADs and
//! on the agents' pods and `create` on their `pods/exec` (the chart's
//! `<release>-checker` ClusterRole and Role).

use crate::agents;
use kube::{
    Api, Client,
    api::{AttachedProcess, ListParams},
    core::DynamicObject,
};
use railnet_agent::{
    controller::nads,
    railcheck::{
        NodeSetup, Plan, Reach, Target,
        run::{Session, read_line, write_line},
    },
};
use tokio::io::{
    AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, SimplexStream, WriteHalf,
};

/// The sessions (one per running agent) and the networks to check.
pub type Prepared = (Vec<Box<dyn Session>>, Vec<serde_json::Value>);

/// Finds the networks and the agents, and readies an exec in each agent.
pub fn sessions(namespace: Option<&str>) -> Result<Prepared, String> {
    let (rt, client, agents) = agents::find(namespace, "railnetctl check")?;
    let networks = rt.block_on(networks(&client))?;
    if networks.is_empty() {
        return Err(
            "no railnet network (NAD of type railnet) in the cluster: nothing to check".into(),
        );
    }
    let handle = rt.handle().clone();
    let sessions = agents
        .into_iter()
        .map(|agent| {
            Box::new(Exec {
                agent,
                handle: handle.clone(),
                open: None,
            }) as Box<dyn Session>
        })
        .collect();
    // The runtime lives as long as the sessions need it.
    std::mem::forget(rt);
    Ok((sessions, networks))
}

/// Every railnet network's CNI config, from the NADs that carry one (the
/// chart's networks and the controller's renderings of RailNetworks).
async fn networks(client: &Client) -> Result<Vec<serde_json::Value>, String> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &nads());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing NetworkAttachmentDefinitions: {e}"))?;
    let mut out: Vec<serde_json::Value> = Vec::new();
    for nad in list.items {
        let text = nad.data["spec"]["config"].as_str().unwrap_or_default();
        let Ok(conf) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        // The DRA network is no rail of its own: its rails are the
        // RailNetworks' (checked through their NADs).
        if conf["type"] == "railnet" && !railnet_agent::netconf::ClaimedConf::is_claimed(&conf) {
            out.push(conf);
        }
    }
    out.sort_by_key(|c| (c["rail"].as_u64(), c["name"].as_str().map(str::to_owned)));
    // The same network in several namespaces is one network to check.
    out.dedup_by(|a, b| a == b);
    Ok(out)
}

/// One agent's probe, over `pods/exec`.
struct Exec {
    agent: agents::Agent,
    handle: tokio::runtime::Handle,
    open: Option<Open>,
}

struct Open {
    process: AttachedProcess,
    stdin: WriteHalf<SimplexStream>,
    stdout: BufReader<ReadHalf<SimplexStream>>,
}

impl Exec {
    fn exchange<T: serde::de::DeserializeOwned>(
        &mut self,
        send: &impl serde::Serialize,
    ) -> Result<T, String> {
        let mut line = Vec::new();
        write_line(&mut line, send)?;
        let Some(open) = self.open.as_mut() else {
            return Err("the exec is not open".into());
        };
        let got = self.handle.block_on(async {
            open.stdin.write_all(&line).await?;
            open.stdin.flush().await?;
            let mut answer = String::new();
            open.stdout.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        });
        match got {
            Ok(answer) if !answer.is_empty() => read_line(&mut answer.as_bytes()),
            Ok(_) => Err(self.stderr()),
            Err(e) => Err(format!("{}: {e}", self.agent.pod)),
        }
    }

    /// What the node's end said before it went away.
    fn stderr(&mut self) -> String {
        let Some(mut err) = self.open.as_mut().and_then(|o| o.process.stderr()) else {
            return format!("{}: the exec ended", self.agent.pod);
        };
        let mut text = String::new();
        let _ = self.handle.block_on(err.read_to_string(&mut text));
        format!("{}: {}", self.agent.pod, text.trim())
    }
}

impl Session for Exec {
    fn node(&self) -> &str {
        &self.agent.node
    }

    fn setup(&mut self, plan: &Plan) -> Result<NodeSetup, String> {
        let params = agents::exec_params(true);
        let mut process = self
            .handle
            .block_on(self.agent.api.exec(
                &self.agent.name,
                ["railnetctl", "check", "node"],
                &params,
            ))
            .map_err(|e| format!("exec into {}: {e}", self.agent.pod))?;
        let (Some(stdin), Some(stdout)) = (process.stdin(), process.stdout()) else {
            return Err(format!("exec into {}: no stdin/stdout", self.agent.pod));
        };
        self.open = Some(Open {
            process,
            stdin,
            stdout: BufReader::new(stdout),
        });
        self.exchange(plan)
    }

    fn reach(&mut self, targets: &[Target]) -> Result<Vec<Reach>, String> {
        self.exchange(&targets)
    }

    fn finish(mut self: Box<Self>) -> Vec<String> {
        let Some(open) = self.open.take() else {
            return Vec::new();
        };
        let Open {
            mut process,
            stdin,
            stdout,
        } = open;
        drop((stdin, stdout));
        let mut err = process.stderr();
        let status = process.take_status();
        let handle = self.handle.clone();
        handle.block_on(async {
            let mut text = String::new();
            if let Some(err) = err.as_mut() {
                let _ = err.read_to_string(&mut text).await;
            }
            let status = match status {
                Some(s) => s.await,
                None => None,
            };
            let _ = process.join().await;
            match status.and_then(|s| s.status) {
                Some(s) if s != "Success" => vec![format!("{}: {}", self.agent.pod, text.trim())],
                _ => Vec::new(),
            }
        })
    }
}
