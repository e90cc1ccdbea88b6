//! End-to-end tests of workloads on a real containerd: the project's own
//! images pushed with `imctl image push`, placed by the controller, run,
//! probed, restarted and cleaned up by the agent.
//!
//! Each agent runs in its own fake host (a network namespace on a test
//! bridge) with its own containerd; each instance gets its own network
//! namespace and address, reached from inside the host.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ironmesh_tests::{
    ctr, instances, push_image, str_at, wait_for, wait_instance, Agent, Controller, ControllerOpts,
};
use serde_json::Value;

const RECORDS: &str = "ironmesh/records-server:dev";
const BATCH: &str = "ironmesh/batch-step:dev";

fn start_cluster() -> (Controller, Agent) {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "node-a");
    agent.wait_ready(&ctl, Duration::from_secs(90));
    (ctl, agent)
}

fn u(v: &Value, p: &str) -> u64 {
    v.pointer(p).and_then(Value::as_u64).unwrap_or(0)
}

fn running_ready(i: &Value) -> bool {
    str_at(i, "/status/phase") == "Running"
        && i.pointer("/status/ready") == Some(&Value::Bool(true))
}

fn records_workload(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
spec:
  image: {RECORDS}
  env:
    - name: LISTEN_ADDR
      value: 0.0.0.0:8080
  resources:
    cpu: 100m
    memory: 64Mi
  readinessProbe:
    httpGet:
      path: /healthz
      port: 8080
    periodSeconds: 1
{extra}"
    )
}

#[test]
fn workload_runs_ready_answers_with_its_memory_limit_and_logs() {
    let (ctl, agent) = start_cluster();
    push_image(&ctl, "records-server");
    ctl.apply_yaml(&records_workload("orders", ""));

    let inst = wait_instance(
        &ctl,
        "orders",
        "Running and ready",
        Duration::from_secs(30),
        running_ready,
    );
    let name = str_at(&inst, "/metadata/name").to_string();
    assert_eq!(str_at(&inst, "/spec/node"), "node-a");
    assert!(u(&inst, "/status/pid") > 0, "{inst}");

    let ip: std::net::IpAddr = str_at(&inst, "/status/ip")
        .parse()
        .expect("instance has an IP");
    let body = agent
        .host
        .http_get(std::net::SocketAddr::new(ip, 8080), "/healthz")
        .unwrap();
    assert!(body.contains("ok"), "{body}");

    // The memory request became the cgroup's limit (cgroup v1 here; v2 if unified).
    let v1 = PathBuf::from("/sys/fs/cgroup/memory")
        .join(agent.containerd.cgroup_prefix().trim_start_matches('/'))
        .join(&name)
        .join("memory.limit_in_bytes");
    let v2 = PathBuf::from("/sys/fs/cgroup")
        .join(agent.containerd.cgroup_prefix().trim_start_matches('/'))
        .join(&name)
        .join("memory.max");
    let limit = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .unwrap_or_else(|e| {
            panic!(
                "no memory limit at {} or {}: {e}",
                v1.display(),
                v2.display()
            )
        });
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    // The workload's status follows its instances after a coalescing pass
    // (up to a second later), so wait for it rather than read it once.
    let started = Instant::now();
    loop {
        let wl = ctl.imctl_json(&["get", "workloads", "orders"]);
        if u(&wl, "/status/readyReplicas") == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "workload never reported 1 ready replica: {wl}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let table = ctl.imctl(&["get", "instances"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&name) && table.contains("Running"),
        "{table}"
    );

    let logs = ctl.imctl(&["logs", &name]);
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("listening on"), "logs: {logs}");

    let describe = ctl.imctl(&["describe", "workload", "orders"]);
    let describe = String::from_utf8_lossy(&describe.stdout);
    for reason in ["Pulled", "Started"] {
        assert!(
            describe.contains(reason),
            "describe lacks {reason}:\n{describe}"
        );
    }
}

#[test]
fn crashing_instance_restarts_with_growing_backoff_and_reports_its_exit_code() {
    let (ctl, _agent) = start_cluster();
    push_image(&ctl, "batch-step");
    ctl.apply_yaml(&format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: crasher
spec:
  image: {BATCH}
  env:
    - name: EXIT_CODE
      value: \"3\"
  restartPolicy: Always
"
    ));
    // Times at which the restart count went up (agent backoff: 200ms doubling).
    let mut seen: Vec<(u64, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = None;
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "too few restarts: {seen:?}, last {last:?}"
        );
        if let Some(i) = instances(&ctl, "crasher").first() {
            let r = u(i, "/status/restarts");
            if r > seen.last().map(|x| x.0).unwrap_or(0) {
                seen.push((r, Instant::now()));
            }
            last = Some(i.clone());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let i = last.unwrap();
    assert_eq!(
        i.pointer("/status/exitCode").and_then(Value::as_i64),
        Some(3),
        "{i}"
    );
    let gap = |a: usize| seen[a + 1].1 - seen[a].1;
    assert!(
        gap(2) > gap(0),
        "backoff must grow: restarts at {:?}",
        seen.iter().map(|x| x.1 - seen[0].1).collect::<Vec<_>>()
    );
    let describe = ctl.imctl(&["describe", "workload", "crasher"]);
    let describe = String::from_utf8_lossy(&describe.stdout);
    assert!(
        describe.contains("BackOff") || describe.contains("CrashLoopBackOff"),
        "{describe}"
    );
}

#[test]
fn failing_liveness_probe_restarts_the_container() {
    let (ctl, _agent) = start_cluster();
    push_image(&ctl, "records-server");
    ctl.apply_yaml(&records_workload(
        "sick",
        "  livenessProbe:
    httpGet:
      path: /no-such-page
      port: 8080
    periodSeconds: 1
    failureThreshold: 2
",
    ));
    let inst = wait_instance(
        &ctl,
        "sick",
        "restarted by liveness",
        Duration::from_secs(40),
        |i| u(i, "/status/restarts") >= 1,
    );
    let events = inst.pointer("/status/events").cloned().unwrap_or_default();
    assert!(events.to_string().contains("Unhealthy"), "events: {events}");
}

#[test]
fn agent_restart_adopts_running_containers_and_cleans_up_deleted_ones() {
    let (ctl, mut agent) = start_cluster();
    push_image(&ctl, "records-server");
    ctl.apply_yaml(&records_workload("keep", ""));
    ctl.apply_yaml(&records_workload("gone", ""));
    let keep = wait_instance(
        &ctl,
        "keep",
        "ready",
        Duration::from_secs(30),
        running_ready,
    );
    let gone = wait_instance(
        &ctl,
        "gone",
        "ready",
        Duration::from_secs(30),
        running_ready,
    );
    let pid = u(&keep, "/status/pid");
    let gone_name = str_at(&gone, "/metadata/name").to_string();

    agent.proc.kill9();
    let out = ctl.imctl(&["delete", "workload", "gone"]);
    assert!(out.status.success());
    agent.restart_without_token(&ctl);

    // Same task, no restart.
    let after = wait_instance(&ctl, "keep", "adopted", Duration::from_secs(30), |i| {
        running_ready(i) && str_at(i, "/status/reason") != "Scheduled"
    });
    assert_eq!(u(&after, "/status/pid"), pid, "{after}");
    assert_eq!(u(&after, "/status/restarts"), 0, "{after}");
    assert!(PathBuf::from(format!("/proc/{pid}")).exists());
    // The instance deleted while the agent was down is gone from containerd.
    wait_for(
        "deleted instance removed from containerd",
        Duration::from_secs(30),
        || (!ctr(&agent, &["containers", "ls", "-q"]).contains(&gone_name)).then_some(()),
    );
}

#[test]
fn deleting_a_workload_leaves_nothing_in_containerd() {
    let (ctl, agent) = start_cluster();
    push_image(&ctl, "records-server");
    ctl.apply_yaml(&records_workload("brief", ""));
    let inst = wait_instance(
        &ctl,
        "brief",
        "ready",
        Duration::from_secs(30),
        running_ready,
    );
    let name = str_at(&inst, "/metadata/name").to_string();
    assert!(ctr(&agent, &["containers", "ls", "-q"]).contains(&name));

    let out = ctl.imctl(&["delete", "workload", "brief"]);
    assert!(out.status.success());
    wait_for("instance object gone", Duration::from_secs(20), || {
        instances(&ctl, "brief").is_empty().then_some(())
    });
    wait_for("containerd clean", Duration::from_secs(30), || {
        let containers = ctr(&agent, &["containers", "ls", "-q"]);
        let tasks = ctr(&agent, &["tasks", "ls"]);
        let snapshots = ctr(&agent, &["snapshots", "ls"]);
        let logs = agent.state_dir().join("instances").join(&name);
        (!containers.contains(&name)
            && !tasks.contains(&name)
            && !snapshots.contains(&name)
            && !logs.exists())
        .then_some(())
    });
}

#[test]
fn unknown_image_gives_a_clear_reason() {
    let (ctl, _agent) = start_cluster();
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: ghost
spec:
  image: ironmesh/does-not-exist:1
",
    );
    let inst = wait_instance(
        &ctl,
        "ghost",
        "ImageNotFound",
        Duration::from_secs(20),
        |i| str_at(i, "/status/reason") == "ImageNotFound",
    );
    assert_eq!(str_at(&inst, "/status/phase"), "Pending");
    assert!(
        str_at(&inst, "/status/message").contains("ironmesh/does-not-exist:1"),
        "{inst}"
    );
}

#[test]
fn replicas_are_kept_exactly() {
    let (ctl, _agent) = start_cluster();
    push_image(&ctl, "batch-step");
    let wl = |n: u32| {
        format!(
            "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: sleepers
spec:
  image: {BATCH}
  replicas: {n}
  env:
    - name: SLEEP_MS
      value: \"600000\"
"
        )
    };
    ctl.apply_yaml(&wl(3));
    let names = wait_for("3 running", Duration::from_secs(40), || {
        let l = instances(&ctl, "sleepers");
        (l.len() == 3 && l.iter().all(|i| str_at(i, "/status/phase") == "Running")).then(|| {
            l.iter()
                .map(|i| str_at(i, "/metadata/name").to_string())
                .collect::<Vec<_>>()
        })
    });
    // A deleted instance is replaced.
    assert!(ctl
        .imctl(&["delete", "instance", &names[0]])
        .status
        .success());
    wait_for("replacement", Duration::from_secs(30), || {
        let l = instances(&ctl, "sleepers");
        (l.len() == 3 && !l.iter().any(|i| str_at(i, "/metadata/name") == names[0])).then_some(())
    });
    ctl.apply_yaml(&wl(1));
    wait_for("scaled to 1", Duration::from_secs(30), || {
        (instances(&ctl, "sleepers").len() == 1).then_some(())
    });
}
