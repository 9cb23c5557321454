//! Driving every node's probe through the check's two rounds, whatever
//! carries the conversation: in-process on one box, `pods/exec` in
//! Kubernetes, stdin/stdout on the node's end of an exec.

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
};

use super::{
    NodeSetup, Plan, Reach, Target,
    matrix::{self, Matrix, Towards},
    probe::Probe,
};

/// One node's probe, as the coordinator talks to it. Each call blocks.
pub trait Session: Send {
    /// The node's name.
    fn node(&self) -> &str;
    /// Round one: wire the probe, look at its own rails.
    fn setup(&mut self, plan: &Plan) -> Result<NodeSetup, String>;
    /// Round two: the echoes, in order.
    fn reach(&mut self, targets: &[Target]) -> Result<Vec<Reach>, String>;
    /// Give everything back; what could not be.
    fn finish(self: Box<Self>) -> Vec<String>;
}

/// A probe in this process, for an agent reachable at `socket` (one box,
/// or a netns fabric's nodes).
#[derive(Debug)]
pub struct Local {
    node: String,
    socket: PathBuf,
    probe: Option<Probe>,
}

impl Local {
    /// Node `node`, whose agent listens on `socket`.
    pub fn new(node: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            socket: socket.into(),
            probe: None,
        }
    }
}

impl Session for Local {
    fn node(&self) -> &str {
        &self.node
    }

    fn setup(&mut self, plan: &Plan) -> Result<NodeSetup, String> {
        let (probe, setup) = Probe::start(plan, &self.socket)?;
        self.probe = Some(probe);
        Ok(setup)
    }

    fn reach(&mut self, targets: &[Target]) -> Result<Vec<Reach>, String> {
        match &self.probe {
            Some(p) => p.reach(targets),
            None => Err("the probe was not set up".into()),
        }
    }

    fn finish(self: Box<Self>) -> Vec<String> {
        self.probe.map(Probe::finish).unwrap_or_default()
    }
}

/// Runs the check over `sessions` for the rail networks `networks` (CNI
/// configs), every node at once in each round. A node whose session
/// breaks is reported with every rail failed, never dropped.
pub fn check(sessions: Vec<Box<dyn Session>>, networks: &[serde_json::Value]) -> Matrix {
    let mut sessions = sessions;
    let setups: Vec<NodeSetup> = std::thread::scope(|s| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .map(|session| {
                s.spawn(move || {
                    let plan = Plan {
                        node: session.node().to_owned(),
                        networks: networks.to_vec(),
                    };
                    session.setup(&plan).unwrap_or_else(|e| broken(&plan, &e))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a probe session panicked"))
            .collect()
    });
    let planned: Vec<Vec<(Target, Towards)>> = (0..setups.len())
        .map(|n| matrix::targets(&setups, n))
        .collect();
    let reaches: Vec<Vec<(Target, Towards, Reach)>> = std::thread::scope(|s| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .zip(&planned)
            .map(|(session, list)| {
                s.spawn(move || {
                    let targets: Vec<Target> = list.iter().map(|(t, _)| t.clone()).collect();
                    let found = session
                        .reach(&targets)
                        .unwrap_or_else(|_| vec![Reach::Error; targets.len()]);
                    list.iter()
                        .zip(found.into_iter().chain(std::iter::repeat(Reach::Error)))
                        .map(|((t, to), r)| (t.clone(), *to, r))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a probe session panicked"))
            .collect()
    });
    std::thread::scope(|s| {
        for session in sessions {
            s.spawn(move || {
                let node = session.node().to_owned();
                for e in session.finish() {
                    tracing::warn!(node, "railnet check left something behind: {e}");
                }
            });
        }
    });
    matrix::verdict(&setups, &reaches)
}

/// A node whose probe could not even start: every rail failed with why.
fn broken(plan: &Plan, why: &str) -> NodeSetup {
    NodeSetup {
        node: plan.node.clone(),
        rails: plan
            .networks
            .iter()
            .map(|n| super::RailSetup {
                network: n["name"].as_str().unwrap_or_default().to_owned(),
                rail: n["rail"].as_u64().unwrap_or(0) as u32,
                master: n["master"].as_str().unwrap_or_default().to_owned(),
                state: super::RailState::Failed {
                    reason: why.to_owned(),
                },
            })
            .collect(),
    }
}

/// The node's end of a remote session (`railnetctl check node`, run by
/// `pods/exec` in the agent's container): one JSON line in per round, one
/// out, then everything given back.
pub fn serve(
    socket: &Path,
    input: &mut impl BufRead,
    output: &mut impl Write,
) -> Result<(), String> {
    let plan: Plan = read_line(input)?;
    let (probe, setup) = Probe::start(&plan, socket)?;
    write_line(output, &setup)?;
    let targets: Vec<Target> = read_line(input)?;
    let reaches = probe.reach(&targets)?;
    write_line(output, &reaches)?;
    let left = probe.finish();
    if left.is_empty() {
        Ok(())
    } else {
        Err(left.join("; "))
    }
}

/// One JSON line.
pub fn read_line<T: serde::de::DeserializeOwned>(input: &mut impl BufRead) -> Result<T, String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| format!("reading the check's request: {e}"))?;
    if line.is_empty() {
        return Err("the check's coordinator went away".into());
    }
    serde_json::from_str(&line).map_err(|e| format!("a malformed check request: {e}"))
}

/// One JSON line, flushed.
pub fn write_line(output: &mut impl Write, value: &impl serde::Serialize) -> Result<(), String> {
    let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    line.push(b'\n');
    output
        .write_all(&line)
        .and_then(|()| output.flush())
        .map_err(|e| format!("writing the check's answer: {e}"))
}
