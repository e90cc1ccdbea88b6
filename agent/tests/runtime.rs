//! The runtime layer against a real containerd (Debian's 1.6) and runc.
//!
//! Each test starts its own containerd with a private root, state, sockets,
//! containerd namespace, runc root and cgroup prefix, and removes all of it
//! when it ends, also when it fails. containerd, runc and busybox-static
//! must be installed (`scripts/install-deps.sh`); without them the tests
//! fail, they do not skip.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironmesh_agent::runtime::{
    ImageChange, InstanceSpec, Resources, Runtime, RuntimeConfig, StopOutcome, TaskIo, TaskStatus,
};
use sha2::{Digest, Sha256};

const IMAGE: &str = "ironmesh.test/busybox:1";
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// containerd fixture

/// A containerd of our own, killed and cleaned up on drop.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    namespace: String,
    cgroup_prefix: String,
}

fn find_in_path(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

impl Containerd {
    fn start(name: &str) -> Self {
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

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn config(&self) -> RuntimeConfig {
        let mut config = RuntimeConfig::new(&self.socket, &self.namespace);
        config.cgroup_prefix = self.cgroup_prefix.clone();
        config.runc_root = Some(self.dir.path().join("runc"));
        config
    }

    /// A new client; each call makes a new connection.
    async fn runtime(&self) -> Runtime {
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

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// Directories of our cgroup prefix in every hierarchy, deepest first.
fn cgroup_dirs(prefix: &str) -> Vec<PathBuf> {
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

fn kill(pid: i32, signal: i32) {
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
fn remove_shim_socket(address: &Path, cmdline: &[u8]) {
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

fn tar_entry(out: &mut Vec<u8>, name: &str, kind: u8, mode: u32, data: &[u8], link: &str) {
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

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
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
fn busybox_layout(dir: &Path, name: &str) -> PathBuf {
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

fn busybox(args: &[&str]) -> Vec<String> {
    std::iter::once("/bin/busybox")
        .chain(args.iter().copied())
        .map(String::from)
        .collect()
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn import_twice_then_run_to_exit_code_with_logs() {
    let cd = Containerd::start("exit");
    let rt = cd.runtime().await;
    let layout = busybox_layout(&cd.path("layout"), IMAGE);

    let mut last = None;
    let t = Instant::now();
    let first = rt
        .import_layout_with_progress(&layout, |p| last = Some(p.clone()))
        .await
        .unwrap();
    let first_time = t.elapsed();
    assert_eq!(first.blobs_written, 3, "{first:?}");
    assert_eq!(first.layers_unpacked, 1, "{first:?}");
    assert_eq!(first.images.len(), 1);
    assert_eq!(first.images[0].name, IMAGE);
    assert_eq!(first.images[0].change, ImageChange::Created);
    let last = last.expect("progress was reported");
    assert_eq!(last.written, first.bytes_written);
    assert_eq!(last.total, first.bytes_written);
    assert!(first.bytes_written > 1_000_000, "{first:?}");

    let t = Instant::now();
    let second = rt.import_layout(&layout).await.unwrap();
    let second_time = t.elapsed();
    assert!(second.is_noop(), "second import did something: {second:?}");
    assert_eq!(second.blobs_present, 3);
    assert_eq!(second.layers_present, 1);
    assert_eq!(second.images[0].chain_id, first.images[0].chain_id);
    println!(
        "FIGURE import of the busybox layout ({} bytes): first {first_time:?}, second (no-op) {second_time:?}",
        first.bytes_written
    );
    let resolved = rt.resolve_image(IMAGE).await.unwrap();
    assert_eq!(resolved.chain_id, first.images[0].chain_id);
    assert_eq!(resolved.defaults.env, ["PATH=/bin"]);

    let mut spec = InstanceSpec::new("hello", IMAGE);
    spec.args = busybox(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    let created = rt.create(&spec).await.unwrap();
    assert_eq!(created.chain_id, resolved.chain_id);
    let io = TaskIo::in_dir(cd.path("logs/hello"));
    let pid = rt.start("hello", &io).await.unwrap();
    assert!(pid > 0);
    let exit = within("wait", rt.wait("hello")).await.unwrap();
    assert_eq!(exit.code, 3);
    assert!(exit.exited_at.is_some());
    assert_eq!(fs::read_to_string(&io.stdout).unwrap(), "hello\n");
    assert_eq!(fs::read_to_string(&io.stderr).unwrap(), "oops\n");

    let task = rt.task("hello").await.unwrap().expect("stopped task kept");
    assert_eq!(task.status, TaskStatus::Stopped);
    assert_eq!(task.exit.map(|e| e.code), Some(3));
    assert_eq!(
        rt.stop("hello", Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyExited(task.exit.unwrap())
    );

    rt.delete("hello").await.unwrap();
    assert!(rt.list().await.unwrap().is_empty());
    assert!(!rt.snapshot_exists("hello").await.unwrap());
    // Deleting again is fine.
    rt.delete("hello").await.unwrap();

    // An unknown image is a clear NotFound, not a hang.
    let err = rt
        .create(&InstanceSpec::new("ghost", "ironmesh.test/none:1"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("Images.Get") && msg.contains("ironmesh.test/none:1"),
        "{msg}"
    );
    assert!(!rt.snapshot_exists("ghost").await.unwrap());
}

#[tokio::test]
async fn adopt_limits_exec_stop_delete() {
    let cd = Containerd::start("adopt");
    let rt = cd.runtime().await;
    rt.import_layout(&busybox_layout(&cd.path("layout"), IMAGE))
        .await
        .unwrap();

    let mut spec = InstanceSpec::new("sleeper", IMAGE);
    spec.args = busybox(&["sleep", "1000"]);
    spec.resources = Resources {
        cpu_millis: Some(250),
        memory_bytes: Some(64 << 20),
    };
    spec.readonly_rootfs = true;
    spec.labels = HashMap::from([("ironmesh.dev/workload".to_string(), "sleepy".to_string())]);
    let created = rt.create(&spec).await.unwrap();
    assert_eq!(
        created.cgroups_path,
        format!("{}/sleeper", cd.cgroup_prefix)
    );
    let pid = rt
        .start("sleeper", &TaskIo::in_dir(cd.path("logs/sleeper")))
        .await
        .unwrap();

    // A new client (as after an agent restart) finds the same task.
    drop(rt);
    let rt = cd.runtime().await;
    let listed = rt.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let c = &listed[0];
    assert_eq!(c.id, "sleeper");
    assert_eq!(c.image, IMAGE);
    assert_eq!(c.labels["ironmesh.dev/workload"], "sleepy");
    let task = c.task.as_ref().expect("task listed");
    assert_eq!(task.pid, pid);
    assert_eq!(task.status, TaskStatus::Running);
    // The runc options reached the shim: runc keeps its state in our root.
    assert!(
        cd.path("runc").join(&cd.namespace).join("sleeper").is_dir(),
        "runc state is not under the configured runc root"
    );
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(cmdline, b"/bin/busybox\x00sleep\x001000\x00");

    // Limits are in the cgroup (cgroup v1 host).
    let cg = |controller: &str, file: &str| {
        let path = format!("/sys/fs/cgroup/{controller}{}/{file}", created.cgroups_path);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "25000");
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert!(cg("memory", "cgroup.procs")
        .lines()
        .any(|l| l == pid.to_string()));

    // Exec: exit code and output; privileges as specified.
    let out = rt
        .exec(
            "sleeper",
            &busybox(&["sh", "-c", "echo probe; exit 7"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(out.stdout, b"probe\n");
    let status = rt
        .exec(
            "sleeper",
            &busybox(&["cat", "/proc/self/status"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let status = String::from_utf8(status.stdout).unwrap();
    // CHOWN DAC_OVERRIDE FOWNER KILL SETGID SETUID NET_BIND_SERVICE
    assert!(status.contains("CapEff:\t00000000000004eb"), "{status}");
    assert!(status.contains("CapBnd:\t00000000000004eb"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let write = rt
        .exec(
            "sleeper",
            &busybox(&["sh", "-c", "echo x > /x"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_ne!(write.exit_code, Some(0), "read-only rootfs was writable");
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Read-only file system"),
        "{write:?}"
    );
    let slow = rt
        .exec(
            "sleeper",
            &busybox(&["sleep", "100"]),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    assert_eq!(slow.exit_code, None, "timed-out exec reports no exit code");

    // busybox sleep as PID 1 ignores SIGTERM: stop must SIGKILL.
    let outcome = within("stop", rt.stop("sleeper", Duration::from_millis(300)))
        .await
        .unwrap();
    match outcome {
        StopOutcome::Killed(exit) => assert_eq!(exit.code, 137),
        other => panic!("expected a SIGKILL, got {other:?}"),
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            // A zombie is reaped by the shim; give it the deadline.
            let deadline = Instant::now() + DEADLINE;
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            !Path::new(&format!("/proc/{pid}")).exists()
        }
    );

    rt.delete("sleeper").await.unwrap();
    assert!(rt.list().await.unwrap().is_empty());
    assert!(rt.task("sleeper").await.unwrap().is_none());
    assert!(!rt.snapshot_exists("sleeper").await.unwrap());
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory{}", created.cgroups_path)).exists());
}

#[tokio::test]
async fn create_to_task_started_latency() {
    const RUNS: usize = 20;
    let cd = Containerd::start("bench");
    let rt = cd.runtime().await;
    rt.import_layout(&busybox_layout(&cd.path("layout"), IMAGE))
        .await
        .unwrap();
    let mut started = Vec::with_capacity(RUNS);
    let mut cycle = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let id = format!("bench-{i}");
        let mut spec = InstanceSpec::new(&id, IMAGE);
        spec.args = busybox(&["true"]);
        spec.resources.memory_bytes = Some(32 << 20);
        let t = Instant::now();
        rt.create(&spec).await.unwrap();
        rt.start(&id, &TaskIo::in_dir(cd.path(&format!("logs/{id}"))))
            .await
            .unwrap();
        started.push(t.elapsed());
        assert_eq!(within("wait", rt.wait(&id)).await.unwrap().code, 0);
        rt.delete(&id).await.unwrap();
        cycle.push(t.elapsed());
    }
    assert!(rt.list().await.unwrap().is_empty());
    started.sort();
    cycle.sort();
    println!(
        "FIGURE create->task started over {RUNS} runs: median {:?}, min {:?}, p90 {:?}, max {:?}; \
         full cycle (create, start, wait, delete) median {:?}",
        started[RUNS / 2],
        started[0],
        started[RUNS * 9 / 10],
        started[RUNS - 1],
        cycle[RUNS / 2],
    );
}

#[tokio::test]
async fn missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let err = Runtime::connect(RuntimeConfig::new(&socket, "imtest"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot connect to containerd") && msg.contains("none.sock"),
        "{msg}"
    );
}

#[test]
fn layout_helper_writes_a_valid_tar() {
    // The tar helper's checksum and padding, checked against GNU tar.
    let dir = tempfile::tempdir().unwrap();
    let mut tar = Vec::new();
    tar_entry(&mut tar, "a/", b'5', 0o755, &[], "");
    tar_entry(&mut tar, "a/f", b'0', 0o644, b"data", "");
    tar_entry(&mut tar, "a/l", b'2', 0o777, &[], "f");
    tar.extend_from_slice(&[0u8; 1024]);
    let path = dir.path().join("t.tar");
    fs::File::create(&path).unwrap().write_all(&tar).unwrap();
    let out = Command::new("tar").arg("-tvf").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains("a/f") && listing.contains("a/l -> f"),
        "{listing}"
    );
}
