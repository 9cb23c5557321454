//! How a node's store talks to the API server.

use std::time::Duration;

use kube::Client;

/// How the store talks to the API server.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// This node's name: blocks it claims carry it.
    pub node: String,
    /// A kubeconfig file; `None` infers (KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Prefix length of IPv4 blocks (28: 16 addresses).
    pub block_prefix_v4: u8,
    /// Prefix length of IPv6 blocks (122: 64 addresses).
    pub block_prefix_v6: u8,
    /// How long connecting and sending a request may take: an unreachable
    /// server fails calls within it (5 s).
    pub timeout: Duration,
    /// How long a sent request may wait for its answer (15 s): as long as
    /// kube-apiserver's API Priority and Fairness may queue it before
    /// refusing it with 429 (a quarter of its 60 s request timeout). A
    /// client that gives up sooner turns a busy server's queue into a
    /// failed ADD that kubelet retries 10 s later with a DEL and a new
    /// ADD: at a job launch on 500 nodes, 5 s sent 197 of 4 000 pods back
    /// and took 80 s; 15 s, 27 pods and 44 s (`cargo xtask bench
    /// kube-scale`).
    pub answer_timeout: Duration,
    /// How often claims made from held addresses are written (200 ms).
    pub flush_interval: Duration,
    /// How long an ADD waits for another node to lend a held address
    /// before saying the pool is exhausted (10 s: at a job launch on 100
    /// nodes with pools exactly the job's size, 3 s sent borrowers back
    /// to kubelet, whose retry comes 10 s later and costs a DEL and an ADD).
    pub lend_wait: Duration,
    /// How long a block of ours stays empty before it is deleted, giving
    /// its range back (10 s: pods come and go without block churn).
    pub empty_block_grace: Duration,
    /// Wraps the client that reads and writes blocks (not the watch's):
    /// the seam where fault-injection tests lose a write's answer. `None`
    /// in the agent.
    pub intercept: Option<fn(Client) -> Client>,
}

impl ClusterOptions {
    /// Defaults for `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            kubeconfig: None,
            block_prefix_v4: 28,
            block_prefix_v6: 122,
            timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(15),
            flush_interval: Duration::from_millis(200),
            lend_wait: Duration::from_secs(10),
            empty_block_grace: Duration::from_secs(10),
            intercept: None,
        }
    }
}
