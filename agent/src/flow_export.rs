//! Flow export: drains the datapath's flow events into the Prometheus
//! counters ([`FlowMetrics`]) and into batches for the sync stream
//! ([`FlowBatch`], at most [`BATCH_MAX`] records or [`BATCH_EVERY`] old).
//!
//! Owns only the conversion and batching; the sync session decides where a
//! batch goes (nowhere while the stream is down: flows are telemetry, not
//! state, and are not queued).

use std::sync::Arc;
use std::time::Duration;

use ironmesh_proto::v1::{FlowBatch, FlowRecord};
use tokio::sync::mpsc;

use crate::datapath::{Datapath, FlowEvent, FlowEventKind, FlowMetrics, Hook, Verdict};

/// A batch is sent when it holds this many records…
pub const BATCH_MAX: usize = 256;
/// …or when its oldest record is this old.
pub const BATCH_EVERY: Duration = Duration::from_millis(200);
/// How often the kernel's packet counters are copied into the metrics.
const COUNTERS_EVERY: Duration = Duration::from_secs(2);
/// Batches waiting for the sync session; more are dropped.
const QUEUE: usize = 64;

/// Starts the export task. Returns the batches for the sync stream.
pub fn spawn(
    datapath: Arc<Datapath>,
    metrics: FlowMetrics,
    mut proxied: Option<mpsc::Receiver<FlowRecord>>,
) -> Option<mpsc::Receiver<FlowBatch>> {
    let mut events = match datapath.flows() {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "cannot read flow events; flow telemetry is off");
            return None;
        }
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut batch: Vec<FlowRecord> = Vec::with_capacity(BATCH_MAX);
        let mut flush = tokio::time::interval(BATCH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut counters = tokio::time::interval(COUNTERS_EVERY);
        let mut dropped: u64 = 0;
        let mut send = |batch: &mut Vec<FlowRecord>| {
            if batch.is_empty() {
                return;
            }
            let flows = std::mem::replace(batch, Vec::with_capacity(BATCH_MAX));
            if tx.try_send(FlowBatch { flows }).is_err() {
                dropped += 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(dropped, "flow batches dropped (sync stream slow or down)");
                }
            }
        };
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    metrics.record(&ev);
                    batch.push(record(&ev, Clock::now()));
                    if batch.len() >= BATCH_MAX {
                        send(&mut batch);
                    }
                }
                r = async {
                    match proxied.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match r {
                    // The mesh proxies' connection records.
                    Some(r) => {
                        batch.push(r);
                        if batch.len() >= BATCH_MAX {
                            send(&mut batch);
                        }
                    }
                    None => proxied = None,
                },
                _ = flush.tick() => send(&mut batch),
                _ = counters.tick() => match datapath.counters() {
                    Ok(c) => metrics.set_counters(&c),
                    Err(e) => tracing::debug!(error = %e, "cannot read datapath counters"),
                },
            }
        }
        send(&mut batch);
        tracing::warn!("flow event stream ended; flow telemetry stops");
    });
    Some(rx)
}

/// The two clocks read at one moment, to turn the kernel's monotonic
/// timestamps into wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub monotonic_ns: u64,
    pub unix_ms: i64,
}

impl Clock {
    pub fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        Clock {
            monotonic_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            unix_ms,
        }
    }
}

/// `allowed`, `dropped`, `rate-limited` or `spoofed` (the CLI's spelling).
pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "allowed",
        Verdict::Denied => "dropped",
        Verdict::RateLimited => "rate-limited",
        Verdict::Spoofed => "spoofed",
        Verdict::Plaintext => "plaintext",
        Verdict::Unknown(_) => "unknown",
    }
}

/// One event as the sync stream carries it.
pub fn record(e: &FlowEvent, now: Clock) -> FlowRecord {
    let age_ms = now.monotonic_ns.saturating_sub(e.monotonic_ns) / 1_000_000;
    FlowRecord {
        time_unix_ms: now.unix_ms - age_ms as i64,
        node: String::new(),
        src_ip: e.src.ip().to_string(),
        src_port: u32::from(e.src.port()),
        dst_ip: e.dst.ip().to_string(),
        dst_port: u32::from(e.dst.port()),
        protocol: match e.proto {
            6 => "TCP".to_string(),
            17 => "UDP".to_string(),
            1 => "ICMP".to_string(),
            n => n.to_string(),
        },
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        verdict: verdict_name(e.verdict).to_string(),
        event: match e.kind {
            FlowEventKind::New => "new",
            FlowEventKind::VerdictChanged => "verdict",
            FlowEventKind::Report => "report",
            FlowEventKind::Close => "close",
            FlowEventKind::Unknown(_) => "unknown",
        }
        .to_string(),
        hook: match e.hook {
            Hook::FromInstance => "from-instance",
            Hook::ToInstance => "to-instance",
            Hook::Unknown(_) => "unknown",
        }
        .to_string(),
        packets_fwd: e.packets_fwd,
        bytes_fwd: e.bytes_fwd,
        packets_rev: e.packets_rev,
        bytes_rev: e.bytes_rev,
        claimed_src_ip: e.claimed_src.map(|a| a.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_records_with_wall_clock_time() {
        let e = FlowEvent {
            monotonic_ns: 5_000_000_000,
            kind: FlowEventKind::New,
            hook: Hook::ToInstance,
            ifindex: 3,
            src: "10.0.0.1:40000".parse().expect("addr"),
            dst: "10.0.0.2:80".parse().expect("addr"),
            proto: 6,
            src_identity: 256,
            dst_identity: 257,
            verdict: Verdict::RateLimited,
            rule_id: 1,
            packets_fwd: 1,
            bytes_fwd: 60,
            packets_rev: 0,
            bytes_rev: 0,
            claimed_src: None,
        };
        let r = record(
            &e,
            Clock {
                monotonic_ns: 6_500_000_000,
                unix_ms: 1_000_000,
            },
        );
        assert_eq!(r.time_unix_ms, 1_000_000 - 1_500);
        assert_eq!(
            (r.src_ip.as_str(), r.src_port, r.dst_port),
            ("10.0.0.1", 40000, 80)
        );
        assert_eq!(
            (r.protocol.as_str(), r.verdict.as_str(), r.event.as_str()),
            ("TCP", "rate-limited", "new")
        );
    }
}
