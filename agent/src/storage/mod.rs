//! Node storage: the pools this node offers and the volumes provisioned
//! from them.
//!
//! A **pool** is configured with `--storage-pool` ([`PoolConfig`]): a
//! directory (`type=dir`), a mounted btrfs filesystem (`type=btrfs`), a
//! whole block device (`type=device`, mounted by the agent) or a
//! loop-backed file (`type=loopfile`, for tests and small hosts; created,
//! formatted and mounted by the agent). A **volume** is provisioned in a
//! pool by one of two backends ([`Backend`]):
//!
//! - `file`: a sparse image file `<pool>/<volume>.ext4` of exactly the
//!   volume's size, formatted ext4 (mkfs.ext4), attached to a loop device
//!   and mounted at `<state_dir>/storage/volumes/<volume>`. The filesystem
//!   size is the quota: a write beyond it fails with ENOSPC.
//! - `btrfs`: a subvolume `<pool>/<volume>` with a qgroup limit
//!   (`max_referenced` = size) on a btrfs pool; a write beyond it fails
//!   with EDQUOT ("Disk quota exceeded").
//!
//! Every operation is idempotent. What was provisioned is recorded in
//! `<state_dir>/storage/volumes.json`, so an agent restart (or a host
//! reboot) mounts the same volumes again and loses no data. This module
//! owns those files, mounts and loop devices and nothing else: it does
//! not decide which volumes should exist (the controller does, through
//! the assignment) nor which containers mount them (the supervisor).
//!
//! All calls block (mkfs, mount, btrfs tools); async callers use
//! `spawn_blocking`. Mutating calls are serialised by one lock.

pub mod error;
pub mod sys;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

pub use error::StorageError;

/// How a volume is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// An ext4 image file per volume, loop-mounted.
    File,
    /// A btrfs subvolume with a qgroup limit.
    Btrfs,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Btrfs => "btrfs",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "file" | "image" | "ext4" => Ok(Backend::File),
            "btrfs" => Ok(Backend::Btrfs),
            other => Err(format!("backend must be file or btrfs, got {other:?}")),
        }
    }
}

/// The filesystem a `loopfile` or `device` pool is formatted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFs {
    Btrfs,
    Ext4,
}

impl PoolFs {
    fn as_str(self) -> &'static str {
        match self {
            PoolFs::Btrfs => "btrfs",
            PoolFs::Ext4 => "ext4",
        }
    }
}

/// What a pool is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolKind {
    /// A directory on any filesystem: `file` volumes only (and `btrfs`
    /// ones if the directory is on btrfs).
    Dir,
    /// A directory on a mounted btrfs filesystem: both backends.
    Btrfs,
    /// A whole block device the agent mounts (formatting it with `fs`
    /// only when `mkfs=true` and the device carries no filesystem).
    Device { fs: PoolFs, mkfs: bool },
    /// A file of `size` bytes the agent creates, formats with `fs` and
    /// mounts through a loop device.
    LoopFile { size: u64, fs: PoolFs },
}

impl PoolKind {
    pub fn label(&self) -> &'static str {
        match self {
            PoolKind::Dir => "dir",
            PoolKind::Btrfs => "btrfs",
            PoolKind::Device { .. } => "device",
            PoolKind::LoopFile { .. } => "loopfile",
        }
    }
}

/// One `--storage-pool` value:
/// `name=NAME,type=dir|btrfs|device|loopfile,path=PATH[,size=SIZE][,fs=btrfs|ext4][,mkfs=true]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub kind: PoolKind,
    /// The directory (dir, btrfs), the device (device) or the backing
    /// file (loopfile).
    pub path: PathBuf,
}

impl FromStr for PoolConfig {
    type Err = StorageError;
    fn from_str(spec: &str) -> Result<Self, StorageError> {
        let bad = |reason: String| StorageError::PoolSpec {
            spec: spec.to_string(),
            reason,
        };
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            if fields.insert(k.trim(), v.trim()).is_some() {
                return Err(bad(format!("{k} given twice")));
            }
        }
        for k in fields.keys() {
            if !["name", "type", "path", "size", "fs", "mkfs"].contains(k) {
                return Err(bad(format!(
                    "unknown key {k:?} (known: name, type, path, size, fs, mkfs)"
                )));
            }
        }
        let name = fields.get("name").copied().unwrap_or("default").to_string();
        if !is_name(&name) {
            return Err(bad(format!(
                "name {name:?} must be 1-63 lowercase letters, digits and '-'"
            )));
        }
        let path = PathBuf::from(
            fields
                .get("path")
                .ok_or_else(|| bad("path is required".to_string()))?,
        );
        if !path.is_absolute() {
            return Err(bad(format!("path {} must be absolute", path.display())));
        }
        let fs = match fields.get("fs").copied() {
            None | Some("btrfs") => PoolFs::Btrfs,
            Some("ext4") => PoolFs::Ext4,
            Some(o) => return Err(bad(format!("fs must be btrfs or ext4, got {o:?}"))),
        };
        let kind = match fields.get("type").copied().unwrap_or("dir") {
            "dir" => PoolKind::Dir,
            "btrfs" => PoolKind::Btrfs,
            "device" => PoolKind::Device {
                fs,
                mkfs: match fields.get("mkfs").copied() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(o) => return Err(bad(format!("mkfs must be true or false, got {o:?}"))),
                },
            },
            "loopfile" => {
                let size = fields
                    .get("size")
                    .ok_or_else(|| bad("size is required for type=loopfile".to_string()))?;
                let size = ironmesh_api::quantity::parse_bytes(size)
                    .map_err(|e| bad(format!("size: {e}")))?;
                if size < 128 << 20 {
                    return Err(bad("size must be at least 128Mi".to_string()));
                }
                PoolKind::LoopFile { size, fs }
            }
            o => {
                return Err(bad(format!(
                    "type must be dir, btrfs, device or loopfile, got {o:?}"
                )))
            }
        };
        Ok(PoolConfig { name, kind, path })
    }
}

/// True for a DNS-1123 label (pool and volume names become file names).
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Where storage keeps its state and which pools it offers (the first is
/// the default).
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The agent's state directory; storage uses `<state_dir>/storage/`.
    pub state_dir: PathBuf,
    pub pools: Vec<PoolConfig>,
}

/// A pool as reported to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    /// dir, btrfs, device, loopfile.
    pub kind: String,
    /// Where its volumes live.
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Sum of the sizes of the volumes provisioned in it.
    pub allocated_bytes: u64,
    /// In order of preference; the first is the pool's default.
    pub backends: Vec<Backend>,
}

/// A volume's use of its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeUsage {
    pub name: String,
    pub pool: String,
    pub backend: Backend,
    pub size_bytes: u64,
    pub used_bytes: u64,
    /// The directory containers mount.
    pub path: PathBuf,
}

/// A volume the assignment binds to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedVolume {
    pub name: String,
    pub size_bytes: u64,
    /// `None`: the pool's default.
    pub backend: Option<Backend>,
    /// `None`: the first pool that supports the backend.
    pub pool: Option<String>,
}

/// What the assignment says about this node's volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumePlan {
    /// Every volume bound to this node.
    pub wanted: Vec<WantedVolume>,
    /// Deleted Volumes whose data must go (the only volumes ever deleted).
    pub remove: Vec<String>,
}

/// What was provisioned for one volume (persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeRecord {
    pool: String,
    backend: Backend,
    size_bytes: u64,
    /// The directory containers mount.
    path: PathBuf,
    /// The image file (`file` backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<PathBuf>,
}

struct Pool {
    cfg: PoolConfig,
    /// Where volumes are created.
    root: PathBuf,
    /// Whether `root` is on btrfs.
    btrfs: bool,
    /// Mounted by the agent (device, loopfile).
    mounted_by_agent: bool,
}

impl Pool {
    fn backends(&self) -> Vec<Backend> {
        if self.btrfs {
            vec![Backend::Btrfs, Backend::File]
        } else {
            vec![Backend::File]
        }
    }
}

/// The node's pools and volumes. See the module docs.
pub struct Storage {
    dir: PathBuf,
    pools: Vec<Pool>,
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
    op: Mutex<()>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("dir", &self.dir)
            .field(
                "pools",
                &self.pools.iter().map(|p| &p.cfg.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

const STATE_FILE: &str = "volumes.json";

impl Storage {
    /// Sets up every pool (creating, formatting and mounting `loopfile`
    /// and `device` pools as needed), then mounts again every `file`
    /// volume recorded in the state directory. A recorded volume that
    /// cannot be mounted is logged and retried by the next `provision`.
    pub fn open(cfg: StorageConfig) -> Result<Storage, StorageError> {
        let dir = cfg.state_dir.join("storage");
        for d in [dir.clone(), dir.join("pools"), dir.join("volumes")] {
            std::fs::create_dir_all(&d).map_err(|source| StorageError::State {
                path: d.clone(),
                source,
            })?;
        }
        let mut pools: Vec<Pool> = Vec::new();
        for pc in cfg.pools {
            if pools.iter().any(|p| p.cfg.name == pc.name) {
                return Err(StorageError::Pool {
                    pool: pc.name,
                    reason: "configured twice".to_string(),
                });
            }
            pools.push(setup_pool(&dir, pc)?);
        }
        let state = dir.join(STATE_FILE);
        let volumes: BTreeMap<String, VolumeRecord> = match std::fs::read(&state) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StorageError::State {
                path: state.clone(),
                source: std::io::Error::other(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(StorageError::State {
                    path: state,
                    source,
                })
            }
        };
        let storage = Storage {
            dir,
            pools,
            volumes: Mutex::new(volumes),
            op: Mutex::new(()),
        };
        let recorded = storage.records();
        for (name, rec) in recorded {
            let Some(pool) = storage.pool(&rec.pool) else {
                tracing::warn!(volume = %name, pool = %rec.pool, "volume's pool is no longer configured; not mounted");
                continue;
            };
            if rec.backend == Backend::File {
                match storage.ensure_image(pool, &name, rec.size_bytes) {
                    Ok(_) => {
                        tracing::info!(volume = %name, pool = %rec.pool, "volume mounted again")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %name, error = %e, "cannot mount a recorded volume again")
                    }
                }
            }
        }
        tracing::info!(
            pools = ?storage.pools.iter().map(|p| p.cfg.name.as_str()).collect::<Vec<_>>(),
            volumes = storage.records().len(),
            "storage ready"
        );
        Ok(storage)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.op.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn records(&self) -> BTreeMap<String, VolumeRecord> {
        self.volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record(&self, name: &str, rec: Option<VolumeRecord>) -> Result<(), StorageError> {
        let mut v = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        match rec {
            Some(r) => v.insert(name.to_string(), r),
            None => v.remove(name),
        };
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let err = |source| StorageError::State {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&*v).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(())
    }

    fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.cfg.name == name)
    }

    /// The pool a new volume goes to: `pool` if named, else the first
    /// pool that supports `backend` (or the first pool, with its default
    /// backend).
    fn choose(
        &self,
        volume: &str,
        backend: Option<Backend>,
        pool: Option<&str>,
    ) -> Result<(&Pool, Backend), StorageError> {
        let no_pool = || StorageError::NoPool {
            volume: volume.to_string(),
            backend: backend.map(|b| b.to_string()).unwrap_or("any".into()),
            pool: pool.map(str::to_string),
        };
        let candidates = self
            .pools
            .iter()
            .filter(|p| pool.is_none_or(|n| p.cfg.name == n));
        for p in candidates {
            let supported = p.backends();
            match backend {
                Some(b) if supported.contains(&b) => return Ok((p, b)),
                Some(_) => {}
                None => return Ok((p, supported[0])),
            }
        }
        Err(no_pool())
    }

    /// Makes `volume` exist with `size` bytes and returns the directory to
    /// mount into containers. Idempotent: an existing volume is mounted
    /// again if needed and its path returned; asking for another backend
    /// or size than it has is an error (volumes are not resized).
    pub fn provision(
        &self,
        volume: &str,
        size: u64,
        backend: Option<Backend>,
        pool: Option<&str>,
    ) -> Result<PathBuf, StorageError> {
        if !is_name(volume) {
            return Err(StorageError::InvalidVolume {
                volume: volume.to_string(),
                reason: "the name must be 1-63 lowercase letters, digits and '-'".into(),
            });
        }
        if size < 1 << 20 {
            return Err(StorageError::InvalidVolume {
                volume: volume.to_string(),
                reason: format!("size {size} is below the minimum of 1Mi"),
            });
        }
        let _op = self.lock();
        if let Some(rec) = self.records().get(volume).cloned() {
            if backend.is_some_and(|b| b != rec.backend) || rec.size_bytes != size {
                return Err(StorageError::Conflict {
                    volume: volume.to_string(),
                    have: format!(
                        "{} of {} bytes in pool {}",
                        rec.backend, rec.size_bytes, rec.pool
                    ),
                    want: format!(
                        "{} of {size} bytes",
                        backend
                            .map(|b| b.to_string())
                            .unwrap_or("any backend".into())
                    ),
                });
            }
            let pool = self.pool(&rec.pool).ok_or_else(|| StorageError::NoPool {
                volume: volume.to_string(),
                backend: rec.backend.to_string(),
                pool: Some(rec.pool.clone()),
            })?;
            return match rec.backend {
                Backend::File => self.ensure_image(pool, volume, size),
                Backend::Btrfs => self.ensure_subvolume(pool, volume, size),
            };
        }
        let (pool, backend) = self.choose(volume, backend, pool)?;
        let path = match backend {
            Backend::File => self.ensure_image(pool, volume, size)?,
            Backend::Btrfs => self.ensure_subvolume(pool, volume, size)?,
        };
        self.record(
            volume,
            Some(VolumeRecord {
                pool: pool.cfg.name.clone(),
                backend,
                size_bytes: size,
                path: path.clone(),
                image: (backend == Backend::File).then(|| image_path(pool, volume)),
            }),
        )?;
        tracing::info!(volume, pool = %pool.cfg.name, %backend, size, path = %path.display(), "volume provisioned");
        Ok(path)
    }

    /// Where volumes are mounted on the host (their data is counted as
    /// volumes, not as agent state).
    pub fn volumes_dir(&self) -> PathBuf {
        self.dir.join("volumes")
    }

    fn mountpoint(&self, volume: &str) -> PathBuf {
        self.dir.join("volumes").join(volume)
    }

    /// `file` backend: image file, formatted once, mounted at the
    /// volume's mount point.
    fn ensure_image(&self, pool: &Pool, volume: &str, size: u64) -> Result<PathBuf, StorageError> {
        let image = image_path(pool, volume);
        if !image.exists() {
            // Format a temporary file and rename it: a crash never leaves
            // a half-formatted image under the real name.
            let tmp = pool.root.join(format!(".{volume}.ext4.tmp"));
            sys::sparse_file(&tmp, 0)
                .and_then(|_| std::fs::OpenOptions::new().write(true).open(&tmp))
                .and_then(|f| f.set_len(size))
                .map_err(StorageError::vol_io(
                    volume,
                    "creating the image file",
                    &tmp,
                ))?;
            let tmp_s = tmp.display().to_string();
            sys::run(
                &format!("volume {volume}: formatting the image"),
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-L",
                    &volume.chars().take(16).collect::<String>(),
                    "-E",
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                    &tmp_s,
                ],
            )
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            std::fs::rename(&tmp, &image).map_err(StorageError::vol_io(
                volume,
                "renaming the formatted image",
                &image,
            ))?;
            tracing::debug!(volume, image = %image.display(), size, "image formatted");
        } else {
            let fs = sys::detect_fs(&image).map_err(StorageError::vol_io(
                volume,
                "reading the image",
                &image,
            ))?;
            if fs != Some("ext4") {
                return Err(StorageError::InvalidVolume {
                    volume: volume.to_string(),
                    reason: format!("{} exists but holds no ext4 filesystem", image.display()),
                });
            }
        }
        let target = self.mountpoint(volume);
        std::fs::create_dir_all(&target).map_err(StorageError::vol_io(
            volume,
            "creating the mount point",
            &target,
        ))?;
        if let Some(m) = sys::mounted_source(&target) {
            let loops = sys::loops_backed_by(&image);
            if loops.iter().any(|l| Path::new(&m.source) == l) {
                return Ok(target);
            }
            return Err(StorageError::InvalidVolume {
                volume: volume.to_string(),
                reason: format!(
                    "{} is already mounted from {} ({}), not from its image",
                    target.display(),
                    m.source,
                    m.fstype
                ),
            });
        }
        let dev = sys::loop_attach(&image).map_err(StorageError::vol_io(
            volume,
            "attaching a loop device",
            &image,
        ))?;
        sys::mount(&dev.path, &target, "ext4", "").map_err(StorageError::vol_io(
            volume,
            "mounting the image",
            &dev.path,
        ))?;
        tracing::debug!(volume, device = %dev.path.display(), target = %target.display(), "image mounted");
        // Dropping the handle leaves the mount as the device's only user.
        drop(dev);
        Ok(target)
    }

    /// `btrfs` backend: a subvolume with a qgroup limit.
    fn ensure_subvolume(
        &self,
        pool: &Pool,
        volume: &str,
        size: u64,
    ) -> Result<PathBuf, StorageError> {
        let what = format!("volume {volume}");
        let root = pool.root.display().to_string();
        let path = pool.root.join(volume);
        let path_s = path.display().to_string();
        // Idempotent: enabling quotas twice is a no-op.
        sys::run(
            &format!("pool {}: enabling quotas", pool.cfg.name),
            "btrfs",
            &["quota", "enable", &root],
        )?;
        if !path.exists() {
            sys::run(&what, "btrfs", &["subvolume", "create", &path_s])?;
        } else {
            use std::os::unix::fs::MetadataExt;
            let ino = std::fs::metadata(&path)
                .map_err(StorageError::vol_io(
                    volume,
                    "inspecting the subvolume",
                    &path,
                ))?
                .ino();
            if ino != 256 {
                return Err(StorageError::InvalidVolume {
                    volume: volume.to_string(),
                    reason: format!("{} exists but is not a btrfs subvolume", path.display()),
                });
            }
        }
        sys::run(
            &what,
            "btrfs",
            &["qgroup", "limit", &size.to_string(), &path_s],
        )?;
        Ok(path)
    }

    /// Used and total bytes of one volume.
    pub fn usage(&self, volume: &str) -> Result<VolumeUsage, StorageError> {
        let rec = self
            .records()
            .get(volume)
            .cloned()
            .ok_or_else(|| StorageError::NotFound {
                volume: volume.to_string(),
            })?;
        let used =
            match rec.backend {
                Backend::File => {
                    if sys::mounted_source(&rec.path).is_none() {
                        return Err(StorageError::InvalidVolume {
                            volume: volume.to_string(),
                            reason: format!("{} is not mounted", rec.path.display()),
                        });
                    }
                    let (total, free, _) = sys::statvfs(&rec.path)
                        .map_err(StorageError::vol_io(volume, "reading usage", &rec.path))?;
                    total.saturating_sub(free)
                }
                Backend::Btrfs => btrfs_referenced(volume, &rec.path)?,
            };
        Ok(VolumeUsage {
            name: volume.to_string(),
            pool: rec.pool,
            backend: rec.backend,
            size_bytes: rec.size_bytes,
            used_bytes: used,
            path: rec.path,
        })
    }

    /// Usage of every provisioned volume (a volume whose usage cannot be
    /// read is logged and left out).
    pub fn volumes(&self) -> Vec<VolumeUsage> {
        self.records()
            .keys()
            .filter_map(|name| match self.usage(name) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "cannot read volume usage");
                    None
                }
            })
            .collect()
    }

    /// Names of the provisioned volumes.
    pub fn names(&self) -> Vec<String> {
        self.records().into_keys().collect()
    }

    /// Capacity and free space of every pool.
    pub fn pools(&self) -> Vec<PoolUsage> {
        let records = self.records();
        self.pools
            .iter()
            .map(|p| {
                let (capacity, _, avail) = sys::statvfs(&p.root).unwrap_or_else(|e| {
                    tracing::warn!(pool = %p.cfg.name, error = %e, "cannot read pool capacity");
                    (0, 0, 0)
                });
                PoolUsage {
                    name: p.cfg.name.clone(),
                    kind: p.cfg.kind.label().to_string(),
                    path: p.root.clone(),
                    capacity_bytes: capacity,
                    free_bytes: avail,
                    allocated_bytes: records
                        .values()
                        .filter(|r| r.pool == p.cfg.name)
                        .map(|r| r.size_bytes)
                        .sum(),
                    backends: p.backends(),
                }
            })
            .collect()
    }

    /// Removes a volume and its data: unmounts it (the loop device goes
    /// with the mount), removes the image file or the subvolume and its
    /// qgroup. Returns false if it was not provisioned. The caller makes
    /// sure no container mounts it any more.
    pub fn delete(&self, volume: &str) -> Result<bool, StorageError> {
        let _op = self.lock();
        let Some(rec) = self.records().get(volume).cloned() else {
            return Ok(false);
        };
        match rec.backend {
            Backend::File => {
                let target = self.mountpoint(volume);
                sys::unmount(&target).map_err(StorageError::vol_io(
                    volume,
                    "unmounting",
                    &target,
                ))?;
                if let Some(image) = &rec.image {
                    // Autoclear detaches the device on unmount; detach by
                    // hand whatever is still attached (the kernel refuses
                    // while something else holds it).
                    for dev in sys::loops_backed_by(image) {
                        sys::loop_detach(&dev).map_err(StorageError::vol_io(
                            volume,
                            "detaching the loop device",
                            &dev,
                        ))?;
                    }
                    match std::fs::remove_file(image) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(StorageError::vol_io(volume, "removing the image", image)(
                                e,
                            ))
                        }
                        _ => {}
                    }
                }
                let _ = std::fs::remove_dir(&target);
            }
            Backend::Btrfs => {
                if rec.path.exists() {
                    let id = btrfs_rootid(volume, &rec.path).ok();
                    let path_s = rec.path.display().to_string();
                    sys::run(
                        &format!("volume {volume}"),
                        "btrfs",
                        &["subvolume", "delete", "--commit-after", &path_s],
                    )?;
                    if let (Some(id), Some(pool)) = (id, self.pool(&rec.pool)) {
                        let root = pool.root.display().to_string();
                        if let Err(e) = sys::run(
                            &format!("volume {volume}"),
                            "btrfs",
                            &["qgroup", "destroy", &format!("0/{id}"), &root],
                        ) {
                            tracing::debug!(volume, error = %e, "stale qgroup left for the kernel to clean");
                        }
                    }
                }
            }
        }
        self.record(volume, None)?;
        tracing::info!(volume, pool = %rec.pool, backend = %rec.backend, "volume deleted");
        Ok(true)
    }

    /// Makes this node's volumes match the assignment: provisions every
    /// wanted volume (so it is allocated, and its usage reported, before
    /// an instance mounts it) and deletes the provisioned ones the plan
    /// names for removal — unless `keep` names them (an instance here
    /// still mounts them) or `may_delete` is false (removals are under
    /// way). A provisioned volume the plan does not mention is kept with
    /// its data: the controller may be on an empty or wrong store, and
    /// reports it as orphaned. Returns the failures; each names its volume.
    pub fn converge(
        &self,
        plan: &VolumePlan,
        keep: &std::collections::HashSet<String>,
        may_delete: bool,
    ) -> Vec<StorageError> {
        let mut errors = Vec::new();
        for w in &plan.wanted {
            if plan.remove.contains(&w.name) {
                continue; // the old data goes first
            }
            if let Err(e) = self.provision(&w.name, w.size_bytes, w.backend, w.pool.as_deref()) {
                errors.push(e);
            }
        }
        if !may_delete {
            return errors;
        }
        let held = self.names();
        for name in &plan.remove {
            if keep.contains(name) || !held.contains(name) {
                continue;
            }
            tracing::info!(volume = %name, "volume was deleted; removing its data");
            if let Err(e) = self.delete(name) {
                errors.push(e);
            }
        }
        errors
    }

    /// Unmounts every volume and every pool the agent mounted, keeping
    /// the data and the records (tests, decommissioning). The next
    /// [`Storage::open`] mounts them again.
    pub fn release(&self) -> Result<(), StorageError> {
        let _op = self.lock();
        for (name, rec) in self.records() {
            if rec.backend == Backend::File {
                let target = self.mountpoint(&name);
                sys::unmount(&target).map_err(StorageError::vol_io(
                    &name,
                    "unmounting",
                    &target,
                ))?;
            }
        }
        for p in &self.pools {
            if p.mounted_by_agent {
                sys::unmount(&p.root).map_err(StorageError::pool_io(
                    &p.cfg.name,
                    "unmounting",
                    &p.root,
                ))?;
            }
        }
        Ok(())
    }
}

fn image_path(pool: &Pool, volume: &str) -> PathBuf {
    pool.root.join(format!("{volume}.ext4"))
}

fn btrfs_rootid(volume: &str, path: &Path) -> Result<u64, StorageError> {
    let out = sys::run(
        &format!("volume {volume}"),
        "btrfs",
        &["inspect-internal", "rootid", &path.display().to_string()],
    )?;
    out.trim().parse().map_err(|_| StorageError::InvalidVolume {
        volume: volume.to_string(),
        reason: format!("btrfs printed an unexpected subvolume id {:?}", out.trim()),
    })
}

/// Referenced bytes of the subvolume's qgroup (after a sync, so that the
/// figure includes what was just written).
fn btrfs_referenced(volume: &str, path: &Path) -> Result<u64, StorageError> {
    let id = btrfs_rootid(volume, path)?;
    let out = sys::run(
        &format!("volume {volume}"),
        "btrfs",
        &[
            "qgroup",
            "show",
            "--raw",
            "--sync",
            "-f",
            &path.display().to_string(),
        ],
    )?;
    let want = format!("0/{id}");
    out.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(want.as_str())).then(|| f.next().and_then(|v| v.parse().ok()))?
        })
        .ok_or_else(|| StorageError::InvalidVolume {
            volume: volume.to_string(),
            reason: format!("no qgroup {want} in `btrfs qgroup show` output"),
        })
}

/// Checks a configured pool and mounts it when the agent owns the mount.
fn setup_pool(dir: &Path, cfg: PoolConfig) -> Result<Pool, StorageError> {
    let name = cfg.name.clone();
    let (root, mounted_by_agent) = match &cfg.kind {
        PoolKind::Dir | PoolKind::Btrfs => {
            std::fs::create_dir_all(&cfg.path).map_err(StorageError::pool_io(
                &name,
                "creating the pool directory",
                &cfg.path,
            ))?;
            (cfg.path.clone(), false)
        }
        PoolKind::LoopFile { size, fs } => {
            if let Some(parent) = cfg.path.parent() {
                std::fs::create_dir_all(parent).map_err(StorageError::pool_io(
                    &name,
                    "creating the backing file's directory",
                    parent,
                ))?;
            }
            let fresh = !cfg.path.exists();
            if fresh {
                sys::sparse_file(&cfg.path, *size).map_err(StorageError::pool_io(
                    &name,
                    "creating the backing file",
                    &cfg.path,
                ))?;
            }
            let found = sys::detect_fs(&cfg.path).map_err(StorageError::pool_io(
                &name,
                "reading the backing file",
                &cfg.path,
            ))?;
            match found {
                None => mkfs(&name, *fs, &cfg.path)?,
                Some(f) if f == fs.as_str() => {}
                Some(f) => {
                    return Err(StorageError::Pool {
                        pool: name,
                        reason: format!("{} holds {f}, not {}", cfg.path.display(), fs.as_str()),
                    })
                }
            }
            let target = dir.join("pools").join(&name);
            mount_pool(&name, &cfg.path, &target, *fs, true)?;
            (target, true)
        }
        PoolKind::Device {
            fs,
            mkfs: allow_mkfs,
        } => {
            let found = sys::detect_fs(&cfg.path).map_err(StorageError::pool_io(
                &name,
                "reading the device",
                &cfg.path,
            ))?;
            match found {
                None if *allow_mkfs => mkfs(&name, *fs, &cfg.path)?,
                None => {
                    return Err(StorageError::Pool {
                        pool: name,
                        reason: format!(
                            "{} carries no filesystem; format it or add mkfs=true",
                            cfg.path.display()
                        ),
                    })
                }
                Some(f) if f == fs.as_str() => {}
                Some(f) => {
                    return Err(StorageError::Pool {
                        pool: name,
                        reason: format!(
                            "{} holds {f}, not {} (set fs={f})",
                            cfg.path.display(),
                            fs.as_str()
                        ),
                    })
                }
            }
            let target = dir.join("pools").join(&name);
            mount_pool(&name, &cfg.path, &target, *fs, false)?;
            (target, true)
        }
    };
    let magic = sys::fs_magic(&root).map_err(StorageError::pool_io(&name, "inspecting", &root))?;
    let btrfs = magic == sys::BTRFS_SUPER_MAGIC;
    if cfg.kind == PoolKind::Btrfs && !btrfs {
        return Err(StorageError::Pool {
            pool: name,
            reason: format!(
                "{} is not on a btrfs filesystem (type=btrfs needs one)",
                root.display()
            ),
        });
    }
    tracing::info!(pool = %name, kind = cfg.kind.label(), root = %root.display(), btrfs, "storage pool ready");
    Ok(Pool {
        cfg,
        root,
        btrfs,
        mounted_by_agent,
    })
}

fn mkfs(pool: &str, fs: PoolFs, path: &Path) -> Result<(), StorageError> {
    let p = path.display().to_string();
    let what = format!("pool {pool}: formatting {p}");
    match fs {
        PoolFs::Btrfs => sys::run(&what, "mkfs.btrfs", &["-q", "-f", "-L", pool, &p])?,
        PoolFs::Ext4 => sys::run(&what, "mkfs.ext4", &["-q", "-F", "-L", pool, &p])?,
    };
    tracing::info!(pool, device = %p, fs = fs.as_str(), "pool formatted");
    Ok(())
}

fn mount_pool(
    pool: &str,
    source: &Path,
    target: &Path,
    fs: PoolFs,
    via_loop: bool,
) -> Result<(), StorageError> {
    std::fs::create_dir_all(target).map_err(StorageError::pool_io(
        pool,
        "creating the mount point",
        target,
    ))?;
    if let Some(m) = sys::mounted_source(target) {
        let ok = if via_loop {
            sys::loops_backed_by(source)
                .iter()
                .any(|l| Path::new(&m.source) == l)
        } else {
            Path::new(&m.source) == source
        };
        if ok {
            return Ok(());
        }
        return Err(StorageError::Pool {
            pool: pool.to_string(),
            reason: format!("{} is already mounted from {}", target.display(), m.source),
        });
    }
    if via_loop {
        let dev = sys::loop_attach(source).map_err(StorageError::pool_io(
            pool,
            "attaching a loop device",
            source,
        ))?;
        sys::mount(&dev.path, target, fs.as_str(), "")
            .map_err(StorageError::pool_io(pool, "mounting", &dev.path))?;
    } else {
        sys::mount(source, target, fs.as_str(), "")
            .map_err(StorageError::pool_io(pool, "mounting", source))?;
    }
    tracing::info!(pool, source = %source.display(), target = %target.display(), "pool mounted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_flags_parse() {
        let p: PoolConfig = "name=default,type=dir,path=/var/lib/ironmesh/volumes"
            .parse()
            .unwrap();
        assert_eq!(p.kind, PoolKind::Dir);
        assert_eq!(p.path, Path::new("/var/lib/ironmesh/volumes"));
        let p: PoolConfig = "name=fast,type=loopfile,path=/tmp/p.img,size=256Mi,fs=ext4"
            .parse()
            .unwrap();
        assert_eq!(
            p.kind,
            PoolKind::LoopFile {
                size: 256 << 20,
                fs: PoolFs::Ext4
            }
        );
        let p: PoolConfig = "type=device,path=/dev/sdb,mkfs=true".parse().unwrap();
        assert_eq!(p.name, "default");
        assert_eq!(
            p.kind,
            PoolKind::Device {
                fs: PoolFs::Btrfs,
                mkfs: true
            }
        );
    }

    #[test]
    fn pool_flags_are_checked() {
        for (spec, fragment) in [
            ("name=a,type=dir", "path is required"),
            ("name=a,type=dir,path=rel", "must be absolute"),
            ("name=A,type=dir,path=/x", "lowercase"),
            ("name=a,type=zfs,path=/x", "type must be"),
            ("name=a,type=loopfile,path=/x", "size is required"),
            ("name=a,type=loopfile,path=/x,size=1Mi", "at least 128Mi"),
            ("name=a,type=dir,path=/x,color=red", "unknown key"),
            ("name=a,name=b,path=/x", "given twice"),
            ("name=a,path=/x,fs=xfs", "fs must be"),
            ("junk", "not key=value"),
        ] {
            let e = spec.parse::<PoolConfig>().unwrap_err().to_string();
            assert!(e.contains(fragment), "{spec}: {e}");
        }
    }

    #[test]
    fn backend_names() {
        assert_eq!("file".parse::<Backend>(), Ok(Backend::File));
        assert_eq!("btrfs".parse::<Backend>(), Ok(Backend::Btrfs));
        assert!("zfs".parse::<Backend>().is_err());
    }
}
