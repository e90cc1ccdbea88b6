//! End-to-end tests of placement and failure handling on three fake hosts:
//! replicas spread over hosts, an unschedulable request explained per node,
//! a host whose agent dies loses its instances to the others within 10 s
//! and does not run them twice when it returns, and drain moves everything
//! off a node.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ironmesh_tests::{
    ctr, instances, push_image, str_at, wait_for, Agent, Controller, ControllerOpts,
};
use serde_json::Value;

const BATCH: &str = "ironmesh/batch-step:dev";

fn ready(ctl: &Controller, name: &str) {
    wait_for(&format!("{name} Ready"), Duration::from_secs(90), || {
        ctl.node(name)
            .filter(|n| ironmesh_tests::ready_status(n).as_deref() == Some("True"))
    });
}

fn imctl_ok(ctl: &Controller, args: &[&str]) -> String {
    let out = ctl.imctl(args);
    assert!(
        out.status.success(),
        "imctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn sleeper(name: &str, replicas: u32, memory: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
spec:
  image: {BATCH}
  replicas: {replicas}
  env:
    - name: SLEEP_MS
      value: \"600000\"
  resources:
    cpu: 10m
    memory: {memory}
"
    )
}

/// `(instance, node)` of every instance of `workload` that runs, when all
/// `want` of them run on nodes outside `avoid`.
fn all_running(
    ctl: &Controller,
    workload: &str,
    want: usize,
    avoid: &[&str],
) -> Option<Vec<(String, String)>> {
    let list = instances(ctl, workload);
    let ok = list.len() == want
        && list.iter().all(|i| {
            str_at(i, "/status/phase") == "Running" && !avoid.contains(&str_at(i, "/spec/node"))
        });
    ok.then(|| {
        list.iter()
            .map(|i| {
                (
                    str_at(i, "/metadata/name").to_string(),
                    str_at(i, "/spec/node").to_string(),
                )
            })
            .collect()
    })
}

#[test]
fn unschedulable_request_is_explained_and_cordon_keeps_new_instances_off() {
    let ctl = Controller::start(ControllerOpts::default());
    let _agent = Agent::start(&ctl, "solo");
    ready(&ctl, "solo");
    push_image(&ctl, "batch-step");

    ctl.apply_yaml(&sleeper("huge", 1, "64Ti"));
    let i = wait_for("huge unschedulable", Duration::from_secs(20), || {
        instances(&ctl, "huge")
            .into_iter()
            .find(|i| str_at(i, "/status/reason") == "Unschedulable")
    });
    assert_eq!(
        str_at(&i, "/status/message"),
        "0/1 nodes available: 1 insufficient memory",
        "{i}"
    );
    assert!(i.pointer("/spec/node").is_none_or(Value::is_null), "{i}");

    // Cordoned: a new instance is not placed, and says why.
    let out = imctl_ok(&ctl, &["node", "cordon", "solo"]);
    assert!(out.contains("nodes/solo cordoned"), "{out}");
    let node = ctl.node("solo").unwrap();
    assert_eq!(
        node.pointer("/spec/unschedulable"),
        Some(&Value::Bool(true))
    );
    assert!(
        node.pointer("/status/podCIDR").is_some(),
        "status kept: {node}"
    );
    assert_eq!(ironmesh_tests::ready_status(&node).as_deref(), Some("True"));
    ctl.apply_yaml(&sleeper("small", 1, "16Mi"));
    let i = wait_for("small unschedulable", Duration::from_secs(20), || {
        instances(&ctl, "small")
            .into_iter()
            .find(|i| str_at(i, "/status/reason") == "Unschedulable")
    });
    assert_eq!(
        str_at(&i, "/status/message"),
        "0/1 nodes available: 1 unschedulable"
    );
    imctl_ok(&ctl, &["node", "uncordon", "solo"]);
    wait_for(
        "small placed after uncordon",
        Duration::from_secs(30),
        || all_running(&ctl, "small", 1, &[]),
    );
}

#[test]
fn replicas_spread_move_off_a_dead_host_not_twice_and_drain() {
    let ctl = Controller::start(ControllerOpts::default());
    let hosts = ["h1", "h2", "h3"];
    let mut agents: Vec<Agent> = hosts.iter().map(|h| Agent::start(&ctl, h)).collect();
    for h in hosts {
        ready(&ctl, h);
    }
    push_image(&ctl, "batch-step");
    ctl.apply_yaml(&sleeper("spread", 3, "16Mi"));

    // One replica per host.
    let placed = wait_for("3 replicas running", Duration::from_secs(60), || {
        all_running(&ctl, "spread", 3, &[])
    });
    let nodes: BTreeSet<&str> = placed.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(hosts), "{placed:?}");

    // Kill h1's agent: its instance runs elsewhere within 10 s.
    let moved: Vec<String> = placed
        .iter()
        .filter(|(_, n)| n == "h1")
        .map(|(i, _)| i.clone())
        .collect();
    assert!(ctr(&agents[0], &["containers", "ls", "-q"]).contains(&moved[0]));
    let killed = Instant::now();
    agents[0].proc.kill9();
    let after = wait_for("replicas running off h1", Duration::from_secs(30), || {
        all_running(&ctl, "spread", 3, &["h1"])
    });
    let failover = killed.elapsed();
    println!(
        "failover: {:.2}s from kill -9 of h1's agent to all replicas Running on other hosts",
        failover.as_secs_f64()
    );
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    assert!(after.iter().all(|(i, _)| !moved.contains(i)), "{after:?}");

    // h1 returns: nothing is bound to it, and its containerd drops the
    // moved instance instead of running it a second time.
    agents[0].restart_without_token(&ctl);
    ready(&ctl, "h1");
    wait_for(
        "moved instance removed from h1",
        Duration::from_secs(30),
        || {
            let containers = ctr(&agents[0], &["containers", "ls", "-q"]);
            moved
                .iter()
                .all(|m| !containers.contains(m.as_str()))
                .then_some(())
        },
    );
    let list = instances(&ctl, "spread");
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(
        list.iter().all(|i| str_at(i, "/spec/node") != "h1"),
        "{list:?}"
    );

    // Drain h2: everything leaves it and runs on h1 and h3.
    let started = Instant::now();
    let out = imctl_ok(&ctl, &["node", "drain", "h2", "--timeout", "60s"]);
    assert!(out.contains("nodes/h2 drained"), "{out}");
    let after = wait_for("replicas running off h2", Duration::from_secs(60), || {
        all_running(&ctl, "spread", 3, &["h2"])
    });
    println!(
        "drain: {:.2}s until all replicas Running off h2: {after:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        ctl.node("h2").unwrap().pointer("/spec/unschedulable"),
        Some(&Value::Bool(true))
    );
    wait_for("h2's containers gone", Duration::from_secs(60), || {
        let containers = ctr(&agents[1], &["containers", "ls", "-q"]);
        placed
            .iter()
            .all(|(i, _)| !containers.contains(i.as_str()))
            .then_some(())
    });
    drop(agents);
}

#[test]
fn eviction_pauses_when_most_nodes_are_not_ready_and_resumes_when_they_return() {
    let ctl = Controller::start(ControllerOpts::default());
    let hosts = ["g1", "g2", "g3", "g4"];
    let mut agents: Vec<Agent> = hosts.iter().map(|h| Agent::start(&ctl, h)).collect();
    for h in hosts {
        ready(&ctl, h);
    }
    push_image(&ctl, "batch-step");
    ctl.apply_yaml(&sleeper("guarded", 4, "16Mi"));
    let placed = wait_for("4 replicas running", Duration::from_secs(60), || {
        all_running(&ctl, "guarded", 4, &[])
    });
    let names: BTreeSet<String> = placed.iter().map(|(i, _)| i.clone()).collect();

    // 3 of 4 hosts die: more than half NotReady, so nothing moves; each
    // held instance says why.
    for a in &mut agents[1..] {
        a.proc.kill9();
    }
    let held = wait_for(
        "EvictionPaused on the 3 instances of the dead hosts",
        Duration::from_secs(60),
        || {
            let list = instances(&ctl, "guarded");
            let held: Vec<Value> = list
                .into_iter()
                .filter(|i| str_at(i, "/status/reason") == "EvictionPaused")
                .collect();
            (held.len() == 3).then_some(held)
        },
    );
    let event = held[0]
        .pointer("/status/events")
        .and_then(Value::as_array)
        .and_then(|e| e.iter().find(|e| str_at(e, "/reason") == "EvictionPaused"))
        .cloned()
        .unwrap_or_default();
    assert!(
        str_at(&event, "/message").contains("3 of 4 nodes are NotReady, more than 50%"),
        "{event}"
    );
    let now: BTreeSet<String> = instances(&ctl, "guarded")
        .iter()
        .map(|i| str_at(i, "/metadata/name").to_string())
        .collect();
    assert_eq!(now, names, "nothing was evicted");
    let table = imctl_ok(&ctl, &["get", "nodes"]);
    assert!(
        table.contains("Warning: eviction paused: 3 of 4 nodes are NotReady"),
        "{table}"
    );
    let metrics = ctl.scrape_metrics().unwrap();
    assert_eq!(
        ironmesh_tests::metric(&metrics, "ironmesh_controller_eviction_paused"),
        Some(1.0),
        "{metrics}"
    );

    // Two return: 1 of 4 NotReady, so the last dead host's instance moves.
    agents[1].restart_without_token(&ctl);
    agents[2].restart_without_token(&ctl);
    ready(&ctl, "g2");
    ready(&ctl, "g3");
    wait_for(
        "the instance of g4 replaced on a Ready host",
        Duration::from_secs(60),
        || all_running(&ctl, "guarded", 4, &["g4"]),
    );
    let table = imctl_ok(&ctl, &["get", "nodes"]);
    assert!(!table.contains("eviction paused"), "{table}");
    drop(agents);
}
