//! The instance supervisor against a real containerd (Debian's 1.6) and
//! runc: what an operator checks — instances run with their limits,
//! crash loops back off, restart policies and probes act, an agent restart
//! keeps tasks running, removal leaves nothing, unknown images are
//! reported, logs are served.
//!
//! Each test starts its own containerd (see `common`). Synchronisation is
//! on the supervisor's reports with deadlines, never on sleeps. Containers
//! share the host network, so HTTP and TCP probes use free host ports.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{busybox_layout, Containerd, DEADLINE, IMAGE};
use ironmesh_agent::image_source::{EnsuredImage, ImageSource, ImageSourceError};
use ironmesh_agent::runtime::{Runtime, TaskStatus};
use ironmesh_agent::supervisor::{
    DesiredInstance, InstanceNetworking, Supervisor, SupervisorConfig, SupervisorError,
    SupervisorReport, LABEL_INSTANCE, LABEL_SPEC_GENERATION, LABEL_WORKLOAD,
};
use ironmesh_api::workload::WorkloadSpec;
use ironmesh_proto::v1::{InstanceEvent, InstanceState};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Imports the busybox layout for [`IMAGE`]; every other name is unknown.
struct LayoutImages {
    runtime: Runtime,
    layout: PathBuf,
    /// Concurrent imports of one layout would race on the same content refs.
    lock: tokio::sync::Mutex<()>,
}

#[tonic::async_trait]
impl ImageSource for LayoutImages {
    async fn ensure(&self, image: &str, _digest: &str) -> Result<EnsuredImage, ImageSourceError> {
        if image != IMAGE {
            return Err(ImageSourceError::NotFound {
                image: image.to_string(),
                reason: "the controller's image store does not hold it".to_string(),
            });
        }
        let _held = self.lock.lock().await;
        let report = self
            .runtime
            .import_layout(&self.layout)
            .await
            .map_err(|e| ImageSourceError::Unavailable {
                image: image.to_string(),
                reason: e.to_string(),
            })?;
        Ok(EnsuredImage {
            fetched: report.bytes_written > 0,
            bytes: report.bytes_written,
        })
    }
}

/// Instance networking stand-in: every container joins one namespace
/// made for the test (`ip netns add`); every call is logged in order;
/// `attach` can be held until the gate opens and made to fail a number of
/// times.
struct FakeNetwork {
    netns: String,
    calls: std::sync::Mutex<Vec<String>>,
    gate: tokio::sync::watch::Sender<bool>,
    attach_failures: std::sync::atomic::AtomicU32,
}

impl FakeNetwork {
    fn new(test: &str, open: bool, attach_failures: u32) -> Arc<FakeNetwork> {
        let netns = format!("imsv-{}-{test}", std::process::id());
        let out = std::process::Command::new("ip")
            .args(["netns", "add", &netns])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {netns}: {out:?}");
        Arc::new(FakeNetwork {
            netns,
            calls: std::sync::Mutex::new(Vec::new()),
            gate: tokio::sync::watch::channel(open).0,
            attach_failures: attach_failures.into(),
        })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

impl Drop for FakeNetwork {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

#[tonic::async_trait]
impl InstanceNetworking for FakeNetwork {
    fn netns_path(&self, _instance: &str) -> PathBuf {
        self.path()
    }

    async fn setup(&self, instance: &str) -> Result<(std::net::Ipv4Addr, PathBuf), String> {
        self.log(format!("setup {instance}"));
        Ok((std::net::Ipv4Addr::new(10, 99, 0, 7), self.path()))
    }

    async fn attach(&self, instance: &str, _ip: std::net::Ipv4Addr) -> Result<(), String> {
        self.log(format!("attach {instance}"));
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        let failures = &self.attach_failures;
        let fail = failures
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if fail {
            self.log(format!("attach failed {instance}"));
            return Err(format!("fake datapath refused {instance}"));
        }
        self.log(format!("attached {instance}"));
        Ok(())
    }

    async fn teardown(&self, instance: &str) -> Result<(), String> {
        self.log(format!("teardown {instance}"));
        Ok(())
    }

    async fn cleanup_orphans(&self, _keep: std::collections::HashSet<String>) {}
}

/// A containerd, a supervisor on it, and every report it sent.
struct Fixture {
    sup: Option<Supervisor>,
    reports: mpsc::Receiver<SupervisorReport>,
    /// Reports since the supervisor (re)started, with their arrival time.
    seen: Vec<(Instant, SupervisorReport)>,
    rt: Runtime,
    images: Arc<LayoutImages>,
    cfg: SupervisorConfig,
    network: Option<Arc<dyn InstanceNetworking>>,
    // Last: dropped after the supervisor.
    cd: Containerd,
}

impl Fixture {
    async fn new(name: &str, tweak: impl FnOnce(&mut SupervisorConfig)) -> Fixture {
        Self::with_network(name, tweak, None).await
    }

    async fn with_network(
        name: &str,
        tweak: impl FnOnce(&mut SupervisorConfig),
        network: Option<Arc<dyn InstanceNetworking>>,
    ) -> Fixture {
        let cd = Containerd::start(name);
        let rt = common::runtime(&cd).await;
        let layout = busybox_layout(&cd.path("layout"), IMAGE);
        let images = Arc::new(LayoutImages {
            runtime: rt.clone(),
            layout,
            lock: tokio::sync::Mutex::new(()),
        });
        let mut cfg = SupervisorConfig::new(cd.path("agent"));
        cfg.backoff_base = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_secs(2);
        cfg.stop_grace = Duration::from_millis(300);
        tweak(&mut cfg);
        let (tx, reports) = mpsc::channel(4096);
        let sup = Supervisor::start_with_network(
            cfg.clone(),
            rt.clone(),
            images.clone(),
            network.clone(),
            tx,
        )
        .await
        .unwrap();
        Fixture {
            sup: Some(sup),
            reports,
            seen: Vec::new(),
            rt,
            images,
            cfg,
            network,
            cd,
        }
    }

    fn sup(&self) -> &Supervisor {
        self.sup.as_ref().expect("supervisor running")
    }

    /// What an agent restart does: detach, reconnect, start again.
    async fn restart_agent(&mut self) {
        if let Some(sup) = self.sup.take() {
            sup.detach().await;
        }
        let rt = common::runtime(&self.cd).await;
        let (tx, reports) = mpsc::channel(4096);
        self.reports = reports;
        self.seen.clear();
        self.rt = rt.clone();
        self.sup = Some(
            Supervisor::start_with_network(
                self.cfg.clone(),
                rt,
                self.images.clone(),
                self.network.clone(),
                tx,
            )
            .await
            .unwrap(),
        );
    }

    fn history(&self) -> String {
        self.seen
            .iter()
            .map(|(_, r)| match r {
                SupervisorReport::State(s) => format!(
                    "  state {} {} ready={} restarts={} exit={:?} pid={} {}: {}",
                    s.name,
                    s.phase().name(),
                    s.ready,
                    s.restarts,
                    s.exit_code,
                    s.pid,
                    s.reason,
                    s.message
                ),
                SupervisorReport::Event(e) => {
                    format!(
                        "  event {} {} {}: {}",
                        e.instance, e.r#type, e.reason, e.message
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until `n` reports match; returns them with their arrival times.
    async fn wait_n(
        &mut self,
        what: &str,
        n: usize,
        within: Duration,
        pred: impl Fn(&SupervisorReport) -> bool,
    ) -> Vec<(Instant, SupervisorReport)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let found: Vec<_> = self.seen.iter().filter(|(_, r)| pred(r)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(r)) => self.seen.push((Instant::now(), r)),
                Ok(None) => panic!("report channel closed waiting for {what}"),
                Err(_) => panic!(
                    "{what}: saw {} of {n} within {within:?}; reports:\n{}",
                    found.len(),
                    self.history()
                ),
            }
        }
    }

    async fn wait_state(
        &mut self,
        what: &str,
        pred: impl Fn(&InstanceState) -> bool,
    ) -> InstanceState {
        let found = self
            .wait_n(
                what,
                1,
                DEADLINE,
                |r| matches!(r, SupervisorReport::State(s) if pred(s)),
            )
            .await;
        match &found[0].1 {
            SupervisorReport::State(s) => s.clone(),
            SupervisorReport::Event(_) => unreachable!(),
        }
    }

    /// The first `n` events of `instance` with `reason`, with arrival times.
    async fn wait_events(
        &mut self,
        instance: &str,
        reason: &str,
        n: usize,
    ) -> Vec<(Instant, InstanceEvent)> {
        self.wait_n(&format!("{n} {reason} events of {instance}"), n, DEADLINE, |r| {
            matches!(r, SupervisorReport::Event(e) if e.instance == instance && e.reason == reason)
        })
        .await
        .into_iter()
        .map(|(at, r)| match r {
            SupervisorReport::Event(e) => (at, e),
            SupervisorReport::State(_) => unreachable!(),
        })
        .collect()
    }

    async fn wait_event(&mut self, instance: &str, reason: &str) -> InstanceEvent {
        self.wait_events(instance, reason, 1).await.remove(0).1
    }

    fn count_events(&self, instance: &str, reason: &str) -> usize {
        self.seen
            .iter()
            .filter(|(_, r)| {
                matches!(r, SupervisorReport::Event(e) if e.instance == instance && e.reason == reason)
            })
            .count()
    }

    /// Collects reports for `window` (to show that nothing more happens).
    async fn quiet_for(&mut self, window: Duration) {
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, self.reports.recv()).await {
            self.seen.push((Instant::now(), r));
        }
    }

    /// Nothing of the instance is left: no container, task, snapshot or
    /// directory.
    async fn assert_gone(&self, name: &str) {
        let listed = self.rt.list().await.unwrap();
        assert!(
            !listed.iter().any(|c| c.id == name),
            "container {name} still exists: {listed:?}"
        );
        assert!(
            self.rt.task(name).await.unwrap().is_none(),
            "task {name} left"
        );
        assert!(
            !self.rt.snapshot_exists(name).await.unwrap(),
            "snapshot {name} left"
        );
        let dir = self.cfg.instance_dir(name);
        assert!(!dir.exists(), "{} left", dir.display());
    }
}

fn desired(name: &str, generation: u64, mut spec: Value) -> DesiredInstance {
    if spec.get("image").is_none() {
        spec["image"] = json!(IMAGE);
    }
    DesiredInstance {
        queue_dir: None,
        name: name.to_string(),
        workload: name.rsplit_once('-').map_or(name, |(w, _)| w).to_string(),
        spec_generation: generation,
        spec: serde_json::from_value::<WorkloadSpec>(spec).unwrap(),
        image_digest: String::new(),
        volumes: Vec::new(),
    }
}

fn sh(script: &str) -> Value {
    json!(["/bin/sh", "-c", script])
}

fn sleeper() -> Value {
    json!({"command": ["/bin/busybox", "sleep", "1000"]})
}

/// A host port nothing listens on (right now).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn is_running(name: &str) -> impl Fn(&InstanceState) -> bool + '_ {
    move |s| s.name == name && s.phase().name() == "Running"
}

async fn read_all(mut rx: mpsc::Receiver<Vec<u8>>) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        out.extend(chunk);
    }
    String::from_utf8(out).unwrap()
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn desired_instance_runs_ready_with_its_limits_in_the_cgroup() {
    let mut f = Fixture::new("sv-run", |_| {}).await;
    let web1 = desired(
        "web-1",
        1,
        json!({"command": ["/bin/busybox", "sleep", "1000"],
               "resources": {"cpu": "250m", "memory": "64Mi"}}),
    );
    let t = Instant::now();
    f.sup().set_desired(vec![web1.clone()]).await;
    let running = f.wait_state("web-1 Running", is_running("web-1")).await;
    let first = t.elapsed();
    assert!(running.ready, "no readiness probe: ready once running");
    assert!(running.pid > 0);
    assert_eq!(running.spec_generation, 1);
    assert_eq!(running.restarts, 0);
    assert_eq!(running.reason, "Started");
    assert!(running.started_unix_ms > 0);
    for reason in ["Pulling", "Pulled", "Created", "Started"] {
        f.wait_event("web-1", reason).await;
    }

    // The limits are in the container's cgroup (cgroup v1 host).
    let cgroup = |controller: &str, file: &str| {
        let path = format!(
            "/sys/fs/cgroup/{controller}{}/web-1/{file}",
            f.cd.cgroup_prefix()
        );
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(cgroup("memory", "memory.limit_in_bytes"), "67108864");
    assert_eq!(cgroup("cpu", "cpu.cfs_quota_us"), "25000");
    assert!(cgroup("memory", "cgroup.procs")
        .lines()
        .any(|l| l == running.pid.to_string()));

    // containerd knows whose container it is.
    let listed = f.rt.list().await.unwrap();
    let c = listed.iter().find(|c| c.id == "web-1").expect("container");
    assert_eq!(c.labels[LABEL_INSTANCE], "web-1");
    assert_eq!(c.labels[LABEL_WORKLOAD], "web");
    assert_eq!(c.labels[LABEL_SPEC_GENERATION], "1");
    assert_eq!(c.task.as_ref().map(|t| t.pid), Some(running.pid));

    let snapshot = f.sup().snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].phase().name(), "Running");
    assert_eq!(snapshot[0].pid, running.pid);

    // A second instance, image already present.
    let t = Instant::now();
    f.sup()
        .set_desired(vec![web1, desired("web-2", 1, sleeper())])
        .await;
    f.wait_state("web-2 Running", is_running("web-2")).await;
    let second = t.elapsed();
    println!(
        "FIGURE set_desired -> Running (busybox, debug build): first instance with image import {first:?}, \
         second instance (image present) {second:?}"
    );
    // web-1 was left alone.
    assert_eq!(f.count_events("web-1", "Started"), 1);
}

#[tokio::test]
async fn crashing_command_restarts_with_growing_backoff() {
    let mut f = Fixture::new("sv-crash", |c| {
        c.backoff_base = Duration::from_millis(300);
        c.backoff_max = Duration::from_secs(10);
    })
    .await;
    f.sup()
        .set_desired(vec![desired(
            "crash-1",
            1,
            json!({"command": sh("echo crashing; exit 3")}),
        )])
        .await;
    let starts: Vec<Instant> = f
        .wait_events("crash-1", "Started", 4)
        .await
        .into_iter()
        .map(|(at, _)| at)
        .collect();
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    println!("FIGURE crash loop gaps between starts (base 300ms): {gaps:?}");
    assert!(
        gaps[0] < gaps[1] && gaps[1] < gaps[2],
        "restart intervals do not grow: {gaps:?}"
    );
    for (gap, delay) in gaps.iter().zip([300, 600, 1200]) {
        assert!(*gap >= Duration::from_millis(delay), "{gaps:?}");
    }

    let backoffs = f.wait_events("crash-1", "BackOff", 3).await;
    let messages: Vec<&str> = backoffs.iter().map(|(_, e)| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "back-off 300ms restarting failed container (exit code 3)",
            "back-off 600ms restarting failed container (exit code 3)",
            "back-off 1.2s restarting failed container (exit code 3)",
        ]
    );
    let exited = f.wait_event("crash-1", "Exited").await;
    assert_eq!(exited.r#type, "Warning");
    assert!(exited.message.contains("code 3"), "{}", exited.message);

    let waiting = f
        .wait_state("crash-1 in CrashLoopBackOff", |s| {
            s.name == "crash-1" && s.reason == "CrashLoopBackOff"
        })
        .await;
    assert_eq!(waiting.phase().name(), "Pending");
    assert_eq!(waiting.exit_code, Some(3));
    let third = f
        .wait_state("crash-1 running after 3 restarts", |s| {
            s.name == "crash-1" && s.phase().name() == "Running" && s.restarts == 3
        })
        .await;
    assert_eq!(third.exit_code, Some(3), "the last exit code stays visible");
    let now = f.sup().snapshot();
    assert!(now[0].restarts >= 3, "{now:?}");
    // The count survives in state.json.
    let persisted =
        std::fs::read_to_string(f.cfg.instance_dir("crash-1").join("state.json")).unwrap();
    let persisted: Value = serde_json::from_str(&persisted).unwrap();
    assert!(persisted["restarts"].as_u64().unwrap() >= 3, "{persisted}");
}

#[tokio::test]
async fn restart_policies_never_and_on_failure() {
    let mut f = Fixture::new("sv-policy", |_| {}).await;
    f.sup()
        .set_desired(vec![
            desired(
                "never-ok",
                1,
                json!({"command": sh("exit 0"), "restartPolicy": "Never"}),
            ),
            desired(
                "never-fail",
                1,
                json!({"command": sh("exit 2"), "restartPolicy": "Never"}),
            ),
            desired(
                "onfailure-ok",
                1,
                json!({"command": sh("exit 0"), "restartPolicy": "OnFailure"}),
            ),
            desired(
                "onfailure-fail",
                1,
                json!({"command": sh("exit 1"), "restartPolicy": "OnFailure"}),
            ),
        ])
        .await;
    let ok = f
        .wait_state("never-ok Succeeded", |s| {
            s.name == "never-ok" && s.phase().name() == "Succeeded"
        })
        .await;
    assert_eq!(ok.exit_code, Some(0));
    assert_eq!(ok.reason, "Completed");
    let failed = f
        .wait_state("never-fail Failed", |s| {
            s.name == "never-fail" && s.phase().name() == "Failed"
        })
        .await;
    assert_eq!(failed.exit_code, Some(2));
    let on_ok = f
        .wait_state("onfailure-ok Succeeded", |s| {
            s.name == "onfailure-ok" && s.phase().name() == "Succeeded"
        })
        .await;
    assert_eq!(on_ok.restarts, 0);
    // OnFailure does restart a non-zero exit.
    f.wait_events("onfailure-fail", "Started", 2).await;

    // Several back-off periods later, nothing was restarted.
    f.quiet_for(Duration::from_secs(1)).await;
    for name in ["never-ok", "never-fail", "onfailure-ok"] {
        assert_eq!(f.count_events(name, "Started"), 1, "{name} was restarted");
        // The exited task (and its shim) is released; the container,
        // the exit code and the logs stay.
        assert_eq!(f.rt.task(name).await.unwrap(), None, "{name}'s task kept");
        assert!(
            f.rt.list().await.unwrap().iter().any(|c| c.id == name),
            "{name}'s container removed"
        );
    }
    let snapshot = f.sup().snapshot();
    let phase = |n: &str| {
        snapshot
            .iter()
            .find(|s| s.name == n)
            .map(|s| s.phase().name())
            .unwrap()
    };
    assert_eq!(phase("never-ok"), "Succeeded");
    assert_eq!(phase("never-fail"), "Failed");
    assert_eq!(phase("onfailure-ok"), "Succeeded");
}

#[tokio::test]
async fn failing_liveness_probe_kills_and_restarts() {
    let mut f = Fixture::new("sv-live", |_| {}).await;
    let closed = free_port();
    f.sup()
        .set_desired(vec![
            desired(
                "live-exec",
                1,
                json!({"command": ["/bin/busybox", "sleep", "1000"],
                       "livenessProbe": {"exec": {"command": ["/bin/busybox", "false"]},
                                         "periodSeconds": 1, "failureThreshold": 2}}),
            ),
            desired(
                "live-tcp",
                1,
                json!({"command": ["/bin/busybox", "sleep", "1000"],
                       "livenessProbe": {"tcpSocket": {"port": closed},
                                         "periodSeconds": 1, "failureThreshold": 1}}),
            ),
        ])
        .await;
    let first = f
        .wait_state("live-exec Running", is_running("live-exec"))
        .await;
    let unhealthy = f.wait_event("live-exec", "Unhealthy").await;
    assert_eq!(unhealthy.r#type, "Warning");
    assert!(
        unhealthy.message.starts_with("Liveness probe failed: exec"),
        "{}",
        unhealthy.message
    );
    let killing = f.wait_event("live-exec", "Killing").await;
    assert!(killing.message.contains("liveness"), "{}", killing.message);
    // busybox sleep as PID 1 ignores SIGTERM: killed after the grace.
    let exited = f.wait_event("live-exec", "Exited").await;
    assert!(exited.message.contains("code 137"), "{}", exited.message);
    let again = f
        .wait_state("live-exec restarted", |s| {
            s.name == "live-exec" && s.phase().name() == "Running" && s.restarts == 1
        })
        .await;
    assert_ne!(again.pid, first.pid);
    assert_eq!(f.count_events("live-exec", "Unhealthy"), 2);

    let tcp = f.wait_event("live-tcp", "Unhealthy").await;
    assert!(tcp.message.contains("dial tcp"), "{}", tcp.message);
    f.wait_event("live-tcp", "Killing").await;
    f.wait_state("live-tcp restarted", |s| {
        s.name == "live-tcp" && s.phase().name() == "Running" && s.restarts == 1
    })
    .await;
}

#[tokio::test]
async fn readiness_probe_gates_ready() {
    let mut f = Fixture::new("sv-ready", |_| {}).await;
    let port = free_port();
    // httpd answers 404 for /tmp/ready until the file exists.
    f.sup()
        .set_desired(vec![desired(
            "ready-1",
            1,
            json!({"command": ["/bin/busybox", "httpd", "-f", "-p", format!("127.0.0.1:{port}"), "-h", "/tmp"],
                   "readinessProbe": {"httpGet": {"path": "/ready", "port": port},
                                      "periodSeconds": 1, "failureThreshold": 1}}),
        )])
        .await;
    let running = f.wait_state("ready-1 Running", is_running("ready-1")).await;
    assert!(!running.ready, "ready before the readiness probe passed");
    // The first checks may find httpd not listening yet (connection
    // refused); wait for one that reached it and got its 404.
    let failed = f
        .wait_n("a readiness failure with httpd's 404", 1, DEADLINE, |r| {
            matches!(r, SupervisorReport::Event(e)
                if e.instance == "ready-1" && e.reason == "Unhealthy" && e.message.contains("404"))
        })
        .await
        .remove(0)
        .1;
    let SupervisorReport::Event(failed) = failed else {
        unreachable!("matched an event")
    };
    assert!(
        failed.message.starts_with("Readiness probe failed"),
        "{}",
        failed.message
    );
    assert!(!f.sup().snapshot()[0].ready);

    let touch = |args: &[&str]| {
        std::iter::once("/bin/busybox")
            .chain(args.iter().copied())
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let out =
        f.rt.exec("ready-1", &touch(&["touch", "/tmp/ready"]), DEADLINE)
            .await
            .unwrap();
    assert_eq!(out.exit_code, Some(0));
    f.wait_state("ready-1 ready", |s| s.name == "ready-1" && s.ready)
        .await;
    assert!(f.sup().snapshot()[0].ready);

    // And back: failing again takes it out of service.
    f.rt.exec("ready-1", &touch(&["rm", "/tmp/ready"]), DEADLINE)
        .await
        .unwrap();
    let unready = f
        .wait_state("ready-1 unready again", |s| {
            s.name == "ready-1" && s.phase().name() == "Running" && !s.ready && s.restarts == 0
        })
        .await;
    assert_eq!(unready.pid, running.pid, "readiness never restarts");
}

#[tokio::test]
async fn agent_restart_keeps_running_tasks() {
    let mut f = Fixture::new("sv-adopt", |_| {}).await;
    // Crashes once (the rootfs persists across restarts), then stays up.
    let keep = desired(
        "keep-1",
        1,
        json!({"command": sh("if [ -e /tmp/crashed ]; then exec sleep 1000; fi; touch /tmp/crashed; exit 1")}),
    );
    f.sup()
        .set_desired(vec![keep.clone(), desired("gone-1", 1, sleeper())])
        .await;
    let before = f
        .wait_state("keep-1 running after one crash", |s| {
            s.name == "keep-1" && s.phase().name() == "Running" && s.restarts == 1
        })
        .await;
    f.wait_state("gone-1 Running", is_running("gone-1")).await;

    f.restart_agent().await;
    // Nothing was stopped by the detach.
    let task = f.rt.task("keep-1").await.unwrap().expect("task kept");
    assert_eq!((task.pid, task.status), (before.pid, TaskStatus::Running));
    assert!(
        f.sup().snapshot().is_empty(),
        "nothing touched before set_desired"
    );

    // The first desired set after the restart: keep-1 stays, gone-1 goes.
    f.sup().set_desired(vec![keep]).await;
    let adopted = f
        .wait_state("keep-1 adopted", |s| {
            s.name == "keep-1" && s.phase().name() == "Running"
        })
        .await;
    assert_eq!(adopted.pid, before.pid, "same task, same PID");
    assert_eq!(adopted.restarts, 1, "restart count preserved");
    assert_eq!(adopted.reason, "Adopted");
    assert_eq!(adopted.started_unix_ms, before.started_unix_ms);
    let event = f.wait_event("keep-1", "Adopted").await;
    assert!(event.message.contains(&before.pid.to_string()));
    f.wait_event("gone-1", "Deleted").await;
    f.assert_gone("gone-1").await;
    assert_eq!(f.count_events("keep-1", "Started"), 0, "no restart");
    assert!(std::path::Path::new(&format!("/proc/{}", before.pid)).exists());

    // Still supervised: a kill is noticed and restarted.
    common::kill(before.pid as i32, libc::SIGKILL);
    let restarted = f
        .wait_state("keep-1 restarted after kill", |s| {
            s.name == "keep-1" && s.phase().name() == "Running" && s.restarts == 2
        })
        .await;
    assert_ne!(restarted.pid, before.pid);
    let snapshot = f.sup().snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].name, "keep-1");
}

#[tokio::test]
async fn removed_or_replaced_instances_leave_nothing_behind() {
    let mut f = Fixture::new("sv-remove", |_| {}).await;
    let a1 = desired("a-1", 1, sleeper());
    f.sup()
        .set_desired(vec![a1.clone(), desired("b-1", 1, sleeper())])
        .await;
    let a = f.wait_state("a-1 Running", is_running("a-1")).await;
    f.wait_state("b-1 Running", is_running("b-1")).await;

    let t = Instant::now();
    f.sup().set_desired(vec![a1]).await;
    let deleted = f.wait_event("b-1", "Deleted").await;
    println!(
        "FIGURE removal of a running busybox sleep (SIGTERM ignored, 300ms grace): {:?}",
        t.elapsed()
    );
    assert!(deleted.message.contains("killed"), "{}", deleted.message);
    f.assert_gone("b-1").await;
    assert_eq!(f.sup().snapshot().len(), 1);

    // A new generation replaces the container.
    let mut a2 = desired("a-1", 2, sleeper());
    a2.spec.resources.memory = "32Mi".into();
    f.sup().set_desired(vec![a2]).await;
    let replaced = f
        .wait_state("a-1 generation 2 Running", |s| {
            s.name == "a-1" && s.phase().name() == "Running" && s.spec_generation == 2
        })
        .await;
    assert_ne!(replaced.pid, a.pid);
    assert_eq!(replaced.restarts, 0);
    f.wait_event("a-1", "Deleted").await;
    let c = f.rt.list().await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].labels[LABEL_SPEC_GENERATION], "2");
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{}/a-1/memory.limit_in_bytes",
        f.cd.cgroup_prefix()
    ))
    .unwrap();
    assert_eq!(limit.trim(), (32u64 << 20).to_string());

    f.sup().set_desired(vec![]).await;
    f.wait_events("a-1", "Deleted", 2).await;
    f.assert_gone("a-1").await;
    assert!(f.rt.list().await.unwrap().is_empty());
    assert!(f.sup().snapshot().is_empty());
    let left: Vec<_> = std::fs::read_dir(f.cfg.state_dir.join("instances"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn unknown_image_is_reported_not_hung() {
    let mut f = Fixture::new("sv-ghost", |_| {}).await;
    let t = Instant::now();
    f.sup()
        .set_desired(vec![desired(
            "ghost-1",
            1,
            json!({"image": "ironmesh.test/nope:1"}),
        )])
        .await;
    let found = f
        .wait_n("ImageNotFound", 1, Duration::from_secs(5), |r| {
            matches!(r, SupervisorReport::State(s) if s.name == "ghost-1" && s.reason == "ImageNotFound")
        })
        .await;
    println!(
        "FIGURE unknown image -> ImageNotFound state: {:?}",
        t.elapsed()
    );
    let SupervisorReport::State(state) = &found[0].1 else {
        unreachable!()
    };
    assert_eq!(state.phase().name(), "Pending");
    assert!(
        state.message.contains("ironmesh.test/nope:1"),
        "{}",
        state.message
    );
    // Retried with back-off, not given up.
    f.wait_events("ghost-1", "Failed", 2).await;
    assert!(f.rt.list().await.unwrap().is_empty());

    f.sup().set_desired(vec![]).await;
    f.wait_event("ghost-1", "Deleted").await;
    f.assert_gone("ghost-1").await;
}

#[tokio::test]
async fn logs_return_output_and_follow_new_lines() {
    let mut f = Fixture::new("sv-logs", |_| {}).await;
    f.sup()
        .set_desired(vec![desired(
            "log-1",
            1,
            json!({"command": sh("echo hello; echo oops >&2; \
                                  while [ ! -e /tmp/more ]; do sleep 0.1; done; \
                                  echo later; exec sleep 1000")}),
        )])
        .await;
    f.wait_state("log-1 Running", is_running("log-1")).await;

    // The shim copies output to the files on its own time: poll for it.
    let deadline = Instant::now() + DEADLINE;
    let all = loop {
        let all = read_all(f.sup().logs("log-1", 0, false).await.unwrap()).await;
        if all.contains("hello") && all.contains("oops") {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "output never reached the log: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, bounded by the deadline
    };
    assert_eq!(all, "hello\noops\n", "stdout, then stderr");
    let last = read_all(f.sup().logs("log-1", 1, false).await.unwrap()).await;
    assert_eq!(last, "oops\n");

    let mut follow = f.sup().logs("log-1", 0, true).await.unwrap();
    let mut got = String::new();
    let t = Instant::now();
    let exec =
        f.rt.exec(
            "log-1",
            &[
                "/bin/busybox".to_string(),
                "touch".into(),
                "/tmp/more".into(),
            ],
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(exec.exit_code, Some(0));
    while !got.contains("later") {
        let chunk = tokio::time::timeout(DEADLINE, follow.recv())
            .await
            .expect("followed log yields the new line")
            .expect("stream still open");
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    println!(
        "FIGURE followed log line latency (exec + poll): {:?}",
        t.elapsed()
    );
    assert_eq!(got, "hello\noops\nlater\n");
    drop(follow);

    match f.sup().logs("nobody", 0, false).await {
        Err(SupervisorError::UnknownInstance { name }) => assert_eq!(name, "nobody"),
        other => panic!("expected UnknownInstance, got {:?}", other.map(|_| ())),
    }
}

/// The task's status in containerd, if it has one.
async fn task_status(rt: &Runtime, name: &str) -> Option<TaskStatus> {
    rt.task(name).await.unwrap().map(|t| t.status)
}

#[tokio::test]
async fn network_comes_up_alongside_the_container_and_before_the_task_starts() {
    let net = FakeNetwork::new("overlap", false, 0);
    let mut f = Fixture::with_network("sv-net-overlap", |_| {}, Some(net.clone() as _)).await;
    f.sup()
        .set_desired(vec![desired("n-1", 1, sleeper())])
        .await;
    // The datapath attach is held, yet the container gets created.
    f.wait_event("n-1", "Created").await;
    assert!(
        !net.calls().iter().any(|c| c == "attached n-1"),
        "{:?}",
        net.calls()
    );
    f.wait_state("n-1 address", |s| s.name == "n-1" && s.ip == "10.99.0.7")
        .await;
    f.quiet_for(Duration::from_millis(500)).await;
    assert!(
        !f.seen
            .iter()
            .any(|(_, r)| matches!(r, SupervisorReport::State(s) if s.phase().name() == "Running")),
        "started before the datapath was attached:\n{}",
        f.history()
    );
    let status = task_status(&f.rt, "n-1").await;
    assert!(
        matches!(status, None | Some(TaskStatus::Created)),
        "task ran before the datapath was attached: {status:?}"
    );

    net.open();
    let running = f.wait_state("n-1 Running", is_running("n-1")).await;
    assert_eq!(running.ip, "10.99.0.7");
    assert_eq!(task_status(&f.rt, "n-1").await, Some(TaskStatus::Running));
    assert_eq!(net.calls(), ["setup n-1", "attach n-1", "attached n-1"]);

    f.sup().set_desired(vec![]).await;
    f.wait_event("n-1", "Deleted").await;
    f.assert_gone("n-1").await;
    assert_eq!(net.calls().last().map(String::as_str), Some("teardown n-1"));
}

#[tokio::test]
async fn failed_network_setup_is_reported_and_the_task_waits_for_it() {
    let net = FakeNetwork::new("fail", true, 2);
    let mut f = Fixture::with_network("sv-net-fail", |_| {}, Some(net.clone() as _)).await;
    f.sup()
        .set_desired(vec![desired("f-1", 1, sleeper())])
        .await;
    let failed = f
        .wait_state("f-1 NetworkSetupError", |s| {
            s.name == "f-1" && s.reason == "NetworkSetupError"
        })
        .await;
    assert_eq!(failed.phase().name(), "Pending");
    assert!(
        failed.message.contains("fake datapath refused f-1"),
        "{}",
        failed.message
    );
    let status = task_status(&f.rt, "f-1").await;
    assert!(
        status != Some(TaskStatus::Running),
        "task runs without its network"
    );

    // Retried with back-off until it works; only then does the task start.
    f.wait_state("f-1 Running", is_running("f-1")).await;
    let calls = net.calls();
    let attached = calls.iter().position(|c| c == "attached f-1");
    assert!(attached.is_some(), "{calls:?}");
    assert_eq!(
        calls.iter().filter(|c| *c == "attach failed f-1").count(),
        2,
        "{calls:?}"
    );
    let events: Vec<String> = f
        .seen
        .iter()
        .filter_map(|(_, r)| match r {
            SupervisorReport::Event(e) if e.instance == "f-1" && e.reason == "Failed" => {
                Some(e.message.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].starts_with("Network setup failed: "),
        "{events:?}"
    );

    // Removed while its network is still being brought up: the teardown
    // waits for the bring-up, so nothing is set up after it.
    net.gate.send_replace(false);
    f.sup()
        .set_desired(vec![desired("g-1", 1, sleeper())])
        .await;
    f.wait_event("g-1", "Created").await;
    f.sup().set_desired(vec![]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !net.calls().iter().any(|c| c == "teardown g-1"),
        "teardown raced the bring-up: {:?}",
        net.calls()
    );
    net.open();
    f.wait_event("g-1", "Deleted").await;
    f.wait_event("f-1", "Deleted").await;
    f.assert_gone("g-1").await;
    f.assert_gone("f-1").await;
    let calls = net.calls();
    let g: Vec<&str> = calls
        .iter()
        .filter(|c| c.ends_with(" g-1"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        g,
        ["setup g-1", "attach g-1", "attached g-1", "teardown g-1"]
    );
}
