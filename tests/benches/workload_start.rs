//! Benchmark: apply → Running for 20 single-replica workloads through
//! Ironmesh, side by side with the bare containerd API (create + start of
//! the same image on the same containerd) in the same run.
//!
//! Run with `bash scripts/bench-workloads.sh` (builds release binaries and
//! the images first). Needs root, containerd and runc, like the e2e tests.
//!
//! Ironmesh's figure covers everything an operator waits for: the apply RPC,
//! validation and the store commit, placement, the assignment reaching the
//! agent, container create and task start in containerd, and the Running
//! status travelling back into the store and out to a watcher.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use ironmesh_agent::runtime::{InstanceSpec, Runtime, RuntimeConfig, TaskIo};
use ironmesh_proto::v1::{ApplyRequest, Manifest, WatchRequest};
use ironmesh_tests::{grpc, images_dir, wait_for, Agent, Controller, ControllerOpts};
use serde_json::{json, Value};

const N: usize = 20;
const IMAGE: &str = "ironmesh/batch-step:dev";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "bench");
    wait_for("node Ready", Duration::from_secs(30), || {
        ctl.node("bench")
            .filter(|n| ironmesh_tests::ready_status(n).as_deref() == Some("True"))
    });
    let layout = images_dir().join("batch-step");
    let out = ctl.imctl(&["image", "push", layout.to_str().unwrap_or_default()]);
    anyhow::ensure!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --- Ironmesh: apply → instance Running, seen through a watch.
    let creds = grpc::admin_creds(&ctl);
    let mut api = grpc::operator(&ctl, Some(&creds)).await?;
    let mut watch = api
        .watch(WatchRequest {
            kind: "Instance".into(),
            from_revision: 0,
        })
        .await?
        .into_inner();
    // Bare containerd: create + start of the same image, same daemon, in a
    // namespace of its own.
    let mut config = RuntimeConfig::new(
        agent.containerd.socket(),
        format!("{}-bare", agent.containerd.namespace()),
    );
    config.cgroup_prefix = format!("{}/bare", agent.containerd.cgroup_prefix());
    let rt = Runtime::connect(config).await?;
    let imported = rt.import_layout(&layout).await?;
    let image = imported
        .images
        .first()
        .map(|i| i.name.clone())
        .ok_or_else(|| anyhow::anyhow!("the layout holds no image"))?;
    let logs = tempfile::tempdir()?;

    // Interleaved, one of each per round, so both see the same load.
    let mut ironmesh = Vec::with_capacity(N);
    let mut bare = Vec::with_capacity(N);
    for i in 0..N {
        let name = format!("bench-{i}");
        let doc = json!({
            "apiVersion": "ironmesh.dev/v1",
            "kind": "Workload",
            "metadata": {"name": name},
            "spec": {
                "image": IMAGE,
                "env": [{"name": "SLEEP_MS", "value": "600000"}],
                "resources": {"cpu": "90m", "memory": "32Mi"},
            },
        });
        let started = Instant::now();
        api.apply(ApplyRequest {
            manifests: vec![Manifest {
                origin: name.clone(),
                json: doc.to_string(),
            }],
            dry_run: false,
        })
        .await?;
        let deadline = started + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = tokio::time::timeout(left, watch.next())
                .await
                .map_err(|_| anyhow::anyhow!("{name} not Running within 30 s"))?
                .ok_or_else(|| anyhow::anyhow!("watch ended"))??;
            let Some(res) = ev.resource else { continue };
            let obj: Value = serde_json::from_str(&res.json)?;
            if obj.pointer("/spec/workload").and_then(Value::as_str) == Some(name.as_str())
                && obj.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
            {
                ironmesh.push(started.elapsed());
                break;
            }
        }

        let id = format!("bare-{i}");
        let mut spec = InstanceSpec::new(&id, &image);
        spec.env = vec![("SLEEP_MS".into(), "600000".into())];
        // The same limits the workload asks for (CFS quota, memory); 20 x 90m
        // fits a 2-CPU node after the scheduler's default 100m reserve.
        spec.resources.cpu_millis = Some(90);
        spec.resources.memory_bytes = Some(32 << 20);
        let started = Instant::now();
        rt.create(&spec).await?;
        rt.start(&id, &TaskIo::in_dir(logs.path().join(&id)))
            .await?;
        bare.push(started.elapsed());
    }
    for i in 0..N {
        let id = format!("bare-{i}");
        let _ = rt.stop(&id, Duration::from_secs(2)).await;
        let _ = rt.delete_task(&id).await;
        let _ = rt.delete(&id).await;
    }
    let _ =
        std::fs::remove_dir_all(std::path::Path::new("/run/containerd/runc").join(rt.namespace()));

    // Keep the daemons' logs for a closer look (timestamps of each step).
    if let Ok(dir) = std::env::var("IRONMESH_BENCH_LOGS") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(format!("{dir}/controller.log"), ctl.proc.log_text());
        let _ = std::fs::write(format!("{dir}/agent.log"), agent.proc.log_text());
    }
    ironmesh.sort();
    bare.sort();
    let (i50, i99) = (percentile(&ironmesh, 0.5), percentile(&ironmesh, 0.99));
    let (b50, b99) = (percentile(&bare, 0.5), percentile(&bare, 0.99));
    println!("workload start, {N} single-replica workloads, same containerd, same run");
    println!(
        "  ironmesh apply→Running   p50 {:7.1} ms   p99 {:7.1} ms",
        ms(i50),
        ms(i99)
    );
    println!(
        "  bare containerd create+start p50 {:7.1} ms   p99 {:7.1} ms",
        ms(b50),
        ms(b99)
    );
    println!(
        "  ratio p50 {:.2}x (target ≤ 1.5x), p99 {:.0} ms (target ≤ 1000 ms)",
        ms(i50) / ms(b50),
        ms(i99)
    );
    Ok(())
}
