//! Benchmark: 200 tiny items through a pipeline step, side by side in one
//! run — a worker step (2 long-lived workers leasing from the run's queue,
//! one item per lease and eight per lease) vs a batch step with one
//! container per item (200 indexes).
//!
//! Run with `bash scripts/bench-pipelines.sh` (builds release binaries and
//! the images first). Needs root and containerd, like the e2e tests.
//!
//! Each figure is the step's wall time, from the moment its status says
//! Running to the moment it says Succeeded (polled every 50 ms through the
//! operator API), so run-volume setup, which both share, is left out.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ironmesh_proto::v1::operator_service_client::OperatorServiceClient;
use ironmesh_proto::v1::{ApplyRequest, GetRequest, Manifest};
use ironmesh_tests::{grpc, images_dir, wait_for, Agent, Controller, ControllerOpts, Unmounter};
use serde_json::{json, Value};
use tonic::transport::Channel;

type Api = OperatorServiceClient<Channel>;

const ITEMS: usize = 200;
const IMAGE: &str = "ironmesh/batch-step:dev";

fn pipeline(name: &str, step: Value) -> Value {
    json!({
        "apiVersion": "ironmesh.dev/v1",
        "kind": "Pipeline",
        "metadata": {"name": name},
        "spec": {"runVolumeSize": "32Mi", "steps": [step]},
    })
}

async fn apply(api: &mut Api, doc: &Value) -> anyhow::Result<()> {
    api.apply(ApplyRequest {
        manifests: vec![Manifest {
            origin: "bench".into(),
            json: doc.to_string(),
        }],
        dry_run: false,
    })
    .await?;
    Ok(())
}

/// Runs `pipeline` once; returns how long its only step ran.
async fn step_time(api: &mut Api, pipeline: &str) -> anyhow::Result<Duration> {
    let run = format!("{pipeline}-bench");
    apply(
        api,
        &json!({
            "apiVersion": "ironmesh.dev/v1",
            "kind": "PipelineRun",
            "metadata": {"name": run},
            "spec": {"pipeline": pipeline},
        }),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut started: Option<Instant> = None;
    loop {
        let r = api
            .get(GetRequest {
                kind: "PipelineRun".into(),
                name: run.clone(),
                reveal: false,
            })
            .await?
            .into_inner();
        let v: Value = serde_json::from_str(&r.json)?;
        let phase = v
            .pointer("/status/steps/0/phase")
            .and_then(Value::as_str)
            .unwrap_or("Pending");
        match phase {
            "Running" if started.is_none() => started = Some(Instant::now()),
            "Succeeded" => {
                let t0 = started.unwrap_or_else(Instant::now);
                return Ok(t0.elapsed());
            }
            "Failed" | "Cancelled" | "Skipped" => {
                anyhow::bail!("run {run} step {phase}: {:#}", v["status"])
            }
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "run {run} did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "bench");
    // Run volumes are mounted below the agent's directory.
    let _unmount = Unmounter(vec![agent.dir.path().to_path_buf()]);
    agent.wait_ready(&ctl, Duration::from_secs(90));
    let layout = images_dir().join("batch-step");
    let out = ctl.imctl(&["image", "push", layout.to_str().unwrap_or_default()]);
    anyhow::ensure!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the node reports its pool", Duration::from_secs(30), || {
        ctl.node("bench")
            .filter(|n| n.pointer("/status/storage/pools/0/capacityBytes").is_some())
    });
    let creds = grpc::admin_creds(&ctl);
    let mut api = grpc::operator(&ctl, Some(&creds)).await?;

    let items: Vec<String> = (0..ITEMS).map(|i| format!("item-{i}")).collect();
    let resources = json!({"cpu": "100m", "memory": "32Mi"});
    let worker = |lease: u32| {
        json!({
            "name": "work", "image": IMAGE, "mode": "worker", "replicas": 2,
            "args": ["--work"], "items": items,
            "env": [{"name": "LEASE_MAX", "value": lease.to_string()}],
            "resources": resources,
        })
    };
    apply(&mut api, &pipeline("worker-1", worker(1))).await?;
    apply(&mut api, &pipeline("worker-8", worker(8))).await?;
    apply(
        &mut api,
        &pipeline(
            "batch",
            json!({
                "name": "work", "image": IMAGE, "replicas": ITEMS,
                "resources": {"cpu": "50m", "memory": "16Mi"},
            }),
        ),
    )
    .await?;

    // Warm-up: the image is unpacked and the first volume set up once.
    let warm = pipeline(
        "warm",
        json!({"name": "work", "image": IMAGE, "resources": resources}),
    );
    apply(&mut api, &warm).await?;
    step_time(&mut api, "warm").await?;

    let w1 = step_time(&mut api, "worker-1").await?;
    let w8 = step_time(&mut api, "worker-8").await?;
    let batch = step_time(&mut api, "batch").await?;
    let rate = |d: Duration| ITEMS as f64 / d.as_secs_f64();
    println!("{ITEMS} items, same run, same node (2 cores):");
    println!(
        "  worker step, 2 workers, 1 item per lease:  {:>7.2} s  {:>8.1} items/s",
        w1.as_secs_f64(),
        rate(w1)
    );
    println!(
        "  worker step, 2 workers, 8 items per lease: {:>7.2} s  {:>8.1} items/s",
        w8.as_secs_f64(),
        rate(w8)
    );
    println!(
        "  batch step, one container per item:        {:>7.2} s  {:>8.1} items/s",
        batch.as_secs_f64(),
        rate(batch)
    );
    println!(
        "  ratio worker/batch: {:.1}x (1 per lease), {:.1}x (8 per lease)",
        rate(w1) / rate(batch),
        rate(w8) / rate(batch)
    );
    Ok(())
}
