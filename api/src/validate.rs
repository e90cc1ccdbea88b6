//! Validation of one document: the common envelope (apiVersion, kind,
//! metadata), typed decoding of `spec` with field paths, then each kind's
//! own rules. Produces the normalised object with defaults filled in.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::kind::Kind;
use crate::meta::{check_annotations, check_labels, dns_label_problem, ObjectMeta};
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

impl Validated {
    /// The spec decoded as its typed form, e.g.
    /// `v.spec::<WorkloadSpec>()`.
    pub fn spec<S: DeserializeOwned>(&self) -> Result<S, serde_json::Error> {
        S::deserialize(self.object.get("spec").unwrap_or(&Value::Null))
    }

    /// The labels in `metadata.labels`.
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        self.object
            .pointer("/metadata/labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default()
    }
}

/// What is wrong with a document, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ValidationError {
    pub kind: Option<Kind>,
    pub name: Option<String>,
    /// Dotted field path with `[i]` indices and `["key"]` map keys, e.g.
    /// `spec.steps[2].dependsOn[0]`, `metadata.labels["app"]`; empty when
    /// the problem is the document as a whole.
    pub path: String,
    pub message: String,
}

impl ValidationError {
    /// `Workload "web": spec.replicas: must be between 0 and 10000, got -1`,
    /// or without the kind and name when they are not known.
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

/// Collects problems as `(path, message)`; kinds report through it and
/// [`validate`] answers the first one.
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

    /// Everything reported so far, in order.
    pub fn items(&self) -> &[(String, String)] {
        &self.items
    }

    /// The first problem as a [`ValidationError`], if any.
    pub fn into_result(
        self,
        kind: Option<Kind>,
        name: Option<String>,
    ) -> Result<(), ValidationError> {
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

/// A kind's spec: decoded with serde (which fills plain defaults), then
/// normalised (defaults that depend on other fields), then checked.
pub trait Spec: DeserializeOwned + Serialize {
    /// Fills defaults that depend on other fields (e.g. a Service port's
    /// `targetPort` defaults to its `port`).
    fn normalize(&mut self) {}

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

/// Fields whose values are string maps: their keys print as `["key"]`.
const MAP_FIELDS: [&str; 5] = [
    "labels",
    "annotations",
    "selector",
    "nodeSelector",
    "parameters",
];

/// Decodes `v` as `T`; a serde error becomes a [`ValidationError`] at the
/// field path under `prefix`, in words an operator understands.
pub(crate) fn decode<T: DeserializeOwned + Serialize>(
    kind: Option<Kind>,
    name: Option<String>,
    prefix: &str,
    v: &Value,
) -> Result<T, ValidationError> {
    let typed: T = serde_path_to_error::deserialize(v).map_err(|e| {
        let mut path = render_path(prefix, e.path());
        let (field, message) = humanize(&e.inner().to_string());
        if let Some(f) = field {
            push_field(&mut path, &f);
        }
        err(kind, name.clone(), &path, message)
    })?;
    // serde accepts a list for a struct (fields by position); refuse that.
    let out =
        serde_json::to_value(&typed).map_err(|e| err(kind, name.clone(), prefix, e.to_string()))?;
    if let Some(path) = list_for_mapping(v, &out, prefix.to_string()) {
        return Err(err(kind, name, &path, "must be a mapping, got a list"));
    }
    Ok(typed)
}

/// The first place where the input has a list and the decoded value an
/// object.
fn list_for_mapping(input: &Value, out: &Value, path: String) -> Option<String> {
    match (input, out) {
        (Value::Array(_), Value::Object(_)) => Some(path),
        (Value::Object(i), Value::Object(o)) => i.iter().find_map(|(k, iv)| {
            let ov = o.get(k)?;
            let mut p = path.clone();
            push_field(&mut p, k);
            list_for_mapping(iv, ov, p)
        }),
        (Value::Array(i), Value::Array(o)) => i
            .iter()
            .zip(o)
            .enumerate()
            .find_map(|(n, (iv, ov))| list_for_mapping(iv, ov, format!("{path}[{n}]"))),
        _ => None,
    }
}

fn push_field(path: &mut String, field: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(field);
}

/// `spec.steps[2].dependsOn[0]`, with the keys of string maps (labels,
/// selectors) as `["key"]`.
fn render_path(prefix: &str, p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = prefix.to_string();
    let mut in_map = false;
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                in_map = false;
            }
            Segment::Map { key } => {
                if in_map {
                    out.push_str(&format!("[{key:?}]"));
                    in_map = false;
                } else {
                    push_field(&mut out, key);
                    in_map = MAP_FIELDS.contains(&key.as_str());
                }
            }
            Segment::Enum { variant } => {
                push_field(&mut out, variant);
                in_map = false;
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// The words between backticks in a serde message.
fn ticked(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

/// Turns a serde message into one that says what is expected. Returns a
/// field name to append to the path when the message is about a field
/// (e.g. a missing one).
fn humanize(msg: &str) -> (Option<String>, String) {
    if msg.starts_with("missing field `") {
        if let Some(f) = ticked(msg).first() {
            return (Some(f.to_string()), "is required".into());
        }
    }
    if msg.starts_with("unknown field `") {
        let t = ticked(msg);
        let expected = t.get(1..).unwrap_or_default();
        return (
            None,
            if expected.is_empty() {
                "unknown field; no fields are allowed here".into()
            } else {
                format!("unknown field; expected one of {}", expected.join(", "))
            },
        );
    }
    if msg.starts_with("unknown variant `") {
        let t = ticked(msg);
        if let Some((got, expected)) = t.split_first() {
            return (
                None,
                format!("must be one of {}, got {got:?}", expected.join(", ")),
            );
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let Some(i) = rest.rfind(", expected ") {
                let got = describe_got(&rest[..i]);
                let expected = describe_expected(&rest[i + ", expected ".len()..]);
                let mut m = format!("must be {expected}, got {got}");
                let scalar = got == "true" || got == "false" || got.parse::<f64>().is_ok();
                if expected == "a string" && scalar {
                    m.push_str(&format!(" (quote it: \"{got}\")"));
                }
                return (None, m);
            }
        }
    }
    (None, msg.to_string())
}

fn describe_got(g: &str) -> String {
    for p in ["integer ", "floating point ", "boolean "] {
        if let Some(v) = g.strip_prefix(p) {
            return v.trim_matches('`').to_string();
        }
    }
    if let Some(s) = g.strip_prefix("string ") {
        return s.to_string();
    }
    match g {
        "sequence" => "a list".into(),
        "map" => "a mapping".into(),
        "unit value" | "null" => "null".into(),
        other => other.to_string(),
    }
}

fn describe_expected(e: &str) -> String {
    match e {
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "u64" | "usize" => "a whole number, 0 or more".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        // A unit-only enum given something else.
        "string or map" => "a string".into(),
        other if other.starts_with("struct ") => "a mapping".into(),
        other => other.to_string(),
    }
}

fn check_spec<S: Spec>(kind: Kind, name: &str, spec: &Value) -> Result<Value, ValidationError> {
    let mut typed: S = decode(Some(kind), Some(name.to_string()), "spec", spec)?;
    typed.normalize();
    let mut errs = Errors::default();
    typed.check(&mut errs);
    errs.into_result(Some(kind), Some(name.to_string()))?;
    serde_json::to_value(&typed)
        .map_err(|e| err(Some(kind), Some(name.to_string()), "spec", e.to_string()))
}

/// The kind names a manifest may use, for messages.
fn kind_list() -> String {
    Kind::ALL
        .iter()
        .filter(|k| !k.is_system_managed())
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// JSON type of a value, for messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Validates one document given as JSON (already parsed from YAML), and
/// returns it normalised: `apiVersion`, `kind`, `metadata` (only name,
/// labels and annotations) and `spec` with defaults filled in. A `status`
/// in the input is dropped: the system writes status.
pub fn validate(doc: &Value) -> Result<Validated, ValidationError> {
    let obj = doc.as_object().ok_or_else(|| {
        err(
            None,
            None,
            "",
            format!(
                "a manifest must be a mapping with apiVersion, kind, metadata and spec, got {}",
                type_name(doc)
            ),
        )
    })?;
    let kind_v = obj.get("kind").ok_or_else(|| {
        err(
            None,
            None,
            "kind",
            format!("is required; one of {}", kind_list()),
        )
    })?;
    let kind_str = kind_v.as_str().ok_or_else(|| {
        err(
            None,
            None,
            "kind",
            format!("must be a string, got {}", type_name(kind_v)),
        )
    })?;
    let kind = match Kind::parse(kind_str) {
        Ok(k) if k.as_str() == kind_str => k,
        Ok(k) => {
            return Err(err(
                None,
                None,
                "kind",
                format!(
                    "unknown kind {kind_str:?}; expected one of {} (did you mean {:?}?)",
                    kind_list(),
                    k.as_str()
                ),
            ))
        }
        Err(_) => {
            return Err(err(
                None,
                None,
                "kind",
                format!("unknown kind {kind_str:?}; expected one of {}", kind_list()),
            ))
        }
    };
    let name_hint = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    match obj.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(other) => {
            let got = match other {
                Value::String(s) => format!("{s:?}"),
                v => type_name(v).to_string(),
            };
            return Err(err(
                Some(kind),
                name_hint,
                "apiVersion",
                format!("must be {API_VERSION:?}, got {got}"),
            ));
        }
        None => {
            return Err(err(
                Some(kind),
                name_hint,
                "apiVersion",
                format!("is required: {API_VERSION:?}"),
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
                "unknown field; expected one of apiVersion, kind, metadata, spec",
            ));
        }
    }
    let meta_v = obj
        .get("metadata")
        .ok_or_else(|| err(Some(kind), None, "metadata", "is required (with a name)"))?;
    if !meta_v.is_object() {
        return Err(err(
            Some(kind),
            None,
            "metadata",
            format!("must be a mapping, got {}", type_name(meta_v)),
        ));
    }
    let meta: ObjectMeta = decode(Some(kind), name_hint.clone(), "metadata", meta_v)?;
    if let Some(p) = dns_label_problem(&meta.name) {
        return Err(err(Some(kind), None, "metadata.name", p));
    }
    let name = meta.name.clone();
    let mut errs = Errors::default();
    check_labels(&mut errs, "metadata.labels", &meta.labels);
    check_annotations(&mut errs, "metadata.annotations", &meta.annotations);
    errs.into_result(Some(kind), Some(name.clone()))?;

    let empty = Value::Object(Map::new());
    let spec_in = match obj.get("spec") {
        None | Some(Value::Null) => &empty,
        Some(s) if s.is_object() => s,
        Some(s) => {
            return Err(err(
                Some(kind),
                Some(name),
                "spec",
                format!("must be a mapping, got {}", type_name(s)),
            ))
        }
    };
    let spec = match kind {
        Kind::Node => check_spec::<crate::node::NodeSpec>(kind, &name, spec_in)?,
        Kind::Workload => check_spec::<crate::workload::WorkloadSpec>(kind, &name, spec_in)?,
        Kind::Service => check_spec::<crate::service::ServiceSpec>(kind, &name, spec_in)?,
        Kind::Policy => check_spec::<crate::policy::PolicySpec>(kind, &name, spec_in)?,
        Kind::Volume => check_spec::<crate::volume::VolumeSpec>(kind, &name, spec_in)?,
        Kind::Pipeline => check_spec::<crate::pipeline::PipelineSpec>(kind, &name, spec_in)?,
        Kind::PipelineRun => check_spec::<crate::pipeline::PipelineRunSpec>(kind, &name, spec_in)?,
        Kind::Source => check_spec::<crate::source::SourceSpec>(kind, &name, spec_in)?,
        Kind::Gateway => check_spec::<crate::gateway::GatewaySpec>(kind, &name, spec_in)?,
        Kind::HTTPRoute => check_spec::<crate::gateway::HTTPRouteSpec>(kind, &name, spec_in)?,
        Kind::Secret => check_spec::<crate::secret::SecretSpec>(kind, &name, spec_in)?,
        Kind::Instance => {
            return Err(err(
                Some(kind),
                Some(name),
                "kind",
                "Instance objects are created by the controller from Workloads; apply a Workload instead".to_string(),
            ))
        }
    };
    let mut meta_out = Map::new();
    meta_out.insert("name".into(), Value::String(name.clone()));
    let map_value = |m: &std::collections::BTreeMap<String, String>| {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    };
    if !meta.labels.is_empty() {
        meta_out.insert("labels".into(), map_value(&meta.labels));
    }
    if !meta.annotations.is_empty() {
        meta_out.insert("annotations".into(), map_value(&meta.annotations));
    }
    let object = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": kind.as_str(),
        "metadata": meta_out,
        "spec": spec,
    });
    // Field limits above catch the usual culprit with its path; this bounds
    // the whole (the store keeps every object, its history, and sends it
    // to every watcher).
    let size = serde_json::to_vec(&object).map_or(0, |v| v.len());
    if size > crate::limits::MAX_OBJECT_BYTES {
        return Err(err(
            Some(kind),
            Some(name),
            "",
            format!(
                "the object is {} encoded; the limit is {}",
                crate::limits::human_bytes(size),
                crate::limits::human_limit(crate::limits::MAX_OBJECT_BYTES)
            ),
        ));
    }
    Ok(Validated { kind, name, object })
}

/// Checks common to several kinds; each reports at the path it is given.
pub mod checks {
    use super::Errors;
    use crate::quantity::Quantity;

    /// 1..=65535.
    pub fn port(errs: &mut Errors, path: &str, p: u32) {
        if !(1..=65535).contains(&p) {
            errs.add(path, format!("must be between 1 and 65535, got {p}"));
        }
    }

    /// An IANA-style port name: a DNS label of at most 15 characters.
    pub fn port_name(errs: &mut Errors, path: &str, n: &str) {
        if let Some(p) = crate::meta::dns_label_problem(n) {
            errs.add(path, p);
        } else if n.len() > 15 {
            errs.add(
                path,
                format!("must be at most 15 characters, got {} ({n:?})", n.len()),
            );
        }
    }

    pub fn absolute_path(errs: &mut Errors, path: &str, p: &str) {
        if !p.starts_with('/') {
            errs.add(path, format!("must be an absolute path, got {p:?}"));
        }
    }

    /// `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn env_name(errs: &mut Errors, path: &str, n: &str) {
        let ok = n
            .as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            errs.add(
                path,
                format!(
                    "{n:?} is not a valid environment variable name: must match [A-Za-z_][A-Za-z0-9_]*"
                ),
            );
        }
    }

    /// Non-empty, no whitespace, within the reference grammar's limits
    /// (name at most 255 characters, tag at most 128).
    pub fn image(errs: &mut Errors, path: &str, image: &str) {
        if image.is_empty() {
            errs.add(path, "is required, e.g. \"registry.local/web:1.2\"");
        } else if image.chars().any(char::is_whitespace) {
            errs.add(
                path,
                format!(
                    "must not contain whitespace, got {}",
                    crate::limits::shown(image)
                ),
            );
        } else if let Some(p) = crate::limits::image_reference_problem(image) {
            errs.add(path, p);
        }
    }

    /// `command`, `args` and `env` of one container: at most
    /// [`MAX_LIST_ITEMS`](crate::limits::MAX_LIST_ITEMS) entries each, each
    /// string at most 32 KiB, all together at most 256 KiB.
    pub fn argv(
        errs: &mut Errors,
        at: &str,
        command: &[String],
        args: &[String],
        env: &[crate::workload::EnvVar],
    ) {
        use crate::limits::{
            human_limit, MAX_CONTAINER_ARGV_BYTES, MAX_LIST_ITEMS, MAX_STRING_BYTES,
        };
        let mut total = 0usize;
        let mut list = |field: &str, items: &mut dyn Iterator<Item = (usize, &str)>, n: usize| {
            if n > MAX_LIST_ITEMS {
                errs.add(
                    format!("{at}.{field}"),
                    format!("must have at most {MAX_LIST_ITEMS} entries, got {n}"),
                );
            }
            for (i, s) in items {
                total += s.len();
                if s.len() > MAX_STRING_BYTES {
                    errs.add(
                        format!("{at}.{field}[{i}]"),
                        format!(
                            "must be at most {}, got {} bytes",
                            human_limit(MAX_STRING_BYTES),
                            s.len()
                        ),
                    );
                }
            }
        };
        list(
            "command",
            &mut command.iter().map(String::as_str).enumerate(),
            command.len(),
        );
        list(
            "args",
            &mut args.iter().map(String::as_str).enumerate(),
            args.len(),
        );
        list(
            "env",
            &mut env.iter().map(|e| e.value.as_str()).enumerate(),
            env.len(),
        );
        total += env.iter().map(|e| e.name.len() + 1).sum::<usize>();
        if total > MAX_CONTAINER_ARGV_BYTES {
            errs.add(
                at.to_string(),
                format!(
                    "command, args and env total {total} bytes; the limit is {}",
                    human_limit(MAX_CONTAINER_ARGV_BYTES)
                ),
            );
        }
    }

    /// A CPU quantity greater than zero.
    pub fn positive_cpu(errs: &mut Errors, path: &str, q: &Quantity) {
        match q.cpu_millis() {
            Ok(0) => errs.add(path, format!("must be greater than zero, got {:?}", q.0)),
            Ok(_) => {}
            Err(e) => errs.add(path, e),
        }
    }

    /// A byte quantity greater than zero.
    pub fn positive_bytes(errs: &mut Errors, path: &str, q: &Quantity) {
        match q.bytes() {
            Ok(0) => errs.add(path, format!("must be greater than zero, got {:?}", q.0)),
            Ok(_) => {}
            Err(e) => errs.add(path, e),
        }
    }

    pub fn ipv4(errs: &mut Errors, path: &str, s: &str) {
        if s.parse::<std::net::Ipv4Addr>().is_err() {
            errs.add(
                path,
                format!("must be an IPv4 address such as 10.96.0.10, got {s:?}"),
            );
        }
    }

    /// `a.b.c.d/n` with no host bits set.
    pub fn ipv4_cidr(errs: &mut Errors, path: &str, s: &str) {
        let parsed = s.split_once('/').and_then(|(a, p)| {
            let a = a.parse::<std::net::Ipv4Addr>().ok()?;
            let p = p.parse::<u8>().ok().filter(|p| *p <= 32)?;
            Some((a, p))
        });
        match parsed {
            None => errs.add(
                path,
                format!("must be an IPv4 CIDR such as 10.42.0.0/24, got {s:?}"),
            ),
            Some((a, p)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
                if u32::from(a) & !mask != 0 {
                    let net = std::net::Ipv4Addr::from(u32::from(a) & mask);
                    errs.add(
                        path,
                        format!("{s:?} has host bits set; did you mean {net}/{p}?"),
                    );
                }
            }
        }
    }

    pub fn dns_label(errs: &mut Errors, path: &str, s: &str) {
        if let Some(p) = crate::meta::dns_label_problem(s) {
            errs.add(path, p);
        }
    }

    pub fn label_key(errs: &mut Errors, path: &str, s: &str) {
        if let Some(p) = crate::meta::label_key_problem(s) {
            errs.add(path, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn first(check: impl FnOnce(&mut Errors)) -> Option<(String, String)> {
        let mut e = Errors::default();
        check(&mut e);
        e.items().first().cloned()
    }

    #[test]
    fn render_forms() {
        let e = ValidationError {
            kind: Some(Kind::Workload),
            name: Some("web".into()),
            path: "spec.replicas".into(),
            message: "must be between 0 and 10000, got -1".into(),
        };
        assert_eq!(
            e.to_string(),
            "Workload \"web\": spec.replicas: must be between 0 and 10000, got -1"
        );
        let e = ValidationError {
            kind: None,
            name: None,
            path: "kind".into(),
            message: "unknown kind \"Foo\"".into(),
        };
        assert_eq!(e.to_string(), "kind: unknown kind \"Foo\"");
        let e = ValidationError {
            kind: Some(Kind::Node),
            name: None,
            path: String::new(),
            message: "m".into(),
        };
        assert_eq!(e.to_string(), "Node: m");
    }

    #[test]
    fn humanizes_serde_messages() {
        assert_eq!(
            humanize("missing field `image`"),
            (Some("image".into()), "is required".into())
        );
        assert_eq!(
            humanize("unknown variant `Sometimes`, expected one of `Always`, `OnFailure`, `Never`")
                .1,
            "must be one of Always, OnFailure, Never, got \"Sometimes\""
        );
        assert_eq!(
            humanize("unknown field `x`, expected `a` or `b`").1,
            "unknown field; expected one of a, b"
        );
        assert_eq!(
            humanize("unknown field `x`, there are no fields").1,
            "unknown field; no fields are allowed here"
        );
        assert_eq!(
            humanize("invalid value: integer `-1`, expected u32").1,
            "must be a whole number from 0 to 4294967295, got -1"
        );
        assert_eq!(
            humanize("invalid type: integer `1`, expected a string").1,
            "must be a string, got 1 (quote it: \"1\")"
        );
        assert_eq!(
            humanize("invalid type: null, expected a sequence").1,
            "must be a list, got null"
        );
        assert_eq!(
            humanize("invalid type: string \"x\", expected a boolean").1,
            "must be true or false, got \"x\""
        );
        assert_eq!(humanize("something else").1, "something else");
    }

    #[test]
    fn decode_paths_use_brackets_for_map_keys() {
        let v = json!({"name": "x", "labels": {"app": 1}});
        let e = decode::<ObjectMeta>(None, None, "metadata", &v).unwrap_err();
        assert_eq!(e.path, "metadata.labels[\"app\"]");
        assert!(
            e.message.contains("must be a string, got 1"),
            "{}",
            e.message
        );
    }

    #[test]
    fn decode_refuses_lists_for_mappings() {
        let e = decode::<ObjectMeta>(None, None, "metadata", &json!(["x"])).unwrap_err();
        assert_eq!(e.path, "metadata");
        assert_eq!(e.message, "must be a mapping, got a list");
    }

    #[test]
    fn common_checks() {
        assert_eq!(
            first(|e| checks::port(e, "p", 0)),
            Some(("p".into(), "must be between 1 and 65535, got 0".into()))
        );
        assert_eq!(first(|e| checks::port(e, "p", 65535)), None);
        assert!(
            first(|e| checks::port_name(e, "n", "a-very-long-port-name"))
                .unwrap()
                .1
                .contains("at most 15")
        );
        assert!(first(|e| checks::absolute_path(e, "p", "rel"))
            .unwrap()
            .1
            .contains("absolute path"));
        assert_eq!(first(|e| checks::env_name(e, "n", "_A1")), None);
        assert!(first(|e| checks::env_name(e, "n", "")).is_some());
        assert!(first(|e| checks::env_name(e, "n", "A-B")).is_some());
        assert!(first(|e| checks::image(e, "i", ""))
            .unwrap()
            .1
            .contains("is required"));
        assert_eq!(first(|e| checks::ipv4(e, "ip", "10.0.0.1")), None);
        assert!(first(|e| checks::ipv4(e, "ip", "10.0.0"))
            .unwrap()
            .1
            .contains("IPv4"));
        assert_eq!(first(|e| checks::ipv4_cidr(e, "c", "10.42.1.0/24")), None);
        assert!(first(|e| checks::ipv4_cidr(e, "c", "10.42.1.0/33"))
            .unwrap()
            .1
            .contains("IPv4 CIDR"));
        assert!(first(|e| checks::ipv4_cidr(e, "c", "10.42.1.5/24"))
            .unwrap()
            .1
            .contains("did you mean 10.42.1.0/24"));
        assert_eq!(first(|e| checks::ipv4_cidr(e, "c", "0.0.0.0/0")), None);
    }

    fn workload(spec: Value) -> Value {
        json!({"apiVersion": API_VERSION, "kind": "Workload", "metadata": {"name": "web"}, "spec": spec})
    }

    #[test]
    fn a_2mb_image_is_refused_naming_the_field_and_the_limit() {
        let e = validate(&workload(json!({"image": "i".repeat(2_000_000)}))).unwrap_err();
        assert_eq!(e.path, "spec.image");
        assert!(
            e.message.contains("at most 255 characters, got 2000000"),
            "{}",
            e.message
        );
        // The message quotes the start of the value, not all of it.
        assert!(e.to_string().len() < 300, "{}", e.to_string().len());
    }

    #[test]
    fn argv_and_env_are_bounded() {
        let e = validate(&workload(
            json!({"image": "web:1", "args": vec!["a"; 1025]}),
        ))
        .unwrap_err();
        assert_eq!(e.path, "spec.args");
        assert!(
            e.message.contains("at most 1024 entries, got 1025"),
            "{}",
            e.message
        );
        let e = validate(&workload(
            json!({"image": "web:1", "env": [{"name": "A", "value": "v".repeat(40_000)}]}),
        ))
        .unwrap_err();
        assert_eq!(e.path, "spec.env[0]");
        assert!(e.message.contains("at most 32 KiB"), "{}", e.message);
        let args: Vec<String> = (0..9).map(|_| "a".repeat(30_000)).collect();
        let e = validate(&workload(json!({"image": "web:1", "args": args}))).unwrap_err();
        assert_eq!(e.path, "spec");
        assert!(e.message.contains("the limit is 256 KiB"), "{}", e.message);
    }

    #[test]
    fn whole_objects_and_annotations_are_bounded() {
        let mut doc = workload(json!({"image": "web:1"}));
        let big: serde_json::Map<String, Value> = (0..20)
            .map(|i| (format!("a{i}"), Value::String("x".repeat(20_000))))
            .collect();
        doc["metadata"]["annotations"] = Value::Object(big);
        let e = validate(&doc).unwrap_err();
        assert_eq!(e.path, "metadata.annotations");
        assert!(e.message.contains("the limit is 256 KiB"), "{}", e.message);
        // A label value of 2 MB is named by its key and shown cut short.
        let mut doc = workload(json!({"image": "web:1"}));
        doc["metadata"]["labels"] = json!({"app": "v".repeat(2_000_000)});
        let e = validate(&doc).unwrap_err();
        assert_eq!(e.path, "metadata.labels[\"app\"]");
        assert!(e.to_string().len() < 400);
    }

    #[test]
    fn validated_spec_accessor() {
        let v = validate(&json!({"apiVersion": API_VERSION, "kind": "Volume", "metadata": {"name": "v", "labels": {"a": "b"}}, "spec": {"size": "1Gi"}})).unwrap();
        let s: crate::volume::VolumeSpec = v.spec().unwrap();
        assert_eq!(s.size.0, "1Gi");
        assert_eq!(v.labels().get("a").map(String::as_str), Some("b"));
    }
}
