//! End-to-end tests of instance networking on three fake hosts (network
//! namespaces on one test bridge): addresses from each node's pod CIDR,
//! one namespace and veth per instance, direct routes between hosts, and
//! cleanup.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ironmesh_tests::{
    images_dir, instance_netns, instances, str_at, wait_for, Agent, Controller, ControllerOpts,
};
use serde_json::Value;

/// Runs `f` on a thread inside the network namespace at `path`.
fn within<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    ironmesh_tests::netns::within(&path, f)
}

fn connects(from: PathBuf, to: SocketAddr) -> bool {
    within(from, move || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok()
    })
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn instances_on_three_hosts_reach_each_other_and_a_deleted_node_is_cut_off() {
    let ctl = Controller::start(ControllerOpts::default());
    let agents: Vec<Agent> = ["h1", "h2", "h3"]
        .iter()
        .map(|n| Agent::start(&ctl, n))
        .collect();
    for a in &agents {
        a.wait_ready(&ctl, Duration::from_secs(90));
    }
    let out = ctl.imctl(&[
        "image",
        "push",
        images_dir().join("records-server").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: mesh
spec:
  image: ironmesh/records-server:dev
  replicas: 3
  env:
    - name: LISTEN_ADDR
      value: 0.0.0.0:8080
  readinessProbe:
    tcpSocket:
      port: 8080
    periodSeconds: 1
",
    );
    let list = wait_for("3 ready instances", Duration::from_secs(60), || {
        let l = instances(&ctl, "mesh");
        (l.len() == 3
            && l.iter()
                .all(|i| i.pointer("/status/ready") == Some(&Value::Bool(true))))
        .then_some(l)
    });

    // One per host, each with an address from its node's pod CIDR.
    let mut by_host: Vec<(usize, String, IpAddr)> = Vec::new();
    for i in &list {
        let node = str_at(i, "/spec/node");
        let idx = agents
            .iter()
            .position(|a| a.name == node)
            .unwrap_or_else(|| panic!("instance on unknown node {node}"));
        let ip: IpAddr = str_at(i, "/status/ip").parse().expect("instance address");
        let cidr = str_at(&ctl.node(node).unwrap(), "/status/podCIDR").to_string();
        let cidr: ironmesh_api::net::Ipv4Cidr = cidr.parse().expect("pod CIDR");
        let IpAddr::V4(v4) = ip else {
            panic!("IPv4 expected")
        };
        assert!(cidr.contains(v4), "{ip} not in {cidr} of {node}");
        by_host.push((idx, str_at(i, "/metadata/name").to_string(), ip));
    }
    by_host.sort();
    assert_eq!(
        by_host.iter().map(|x| x.0).collect::<Vec<_>>(),
        [0, 1, 2],
        "one replica per host: {by_host:?}"
    );

    // Every instance reaches the other two over TCP, from its own namespace.
    for (a, name, _) in &by_host {
        for (b, _, ip) in &by_host {
            if a == b {
                continue;
            }
            assert!(
                connects(
                    instance_netns(&agents[*a], name),
                    SocketAddr::new(*ip, 8080)
                ),
                "{name} on {} cannot reach {ip} on {}",
                agents[*a].name,
                agents[*b].name
            );
        }
    }

    // Node h3 goes away for good: its pod CIDR is no longer routed.
    let (_, h1_inst, _) = by_host[0].clone();
    let (_, _, h3_ip) = by_host[2].clone();
    let mut agents = agents;
    let mut h3 = agents.pop().unwrap();
    h3.proc.kill9();
    assert!(ctl.imctl(&["delete", "node", "h3"]).status.success());
    let h1_netns = instance_netns(&agents[0], &h1_inst);
    wait_for(
        "h3's instance unreachable from h1",
        Duration::from_secs(20),
        || (!connects(h1_netns.clone(), SocketAddr::new(h3_ip, 8080))).then_some(()),
    );
    // h2 still reaches h1.
    let (_, h2_inst, _) = by_host[1].clone();
    let (_, _, h1_ip) = by_host[0].clone();
    assert!(connects(
        instance_netns(&agents[1], &h2_inst),
        SocketAddr::new(h1_ip, 8080)
    ));
    drop(h3);
}

#[test]
fn deleting_instances_leaves_no_namespace_veth_route_or_lease() {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "solo");
    agent.wait_ready(&ctl, Duration::from_secs(90));
    let out = ctl.imctl(&[
        "image",
        "push",
        images_dir().join("batch-step").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let netns = &agent.host.netns;
    let baseline_links = ip_out(&["-n", netns, "-o", "link"]).lines().count();
    let baseline_routes = ip_out(&["-n", netns, "route"]);
    for round in 0..5 {
        ctl.apply_yaml(&format!(
            "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: churn
spec:
  image: ironmesh/batch-step:dev
  replicas: 3
  env:
    - name: SLEEP_MS
      value: \"600000\"
    - name: ROUND
      value: \"{round}\"
"
        ));
        wait_for("3 running with addresses", Duration::from_secs(40), || {
            let l = instances(&ctl, "churn");
            (l.len() == 3
                && l.iter().all(|i| {
                    str_at(i, "/status/phase") == "Running" && !str_at(i, "/status/ip").is_empty()
                }))
            .then_some(())
        });
        assert!(ctl.imctl(&["delete", "workload", "churn"]).status.success());
        wait_for("everything removed", Duration::from_secs(40), || {
            let links = ip_out(&["-n", netns, "-o", "link"]).lines().count();
            let routes = ip_out(&["-n", netns, "route"]);
            let ns_dir = PathBuf::from("/run/ironmesh")
                .join(agent.containerd.namespace())
                .join("netns");
            let namespaces = std::fs::read_dir(&ns_dir).map(|d| d.count()).unwrap_or(0);
            let leases = std::fs::read_to_string(agent.state_dir().join("network/leases.json"))
                .unwrap_or_default();
            (instances(&ctl, "churn").is_empty()
                && links == baseline_links
                && routes == baseline_routes
                && namespaces == 0
                && !leases.contains("churn"))
            .then_some(())
        });
    }
}
