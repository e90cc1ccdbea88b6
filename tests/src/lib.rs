//! Test harness for end-to-end tests: real `ironmesh-controller`,
//! `ironmesh-agent` and `imctl` processes with their own temporary data and
//! state directories and loopback ports. Every process is killed (by its own
//! PID) and every directory removed when its handle drops, also when a test
//! panics.
//!
//! Beside the process handles here: [`net`] builds test hosts out of network
//! namespaces on one bridge, [`netns`] runs test code inside a namespace, [`containerd`] a private containerd per agent,
//! [`etcd`] a private etcd, and [`grpc`] gRPC clients with chosen (or no)
//! credentials.
//!
//! The binaries must be built first (`cargo build --bins`); the README's
//! test command does that.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub mod capture;
pub mod containerd;
pub mod etcd;
pub mod net;
pub mod netns;
pub mod test_image;
pub use containerd::Containerd;
pub use etcd::Etcd;
pub use net::{Host, TestNet};
use serde_json::Value;
use tempfile::TempDir;

/// The OCI image layouts `build-images` wrote (`target/images/<image>/`);
/// the README's test command builds them first.
pub fn images_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let dir = root.join("target").join("images");
    assert!(
        dir.join("records-server").join("index.json").exists(),
        "no images in {}: run `cargo run -p ironmesh-images --bin build-images` (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// The string at JSON pointer `p` of `v`, `""` when absent.
pub fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

/// The Instances of `workload` (`imctl get instances -l ...`).
pub fn instances(ctl: &Controller, workload: &str) -> Vec<Value> {
    ctl.imctl_json(&[
        "get",
        "instances",
        "-l",
        &format!("ironmesh.dev/workload={workload}"),
    ])
    .get("items")
    .and_then(Value::as_array)
    .cloned()
    .unwrap_or_default()
}

/// The workload's only instance once `f` holds for it (`what` says what is
/// awaited in the failure message).
pub fn wait_instance(
    ctl: &Controller,
    workload: &str,
    what: &str,
    deadline: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(&format!("instance of {workload}: {what}"), deadline, || {
        let list = instances(ctl, workload);
        (list.len() == 1 && f(&list[0])).then(|| list[0].clone())
    })
}

/// The network namespace the agent made for `instance`.
pub fn instance_netns(agent: &Agent, instance: &str) -> PathBuf {
    PathBuf::from("/run/ironmesh")
        .join(agent.containerd.namespace())
        .join("netns")
        .join(instance)
}

/// Pushes the project's image `image` (a layout under [`images_dir`]) to
/// the controller's registry with `imctl image push`.
pub fn push_image(ctl: &Controller, image: &str) {
    let dir: PathBuf = images_dir().join(image);
    let out = ctl.imctl(&["image", "push", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "imctl image push {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ctr` against the agent's containerd and namespace; its stdout.
pub fn ctr(agent: &Agent, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(agent.containerd.socket())
        .arg("--namespace")
        .arg(agent.containerd.namespace())
        .args(args)
        .output()
        .expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// curl run as an instance's process would be: in the network namespace
/// `netns` and in the cgroup `cgroup` (under the agent's subtree, where the
/// socket programs are). The body, or `None` when the request failed.
pub fn curl_in(cgroup: &Path, netns: &Path, url: &str) -> Option<String> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec curl -s -m 3 {url}",
        cgroup.display()
    );
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("nsenter");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// Directory holding the workspace's built binaries (next to `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

/// A free loopback port (bound and released; good enough on a test host).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr")
}

/// How long one fixture step may take (containerd answering, an image
/// import, a container start).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// Polls `f` until it returns `Some`, or fails after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed when dropped.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `deadline` for a clean exit; returns the status.
    pub fn terminate(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's PID.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if start.elapsed() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Options for a test controller.
#[derive(Clone)]
pub struct ControllerOpts {
    pub node_grace: &'static str,
    pub heartbeat_interval: &'static str,
    /// `--store` (default: the embedded store).
    pub store: Option<String>,
    /// `--ca-key-file` (needed with etcd).
    pub ca_key_file: Option<PathBuf>,
    /// `--leader-ttl`.
    pub leader_ttl: Option<&'static str>,
    /// `--mesh-default-mode`: `off` unless a test is about the mesh, so
    /// tests of other features see plaintext paths.
    pub mesh_default_mode: &'static str,
    /// Serve the OCI registry (`--registry-listen`, on the controller's
    /// address and a free port): `imctl image push` is its client.
    pub registry: bool,
    /// More flags, as given.
    pub extra_args: Vec<String>,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        ControllerOpts {
            node_grace: "2s",
            heartbeat_interval: "250ms",
            store: None,
            ca_key_file: None,
            leader_ttl: None,
            mesh_default_mode: "off",
            registry: true,
            extra_args: Vec::new(),
        }
    }
}

impl ControllerOpts {
    /// Options for a controller on `etcd`, sealing the shared CA with the
    /// key in `key_file`.
    pub fn on_etcd(etcd: &Etcd, key_file: &Path) -> ControllerOpts {
        ControllerOpts {
            store: Some(etcd.store_spec()),
            ca_key_file: Some(key_file.to_path_buf()),
            ..ControllerOpts::default()
        }
    }
}

/// Writes a fresh 32-byte CA sealing key (hex) to `path`.
pub fn write_ca_key(path: &Path) {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        // Not secret in tests; distinct per run is enough.
        *x = (std::process::id() as u8)
            .wrapping_mul(31)
            .wrapping_add(i as u8 * 7);
    }
    std::fs::write(path, hex::encode(b)).expect("write CA key");
}

/// A controller process with its own data directory, listening on the
/// bridge of a [`TestNet`] (agents run in hosts on that bridge). Several
/// controllers may share one TestNet ([`Controller::start_on`]).
pub struct Controller {
    pub proc: Proc,
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// The registry's address, when `opts.registry`.
    pub registry: Option<SocketAddr>,
    /// The web UI's address (`--ui-listen`, a free port on loopback).
    pub ui: SocketAddr,
    pub opts: ControllerOpts,
    pub net: std::sync::Arc<TestNet>,
}

impl Controller {
    pub fn start(opts: ControllerOpts) -> Controller {
        Self::start_on(std::sync::Arc::new(TestNet::new()), opts)
    }

    /// A controller on an existing test network (several controllers of
    /// one cluster share it, each on its own port).
    pub fn start_on(net: std::sync::Arc<TestNet>, opts: ControllerOpts) -> Controller {
        let dir = tempfile::Builder::new()
            .prefix("im-ctl-")
            .tempdir()
            .expect("tempdir");
        let addr = SocketAddr::new(net.gateway().into(), free_addr().port());
        let metrics = free_addr();
        let registry = opts
            .registry
            .then(|| SocketAddr::new(addr.ip(), free_addr().port()));
        let ui = free_addr();
        let proc = Self::spawn(
            dir.path(),
            addr,
            metrics,
            (registry, ui),
            &opts,
            "controller-1.log",
        );
        let c = Controller {
            dir,
            addr,
            metrics,
            registry,
            ui,
            opts,
            proc,
            net,
        };
        c.wait_serving();
        c
    }

    fn spawn(
        dir: &Path,
        addr: SocketAddr,
        metrics: SocketAddr,
        (registry, ui): (Option<SocketAddr>, SocketAddr),
        opts: &ControllerOpts,
        log: &str,
    ) -> Proc {
        let mut cmd = Command::new(bin("ironmesh-controller"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--ui-listen")
            .arg(ui.to_string())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--node-grace")
            .arg(opts.node_grace)
            .arg("--heartbeat-interval")
            .arg(opts.heartbeat_interval)
            .arg("--tls-san")
            .arg(addr.ip().to_string())
            .arg("--cluster-cidr")
            .arg(net::CLUSTER_CIDR)
            .arg("--mesh-default-mode")
            .arg(opts.mesh_default_mode)
            .env("RUST_LOG", "info,ironmesh_controller=debug");
        if let Some(s) = &opts.store {
            cmd.arg("--store").arg(s);
        }
        if let Some(k) = &opts.ca_key_file {
            cmd.arg("--ca-key-file").arg(k);
        }
        if let Some(t) = opts.leader_ttl {
            cmd.arg("--leader-ttl").arg(t);
        }
        if let Some(r) = registry {
            cmd.arg("--registry-listen").arg(r.to_string());
        }
        cmd.args(&opts.extra_args);
        Proc::spawn(cmd, dir.join(log)).expect("start controller")
    }

    fn wait_serving(&self) {
        let admin = self.admin_config();
        let addr = self.addr;
        let registry = self.registry;
        wait_for("controller to serve", Duration::from_secs(20), || {
            (admin.exists()
                && std::net::TcpStream::connect(addr).is_ok()
                && registry.is_none_or(|r| std::net::TcpStream::connect(r).is_ok()))
            .then_some(())
        });
    }

    /// kill -9 and start again on the same data directory and ports.
    pub fn restart_after_kill9(&mut self, log: &str) {
        self.proc.kill9();
        self.proc = Self::spawn(
            self.dir.path(),
            self.addr,
            self.metrics,
            (self.registry, self.ui),
            &self.opts,
            log,
        );
        self.wait_serving();
    }

    /// Starts the controller again after it was killed (same ports and
    /// data dir).
    pub fn start_again(&mut self, log: &str) {
        self.restart_after_kill9(log);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn admin_config(&self) -> PathBuf {
        self.data_dir().join("admin.yaml")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir().join("pki/ca.crt")
    }

    pub fn token_file(&self) -> PathBuf {
        self.data_dir().join("bootstrap-token")
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Runs imctl against this controller.
    pub fn imctl(&self, args: &[&str]) -> Output {
        self.imctl_as(&self.admin_config(), args)
    }

    /// Runs imctl with another client config (another operator). The
    /// registry's test port (not the default 5000) is in `admin.yaml`, and
    /// `imctl operator create --out` copies it.
    pub fn imctl_as(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(bin("imctl"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("IMCTL_REGISTRY")
            .output()
            .expect("run imctl")
    }

    /// Runs imctl and parses its JSON output; panics with stderr on failure.
    /// `imctl apply -f` of `yaml` (written to a temporary file); panics
    /// with imctl's error unless it succeeds.
    pub fn apply_yaml(&self, yaml: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("manifest.yaml");
        std::fs::write(&f, yaml).expect("write manifest");
        let out = self.imctl(&["apply", "-f", f.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn imctl_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.imctl(&a);
        assert!(
            out.status.success(),
            "imctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("imctl printed JSON")
    }

    /// The Node object, if it exists.
    pub fn node(&self, name: &str) -> Option<Value> {
        let out = self.imctl(&["get", "nodes", name, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    pub fn scrape_metrics(&self) -> anyhow::Result<String> {
        http_get(self.metrics, "/metrics")
    }
}

/// The Ready condition status of a Node object ("True", "False", ...).
pub fn ready_status(node: &Value) -> Option<String> {
    node.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))?
        .get("status")?
        .as_str()
        .map(str::to_string)
}

/// An agent process running in its own [`Host`] (network namespace) with
/// its own state directory and containerd. Fields drop in order: the agent,
/// then containerd (with every container it ran), then the host's
/// namespace, then the directory.
pub struct Agent {
    pub proc: Proc,
    pub containerd: Containerd,
    pub host: Host,
    pub dir: TempDir,
    pub name: String,
    pub metrics: SocketAddr,
    starts: usize,
    /// Flags added to every start of this agent.
    extra: Vec<String>,
}

impl Agent {
    /// Starts an agent that joins `ctl` with its real bootstrap token and
    /// runs with the extra flags `args` (also on restarts).
    pub fn start_with_args(ctl: &Controller, name: &str, args: &[&str]) -> Agent {
        let extra = args.iter().map(|a| a.to_string()).collect();
        Self::launch(&[ctl], name, None, &[], extra)
    }

    /// Starts an agent that joins `ctl` with its real bootstrap token.
    pub fn start(ctl: &Controller, name: &str) -> Agent {
        Self::launch(&[ctl], name, None, &[], Vec::new())
    }

    /// An agent given every controller in `ctls` (`--controller a,b,c`),
    /// joining with the first one's token and CA.
    pub fn start_multi(ctls: &[&Controller], name: &str) -> Agent {
        Self::launch(ctls, name, None, &[], Vec::new())
    }

    /// Starts an agent that joins `ctl` with its real bootstrap token and
    /// these extra environment variables (agent flags by their `IRONMESH_*`
    /// names).
    pub fn start_with_env(ctl: &Controller, name: &str, env: &[(&str, &str)]) -> Agent {
        Self::launch(&[ctl], name, None, env, Vec::new())
    }

    /// Starts an agent with the given token (possibly wrong).
    pub fn start_with_token(ctl: &Controller, name: &str, token: &str) -> Agent {
        Self::launch(&[ctl], name, Some(token), &[], Vec::new())
    }

    /// A fresh agent on a new fake host of `ctls[0]`'s network, joining
    /// with `token` (default: the first controller's bootstrap token).
    fn launch(
        ctls: &[&Controller],
        name: &str,
        token: Option<&str>,
        env: &[(&str, &str)],
        extra: Vec<String>,
    ) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("im-agent-")
            .tempdir()
            .expect("tempdir");
        let token = match token {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(ctls[0].token_file())
                .expect("token file")
                .trim()
                .to_string(),
        };
        let host = ctls[0].net.add_host(name);
        let metrics = SocketAddr::new(host.addr.into(), free_addr().port());
        let containerd = Containerd::start(name);
        let urls: Vec<String> = ctls.iter().map(|c| c.url()).collect();
        let proc = Self::spawn_to(
            &urls.join(","),
            &ctls[0].ca_cert(),
            dir.path(),
            &host,
            &containerd,
            name,
            metrics,
            Some(&token),
            1,
            env,
            &extra,
        );
        Agent {
            containerd,
            host,
            dir,
            name: name.to_string(),
            metrics,
            proc,
            starts: 1,
            extra,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        ctl: &Controller,
        dir: &Path,
        host: &Host,
        containerd: &Containerd,
        name: &str,
        metrics: SocketAddr,
        token: Option<&str>,
        n: usize,
        extra: &[String],
    ) -> Proc {
        Self::spawn_to(
            &ctl.url(),
            &ctl.ca_cert(),
            dir,
            host,
            containerd,
            name,
            metrics,
            token,
            n,
            &[],
            extra,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_to(
        urls: &str,
        ca: &Path,
        dir: &Path,
        host: &Host,
        containerd: &Containerd,
        name: &str,
        metrics: SocketAddr,
        token: Option<&str>,
        n: usize,
        env: &[(&str, &str)],
        extra: &[String],
    ) -> Proc {
        let mut cmd = host.command(bin("ironmesh-agent"));
        cmd.envs(env.iter().copied());
        cmd.args(extra);
        cmd.arg("--node-ip")
            .arg(host.addr.to_string())
            .arg("--controller")
            .arg(urls)
            .arg("--ca-cert")
            .arg(ca)
            .arg("--node-name")
            .arg(name)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--containerd-socket")
            .arg(containerd.socket())
            .arg("--containerd-namespace")
            .arg(containerd.namespace())
            .arg("--datapath-cgroup")
            .arg(containerd.datapath_cgroup())
            // Short enough that restart tests see several restarts quickly.
            .arg("--restart-backoff")
            .arg("200ms")
            .arg("--restart-backoff-max")
            .arg("2s")
            .arg("--stop-grace")
            .arg("2s")
            .env("RUST_LOG", "info,ironmesh_agent=debug");
        if let Some(t) = token {
            cmd.env("IRONMESH_BOOTSTRAP_TOKEN", t);
        }
        // Every agent gets a storage pool of its own (run volumes need one)
        // unless the test chose pools through the environment.
        if std::env::var_os("IRONMESH_STORAGE_POOLS").is_none() {
            let pool = dir.join("pool");
            let _ = std::fs::create_dir_all(&pool);
            cmd.arg("--storage-pool")
                .arg(format!("name=default,type=dir,path={}", pool.display()));
        }
        Proc::spawn(cmd, dir.join(format!("agent-{n}.log"))).expect("start agent")
    }

    /// Starts the agent again on the same state directory, without a
    /// bootstrap token: it must reuse its stored identity.
    pub fn restart_without_token(&mut self, ctl: &Controller) {
        self.proc.kill9();
        self.starts += 1;
        self.proc = Self::spawn(
            ctl,
            self.dir.path(),
            &self.host,
            &self.containerd,
            &self.name,
            self.metrics,
            None,
            self.starts,
            &self.extra,
        );
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Waits until the controller reports this node Ready; on timeout the
    /// panic carries the end of the agent's log.
    pub fn wait_ready(&self, ctl: &Controller, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            if ctl
                .node(&self.name)
                .is_some_and(|n| ready_status(&n).as_deref() == Some("True"))
            {
                return;
            }
            if Instant::now() > until {
                let log = self.proc.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "node {} not Ready within {deadline:?}; agent log (last lines):\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Asserts that a command `what` succeeded and returns its stdout; the
/// failure message carries both outputs.
pub fn succeeded(out: Output, what: &str) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts that a command `what` failed and returns its stderr (the error
/// a user would read).
pub fn refused(out: Output, what: &str) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        !out.status.success(),
        "{what} should have been refused; stdout: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

/// Minimal HTTP/1.0 GET on loopback (for /metrics).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let Some((head, rest)) = body.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(rest.to_string())
}

/// The value of one sample in Prometheus text (`name` or `name{labels}`).
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// The RSS of a process in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// gRPC clients built from the controller's files, for tests that need to
/// present particular (or no) credentials.
pub mod grpc {
    use super::*;
    use ironmesh_proto::v1::node_service_client::NodeServiceClient;
    use ironmesh_proto::v1::operator_service_client::OperatorServiceClient;
    use ironmesh_proto::v1::JoinRequest;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

    pub struct Creds {
        pub cert_pem: String,
        pub key_pem: String,
    }

    pub async fn channel(ctl: &Controller, creds: Option<&Creds>) -> anyhow::Result<Channel> {
        let ca = std::fs::read_to_string(ctl.ca_cert())?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(c) = creds {
            tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        Ok(Endpoint::from_shared(ctl.url())?
            .tls_config(tls)?
            .connect()
            .await?)
    }

    /// The admin credentials from admin.yaml.
    pub fn admin_creds(ctl: &Controller) -> Creds {
        let text = std::fs::read_to_string(ctl.admin_config()).expect("admin.yaml");
        let v: serde_norway::Value = serde_norway::from_str(&text).expect("admin.yaml is YAML");
        Creds {
            cert_pem: v["clientCertificateData"].as_str().unwrap().to_string(),
            key_pem: v["clientKeyData"].as_str().unwrap().to_string(),
        }
    }

    pub async fn operator(
        ctl: &Controller,
        creds: Option<&Creds>,
    ) -> anyhow::Result<OperatorServiceClient<Channel>> {
        Ok(OperatorServiceClient::new(channel(ctl, creds).await?))
    }

    /// Joins as `name` the way an agent does; returns the node's credentials.
    pub async fn join(ctl: &Controller, name: &str, token: &str) -> Result<Creds, tonic::Status> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("node:{name}"));
        let csr = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let mut client = NodeServiceClient::new(channel(ctl, None).await.expect("channel"));
        let resp = client
            .join(JoinRequest {
                bootstrap_token: token.to_string(),
                node_name: name.to_string(),
                csr_pem: csr,
            })
            .await?
            .into_inner();
        Ok(Creds {
            cert_pem: resp.certificate_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// A node that speaks the node protocol from the test itself: joined
    /// with a CSR, one Sync stream with Hello and an inventory (4 CPUs,
    /// 8 GiB), heartbeats every 200 ms from a background task, and the
    /// controller's messages collected. Whatever the test sends goes on
    /// the same stream. Dropping it closes the stream.
    pub struct ProtocolNode {
        pub name: String,
        pub creds: Creds,
        /// From the controller's Welcome.
        pub pod_cidr: String,
        tx: tokio::sync::mpsc::Sender<ironmesh_proto::v1::AgentMessage>,
        seen: std::sync::Arc<std::sync::Mutex<Seen>>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    #[derive(Default)]
    struct Seen {
        assignment: Option<ironmesh_proto::v1::Assignment>,
        ended: Option<tonic::Status>,
    }

    impl ProtocolNode {
        /// Joins `name` with `token` and opens its stream; fails with the
        /// join's or the stream's refusal.
        pub async fn start(
            ctl: &Controller,
            name: &str,
            token: &str,
        ) -> Result<ProtocolNode, tonic::Status> {
            let creds = join(ctl, name, token).await?;
            Self::connect(ctl, name, creds).await
        }

        /// Opens a stream with credentials the node already has.
        pub async fn connect(
            ctl: &Controller,
            name: &str,
            creds: Creds,
        ) -> Result<ProtocolNode, tonic::Status> {
            use ironmesh_proto::v1::{
                agent_message::Msg, controller_message, AgentMessage, Cpu, Hello, Inventory, Memory,
            };
            let channel = channel(ctl, Some(&creds))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(256);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            for m in [
                Msg::Hello(Hello {
                    node_name: name.to_string(),
                    agent_version: "test".into(),
                    ..Default::default()
                }),
                Msg::Inventory(Inventory {
                    hostname: name.to_string(),
                    boot_time_unix: now.saturating_sub(3600),
                    cpu: Some(Cpu {
                        logical: 4,
                        ..Default::default()
                    }),
                    memory: Some(Memory {
                        total_bytes: 8 << 30,
                        available_bytes: 8 << 30,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            ] {
                tx.send(AgentMessage { msg: Some(m) })
                    .await
                    .map_err(|_| tonic::Status::internal("stream closed"))?;
            }
            let mut inbound = NodeServiceClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let welcome = match inbound.message().await? {
                Some(m) => match m.msg {
                    Some(controller_message::Msg::Welcome(w)) => w,
                    other => {
                        return Err(tonic::Status::internal(format!(
                            "expected Welcome, got {other:?}"
                        )))
                    }
                },
                None => return Err(tonic::Status::cancelled("stream closed before Welcome")),
            };
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
            let reader = {
                let seen = seen.clone();
                tokio::spawn(async move {
                    loop {
                        match inbound.message().await {
                            Ok(Some(m)) => {
                                if let Some(controller_message::Msg::Assignment(a)) = m.msg {
                                    seen.lock().unwrap().assignment = Some(a);
                                }
                            }
                            Ok(None) => {
                                seen.lock().unwrap().ended =
                                    Some(tonic::Status::cancelled("stream closed"));
                                return;
                            }
                            Err(s) => {
                                seen.lock().unwrap().ended = Some(s);
                                return;
                            }
                        }
                    }
                })
            };
            let beats = {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut seq = 0;
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        seq += 1;
                        let hb = AgentMessage {
                            msg: Some(Msg::Heartbeat(ironmesh_proto::v1::Heartbeat {
                                sequence: seq,
                                sent_unix_ms: 0,
                            })),
                        };
                        if tx.send(hb).await.is_err() {
                            return;
                        }
                    }
                })
            };
            Ok(ProtocolNode {
                name: name.to_string(),
                creds,
                pod_cidr: welcome.pod_cidr,
                tx,
                seen,
                tasks: vec![reader, beats],
            })
        }

        /// Sends one message on the node's stream.
        pub async fn send(&self, msg: ironmesh_proto::v1::agent_message::Msg) {
            let _ = self
                .tx
                .send(ironmesh_proto::v1::AgentMessage { msg: Some(msg) })
                .await;
        }

        /// How the controller ended the stream, once it has.
        pub fn ended(&self) -> Option<tonic::Status> {
            self.seen.lock().unwrap().ended.clone()
        }

        /// The last full assignment the controller sent.
        pub fn assignment(&self) -> Option<ironmesh_proto::v1::Assignment> {
            self.seen.lock().unwrap().assignment.clone()
        }
    }

    impl Drop for ProtocolNode {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    pub fn token(ctl: &Controller) -> String {
        std::fs::read_to_string(ctl.token_file())
            .expect("token")
            .trim()
            .to_string()
    }
}

/// Unmounts everything mounted below its directories when dropped (deepest
/// first), so a test that mounts volumes leaves nothing behind even when it
/// panics; loop devices go with their mounts (autoclear).
pub struct Unmounter(pub Vec<PathBuf>);

impl Unmounter {
    /// What is mounted below the directories now.
    pub fn below(&self) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut out: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|t| self.0.iter().any(|d| t.starts_with(d)))
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        out
    }
}

impl Drop for Unmounter {
    fn drop(&mut self) {
        for t in self.below() {
            let _ = std::process::Command::new("umount").arg(&t).status();
        }
    }
}
