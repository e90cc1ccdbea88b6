//! Volume: storage allocated from a node's disk pool and mounted into
//! instances; it survives their restarts. A volume lives on one node, so
//! the instances that mount it are placed there.

use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::validate::{checks, Errors, Spec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// Greater than zero, e.g. `10Gi`.
    pub size: Quantity,
    #[serde(default)]
    pub access_mode: AccessMode,
    /// Pin to a node; otherwise the controller picks one with room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How the node provides it; the node's default when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<VolumeBackend>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMode {
    /// Mounted read-write by instances on one node.
    #[default]
    ReadWriteOnce,
    /// Mounted read-only by any number of instances (on its node).
    ReadOnlyMany,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeBackend {
    /// An ext4 image file per volume, loop-mounted.
    File,
    /// A btrfs subvolume with a qgroup limit.
    Btrfs,
}

impl Spec for VolumeSpec {
    fn check(&self, errs: &mut Errors) {
        checks::positive_bytes(errs, "spec.size", &self.size);
        if let Some(n) = &self.node {
            checks::dns_label(errs, "spec.node", n);
        }
    }
}

/// What the controller reports about a volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,
    /// The node it was allocated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The node's storage pool it was allocated from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The size actually allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// The backend as the node's pool names it (`file`, `btrfs`; agents
    /// that predate the names may have said `image`), kept as reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Bytes in use, as the node last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_bytes: Option<u64>,
    /// Short CamelCase cause of the phase, e.g. `NoNodeWithRoom`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumePhase {
    /// Not allocated yet (no node with room, or the node has not answered).
    #[default]
    Pending,
    /// Allocated on `node`: instances that mount it are placed there.
    Bound,
    /// Allocation failed; see `message`.
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn vol(spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Volume", "metadata": {"name": "data"}, "spec": spec})
    }

    #[track_caller]
    fn rejects(spec: Value, path: &str, fragment: &str) {
        let e = validate(&vol(spec)).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    #[test]
    fn defaults_and_round_trip() {
        let v = validate(&vol(json!({"size": "10Gi"}))).unwrap();
        assert_eq!(
            v.object["spec"],
            json!({"size": "10Gi", "accessMode": "ReadWriteOnce"})
        );
        let v = validate(&vol(json!({"size": 1048576, "accessMode": "ReadOnlyMany", "node": "n1", "backend": "btrfs"}))).unwrap();
        assert_eq!(
            v.object["spec"],
            json!({"size": "1048576", "accessMode": "ReadOnlyMany", "node": "n1", "backend": "btrfs"})
        );
        let typed: VolumeSpec = v.spec().unwrap();
        assert_eq!(typed.backend, Some(VolumeBackend::Btrfs));
        assert_eq!(typed.size.bytes(), Ok(1 << 20));
        assert_eq!(validate(&v.object).unwrap(), v);
    }

    #[test]
    fn rules() {
        rejects(json!({}), "spec.size", "is required");
        rejects(
            json!({"size": "0"}),
            "spec.size",
            "must be greater than zero",
        );
        rejects(json!({"size": "big"}), "spec.size", "not a size");
        rejects(
            json!({"size": "1Gi", "accessMode": "ReadWriteMany"}),
            "spec.accessMode",
            "must be one of ReadWriteOnce, ReadOnlyMany, got \"ReadWriteMany\"",
        );
        rejects(
            json!({"size": "1Gi", "node": "Node_1"}),
            "spec.node",
            "lowercase",
        );
        rejects(
            json!({"size": "1Gi", "backend": "zfs"}),
            "spec.backend",
            "must be one of file, btrfs, got \"zfs\"",
        );
        rejects(
            json!({"size": "1Gi", "path": "/x"}),
            "spec.path",
            "unknown field",
        );
    }

    #[test]
    fn status_round_trip() {
        let s = VolumeStatus {
            phase: VolumePhase::Bound,
            node: Some("n1".into()),
            pool: Some("default".into()),
            usage_bytes: Some(4096),
            reason: String::new(),
            capacity: Some("10Gi".into()),
            backend: Some("file".into()),
            message: String::new(),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            json!({"phase": "Bound", "node": "n1", "pool": "default", "capacity": "10Gi", "backend": "file", "usageBytes": 4096})
        );
        assert_eq!(serde_json::from_value::<VolumeStatus>(v).unwrap(), s);
    }
}
