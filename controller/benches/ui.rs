//! Server time of the web UI's pages with 1,000 nodes and 10,000
//! instances in the store (and a full flow ring of 16,384 flows): each page
//! is requested through the UI's router with a signed-in session, and the
//! time until its whole body is rendered is printed (min, median, max of
//! several requests). The target: overview and service map ≤ 300 ms.
//!
//! `cargo bench -p ironmesh-controller --bench ui` (or scripts/bench-ui.sh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use ironmesh_api::Kind;
use ironmesh_controller::authz::{Caller, Role};
use ironmesh_controller::resources::key;
use ironmesh_controller::store::embedded::EmbeddedStore;
use ironmesh_controller::store::{Op, Store, Txn};
use ironmesh_controller::ui::{auth::Auth, Ui};
use ironmesh_proto::v1::FlowRecord;
use serde_json::json;
use tower::ServiceExt;

const NODES: usize = 1_000;
const WORKLOADS: usize = 100;
const INSTANCES: usize = 10_000;
const POLICIES: usize = 20;
const RUNS: usize = 7;

fn node(i: usize) -> serde_json::Value {
    json!({
        "apiVersion": "ironmesh.dev/v1", "kind": "Node",
        "metadata": {"name": format!("node-{i:04}"), "labels": {"rack": format!("r{:02}", i % 40)}},
        "spec": {"unschedulable": i % 97 == 3, "podCIDR": format!("10.{}.{}.0/24", 100 + i / 256, i % 256)},
        "status": {
            "conditions": [{"type": "Ready", "status": if i % 50 == 7 { "False" } else { "True" },
                            "reason": "AgentConnected", "lastTransitionTime": "2026-12-07T20:00:00Z"}],
            "capacity": {"cpu": "32", "memory": "128Gi"},
            "allocatable": {"cpu": "31", "memory": "120Gi"},
            "nodeInfo": {"hostname": format!("node-{i:04}"), "os": "linux", "kernel": "6.1.0", "arch": "amd64", "agentVersion": "0.1.0"},
        },
    })
}

fn workload(w: usize) -> serde_json::Value {
    json!({
        "apiVersion": "ironmesh.dev/v1", "kind": "Workload",
        "metadata": {"name": format!("w{w:03}"), "labels": {"app": format!("w{w:03}"), "tier": if w.is_multiple_of(2) { "web" } else { "db" }}},
        "spec": {"image": "ironmesh/records-server:dev", "replicas": INSTANCES / WORKLOADS,
                 "resources": {"cpu": "100m", "memory": "64Mi"}},
        "status": {"replicas": INSTANCES / WORKLOADS, "readyReplicas": INSTANCES / WORKLOADS},
    })
}

fn instance(i: usize) -> serde_json::Value {
    let w = i % WORKLOADS;
    let phase = match i % 100 {
        0 => "Pending",
        1 => "Failed",
        _ => "Running",
    };
    json!({
        "apiVersion": "ironmesh.dev/v1", "kind": "Instance",
        "metadata": {"name": format!("w{w:03}-{i:05}"), "labels": {"ironmesh.dev/workload": format!("w{w:03}")}},
        "spec": {"workload": format!("w{w:03}"), "workloadGeneration": 1, "node": format!("node-{:04}", i % NODES),
                 "template": {"image": "ironmesh/records-server:dev", "resources": {"cpu": "100m", "memory": "64Mi"}},
                 "identity": 1000 + w},
        "status": {"phase": phase, "ready": phase == "Running", "restarts": (i % 7) as u64,
                   "ip": format!("10.{}.{}.{}", 100 + (i % NODES) / 256, (i % NODES) % 256, 2 + i / NODES),
                   "events": [
                       {"type": "Normal", "reason": "Scheduled", "message": "placed", "time": format!("2026-12-07T20:{:02}:{:02}Z", (i / 60) % 60, i % 60), "count": 1},
                       {"type": if i.is_multiple_of(13) { "Warning" } else { "Normal" }, "reason": "Started", "message": "container started", "time": format!("2026-12-07T21:{:02}:{:02}Z", (i / 60) % 60, i % 60), "count": 1},
                   ]},
    })
}

fn policy(p: usize) -> serde_json::Value {
    json!({
        "apiVersion": "ironmesh.dev/v1", "kind": "Policy",
        "metadata": {"name": format!("p{p:02}")},
        "spec": {"selector": {"app": format!("w{:03}", p * 5)},
                 "ingress": [{"from": [{"selector": {"tier": "web"}}], "ports": [{"port": 8080}]}]},
    })
}

async fn seed(store: &Arc<dyn Store>) {
    let mut docs: Vec<(String, serde_json::Value)> = Vec::new();
    docs.extend((0..NODES).map(|i| (key(Kind::Node, &format!("node-{i:04}")), node(i))));
    docs.extend((0..WORKLOADS).map(|w| (key(Kind::Workload, &format!("w{w:03}")), workload(w))));
    docs.extend((0..INSTANCES).map(|i| {
        let w = i % WORKLOADS;
        (key(Kind::Instance, &format!("w{w:03}-{i:05}")), instance(i))
    }));
    docs.extend((0..POLICIES).map(|p| (key(Kind::Policy, &format!("p{p:02}")), policy(p))));
    for chunk in docs.chunks(500) {
        let ops = chunk
            .iter()
            .map(|(k, v)| Op::Put {
                key: k.clone(),
                value: serde_json::to_vec(v).unwrap_or_default(),
            })
            .collect();
        if let Err(e) = store
            .txn(Txn {
                compares: vec![],
                ops,
            })
            .await
        {
            panic!("seeding the store failed: {e}");
        }
    }
}

fn flows(ui: &Ui) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    for i in 0..ironmesh_controller::flow_log::CAPACITY {
        let (s, d) = (i % WORKLOADS, (i * 7 + 3) % WORKLOADS);
        let r = FlowRecord {
            time_unix_ms: now - (i as i64 % 3_600) * 1_000,
            node: format!("node-{:04}", i % NODES),
            src_ip: format!("10.100.{}.{}", s, 2 + i % 200),
            dst_ip: format!("10.101.{}.{}", d, 2 + i % 200),
            src_port: 40_000 + (i % 20_000) as u32,
            dst_port: 8080,
            protocol: "TCP".into(),
            verdict: match i % 10 {
                0 => "dropped",
                1 => "rate-limited",
                _ => "allowed",
            }
            .into(),
            event: "new".into(),
            bytes_fwd: 1_000 + i as u64,
            bytes_rev: 4_000,
            src_workload: format!("w{s:03}"),
            dst_workload: format!("w{d:03}"),
            ..FlowRecord::default()
        };
        ui.rates.add(&r);
        ui.flows.push(r);
    }
}

#[tokio::main]
async fn main() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let store: Arc<dyn Store> = match EmbeddedStore::open(&dir.path().join("store.redb")) {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("store: {e}"),
    };
    let t = Instant::now();
    seed(&store).await;
    println!(
        "seeded {NODES} nodes, {WORKLOADS} workloads, {INSTANCES} instances, {POLICIES} policies in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let cache = match ironmesh_controller::cache::Cache::start(store.clone()).await {
        Ok(c) => c,
        Err(e) => panic!("cache: {e}"),
    };
    let rev = store.revision().await.unwrap_or(0);
    assert!(
        cache.synced(rev, Duration::from_secs(60)).await,
        "cache caught up"
    );
    let resources = ironmesh_controller::resources::Resources::new(store.clone()).with_cache(cache);
    let images = match ironmesh_controller::images::ImageStore::open(
        dir.path().join("images"),
        store.clone(),
    ) {
        Ok(i) => i,
        Err(e) => panic!("images: {e}"),
    };
    let auth = Auth::new("https://127.0.0.1:7444".into());
    let ui = Arc::new(Ui::new(
        resources,
        ironmesh_controller::liveness::Liveness::new(Duration::from_secs(4)),
        ironmesh_controller::flow_log::FlowLog::default(),
        ironmesh_controller::logs::LogRelay::default(),
        images,
        auth.clone(),
    ));
    flows(&ui);
    let (code, _) = auth.issue_code(&Caller {
        name: "bench".into(),
        role: Role::Admin,
    });
    let Some((session, _)) = auth.exchange(&code) else {
        panic!("sign-in failed")
    };
    let router = ironmesh_controller::ui::router(ui.clone());
    let mut over = Vec::new();
    for (path, label) in [
        ("/", "overview"),
        ("/map", "service map"),
        (
            "/map?verdict=dropped&workload=w005&port=8080",
            "service map (filtered)",
        ),
        ("/nodes", "nodes (page 1 of 10)"),
        ("/nodes?page=10", "nodes (page 10)"),
        ("/instances", "instances (page 1 of 100)"),
        ("/instances?page=100", "instances (page 100)"),
        ("/workloads", "workloads"),
        ("/policies", "policies (60x60 matrix)"),
        ("/charts", "charts"),
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..RUNS {
            let req = match Request::get(path)
                .header("cookie", format!("im_session={session}"))
                .body(Body::empty())
            {
                Ok(r) => r,
                Err(e) => panic!("request: {e}"),
            };
            let t = Instant::now();
            let resp = match router.clone().oneshot(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            let body = match axum::body::to_bytes(resp.into_body(), usize::MAX).await {
                Ok(b) => b,
                Err(e) => panic!("body: {e}"),
            };
            times.push(t.elapsed().as_secs_f64() * 1e3);
            bytes = body.len();
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times[times.len() / 2];
        println!(
            "{label:<28} {path:<48} min {:>7.1} ms  median {:>7.1} ms  max {:>7.1} ms  ({} KiB)",
            times[0],
            median,
            times[times.len() - 1],
            bytes / 1024
        );
        if (path == "/" || path == "/map") && median > 300.0 {
            over.push(format!("{label}: {median:.1} ms"));
        }
    }
    if over.is_empty() {
        println!("overview and service map within 300 ms");
    } else {
        println!("OVER 300 ms: {}", over.join(", "));
        std::process::exit(1);
    }
}
