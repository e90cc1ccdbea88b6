//! End-to-end tests of pipelines on a real containerd: a diamond DAG with
//! a 4-replica indexed step sharing the run volume, a failing step retried
//! then failing the run and skipping its dependants, cancel, a scheduled
//! pipeline, and a worker step draining 1,000 items with 3 workers while
//! the controller is killed and restarted mid-run.
//!
//! Run volumes need a storage pool: the harness gives each agent a
//! directory pool in its own directory; a guard unmounts what is left
//! below it when a test ends, also on panic.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ironmesh_tests::{images_dir, str_at, wait_for, Agent, Controller, ControllerOpts, Unmounter};
use serde_json::Value;

/// A controller and one agent with a storage pool, batch-step pushed.
struct Cluster {
    ctl: Controller,
    agent: Agent,
    _unmount: Unmounter,
}

fn cluster(node: &str) -> Cluster {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, node);
    // The agent's pool is in its own directory (the harness's default).
    let unmount = Unmounter(vec![agent.dir.path().to_path_buf()]);
    agent.wait_ready(&ctl, Duration::from_secs(90));
    let dir = images_dir().join("batch-step");
    let out = ctl.imctl(&["image", "push", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "image push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the node reports its pool", Duration::from_secs(30), || {
        ctl.node(node)
            .filter(|n| n.pointer("/status/storage/pools/0/capacityBytes").is_some())
    });
    Cluster {
        ctl,
        agent,
        _unmount: unmount,
    }
}

fn imctl_ok(ctl: &Controller, args: &[&str]) -> String {
    let out = ctl.imctl(args);
    assert!(
        out.status.success(),
        "imctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `imctl pipeline run NAME` → the run's name.
fn start_run(ctl: &Controller, pipeline: &str) -> String {
    let out = imctl_ok(ctl, &["pipeline", "run", pipeline]);
    out.trim()
        .strip_prefix("pipelineruns/")
        .and_then(|s| s.strip_suffix(" created"))
        .unwrap_or_else(|| panic!("unexpected output {out:?}"))
        .to_string()
}

fn run_obj(ctl: &Controller, run: &str) -> Value {
    let out = ctl.imctl(&["get", "pipelinerun", run, "-o", "json"]);
    if !out.status.success() {
        let log = ctl.proc.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "imctl get pipelinerun {run}: {}\ncontroller log (last lines, newest first):\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail.join("\n")
        );
    }
    serde_json::from_slice(&out.stdout).expect("imctl printed JSON")
}

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    try_step(run, name).unwrap_or_else(|| panic!("run has no step {name}: {run:#}"))
}

/// `None` until the controller has started the run.
fn try_step<'a>(run: &'a Value, name: &str) -> Option<&'a Value> {
    run.pointer("/status/steps")
        .and_then(Value::as_array)
        .and_then(|l| l.iter().find(|s| s["name"] == name))
}

/// Waits until the run has finished; returns it.
fn wait_finished(ctl: &Controller, run: &str, deadline: Duration) -> Value {
    let started = Instant::now();
    loop {
        let v = run_obj(ctl, run);
        if matches!(
            str_at(&v, "/status/phase"),
            "Succeeded" | "Failed" | "Cancelled"
        ) {
            return v;
        }
        if started.elapsed() > deadline {
            panic!("run {run} did not finish in {deadline:?}: {v:#}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Panics with the run and every step's logs unless it succeeded.
#[track_caller]
fn assert_succeeded(ctl: &Controller, run: &str, v: &Value) {
    if str_at(v, "/status/phase") != "Succeeded" {
        let logs = ctl.imctl(&["pipeline", "logs", run]);
        panic!(
            "run {run} did not succeed: {v:#}\nlogs:\n{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
    }
}

fn instances_of(ctl: &Controller, run: &str) -> Vec<String> {
    let v = ctl.imctl_json(&[
        "get",
        "instances",
        "-l",
        &format!("ironmesh.dev/pipelinerun={run}"),
    ]);
    v.get("items")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|i| str_at(i, "/metadata/name").to_string())
                .collect()
        })
        .unwrap_or_default()
}

const DIAMOND: &str = "apiVersion: ironmesh.dev/v1
kind: Pipeline
metadata:
  name: diamond
spec:
  runVolumeSize: 16Mi
  steps:
    - name: prepare
      image: ironmesh/batch-step:dev
      env: [{name: OUTPUT_NAME, value: prepare.txt}]
      resources: {cpu: 100m, memory: 32Mi}
    - name: shard
      image: ironmesh/batch-step:dev
      replicas: 4
      dependsOn: [prepare]
      resources: {cpu: 100m, memory: 32Mi}
    - name: side
      image: ironmesh/batch-step:dev
      dependsOn: [prepare]
      env: [{name: OUTPUT_NAME, value: side.txt}]
      resources: {cpu: 100m, memory: 32Mi}
    - name: check
      image: ironmesh/batch-step:dev
      args: [--check, '4']
      dependsOn: [shard, side]
      resources: {cpu: 100m, memory: 32Mi}
";

const FLAKY: &str = "apiVersion: ironmesh.dev/v1
kind: Pipeline
metadata:
  name: flaky
spec:
  runVolumeSize: 16Mi
  steps:
    - name: fails
      image: ironmesh/batch-step:dev
      env: [{name: EXIT_CODE, value: '3'}]
      retries: 2
      backoffSeconds: 1
      resources: {cpu: 100m, memory: 32Mi}
    - name: after
      image: ironmesh/batch-step:dev
      dependsOn: [fails]
      resources: {cpu: 100m, memory: 32Mi}
    - name: slow
      image: ironmesh/batch-step:dev
      env: [{name: SLEEP_MS, value: '600000'}]
      resources: {cpu: 100m, memory: 32Mi}
    - name: hangs
      image: ironmesh/batch-step:dev
      env: [{name: SLEEP_MS, value: '600000'}]
      timeoutSeconds: 2
      resources: {cpu: 100m, memory: 32Mi}
";

#[test]
fn diamond_dag_shares_the_run_volume_and_failures_retry_skip_and_cancel() {
    let c = cluster("node-a");
    let ctl = &c.ctl;
    ctl.apply_yaml(DIAMOND);
    ctl.apply_yaml(FLAKY);

    // The diamond: four indexes write their own files, the last step sees
    // all of them on the shared run volume.
    let run = start_run(ctl, "diamond");
    let done = wait_finished(ctl, &run, Duration::from_secs(180));
    assert_succeeded(ctl, &run, &done);
    let shard = step(&done, "shard");
    assert_eq!(shard["succeeded"], 4, "{shard:#}");
    let idx: Vec<u64> = shard["indexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2, 3]);
    let vol = c
        .agent
        .state_dir()
        .join("storage/volumes")
        .join(format!("{run}-data"));
    for i in 0..4 {
        assert_eq!(
            std::fs::read_to_string(vol.join(format!("step-{i}.txt"))).unwrap(),
            format!("index={i} replicas=4\n")
        );
    }
    assert!(vol.join("prepare.txt").is_file() && vol.join("side.txt").is_file());
    // The check step ran after both branches, and its logs say so.
    let logs = imctl_ok(ctl, &["pipeline", "logs", &run, "check"]);
    assert!(
        logs.contains("all 4 step outputs present"),
        "check logs: {logs}"
    );
    let one = imctl_ok(ctl, &["pipeline", "logs", &run, "shard", "2"]);
    assert!(one.contains("index=2 replicas=4"), "shard 2 logs: {one}");
    let runs = imctl_ok(ctl, &["pipeline", "runs", "diamond"]);
    assert!(
        runs.lines()
            .any(|l| l.starts_with(&run) && l.contains("Succeeded") && l.contains("4/4")),
        "{runs}"
    );

    // A failing step: three attempts (1 + 2 retries), exit code 3, its
    // dependant skipped, the run failed; the independent slow step is
    // cancelled with the run.
    let bad = start_run(ctl, "flaky");
    let failed_step = wait_for("step fails finally", Duration::from_secs(120), || {
        let v = run_obj(ctl, &bad);
        (try_step(&v, "fails")?["phase"] == "Failed").then_some(v.clone())
    });
    let fails = step(&failed_step, "fails");
    assert_eq!(fails["attempts"], 3, "{fails:#}");
    assert_eq!(fails["indexes"][0]["exitCode"], 3, "{fails:#}");
    assert!(
        str_at(fails, "/message").contains("exit code 3"),
        "{fails:#}"
    );
    assert_eq!(step(&failed_step, "after")["phase"], "Skipped");
    assert_eq!(
        str_at(&failed_step, "/status/phase"),
        "Running",
        "slow is still running"
    );
    let status = imctl_ok(ctl, &["pipeline", "status", &bad]);
    assert!(status.contains("attempt 3, exit code 3"), "{status}");
    // A step running past timeoutSeconds is killed and fails.
    let timed_out = wait_for("step hangs times out", Duration::from_secs(60), || {
        let v = run_obj(ctl, &bad);
        (try_step(&v, "hangs")?["phase"] == "Failed").then_some(v.clone())
    });
    let hangs = step(&timed_out, "hangs");
    assert_eq!(
        hangs["indexes"][0]["reason"], "DeadlineExceeded",
        "{hangs:#}"
    );

    wait_for("slow step running", Duration::from_secs(60), || {
        let v = run_obj(ctl, &bad);
        (try_step(&v, "slow")?["indexes"][0]["phase"] == "Running").then_some(())
    });
    imctl_ok(ctl, &["pipeline", "cancel", &bad]);
    let cancelled = wait_finished(ctl, &bad, Duration::from_secs(30));
    assert_eq!(
        str_at(&cancelled, "/status/phase"),
        "Cancelled",
        "{cancelled:#}"
    );
    assert_eq!(step(&cancelled, "slow")["phase"], "Cancelled");
    let left = instances_of(ctl, &bad);
    assert!(
        !left.iter().any(|i| i.contains("-slow-")),
        "the slow step's instance was not removed: {left:?}"
    );

    // Deleting runs removes their instances and volumes.
    imctl_ok(ctl, &["delete", "pipelinerun", &run, &bad]);
    wait_for("run objects cleaned up", Duration::from_secs(60), || {
        let vols = ctl.imctl_json(&["get", "volumes"]);
        let vols_left = vols
            .get("items")
            .and_then(Value::as_array)
            .map(|l| l.len())
            .unwrap_or(0);
        (instances_of(ctl, &run).is_empty() && instances_of(ctl, &bad).is_empty() && vols_left == 0)
            .then_some(())
    });
}

#[test]
fn a_schedule_creates_runs() {
    let c = cluster("node-s");
    let ctl = &c.ctl;
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Pipeline
metadata:
  name: tick
spec:
  schedule: '@every 4s'
  runVolumeSize: 16Mi
  steps:
    - name: once
      image: ironmesh/batch-step:dev
      resources: {cpu: 100m, memory: 32Mi}
",
    );
    let succeeded = wait_for(
        "two scheduled runs succeeded",
        Duration::from_secs(120),
        || {
            let v = ctl.imctl_json(&["get", "pipelineruns", "-l", "ironmesh.dev/pipeline=tick"]);
            let names: Vec<String> = v
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|r| str_at(r, "/status/phase") == "Succeeded")
                .map(|r| str_at(r, "/metadata/name").to_string())
                .collect();
            (names.len() >= 2).then_some(names)
        },
    );
    for n in &succeeded {
        assert!(n.starts_with("tick-"), "{n}");
    }
    let p = ctl.imctl_json(&["get", "pipeline", "tick"]);
    assert!(!str_at(&p, "/status/lastScheduleTime").is_empty(), "{p:#}");
    // Stop firing before the cluster goes away.
    imctl_ok(ctl, &["delete", "pipeline", "tick"]);
}

#[test]
fn worker_step_drains_a_thousand_items_across_a_controller_restart() {
    let mut c = cluster("node-w");
    c.ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Pipeline
metadata:
  name: fanout
spec:
  runVolumeSize: 32Mi
  steps:
    - name: produce
      image: ironmesh/batch-step:dev
      args: [--push, work, '1000']
      resources: {cpu: 100m, memory: 32Mi}
    - name: work
      image: ironmesh/batch-step:dev
      mode: worker
      replicas: 3
      args: [--work]
      env: [{name: LEASE_MAX, value: '4'}]
      leaseSeconds: 5
      dependsOn: [produce]
      resources: {cpu: 200m, memory: 32Mi}
    - name: verify
      image: ironmesh/batch-step:dev
      args: [--check-items, '1000']
      dependsOn: [work]
      resources: {cpu: 100m, memory: 32Mi}
",
    );
    let run = start_run(&c.ctl, "fanout");
    // Kill the controller while the workers are draining.
    wait_for("workers draining", Duration::from_secs(120), || {
        let v = run_obj(&c.ctl, &run);
        let w = try_step(&v, "work")?;
        (w["queue"]["done"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let before = run_obj(&c.ctl, &run);
    c.ctl.restart_after_kill9("controller-2.log");
    let done = wait_finished(&c.ctl, &run, Duration::from_secs(240));
    assert_succeeded(&c.ctl, &run, &done);
    let work = step(&done, "work");
    assert_eq!(work["queue"]["done"], 1000, "{work:#}");
    assert_eq!(work["queue"]["pending"], 0);
    assert_eq!(work["succeeded"], 3);
    // Nothing finished before the restart ran again.
    assert_eq!(step(&done, "produce")["attempts"], 1);
    assert_eq!(step(&before, "produce")["phase"], "Succeeded");
    let names = instances_of(&c.ctl, &run);
    assert!(
        !names.iter().any(|n| n.ends_with("-2")),
        "something ran twice: {names:?}"
    );
    // Every worker took part and together they handled every item once.
    let mut total = 0;
    for i in 0..3 {
        let logs = imctl_ok(&c.ctl, &["pipeline", "logs", &run, "work", &i.to_string()]);
        let n: u64 = logs
            .split("handled ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("worker {i} logs: {logs}"));
        total += n;
    }
    assert!(total >= 1000, "workers handled {total} items");
    let items = c
        .agent
        .state_dir()
        .join("storage/volumes")
        .join(format!("{run}-data"))
        .join("items");
    assert_eq!(std::fs::read_dir(&items).unwrap().count(), 1000);
    let _ = &mut c;
}
