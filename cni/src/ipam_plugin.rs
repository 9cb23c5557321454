//! `railnet-ipam`: railnet's IPAM as a CNI IPAM plugin, for main plugins
//! that make the interface themselves (reference macvlan, sriov-cni,
//! ib-sriov-cni), as Spiderpool's IPAM is used. The main plugin executes it
//! with the same environment and the whole network config on stdin:
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "rail1", "type": "macvlan", "master": "eno3np1",
//!  "ipam": {"type": "railnet-ipam", "ippools": {"ipv4": ["rail1"]}, "matchMasterSubnet": false}}
//! ```

use std::fs::File;

use railnet_wire::{
    api::{ApiError, IpamRequest, Op, Response, code},
    netconf::{IpPools, SUPPORTED_VERSIONS},
};
use serde::Deserialize;

use crate::{attachment, call, del_paths, need, paths, unreachable, write_tombstone};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conf {
    cni_version: String,
    name: String,
    #[serde(default)]
    master: Option<String>,
    ipam: IpamSection,
    #[serde(default)]
    runtime_config: RuntimeConfig,
}

/// The part of `runtimeConfig` railnet's IPAM reads.
#[derive(Default, Deserialize)]
struct RuntimeConfig {
    /// The `ips` capability: addresses the pod asked for.
    #[serde(default)]
    ips: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpamSection {
    ippools: IpPools,
    #[serde(default)]
    match_master_subnet: bool,
}

fn parse(stdin: &[u8]) -> Result<Conf, ApiError> {
    let conf: Conf = serde_json::from_slice(stdin).map_err(|e| {
        ApiError::new(
            code::DECODE,
            "invalid network config for railnet-ipam",
            format!("{e}; it needs \"ipam\": {{\"type\": \"railnet-ipam\", \"ippools\": {{\"ipv4\": [...]}}}}"),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(ApiError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {:?} is not supported", conf.cni_version),
            "use one of 0.3.1, 0.4.0, 1.0.0, 1.1.0",
        ));
    }
    if let Some(bad) = conf
        .runtime_config
        .ips
        .iter()
        .find(|ip| railnet_wire::netconf::parse_requested(ip).is_none())
    {
        return Err(ApiError::new(
            code::INVALID_CONFIG,
            format!("runtimeConfig.ips {bad:?} is not an address"),
            "write 172.16.1.50/24 or 172.16.1.50",
        ));
    }
    if conf.ipam.match_master_subnet && conf.master.is_none() {
        return Err(ApiError::new(
            code::INVALID_CONFIG,
            "matchMasterSubnet needs the main plugin's \"master\"",
            "set \"master\" at the top level of the config",
        ));
    }
    Ok(conf)
}

fn request(conf: &Conf, env: &impl Fn(&str) -> Option<String>) -> Result<IpamRequest, ApiError> {
    let args = railnet_wire::api::parse_cni_args(&env("CNI_ARGS").unwrap_or_default());
    Ok(IpamRequest {
        container_id: need(env, "CNI_CONTAINERID")?,
        ifname: need(env, "CNI_IFNAME")?,
        ippools: conf.ipam.ippools.clone(),
        match_master: conf
            .master
            .clone()
            .filter(|_| conf.ipam.match_master_subnet),
        network: conf.name.clone(),
        namespace: args.get("K8S_POD_NAMESPACE").cloned(),
        pod_name: args.get("K8S_POD_NAME").cloned(),
        pod_uid: args.get("K8S_POD_UID").cloned(),
        ips: conf
            .runtime_config
            .ips
            .iter()
            .filter_map(|ip| railnet_wire::netconf::parse_requested(ip))
            .collect(),
    })
}

/// Runs one IPAM plugin command.
pub(crate) fn run(
    command: &str,
    stdin: &[u8],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, ApiError> {
    match command {
        "VERSION" => crate::run(command, stdin, env),
        "ADD" => {
            let conf = parse(stdin)?;
            let req = request(&conf, env)?;
            // The netns lets the agent's sweep release the addresses of a
            // pod that vanishes without DEL.
            // Only a network namespace: any other file means nothing to it.
            let netns = env("CNI_NETNS")
                .and_then(|p| File::open(p).ok())
                .filter(crate::is_network_namespace);
            let socket = paths(stdin, env)?.socket;
            match call(&socket, Op::IpamAdd(req), netns.as_ref())
                .map_err(|e| unreachable(code::TRY_AGAIN, &socket, e.to_string()))?
            {
                Response::Ok { ipam: Some(r), .. } => {
                    let old = conf.cni_version.starts_with("0.");
                    let ips: Vec<serde_json::Value> = r
                        .ips
                        .iter()
                        .map(|ip| {
                            let mut v = serde_json::json!({ "address": ip.address.to_string() });
                            if let Some(gw) = ip.gateway {
                                v["gateway"] = gw.to_string().into();
                            }
                            if old {
                                v["version"] = if ip.address.addr().is_ipv4() {
                                    "4"
                                } else {
                                    "6"
                                }
                                .into();
                            }
                            v
                        })
                        .collect();
                    let routes: Vec<serde_json::Value> = r
                        .routes
                        .iter()
                        .map(|rt| {
                            let mut v = serde_json::json!({ "dst": rt.dst.to_string() });
                            if let Some(gw) = rt.gw {
                                v["gw"] = gw.to_string().into();
                            }
                            v
                        })
                        .collect();
                    Ok(Some(
                        serde_json::json!({ "cniVersion": conf.cni_version, "ips": ips, "routes": routes })
                            .to_string(),
                    ))
                }
                Response::Ok { .. } => Err(ApiError::new(
                    code::DECODE,
                    "the agent answered IPAM ADD without addresses",
                    "agent and CNI binary are out of step; reinstall both",
                )),
                Response::Error(e) => Err(e),
            }
        }
        "DEL" => {
            // DEL must succeed on half-gone configs: only the IDs matter.
            let ippools = parse(stdin).map(|c| c.ipam.ippools).unwrap_or_default();
            let req = IpamRequest {
                container_id: need(env, "CNI_CONTAINERID")?,
                ifname: need(env, "CNI_IFNAME")?,
                ippools,
                match_master: None,
                network: String::new(),
                namespace: None,
                pod_name: None,
                pod_uid: None,
                ips: vec![],
            };
            let paths = del_paths(stdin, env);
            let socket = paths.socket.clone();
            match call(&socket, Op::IpamDel(req), None) {
                Ok(Response::Ok { .. }) => Ok(None),
                Ok(Response::Error(e)) => Err(e),
                Err(e) => {
                    let att = attachment(stdin, env, None)?;
                    write_tombstone(&paths.tombstones, &att)
                        .map(|()| None)
                        .map_err(|te| {
                            let mut err = unreachable(code::TRY_AGAIN, &socket, e.to_string());
                            err.details
                                .push_str(&format!("; and the DEL could not be left for it: {te}"));
                            err
                        })
                }
            }
        }
        // The addresses are the agent's to keep; the interface is the main
        // plugin's to check.
        "CHECK" => parse(stdin).map(|_| None),
        other => crate::run(other, stdin, env),
    }
}
