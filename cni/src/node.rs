//! Where this node's agent listens and where DELs it cannot take are left:
//! the node decides, not a network config. Whoever can write a
//! NetworkAttachmentDefinition is not trusted with the node, and the CNI
//! runs as root: a config's `agentSocket` would send pods' netns fds to any
//! socket, its `tombstoneDir` would create and write files anywhere.
//!
//! `railnet install` (the DaemonSet's init container) writes the node's
//! settings beside the binary, as [`SETTINGS_FILE`]; with it, a config may
//! repeat those paths but not change them. Without it (an agent run by
//! hand, the tests) the config, then `RAILNET_SOCKET`/`RAILNET_TOMBSTONES`,
//! then the defaults decide, as before.

use std::path::{Path, PathBuf};

use railnet_wire::api::{self, ApiError, code};
use serde::{Deserialize, Serialize};

/// The settings file's name, in the directory of the installed binary.
pub(crate) const SETTINGS_FILE: &str = api::NODE_SETTINGS_FILE;

/// The node's settings, as `railnet install` writes them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct NodeSettings {
    /// The agent's socket.
    pub agent_socket: PathBuf,
    /// Where DELs the agent could not take are left for it.
    pub tombstone_dir: PathBuf,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            agent_socket: api::DEFAULT_SOCKET.into(),
            tombstone_dir: api::DEFAULT_TOMBSTONES.into(),
        }
    }
}

/// Where this invocation talks to the agent.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Paths {
    /// The agent's socket.
    pub socket: PathBuf,
    /// The tombstone directory.
    pub tombstones: PathBuf,
}

/// The paths to use, and whether the config tried to change the node's.
pub(crate) struct Resolved {
    /// The node's paths (or, without node settings, the config's).
    pub paths: Paths,
    /// The config named other paths than the node's.
    pub conflict: Option<ApiError>,
}

impl Resolved {
    /// The paths, or the conflict as an error (ADD, CHECK, GC, STATUS: a
    /// config that names another socket is refused before anything).
    pub fn strict(self) -> Result<Paths, ApiError> {
        match self.conflict {
            Some(e) => Err(e),
            None => Ok(self.paths),
        }
    }
}

/// The node's settings beside the running binary: `Ok(None)` when there
/// are none (not installed by `railnet install`).
pub(crate) fn settings() -> Result<Option<NodeSettings>, ApiError> {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return Ok(None);
    };
    read_settings(&dir)
}

/// The settings file in `dir`, if any.
pub(crate) fn read_settings(dir: &Path) -> Result<Option<NodeSettings>, ApiError> {
    let path = dir.join(SETTINGS_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(broken(&path, e.to_string())),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| broken(&path, e.to_string()))
}

fn broken(path: &Path, why: String) -> ApiError {
    ApiError::new(
        code::INVALID_CONFIG,
        format!(
            "the node's railnet settings {} cannot be read",
            path.display()
        ),
        format!(
            "{why}; the agent's init container writes it (railnet install): restart the agent pod on this node"
        ),
    )
}

/// Resolves the paths for a config (`stdin`) and environment.
pub(crate) fn resolve(
    stdin: &[u8],
    env: &impl Fn(&str) -> Option<String>,
    node: Option<&NodeSettings>,
) -> Resolved {
    let conf = serde_json::from_slice::<serde_json::Value>(stdin).unwrap_or_default();
    let key = |k: &str| conf.get(k).and_then(|v| v.as_str()).map(PathBuf::from);
    let (socket, tombstones) = (key("agentSocket"), key("tombstoneDir"));
    let Some(node) = node else {
        return Resolved {
            paths: Paths {
                socket: socket
                    .or_else(|| env("RAILNET_SOCKET").map(PathBuf::from))
                    .unwrap_or_else(|| api::DEFAULT_SOCKET.into()),
                tombstones: tombstones
                    .or_else(|| env("RAILNET_TOMBSTONES").map(PathBuf::from))
                    .unwrap_or_else(|| api::DEFAULT_TOMBSTONES.into()),
            },
            conflict: None,
        };
    };
    let differs = [
        ("agentSocket", socket, &node.agent_socket),
        ("tombstoneDir", tombstones, &node.tombstone_dir),
    ]
    .into_iter()
    .find_map(|(k, given, own)| given.filter(|g| g != own).map(|g| (k, g, own.clone())));
    Resolved {
        paths: Paths {
            socket: node.agent_socket.clone(),
            tombstones: node.tombstone_dir.clone(),
        },
        conflict: differs.map(|(k, given, own)| {
            ApiError::new(
                code::INVALID_CONFIG,
                format!(
                    "{k} {} in the network config is not this node's ({})",
                    given.display(),
                    own.display()
                ),
                format!(
                    "the node decides where its agent is (railnet install wrote {SETTINGS_FILE} beside the binary): remove {k} from the network config"
                ),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn without_node_settings_the_config_decides() {
        let r = resolve(br#"{"agentSocket":"/tmp/a.sock"}"#, &env, None);
        assert!(r.conflict.is_none());
        assert_eq!(r.paths.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(r.paths.tombstones, PathBuf::from(api::DEFAULT_TOMBSTONES));
    }

    #[test]
    fn with_node_settings_a_config_may_repeat_but_not_change_them() {
        let node = NodeSettings {
            agent_socket: "/run/rn/agent.sock".into(),
            tombstone_dir: "/var/lib/rn/tombstones".into(),
        };
        let same = resolve(
            br#"{"agentSocket":"/run/rn/agent.sock"}"#,
            &env,
            Some(&node),
        );
        assert_eq!(same.strict().unwrap().socket, node.agent_socket);
        let other = resolve(br#"{"tombstoneDir":"/etc"}"#, &env, Some(&node));
        // DEL still goes to the node's agent; everything else is refused.
        assert_eq!(other.paths.tombstones, node.tombstone_dir);
        let e = other.strict().unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(
            e.msg
                .contains("tombstoneDir /etc in the network config is not this node's (/var/lib/rn/tombstones)"),
            "{}",
            e.msg
        );
        // The environment does not override the node either.
        let envd = |k: &str| (k == "RAILNET_SOCKET").then(|| "/tmp/x".to_owned());
        assert_eq!(
            resolve(b"{}", &envd, Some(&node)).strict().unwrap().socket,
            node.agent_socket
        );
    }

    #[test]
    fn a_broken_settings_file_names_itself() {
        let dir = std::env::temp_dir().join(format!("railnet-node-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_settings(&dir).unwrap(), None);
        std::fs::write(dir.join(SETTINGS_FILE), b"{\"agentSocket\": 1}").unwrap();
        let e = read_settings(&dir).unwrap_err();
        assert!(e.msg.contains(SETTINGS_FILE), "{}", e.msg);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
