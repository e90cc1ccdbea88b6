//! Node: registered by an agent when it joins. Operators may set labels,
//! taints and `unschedulable`; the controller sets `podCIDR` and writes the
//! status from the agent's reports (inventory, heartbeats) and its own
//! judgement of readiness.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::meta::{Condition, ConditionStatus};
use crate::validate::{checks, Errors, Spec};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// Cordoned: no new instances are placed here; running ones stay.
    #[serde(default)]
    pub unschedulable: bool,
    /// Repel instances that do not tolerate them (see
    /// [`crate::workload::Toleration`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// The IPv4 range instance addresses come from; set by the controller
    /// when the node joins.
    #[serde(default, rename = "podCIDR", skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Taint {
    /// A label key.
    pub key: String,
    /// A label value; may be empty.
    #[serde(default)]
    pub value: String,
    pub effect: TaintEffect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaintEffect {
    /// Instances that do not tolerate the taint are not placed here.
    NoSchedule,
    /// Avoided when another node fits.
    PreferNoSchedule,
    /// Also evicts running instances that do not tolerate it.
    NoExecute,
}

impl Spec for NodeSpec {
    fn check(&self, errs: &mut Errors) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.taints.iter().enumerate() {
            checks::label_key(errs, &format!("spec.taints[{i}].key"), &t.key);
            if let Some(p) = crate::meta::label_value_problem(&t.value) {
                errs.add(format!("spec.taints[{i}].value"), p);
            }
            if !seen.insert((&t.key, t.effect)) {
                errs.add(
                    format!("spec.taints[{i}]"),
                    format!(
                        "taint {:?} with effect {:?} is listed twice",
                        t.key, t.effect
                    ),
                );
            }
        }
        if let Some(c) = &self.pod_cidr {
            checks::ipv4_cidr(errs, "spec.podCIDR", c);
        }
    }
}

/// What the controller records about a node: the agent's reports and the
/// controller's conditions (`Ready`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Everything the node has.
    #[serde(default)]
    pub capacity: ResourceList,
    /// What instances may use: capacity minus what the system reserves.
    #[serde(default)]
    pub allocatable: ResourceList,
    #[serde(default)]
    pub node_info: NodeInfo,
    #[serde(default)]
    pub inventory: NodeInventory,
    /// The node's IP addresses on physical interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// SHA-256 of the node certificate, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_fingerprint: Option<String>,
}

impl NodeStatus {
    /// The condition of the given type, e.g. `Ready`.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether the `Ready` condition is `True`.
    pub fn is_ready(&self) -> bool {
        self.condition("Ready")
            .is_some_and(|c| c.status == ConditionStatus::True)
    }
}

/// Quantities by resource name: `cpu` (cores or millicores), `memory`
/// (bytes with units), and any others (e.g. `ephemeral-storage`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceList {
    #[serde(default)]
    pub cpu: String,
    #[serde(default)]
    pub memory: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, String>,
}

impl ResourceList {
    /// `cpu` in millicores.
    pub fn cpu_millis(&self) -> Result<u64, String> {
        crate::quantity::parse_cpu_millis(&self.cpu)
    }

    /// `memory` in bytes.
    pub fn memory_bytes(&self) -> Result<u64, String> {
        crate::quantity::parse_bytes(&self.memory)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    #[serde(default)]
    pub hostname: String,
    /// E.g. "Debian GNU/Linux 12 (bookworm)".
    #[serde(default)]
    pub os: String,
    /// Kernel release, e.g. "6.1.0-18-amd64".
    #[serde(default)]
    pub kernel: String,
    /// E.g. "x86_64".
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub agent_version: String,
    /// RFC 3339.
    #[serde(default)]
    pub boot_time: String,
}

/// The hardware an agent found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInventory {
    #[serde(default)]
    pub cpu: CpuInventory,
    #[serde(default)]
    pub memory: MemoryInventory,
    #[serde(default)]
    pub disks: Vec<DiskInventory>,
    #[serde(default)]
    pub nics: Vec<NicInventory>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuInventory {
    /// Hardware threads.
    #[serde(default)]
    pub logical: u32,
    /// Cores.
    #[serde(default)]
    pub physical: u32,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub vendor: String,
    #[serde(default)]
    pub frequency_mhz: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryInventory {
    #[serde(default)]
    pub total_bytes: u64,
    #[serde(default)]
    pub available_bytes: u64,
    #[serde(default)]
    pub swap_total_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskInventory {
    /// Kernel name, e.g. "nvme0n1".
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub rotational: bool,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub removable: bool,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicInventory {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub mtu: u32,
    /// CIDR notation, e.g. "192.168.1.10/24".
    #[serde(default)]
    pub addresses: Vec<String>,
    /// "up", "down", "unknown", ...
    #[serde(default)]
    pub oper_state: String,
    /// 0 when unknown.
    #[serde(default)]
    pub speed_mbps: u64,
    /// A software interface (bridge, veth, tunnel), not a physical port.
    #[serde(default, rename = "virtual")]
    pub virtual_: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn node(spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": spec})
    }

    #[track_caller]
    fn rejects(spec: Value, path: &str, fragment: &str) {
        let e = validate(&node(spec)).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
        assert_eq!(e.kind, Some(crate::Kind::Node));
        assert_eq!(e.name.as_deref(), Some("n1"));
    }

    #[test]
    fn accepts_and_normalises() {
        let v = validate(&node(json!({}))).unwrap();
        assert_eq!(v.object["spec"], json!({"unschedulable": false}));
        let spec = json!({"unschedulable": true, "podCIDR": "10.42.3.0/24", "taints": [{"key": "ironmesh.dev/gpu", "effect": "NoSchedule"}]});
        let v = validate(&node(spec)).unwrap();
        assert_eq!(v.object["spec"]["taints"][0]["value"], "");
        assert_eq!(v.object["spec"]["podCIDR"], "10.42.3.0/24");
        let typed: NodeSpec = v.spec().unwrap();
        assert_eq!(typed.taints[0].effect, TaintEffect::NoSchedule);
        // No spec at all is the empty spec.
        let v = validate(
            &json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node", "metadata": {"name": "n1"}}),
        )
        .unwrap();
        assert_eq!(v.object["spec"]["unschedulable"], false);
    }

    #[test]
    fn taints() {
        rejects(
            json!({"taints": [{"key": "k", "effect": "Sometimes"}]}),
            "spec.taints[0].effect",
            "must be one of NoSchedule, PreferNoSchedule, NoExecute, got \"Sometimes\"",
        );
        rejects(
            json!({"taints": [{"key": "k"}]}),
            "spec.taints[0].effect",
            "is required",
        );
        rejects(
            json!({"taints": [{"key": "bad key", "effect": "NoExecute"}]}),
            "spec.taints[0].key",
            "is invalid",
        );
        rejects(
            json!({"taints": [{"key": "k", "value": "a b", "effect": "NoExecute"}]}),
            "spec.taints[0].value",
            "is invalid",
        );
        rejects(
            json!({"taints": [{"key": "k", "effect": "NoExecute"}, {"key": "k", "value": "x", "effect": "NoExecute"}]}),
            "spec.taints[1]",
            "listed twice",
        );
    }

    #[test]
    fn pod_cidr_and_fields() {
        rejects(
            json!({"podCIDR": "10.0.0.0/40"}),
            "spec.podCIDR",
            "IPv4 CIDR",
        );
        rejects(json!({"podCIDR": "fd00::/64"}), "spec.podCIDR", "IPv4 CIDR");
        rejects(
            json!({"podCIDR": "10.0.0.1/24"}),
            "spec.podCIDR",
            "host bits",
        );
        rejects(
            json!({"unschedulable": "yes"}),
            "spec.unschedulable",
            "must be true or false",
        );
        rejects(
            json!({"podCidr": "10.0.0.0/24"}),
            "spec.podCidr",
            "unknown field; expected one of unschedulable, taints, podCIDR",
        );
    }

    #[test]
    fn status_matches_what_the_controller_writes() {
        let written = json!({
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentConnected", "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "2026-01-01T00:00:05Z"}],
            "capacity": {"cpu": "8", "memory": "31.3Gi", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "8", "memory": "31.3Gi"},
            "addresses": ["192.168.1.10/24"],
            "certificateFingerprint": "ab12",
            "nodeInfo": {"hostname": "n1", "os": "Debian", "kernel": "6.1", "arch": "x86_64", "agentVersion": "0.1.0", "bootTime": "2026-01-01T00:00:00Z"},
            "inventory": {
                "cpu": {"logical": 8, "physical": 4, "model": "Xeon", "vendor": "GenuineIntel", "frequencyMhz": 3000},
                "memory": {"totalBytes": 33554432000u64, "availableBytes": 1000, "swapTotalBytes": 0},
                "disks": [{"name": "nvme0n1", "sizeBytes": 1000, "rotational": false, "model": "X", "removable": false, "readOnly": false}],
                "nics": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 1500, "addresses": ["192.168.1.10/24"], "operState": "up", "speedMbps": 1000, "virtual": false}]
            }
        });
        let s: NodeStatus = serde_json::from_value(written.clone()).unwrap();
        assert!(s.is_ready());
        assert_eq!(s.capacity.cpu_millis(), Ok(8000));
        assert_eq!(
            s.capacity
                .other
                .get("ephemeral-storage")
                .map(String::as_str),
            Some("100Gi")
        );
        assert_eq!(s.inventory.cpu.logical, 8);
        assert_eq!(s.inventory.nics[0].name, "eth0");
        assert!(!s.inventory.nics[0].virtual_);
        assert_eq!(s.node_info.agent_version, "0.1.0");
        assert_eq!(serde_json::to_value(&s).unwrap(), written);
        // A partial status (before the first inventory) decodes too.
        let s: NodeStatus =
            serde_json::from_value(json!({"certificateFingerprint": "ab"})).unwrap();
        assert!(!s.is_ready());
        assert_eq!(s.inventory, NodeInventory::default());
    }

    #[test]
    fn status_in_a_manifest_is_dropped() {
        let mut d = node(json!({}));
        d["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
        let v = validate(&d).unwrap();
        assert!(v.object.get("status").is_none());
    }
}
