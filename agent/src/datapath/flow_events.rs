//! Flow telemetry: reads `im_flows` (ring buffer) into [`FlowEvent`]s and
//! aggregates them into Prometheus counters ([`FlowMetrics`]).
//!
//! The TC programs emit one event per new flow (per host: a flow between
//! two hosts is seen by both), one per verdict change of a known flow
//! (policy changed, rate limit refilled), one when a TCP flow closes (FIN
//! or RST, with its final counters) and periodic reports of live flows
//! (`report_interval_s`, cumulative counters).

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{MapData, RingBuf};
use ironmesh_ebpf as obj;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::{DatapathCounters, DatapathError};

/// What the datapath decided for a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed,
    Denied,
    RateLimited,
    /// Sent by an instance with a source address other than its lease.
    Spoofed,
    /// Plaintext from off the node to a strict mesh instance.
    Plaintext,
    Unknown(u8),
}

impl Verdict {
    fn from_raw(v: u8) -> Verdict {
        match v {
            obj::VERDICT_ALLOWED => Verdict::Allowed,
            obj::VERDICT_DENIED => Verdict::Denied,
            obj::VERDICT_RATE_LIMITED => Verdict::RateLimited,
            obj::VERDICT_SPOOFED => Verdict::Spoofed,
            obj::VERDICT_PLAINTEXT => Verdict::Plaintext,
            other => Verdict::Unknown(other),
        }
    }

    /// The label value: `allowed`, `dropped` (policy), `rate_limited`,
    /// `spoofed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "dropped",
            Verdict::RateLimited => "rate_limited",
            Verdict::Spoofed => "spoofed",
            Verdict::Plaintext => "plaintext",
            Verdict::Unknown(_) => "unknown",
        }
    }
}

/// Why an event was emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowEventKind {
    New,
    VerdictChanged,
    Report,
    Close,
    Unknown(u8),
}

impl FlowEventKind {
    fn from_raw(v: u8) -> FlowEventKind {
        match v {
            obj::EVENT_NEW => FlowEventKind::New,
            obj::EVENT_VERDICT => FlowEventKind::VerdictChanged,
            obj::EVENT_REPORT => FlowEventKind::Report,
            obj::EVENT_CLOSE => FlowEventKind::Close,
            other => FlowEventKind::Unknown(other),
        }
    }
}

/// Which hook saw the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// TC ingress of the host veth: leaving the instance.
    FromInstance,
    /// TC egress of the host veth: entering the instance.
    ToInstance,
    Unknown(u8),
}

/// One flow event. `src`/`dst` are the flow's original direction (the
/// side that opened it first); counters are cumulative. A
/// [`Verdict::Spoofed`] event names the instance that sent the packet
/// (its leased address) as `src`, and the address the packet claimed in
/// `claimed_src`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowEvent {
    /// CLOCK_MONOTONIC nanoseconds at tick resolution (bpf_ktime_get_coarse_ns).
    pub monotonic_ns: u64,
    pub kind: FlowEventKind,
    pub hook: Hook,
    pub ifindex: u32,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// IP protocol number.
    pub proto: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub verdict: Verdict,
    pub rule_id: u32,
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    /// The source address a spoofed packet claimed.
    pub claimed_src: Option<Ipv4Addr>,
}

impl FlowEvent {
    /// Converts a ring-buffer record.
    pub fn from_raw(r: &obj::FlowEventRaw) -> FlowEvent {
        let addr = |a: u32| -> Ipv4Addr { obj::addr_from_be(a) };
        FlowEvent {
            monotonic_ns: r.ts_ns,
            kind: FlowEventKind::from_raw(r.kind),
            hook: match r.hook {
                obj::HOOK_FROM_INSTANCE => Hook::FromInstance,
                obj::HOOK_TO_INSTANCE => Hook::ToInstance,
                other => Hook::Unknown(other),
            },
            ifindex: r.ifindex,
            src: SocketAddrV4::new(addr(r.saddr), obj::port_from_be(r.sport)),
            dst: SocketAddrV4::new(addr(r.daddr), obj::port_from_be(r.dport)),
            proto: r.proto,
            src_identity: r.src_identity,
            dst_identity: r.dst_identity,
            verdict: Verdict::from_raw(r.verdict),
            // A spoofed packet matched no rule: the field carries the
            // address it claimed.
            rule_id: if r.verdict == obj::VERDICT_SPOOFED {
                0
            } else {
                r.rule_id
            },
            claimed_src: (r.verdict == obj::VERDICT_SPOOFED).then(|| addr(r.rule_id)),
            packets_fwd: r.packets_fwd,
            bytes_fwd: r.bytes_fwd,
            packets_rev: r.packets_rev,
            bytes_rev: r.bytes_rev,
        }
    }
}

/// Capacity of the channel [`super::Datapath::flows`] returns.
pub const FLOW_CHANNEL_CAPACITY: usize = 8192;

pub(super) fn spawn_reader(
    ring: RingBuf<MapData>,
) -> Result<mpsc::Receiver<FlowEvent>, DatapathError> {
    let mut fd = AsyncFd::new(ring)
        .map_err(|e| DatapathError::io("registering the flow ring buffer", obj::maps::FLOWS, e))?;
    let (tx, rx) = mpsc::channel(FLOW_CHANNEL_CAPACITY);
    tokio::spawn(async move {
        let mut dropped: u64 = 0;
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(map = obj::maps::FLOWS, error = %e, "flow ring buffer poll failed; flow events stop");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                let Some(raw) = obj::FlowEventRaw::from_bytes(&item) else {
                    continue;
                };
                match tx.try_send(FlowEvent::from_raw(&raw)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        dropped += 1;
                        if dropped.is_power_of_two() {
                            tracing::warn!(dropped, "flow event channel full; events dropped");
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            guard.clear_ready();
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct FlowLabels {
    pub src_identity: String,
    pub dst_identity: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PacketLabels {
    pub verdict: String,
}

/// Prometheus view of the datapath:
/// - `ironmesh_agent_flows_total{src_identity,dst_identity,verdict}`: new
///   flows and verdict changes, by identity pair and verdict;
/// - `ironmesh_agent_flow_bytes_total{src_identity,dst_identity,verdict}`:
///   bytes of closed flows (both directions);
/// - `ironmesh_agent_datapath_packets{verdict}`: the kernel's packet
///   counters (allowed, dropped, rate_limited, spoofed, not_ipv4,
///   conntrack_full), refreshed by [`FlowMetrics::set_counters`];
/// - `ironmesh_agent_datapath_peer_redirects`: packets between local
///   instances delivered straight to the destination (`bpf_redirect_peer`).
#[derive(Clone, Debug, Default)]
pub struct FlowMetrics {
    pub flows: Family<FlowLabels, Counter>,
    pub bytes: Family<FlowLabels, Counter>,
    pub packets: Family<PacketLabels, Gauge>,
    pub peer_redirects: Gauge,
}

impl FlowMetrics {
    /// Registers the families under the `ironmesh_agent` prefix.
    pub fn register(registry: &mut Registry) -> FlowMetrics {
        let m = FlowMetrics::default();
        let r = registry.sub_registry_with_prefix("ironmesh_agent");
        r.register(
            "flows",
            "Flows seen by the datapath (new flows and verdict changes) by identity pair and verdict",
            m.flows.clone(),
        );
        r.register(
            "flow_bytes",
            "Bytes of closed flows by identity pair and verdict",
            m.bytes.clone(),
        );
        r.register(
            "datapath_packets",
            "Packets judged by the datapath programs by verdict (kernel counters)",
            m.packets.clone(),
        );
        r.register(
            "datapath_peer_redirects",
            "Packets between local instances delivered straight to the destination instance (bpf_redirect_peer, kernel counter)",
            m.peer_redirects.clone(),
        );
        m
    }

    /// Counts one event.
    pub fn record(&self, e: &FlowEvent) {
        let labels = FlowLabels {
            src_identity: e.src_identity.to_string(),
            dst_identity: e.dst_identity.to_string(),
            verdict: e.verdict.as_str().to_string(),
        };
        match e.kind {
            FlowEventKind::New | FlowEventKind::VerdictChanged => {
                self.flows.get_or_create(&labels).inc();
            }
            FlowEventKind::Close => {
                self.bytes
                    .get_or_create(&labels)
                    .inc_by(e.bytes_fwd + e.bytes_rev);
            }
            _ => {}
        }
    }

    /// Copies the kernel counters.
    pub fn set_counters(&self, c: &DatapathCounters) {
        for (verdict, v) in [
            ("allowed", c.allowed),
            ("dropped", c.denied),
            ("rate_limited", c.rate_limited),
            ("spoofed", c.spoofed + c.arp_spoofed + c.no_address),
            ("not_ipv4", c.not_ipv4),
            ("conntrack_full", c.conntrack_full),
            ("plaintext", c.plaintext),
            ("mesh_captured", c.mesh_captured),
        ] {
            self.packets
                .get_or_create(&PacketLabels {
                    verdict: verdict.to_string(),
                })
                .set(v as i64);
        }
        self.peer_redirects.set(c.peer_redirects as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn events_become_counters_by_identity_pair_and_verdict() {
        let mut reg = Registry::default();
        let m = FlowMetrics::register(&mut reg);
        let raw = obj::FlowEventRaw {
            saddr: obj::addr_be(Ipv4Addr::new(10, 0, 0, 1)),
            daddr: obj::addr_be(Ipv4Addr::new(10, 0, 0, 2)),
            sport: obj::port_be(40000),
            dport: obj::port_be(80),
            proto: 6,
            src_identity: 7,
            dst_identity: 9,
            verdict: obj::VERDICT_DENIED,
            kind: obj::EVENT_NEW,
            hook: obj::HOOK_TO_INSTANCE,
            ..Default::default()
        };
        let e = FlowEvent::from_raw(&raw);
        assert_eq!(e.dst, "10.0.0.2:80".parse().expect("addr"));
        assert_eq!(e.verdict, Verdict::Denied);
        m.record(&e);
        m.record(&e);
        let mut out = String::new();
        encode(&mut out, &reg).expect("encode");
        assert!(
            out.contains(
                r#"ironmesh_agent_flows_total{src_identity="7",dst_identity="9",verdict="dropped"} 2"#
            ),
            "{out}"
        );
    }
}
