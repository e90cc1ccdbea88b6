//! A private containerd for tests: own root, state, sockets and containerd
//! namespace, killed and cleaned up (shims, mounts, cgroups) on drop, also
//! when the test fails. Used by the end-to-end tests and the agent's own
//! integration tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::DEADLINE;

/// A containerd of our own, killed and cleaned up on drop.
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    namespace: String,
    cgroup_prefix: String,
}

/// The first `binary` on PATH (or in /usr/sbin, /sbin).
pub fn find_in_path(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

impl Containerd {
    /// Starts a containerd whose namespace and cgroups are named after
    /// `name` and this process.
    pub fn start(name: &str) -> Self {
        // Unique per fixture: parallel tests often name their agents alike,
        // and the namespace names cgroups and network namespace files.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let namespace = format!("imtest-{}-{n}-{name}", std::process::id());
        for binary in ["containerd", "containerd-shim-runc-v2", "runc"] {
            assert!(
                find_in_path(binary).is_some(),
                "`{binary}` is not installed: these tests need a real containerd and runc \
                 (Debian: apt-get install containerd runc, or scripts/install-deps.sh)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("im-ctrd-")
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
            namespace: namespace.clone(),
            // The agent's default cgroup parent for its namespace.
            cgroup_prefix: format!("/ironmesh/{namespace}"),
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

    /// containerd's own log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A path inside this containerd's private directory.
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

/// Sends `signal` to `pid` (a process this test started).
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
        // The datapath's pins (unpinning detaches its programs).
        let _ = fs::remove_dir_all(Path::new("/sys/fs/bpf/ironmesh").join(&self.namespace));
        // Network namespace files the agent bind-mounted for our instances.
        let netns_root = Path::new("/run/ironmesh").join(&self.namespace);
        unmount_below(&netns_root.to_string_lossy());
        let _ = fs::remove_dir_all(&netns_root);
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
        // runc's state for our namespace (the agent uses runc's default root).
        let _ = fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.namespace));
        // The temporary directory itself goes with `self.dir`.
    }
}

/// Lazily unmounts every mount point at or below `root`, deepest first.
fn unmount_below(root: &str) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(root))
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

impl Containerd {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Where the agent puts its containers' cgroups (its default).
    pub fn cgroup_prefix(&self) -> &str {
        &self.cgroup_prefix
    }

    /// This fixture's own cgroup v2 subtree (created here): the agent
    /// attaches its Service load balancer there, so agents of parallel tests
    /// never steer each other's sockets.
    pub fn datapath_cgroup(&self) -> PathBuf {
        let dir =
            Path::new("/sys/fs/cgroup/unified").join(self.cgroup_prefix.trim_start_matches('/'));
        let _ = fs::create_dir_all(&dir);
        dir
    }
}
