//! Errors of the storage module: each names the volume or pool, the path or
//! device, and the step that failed.

use std::path::PathBuf;

/// What went wrong while configuring a pool or handling a volume.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("--storage-pool {spec:?}: {reason}")]
    PoolSpec { spec: String, reason: String },
    #[error("pool {pool}: {step} ({}): {source}", path.display())]
    PoolIo {
        pool: String,
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pool {pool}: {reason}")]
    Pool { pool: String, reason: String },
    #[error("volume {volume:?}: {reason}")]
    InvalidVolume { volume: String, reason: String },
    #[error("volume {volume}: no pool on this node supports backend {backend}{}", pool.as_ref().map(|p| format!(" (asked for pool {p})")).unwrap_or_default())]
    NoPool {
        volume: String,
        backend: String,
        pool: Option<String>,
    },
    #[error("volume {volume} is already provisioned as {have}, not {want}")]
    Conflict {
        volume: String,
        have: String,
        want: String,
    },
    #[error("volume {volume}: {step} ({}): {source}", path.display())]
    VolumeIo {
        volume: String,
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: `{command}` failed: {output}")]
    Command {
        what: String,
        command: String,
        output: String,
    },
    #[error("volume {volume} is not provisioned on this node")]
    NotFound { volume: String },
    #[error("cannot save the storage state to {}: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub(crate) fn vol_io(
        volume: &str,
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StorageError {
        let volume = volume.to_string();
        let path = path.into();
        move |source| StorageError::VolumeIo {
            volume,
            step,
            path,
            source,
        }
    }

    pub(crate) fn pool_io(
        pool: &str,
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StorageError {
        let pool = pool.to_string();
        let path = path.into();
        move |source| StorageError::PoolIo {
            pool,
            step,
            path,
            source,
        }
    }
}
