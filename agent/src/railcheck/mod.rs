//! `railnetctl check`: is every rail cabled, reachable and at full MTU, on
//! every node?
//!
//! Each node runs a [`probe::Probe`]: a throwaway network namespace that
//! gets one interface per rail network **through the node's agent, exactly
//! as a pod does** (CNI ADD over the agent's socket: the pool's address,
//! the routes, the tc program), so what is checked is what a pod would get.
//! The probe first looks at its own rails (carrier, the gateway answering,
//! and when it does not, which other rail's gateway answers on that link —
//! a NIC cabled to the wrong rail switch); the coordinator then hands every
//! probe its targets (every other node's address on the same rail, at the
//! rail's full MTU with DF set, and one other rail's gateway across the
//! spine), and [`matrix`] turns the answers into a verdict per node and
//! rail. The probe's interfaces and addresses are given back with CNI DEL.
//!
//! A probe speaks JSON lines ([`Plan`] in, [`NodeSetup`] out, targets in,
//! reaches out), so the coordinator drives it in-process on one box and
//! through `pods/exec` into the agents in Kubernetes, with the same code.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub mod matrix;
pub mod ping;
pub mod probe;
pub mod run;

/// The container ID the probe's attachments are made under; a check that
/// died half-way is cleaned up by the next one (DEL is idempotent).
pub const CONTAINER_ID: &str = "railnet-check";
/// Bytes of an echo that only asks "is anyone there", not "at full MTU".
pub const SMALL: u32 = 64;

/// What a node's probe is asked to set up.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Plan {
    /// The node's name, as the matrix shows it.
    pub node: String,
    /// The rail networks' CNI configs (a NAD's `spec.config`).
    pub networks: Vec<serde_json::Value>,
}

/// A node's rails as its probe found them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct NodeSetup {
    /// The node.
    pub node: String,
    /// One per network of the plan, in its order.
    pub rails: Vec<RailSetup>,
}

/// One rail network on one node.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RailSetup {
    /// The network's name.
    pub network: String,
    /// Its rail number.
    pub rail: u32,
    /// The node's rail NIC.
    pub master: String,
    /// What the probe found.
    pub state: RailState,
}

/// How a probe's rail came out.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RailState {
    /// The agent wired it; these are the probe's findings on its own link.
    Ready {
        /// The probe's IPv4 address on the rail.
        address: Ipv4Addr,
        /// The rail's gateway, if its pool has one.
        gateway: Option<Ipv4Addr>,
        /// The interface's MTU (the rail's).
        mtu: u32,
        /// Whether the link has carrier.
        carrier: bool,
        /// Whether the gateway answered a small echo.
        gateway_answers: bool,
        /// When it did not: the other networks (by name) whose gateway
        /// answers ARP on this link.
        gateways_on_link: Vec<String>,
    },
    /// The agent refused the ADD: its error.
    Failed {
        /// The agent's error, as it said it.
        reason: String,
    },
    /// Not probed, and why (e.g. an SR-IOV rail: its VFs are the device
    /// plugin's to hand out).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One echo a probe is asked to send.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Target {
    /// From the probe's address on this network (by index in the plan).
    pub from: usize,
    /// To this address.
    pub to: Ipv4Addr,
    /// Of this many bytes (IP header included), DF set.
    pub size: u32,
}

/// What an echo of a target found.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "reach", rename_all = "snake_case")]
pub enum Reach {
    /// It answered at full size.
    Answered,
    /// Nothing answers, at any size.
    Silent,
    /// Small echoes answer, full-size ones are lost: an MTU below the
    /// rail's somewhere on the path that drops rather than says so.
    SmallOnly,
    /// A router said the packet was too big.
    PathMtu {
        /// The path MTU it reported.
        mtu: u32,
    },
    /// The probe could not send (its error is the node's to read).
    Error,
}
