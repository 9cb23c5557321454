//! What crosses between railnet's CNI plugin and its node agent.
//!
//! The CNI binary (run by Multus for every rail of every pod) parses its
//! stdin and environment with these types and sends them over the agent's
//! socket; the agent reads the same types back. Nothing here touches the
//! node: no netlink, no Kubernetes, no BPF.

pub mod api;
pub mod mac;
pub mod netconf;
pub mod netns;
