//! Agent metrics, served on `--metrics-listen` at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use ironmesh_proto::v1::Inventory;

pub struct AgentMetrics {
    pub connected: Gauge,
    pub heartbeats: Counter,
    pub reconnects: Counter,
    pub assignment_revision: Gauge,
    pub cpus: Gauge,
    pub memory_bytes: Gauge,
    pub instances: Family<PhaseLabel, Gauge>,
    pub restarts: Counter,
    pub events: Family<ReasonLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

impl AgentMetrics {
    pub fn new(registry: &mut Registry) -> AgentMetrics {
        let m = AgentMetrics {
            connected: Gauge::default(),
            heartbeats: Counter::default(),
            reconnects: Counter::default(),
            assignment_revision: Gauge::default(),
            cpus: Gauge::default(),
            memory_bytes: Gauge::default(),
            instances: Family::default(),
            restarts: Counter::default(),
            events: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("ironmesh_agent");
        r.register(
            "connected",
            "Whether the sync stream to the controller is up (0 or 1)",
            m.connected.clone(),
        );
        r.register("heartbeats_sent", "Heartbeats sent", m.heartbeats.clone());
        r.register(
            "reconnects",
            "Sync stream failures followed by a reconnect",
            m.reconnects.clone(),
        );
        r.register(
            "assignment_revision",
            "Revision of the last assignment applied",
            m.assignment_revision.clone(),
        );
        r.register("cpus", "Logical CPUs discovered", m.cpus.clone());
        r.register(
            "memory_bytes",
            "Memory discovered, in bytes",
            m.memory_bytes.clone(),
        );
        r.register(
            "instances",
            "Instances on this node by phase",
            m.instances.clone(),
        );
        r.register(
            "container_restarts",
            "Container restarts (crashes, failed liveness probes)",
            m.restarts.clone(),
        );
        r.register(
            "instance_events",
            "Instance events by reason (Pulled, Started, BackOff, Unhealthy...)",
            m.events.clone(),
        );
        m
    }

    pub fn observe_inventory(&self, inv: &Inventory) {
        if let Some(c) = &inv.cpu {
            self.cpus.set(i64::from(c.logical));
        }
        if let Some(m) = &inv.memory {
            self.memory_bytes.set(m.total_bytes as i64);
        }
    }
}
