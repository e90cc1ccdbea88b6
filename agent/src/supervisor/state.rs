//! `state.json` of one instance: what must survive an agent restart so an
//! adopted instance keeps its restart count and start time.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub(crate) const FILE: &str = "state.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub spec_generation: u64,
    pub restarts: u32,
    /// When the current (or last) task started; 0 if never.
    #[serde(default)]
    pub started_unix_ms: i64,
    #[serde(default)]
    pub last_exit_code: Option<i32>,
    /// The last run ended for good (restart policy): its task was deleted
    /// to free the shim, so an adopting agent must not start it again.
    #[serde(default)]
    pub finished: bool,
}

impl Persisted {
    /// The saved state of `dir`, if it is for `generation`; a missing or
    /// unreadable file, or another generation, starts from zero.
    pub fn load(dir: &Path, generation: u64) -> Persisted {
        let fresh = Persisted {
            spec_generation: generation,
            ..Default::default()
        };
        let Ok(data) = std::fs::read(dir.join(FILE)) else {
            return fresh;
        };
        match serde_json::from_slice::<Persisted>(&data) {
            Ok(p) if p.spec_generation == generation => p,
            Ok(_) => fresh,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "unreadable instance state; starting the count over");
                fresh
            }
        }
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        ironmesh_process::write_file_atomic(&dir.join(FILE), &data, 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_generation_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persisted {
            spec_generation: 3,
            restarts: 5,
            started_unix_ms: 1_700_000_000_000,
            last_exit_code: Some(3),
            finished: true,
        };
        p.save(dir.path()).unwrap();
        assert_eq!(Persisted::load(dir.path(), 3), p);
        assert_eq!(Persisted::load(dir.path(), 4).restarts, 0);
        std::fs::write(dir.path().join(FILE), b"{broken").unwrap();
        assert_eq!(Persisted::load(dir.path(), 3).restarts, 0);
    }
}
