//! Recent flows: a bounded in-memory ring of the flow records the agents
//! stream up (`AgentMessage.flows`), enriched with the names of the
//! workloads (by identity, or by the instance at the address) and
//! instances (by address), served to operators by `OperatorService.Flows`.
//!
//! Each controller keeps its own ring of what its connected agents sent;
//! nothing is stored. Names come from a snapshot of the instances and
//! workloads refreshed at most every `NAMES_TTL`.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use ironmesh_api::selector::LabelSelector;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{FlowBatch, FlowRecord, FlowsRequest};
use serde_json::Value;
use tokio::sync::broadcast;
use tonic::Status;

use crate::resources::Resources;

/// Flows kept per controller.
pub const CAPACITY: usize = 16384;
/// How stale the name snapshot may be.
const NAMES_TTL: Duration = Duration::from_secs(1);

pub type FlowsStream = Pin<Box<dyn Stream<Item = Result<FlowRecord, Status>> + Send>>;

#[derive(Default)]
struct Names {
    /// Instance address → (instance, workload).
    by_ip: HashMap<String, (String, String)>,
    /// Identity → workloads with that label set, comma-separated.
    by_identity: HashMap<u32, String>,
    taken: Option<Instant>,
}

struct Inner {
    ring: VecDeque<FlowRecord>,
    names: Names,
}

/// The ring and its live subscribers. Cheap to clone.
#[derive(Clone)]
pub struct FlowLog {
    inner: Arc<Mutex<Inner>>,
    live: broadcast::Sender<FlowRecord>,
    capacity: usize,
}

impl Default for FlowLog {
    fn default() -> Self {
        FlowLog::with_capacity(CAPACITY)
    }
}

impl FlowLog {
    pub fn with_capacity(capacity: usize) -> FlowLog {
        let (live, _) = broadcast::channel(4096);
        FlowLog {
            inner: Arc::new(Mutex::new(Inner {
                ring: VecDeque::with_capacity(capacity.min(1024)),
                names: Names::default(),
            })),
            live,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one batch from `node`: names it and appends it to the ring.
    pub async fn ingest(&self, resources: &Resources, node: &str, batch: FlowBatch) {
        let stale = self
            .lock()
            .names
            .taken
            .is_none_or(|t| t.elapsed() > NAMES_TTL);
        if stale {
            match names(resources).await {
                Ok(n) => self.lock().names = n,
                Err(e) => tracing::debug!(error = %e, "cannot read names for flows"),
            }
        }
        let mut g = self.lock();
        for mut r in batch.flows {
            r.node = node.to_string();
            enrich(&g.names, &mut r);
            if g.ring.len() >= self.capacity {
                g.ring.pop_front();
            }
            g.ring.push_back(r.clone());
            let _ = self.live.send(r);
        }
    }

    /// Adds records as they are (tests).
    pub fn push(&self, r: FlowRecord) {
        let mut g = self.lock();
        if g.ring.len() >= self.capacity {
            g.ring.pop_front();
        }
        g.ring.push_back(r.clone());
        let _ = self.live.send(r);
    }

    /// The recent flows matching `req` (the last `limit`), oldest first.
    pub fn recent(&self, req: &FlowsRequest) -> Vec<FlowRecord> {
        let g = self.lock();
        let mut out: Vec<FlowRecord> = g
            .ring
            .iter()
            .rev()
            .filter(|r| matches(req, r))
            .take(if req.limit == 0 {
                usize::MAX
            } else {
                req.limit as usize
            })
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Answers `OperatorService.Flows`.
    pub fn open(&self, req: FlowsRequest) -> Result<FlowsStream, Status> {
        if !req.verdict.is_empty() && normalize_verdict(&req.verdict).is_none() {
            return Err(Status::invalid_argument(format!(
                "verdict {:?} is not one of allowed, dropped, rate-limited, spoofed, plaintext",
                req.verdict
            )));
        }
        // Subscribe before reading the ring so nothing falls in between.
        let mut live = self.live.subscribe();
        let recent = self.recent(&req);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for r in recent {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    r = live.recv() => match r {
                        Ok(r) if matches(&req, &r) => {
                            if tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            // Its own buffer is full: end it with a reason
                            // rather than hand it a stream with holes.
                            tracing::info!(skipped = n, "flow follower fell behind; stream ended");
                            let why = Status::resource_exhausted(format!(
                                "this reader fell behind: {n} flows were skipped; follow again, narrowed with --workload or --verdict"
                            ));
                            let _ = tokio::time::timeout(
                                std::time::Duration::from_secs(10),
                                tx.send(Err(why)),
                            )
                            .await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// `dropped`, `allowed`, `rate-limited` (also `rate_limited`, `denied`),
/// `spoofed`.
pub fn normalize_verdict(v: &str) -> Option<&'static str> {
    match v.to_ascii_lowercase().as_str() {
        "allowed" | "allow" | "forwarded" => Some("allowed"),
        "dropped" | "denied" | "deny" | "drop" => Some("dropped"),
        "rate-limited" | "rate_limited" | "ratelimited" => Some("rate-limited"),
        "spoofed" => Some("spoofed"),
        "plaintext" => Some("plaintext"),
        _ => None,
    }
}

fn matches(req: &FlowsRequest, r: &FlowRecord) -> bool {
    if !req.verdict.is_empty() && normalize_verdict(&req.verdict) != Some(r.verdict.as_str()) {
        return false;
    }
    if !req.workload.is_empty() {
        let has = |list: &str| list.split(',').any(|w| w == req.workload);
        if !has(&r.src_workload) && !has(&r.dst_workload) {
            return false;
        }
    }
    true
}

fn enrich(names: &Names, r: &mut FlowRecord) {
    let side = |ip: &str, identity: u32| -> (String, String) {
        match names.by_ip.get(ip) {
            Some((inst, wl)) => (inst.clone(), wl.clone()),
            None => (
                String::new(),
                names
                    .by_identity
                    .get(&identity)
                    .cloned()
                    .unwrap_or_default(),
            ),
        }
    };
    let (si, sw) = side(&r.src_ip, r.src_identity);
    let (di, dw) = side(&r.dst_ip, r.dst_identity);
    if r.src_instance.is_empty() {
        r.src_instance = si;
    }
    if r.src_workload.is_empty() {
        r.src_workload = sw;
    }
    if r.dst_instance.is_empty() {
        r.dst_instance = di;
    }
    if r.dst_workload.is_empty() {
        r.dst_workload = dw;
    }
}

async fn names(resources: &Resources) -> Result<Names, crate::resources::ResourceError> {
    let all = LabelSelector::default();
    let (instances, _) = resources.list(Kind::Instance, &all).await?;
    let mut n = Names {
        taken: Some(Instant::now()),
        ..Names::default()
    };
    let mut by_identity: HashMap<u32, Vec<String>> = HashMap::new();
    for i in &instances {
        let workload = i
            .object
            .pointer("/spec/workload")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some(ip) = i.object.pointer("/status/ip").and_then(Value::as_str) {
            n.by_ip
                .insert(ip.to_string(), (i.name.clone(), workload.clone()));
        }
        if let Some(id) = i.object.pointer("/spec/identity").and_then(Value::as_u64) {
            let list = by_identity.entry(id as u32).or_default();
            if !workload.is_empty() && !list.contains(&workload) {
                list.push(workload);
            }
        }
    }
    n.by_identity = by_identity
        .into_iter()
        .map(|(id, mut w)| {
            w.sort();
            (id, w.join(","))
        })
        .collect();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(verdict: &str, src_wl: &str, dst_wl: &str) -> FlowRecord {
        FlowRecord {
            verdict: verdict.into(),
            src_workload: src_wl.into(),
            dst_workload: dst_wl.into(),
            ..Default::default()
        }
    }

    #[test]
    fn ring_is_bounded_and_filters_by_verdict_workload_and_limit() {
        let log = FlowLog::with_capacity(3);
        log.push(rec("allowed", "a", "b"));
        log.push(rec("dropped", "a", "c"));
        log.push(rec("dropped", "x", "y"));
        log.push(rec("rate-limited", "a", "b"));
        let all = log.recent(&FlowsRequest::default());
        assert_eq!(all.len(), 3, "oldest evicted");
        assert_eq!(all[0].verdict, "dropped");
        let dropped_a = log.recent(&FlowsRequest {
            verdict: "dropped".into(),
            workload: "c".into(),
            ..Default::default()
        });
        assert_eq!(dropped_a.len(), 1);
        assert_eq!(dropped_a[0].dst_workload, "c");
        let rl = log.recent(&FlowsRequest {
            verdict: "rate_limited".into(),
            ..Default::default()
        });
        assert_eq!(rl.len(), 1);
        let last = log.recent(&FlowsRequest {
            limit: 1,
            ..Default::default()
        });
        assert_eq!(last[0].verdict, "rate-limited");
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_is_ended_with_the_reason() {
        use futures::StreamExt;
        let log = FlowLog::with_capacity(16);
        let mut stream = log
            .open(FlowsRequest {
                follow: true,
                ..Default::default()
            })
            .unwrap();
        // Far more than its buffers hold, while it does not read.
        for _ in 0..10_000 {
            log.push(rec("allowed", "a", "b"));
            tokio::task::yield_now().await;
        }
        let mut got = 0;
        let err = loop {
            match tokio::time::timeout(std::time::Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(_))) => got += 1,
                Ok(Some(Err(e))) => break e,
                other => panic!("the stream must end with an error, got {other:?} after {got}"),
            }
        };
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("fell behind"), "{}", err.message());
        assert!(got < 10_000);
        assert!(stream.next().await.is_none(), "and then it ends");
    }

    #[test]
    fn names_come_from_the_address_then_the_identity() {
        let mut names = Names::default();
        names
            .by_ip
            .insert("10.0.0.2".into(), ("db-0".into(), "db".into()));
        names.by_identity.insert(300, "web".into());
        let mut r = FlowRecord {
            src_ip: "10.0.0.9".into(),
            src_identity: 300,
            dst_ip: "10.0.0.2".into(),
            dst_identity: 301,
            ..Default::default()
        };
        enrich(&names, &mut r);
        assert_eq!(
            (r.src_workload.as_str(), r.src_instance.as_str()),
            ("web", "")
        );
        assert_eq!(
            (r.dst_workload.as_str(), r.dst_instance.as_str()),
            ("db", "db-0")
        );
    }
}
