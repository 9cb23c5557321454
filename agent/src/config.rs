//! The agent's pools file, validated before anything binds.
//!
//! YAML, pools named and shaped as SpiderIPPool specs users know:
//!
//! ```yaml
//! pools:
//!   - name: eno3np1-rail1-node1
//!     subnet: 172.16.1.0/27
//!     gateway: 172.16.1.1
//!     ips: [172.16.1.2-172.16.1.31]
//!     routes: [{to: 172.16.0.0/16, via: 172.16.1.1}]
//!     nodeName: [node1]
//! ```
//!
//! JSON is YAML too, so a JSON pools file works unchanged.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ipam::{IpamError, PoolSpec};

/// The pools file (`--config`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address pools.
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
}

/// Errors reading the config file; each names the file and, where it can,
/// the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Cannot read it.
    #[error("config {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// Not YAML of the expected shape.
    #[error("config {path}: {why}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// The parser's message, which carries line and column.
        why: String,
    },
    /// A pool that fails validation.
    #[error("config {path}{}: {source}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Pool {
        /// Path.
        path: PathBuf,
        /// Line of the pool's `name:`.
        line: Option<usize>,
        /// Error.
        source: IpamError,
    },
}

/// Reads and parses the pools file.
pub fn load_pools(path: &Path) -> Result<Vec<PoolSpec>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse_pools(path, &text)
}

/// Parses pools from `text` (read from `path`).
pub fn parse_pools(path: &Path, text: &str) -> Result<Vec<PoolSpec>, ConfigError> {
    let file: ConfigFile = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        why: e.to_string(),
    })?;
    Ok(file.pools)
}

/// Attaches the line of the offending pool's definition to a pool error.
pub fn locate(path: &Path, text: &str, err: IpamError) -> ConfigError {
    let pool = match &err {
        IpamError::Range { pool, .. }
        | IpamError::Gateway { pool, .. }
        | IpamError::RouteGateway { pool, .. }
        | IpamError::Duplicate(pool) => Some(pool.clone()),
        _ => None,
    };
    let line = pool.and_then(|p| {
        text.lines().position(|l| {
            let l = l.trim().trim_start_matches('-').trim();
            l.strip_prefix("name:")
                .or_else(|| l.strip_prefix("\"name\":"))
                .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'' || c == ',') == p)
                .unwrap_or(false)
        })
    });
    ConfigError::Pool {
        path: path.into(),
        line: line.map(|l| l + 1),
        source: err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Pool;

    /// The seed's Solution 2 pools, verbatim ranges: they overrun their /27s.
    const SEED_SOLUTION2: &str = "pools:
  - name: eno3np1-rail1-node1
    subnet: 172.16.1.0/27
    gateway: 172.16.1.1
    ips:
      - 172.16.1.2-172.16.1.32
    routes:
      - to: 172.16.0.0/16
        via: 172.16.1.1
  - name: eno3np8-rail8-node1
    subnet: 172.16.1.224/27
    gateway: 172.16.1.225
    ips:
      - 172.16.1.226-172.16.1.256
";

    #[test]
    fn each_overrunning_seed_range_is_named_with_its_line() {
        let path = Path::new("pools.yaml");
        let specs = parse_pools(path, SEED_SOLUTION2).unwrap();
        let errors: Vec<String> = specs
            .into_iter()
            .filter_map(|s| Pool::new(s).err())
            .map(|e| locate(path, SEED_SOLUTION2, e).to_string())
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("line 2") && errors[0].contains("172.16.1.2-172.16.1.32"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].contains("line 10") && errors[1].contains("172.16.1.256"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn yaml_mistakes_point_at_the_line() {
        let bad = "pools:\n  - name: a\n    subnet: 10.0.0.0/24\n    gatway: 10.0.0.1\n";
        let err = parse_pools(Path::new("p.yaml"), bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gatway") && err.contains("line 4"), "{err}");
    }
}

/// Why each pool that is not pinned to exactly one node cannot be served
/// by a local store on one node of many: every node it names (all, when
/// it names none) would hand out the same addresses.
pub fn unpinned(pools: &[PoolSpec]) -> Vec<String> {
    pools
        .iter()
        .filter(|p| p.node_name.len() != 1)
        .map(|p| {
            let whose = if p.node_name.is_empty() {
                "every node".to_owned()
            } else {
                format!("nodes {}", p.node_name.join(", "))
            };
            format!(
                "pool {} would hand out the same addresses on {whose}: with the local store each node allocates on its own — pin it to one node (nodeName: [<node>]), or use ipam.store: kubernetes for pools shared by nodes",
                p.name
            )
        })
        .collect()
}

/// The field names a config struct accepts, as written in the file (after
/// serde's renames), read from its `Deserialize` impl: the chart's values
/// schema is tested against them, so the two cannot drift apart.
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};

    /// A deserializer that answers nothing but remembers the fields a
    /// struct asks for.
    struct Probe(&'static [&'static str]);

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> de::Deserializer<'de> for &mut Probe {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    let mut probe = Probe(&[]);
    // Always Err(Stop): the probe stops at the field list it was after.
    let _ = T::deserialize(&mut probe);
    probe.0
}

#[cfg(test)]
mod field_tests {
    use super::*;

    #[test]
    fn field_names_are_as_written_in_the_file() {
        let fields = field_names::<PoolSpec>();
        for f in ["name", "excludeIPs", "nodeName", "disable", "ipVersion"] {
            assert!(fields.contains(&f), "{f} not in {fields:?}");
        }
        assert_eq!(field_names::<ConfigFile>(), ["pools"]);
    }

    #[test]
    fn pools_for_a_local_store_on_many_nodes_are_pinned_to_one() {
        let pools = parse_pools(
            Path::new("pools.yaml"),
            "pools:\n\
             - {name: pinned, subnet: 172.16.1.0/27, nodeName: [n1]}\n\
             - {name: everywhere, subnet: 172.16.2.0/24}\n\
             - {name: two, subnet: 172.16.3.0/24, nodeName: [n1, n2]}\n",
        )
        .unwrap();
        let why = unpinned(&pools);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(
            why[0].starts_with("pool everywhere would hand out the same addresses on every node")
        );
        assert!(why[1].contains("pool two") && why[1].contains("nodes n1, n2"));
        assert!(why.iter().all(|w| w.contains("ipam.store: kubernetes")));
    }
}
