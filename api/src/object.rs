//! The typed object: `apiVersion`, `kind`, `metadata`, `spec` and an
//! optional `status`, in kube-core's `Object<Spec, Status>` habit.
//!
//! The controller stores and sends objects as JSON; it reads and writes
//! them as these types, so a field name is spelled once, here and in the
//! kinds' modules. Decoding a stored object and encoding it again gives the
//! same JSON (fields the types do not know are not kept, so a kind's status
//! type must name every field the system writes).

use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

/// One object of a kind whose spec is `S` and status `St`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<S, St> {
    /// Always [`crate::API_VERSION`] in what the controller stores.
    #[serde(default)]
    pub api_version: String,
    /// The kind's name, e.g. `Instance`.
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    /// Written by the system; absent until it has something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<St>,
}

impl<S, St> Object<S, St> {
    /// A new object of `kind` named `name`, with no status.
    pub fn new(kind: crate::Kind, name: impl Into<String>, spec: S) -> Self {
        Object {
            api_version: crate::API_VERSION.to_string(),
            kind: kind.as_str().to_string(),
            metadata: ObjectMeta {
                name: name.into(),
                ..Default::default()
            },
            spec,
            status: None,
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// `metadata.generation`; 1 before the system set one.
    pub fn generation(&self) -> u64 {
        self.metadata.generation.unwrap_or(1)
    }

    /// The status, created with its defaults when absent.
    pub fn status_mut(&mut self) -> &mut St
    where
        St: Default,
    {
        self.status.get_or_insert_with(St::default)
    }
}

/// A Workload object.
pub type Workload = Object<crate::workload::WorkloadSpec, crate::workload::WorkloadStatus>;
/// An Instance object.
pub type Instance = Object<crate::instance::InstanceSpec, crate::instance::InstanceStatus>;
/// A Node object.
pub type Node = Object<crate::node::NodeSpec, crate::node::NodeStatus>;
/// A Pipeline object.
pub type Pipeline = Object<crate::pipeline::PipelineSpec, crate::pipeline::PipelineStatus>;
/// A PipelineRun object.
pub type PipelineRun = Object<crate::pipeline::PipelineRunSpec, crate::pipeline::PipelineRunStatus>;
/// A Service object.
pub type Service = Object<crate::service::ServiceSpec, crate::service::ServiceStatus>;
/// A Source object.
pub type Source = Object<crate::source::SourceSpec, crate::source::SourceStatus>;
/// A Policy object (the system writes no status for it).
pub type Policy = Object<crate::policy::PolicySpec, NoStatus>;
/// The status of a kind the system reports nothing about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NoStatus {}
/// A Volume object.
pub type Volume = Object<crate::volume::VolumeSpec, crate::volume::VolumeStatus>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_instance_round_trips_to_the_same_json() {
        let stored = json!({
            "apiVersion": "ironmesh.dev/v1",
            "kind": "Instance",
            "metadata": {"name": "web-x2b4c", "labels": {"ironmesh.dev/workload": "web"},
                         "uid": "u", "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 1},
            "spec": {"workload": "web", "workloadGeneration": 2, "node": "n1",
                     "template": {"image": "busybox", "replicas": 1}, "identity": 7},
            "status": {"phase": "Running", "ready": true, "restarts": 0, "ip": "10.0.0.5",
                       "startedAt": "2026-01-01T00:00:01Z", "pid": 42}
        });
        let i: Instance = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(i.name(), "web-x2b4c");
        assert_eq!(i.spec.node.as_deref(), Some("n1"));
        let back = serde_json::to_value(&i).unwrap();
        assert_eq!(back["status"], stored["status"]);
        assert_eq!(back["metadata"], stored["metadata"]);
    }

    #[test]
    fn no_status_stays_absent() {
        let o: Object<serde_json::Value, serde_json::Value> = serde_json::from_value(
            json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": {}}),
        )
        .unwrap();
        assert_eq!(o.status, None);
        assert_eq!(serde_json::to_value(&o).unwrap().get("status"), None);
    }
}
