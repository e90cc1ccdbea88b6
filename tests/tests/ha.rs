//! Controller high availability, end to end: three controllers on one
//! private etcd, two agents that know all three. Kill the leader with
//! SIGKILL → another controller leads within a few seconds, the agents
//! reconnect, nothing acknowledged is lost, new work is placed; kill and
//! restart etcd → the controllers recover.
//!
//! Every process is killed by PID when its fixture drops, also on panic.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ironmesh_tests::{metric, wait_for, Agent, Controller, ControllerOpts, Etcd};
use serde_json::Value;

/// Leader lease TTL the test controllers run with (the default).
const LEADER_TTL: &str = "3s";

pub struct Cluster {
    pub etcd: Etcd,
    pub controllers: Vec<Controller>,
    _key_dir: tempfile::TempDir,
}

fn start_controllers(n: usize) -> Cluster {
    let etcd = Etcd::start();
    let key_dir = tempfile::tempdir().unwrap();
    let key = key_dir.path().join("ca.key");
    ironmesh_tests::write_ca_key(&key);
    let opts = ControllerOpts {
        leader_ttl: Some(LEADER_TTL),
        ..ControllerOpts::on_etcd(&etcd, &key)
    };
    // One test network: agents in its hosts reach every controller.
    let net = std::sync::Arc::new(ironmesh_tests::TestNet::new());
    let controllers = (0..n)
        .map(|_| Controller::start_on(net.clone(), opts.clone()))
        .collect();
    Cluster {
        etcd,
        controllers,
        _key_dir: key_dir,
    }
}

fn is_leader(c: &Controller) -> Option<bool> {
    let text = c.scrape_metrics().ok()?;
    metric(&text, "ironmesh_controller_leader").map(|v| v == 1.0)
}

/// Index of the only leader among the live controllers, once there is
/// exactly one.
fn wait_one_leader(cs: &[Controller], alive: &[bool], deadline: Duration) -> usize {
    wait_for("exactly one leader", deadline, || {
        let leaders: Vec<usize> = (0..cs.len())
            .filter(|i| alive[*i] && is_leader(&cs[*i]) == Some(true))
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
}

fn apply(ctl: &Controller, yaml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("w.yaml");
    std::fs::write(&f, yaml).unwrap();
    ctl.imctl(&["apply", "-f", f.to_str().unwrap()])
}

fn ghost(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
spec:
  image: ironmesh/does-not-exist:1
  replicas: {replicas}
"
    )
}

fn instances(ctl: &Controller, workload: &str) -> Vec<Value> {
    let out = ctl.imctl(&[
        "get",
        "instances",
        "-l",
        &format!("ironmesh.dev/workload={workload}"),
        "-o",
        "json",
    ]);
    if !out.status.success() {
        return vec![];
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Waits until `workload` has `n` instances bound to nodes whose agents
/// reported on them (the image is missing, so they report ImageNotFound).
fn wait_placed_and_reported(ctl: &Controller, workload: &str, n: usize, deadline: Duration) {
    wait_for(
        &format!("{n} instances of {workload} placed and reported"),
        deadline,
        || {
            let l = instances(ctl, workload);
            (l.len() == n
                && l.iter().all(|i| {
                    i.pointer("/spec/node").and_then(Value::as_str).is_some()
                        && i.pointer("/status/reason").and_then(Value::as_str)
                            == Some("ImageNotFound")
                }))
            .then_some(())
        },
    );
}

fn ready(ctl: &Controller, node: &str) -> bool {
    ctl.node(node)
        .is_some_and(|n| ironmesh_tests::ready_status(&n).as_deref() == Some("True"))
}

fn open_streams(cs: &[Controller], alive: &[bool]) -> f64 {
    (0..cs.len())
        .filter(|i| alive[*i])
        .filter_map(|i| {
            let text = cs[i].scrape_metrics().ok()?;
            metric(&text, "ironmesh_controller_sync_streams")
        })
        .sum()
}

#[test]
fn controllers_share_one_ca_and_token_through_etcd() {
    let cluster = start_controllers(2);
    let [a, b] = &cluster.controllers[..] else {
        unreachable!()
    };
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(a.ca_cert()), read(b.ca_cert()), "one cluster CA");
    assert_eq!(read(a.token_file()), read(b.token_file()), "one token");
    // The CA key is only in etcd, sealed.
    assert!(!a.data_dir().join("pki/ca.key").exists());
    // Each controller's admin.yaml works against the other controller too:
    // writes through one are read through the other.
    let out = apply(a, &ghost("shared", 1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = b.imctl_json(&["get", "workloads", "shared"]);
    assert_eq!(got.pointer("/metadata/name"), Some(&Value::from("shared")));
}

#[test]
fn leader_kill_fails_over_agents_reconnect_and_etcd_restart_recovers() {
    let mut cluster = start_controllers(3);
    let mut alive = vec![true; 3];
    let cs = &cluster.controllers;
    // Agents know every controller, in different orders.
    let _a = Agent::start_multi(&[&cs[0], &cs[1], &cs[2]], "node-a");
    let _b = Agent::start_multi(&[&cs[1], &cs[2], &cs[0]], "node-b");
    for n in ["node-a", "node-b"] {
        wait_for(&format!("{n} Ready"), Duration::from_secs(30), || {
            ready(&cs[2], n).then_some(())
        });
    }
    let leader = wait_one_leader(cs, &alive, Duration::from_secs(15));

    // Acknowledged before the kill, through a follower.
    let follower = (leader + 1) % 3;
    let out = apply(&cs[follower], &ghost("before", 2));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_placed_and_reported(&cs[follower], "before", 2, Duration::from_secs(30));

    // kill -9 the leader; time until another one leads.
    let killed_at = Instant::now();
    cluster.controllers[leader].proc.kill9();
    alive[leader] = false;
    let cs = &cluster.controllers;
    let new_leader = wait_one_leader(cs, &alive, Duration::from_secs(20));
    let failover = killed_at.elapsed();
    eprintln!(
        "failover: controller {new_leader} leads {:.2}s after controller {leader} was killed",
        failover.as_secs_f64()
    );
    assert_ne!(new_leader, leader);
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    // Agents reconnect (both streams open on survivors) and stay Ready.
    wait_for(
        "both agents streaming to survivors",
        Duration::from_secs(20),
        || (open_streams(cs, &alive) == 2.0).then_some(()),
    );
    for n in ["node-a", "node-b"] {
        wait_for(
            &format!("{n} Ready after failover"),
            Duration::from_secs(20),
            || ready(&cs[new_leader], n).then_some(()),
        );
    }
    // Nothing acknowledged was lost.
    assert_eq!(instances(&cs[new_leader], "before").len(), 2);
    // Work applied after the failover is placed by the new leader.
    let out = apply(&cs[new_leader], &ghost("after", 2));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_placed_and_reported(&cs[new_leader], "after", 2, Duration::from_secs(30));

    // Restart etcd: the controllers recover and take writes again.
    cluster.etcd.restart();
    let cs = &cluster.controllers;
    let survivor = (0..3).find(|i| alive[*i]).unwrap();
    wait_for(
        "an apply after etcd restarted",
        Duration::from_secs(30),
        || {
            apply(&cs[survivor], &ghost("post-etcd", 1))
                .status
                .success()
                .then_some(())
        },
    );
    wait_one_leader(cs, &alive, Duration::from_secs(20));
    wait_placed_and_reported(&cs[survivor], "post-etcd", 1, Duration::from_secs(30));
    for n in ["node-a", "node-b"] {
        wait_for(
            &format!("{n} Ready after etcd restart"),
            Duration::from_secs(20),
            || ready(&cs[survivor], n).then_some(()),
        );
    }
}
