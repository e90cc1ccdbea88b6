//! Instance: one placed copy of a Workload.
//!
//! The controller creates an Instance for each replica it keeps, binds it to
//! a node, and copies the Workload's spec into it (`spec.template`), so what
//! an agent runs never changes under it: a changed Workload gets new
//! Instances. The agent on the bound node reports `status`.

use serde::{Deserialize, Serialize};

use crate::workload::{InstancePhase, WorkloadSpec};

/// Label every Instance carries with the name of its Workload.
pub const WORKLOAD_LABEL: &str = "ironmesh.dev/workload";

/// How many recent events an Instance keeps.
pub const MAX_EVENTS: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// The Workload this instance belongs to.
    pub workload: String,
    /// The Workload's `metadata.generation` the template was copied at.
    pub workload_generation: u64,
    /// The node it is bound to; `None` while no node fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The Workload spec at `workload_generation`.
    pub template: WorkloadSpec,
    /// The numeric identity of the workload's label set (datapath policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
    /// Set when a PipelineRun owns this instance (one attempt of one step
    /// index) rather than a Workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRef>,
}

/// Which PipelineRun step index an instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRef {
    pub run: String,
    pub step: String,
    pub index: u32,
    /// 1 for the first container of this index, +1 per retry.
    pub attempt: u32,
    /// A worker of a worker-mode step (leases items from the step's queue).
    #[serde(default)]
    pub worker: bool,
}

/// What the agent (or, before placement, the controller) reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    #[serde(default)]
    pub phase: InstancePhase,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub restarts: u32,
    /// Exit code of the last exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Short CamelCase cause, e.g. `Unschedulable`, `ImageNotFound`,
    /// `CrashLoopBackOff`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// PID of the container's init process on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The instance's address, from its node's pod CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// RFC 3339 time the current task started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Most recent last, at most [`MAX_EVENTS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

/// Something that happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339 time of the last occurrence.
    pub time: String,
    /// How many times it happened in a row.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Appends `e`, folding it into the last event when that one has the same
/// type, reason and message, and keeps at most [`MAX_EVENTS`].
pub fn record_event(events: &mut Vec<Event>, e: Event) {
    if let Some(last) = events.last_mut() {
        if last.kind == e.kind && last.reason == e.reason && last.message == e.message {
            last.count += 1;
            last.time = e.time;
            return;
        }
    }
    events.push(e);
    if events.len() > MAX_EVENTS {
        let drop = events.len() - MAX_EVENTS;
        events.drain(..drop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(reason: &str, t: &str) -> Event {
        Event {
            kind: "Normal".into(),
            reason: reason.into(),
            message: "m".into(),
            time: t.into(),
            count: 1,
        }
    }

    #[test]
    fn repeated_events_fold_and_the_list_is_capped() {
        let mut list = Vec::new();
        record_event(&mut list, ev("Started", "t1"));
        record_event(&mut list, ev("Started", "t2"));
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].count, 2);
        assert_eq!(list[0].time, "t2");
        for i in 0..30 {
            record_event(&mut list, ev(&format!("R{i}"), "t"));
        }
        assert_eq!(list.len(), MAX_EVENTS);
        assert_eq!(list.last().map(|e| e.reason.as_str()), Some("R29"));
    }
}
