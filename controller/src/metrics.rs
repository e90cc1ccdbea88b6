//! Controller metrics, served on `--metrics-listen` at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    pub condition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
    pub code: String,
}

pub struct ControllerMetrics {
    pub applies: Family<ResultLabel, Counter>,
    pub joins: Family<ResultLabel, Counter>,
    pub operator_calls: Family<MethodLabel, Counter>,
    pub sync_streams: Gauge,
    pub heartbeats: Counter,
    pub node_transitions: Counter,
    /// The heartbeat interval agents are told now, in milliseconds.
    pub heartbeat_interval_ms: Gauge,
    /// Expiry of the serving certificate in use, Unix seconds.
    pub serving_cert_expiry: Gauge,
    pub nodes: Family<ConditionLabel, Gauge>,
    pub store_revision: Gauge,
    pub instances: Family<PhaseLabel, Gauge>,
    pub unschedulable: Gauge,
    /// 1 while eviction is paused (too many nodes NotReady).
    pub eviction_paused: Gauge,
    /// Instances evicted from NotReady or tainted nodes.
    pub evictions: Counter,
    /// 1 while this controller is the leader (runs the reconcilers).
    pub leader: Gauge,
    /// Leadership gained or lost.
    pub leader_transitions: Counter,
    /// PipelineRuns by phase, as of the last pipeline pass.
    pub pipeline_runs: Family<PhaseLabel, Gauge>,
    /// Work-queue items by operation (leased, acked, released, pushed).
    pub queue_items: Family<OpLabel, Counter>,
    /// Passes of the assignments reconciler.
    pub assignment_passes: Counter,
    /// Assignment messages sent to agents, by form (whole, delta).
    pub assignments_sent: Family<FormLabel, Counter>,
    /// Encoded bytes of those messages, by form.
    pub assignment_bytes: Family<FormLabel, Counter>,
    /// Registry requests by method and HTTP status.
    pub registry_requests: Family<HttpLabel, Counter>,
    /// Blobs the registry's uploads added to the store (not already there).
    pub registry_blobs_uploaded: Counter,
    /// Bytes received by registry uploads, stored or not.
    pub registry_upload_bytes: Counter,
    /// Blobs and bytes image garbage collection removed.
    pub image_gc_blobs_removed: Counter,
    pub image_gc_bytes_freed: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct FormLabel {
    pub form: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

impl ControllerMetrics {
    pub fn new(registry: &mut Registry) -> ControllerMetrics {
        let m = ControllerMetrics {
            applies: Family::default(),
            joins: Family::default(),
            operator_calls: Family::default(),
            sync_streams: Gauge::default(),
            heartbeats: Counter::default(),
            node_transitions: Counter::default(),
            heartbeat_interval_ms: Gauge::default(),
            serving_cert_expiry: Gauge::default(),
            nodes: Family::default(),
            store_revision: Gauge::default(),
            instances: Family::default(),
            unschedulable: Gauge::default(),
            eviction_paused: Gauge::default(),
            evictions: Counter::default(),
            leader: Gauge::default(),
            leader_transitions: Counter::default(),
            pipeline_runs: Family::default(),
            queue_items: Family::default(),
            assignment_passes: Counter::default(),
            assignments_sent: Family::default(),
            assignment_bytes: Family::default(),
            registry_requests: Family::default(),
            registry_blobs_uploaded: Counter::default(),
            registry_upload_bytes: Counter::default(),
            image_gc_blobs_removed: Counter::default(),
            image_gc_bytes_freed: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("ironmesh_controller");
        r.register(
            "applies",
            "Apply requests by result (ok, invalid, error)",
            m.applies.clone(),
        );
        r.register(
            "joins",
            "Node join requests by result (ok, bad_token, invalid)",
            m.joins.clone(),
        );
        r.register(
            "operator_calls",
            "Operator API calls by method and gRPC code",
            m.operator_calls.clone(),
        );
        r.register(
            "leader",
            "1 while this controller is the leader and runs the reconcilers, else 0",
            m.leader.clone(),
        );
        r.register(
            "leader_transitions",
            "Times this controller gained or lost leadership",
            m.leader_transitions.clone(),
        );
        r.register(
            "sync_streams",
            "Open agent sync streams",
            m.sync_streams.clone(),
        );
        r.register(
            "heartbeats",
            "Heartbeats received from agents",
            m.heartbeats.clone(),
        );
        r.register(
            "node_readiness_transitions",
            "Node Ready/NotReady transitions written",
            m.node_transitions.clone(),
        );
        r.register("nodes", "Nodes by Ready condition", m.nodes.clone());
        r.register(
            "heartbeat_interval_milliseconds",
            "Heartbeat interval agents are told now (grows with the cluster, --max-heartbeats-per-second)",
            m.heartbeat_interval_ms.clone(),
        );
        r.register(
            "eviction_paused",
            "1 while eviction is paused because more than --eviction-unhealthy-threshold of the nodes are NotReady",
            m.eviction_paused.clone(),
        );
        r.register(
            "evictions",
            "Instances evicted from NotReady nodes or by NoExecute taints",
            m.evictions.clone(),
        );
        r.register(
            "serving_certificate_expiry_timestamp_seconds",
            "When the controller's serving certificate in use expires (renewed two thirds into --serving-cert-lifetime)",
            m.serving_cert_expiry.clone(),
        );
        r.register(
            "store_revision",
            "Latest store revision written by this controller",
            m.store_revision.clone(),
        );
        r.register(
            "instances",
            "Instances by phase (Pending, Running, Succeeded, Failed, Unknown)",
            m.instances.clone(),
        );
        r.register(
            "pipeline_runs",
            "PipelineRuns by phase (Pending, Running, Succeeded, Failed, Cancelled)",
            m.pipeline_runs.clone(),
        );
        r.register(
            "queue_items",
            "Pipeline work-queue items by operation (leased, acked, released, pushed)",
            m.queue_items.clone(),
        );
        r.register(
            "assignment_passes",
            "Passes of the assignments reconciler (one per batch of store changes)",
            m.assignment_passes.clone(),
        );
        r.register(
            "assignments_sent",
            "Assignment messages sent to agents, by form (whole, delta)",
            m.assignments_sent.clone(),
        );
        r.register(
            "assignment_bytes",
            "Encoded bytes of the assignment messages sent to agents, by form",
            m.assignment_bytes.clone(),
        );
        r.register(
            "instances_unschedulable",
            "Instances no node has room for",
            m.unschedulable.clone(),
        );
        r.register(
            "registry_requests",
            "OCI registry requests by method and HTTP status",
            m.registry_requests.clone(),
        );
        r.register(
            "registry_blobs_uploaded",
            "Blobs registry uploads added to the image store (a blob already stored is not counted)",
            m.registry_blobs_uploaded.clone(),
        );
        r.register(
            "registry_upload_bytes",
            "Bytes received by registry uploads",
            m.registry_upload_bytes.clone(),
        );
        r.register(
            "image_gc_blobs_removed",
            "Blobs image garbage collection removed",
            m.image_gc_blobs_removed.clone(),
        );
        r.register(
            "image_gc_bytes_freed",
            "Bytes image garbage collection freed",
            m.image_gc_bytes_freed.clone(),
        );
        m
    }

    /// Counts what one image garbage collection removed.
    pub fn count_gc(&self, report: &crate::images::gc::GcReport) {
        self.image_gc_blobs_removed.inc_by(report.blobs_removed);
        self.image_gc_bytes_freed.inc_by(report.bytes_freed);
    }

    pub fn count_queue(&self, op: &str, n: usize) {
        self.queue_items
            .get_or_create(&OpLabel { op: op.to_string() })
            .inc_by(n as u64);
    }

    pub fn set_nodes(&self, ready: i64, not_ready: i64, unknown: i64) {
        for (c, v) in [
            ("ready", ready),
            ("not_ready", not_ready),
            ("unknown", unknown),
        ] {
            self.nodes
                .get_or_create(&ConditionLabel {
                    condition: c.into(),
                })
                .set(v);
        }
    }

    /// Counts one assignment message sent.
    pub fn count_assignment(&self, delta: bool, bytes: usize) {
        let form = FormLabel {
            form: if delta { "delta" } else { "whole" }.into(),
        };
        self.assignments_sent.get_or_create(&form).inc();
        self.assignment_bytes
            .get_or_create(&form)
            .inc_by(bytes as u64);
    }

    pub fn count(family: &Family<ResultLabel, Counter>, result: &str) {
        family
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }
}
