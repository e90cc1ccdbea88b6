//! Service: a stable virtual IP and ports in front of the ready instances
//! of the workloads whose labels its selector matches, balanced in the
//! kernel at connect time.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::validate::{checks, Errors, Spec};
use crate::workload::Protocol;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Backends: instances of workloads whose labels include all of these.
    /// Must not be empty.
    pub selector: BTreeMap<String, String>,
    /// At least one; `(port, protocol)` unique.
    pub ports: Vec<ServicePort>,
    /// The virtual IP; allocated from the service range when not given.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// A DNS label of at most 15 characters, unique in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port on the virtual IP.
    pub port: u32,
    /// The port on the instances; filled with `port` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
    #[serde(default)]
    pub protocol: Protocol,
}

impl ServicePort {
    /// The port on the instances.
    pub fn target(&self) -> u32 {
        self.target_port.unwrap_or(self.port)
    }
}

impl Spec for ServiceSpec {
    fn normalize(&mut self) {
        for p in &mut self.ports {
            p.target_port.get_or_insert(p.port);
        }
    }

    fn check(&self, errs: &mut Errors) {
        if self.selector.is_empty() {
            errs.add(
                "spec.selector",
                "must select with at least one label, e.g. {app: web}",
            );
        }
        crate::meta::check_labels(errs, "spec.selector", &self.selector);
        if self.ports.is_empty() {
            errs.add(
                "spec.ports",
                "must list at least one port, e.g. [{port: 80}]",
            );
        }
        let (mut seen, mut names) = (BTreeSet::new(), BTreeSet::new());
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(n) = &p.name {
                checks::port_name(errs, &format!("spec.ports[{i}].name"), n);
                if !names.insert(n) {
                    errs.add(
                        format!("spec.ports[{i}].name"),
                        format!("{n:?} is used twice"),
                    );
                }
            }
            checks::port(errs, &format!("spec.ports[{i}].port"), p.port);
            if let Some(t) = p.target_port {
                checks::port(errs, &format!("spec.ports[{i}].targetPort"), t);
            }
            if !seen.insert((p.port, p.protocol)) {
                errs.add(
                    format!("spec.ports[{i}]"),
                    format!("{}/{} is listed twice", p.port, p.protocol),
                );
            }
        }
        if let Some(ip) = &self.cluster_ip {
            checks::ipv4(errs, "spec.clusterIP", ip);
        }
    }
}

/// What the controller reports about a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// The virtual IP in use (the spec's, or the allocated one).
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// Addresses of the ready backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Why the Service has no VIP, while it has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn svc(spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec})
    }

    #[track_caller]
    fn rejects(spec: Value, path: &str, fragment: &str) {
        let e = validate(&svc(spec)).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    #[test]
    fn defaults_fill_target_port_and_protocol() {
        let v = validate(&svc(json!({"selector": {"app": "web"}, "ports": [{"port": 80}, {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}))).unwrap();
        assert_eq!(
            v.object["spec"],
            json!({"selector": {"app": "web"}, "ports": [
                {"port": 80, "targetPort": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
            ]})
        );
        let typed: ServiceSpec = v.spec().unwrap();
        assert_eq!(typed.ports[1].target(), 5353);
        assert_eq!(validate(&v.object).unwrap(), v);
    }

    #[test]
    fn selector() {
        rejects(
            json!({"selector": {}, "ports": [{"port": 80}]}),
            "spec.selector",
            "at least one label",
        );
        rejects(
            json!({"ports": [{"port": 80}]}),
            "spec.selector",
            "is required",
        );
        rejects(
            json!({"selector": {"app": "a b"}, "ports": [{"port": 80}]}),
            "spec.selector[\"app\"]",
            "is invalid",
        );
        rejects(
            json!({"selector": {"app": 1}, "ports": [{"port": 80}]}),
            "spec.selector[\"app\"]",
            "must be a string",
        );
    }

    #[test]
    fn ports() {
        rejects(
            json!({"selector": {"a": "b"}, "ports": []}),
            "spec.ports",
            "at least one port",
        );
        rejects(json!({"selector": {"a": "b"}}), "spec.ports", "is required");
        rejects(
            json!({"selector": {"a": "b"}, "ports": [{"port": 80}, {"port": 80}]}),
            "spec.ports[1]",
            "80/TCP is listed twice",
        );
        rejects(
            json!({"selector": {"a": "b"}, "ports": [{"port": 0}]}),
            "spec.ports[0].port",
            "between 1 and 65535, got 0",
        );
        rejects(
            json!({"selector": {"a": "b"}, "ports": [{"port": 80, "targetPort": 99999}]}),
            "spec.ports[0].targetPort",
            "between 1 and 65535",
        );
        rejects(
            json!({"selector": {"a": "b"}, "ports": [{"port": 80, "protocol": "ICMP"}]}),
            "spec.ports[0].protocol",
            "must be one of TCP, UDP, got \"ICMP\"",
        );
        rejects(
            json!({"selector": {"a": "b"}, "ports": [{"name": "x", "port": 80}, {"name": "x", "port": 81}]}),
            "spec.ports[1].name",
            "used twice",
        );
        assert!(validate(&svc(json!({"selector": {"a": "b"}, "ports": [{"port": 53}, {"port": 53, "protocol": "UDP"}]}))).is_ok());
    }

    #[test]
    fn cluster_ip() {
        rejects(
            json!({"selector": {"a": "b"}, "ports": [{"port": 80}], "clusterIP": "1.2.3"}),
            "spec.clusterIP",
            "must be an IPv4 address",
        );
        let v = validate(&svc(
            json!({"selector": {"a": "b"}, "ports": [{"port": 80}], "clusterIP": "10.96.0.10"}),
        ))
        .unwrap();
        assert_eq!(v.object["spec"]["clusterIP"], "10.96.0.10");
    }

    #[test]
    fn status_round_trip() {
        let s = ServiceStatus {
            cluster_ip: Some("10.96.0.10".into()),
            endpoints: vec!["10.42.0.5".into()],
            message: String::new(),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            json!({"clusterIP": "10.96.0.10", "endpoints": ["10.42.0.5"]})
        );
        assert_eq!(serde_json::from_value::<ServiceStatus>(v).unwrap(), s);
    }
}
