//! `railnet`: the CNI plugin Multus executes, once per rail network of a pod.
//!
//! Thin by design: it reads the spec's environment and stdin, opens
//! `CNI_NETNS`, hands the fd and the config to the node agent over its unix
//! socket, and prints the agent's answer as a CNI result or CNI error.

use std::{
    fs::File,
    io::{IsTerminal, Read, Write},
    os::fd::AsFd,
    path::Path,
    process::ExitCode,
    time::Duration,
};

use railnet_wire::{
    api::{self, ApiError, Attachment, GcRequest, Op, Response, code},
    netconf::{ClaimedConf, NetConf, SUPPORTED_VERSIONS},
};

mod install;
mod ipam_plugin;
mod node;

/// The spec version this plugin reports for VERSION.
pub(crate) const SPEC_VERSION: &str = "1.1.0";
/// How long the agent may take to answer one ADD/DEL.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("doctor") {
        return doctor(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("install") {
        return install::main(&args[1..]);
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let command = env("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    // A runtime always writes the config, even for VERSION; a person
    // typing `CNI_COMMAND=VERSION railnet` at a terminal should not hang.
    if !std::io::stdin().is_terminal() {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let version = cni_version_of(&stdin);
    // Installed a second time as `railnet-ipam`, the same binary is an IPAM
    // plugin other main plugins (reference macvlan, sriov-cni) call.
    let ipam_mode = std::env::args_os()
        .next()
        .map(|a| {
            Path::new(&a)
                .file_name()
                .is_some_and(|n| n == "railnet-ipam")
        })
        .unwrap_or(false);
    let outcome = if ipam_mode {
        ipam_plugin::run(&command, &stdin, &env)
    } else {
        run(&command, &stdin, &env)
    };
    match outcome {
        Ok(Some(out)) => {
            let _ = writeln!(std::io::stdout(), "{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let out = serde_json::json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            });
            let _ = writeln!(std::io::stdout(), "{out}");
            ExitCode::FAILURE
        }
    }
}

/// The config's version if it has a usable one, for error replies.
fn cni_version_of(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SPEC_VERSION.into())
}

pub(crate) fn need(env: &impl Fn(&str) -> Option<String>, key: &str) -> Result<String, ApiError> {
    env(key).ok_or_else(|| {
        ApiError::new(
            code::INVALID_ENV,
            format!("{key} is not set"),
            "the container runtime must set it; see the CNI spec's \"Parameters\"",
        )
    })
}

fn run(
    command: &str,
    stdin: &[u8],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, ApiError> {
    match command {
        "VERSION" => Ok(Some(
            serde_json::json!({
                "cniVersion": SPEC_VERSION,
                "supportedVersions": SUPPORTED_VERSIONS,
            })
            .to_string(),
        )),
        "ADD" if ClaimedConf::detect(stdin).is_some() => add_claimed(stdin, env),
        "ADD" => {
            let conf = parse(stdin)?;
            let att = attachment(stdin, env, Some(conf.clone()))?;
            let (netns_path, netns) = open_netns(env)?;
            let socket = paths(stdin, env)?.socket;
            let resp = call(&socket, Op::Add(att), Some(&netns)).map_err(|e| {
                unreachable(
                    code::TRY_AGAIN,
                    &socket,
                    format!("{e}; is the railnet-agent DaemonSet pod running on this node?"),
                )
            })?;
            match resp {
                Response::Ok {
                    result: Some(result),
                    ..
                } => {
                    write_device_info(stdin, &result);
                    Ok(Some(
                        result.to_cni(&conf.cni_version, &netns_path).to_string(),
                    ))
                }
                Response::Ok { result: None, .. } => Err(ApiError::new(
                    code::DECODE,
                    "the agent answered ADD without a result",
                    "agent and CNI binary are out of step; reinstall both",
                )),
                Response::Error(e) => Err(e),
            }
        }
        "DEL" => {
            // DEL must succeed on configs and netns that are half gone: the
            // agent reads only what it needs of the text.
            let att = attachment(stdin, env, None)?;
            let netns = env("CNI_NETNS").and_then(|p| File::open(p).ok());
            let paths = del_paths(stdin, env);
            let socket = paths.socket.clone();
            let op = if ClaimedConf::is_claimed(&att.netconf) {
                Op::DelClaimed(att.clone())
            } else {
                Op::Del(att.clone())
            };
            match call(&socket, op, netns.as_ref()) {
                Ok(Response::Ok { .. }) => Ok(None),
                Ok(Response::Error(e)) => Err(e),
                // A pod must never hang in Terminating because the agent is
                // away (an upgrade): leave a tombstone the agent finishes on
                // start, and succeed.
                Err(e) => write_tombstone(&paths.tombstones, &att)
                    .map(|()| None)
                    .map_err(|te| {
                        unreachable(
                            code::TRY_AGAIN,
                            &socket,
                            format!("{e}; and the DEL could not be left for it: {te}"),
                        )
                    }),
            }
        }
        "STATUS" => {
            // Spec 1.1: 50, "the plugin is not available".
            ask(&paths(stdin, env)?.socket, Op::Status, None, 50)
        }
        "GC" => {
            // Spec 1.1: the runtime lists the attachments still valid for
            // this network; everything else of it is released.
            let conf: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
                ApiError::new(code::DECODE, "invalid network config", e.to_string())
            })?;
            let network = conf["name"].as_str().unwrap_or_default().to_owned();
            let valid = conf["cni.dev/valid-attachments"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|a| {
                            Some((
                                a["containerID"].as_str()?.to_owned(),
                                a["ifname"].as_str()?.to_owned(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let op = Op::Gc(GcRequest { network, valid });
            ask(&paths(stdin, env)?.socket, op, None, code::TRY_AGAIN)
        }
        "CHECK" => {
            let conf = parse(stdin)?;
            if conf.cni_version == "0.3.1" {
                return Err(ApiError::new(
                    code::INCOMPATIBLE_VERSION,
                    "CHECK needs cniVersion 0.4.0 or later",
                    "the config says 0.3.1, which has no CHECK",
                ));
            }
            let att = attachment(stdin, env, Some(conf))?;
            let (_, netns) = open_netns(env)?;
            ask(
                &paths(stdin, env)?.socket,
                Op::Check(att),
                Some(&netns),
                code::TRY_AGAIN,
            )
        }
        "" => Err(ApiError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "railnet is a CNI plugin: it is run by Multus or kubelet, or by hand with CNI_COMMAND=VERSION",
        )),
        other => Err(ApiError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "use ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

/// The CNI error for an agent that did not answer.
pub(crate) fn unreachable(code: u32, socket: &Path, details: impl Into<String>) -> ApiError {
    ApiError::new(
        code,
        format!("railnet agent not reachable at {}", socket.display()),
        details,
    )
}

/// Opens `CNI_NETNS`; returns its path and the file.
fn open_netns(env: &impl Fn(&str) -> Option<String>) -> Result<(String, File), ApiError> {
    let path = need(env, "CNI_NETNS")?;
    let file = File::open(&path).map_err(|e| {
        ApiError::new(
            code::INVALID_ENV,
            format!("cannot open CNI_NETNS {path}"),
            e.to_string(),
        )
    })?;
    if !is_network_namespace(&file) {
        return Err(ApiError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {path} is not a network namespace"),
            "give the pod's network namespace: a /proc/<pid>/ns/net file or a bind mount of one \
             (as runtimes pin them under /var/run/netns)",
        ));
    }
    Ok((path, file))
}

/// Whether `file` is a network namespace (NS_GET_NSTYPE says so; any other
/// file, or a namespace of another kind, is not).
fn is_network_namespace(file: &File) -> bool {
    use std::os::fd::AsFd;
    railnet_wire::netns::is_network_namespace(file.as_fd())
}

/// Sends `op` and turns the answer into a result without output; an agent
/// that does not answer is `unreachable_code`.
fn ask(
    socket: &Path,
    op: Op,
    netns: Option<&File>,
    unreachable_code: u32,
) -> Result<Option<String>, ApiError> {
    match call(socket, op, netns) {
        Ok(Response::Ok { .. }) => Ok(None),
        Ok(Response::Error(e)) => Err(e),
        Err(e) => Err(unreachable(unreachable_code, socket, e.to_string())),
    }
}

/// ADD of the DRA network: the agent wires every rail the pod's claims
/// hold and answers with one result per rail, written as one CNI result.
fn add_claimed(
    stdin: &[u8],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, ApiError> {
    let conf = match ClaimedConf::detect(stdin) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            let code = match e {
                railnet_wire::netconf::NetConfError::Version(_) => code::INCOMPATIBLE_VERSION,
                _ => code::DECODE,
            };
            return Err(ApiError::new(code, "invalid network config", e.to_string()));
        }
        None => unreachable!("called for DRA configs only"),
    };
    let att = attachment(stdin, env, None)?;
    let (netns_path, netns) = open_netns(env)?;
    let socket = paths(stdin, env)?.socket;
    let resp = call(&socket, Op::AddClaimed(att), Some(&netns)).map_err(|e| {
        unreachable(
            code::TRY_AGAIN,
            &socket,
            format!("{e}; is the railnet-agent DaemonSet pod running on this node?"),
        )
    })?;
    match resp {
        Response::Ok { rails, .. } if !rails.is_empty() => Ok(Some(
            railnet_wire::api::AddResult::to_cni_many(&rails, &conf.cni_version, &netns_path)
                .to_string(),
        )),
        Response::Ok { .. } => Err(ApiError::new(
            code::DECODE,
            "the agent answered a DRA ADD without rails",
            "agent and CNI binary are out of step; reinstall both",
        )),
        Response::Error(e) => Err(e),
    }
}

pub(crate) fn parse(stdin: &[u8]) -> Result<NetConf, ApiError> {
    NetConf::parse(stdin).map_err(|e| {
        let code = match e {
            railnet_wire::netconf::NetConfError::Version(_) => code::INCOMPATIBLE_VERSION,
            railnet_wire::netconf::NetConfError::Decode(_) => code::DECODE,
            _ => code::INVALID_CONFIG,
        };
        ApiError::new(code, "invalid network config", e.to_string())
    })
}

/// The attachment a request carries: the ids from the environment, the
/// config as read and, for ADD and CHECK, as parsed (`conf`).
pub(crate) fn attachment(
    stdin: &[u8],
    env: &impl Fn(&str) -> Option<String>,
    conf: Option<NetConf>,
) -> Result<Attachment, ApiError> {
    let netconf = serde_json::from_slice(stdin).unwrap_or(serde_json::Value::Null);
    Ok(Attachment {
        container_id: need(env, "CNI_CONTAINERID")?,
        ifname: need(env, "CNI_IFNAME")?,
        netconf,
        conf,
        args: api::parse_cni_args(&env("CNI_ARGS").unwrap_or_default()),
    })
}

/// Records a DEL for the agent to finish: written to a temporary name, then
/// renamed, so the agent never reads half a tombstone.
pub(crate) fn write_tombstone(dir: &Path, att: &Attachment) -> Result<(), String> {
    write_tombstone_capped(dir, att, MAX_TOMBSTONES)
}

/// DELs left for an agent that is away, at most: one per pod rail — 8
/// rails of 500 pods deleted while the agent was down. Beyond, a DEL fails
/// (the runtime retries it) rather than fill the node's disk.
const MAX_TOMBSTONES: usize = 4096;

fn write_tombstone_capped(dir: &Path, att: &Attachment, cap: usize) -> Result<(), String> {
    let safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 256
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if !safe(&att.container_id) || !safe(&att.ifname) || att.container_id.starts_with('.') {
        return Err("CNI_CONTAINERID or CNI_IFNAME is not a plain name".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = api::tombstone_path(dir, &att.container_id, &att.ifname);
    let waiting = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .count();
    if waiting >= cap && !path.exists() {
        return Err(format!(
            "{waiting} DELs already wait in {} for the agent: is the railnet-agent pod running on this node?",
            dir.display()
        ));
    }
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec(att).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, body).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where the node's agent is ([`node`]); a config naming other paths than
/// the node's is refused.
pub(crate) fn paths(
    stdin: &[u8],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<node::Paths, ApiError> {
    node::resolve(stdin, env, node::settings()?.as_ref()).strict()
}

/// As [`paths`], for DEL, which must succeed on configs and nodes that are
/// half gone: the node's paths whatever the config says (or, with no
/// readable node settings, the config's).
pub(crate) fn del_paths(stdin: &[u8], env: &impl Fn(&str) -> Option<String>) -> node::Paths {
    node::resolve(stdin, env, node::settings().ok().flatten().as_ref()).paths
}

pub(crate) fn call(
    socket: &Path,
    op: Op,
    netns: Option<&File>,
) -> Result<Response, api::WireError> {
    api::call(socket, op, netns.map(|f| f.as_fd()), AGENT_TIMEOUT)
}

/// `railnet doctor` moved to the operator tool; say where.
fn doctor(_args: &[String]) -> ExitCode {
    eprintln!(
        "railnet doctor is now `railnetctl doctor` (in railnet's image at /usr/local/bin/railnetctl); \
         this binary is the CNI plugin Multus executes"
    );
    ExitCode::from(2)
}

/// Where Multus keeps device-info files (the Device Information spec's
/// directory): the only place railnet writes one.
const DEVICE_INFO_ROOTS: [&str; 2] = [
    "/var/run/k8s.cni.cncf.io/devinfo/",
    "/run/k8s.cni.cncf.io/devinfo/",
];

/// `path` if it is a device-info file under [`DEVICE_INFO_ROOTS`]: the
/// CNI runs as root, and the path comes from the network config, which a
/// NAD author can write — it must not truncate any file on the node.
fn device_info_path(path: &Path) -> std::io::Result<&Path> {
    let inside = DEVICE_INFO_ROOTS.iter().any(|r| path.starts_with(r))
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if inside {
        Ok(path)
    } else {
        Err(std::io::Error::other(format!(
            "not a device-info file under {} (Multus's directory)",
            DEVICE_INFO_ROOTS[0]
        )))
    }
}

/// With the `CNIDeviceInfoFile` capability, Multus passes a path in
/// `runtimeConfig` and copies what the plugin writes there into the pod's
/// `network-status` annotation: the workload learns each rail's RDMA
/// device (NCCL_IB_HCA) from it. Best effort, as Multus treats it: the
/// interface works without it, so a failure is reported on stderr only.
fn write_device_info(stdin: &[u8], result: &railnet_wire::api::AddResult) {
    let Some(rdma) = &result.rdma else { return };
    let Ok(conf) = serde_json::from_slice::<serde_json::Value>(stdin) else {
        return;
    };
    let Some(path) = conf["runtimeConfig"]["CNIDeviceInfoFile"].as_str() else {
        return;
    };
    let path = Path::new(path);
    let written = device_info_path(path).and_then(|path| {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?
            .write_all(rdma.device_info().to_string().as_bytes())
    });
    if let Err(e) = written {
        let _ = writeln!(
            std::io::stderr(),
            "railnet: could not write device info to {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tombstones stop at the cap: the DEL fails (and is retried) instead
    /// of filling the disk; a repeat of a waiting one is still written.
    #[test]
    fn tombstones_stop_at_the_cap() {
        let dir = std::env::temp_dir().join(format!("railnet-tombs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let att = |c: &str| Attachment {
            container_id: c.into(),
            ifname: "net1".into(),
            netconf: serde_json::json!({}),
            conf: None,
            args: Default::default(),
        };
        for c in ["a", "b", "c"] {
            write_tombstone_capped(&dir, &att(c), 3).unwrap();
        }
        let e = write_tombstone_capped(&dir, &att("d"), 3).unwrap_err();
        assert!(
            e.contains("3 DELs already wait") && e.contains("railnet-agent"),
            "{e}"
        );
        write_tombstone_capped(&dir, &att("b"), 3).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A network config names the device-info file: only Multus's
    /// directory is written, so a NAD cannot have root truncate a file.
    #[test]
    fn device_info_goes_only_under_multus_s_directory() {
        for ok in [
            "/var/run/k8s.cni.cncf.io/devinfo/cni/rail1-abc_net1",
            "/run/k8s.cni.cncf.io/devinfo/cni/x.json",
        ] {
            assert!(device_info_path(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "/etc/shadow",
            "/var/run/k8s.cni.cncf.io/devinfo/../../../etc/passwd",
            "/var/run/k8s.cni.cncf.io/devinfox/cni/a",
            "var/run/k8s.cni.cncf.io/devinfo/cni/a",
        ] {
            let e = device_info_path(Path::new(bad)).unwrap_err();
            assert!(e.to_string().contains("devinfo"), "{bad}: {e}");
        }
    }
}
