//! The config of railnet's DRA network: one NetworkAttachmentDefinition a
//! pod names once, whose ADD wires every rail device the scheduler
//! allocated to the pod's ResourceClaims. What each rail is (master,
//! pools, MTU) comes from the RailNetwork its device was published for,
//! never from this config: a pod cannot steer it.
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "railnet-dra", "type": "railnet", "dra": true}
//! ```

use serde::Deserialize;

use super::{NetConfError, SUPPORTED_VERSIONS};

/// A DRA network config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimedConf {
    /// The config's CNI spec version; the result is written in it.
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Always true here.
    pub dra: bool,
}

impl ClaimedConf {
    /// `Some` when `stdin` is a DRA network's config (`"dra": true`),
    /// checked; `None` for any other config (a rail network's).
    pub fn detect(stdin: &[u8]) -> Option<Result<Self, NetConfError>> {
        let value: serde_json::Value = serde_json::from_slice(stdin).ok()?;
        if value.get("dra") != Some(&serde_json::Value::Bool(true)) {
            return None;
        }
        Some(
            serde_json::from_value::<Self>(value)
                .map_err(|e| NetConfError::Decode(e.to_string()))
                .and_then(|c| {
                    if SUPPORTED_VERSIONS.contains(&c.cni_version.as_str()) {
                        Ok(c)
                    } else {
                        Err(NetConfError::Version(c.cni_version))
                    }
                }),
        )
    }

    /// Whether a config as read (a DEL's, a tombstone's) is a DRA network's.
    pub fn is_claimed(netconf: &serde_json::Value) -> bool {
        netconf.get("dra") == Some(&serde_json::Value::Bool(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dra_config_is_taken_for_one() {
        let dra = br#"{"cniVersion":"1.0.0","name":"railnet-dra","type":"railnet","dra":true}"#;
        assert_eq!(
            ClaimedConf::detect(dra).unwrap().unwrap().name,
            "railnet-dra"
        );
        let rail = br#"{"cniVersion":"1.0.0","name":"rail1","type":"railnet","rail":1}"#;
        assert!(ClaimedConf::detect(rail).is_none());
        let off = br#"{"cniVersion":"1.0.0","name":"x","type":"railnet","dra":false}"#;
        assert!(ClaimedConf::detect(off).is_none());
        let old = br#"{"cniVersion":"0.2.0","name":"x","type":"railnet","dra":true}"#;
        assert!(matches!(
            ClaimedConf::detect(old),
            Some(Err(NetConfError::Version(_)))
        ));
    }
}
