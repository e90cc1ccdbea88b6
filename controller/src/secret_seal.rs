//! Secret objects at rest: `spec.data` is sealed with AES-256-GCM before
//! the object reaches the store, and what readers see is redacted.
//!
//! The key is the operator's `--ca-key-file` when given (every controller
//! of an etcd cluster has the same one), else `secret-seal.key` in the data
//! directory, made on first start (0600) beside the CA key it protects as
//! well as. Each entry's associated data is its store key and entry name,
//! so a sealed value copied to another Secret or entry does not open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ironmesh_api::secret::SecretSpec;
use serde_json::{json, Value};

use crate::ha::shared_secrets::{SealKey, SecretsError};

/// File name of the generated key in the data directory.
pub const KEY_FILE: &str = "secret-seal.key";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("secret seal key {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    #[error("Secret {name:?}: {message}")]
    Malformed { name: String, message: String },
    #[error("Secret {name:?}: {source}")]
    Crypto { name: String, source: SecretsError },
}

/// Seals and opens Secret objects.
pub struct SecretSeal {
    key: SealKey,
}

impl SecretSeal {
    pub fn new(key: SealKey) -> SecretSeal {
        SecretSeal { key }
    }

    /// The key of `--ca-key-file`, or the data directory's own one.
    pub fn load_or_create(
        ca_key_file: Option<&Path>,
        data_dir: &Path,
    ) -> Result<SecretSeal, SealError> {
        if let Some(path) = ca_key_file {
            return SealKey::from_file(path)
                .map(SecretSeal::new)
                .map_err(|e| SealError::KeyFile {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                });
        }
        let path = data_dir.join(KEY_FILE);
        let err = |message: String| SealError::KeyFile {
            path: path.clone(),
            message,
        };
        if !path.exists() {
            use ring::rand::SecureRandom;
            let mut bytes = [0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| err("random number generator failed".into()))?;
            write_private(&path, hex::encode(bytes).as_bytes()).map_err(|e| err(e.to_string()))?;
            tracing::info!(path = %path.display(), "created the key that seals Secret objects");
        }
        SealKey::from_file(&path)
            .map(SecretSeal::new)
            .map_err(|e| err(e.to_string()))
    }

    /// Replaces `spec.data` of the applied Secret `object` (store key
    /// `store_key`) with `spec.sealedData`. When `existing` (the stored
    /// object) opens to the same values, its ciphertext is kept, so a
    /// re-apply of the same Secret is `unchanged`.
    pub fn seal_object(
        &self,
        store_key: &str,
        object: &mut Value,
        existing: Option<&Value>,
    ) -> Result<(), SealError> {
        let name = name_of(object);
        let spec = spec_of(&name, object)?;
        let kept = existing
            .and_then(|e| self.open(store_key, e).ok())
            .is_some_and(|old| old == spec.data);
        let sealed: BTreeMap<String, String> = match (kept, existing) {
            (true, Some(e)) => spec_of(&name, e)?.sealed_data,
            _ => spec
                .data
                .iter()
                .map(|(k, v)| {
                    self.key
                        .seal(v.as_bytes(), &aad(store_key, k))
                        .map(|s| (k.clone(), s))
                        .map_err(|source| SealError::Crypto {
                            name: name.clone(),
                            source,
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        let out = SecretSpec {
            secret_type: spec.secret_type,
            data: BTreeMap::new(),
            sealed_data: sealed,
        };
        object["spec"] = serde_json::to_value(&out).map_err(|e| SealError::Malformed {
            name,
            message: e.to_string(),
        })?;
        Ok(())
    }

    /// The plaintext entries of a stored Secret.
    pub fn open(
        &self,
        store_key: &str,
        object: &Value,
    ) -> Result<BTreeMap<String, String>, SealError> {
        let name = name_of(object);
        let spec = spec_of(&name, object)?;
        spec.sealed_data
            .iter()
            .map(|(k, sealed)| {
                let plain = self
                    .key
                    .open(sealed, &aad(store_key, k), "Secret entry")
                    .map_err(|source| SealError::Crypto {
                        name: name.clone(),
                        source,
                    })?;
                let text = String::from_utf8(plain).map_err(|_| SealError::Malformed {
                    name: name.clone(),
                    message: format!("entry {k:?} is not text"),
                })?;
                Ok((k.clone(), text))
            })
            .collect()
    }

    /// `object` with its values in `spec.data`, for an admin's `--reveal`.
    pub fn reveal(&self, store_key: &str, object: &Value) -> Result<Value, SealError> {
        let data = self.open(store_key, object)?;
        let mut out = object.clone();
        redact(&mut out);
        out["spec"]["data"] = json!(data);
        Ok(out)
    }
}

/// What readers see of a stored Secret: its type, and each entry's name
/// and size in `status.entries`, never a value (not even sealed).
pub fn redact(object: &mut Value) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let sealed = spec.remove("sealedData");
    spec.remove("data");
    let entries: Vec<Value> = sealed
        .as_ref()
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| json!({"name": k, "bytes": sealed_len(v.as_str().unwrap_or(""))}))
                .collect()
        })
        .unwrap_or_default();
    if let Some(o) = object.as_object_mut() {
        o.insert("status".into(), json!({ "entries": entries }));
    }
}

/// The plaintext length behind a sealed value: nonce ‖ ciphertext ‖ tag.
fn sealed_len(sealed: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .map_or(0, |raw| raw.len().saturating_sub(12 + 16))
}

fn aad(store_key: &str, entry: &str) -> String {
    format!("{store_key}#{entry}")
}

fn name_of(object: &Value) -> String {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn spec_of(name: &str, object: &Value) -> Result<SecretSpec, SealError> {
    serde_json::from_value(object.get("spec").cloned().unwrap_or_else(|| json!({}))).map_err(|e| {
        SealError::Malformed {
            name: name.to_string(),
            message: format!("spec: {e}"),
        }
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal() -> SecretSeal {
        SecretSeal::new(SealKey::from_bytes(&[7u8; 32]).unwrap())
    }

    fn secret(password: &str) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Secret", "metadata": {"name": "db"},
               "spec": {"type": "Opaque", "data": {"password": password}}})
    }

    #[test]
    fn sealed_objects_hold_no_plaintext_and_open_to_what_was_applied() {
        let s = seal();
        let mut o = secret("hunter2-hunter2");
        s.seal_object("/registry/secrets/db", &mut o, None).unwrap();
        let text = o.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(o.pointer("/spec/data").is_none());
        let open = s.open("/registry/secrets/db", &o).unwrap();
        assert_eq!(open["password"], "hunter2-hunter2");
        // Bound to its key: the same ciphertext under another name fails.
        assert!(s.open("/registry/secrets/other", &o).is_err());
        // Another key cannot open it.
        let other = SecretSeal::new(SealKey::from_bytes(&[8u8; 32]).unwrap());
        assert!(other.open("/registry/secrets/db", &o).is_err());
    }

    #[test]
    fn reapplying_the_same_values_keeps_the_ciphertext() {
        let s = seal();
        let mut first = secret("a");
        s.seal_object("/k", &mut first, None).unwrap();
        let mut again = secret("a");
        s.seal_object("/k", &mut again, Some(&first)).unwrap();
        assert_eq!(first, again);
        let mut changed = secret("b");
        s.seal_object("/k", &mut changed, Some(&first)).unwrap();
        assert_ne!(first["spec"], changed["spec"]);
    }

    #[test]
    fn readers_see_entry_names_and_sizes_only() {
        let s = seal();
        let mut o = secret("hunter2");
        s.seal_object("/k", &mut o, None).unwrap();
        let mut shown = o.clone();
        redact(&mut shown);
        assert!(shown.pointer("/spec/sealedData").is_none());
        assert_eq!(
            shown["status"]["entries"],
            json!([{"name": "password", "bytes": 7}])
        );
        let revealed = s.reveal("/k", &o).unwrap();
        assert_eq!(revealed["spec"]["data"]["password"], "hunter2");
    }

    #[test]
    fn the_data_dir_key_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretSeal::load_or_create(None, dir.path()).unwrap();
        let mut o = secret("x");
        a.seal_object("/k", &mut o, None).unwrap();
        let b = SecretSeal::load_or_create(None, dir.path()).unwrap();
        assert_eq!(b.open("/k", &o).unwrap()["password"], "x");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
