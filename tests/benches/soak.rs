//! Soak: 10,000 applies from 8 concurrent clients while the controller is
//! killed with SIGKILL 5 times at random moments, on the embedded store
//! and on etcd. Prints, per store: applies acknowledged and lost (an
//! acknowledged apply missing or different afterwards), retries, revision
//! regressions (a client seeing a lower revision after a higher one), and
//! the controller's RSS after the soak against a fresh start on the same
//! data.
//!
//! Run with `bash scripts/bench-soak.sh` (release build), or on a dev
//! build: `cargo build --bins && cargo bench --profile dev -p
//! ironmesh-tests --bench soak`. Needs Debian's `etcd-server`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ironmesh_proto::v1::operator_service_client::OperatorServiceClient;
use ironmesh_proto::v1::{ApplyRequest, ListRequest, Manifest};
use ironmesh_tests::{grpc, rss_bytes, wait_for, Controller, ControllerOpts, Etcd};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const APPLIES: usize = 10_000;
const CLIENTS: usize = 8;
const KILLS: usize = 5;

/// A small xorshift: random kill moments without another dependency.
fn random_fractions(n: usize) -> Vec<f64> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut out: Vec<f64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            0.05 + 0.9 * (x % 10_000) as f64 / 10_000.0
        })
        .collect();
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

struct Report {
    acked: usize,
    lost: usize,
    retries: u64,
    regressions: u64,
    elapsed: Duration,
    kill_at: Vec<usize>,
    rss_after: u64,
    rss_fresh: u64,
}

fn doc(i: usize) -> String {
    json!({
        "apiVersion": "ironmesh.dev/v1",
        "kind": "Workload",
        "metadata": {"name": format!("soak-{i}"), "labels": {"soak": format!("v{i}")}},
        "spec": {"image": "ironmesh/none:1", "replicas": 0},
    })
    .to_string()
}

async fn client(url: String, ca: String, creds: (String, String)) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(creds.0, creds.1));
    // Lazy: reconnects by itself after each restart.
    Ok(Endpoint::from_shared(url)?
        .tls_config(tls)?
        .timeout(Duration::from_secs(5))
        .connect_lazy())
}

fn soak(mut ctl: Controller, label: &str) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Runtime::new()?;
    let creds = grpc::admin_creds(&ctl);
    let (url, ca) = (ctl.url(), std::fs::read_to_string(ctl.ca_cert())?);
    let acked = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let regressions = Arc::new(AtomicU64::new(0));
    let ok_names = Arc::new(Mutex::new(Vec::with_capacity(APPLIES)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let channel = rt.block_on(client(
            url.clone(),
            ca.clone(),
            (creds.cert_pem.clone(), creds.key_pem.clone()),
        ))?;
        let (acked, retries, regressions, ok_names) = (
            acked.clone(),
            retries.clone(),
            regressions.clone(),
            ok_names.clone(),
        );
        tasks.push(rt.spawn(async move {
            let mut api = OperatorServiceClient::new(channel);
            let mut last_rev = 0u64;
            for i in (c..APPLIES).step_by(CLIENTS) {
                let give_up = Instant::now() + Duration::from_secs(120);
                loop {
                    let r = api
                        .apply(ApplyRequest {
                            manifests: vec![Manifest {
                                origin: format!("soak-{i}"),
                                json: doc(i),
                            }],
                            dry_run: false,
                        })
                        .await;
                    match r {
                        Ok(resp) => {
                            let rev = resp.into_inner().revision;
                            if rev < last_rev {
                                regressions.fetch_add(1, Ordering::Relaxed);
                            }
                            last_rev = last_rev.max(rev);
                            acked.fetch_add(1, Ordering::Relaxed);
                            ok_names.lock().unwrap_or_else(|p| p.into_inner()).push(i);
                            break;
                        }
                        Err(_) if Instant::now() < give_up => {
                            // Not acknowledged (the controller is down or
                            // restarting): apply is idempotent, so retry.
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(anyhow::anyhow!("soak-{i}: gave up: {e}")),
                    }
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    let mut kill_at = Vec::new();
    for f in random_fractions(KILLS) {
        let at = (f * APPLIES as f64) as usize;
        wait_for(
            &format!("{at} acknowledged applies"),
            Duration::from_secs(300),
            || (acked.load(Ordering::Relaxed) >= at).then_some(()),
        );
        kill_at.push(acked.load(Ordering::Relaxed));
        ctl.restart_after_kill9(&format!("controller-{label}-{}.log", kill_at.len()));
    }
    for t in tasks {
        rt.block_on(t)??;
    }
    let elapsed = started.elapsed();

    // Everything acknowledged is there, with what was applied.
    let items = rt.block_on(async {
        let channel = client(
            url.clone(),
            ca.clone(),
            (creds.cert_pem.clone(), creds.key_pem.clone()),
        )
        .await?;
        let mut api = OperatorServiceClient::new(channel).max_decoding_message_size(256 << 20);
        let r = api
            .list(ListRequest {
                kind: "Workload".into(),
                label_selector: String::new(),
            })
            .await?;
        Ok::<_, anyhow::Error>(r.into_inner().items)
    })?;
    let present: std::collections::HashMap<String, String> = items
        .iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_str(&r.json).ok()?;
            Some((
                r.name.clone(),
                v.pointer("/metadata/labels/soak")?.as_str()?.to_string(),
            ))
        })
        .collect();
    let names = ok_names.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let lost = names
        .iter()
        .filter(|i| present.get(&format!("soak-{i}")) != Some(&format!("v{i}")))
        .count();

    // RSS now, settled, against a fresh start on the same data.
    let settle = |ctl: &Controller| {
        let mut last = 0u64;
        let mut stable = 0;
        wait_for("RSS to settle", Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = rss_bytes(ctl.proc.pid()).unwrap_or(0);
            stable = if now.abs_diff(last) < (1 << 20) {
                stable + 1
            } else {
                0
            };
            last = now;
            (stable >= 4).then_some(now)
        })
    };
    let rss_after = settle(&ctl);
    ctl.restart_after_kill9(&format!("controller-{label}-fresh.log"));
    let rss_fresh = settle(&ctl);
    Ok(Report {
        acked: acked.load(Ordering::Relaxed),
        lost,
        retries: retries.load(Ordering::Relaxed),
        regressions: regressions.load(Ordering::Relaxed),
        elapsed,
        kill_at,
        rss_after,
        rss_fresh,
    })
}

fn print(label: &str, r: &Report) {
    println!(
        "soak {label}: {} applies from {CLIENTS} clients in {:.1}s ({:.0}/s) with {KILLS} kill -9 (after {:?} acks): \
         {} acknowledged, {} lost, {} retried, {} revision regressions; \
         RSS after {:.0} MB vs fresh start on the same data {:.0} MB (ratio {:.2})",
        APPLIES,
        r.elapsed.as_secs_f64(),
        APPLIES as f64 / r.elapsed.as_secs_f64(),
        r.kill_at,
        r.acked,
        r.lost,
        r.retries,
        r.regressions,
        r.rss_after as f64 / 1e6,
        r.rss_fresh as f64 / 1e6,
        r.rss_after as f64 / r.rss_fresh.max(1) as f64,
    );
}

fn main() -> anyhow::Result<()> {
    let embedded = soak(Controller::start(ControllerOpts::default()), "embedded")?;
    print("embedded", &embedded);

    let etcd = Etcd::start();
    let key_dir = tempfile::tempdir()?;
    let key = key_dir.path().join("ca.key");
    ironmesh_tests::write_ca_key(&key);
    let on_etcd = soak(
        Controller::start(ControllerOpts::on_etcd(&etcd, &key)),
        "etcd",
    )?;
    print("etcd", &on_etcd);

    let bad = embedded.lost + on_etcd.lost + (embedded.regressions + on_etcd.regressions) as usize;
    if bad > 0 {
        anyhow::bail!("{bad} lost applies or revision regressions");
    }
    Ok(())
}
