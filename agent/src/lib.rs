//! railnet's node agent: IPAM, pod interface wiring, the per-pod tc program
//! and the unix socket the CNI binary calls.
//!
//! Where things live: [`rail`] runs a rail's ADD (as steps with their undo)
//! and DEL; [`link`] makes each kind of pod interface; [`ipam`] hands out
//! addresses (a local store, or RailBlocks in the API server);
//! [`dataplane`] loads and attaches the rail program; [`rdma`] and
//! [`sriov`] move RDMA devices and VFs; [`server`] is the CNI socket;
//! [`controller`] and [`webhook`] are the cluster side. The README's
//! layout table says what each may call.

pub use railnet_wire::{api, netconf};
pub mod bpf_object;
pub mod check;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod dcb;
pub mod doctor;
pub mod dra;
pub mod garp;
pub mod host_rules;
pub mod http;
pub mod ipam;
pub mod kube_api;
pub mod link;
pub mod metrics;
pub mod netns;
pub mod node_label;
pub mod podinfo;
pub mod rail;
pub mod railcheck;
pub mod rdma;
pub mod rtnl;
pub mod server;
pub mod spiderpool;
pub mod sriov;
pub mod uninstall;
pub mod webhook;
pub mod webhook_cache;
pub mod webhook_cert;
pub mod webhook_dra;
