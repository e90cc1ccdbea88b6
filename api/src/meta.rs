//! Object metadata and the naming rules shared by every kind.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::Errors;

/// `metadata` of every object. Operators set name, labels and annotations;
/// the controller sets the rest.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// Why `s` is not a DNS-1123 label, if it is not.
pub fn dns_label_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 63 {
        return Some(format!("must be at most 63 characters, got {}", s.len()));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || s.starts_with('-')
        || s.ends_with('-')
    {
        return Some(format!(
            "{s:?} must consist of lowercase letters, digits and '-', and start and end with a letter or digit"
        ));
    }
    None
}

fn label_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn dns_subdomain_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|p| dns_label_problem(p).is_none())
}

/// Why `k` is not a valid label key (`[prefix/]name`), if it is not.
pub fn label_key_problem(k: &str) -> Option<String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if !dns_subdomain_ok(p) {
            return Some(format!(
                "key {k:?} has an invalid prefix {p:?} (must be a DNS subdomain)"
            ));
        }
    }
    if !label_name_ok(name) {
        return Some(format!(
            "key {k:?} is invalid: the name part must be 1-63 characters of letters, digits, '-', '_', '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// Why `v` is not a valid label value, if it is not.
pub fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() || label_name_ok(v) {
        None
    } else {
        Some(format!(
            "value {v:?} is invalid: at most 63 characters of letters, digits, '-', '_', '.', starting and ending with a letter or digit"
        ))
    }
}

/// Checks a label map at `path` (e.g. `metadata.labels`).
pub fn check_labels(errs: &mut Errors, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        if let Some(p) = label_key_problem(k) {
            errs.add(format!("{path}[{k:?}]"), p);
        }
        if let Some(p) = label_value_problem(v) {
            errs.add(format!("{path}[{k:?}]"), p);
        }
    }
}
