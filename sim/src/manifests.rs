//! The objects the scale scenario applies: a tiny Workload (simulated
//! nodes run no containers, so any image name does; requests small enough
//! that ten thousand fit on a thousand 16-CPU nodes) and a Policy with one
//! ingress rule whose port marks which version of it a node has.

use serde_json::{json, Value};

/// The label every scenario workload carries (one identity for all).
pub const APP_LABEL: (&str, &str) = ("app", "ironmesh-sim");
/// What the scenario's instances request.
pub const CPU_REQUEST: &str = "10m";
pub const MEMORY_REQUEST: &str = "16Mi";

/// A Workload of `replicas` instances of a container that never runs.
pub fn workload(name: &str, replicas: u64) -> Value {
    json!({
        "apiVersion": ironmesh_api::API_VERSION,
        "kind": "Workload",
        "metadata": {"name": name, "labels": {APP_LABEL.0: APP_LABEL.1}},
        "spec": {
            "image": "ironmesh/sim-pause:none",
            "replicas": replicas,
            "resources": {"cpu": CPU_REQUEST, "memory": MEMORY_REQUEST},
            "ports": [{"name": "http", "containerPort": 8080}],
        },
    })
}

/// A Policy making the scenario's workloads default-deny for ingress
/// except TCP `port` from anyone: it compiles to one ingress rule per
/// identity, with `port`.
pub fn policy(name: &str, port: u32) -> Value {
    json!({
        "apiVersion": ironmesh_api::API_VERSION,
        "kind": "Policy",
        "metadata": {"name": name},
        "spec": {
            "selector": {APP_LABEL.0: APP_LABEL.1},
            "ingress": [{"ports": [{"port": port, "protocol": "TCP"}]}],
        },
    })
}

/// True if the assignment holds an ingress rule for TCP `port`.
pub fn has_ingress_port(a: &ironmesh_proto::v1::Assignment, port: u32) -> bool {
    a.policy_rules.iter().any(|r| {
        r.direction == ironmesh_proto::v1::policy_rule::Direction::Ingress as i32
            && r.port == port
            && r.protocol == "TCP"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_validate_as_the_controller_would() {
        for doc in [
            workload("sim", 10_000),
            workload("sim-extra", 0),
            policy("sim", 8000),
        ] {
            if let Err(e) = ironmesh_api::validate(&doc) {
                panic!("{doc}: {e}");
            }
        }
    }
}
