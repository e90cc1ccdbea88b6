//! End-to-end test of the control plane with simulated nodes: a real
//! controller (the test harness's) and 50 `ironmesh-sim` agents in this
//! process, each joining with its own CSR and the bootstrap token and
//! syncing over mutual TLS with the certificate it got. The rack-scale
//! figures come from `ironmesh-sim bench` (docs/scale.md); this test keeps
//! the same path working at a size that runs in a few seconds.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ironmesh_sim::manifests::{self, has_ingress_port};
use ironmesh_sim::{median, Fleet, FleetConfig};
use ironmesh_tests::{ready_status, wait_for, Controller, ControllerOpts};
use serde_json::Value;

const NODES: usize = 50;
const REPLICAS: u64 = 500;

fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn apply_json(ctl: &Controller, docs: &[Value]) {
    // JSON is YAML; one document each.
    let yaml: Vec<String> = docs.iter().map(Value::to_string).collect();
    ctl.apply_yaml(&yaml.join("\n---\n"));
}

/// Instance name → (node, ip) of the controller's Running, ready instances.
fn running_instances(ctl: &Controller) -> BTreeMap<String, (String, String)> {
    items(&ctl.imctl_json(&["get", "instances"]))
        .iter()
        .filter(|i| {
            i.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
                && i.pointer("/status/ready").and_then(Value::as_bool) == Some(true)
        })
        .filter_map(|i| {
            let s = |p: &str| i.pointer(p).and_then(Value::as_str).map(str::to_string);
            Some((
                s("/metadata/name")?,
                (s("/spec/node")?, s("/status/ip").unwrap_or_default()),
            ))
        })
        .collect()
}

#[test]
fn fifty_simulated_nodes_run_five_hundred_instances_and_small_changes_cost_little() {
    let ctl = Controller::start(ControllerOpts::default());
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let _enter = rt.enter();
    let ca = std::fs::read_to_string(ctl.ca_cert()).expect("CA certificate");
    let token = std::fs::read_to_string(ctl.token_file()).expect("bootstrap token");
    let fleet = Fleet::start(FleetConfig::new(&ctl.url(), &ca, &token, NODES)).expect("fleet");

    // Every node joined and is Ready, with the inventory it reported.
    wait_for("50 nodes Ready", Duration::from_secs(30), || {
        assert!(
            fleet.failed().is_empty(),
            "joins refused: {:?}",
            fleet.failed()
        );
        let nodes = items(&ctl.imctl_json(&["get", "nodes"]));
        let ready = nodes
            .iter()
            .filter(|n| {
                ready_status(n).as_deref() == Some("True")
                    && n.pointer("/status/capacity/cpu").and_then(Value::as_str) == Some("16")
            })
            .count();
        (ready == NODES).then_some(())
    });
    let nodes = items(&ctl.imctl_json(&["get", "nodes"]));
    for n in &nodes {
        let ip = n.pointer("/status/internalIP").and_then(Value::as_str);
        assert!(
            ip.is_some_and(|ip| ip.starts_with("198.18.")),
            "node address from the simulator's unrouted range: {n}"
        );
    }

    apply_json(
        &ctl,
        &[
            manifests::policy("sim-ingress", 8000),
            manifests::workload("sim", REPLICAS),
            manifests::workload("sim-extra", 0),
        ],
    );
    let running = wait_for(
        "500 instances Running in the controller",
        Duration::from_secs(30),
        || {
            let r = running_instances(&ctl);
            (r.len() as u64 == REPLICAS).then_some(r)
        },
    );

    // Every node runs exactly what the controller bound to it, with the
    // address it reported, from its own pod CIDR.
    let mut bound: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, (node, _)) in &running {
        bound.entry(node.clone()).or_default().push(name.clone());
    }
    let runs = fleet.instances();
    let assigned = fleet.assigned();
    let stats: BTreeMap<String, ironmesh_sim::NodeStats> = fleet
        .nodes()
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    for (node, insts) in &runs {
        let want = bound.get(node).cloned().unwrap_or_default();
        let have: Vec<String> = insts.keys().cloned().collect();
        assert_eq!(
            have, want,
            "node {node} runs what the controller bound to it"
        );
        let mut listed = assigned.get(node).cloned().unwrap_or_default();
        listed.sort();
        assert_eq!(listed, want, "node {node}'s folded assignment lists it");
        let cidr = stats[node].pod_cidr.expect("pod CIDR from Welcome");
        for (name, i) in insts {
            assert!(cidr.contains(&i.ip), "{name}: {} not in {cidr}", i.ip);
            assert_eq!(running[name].1, i.ip.to_string(), "{name}'s address");
        }
    }
    assert!(
        runs.values().all(|i| !i.is_empty()),
        "the scheduler spread instances over every node"
    );

    // A Policy change reaches every node.
    let new_rule = fleet.watch(|_, a| has_ingress_port(a, 8001));
    apply_json(&ctl, &[manifests::policy("sim-ingress", 8001)]);
    wait_for(
        "every node acknowledged the new rule",
        Duration::from_secs(10),
        || fleet.watch_all(new_rule),
    );
    for (node, old) in fleet.inspect(|_, a| a.is_some_and(|a| has_ingress_port(a, 8000))) {
        assert!(!old, "node {node} still holds the old rule");
    }

    // One added instance costs every other node a small delta.
    let before = fleet.nodes();
    apply_json(&ctl, &[manifests::workload("sim-extra", 1)]);
    let (host, ip) = wait_for(
        "the added instance runs somewhere",
        Duration::from_secs(10),
        || {
            fleet.instances().into_iter().find_map(|(node, insts)| {
                insts
                    .into_values()
                    .find(|i| i.workload == "sim-extra")
                    .map(|i| (node, i.ip.to_string()))
            })
        },
    );
    let ip_for_watch = ip.clone();
    let has_identity = fleet.watch(move |_, a| a.identities.iter().any(|e| e.ip == ip_for_watch));
    wait_for(
        "its identity reached every node",
        Duration::from_secs(10),
        || fleet.watch_all(has_identity),
    );
    let after = fleet.nodes();
    let (mut bytes, mut whole, mut deltas) = (Vec::new(), 0, 0);
    for (a, b) in after.iter().zip(&before) {
        if a.name == host {
            continue;
        }
        let d = a.received.since(&b.received);
        bytes.push(d.bytes());
        whole += d.whole_msgs;
        deltas += d.delta_msgs;
    }
    assert_eq!(
        whole,
        0,
        "one added instance ({ip} on {host}) cost the other nodes {whole} whole assignments \
         (and {deltas} deltas): the controller does not send incremental assignments to agents \
         that announce {:?}",
        ironmesh_proto::assignment::INCREMENTAL
    );
    let med = median(&bytes).unwrap_or(0);
    assert!(
        med < 2048,
        "one added instance cost each other node {med} bytes (median; {deltas} deltas)"
    );

    // Nothing needed a reconnect along the way.
    for s in fleet.nodes() {
        assert_eq!(s.delta_errors, 0, "{}: deltas that did not apply", s.name);
        assert_eq!(s.sessions, 1, "{}: streams {:?}", s.name, s.last_error);
    }
}
