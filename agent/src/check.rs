//! CNI CHECK: a pod's rail interface compared with what ADD reported
//! (`prevResult`, as the CNI spec asks) and with what the agent holds for
//! it. Reading the pod's netns is the caller's; this is the comparison,
//! so every way a pod can drift is tested without root.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::api::{ApiError, code};

/// What the pod's netns shows of the interface.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Administratively up.
    pub up: bool,
    /// Its MAC, `aa:bb:…`.
    pub mac: String,
    /// Its addresses with their prefixes.
    pub networks: Vec<IpNet>,
    /// Main-table routes through it: (destination, gateway).
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// The parts of a CNI result CHECK compares (other keys are ignored).
#[derive(Debug, Default, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<PrevInterface>,
    #[serde(default)]
    ips: Vec<PrevIp>,
    #[serde(default)]
    routes: Vec<PrevRoute>,
}

#[derive(Debug, Deserialize)]
struct PrevInterface {
    name: String,
    #[serde(default)]
    mac: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PrevIp {
    address: IpNet,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct PrevRoute {
    dst: IpNet,
    #[serde(default)]
    gw: Option<IpAddr>,
}

fn drifted(msg: String) -> ApiError {
    ApiError::dataplane(
        msg,
        "something changed the pod's interface after ADD; delete and re-create the pod",
    )
}

/// Compares interface `ifname` as `seen` with the addresses the agent
/// holds for it (`held`) and with `prev` (the config's `prevResult`):
/// the interface up, every held and every reported address on it with its
/// prefix, its MAC as reported, and every reported route through its
/// gateways present in the main table. The first difference is the error.
pub fn compare(
    ifname: &str,
    held: &[IpAddr],
    prev: Option<&serde_json::Value>,
    seen: &Observed,
) -> Result<(), ApiError> {
    if !seen.up {
        return Err(drifted(format!("{ifname} is down")));
    }
    let missing: Vec<String> = held
        .iter()
        .filter(|a| !seen.networks.iter().any(|n| n.addr() == **a))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(drifted(format!(
            "{ifname} lacks its address {}",
            missing.join(", ")
        )));
    }
    let Some(prev) = prev else {
        return Ok(());
    };
    let prev: PrevResult = serde_json::from_value(prev.clone()).map_err(|e| {
        ApiError::new(
            code::DECODE,
            "prevResult is not a CNI result",
            format!("{e}; the runtime passes the result of ADD there"),
        )
    })?;
    let Some(index) = prev.interfaces.iter().position(|i| i.name == ifname) else {
        return Err(ApiError::new(
            code::INVALID_CONFIG,
            format!("prevResult does not list interface {ifname}"),
            "CHECK compares the interface ADD made with what ADD reported: pass ADD's result as prevResult",
        ));
    };
    if let Some(mac) = prev.interfaces[index]
        .mac
        .as_deref()
        .filter(|m| !m.is_empty())
        && !mac.eq_ignore_ascii_case(&seen.mac)
    {
        return Err(drifted(format!(
            "{ifname}'s MAC is {}, ADD reported {mac}",
            seen.mac
        )));
    }
    let ours: Vec<IpNet> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(index))
        .map(|ip| ip.address)
        .collect();
    if let Some(gone) = ours.iter().find(|n| !seen.networks.contains(n)) {
        return Err(drifted(format!(
            "{ifname} lacks {gone}, which ADD reported"
        )));
    }
    // Routes through this interface's gateways (a chained plugin's others
    // are not railnet's to judge).
    for route in &prev.routes {
        let Some(gw) = route.gw else { continue };
        if !ours.iter().any(|n| n.contains(&gw)) {
            continue;
        }
        let dst = route.dst.trunc();
        if !seen.routes.iter().any(|(d, g)| *d == dst && *g == Some(gw)) {
            return Err(drifted(format!(
                "the route {dst} via {gw} dev {ifname} that ADD reported is missing"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// net1 as ADD left it: up, 172.16.1.10/24, RDMA CIDR via the gateway.
    fn intact() -> Observed {
        Observed {
            up: true,
            mac: "02:aa:00:00:00:01".into(),
            networks: vec![net("172.16.1.10/24")],
            routes: vec![
                (net("172.16.1.0/24"), None),
                (net("172.16.0.0/16"), Some("172.16.1.254".parse().unwrap())),
            ],
        }
    }

    /// ADD's result, as the runtime passes it back; eth0's route belongs
    /// to another plugin.
    fn prev() -> serde_json::Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0"}, {"name": "net1", "mac": "02:AA:00:00:00:01", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.244.0.9/24", "interface": 0},
                    {"address": "172.16.1.10/24", "gateway": "172.16.1.254", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"},
                       {"dst": "172.16.0.0/16", "gw": "172.16.1.254"}],
        })
    }

    fn check(seen: &Observed, prev: Option<&serde_json::Value>) -> Result<(), String> {
        compare("net1", &["172.16.1.10".parse().unwrap()], prev, seen)
            .map_err(|e| format!("{} ({})", e.msg, e.code))
    }

    #[test]
    fn an_intact_interface_passes() {
        assert_eq!(check(&intact(), Some(&prev())), Ok(()));
        assert_eq!(check(&intact(), None), Ok(()));
    }

    #[test]
    fn each_drift_is_named() {
        let mut down = intact();
        down.up = false;
        assert_eq!(
            check(&down, Some(&prev())),
            Err("net1 is down (102)".into())
        );

        let mut no_route = intact();
        no_route.routes.pop();
        assert_eq!(
            check(&no_route, Some(&prev())),
            Err("the route 172.16.0.0/16 via 172.16.1.254 dev net1 that ADD reported is missing (102)".into())
        );

        let mut flushed = intact();
        flushed.networks.clear();
        assert_eq!(
            check(&flushed, Some(&prev())),
            Err("net1 lacks its address 172.16.1.10 (102)".into())
        );

        let mut renumbered = intact();
        renumbered.networks = vec![net("172.16.1.10/16")];
        assert_eq!(
            check(&renumbered, Some(&prev())),
            Err("net1 lacks 172.16.1.10/24, which ADD reported (102)".into())
        );

        let mut mac = intact();
        mac.mac = "02:bb:00:00:00:01".into();
        assert_eq!(
            check(&mac, Some(&prev())),
            Err("net1's MAC is 02:bb:00:00:00:01, ADD reported 02:AA:00:00:00:01 (102)".into())
        );
    }

    #[test]
    fn a_prev_result_without_the_interface_or_not_a_result_is_refused() {
        let mut other = prev();
        other["interfaces"][1]["name"] = "net2".into();
        assert_eq!(
            check(&intact(), Some(&other)),
            Err("prevResult does not list interface net1 (7)".into())
        );
        assert_eq!(
            check(&intact(), Some(&json!({"ips": "none"}))),
            Err("prevResult is not a CNI result (6)".into())
        );
    }
}
