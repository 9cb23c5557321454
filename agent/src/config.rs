//! The agent's configuration: flags, env, and the pools file, validated
//! before anything binds.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ipam::{Ipam, IpamError, PoolSpec};

/// The pools file (`--config`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address pools.
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
}

/// Errors reading the config file.
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
    /// Not valid JSON of the expected shape; serde's message carries the
    /// line and column.
    #[error("config {path}: {source}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Error.
        source: serde_json::Error,
    },
    /// A pool that fails validation.
    #[error("config {path}: {source}")]
    Pool {
        /// Path.
        path: PathBuf,
        /// Error.
        source: IpamError,
    },
}

/// Reads and validates the pools file into an allocator.
pub fn load_pools(path: &Path) -> Result<Ipam, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let file: ConfigFile = serde_json::from_slice(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })?;
    Ipam::new(file.pools).map_err(|source| ConfigError::Pool {
        path: path.into(),
        source,
    })
}
