//! Volume backends against the real kernel (root, e2fsprogs, btrfs-progs).
//!
//! Each test gets its own state directory under a temporary directory;
//! its fixture unmounts everything mounted below it (volumes and pools;
//! loop devices go with their mounts through autoclear) when dropped, also
//! on panic, and the test checks that nothing is left.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use ironmesh_agent::storage::sys;
use ironmesh_agent::storage::{Backend, PoolConfig, Storage, StorageConfig};

const MIB: u64 = 1 << 20;

/// A temporary state directory; dropping it unmounts whatever is still
/// mounted below it (deepest first), then removes it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::Builder::new()
                .prefix("ironmesh-storage-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn open(&self, pools: &[String]) -> Storage {
        Storage::open(StorageConfig {
            state_dir: self.path().join("state"),
            pools: pools
                .iter()
                .map(|p| p.parse::<PoolConfig>().unwrap())
                .collect(),
        })
        .expect("storage opens")
    }

    fn mounts_below(&self) -> Vec<PathBuf> {
        let root = self.path();
        let mut m: Vec<PathBuf> = sys::mounts()
            .into_iter()
            .map(|m| m.target)
            .filter(|t| t.starts_with(root))
            .collect();
        m.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        m
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for t in self.mounts_below() {
            let _ = sys::unmount(&t);
        }
    }
}

fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

/// Writes `bytes` in 1 MiB chunks with fsync; returns how many bytes were
/// written before the first error and that error.
/// True once no loop device is backed by `file`, within 10 s: the kernel
/// detaches an autoclear device after its last close, asynchronously, and
/// later on a loaded machine.
fn loops_gone(file: &Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if sys::loops_backed_by(file).is_empty() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn fill(path: &Path, bytes: u64) -> (u64, Option<std::io::Error>) {
    let mut f = std::fs::File::create(path).expect("create");
    let chunk = vec![0xa5u8; MIB as usize];
    let mut written = 0;
    while written < bytes {
        if let Err(e) = f.write_all(&chunk) {
            return (written, Some(e));
        }
        written += MIB;
    }
    match f.sync_all() {
        Ok(()) => (written, None),
        Err(e) => (written, Some(e)),
    }
}

#[test]
fn ext4_image_volume_quota_usage_restart_and_delete() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let pool_dir = fx.path().join("pool");
    let pools = vec![format!("name=default,type=dir,path={}", pool_dir.display())];
    let storage = fx.open(&pools);
    assert_eq!(storage.pools()[0].backends, vec![Backend::File]);

    let path = storage
        .provision("data", 16 * MIB, Some(Backend::File), None)
        .expect("provision");
    // Idempotent: same path, nothing reformatted.
    std::fs::write(path.join("hello.txt"), b"kept").unwrap();
    assert_eq!(
        storage
            .provision("data", 16 * MIB, Some(Backend::File), None)
            .unwrap(),
        path
    );
    assert_eq!(std::fs::read(path.join("hello.txt")).unwrap(), b"kept");
    let image = pool_dir.join("data.ext4");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 16 * MIB);
    let loops = sys::loops_backed_by(&image);
    assert_eq!(loops.len(), 1, "one loop device: {loops:?}");

    // Another backend or size for the same volume is refused.
    let e = storage
        .provision("data", 32 * MIB, Some(Backend::File), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already provisioned"), "{e}");
    let e = storage
        .provision("other", 16 * MIB, Some(Backend::Btrfs), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no pool on this node supports backend btrfs"),
        "{e}"
    );

    // Usage.
    let before = storage.usage("data").unwrap();
    let (written, err) = fill(&path.join("four"), 4 * MIB);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(written, 4 * MIB);
    let after = storage.usage("data").unwrap();
    assert_eq!(after.size_bytes, 16 * MIB);
    assert!(
        after.used_bytes >= before.used_bytes + 4 * MIB,
        "usage grows by the write: {before:?} -> {after:?}"
    );
    eprintln!(
        "ext4 16Mi volume: used {} bytes empty, {} after 4Mi",
        before.used_bytes, after.used_bytes
    );
    let pool = &storage.pools()[0];
    assert_eq!(pool.allocated_bytes, 16 * MIB);
    assert!(pool.capacity_bytes > 0);

    // Quota: writing beyond the size fails with ENOSPC.
    let (written, err) = fill(&path.join("big"), 32 * MIB);
    let err = err.expect("a write beyond the quota must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written < 16 * MIB, "wrote {written} bytes");
    eprintln!(
        "ext4 quota: ENOSPC after {} MiB of a 16 MiB volume holding 4 MiB",
        written / MIB
    );
    std::fs::remove_file(path.join("big")).unwrap();

    // Agent restart: release the mounts, open again, data still there.
    storage.release().unwrap();
    assert!(sys::mounted_source(&path).is_none());
    assert!(loops_gone(&image), "autoclear detached the device");
    drop(storage);
    let storage = fx.open(&pools);
    assert!(
        sys::mounted_source(&path).is_some(),
        "mounted again at open"
    );
    assert_eq!(std::fs::read(path.join("hello.txt")).unwrap(), b"kept");
    assert_eq!(storage.names(), vec!["data".to_string()]);

    // Delete: no mount, no loop device, no file, no record.
    assert!(storage.delete("data").unwrap());
    assert!(!storage.delete("data").unwrap(), "second delete is a no-op");
    assert!(sys::mounted_source(&path).is_none());
    assert!(loops_gone(&image));
    assert!(!image.exists());
    assert!(!path.exists());
    assert!(storage.names().is_empty());
    assert!(fx.mounts_below().is_empty());
}

#[test]
fn btrfs_loopfile_pool_subvolume_qgroup_limit() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let backing = fx.path().join("pool.img");
    let pools = vec![format!(
        "name=fast,type=loopfile,path={},size=256Mi,fs=btrfs",
        backing.display()
    )];
    let storage = fx.open(&pools);
    let pool = storage.pools()[0].clone();
    assert_eq!(pool.kind, "loopfile");
    assert_eq!(pool.backends, vec![Backend::Btrfs, Backend::File]);
    assert!(pool.capacity_bytes > 200 * MIB, "{pool:?}");
    assert_eq!(sys::loops_backed_by(&backing).len(), 1);

    // The pool's default backend is btrfs.
    let path = storage.provision("sub", 16 * MIB, None, None).unwrap();
    assert_eq!(path, pool.path.join("sub"));
    assert_eq!(storage.usage("sub").unwrap().backend, Backend::Btrfs);
    let (_, err) = fill(&path.join("four"), 4 * MIB);
    assert!(err.is_none(), "{err:?}");
    let u = storage.usage("sub").unwrap();
    assert!(u.used_bytes >= 4 * MIB, "{u:?}");
    eprintln!(
        "btrfs 16Mi subvolume: referenced {} bytes after 4Mi",
        u.used_bytes
    );

    let (written, err) = fill(&path.join("big"), 32 * MIB);
    let err = err.expect("a write beyond the qgroup limit must fail");
    let code = err.raw_os_error();
    assert!(
        code == Some(libc::EDQUOT) || code == Some(libc::ENOSPC),
        "{err}"
    );
    eprintln!(
        "btrfs qgroup limit: {} after {} MiB of a 16 MiB volume holding 4 MiB",
        if code == Some(libc::EDQUOT) {
            "EDQUOT"
        } else {
            "ENOSPC"
        },
        written / MIB
    );

    // An ext4 image volume on the same btrfs pool.
    let img = storage
        .provision("img", 8 * MIB, Some(Backend::File), None)
        .unwrap();
    std::fs::write(img.join("x"), b"y").unwrap();

    // Restart keeps both.
    storage.release().unwrap();
    assert!(loops_gone(&backing), "pool device detached");
    drop(storage);
    let storage = fx.open(&pools);
    assert_eq!(std::fs::read(img.join("x")).unwrap(), b"y");
    assert!(path.join("four").exists());

    assert!(storage.delete("sub").unwrap());
    assert!(storage.delete("img").unwrap());
    assert!(!path.exists());
    assert!(storage.names().is_empty());
    storage.release().unwrap();
    assert!(fx.mounts_below().is_empty());
    assert!(loops_gone(&backing));
}

/// An assignment that merely lacks a volume (a controller on an empty or
/// restored store) leaves its data alone; only a volume the plan names for
/// removal is deleted, and not while an instance here mounts it.
#[test]
fn converge_removes_only_what_the_plan_names() {
    use ironmesh_agent::storage::{VolumePlan, WantedVolume};
    use std::collections::HashSet;
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let pool_dir = fx.path().join("pool");
    let storage = fx.open(&[format!("name=default,type=dir,path={}", pool_dir.display())]);
    let want = |name: &str| WantedVolume {
        name: name.into(),
        size_bytes: 16 * MIB,
        backend: Some(Backend::File),
        pool: None,
    };
    let plan = VolumePlan {
        wanted: vec![want("a"), want("b")],
        remove: Vec::new(),
    };
    assert!(storage.converge(&plan, &HashSet::new(), true).is_empty());
    let path_a = storage
        .provision("a", 16 * MIB, Some(Backend::File), None)
        .unwrap();
    std::fs::write(path_a.join("keep.txt"), b"precious").unwrap();

    // An empty assignment: nothing is deleted.
    let empty = VolumePlan::default();
    assert!(storage.converge(&empty, &HashSet::new(), true).is_empty());
    assert_eq!(storage.names(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(std::fs::read(path_a.join("keep.txt")).unwrap(), b"precious");

    // Named for removal but still mounted here: kept for now.
    let remove_a = VolumePlan {
        wanted: Vec::new(),
        remove: vec!["a".into(), "never-held".into()],
    };
    let in_use: HashSet<String> = ["a".to_string()].into();
    assert!(storage.converge(&remove_a, &in_use, true).is_empty());
    assert!(storage.names().contains(&"a".to_string()));
    // Removals paused (instances stopping): kept.
    assert!(storage
        .converge(&remove_a, &HashSet::new(), false)
        .is_empty());
    assert!(storage.names().contains(&"a".to_string()));
    // Then it goes, and only it.
    assert!(storage
        .converge(&remove_a, &HashSet::new(), true)
        .is_empty());
    assert_eq!(storage.names(), vec!["b".to_string()]);
    assert!(!pool_dir.join("a.ext4").exists());

    // A volume both wanted and named for removal (a new Volume of the
    // same name): the old data goes first, nothing is provisioned yet.
    let path_b = storage
        .provision("b", 16 * MIB, Some(Backend::File), None)
        .unwrap();
    std::fs::write(path_b.join("old.txt"), b"old").unwrap();
    let replace_b = VolumePlan {
        wanted: vec![want("b")],
        remove: vec!["b".into()],
    };
    assert!(storage
        .converge(&replace_b, &HashSet::new(), true)
        .is_empty());
    assert!(storage.names().is_empty());
    let fresh = VolumePlan {
        wanted: vec![want("b")],
        remove: Vec::new(),
    };
    assert!(storage.converge(&fresh, &HashSet::new(), true).is_empty());
    let path_b = storage
        .provision("b", 16 * MIB, Some(Backend::File), None)
        .unwrap();
    assert!(!path_b.join("old.txt").exists());
    assert!(storage.delete("b").unwrap());
    assert!(fx.mounts_below().is_empty());
}
