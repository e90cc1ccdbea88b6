//! Secret: small values an operator supplies that the cluster must keep
//! from readers, such as a Gateway listener's own certificate and key.
//!
//! The controller seals `spec.data` with its key before the object reaches
//! the store (the store holds `spec.sealedData`, AES-256-GCM ciphertext,
//! only), shows the keys and sizes but never the values to `get`, `list`
//! and `watch`, and opens them only for an admin's `get --reveal` and for
//! the components that use them (docs/resources.md, docs/security.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{Errors, Spec};

/// Most entries one Secret may hold.
pub const MAX_ENTRIES: usize = 32;
/// Largest value of one entry, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The certificate chain entry of a `TLS` Secret (PEM, leaf first).
pub const TLS_CERT: &str = "tls.crt";
/// The private key entry of a `TLS` Secret (PEM).
pub const TLS_KEY: &str = "tls.key";

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    #[serde(rename = "type", default)]
    pub secret_type: SecretType,
    /// What the operator applies: entry name → value (text, e.g. PEM).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    /// What the store holds instead of `data`; written by the controller.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sealed_data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretType {
    /// Any entries.
    #[default]
    Opaque,
    /// A certificate chain (`tls.crt`) and its private key (`tls.key`).
    TLS,
}

impl std::fmt::Display for SecretType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecretType::Opaque => "Opaque",
            SecretType::TLS => "TLS",
        })
    }
}

/// Whether `name` is a valid entry name: 1–253 of `[A-Za-z0-9._-]`.
fn entry_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 253 {
        return Some("entry names must be 1 to 253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("entry names may hold only letters, digits, '.', '_' and '-'");
    }
    None
}

/// The PEM block labels in `text` (`CERTIFICATE`, `PRIVATE KEY`, …).
fn pem_labels(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("-----BEGIN ")
                .and_then(|r| r.strip_suffix("-----"))
        })
        .collect()
}

impl Spec for SecretSpec {
    fn check(&self, errs: &mut Errors) {
        if !self.sealed_data.is_empty() {
            errs.add(
                "spec.sealedData",
                "is written by the controller; give the values in spec.data",
            );
        }
        if self.data.is_empty() && self.sealed_data.is_empty() {
            // Also what an applied `get -o yaml` looks like (values hidden):
            // refusing it keeps the stored values from being wiped.
            errs.add("spec.data", "is required: at least one entry");
        }
        if self.data.len() > MAX_ENTRIES {
            errs.add(
                "spec.data",
                format!(
                    "holds {} entries; at most {MAX_ENTRIES} are allowed",
                    self.data.len()
                ),
            );
        }
        for (k, v) in &self.data {
            let p = format!("spec.data[{k:?}]");
            if let Some(problem) = entry_name_problem(k) {
                errs.add(&p, problem);
            }
            if v.len() > MAX_VALUE_BYTES {
                errs.add(
                    &p,
                    format!(
                        "is {} bytes; at most {MAX_VALUE_BYTES} are allowed",
                        v.len()
                    ),
                );
            }
        }
        if self.secret_type == SecretType::TLS {
            for k in self.data.keys() {
                if k != TLS_CERT && k != TLS_KEY {
                    errs.add(
                        format!("spec.data[{k:?}]"),
                        "a TLS Secret holds only tls.crt and tls.key",
                    );
                }
            }
            match self.data.get(TLS_CERT) {
                None => errs.add(
                    "spec.data",
                    "a TLS Secret needs tls.crt (PEM certificates, leaf first)",
                ),
                Some(crt) if !pem_labels(crt).contains(&"CERTIFICATE") => errs.add(
                    format!("spec.data[{TLS_CERT:?}]"),
                    "must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
                ),
                Some(crt) if pem_labels(crt).iter().any(|l| l.contains("PRIVATE KEY")) => errs.add(
                    format!("spec.data[{TLS_CERT:?}]"),
                    "holds a private key; put it in tls.key",
                ),
                Some(_) => {}
            }
            match self.data.get(TLS_KEY) {
                None => errs.add(
                    "spec.data",
                    "a TLS Secret needs tls.key (a PEM private key)",
                ),
                Some(key) => {
                    let labels = pem_labels(key);
                    if labels.len() != 1 || !labels[0].ends_with("PRIVATE KEY") {
                        errs.add(
                            format!("spec.data[{TLS_KEY:?}]"),
                            "must hold one PEM private key (-----BEGIN PRIVATE KEY-----)",
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(spec: serde_json::Value) -> Vec<(String, String)> {
        let s: SecretSpec = serde_json::from_value(spec).unwrap();
        let mut errs = Errors::default();
        s.check(&mut errs);
        errs.items().to_vec()
    }

    const CRT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";

    #[test]
    fn a_tls_secret_needs_a_certificate_and_one_key() {
        assert!(check(
            serde_json::json!({"type": "TLS", "data": {"tls.crt": CRT, "tls.key": KEY}})
        )
        .is_empty());
        let e = check(serde_json::json!({"type": "TLS", "data": {"tls.crt": CRT}}));
        assert_eq!(e[0].0, "spec.data");
        assert!(e[0].1.contains("tls.key"), "{e:?}");
        let e = check(serde_json::json!({"type": "TLS", "data": {"tls.crt": KEY, "tls.key": KEY}}));
        assert_eq!(e[0].0, "spec.data[\"tls.crt\"]");
        let e = check(
            serde_json::json!({"type": "TLS", "data": {"tls.crt": CRT, "tls.key": format!("{KEY}{KEY}")}}),
        );
        assert_eq!(e[0].0, "spec.data[\"tls.key\"]");
        let e = check(
            serde_json::json!({"type": "TLS", "data": {"tls.crt": CRT, "tls.key": KEY, "x": "y"}}),
        );
        assert!(e[0].1.contains("only tls.crt and tls.key"), "{e:?}");
    }

    #[test]
    fn entry_names_sizes_and_sealed_data_are_checked() {
        let e = check(serde_json::json!({"data": {"a b": "x"}}));
        assert_eq!(e[0].0, "spec.data[\"a b\"]");
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        let e = check(serde_json::json!({"data": {"big": big}}));
        assert!(e[0].1.contains("at most 65536"), "{e:?}");
        let e = check(serde_json::json!({"sealedData": {"a": "b"}}));
        assert_eq!(e[0].0, "spec.sealedData");
        assert!(check(serde_json::json!({"data": {"password": "hunter2"}})).is_empty());
        let e = check(serde_json::json!({"type": "Opaque"}));
        assert!(e[0].1.contains("at least one entry"), "{e:?}");
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        assert!(
            serde_json::from_value::<SecretSpec>(serde_json::json!({"type": "Basic"})).is_err()
        );
        assert!(
            serde_json::from_value::<SecretSpec>(serde_json::json!({"stringData": {}})).is_err()
        );
    }
}
