//! The cluster CA and the bootstrap token, shared by every controller
//! through the store, so that agents and operators trust any of them.
//!
//! The first controller to start creates both and writes them with one
//! create-if-absent txn (`Absent` compares), so two controllers starting at
//! once still end with one CA: the loser of the race reads the winner's.
//! The CA private key and the token are sealed with AES-256-GCM under a key
//! the operator provides (`--ca-key-file`, 32 bytes), with the store key as
//! associated data; the store (and etcd's disk and backups) only ever holds
//! ciphertext. A wrong key fails loudly at start-up.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::pki::{ClusterCa, PkiError};
use crate::store::{Compare, Op, Store, StoreError, Txn, TxnOutcome};

/// Store key of the shared CA.
pub const CA_KEY: &str = "/cluster/ca";
/// Store key of the shared bootstrap token.
pub const TOKEN_KEY: &str = "/cluster/bootstrap-token";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("--ca-key-file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error(
        "cannot decrypt {what} stored in the store: the --ca-key-file differs from the one \
         the cluster was created with, or the record was altered"
    )]
    Decrypt { what: &'static str },
    #[error("the shared {what} in the store is malformed: {message}")]
    Malformed { what: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("random number generator failed")]
    Random,
}

/// The operator's 32-byte key that seals secrets at rest.
pub struct SealKey(LessSafeKey);

impl SealKey {
    /// Reads a key file: 64 hex characters (e.g. `openssl rand -hex 32`),
    /// or exactly 32 raw bytes.
    pub fn from_file(path: &std::path::Path) -> Result<SealKey, SecretsError> {
        let err = |message: String| SecretsError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        let raw = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let text = std::str::from_utf8(&raw).map(str::trim).unwrap_or("");
        let bytes = if text.len() == 64 {
            hex::decode(text).map_err(|e| err(format!("not hex: {e}")))?
        } else if raw.len() == 32 {
            raw
        } else {
            return Err(err(
                "must hold 32 bytes, as 64 hex characters (openssl rand -hex 32) or raw".into(),
            ));
        };
        SealKey::from_bytes(&bytes).map_err(|_| err("not a valid AES-256 key".into()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<SealKey, SecretsError> {
        let k = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| SecretsError::KeyFile {
            path: "<bytes>".into(),
            message: "not 32 bytes".into(),
        })?;
        Ok(SealKey(LessSafeKey::new(k)))
    }

    /// nonce ‖ ciphertext ‖ tag, base64; `aad` binds it to its store key.
    pub(crate) fn seal(&self, plain: &[u8], aad: &str) -> Result<String, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretsError::Random)?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SecretsError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        use base64::Engine;
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    pub(crate) fn open(
        &self,
        sealed: &str,
        aad: &str,
        what: &'static str,
    ) -> Result<Vec<u8>, SecretsError> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|e| SecretsError::Malformed {
                what,
                message: e.to_string(),
            })?;
        if raw.len() < NONCE_LEN {
            return Err(SecretsError::Malformed {
                what,
                message: "too short".into(),
            });
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| SecretsError::Decrypt { what })?;
        let mut buf = ct.to_vec();
        let plain = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SecretsError::Decrypt { what })?;
        Ok(plain.to_vec())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCa {
    cert_pem: String,
    /// The private key PEM, sealed.
    sealed_key: String,
    algorithm: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredToken {
    sealed_token: String,
    algorithm: String,
}

const ALGORITHM: &str = "AES-256-GCM";

/// What the controllers share.
pub struct Shared {
    pub ca: ClusterCa,
    pub bootstrap_token: String,
    /// Whether this call created them.
    pub created: bool,
}

/// Loads the shared CA and token, creating both if the store has neither.
/// `token` (the operator's `--bootstrap-token`), if given, must match a
/// stored one, or is stored at creation.
pub async fn load_or_create(
    store: &dyn Store,
    key: &SealKey,
    token: Option<&str>,
) -> Result<Shared, SecretsError> {
    for _ in 0..3 {
        if let Some(shared) = load(store, key).await? {
            if let Some(t) = token {
                if t != shared.bootstrap_token {
                    return Err(SecretsError::Malformed {
                        what: "bootstrap token",
                        message: "--bootstrap-token differs from the token the cluster \
                                  already shares; drop the flag or use the stored token"
                            .into(),
                    });
                }
            }
            return Ok(shared);
        }
        let (ca, ca_key_pem) = ClusterCa::generate()?;
        let bootstrap_token = match token {
            Some(t) => t.to_string(),
            None => crate::bootstrap::new_token(),
        };
        let ca_rec = StoredCa {
            cert_pem: ca.cert_pem().to_string(),
            sealed_key: key.seal(ca_key_pem.as_bytes(), CA_KEY)?,
            algorithm: ALGORITHM.into(),
        };
        let tok_rec = StoredToken {
            sealed_token: key.seal(bootstrap_token.as_bytes(), TOKEN_KEY)?,
            algorithm: ALGORITHM.into(),
        };
        let out = store
            .txn(Txn {
                compares: vec![
                    Compare::Absent(CA_KEY.into()),
                    Compare::Absent(TOKEN_KEY.into()),
                ],
                ops: vec![
                    Op::Put {
                        key: CA_KEY.into(),
                        value: to_json(&ca_rec)?,
                    },
                    Op::Put {
                        key: TOKEN_KEY.into(),
                        value: to_json(&tok_rec)?,
                    },
                ],
            })
            .await?;
        match out {
            TxnOutcome::Committed(_) => {
                return Ok(Shared {
                    ca,
                    bootstrap_token,
                    created: true,
                })
            }
            // Another controller won the race: read theirs.
            TxnOutcome::CompareFailed { .. } => continue,
        }
    }
    Err(SecretsError::Malformed {
        what: "cluster CA",
        message: "it is half written (one of /cluster/ca, /cluster/bootstrap-token is missing)"
            .into(),
    })
}

async fn load(store: &dyn Store, key: &SealKey) -> Result<Option<Shared>, SecretsError> {
    let (Some(ca_kv), Some(tok_kv)) = (store.get(CA_KEY).await?, store.get(TOKEN_KEY).await?)
    else {
        return Ok(None);
    };
    let ca_rec: StoredCa =
        serde_json::from_slice(&ca_kv.value).map_err(|e| SecretsError::Malformed {
            what: "cluster CA",
            message: e.to_string(),
        })?;
    let tok_rec: StoredToken =
        serde_json::from_slice(&tok_kv.value).map_err(|e| SecretsError::Malformed {
            what: "bootstrap token",
            message: e.to_string(),
        })?;
    for (what, alg) in [
        ("cluster CA", &ca_rec.algorithm),
        ("bootstrap token", &tok_rec.algorithm),
    ] {
        if alg != ALGORITHM {
            return Err(SecretsError::Malformed {
                what,
                message: format!("unknown algorithm {alg:?}"),
            });
        }
    }
    let ca_key = key.open(&ca_rec.sealed_key, CA_KEY, "the cluster CA key")?;
    let token = key.open(&tok_rec.sealed_token, TOKEN_KEY, "the bootstrap token")?;
    let ca_key = String::from_utf8(ca_key).map_err(|_| SecretsError::Decrypt {
        what: "the cluster CA key",
    })?;
    let token = String::from_utf8(token).map_err(|_| SecretsError::Decrypt {
        what: "the bootstrap token",
    })?;
    Ok(Some(Shared {
        ca: ClusterCa::from_pem(&ca_rec.cert_pem, &ca_key)?,
        bootstrap_token: token,
        created: false,
    }))
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, SecretsError> {
    serde_json::to_vec(v).map_err(|e| SecretsError::Malformed {
        what: "record",
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn key(b: u8) -> SealKey {
        SealKey::from_bytes(&[b; 32]).unwrap()
    }

    #[tokio::test]
    async fn two_controllers_racing_share_one_ca_and_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let (k1, k2) = (key(7), key(7));
        let (a, b) = tokio::join!(
            load_or_create(&*store, &k1, None),
            load_or_create(&*store, &k2, None)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.ca.cert_pem(), b.ca.cert_pem());
        assert_eq!(a.bootstrap_token, b.bootstrap_token);
        assert!(a.created != b.created, "exactly one created them");
        // Only ciphertext is stored.
        let raw = store.get(CA_KEY).await.unwrap().unwrap().value;
        assert!(!String::from_utf8_lossy(&raw).contains("PRIVATE KEY"));
        let raw = store.get(TOKEN_KEY).await.unwrap().unwrap().value;
        assert!(!String::from_utf8_lossy(&raw).contains(&a.bootstrap_token));
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        load_or_create(&store, &key(1), Some("imb.0123456789abcdef"))
            .await
            .unwrap();
        let e = load_or_create(&store, &key(2), None)
            .await
            .err()
            .expect("wrong key fails");
        assert!(e.to_string().contains("--ca-key-file differs"), "{e}");
        let again = load_or_create(&store, &key(1), None).await.unwrap();
        assert_eq!(again.bootstrap_token, "imb.0123456789abcdef");
    }

    #[test]
    fn key_files_are_hex_or_raw() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(SealKey::from_file(&p).is_ok());
        std::fs::write(&p, [9u8; 32]).unwrap();
        assert!(SealKey::from_file(&p).is_ok());
        std::fs::write(&p, "short").unwrap();
        let e = SealKey::from_file(&p).err().unwrap();
        assert!(e.to_string().contains("32 bytes"), "{e}");
    }
}
