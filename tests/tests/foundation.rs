//! End-to-end tests of the foundation: join over mTLS, readiness from
//! heartbeats, authentication, durable applies, and atomic apply.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ironmesh_proto::v1::{
    agent_message, node_service_client::NodeServiceClient, AgentMessage, ApplyRequest, Hello,
    ListRequest, Manifest,
};
use ironmesh_tests::{
    grpc, metric, ready_status, rss_bytes, wait_for, Agent, Controller, ControllerOpts,
};

fn host_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) as u64 }
}

fn host_mem_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

fn wait_ready(ctl: &Controller, name: &str, want: &str, deadline: Duration) -> serde_json::Value {
    wait_for(&format!("node {name} Ready={want}"), deadline, || {
        ctl.node(name)
            .filter(|n| ready_status(n).as_deref() == Some(want))
    })
}

#[test]
fn agent_joins_and_node_is_ready_with_real_inventory() {
    let ctl = Controller::start(ControllerOpts::default());
    let started = Instant::now();
    let agent = Agent::start(&ctl, "node-a");
    let node = wait_ready(&ctl, "node-a", "True", Duration::from_secs(20));
    let to_ready = started.elapsed();

    assert_eq!(
        node.pointer("/status/inventory/cpu/logical")
            .and_then(|v| v.as_u64()),
        Some(host_cpus()),
        "CPU count must be the host's"
    );
    assert_eq!(
        node.pointer("/status/capacity/cpu")
            .and_then(|v| v.as_str()),
        Some(host_cpus().to_string().as_str())
    );
    let mem = node
        .pointer("/status/inventory/memory/totalBytes")
        .and_then(|v| v.as_u64())
        .unwrap();
    let host = host_mem_bytes();
    assert!(
        mem.abs_diff(host) <= host / 100,
        "memory {mem} vs host {host}"
    );
    assert!(node
        .pointer("/status/inventory/nics")
        .and_then(|v| v.as_array())
        .is_some_and(|n| n.iter().any(|n| n["name"] == "lo")));

    // The table an operator reads.
    let out = ctl.imctl(&["get", "nodes"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table.lines().find(|l| l.starts_with("node-a")).unwrap();
    assert!(row.contains(" Ready "), "{table}");

    let describe =
        String::from_utf8_lossy(&ctl.imctl(&["describe", "node", "node-a"]).stdout).to_string();
    assert!(
        describe.contains("HeartbeatsReceived") || describe.contains("AgentConnected"),
        "{describe}"
    );

    // The gauge is refreshed by the liveness pass, a few times a second.
    wait_for(
        "the ready-nodes gauge at 1",
        Duration::from_secs(10),
        || {
            let metrics = ctl.scrape_metrics().ok()?;
            (metric(&metrics, "ironmesh_controller_nodes{condition=\"ready\"}") == Some(1.0))
                .then_some(())
        },
    );
    let agent_metrics = ironmesh_tests::http_get(agent.metrics, "/metrics").unwrap();
    assert_eq!(
        metric(&agent_metrics, "ironmesh_agent_connected"),
        Some(1.0)
    );
    assert_eq!(
        metric(&agent_metrics, "ironmesh_agent_cpus"),
        Some(host_cpus() as f64)
    );

    println!(
        "figures: agent start to Ready {:?}; controller RSS {} KiB; agent RSS {} KiB",
        to_ready,
        rss_bytes(ctl.proc.pid()).unwrap_or(0) / 1024,
        rss_bytes(agent.proc.pid()).unwrap_or(0) / 1024
    );
}

#[test]
fn node_turns_not_ready_within_grace_and_ready_again_with_same_identity() {
    let ctl = Controller::start(ControllerOpts::default()); // grace 2s
    let mut agent = Agent::start(&ctl, "node-b");
    let before = wait_ready(&ctl, "node-b", "True", Duration::from_secs(20));
    let cert_before = std::fs::read(agent.state_dir().join("node.crt")).unwrap();

    let killed = Instant::now();
    agent.proc.kill9();
    wait_ready(&ctl, "node-b", "False", Duration::from_secs(6));
    let took = killed.elapsed();
    // grace 2s plus the reconciler tick and imctl polling.
    assert!(took < Duration::from_secs(4), "NotReady after {took:?}");

    agent.restart_without_token(&ctl);
    let after = wait_ready(&ctl, "node-b", "True", Duration::from_secs(20));
    assert_eq!(
        std::fs::read(agent.state_dir().join("node.crt")).unwrap(),
        cert_before,
        "the agent must reuse its certificate"
    );
    assert_eq!(before["metadata"]["uid"], after["metadata"]["uid"]);
    assert_eq!(
        before["status"]["certificateFingerprint"],
        after["status"]["certificateFingerprint"]
    );
    let nodes = ctl.imctl_json(&["get", "nodes"]);
    assert_eq!(nodes["items"].as_array().unwrap().len(), 1);
}

#[test]
fn wrong_bootstrap_token_is_refused() {
    let ctl = Controller::start(ControllerOpts::default());
    let mut agent = Agent::start_with_token(&ctl, "intruder", "imb.not-the-token-at-all");
    let status = wait_for("agent to exit", Duration::from_secs(20), || {
        agent.proc.try_exit()
    });
    assert!(!status.success());
    assert!(
        agent
            .proc
            .log_text()
            .contains("bootstrap token is not valid"),
        "{}",
        agent.proc.log_text()
    );
    assert!(!agent.state_dir().join("node.crt").exists());
    assert!(ctl.node("intruder").is_none());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(grpc::join(&ctl, "intruder", "wrong"))
        .err()
        .expect("join with a wrong token must fail");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[test]
fn calls_without_client_certificate_are_refused() {
    let ctl = Controller::start(ControllerOpts::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut op = grpc::operator(&ctl, None).await.unwrap();
        let err = op
            .list(ListRequest {
                kind: "nodes".into(),
                label_selector: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

        let mut node = NodeServiceClient::new(grpc::channel(&ctl, None).await.unwrap());
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                node_name: "x".into(),
                ..Default::default()
            })),
        };
        let err = node
            .sync(futures_stream(vec![hello]))
            .await
            .expect_err("sync without a certificate must fail");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    });
}

#[test]
fn node_certificate_cannot_report_for_another_node_or_operate() {
    let ctl = Controller::start(ControllerOpts::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let creds = grpc::join(&ctl, "node-c", &grpc::token(&ctl))
            .await
            .unwrap();
        let mut node = NodeServiceClient::new(grpc::channel(&ctl, Some(&creds)).await.unwrap());
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                node_name: "node-d".into(),
                ..Default::default()
            })),
        };
        let err = node
            .sync(futures_stream(vec![hello]))
            .await
            .expect_err("claiming another node must fail");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("node-c"), "{}", err.message());

        let mut op = grpc::operator(&ctl, Some(&creds)).await.unwrap();
        let err = op
            .list(ListRequest {
                kind: "nodes".into(),
                label_selector: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    });
    assert!(
        ctl.node("node-d").is_none(),
        "no Node may be created for the claimed name"
    );
}

#[test]
fn acknowledged_applies_survive_controller_kill_9() {
    let mut ctl = Controller::start(ControllerOpts::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = grpc::admin_creds(&ctl);
    rt.block_on(async {
        let mut op = grpc::operator(&ctl, Some(&admin)).await.unwrap();
        for i in 0..100 {
            let doc = serde_json::json!({
                "apiVersion": "ironmesh.dev/v1",
                "kind": "Volume",
                "metadata": {"name": format!("vol-{i}")},
                "spec": {"size": "1Gi"},
            });
            op.apply(ApplyRequest {
                manifests: vec![Manifest {
                    origin: format!("vol-{i}"),
                    json: doc.to_string(),
                }],
                dry_run: false,
            })
            .await
            .unwrap();
        }
    });
    ctl.restart_after_kill9("controller-2.log");
    let vols = ctl.imctl_json(&["get", "volumes"]);
    let mut names: Vec<String> = vols["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..100).map(|i| format!("vol-{i}")).collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn apply_with_one_invalid_document_changes_nothing_and_names_the_field() {
    let ctl = Controller::start(ControllerOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("products.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: orders-api
spec:
  image: orders:1
---
apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: orders-etl
spec:
  image: etl:1
  replicas: -3
---
apiVersion: ironmesh.dev/v1
kind: Service
metadata:
  name: orders
spec:
  selector: {app: orders}
  ports: [{port: 80}]
"#,
    )
    .unwrap();
    let out = ctl.imctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("products.yaml, document 2"), "{err}");
    assert!(err.contains("spec.replicas"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(
        ctl.imctl_json(&["get", "workloads"])["items"],
        serde_json::json!([])
    );
    assert_eq!(
        ctl.imctl_json(&["get", "services"])["items"],
        serde_json::json!([])
    );

    // Fixed, the same file applies whole, and again reports unchanged.
    std::fs::write(
        &file,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("replicas: -3", "replicas: 3"),
    )
    .unwrap();
    let out = ctl.imctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("workloads/orders-etl created"), "{stdout}");
    let out = ctl.imctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("workloads/orders-etl unchanged"));
    let wl = ctl.imctl_json(&["get", "workload", "orders-etl"]);
    assert_eq!(wl["spec"]["replicas"], 3);
    assert_eq!(wl["metadata"]["generation"], 1);

    let out = ctl.imctl(&["delete", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ctl.imctl_json(&["get", "workloads"])["items"],
        serde_json::json!([])
    );
}

#[test]
fn controller_and_agent_stop_cleanly_on_sigterm() {
    let mut ctl = Controller::start(ControllerOpts::default());
    let mut agent = Agent::start(&ctl, "node-e");
    wait_ready(&ctl, "node-e", "True", Duration::from_secs(20));
    let st = agent
        .proc
        .terminate(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert!(st.success(), "agent exit {st:?}");
    let st = ctl
        .proc
        .terminate(Duration::from_secs(10))
        .expect("controller exits on SIGTERM");
    assert!(st.success(), "controller exit {st:?}");
}

fn futures_stream(
    msgs: Vec<AgentMessage>,
) -> impl tokio_stream::Stream<Item = AgentMessage> + Send + 'static {
    // Keep the stream open after the messages so the server sees a live peer.
    tokio_stream::StreamExt::chain(tokio_stream::iter(msgs), tokio_stream::pending())
}

#[test]
fn agent_reconnects_after_controller_restart() {
    let mut ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "node-f");
    wait_ready(&ctl, "node-f", "True", Duration::from_secs(20));
    ctl.restart_after_kill9("controller-2.log");
    // The agent was not restarted: it must find the controller again on its
    // own and keep the node Ready with the same identity.
    wait_for("agent to reconnect", Duration::from_secs(20), || {
        let m = ironmesh_tests::http_get(agent.metrics, "/metrics").ok()?;
        (metric(&m, "ironmesh_agent_reconnects_total")? >= 1.0
            && metric(&m, "ironmesh_agent_connected")? == 1.0)
            .then_some(())
    });
    let node = wait_ready(&ctl, "node-f", "True", Duration::from_secs(20));
    assert!(node["status"]["certificateFingerprint"].is_string());
    let log = std::fs::read_to_string(ctl.dir.path().join("controller-2.log")).unwrap();
    assert!(
        log.contains("sync stream opened"),
        "{log}\nAGENT:\n{}",
        agent.proc.log_text()
    );
    assert!(
        !log.contains("node joined"),
        "a restart must not re-join: {log}"
    );
}

#[test]
fn watch_streams_changes_after_a_revision() {
    use futures::StreamExt;
    use ironmesh_proto::v1::{watch_event, WatchRequest};
    let ctl = Controller::start(ControllerOpts::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = grpc::admin_creds(&ctl);
    rt.block_on(async {
        let mut op = grpc::operator(&ctl, Some(&admin)).await.unwrap();
        // Policies: no controller writes their status, so every event
        // here is the test's own.
        let vol = |name: &str, app: &str| Manifest {
            origin: name.into(),
            json: serde_json::json!({"apiVersion": "ironmesh.dev/v1", "kind": "Policy",
                "metadata": {"name": name}, "spec": {"selector": {"app": app}, "ingress": []}})
            .to_string(),
        };
        let first = op
            .apply(ApplyRequest {
                manifests: vec![vol("a", "web")],
                dry_run: false,
            })
            .await
            .unwrap()
            .into_inner()
            .revision;
        let mut events = op
            .watch(WatchRequest {
                kind: "policies".into(),
                from_revision: first,
            })
            .await
            .unwrap()
            .into_inner();
        op.apply(ApplyRequest {
            manifests: vec![vol("b", "web")],
            dry_run: false,
        })
        .await
        .unwrap();
        op.apply(ApplyRequest {
            manifests: vec![vol("a", "db")],
            dry_run: false,
        })
        .await
        .unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("event within 5s")
                .unwrap()
                .unwrap();
            let r = ev.resource.unwrap();
            seen.push((watch_event::Type::try_from(ev.r#type).unwrap(), r.name));
        }
        assert_eq!(
            seen,
            [
                (watch_event::Type::Added, "b".to_string()),
                (watch_event::Type::Modified, "a".to_string())
            ]
        );
    });
}
