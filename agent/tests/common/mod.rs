//! Shared fixtures of the agent's integration tests: a containerd of each
//! test's own (private root, state, sockets, containerd namespace, runc
//! root and cgroup prefix, all removed on drop, also when the test fails)
//! and a tiny busybox OCI image layout built from busybox-static.
//!
//! containerd, runc and busybox-static must be installed
//! (`scripts/install-deps.sh`); without them the tests fail, they do not
//! skip.
#![allow(dead_code)] // each test binary uses its own part of the fixtures

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironmesh_agent::runtime::{Runtime, RuntimeConfig};
use sha2::{Digest, Sha256};

pub const IMAGE: &str = "ironmesh.test/busybox:1";
pub const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// containerd fixture

/// A containerd of our own, killed and cleaned up on drop.
pub struct Containerd {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub namespace: String,
    pub cgroup_prefix: String,
}

pub fn find_in_path(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

impl Containerd {
    pub fn start(name: &str) -> Self {
        for binary in ["containerd", "containerd-shim-runc-v2", "runc"] {
            assert!(
                find_in_path(binary).is_some(),
                "`{binary}` is not installed: these tests need a real containerd and runc \
                 (Debian: apt-get install containerd runc, or scripts/install-deps.sh)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("imrt-")
            .tempdir()
            .expect("temporary directory");
        let d = dir.path();
        let socket = d.join("c.sock");
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{socket}\"\n\
             [ttrpc]\n  address = \"{ttrpc}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = socket.display(),
            ttrpc = d.join("c.ttrpc.sock").display(),
        );
        fs::write(d.join("config.toml"), config).unwrap();
        let log = fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start containerd: {e}"));
        let mut fixture = Containerd {
            child,
            socket,
            namespace: format!("imtest-{name}"),
            cgroup_prefix: format!("/ironmesh-test-{}-{name}", std::process::id()),
            dir,
        };
        let deadline = Instant::now() + DEADLINE;
        while !fixture.socket.exists() {
            if let Ok(Some(status)) = fixture.child.try_wait() {
                panic!(
                    "containerd exited ({status}) before serving:\n{}",
                    fixture.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not create {} within {DEADLINE:?}:\n{}",
                fixture.socket.display(),
                fixture.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        fixture
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn config(&self) -> RuntimeConfig {
        let mut config = RuntimeConfig::new(&self.socket, &self.namespace);
        config.cgroup_prefix = self.cgroup_prefix.clone();
        config.runc_root = Some(self.dir.path().join("runc"));
        config
    }

    /// A new client; each call makes a new connection.
    pub async fn runtime(&self) -> Runtime {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match Runtime::connect(self.config()).await {
                Ok(rt) => return rt,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("containerd not answering yet: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot connect to containerd: {e}\n{}", self.log()),
            }
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// Directories of our cgroup prefix in every hierarchy, deepest first.
pub fn cgroup_dirs(prefix: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let dir = h.path().join(prefix.trim_start_matches('/'));
            if dir.is_dir() {
                walk(&dir, &mut out);
            }
        }
    }
    out
}

pub fn kill(pid: i32, signal: i32) {
    if pid > 0 {
        // SAFETY: plain syscall on a PID this test started (directly or
        // through its containerd).
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// A killed shim leaves its socket, `/run/containerd/s/<sha256 of
/// "<containerd address>/<namespace>/<id>">` (containerd 1.6).
pub fn remove_shim_socket(address: &Path, cmdline: &[u8]) {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let (Some(ns), Some(id)) = (flag("-namespace"), flag("-id")) {
        let key = format!("{}/{ns}/{id}", address.display());
        let _ =
            fs::remove_file(Path::new("/run/containerd/s").join(hex::encode(Sha256::digest(key))));
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Processes left in our containers (only if a test failed midway).
        for dir in cgroup_dirs(&self.cgroup_prefix) {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
                    kill(pid, libc::SIGKILL);
                }
            }
        }
        // Shims our containerd started: their command line names our socket.
        let needle = self.socket.as_os_str().as_encoded_bytes().to_vec();
        if let Ok(procs) = fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if pid == self.child.id() as i32 {
                    continue;
                }
                if let Ok(cmdline) = fs::read(p.path().join("cmdline")) {
                    let is_shim = cmdline
                        .split(|b| *b == 0)
                        .next()
                        .is_some_and(|argv0| argv0.ends_with(b"containerd-shim-runc-v2"));
                    if is_shim
                        && cmdline
                            .windows(needle.len())
                            .any(|w| w == needle.as_slice())
                    {
                        kill(pid, libc::SIGKILL);
                        remove_shim_socket(&self.socket, &cmdline);
                    }
                }
            }
        }
        kill(self.child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Mounts below our directory (rootfs of containers a failed test left).
        let root = self.dir.path().to_string_lossy().to_string();
        if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<String> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(|p| p.replace("\\040", " "))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                if let Ok(c) = std::ffi::CString::new(p) {
                    // SAFETY: umount2 with a valid C string.
                    unsafe {
                        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                    }
                }
            }
        }
        // The cgroups: empty once their processes are gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in cgroup_dirs(&self.cgroup_prefix) {
            while fs::remove_dir(&dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The temporary directory itself goes with `self.dir`.
    }
}

// ---------------------------------------------------------------------------
// a tiny OCI image layout: /bin/busybox from busybox-static

pub fn tar_entry(out: &mut Vec<u8>, name: &str, kind: u8, mode: u32, data: &[u8], link: &str) {
    let mut h = [0u8; 512];
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}\0", width = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h, 100, 8, mode as u64);
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, data.len() as u64);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[148..156].copy_from_slice(b"        ");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn put_blob(dir: &Path, data: &[u8]) -> String {
    let digest = sha256(data);
    fs::write(
        dir.join("blobs/sha256").join(&digest["sha256:".len()..]),
        data,
    )
    .unwrap();
    digest
}

/// Writes an OCI layout with one uncompressed layer holding /bin/busybox,
/// /bin/sh -> busybox and /tmp.
pub fn busybox_layout(dir: &Path, name: &str) -> PathBuf {
    let busybox = fs::read("/bin/busybox")
        .expect("/bin/busybox is missing: install busybox-static (scripts/install-deps.sh)");
    let mut layer = Vec::new();
    tar_entry(&mut layer, "bin/", b'5', 0o755, &[], "");
    tar_entry(&mut layer, "bin/busybox", b'0', 0o755, &busybox, "");
    tar_entry(&mut layer, "bin/sh", b'2', 0o777, &[], "busybox");
    tar_entry(&mut layer, "tmp/", b'5', 0o1777, &[], "");
    layer.extend_from_slice(&[0u8; 1024]);

    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let layer_digest = put_blob(dir, &layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put_blob(dir, &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": name}}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    dir.to_path_buf()
}

pub fn busybox(args: &[&str]) -> Vec<String> {
    std::iter::once("/bin/busybox")
        .chain(args.iter().copied())
        .map(String::from)
        .collect()
}

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}
