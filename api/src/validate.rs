//! Validation of one document: the common envelope (apiVersion, kind,
//! metadata), typed decoding of `spec` with field paths, then each kind's
//! own rules. Produces the normalised object with defaults filled in.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::kind::Kind;
use crate::meta::{check_labels, dns_label_problem, ObjectMeta};
use crate::API_VERSION;

/// A document that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub kind: Kind,
    pub name: String,
    /// apiVersion, kind, metadata (name, labels, annotations) and the spec
    /// with defaults filled in; any `status` in the input is dropped.
    pub object: Value,
}

/// What is wrong with a document, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ValidationError {
    pub kind: Option<Kind>,
    pub name: Option<String>,
    /// Dotted field path, e.g. `spec.steps[2].dependsOn[0]`.
    pub path: String,
    pub message: String,
}

impl ValidationError {
    pub fn render(&self) -> String {
        let what = match (&self.kind, &self.name) {
            (Some(k), Some(n)) => format!("{k} {n:?}: "),
            (Some(k), None) => format!("{k}: "),
            _ => String::new(),
        };
        if self.path.is_empty() {
            format!("{what}{}", self.message)
        } else {
            format!("{what}{}: {}", self.path, self.message)
        }
    }
}

/// Collects the first problems found; kinds report through it.
#[derive(Debug, Default)]
pub struct Errors {
    items: Vec<(String, String)>,
}

impl Errors {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.items.push((path.into(), message.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn first(self, kind: Option<Kind>, name: Option<String>) -> Result<(), ValidationError> {
        match self.items.into_iter().next() {
            None => Ok(()),
            Some((path, message)) => Err(ValidationError {
                kind,
                name,
                path,
                message,
            }),
        }
    }
}

/// A kind's spec: decoded with serde, then checked.
pub trait Spec: DeserializeOwned + Serialize {
    /// Adds every problem found, with paths starting at `spec`.
    fn check(&self, errs: &mut Errors);
}

fn err(
    kind: Option<Kind>,
    name: Option<String>,
    path: &str,
    message: impl Into<String>,
) -> ValidationError {
    ValidationError {
        kind,
        name,
        path: path.to_string(),
        message: message.into(),
    }
}

fn decode<T: DeserializeOwned>(
    kind: Option<Kind>,
    name: Option<String>,
    prefix: &str,
    v: &Value,
) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize::<_, T>(v.clone()).map_err(|e| {
        let path = struct_path(prefix, e.path());
        let msg = e.inner().to_string();
        err(kind, name, &path, msg)
    })
}

/// Like `serde_path`, but struct fields print as `.field`.
fn struct_path(prefix: &str, p: &serde_path_to_error::Path) -> String {
    let mut out = prefix.to_string();
    for seg in p.iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => {
                if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !key.is_empty() {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                } else {
                    out.push_str(&format!("[{key:?}]"));
                }
            }
            serde_path_to_error::Segment::Enum { variant } => {
                out.push('.');
                out.push_str(variant);
            }
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    out
}

fn check_spec<S: Spec>(kind: Kind, name: &str, spec: &Value) -> Result<Value, ValidationError> {
    let typed: S = decode(Some(kind), Some(name.to_string()), "spec", spec)?;
    let mut errs = Errors::default();
    typed.check(&mut errs);
    errs.first(Some(kind), Some(name.to_string()))?;
    serde_json::to_value(&typed)
        .map_err(|e| err(Some(kind), Some(name.to_string()), "spec", e.to_string()))
}

/// Validates one document given as JSON.
pub fn validate(doc: &Value) -> Result<Validated, ValidationError> {
    let obj = doc.as_object().ok_or_else(|| {
        err(
            None,
            None,
            "",
            "a manifest must be a mapping with apiVersion, kind, metadata and spec",
        )
    })?;
    let kind_str = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| err(None, None, "kind", "is required"))?;
    let kind = Kind::parse(kind_str)
        .ok()
        .filter(|k| k.as_str() == kind_str)
        .ok_or_else(|| {
            err(
                None,
                None,
                "kind",
                format!("unknown kind {kind_str:?}; expected one of Node, Workload, Service, Policy, Volume, Pipeline, PipelineRun, Source"),
            )
        })?;
    let name_hint = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    match obj.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(err(
                Some(kind),
                name_hint,
                "apiVersion",
                format!("must be {API_VERSION:?}, got {other:?}"),
            ))
        }
        None => {
            return Err(err(
                Some(kind),
                name_hint,
                "apiVersion",
                format!("is required ({API_VERSION:?})"),
            ))
        }
    }
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "apiVersion" | "kind" | "metadata" | "spec" | "status"
        ) {
            return Err(err(
                Some(kind),
                name_hint,
                k,
                "unknown field; expected apiVersion, kind, metadata, spec",
            ));
        }
    }
    let meta_v = obj
        .get("metadata")
        .ok_or_else(|| err(Some(kind), None, "metadata", "is required"))?;
    let meta: ObjectMeta = decode(Some(kind), name_hint.clone(), "metadata", meta_v)?;
    if let Some(p) = dns_label_problem(&meta.name) {
        return Err(err(Some(kind), None, "metadata.name", p));
    }
    let name = meta.name.clone();
    let mut errs = Errors::default();
    check_labels(&mut errs, "metadata.labels", &meta.labels);
    for k in meta.annotations.keys() {
        if let Some(p) = crate::meta::label_key_problem(k) {
            errs.add(format!("metadata.annotations[{k:?}]"), p);
        }
    }
    errs.first(Some(kind), Some(name.clone()))?;

    let empty = Value::Object(Map::new());
    let spec_in = obj.get("spec").unwrap_or(&empty);
    if !spec_in.is_object() {
        return Err(err(Some(kind), Some(name), "spec", "must be a mapping"));
    }
    let spec = match kind {
        Kind::Node => check_spec::<crate::node::NodeSpec>(kind, &name, spec_in)?,
        Kind::Workload => check_spec::<crate::workload::WorkloadSpec>(kind, &name, spec_in)?,
        Kind::Service => check_spec::<crate::service::ServiceSpec>(kind, &name, spec_in)?,
        Kind::Policy => check_spec::<crate::policy::PolicySpec>(kind, &name, spec_in)?,
        Kind::Volume => check_spec::<crate::volume::VolumeSpec>(kind, &name, spec_in)?,
        Kind::Pipeline => check_spec::<crate::pipeline::PipelineSpec>(kind, &name, spec_in)?,
        Kind::PipelineRun => check_spec::<crate::pipeline::PipelineRunSpec>(kind, &name, spec_in)?,
        Kind::Source => check_spec::<crate::source::SourceSpec>(kind, &name, spec_in)?,
    };
    let mut meta_out = Map::new();
    meta_out.insert("name".into(), Value::String(name.clone()));
    if !meta.labels.is_empty() {
        meta_out.insert(
            "labels".into(),
            serde_json::to_value(&meta.labels).unwrap_or_default(),
        );
    }
    if !meta.annotations.is_empty() {
        meta_out.insert(
            "annotations".into(),
            serde_json::to_value(&meta.annotations).unwrap_or_default(),
        );
    }
    let object = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": kind.as_str(),
        "metadata": meta_out,
        "spec": spec,
    });
    Ok(Validated { kind, name, object })
}

/// Checks common to several kinds.
pub mod checks {
    use super::Errors;

    pub fn port(errs: &mut Errors, path: &str, p: u32) {
        if !(1..=65535).contains(&p) {
            errs.add(path, format!("must be between 1 and 65535, got {p}"));
        }
    }

    pub fn absolute_path(errs: &mut Errors, path: &str, p: &str) {
        if !p.starts_with('/') {
            errs.add(path, format!("must be an absolute path, got {p:?}"));
        }
    }

    pub fn env_name(errs: &mut Errors, path: &str, n: &str) {
        let ok = !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !n.as_bytes()[0].is_ascii_digit();
        if !ok {
            errs.add(
                path,
                format!("{n:?} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            );
        }
    }

    pub fn image(errs: &mut Errors, path: &str, image: &str) {
        if image.is_empty() {
            errs.add(path, "is required");
        } else if image.chars().any(char::is_whitespace) {
            errs.add(path, format!("{image:?} must not contain whitespace"));
        }
    }

    pub fn positive_cpu(errs: &mut Errors, path: &str, q: &crate::quantity::Quantity) {
        match crate::quantity::parse_cpu_millis(&q.0) {
            Ok(0) => errs.add(path, "must be greater than zero"),
            Ok(_) => {}
            Err(e) => errs.add(path, e),
        }
    }

    pub fn positive_bytes(errs: &mut Errors, path: &str, q: &crate::quantity::Quantity) {
        match crate::quantity::parse_bytes(&q.0) {
            Ok(0) => errs.add(path, "must be greater than zero"),
            Ok(_) => {}
            Err(e) => errs.add(path, e),
        }
    }

    pub fn ipv4(errs: &mut Errors, path: &str, s: &str) {
        if s.parse::<std::net::Ipv4Addr>().is_err() {
            errs.add(path, format!("{s:?} is not an IPv4 address"));
        }
    }

    pub fn ipv4_cidr(errs: &mut Errors, path: &str, s: &str) {
        let ok = s.split_once('/').is_some_and(|(a, p)| {
            a.parse::<std::net::Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 32)
        });
        if !ok {
            errs.add(
                path,
                format!("{s:?} is not an IPv4 CIDR such as 10.42.0.0/24"),
            );
        }
    }

    pub fn dns_label(errs: &mut Errors, path: &str, s: &str) {
        if let Some(p) = crate::meta::dns_label_problem(s) {
            errs.add(path, p);
        }
    }
}
