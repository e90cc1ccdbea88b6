//! Benchmark: controller failover time on etcd (median of several
//! `kill -9` of the leader) and apply latency on etcd vs the embedded
//! store, in the same run.
//!
//! Run with `bash scripts/bench-ha.sh` (release build), or quicker on a
//! dev build: `cargo build --bins && cargo bench --profile dev -p
//! ironmesh-tests --bench ha`. Needs Debian's `etcd-server`.
//!
//! Failover time is from the SIGKILL of the leader until another
//! controller's `ironmesh_controller_leader` gauge reads 1 (polled every
//! 10 ms); it is bounded below by the leader lease TTL (`--leader-ttl`,
//! 3 s) minus the time since the dead leader's last renewal. Apply latency
//! is one Apply RPC of one small Workload over an open mTLS channel: the
//! validation plus the durable store commit (redb fsync vs etcd's raft
//! log fsync on one loopback member).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ironmesh_proto::v1::{ApplyRequest, Manifest};
use ironmesh_tests::{grpc, metric, wait_for, Controller, ControllerOpts, Etcd};
use serde_json::json;

const KILLS: usize = 5;
const APPLIES: usize = 100;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms (n={})",
        ms(p(0.5)),
        ms(p(0.9)),
        ms(v[0]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

async fn apply_latencies(ctl: &Controller, tag: &str) -> anyhow::Result<Vec<Duration>> {
    let creds = grpc::admin_creds(ctl);
    let mut api = grpc::operator(ctl, Some(&creds)).await?;
    let mut out = Vec::with_capacity(APPLIES);
    for i in 0..APPLIES {
        let name = format!("{tag}-{i}");
        let doc = json!({
            "apiVersion": "ironmesh.dev/v1",
            "kind": "Workload",
            "metadata": {"name": name},
            "spec": {"image": "ironmesh/none:1", "replicas": 0},
        });
        let started = Instant::now();
        api.apply(ApplyRequest {
            manifests: vec![Manifest {
                origin: name,
                json: doc.to_string(),
            }],
            dry_run: false,
        })
        .await?;
        out.push(started.elapsed());
    }
    Ok(out)
}

fn is_leader(c: &Controller) -> bool {
    c.scrape_metrics()
        .ok()
        .and_then(|t| metric(&t, "ironmesh_controller_leader"))
        == Some(1.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // --- Apply latency, embedded store.
    let embedded = Controller::start(ControllerOpts::default());
    let emb = apply_latencies(&embedded, "emb").await?;
    drop(embedded);

    // --- Three controllers on one etcd.
    let etcd = Etcd::start();
    let key_dir = tempfile::tempdir()?;
    let key = key_dir.path().join("ca.key");
    ironmesh_tests::write_ca_key(&key);
    let opts = ControllerOpts::on_etcd(&etcd, &key);
    let mut cs: Vec<Controller> = (0..3).map(|_| Controller::start(opts.clone())).collect();
    let on_etcd = apply_latencies(&cs[0], "etcd").await?;

    let mut failovers = Vec::with_capacity(KILLS);
    for k in 0..KILLS {
        let leader = wait_for("one leader", Duration::from_secs(20), || {
            let l: Vec<usize> = (0..cs.len()).filter(|i| is_leader(&cs[*i])).collect();
            (l.len() == 1).then(|| l[0])
        });
        let killed = Instant::now();
        cs[leader].proc.kill9();
        let deadline = killed + Duration::from_secs(30);
        let next = loop {
            if let Some(i) = (0..cs.len()).find(|i| *i != leader && is_leader(&cs[*i])) {
                break i;
            }
            anyhow::ensure!(Instant::now() < deadline, "no new leader within 30 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = killed.elapsed();
        println!(
            "kill {}: controller {leader} killed, controller {next} leads after {:.0} ms",
            k + 1,
            ms(took)
        );
        failovers.push(took);
        cs[leader].start_again(&format!("controller-{}.log", k + 2));
    }

    println!("apply latency, embedded store: {}", summary(emb));
    println!("apply latency, etcd store:     {}", summary(on_etcd));
    println!(
        "leader failover after kill -9 (--leader-ttl 3s): {}",
        summary(failovers)
    );
    Ok(())
}
