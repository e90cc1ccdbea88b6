//! Validation rules, each asserted by path and message.

use serde_json::{json, Value};

use crate::{validate, Kind};

fn doc(kind: &str, spec: Value) -> Value {
    json!({"apiVersion": "ironmesh.dev/v1", "kind": kind, "metadata": {"name": "x"}, "spec": spec})
}

fn error_of(v: Value) -> (String, String) {
    let e = validate(&v).expect_err("must be rejected");
    (e.path, e.message)
}

#[track_caller]
fn rejects(v: Value, path: &str, fragment: &str) {
    let (p, m) = error_of(v);
    assert_eq!(p, path, "message was {m:?}");
    assert!(m.contains(fragment), "{m:?} does not contain {fragment:?}");
}

#[test]
fn workload_defaults_are_filled_and_status_dropped() {
    let mut d = doc("Workload", json!({"image": "web:1"}));
    d["status"] = json!({"anything": 1});
    let v = validate(&d).unwrap();
    assert_eq!(v.kind, Kind::Workload);
    assert_eq!(v.object["spec"]["replicas"], 1);
    assert_eq!(v.object["spec"]["restartPolicy"], "Always");
    assert_eq!(v.object["spec"]["resources"]["cpu"], "100m");
    assert!(v.object.get("status").is_none());
}

#[test]
fn envelope_errors_name_the_field() {
    rejects(
        json!({"apiVersion": "v2", "kind": "Workload", "metadata": {"name": "x"}}),
        "apiVersion",
        "must be \"ironmesh.dev/v1\"",
    );
    let (p, m) = error_of(
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Deployment", "metadata": {"name": "x"}}),
    );
    assert_eq!(p, "kind");
    assert!(m.contains("expected one of Node"));
    rejects(
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Volume", "metadata": {"name": "Bad_Name"}, "spec": {"size": "1Gi"}}),
        "metadata.name",
        "lowercase",
    );
    rejects(
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Volume", "metadata": {"name": "v", "labelz": {}}, "spec": {"size": "1Gi"}}),
        "metadata.labelz",
        "unknown field",
    );
    rejects(
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Volume", "metadata": {"name": "v", "labels": {"-bad": "x"}}, "spec": {"size": "1Gi"}}),
        "metadata.labels[\"-bad\"]",
        "invalid",
    );
    rejects(
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Volume", "metadata": {"name": "v"}, "spec": {"size": "1Gi"}, "extra": 1}),
        "extra",
        "unknown field",
    );
}

#[test]
fn error_renders_kind_name_path() {
    let e = validate(&doc("Workload", json!({"image": "a", "replicas": -1}))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Workload \"x\": spec.replicas: must be between 0 and 10000, got -1"
    );
}

#[test]
fn workload_rules() {
    rejects(doc("Workload", json!({})), "spec", "missing field `image`");
    rejects(
        doc("Workload", json!({"image": "a", "replicaz": 1})),
        "spec.replicaz",
        "unknown field",
    );
    rejects(
        doc(
            "Workload",
            json!({"image": "a", "restartPolicy": "Sometimes"}),
        ),
        "spec.restartPolicy",
        "Sometimes",
    );
    rejects(
        doc("Workload", json!({"image": "a b"})),
        "spec.image",
        "whitespace",
    );
    rejects(
        doc("Workload", json!({"image": "a", "env": [{"name": "1X"}]})),
        "spec.env[0].name",
        "not a valid environment variable",
    );
    rejects(
        doc(
            "Workload",
            json!({"image": "a", "resources": {"cpu": "lots"}}),
        ),
        "spec.resources.cpu",
        "not a CPU quantity",
    );
    rejects(
        doc(
            "Workload",
            json!({"image": "a", "resources": {"memory": 0}}),
        ),
        "spec.resources.memory",
        "greater than zero",
    );
    rejects(
        doc(
            "Workload",
            json!({"image": "a", "ports": [{"containerPort": 70000}]}),
        ),
        "spec.ports[0].containerPort",
        "between 1 and 65535",
    );
    rejects(
        doc(
            "Workload",
            json!({"image": "a", "readinessProbe": {"httpGet": {"port": 80}, "tcpSocket": {"port": 80}}}),
        ),
        "spec.readinessProbe",
        "exactly one",
    );
    rejects(
        doc(
            "Workload",
            json!({"image": "a", "volumes": [{"name": "d", "volume": "v", "mountPath": "data"}]}),
        ),
        "spec.volumes[0].mountPath",
        "absolute",
    );
    rejects(
        doc(
            "Workload",
            json!({"image": "a", "capabilities": {"add": ["net_admin"]}}),
        ),
        "spec.capabilities.add[0]",
        "capability",
    );
    assert!(validate(&doc(
        "Workload",
        json!({"image": "a", "resources": {"cpu": 2, "memory": "1Gi"}})
    ))
    .is_ok());
}

#[test]
fn service_policy_volume_source_rules() {
    rejects(
        doc("Service", json!({"selector": {}, "ports": [{"port": 80}]})),
        "spec.selector",
        "at least one",
    );
    rejects(
        doc(
            "Service",
            json!({"selector": {"a": "b"}, "ports": [{"port": 80}, {"port": 80}]}),
        ),
        "spec.ports[1]",
        "twice",
    );
    rejects(
        doc(
            "Service",
            json!({"selector": {"a": "b"}, "ports": [{"port": 80}], "clusterIP": "1.2.3"}),
        ),
        "spec.clusterIP",
        "IPv4",
    );
    rejects(
        doc("Policy", json!({"selector": {"a": "b"}})),
        "spec",
        "at least one ingress or egress",
    );
    rejects(
        doc(
            "Policy",
            json!({"ingress": [{"rateLimit": {"connectionsPerSecond": 0}}]}),
        ),
        "spec.ingress[0].rateLimit.connectionsPerSecond",
        "greater than zero",
    );
    rejects(doc("Volume", json!({})), "spec", "missing field `size`");
    rejects(
        doc(
            "Volume",
            json!({"size": "1Gi", "accessMode": "ReadWriteMany"}),
        ),
        "spec.accessMode",
        "ReadWriteMany",
    );
    rejects(
        doc("Source", json!({"repo": "relative/path"})),
        "spec.repo",
        "absolute path",
    );
    rejects(
        doc(
            "Source",
            json!({"repo": "/srv/git/platform", "directory": "../x"}),
        ),
        "spec.directory",
        "relative path",
    );
    rejects(
        doc(
            "Source",
            json!({"repo": "/srv/git/platform", "intervalSeconds": 1}),
        ),
        "spec.intervalSeconds",
        "at least 5",
    );
    let v = validate(&doc("Source", json!({"repo": "/srv/git/platform"}))).unwrap();
    assert_eq!(v.object["spec"]["branch"], "main");
}

#[test]
fn pipeline_rules() {
    let step =
        |name: &str, deps: Value| json!({"name": name, "image": "step:1", "dependsOn": deps});
    assert!(validate(&doc(
        "Pipeline",
        json!({"steps": [step("a", json!([])), step("b", json!(["a"]))]})
    ))
    .is_ok());
    rejects(
        doc("Pipeline", json!({"steps": [step("a", json!(["zz"]))]})),
        "spec.steps[0].dependsOn[0]",
        "no step named \"zz\"",
    );
    rejects(
        doc(
            "Pipeline",
            json!({"steps": [step("a", json!(["b"])), step("b", json!(["a"]))]}),
        ),
        "spec.steps",
        "dependency cycle a -> b -> a",
    );
    rejects(
        doc(
            "Pipeline",
            json!({"steps": [step("a", json!([])), step("a", json!([]))]}),
        ),
        "spec.steps[1].name",
        "twice",
    );
    rejects(
        doc(
            "Pipeline",
            json!({"steps": [step("a", json!([]))], "schedule": "*/5 * * *"}),
        ),
        "spec.schedule",
        "5 fields",
    );
    rejects(
        doc(
            "Pipeline",
            json!({"steps": [step("a", json!([]))], "schedule": "0 25 * * *"}),
        ),
        "spec.schedule",
        "hour field",
    );
    assert!(validate(&doc(
        "Pipeline",
        json!({"steps": [step("a", json!([]))], "schedule": "*/15 0-6,22 1 * 1-5"})
    ))
    .is_ok());
    rejects(
        doc("PipelineRun", json!({})),
        "spec",
        "missing field `pipeline`",
    );
}

#[test]
fn node_rules() {
    rejects(
        doc(
            "Node",
            json!({"taints": [{"key": "k", "effect": "Sometimes"}]}),
        ),
        "spec.taints[0].effect",
        "Sometimes",
    );
    rejects(
        doc("Node", json!({"podCIDR": "10.0.0.0/40"})),
        "spec.podCIDR",
        "CIDR",
    );
    assert!(validate(&doc("Node", json!({"unschedulable": true}))).is_ok());
}
