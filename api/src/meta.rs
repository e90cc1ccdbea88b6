//! Object metadata, status conditions, and the naming rules shared by every
//! kind (DNS-1123 labels, label keys and values).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::Errors;

/// `metadata` of every object. Operators set name, labels and annotations;
/// the controller sets the rest (and [`crate::validate`] drops what an
/// operator sends for them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Incremented by the controller on every spec change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The store revision of the last write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// The state of a [`Condition`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

/// One observation in a status, in the Kubernetes habit: `type: Ready`,
/// `status: "True"`, with the reason for the last transition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// E.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// One CamelCase word, e.g. `AgentConnected`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339; when `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// RFC 3339; when the condition was last confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
}

/// Why `s` is not a DNS-1123 label (lowercase letters, digits and '-',
/// 1 to 63 characters, starting and ending with a letter or digit), if it
/// is not.
pub fn dns_label_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 63 {
        return Some(format!(
            "must be at most 63 characters, got {} ({})",
            s.len(),
            crate::limits::shown(s)
        ));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || s.starts_with('-')
        || s.ends_with('-')
    {
        return Some(format!(
            "must consist of lowercase letters, digits and '-', and start and end with a letter or digit, got {}",
            crate::limits::shown(s)
        ));
    }
    None
}

/// Whether `s` is a DNS-1123 label.
pub fn is_dns_label(s: &str) -> bool {
    dns_label_problem(s).is_none()
}

/// The charset of label names and values: 1 to 63 of `[A-Za-z0-9-_.]`,
/// starting and ending with a letter or digit.
fn label_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            b.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

fn dns_subdomain_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Why `k` is not a valid label key (`[prefix/]name`, the prefix a DNS
/// subdomain, the name 1 to 63 of `[A-Za-z0-9-_.]` starting and ending with
/// a letter or digit), if it is not.
pub fn label_key_problem(k: &str) -> Option<String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if k.is_empty() {
        return Some("key must not be empty".into());
    }
    let shown = crate::limits::shown;
    if let Some(p) = prefix {
        if !dns_subdomain_ok(p) {
            return Some(format!(
                "key {} has an invalid prefix {}: must be a DNS subdomain of at most 253 characters such as \"ironmesh.dev\"",
                shown(k),
                shown(p)
            ));
        }
    }
    if !label_name_ok(name) {
        return Some(format!(
            "key {} is invalid: the name must be 1-63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit (optionally after a DNS prefix and '/')",
            shown(k)
        ));
    }
    None
}

/// Why `v` is not a valid label value (empty, or what a label name may
/// be), if it is not.
pub fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() || label_name_ok(v) {
        None
    } else {
        Some(format!(
            "value {} is invalid: must be empty or at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            crate::limits::shown(v)
        ))
    }
}

/// Checks a label map (labels, selectors) at `path`, e.g.
/// `metadata.labels`; problems are reported at `path["key"]`.
pub fn check_labels(errs: &mut Errors, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        let at = format!("{path}[{}]", crate::limits::shown(k));
        if let Some(p) = label_key_problem(k) {
            errs.add(at, p);
        } else if let Some(p) = label_value_problem(v) {
            errs.add(at, p);
        }
    }
}

/// Checks annotation keys (same rules as label keys; values are free).
pub fn check_annotations(errs: &mut Errors, path: &str, annotations: &BTreeMap<String, String>) {
    for k in annotations.keys() {
        if let Some(p) = label_key_problem(k) {
            errs.add(format!("{path}[{}]", crate::limits::shown(k)), p);
        }
    }
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > crate::limits::MAX_ANNOTATIONS_BYTES {
        errs.add(
            path,
            format!(
                "annotations total {} bytes; the limit is {}",
                total,
                crate::limits::human_limit(crate::limits::MAX_ANNOTATIONS_BYTES)
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web", "web-1", "0abc", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        assert_eq!(dns_label_problem("").as_deref(), Some("must not be empty"));
        assert!(dns_label_problem(&"a".repeat(64))
            .unwrap()
            .contains("at most 63 characters, got 64"));
        for bad in ["Web", "-a", "a-", "a_b", "a.b", "a b", "é"] {
            let p = dns_label_problem(bad).unwrap();
            assert!(
                p.contains("lowercase letters, digits and '-'"),
                "{bad}: {p}"
            );
        }
    }

    #[test]
    fn label_keys() {
        for ok in [
            "app",
            "App.Name_x-1",
            "ironmesh.dev/hostname",
            "a.b.c/x",
            &"k".repeat(63),
        ] {
            assert_eq!(label_key_problem(ok), None, "{ok}");
        }
        assert!(label_key_problem("").unwrap().contains("must not be empty"));
        assert!(label_key_problem("-app").unwrap().contains("the name must"));
        assert!(label_key_problem("app-").unwrap().contains("the name must"));
        assert!(label_key_problem(&"k".repeat(64))
            .unwrap()
            .contains("1-63 characters"));
        assert!(label_key_problem("Bad.Prefix/x")
            .unwrap()
            .contains("invalid prefix \"Bad.Prefix\""));
        assert!(label_key_problem("/x").unwrap().contains("invalid prefix"));
        assert!(label_key_problem("a/b/c")
            .unwrap()
            .contains("the name must"));
        assert!(label_key_problem("ironmesh.dev/")
            .unwrap()
            .contains("the name must"));
    }

    #[test]
    fn label_values() {
        assert_eq!(label_value_problem(""), None);
        assert_eq!(label_value_problem("v1.2_x-y"), None);
        assert!(label_value_problem("-x")
            .unwrap()
            .contains("must be empty or"));
        assert!(label_value_problem("a b").is_some());
        assert!(label_value_problem(&"v".repeat(64)).is_some());
    }

    #[test]
    fn check_labels_reports_key_path() {
        let mut errs = Errors::default();
        let labels: BTreeMap<String, String> = [("app", "ok"), ("tier", "bad value")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        check_labels(&mut errs, "metadata.labels", &labels);
        let items = errs.items();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, "metadata.labels[\"tier\"]");
        assert!(items[0].1.contains("value \"bad value\" is invalid"));
    }

    #[test]
    fn condition_round_trip() {
        let c = Condition {
            type_: "Ready".into(),
            status: ConditionStatus::True,
            reason: "AgentConnected".into(),
            message: String::new(),
            last_transition_time: Some("2026-01-01T00:00:00Z".into()),
            last_heartbeat_time: None,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "Ready", "status": "True", "reason": "AgentConnected", "lastTransitionTime": "2026-01-01T00:00:00Z"})
        );
        let back: Condition = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn object_meta_round_trip_skips_empty() {
        let m = ObjectMeta {
            name: "web".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v, serde_json::json!({"name": "web"}));
        let full = serde_json::json!({"name": "web", "labels": {"a": "b"}, "uid": "u1", "creationTimestamp": "t", "generation": 3, "resourceVersion": "17"});
        let m: ObjectMeta = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(m.generation, Some(3));
        assert_eq!(serde_json::to_value(&m).unwrap(), full);
    }
}
