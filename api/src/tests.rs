//! The envelope every kind shares, and manifests end to end (YAML text to
//! normalised objects). Each kind's own rules are tested in its module.

use serde_json::{json, Value};

use crate::{parse_yaml_documents_numbered, validate, Kind, API_VERSION};

fn volume(metadata: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": "Volume", "metadata": metadata, "spec": {"size": "1Gi"}})
}

#[track_caller]
fn rejects(v: Value, path: &str, fragment: &str) -> crate::ValidationError {
    let e = validate(&v).expect_err("must be rejected");
    assert_eq!(e.path, path, "{e}");
    assert!(e.message.contains(fragment), "{e}");
    e
}

/// The smallest valid spec of every kind.
fn minimal(kind: Kind) -> Value {
    let spec = match kind {
        Kind::Node => json!({}),
        Kind::Workload => json!({"image": "web:1"}),
        Kind::Service => json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}),
        Kind::Policy => json!({"ingress": []}),
        Kind::Volume => json!({"size": "1Gi"}),
        Kind::Pipeline => json!({"steps": [{"name": "a", "image": "a:1"}]}),
        Kind::PipelineRun => json!({"pipeline": "etl"}),
        Kind::Source => json!({"repo": "/srv/git/platform"}),
        Kind::Gateway => json!({"listeners": [{"name": "web", "port": 8080}]}),
        Kind::HTTPRoute => {
            json!({"parentRefs": [{"gateway": "edge"}], "rules": [{"backends": [{"service": "web", "port": 80}]}]})
        }
        Kind::Secret => json!({"data": {"password": "hunter2"}}),
        Kind::Instance => json!({}),
    };
    json!({"apiVersion": API_VERSION, "kind": kind.as_str(), "metadata": {"name": "x"}, "spec": spec})
}

#[test]
fn every_kind_validates_and_normalisation_is_idempotent() {
    for k in Kind::ALL.into_iter().filter(|k| !k.is_system_managed()) {
        let v = validate(&minimal(k)).unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(v.kind, k);
        assert_eq!(v.name, "x");
        assert_eq!(v.object["apiVersion"], API_VERSION);
        assert_eq!(v.object["kind"], k.as_str());
        assert_eq!(v.object["metadata"], json!({"name": "x"}));
        assert!(v.object["spec"].is_object());
        assert_eq!(validate(&v.object).unwrap(), v, "{k}");
    }
}

#[test]
fn instances_cannot_be_applied() {
    let e = rejects(minimal(Kind::Instance), "kind", "created by the controller");
    assert!(e.to_string().contains("apply a Workload"), "{e}");
}

#[test]
fn status_and_server_metadata_are_dropped() {
    let mut d = minimal(Kind::Workload);
    d["status"] = json!({"replicas": 3});
    d["metadata"] = json!({"name": "x", "uid": "u-1", "generation": 4, "resourceVersion": "9", "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"app": "web"}, "annotations": {"note": "anything at all"}});
    let v = validate(&d).unwrap();
    assert!(v.object.get("status").is_none());
    assert_eq!(
        v.object["metadata"],
        json!({"name": "x", "labels": {"app": "web"}, "annotations": {"note": "anything at all"}})
    );
}

#[test]
fn document_shape() {
    rejects(
        json!([1]),
        "",
        "must be a mapping with apiVersion, kind, metadata and spec, got a list",
    );
    rejects(json!("text"), "", "got a string");
    rejects(
        json!({"apiVersion": API_VERSION, "metadata": {"name": "x"}}),
        "kind",
        "is required; one of Node, Workload",
    );
    rejects(
        json!({"apiVersion": API_VERSION, "kind": 3, "metadata": {"name": "x"}}),
        "kind",
        "must be a string, got a number",
    );
    let e = rejects(
        json!({"apiVersion": API_VERSION, "kind": "Spec", "metadata": {"name": "x"}}),
        "kind",
        "unknown kind \"Spec\"; expected one of Node, Workload, Service, Policy, Volume, Pipeline, PipelineRun, Source, Gateway, HTTPRoute, Secret",
    );
    assert_eq!(e.kind, None);
    assert_eq!(
        e.to_string(),
        "kind: unknown kind \"Spec\"; expected one of Node, Workload, Service, Policy, Volume, Pipeline, PipelineRun, Source, Gateway, HTTPRoute, Secret"
    );
    rejects(
        json!({"apiVersion": API_VERSION, "kind": "workload", "metadata": {"name": "x"}}),
        "kind",
        "(did you mean \"Workload\"?)",
    );
    rejects(
        json!({"apiVersion": API_VERSION, "kind": "Volume", "metadata": {"name": "v"}, "spec": {"size": "1Gi"}, "extra": 1}),
        "extra",
        "unknown field; expected one of apiVersion, kind, metadata, spec",
    );
    rejects(
        json!({"apiVersion": API_VERSION, "kind": "Volume", "metadata": {"name": "v"}, "spec": ["size"]}),
        "spec",
        "must be a mapping, got a list",
    );
    rejects(
        json!({"apiVersion": API_VERSION, "kind": "Volume", "metadata": {"name": "v"}, "spec": {"size": "1Gi", "accessMode": ["x"]}}),
        "spec.accessMode",
        "must be",
    );
}

#[test]
fn api_version() {
    let e = rejects(
        json!({"apiVersion": "v2", "kind": "Workload", "metadata": {"name": "web"}, "spec": {"image": "a"}}),
        "apiVersion",
        "must be \"ironmesh.dev/v1\", got \"v2\"",
    );
    assert_eq!(e.kind, Some(Kind::Workload));
    assert_eq!(e.name.as_deref(), Some("web"));
    assert_eq!(
        e.to_string(),
        "Workload \"web\": apiVersion: must be \"ironmesh.dev/v1\", got \"v2\""
    );
    rejects(
        json!({"kind": "Workload", "metadata": {"name": "web"}}),
        "apiVersion",
        "is required: \"ironmesh.dev/v1\"",
    );
    rejects(
        json!({"apiVersion": 1, "kind": "Workload", "metadata": {"name": "web"}}),
        "apiVersion",
        "got a number",
    );
}

#[test]
fn metadata() {
    rejects(
        json!({"apiVersion": API_VERSION, "kind": "Volume", "spec": {"size": "1Gi"}}),
        "metadata",
        "is required",
    );
    rejects(
        json!({"apiVersion": API_VERSION, "kind": "Volume", "metadata": "v"}),
        "metadata",
        "must be a mapping, got a string",
    );
    rejects(
        json!({"apiVersion": API_VERSION, "kind": "Volume", "metadata": ["v"]}),
        "metadata",
        "must be a mapping, got a list",
    );
    rejects(volume(json!({})), "metadata.name", "is required");
    rejects(
        volume(json!({"name": ""})),
        "metadata.name",
        "must not be empty",
    );
    let e = rejects(
        volume(json!({"name": "Bad_Name"})),
        "metadata.name",
        "lowercase letters, digits and '-'",
    );
    assert_eq!(e.kind, Some(Kind::Volume));
    assert_eq!(e.name, None);
    rejects(
        volume(json!({"name": "a".repeat(64)})),
        "metadata.name",
        "at most 63 characters, got 64",
    );
    rejects(
        volume(json!({"name": "v", "namespace": "default"})),
        "metadata.namespace",
        "unknown field; expected one of name, labels, annotations",
    );
    rejects(
        volume(json!({"name": "v", "labels": {"-bad": "x"}})),
        "metadata.labels[\"-bad\"]",
        "key \"-bad\" is invalid",
    );
    rejects(
        volume(json!({"name": "v", "labels": {"app": "a/b"}})),
        "metadata.labels[\"app\"]",
        "value \"a/b\" is invalid",
    );
    rejects(
        volume(json!({"name": "v", "labels": {"Bad.Prefix/app": "x"}})),
        "metadata.labels[\"Bad.Prefix/app\"]",
        "invalid prefix",
    );
    rejects(
        volume(json!({"name": "v", "labels": {"version": 2}})),
        "metadata.labels[\"version\"]",
        "must be a string, got 2 (quote it: \"2\")",
    );
    rejects(
        volume(json!({"name": "v", "annotations": {"a b": "x"}})),
        "metadata.annotations[\"a b\"]",
        "is invalid",
    );
    rejects(
        volume(json!({"name": "v", "generation": -1})),
        "metadata.generation",
        "must be a whole number",
    );
    assert!(validate(&volume(
        json!({"name": "v", "labels": {"ironmesh.dev/team": "data", "empty": ""}})
    ))
    .is_ok());
}

#[test]
fn errors_render_with_kind_name_and_path() {
    let d = json!({"apiVersion": API_VERSION, "kind": "Workload", "metadata": {"name": "web"}, "spec": {"image": "a", "replicas": -1}});
    assert_eq!(
        validate(&d).unwrap_err().to_string(),
        "Workload \"web\": spec.replicas: must be between 0 and 10000, got -1"
    );
    let d = json!({"apiVersion": API_VERSION, "kind": "Workload", "metadata": {"name": "web"}, "spec": {"image": "a", "restartPolicy": "Sometimes"}});
    assert_eq!(
        validate(&d).unwrap_err().to_string(),
        "Workload \"web\": spec.restartPolicy: must be one of Always, OnFailure, Never, got \"Sometimes\""
    );
}

#[test]
fn yaml_manifests_end_to_end() {
    let text = r#"
# The web tier.
apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: web
  labels: {app: web}
spec:
  image: registry.local/web:1.2
  resources: {cpu: 0.5, memory: 256Mi}
  ports:
    - {name: http, containerPort: 8080}
---
---
apiVersion: ironmesh.dev/v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: ironmesh.dev/v1
kind: Pipeline
metadata: {name: etl}
spec:
  schedule: "0 3 * * *"
  steps:
    - {name: extract, image: "etl:1", replicas: 4}
    - {name: load, image: "etl:1", dependsOn: [extract]}
"#;
    let docs = parse_yaml_documents_numbered(text).unwrap();
    let numbers: Vec<usize> = docs.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 3, 4]);
    let validated: Vec<_> = docs.iter().map(|(_, d)| validate(d).unwrap()).collect();
    assert_eq!(validated[0].object["spec"]["resources"]["cpu"], "0.5");
    assert_eq!(validated[1].kind, Kind::Service);
    assert_eq!(
        validated[2].object["spec"]["steps"][1]["dependsOn"],
        json!(["extract"])
    );

    let broken = text.replace("dependsOn: [extract]", "dependsOn: [transform]");
    let docs = parse_yaml_documents_numbered(&broken).unwrap();
    let (n, d) = &docs[2];
    let e = validate(d).unwrap_err();
    assert_eq!(*n, 4);
    assert_eq!(
        e.to_string(),
        "Pipeline \"etl\": spec.steps[1].dependsOn[0]: no step named \"transform\"; steps are extract, load"
    );
}

/// The manifests shipped in `examples/` (applied by the README's first
/// command) stay valid.
#[test]
fn shipped_examples_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for (n, doc) in parse_yaml_documents_numbered(&text).expect("YAML") {
            if let Err(e) = validate(&doc) {
                panic!("{}, document {n}: {e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen >= 5, "only {seen} documents in examples/");
}
