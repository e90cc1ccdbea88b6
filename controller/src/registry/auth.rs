//! Who is calling the registry, in the ways standard clients can say it.
//!
//! - An operator client certificate (skopeo `--cert-dir`, podman's
//!   `certs.d`), checked exactly as the gRPC API checks it
//!   ([`Operators::authenticate_der`]).
//! - A registry credential: `imctl registry login` asks the gRPC API for
//!   one (`CreateRegistryCredential`) and writes it into the containers
//!   `auth.json` as user `<operator>`, password `imrc.<id>.<secret>`. Only
//!   its SHA-256 is kept, under `/pki/registry-credentials/<operator>/<id>`,
//!   with an expiry, and it is bound to the operator record it was made
//!   for (a revoked operator's credentials die with the record).
//! - The registry token habit: a caller with neither gets
//!   `401` + `WWW-Authenticate: Bearer realm=".../token",service=...`; the
//!   token endpoint takes the credential as basic auth (or a certificate)
//!   and returns a short-lived bearer token (HMAC-signed with a key made at
//!   start; after a restart clients simply fetch a new one).
//!
//! Every request, whatever proves it, resolves to the operator's current
//! record and role; the role then decides (view pulls, edit pushes, admin
//! deletes), in `routes`.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::errors::{Code, RegistryError};
use crate::authz::{Caller, Operators};
use crate::store::{Compare, Op, Store, StoreError, Txn, TxnOutcome};
use crate::tokens::now_unix;

/// The `service` of the challenge and of tokens.
pub const SERVICE: &str = "ironmesh-registry";
/// Path of the token endpoint (the challenge's realm).
pub const TOKEN_PATH: &str = "/token";
/// Lifetime of a bearer token.
pub const TOKEN_TTL_SECS: i64 = 300;
/// Longest lifetime of a registry credential.
pub const MAX_CREDENTIAL_TTL_SECS: u64 = 365 * 24 * 3600;
const CREDENTIALS: &str = "/pki/registry-credentials/";
const PASSWORD_PREFIX: &str = "imrc.";
const TOKEN_PREFIX: &str = "imrt.";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CredentialRecord {
    operator: String,
    id: String,
    secret_sha256: String,
    created_unix: i64,
    expires_unix: i64,
    /// `created_unix` of the operator record it was made for.
    operator_created_unix: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct TokenClaims {
    sub: String,
    /// The operator record's `created_unix`.
    oc: i64,
    exp: i64,
}

/// A new credential, as `imctl registry login` writes it.
#[derive(Debug, Clone)]
pub struct NewCredential {
    pub username: String,
    pub password: String,
    pub expires_unix: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("operator {0} not found")]
    NoOperator(String),
    #[error("credential lifetime must be between 1s and 365 days")]
    BadTtl,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Operator(#[from] crate::authz::OperatorError),
}

/// Registry credentials and bearer tokens.
#[derive(Clone)]
pub struct RegistryAuth {
    store: Arc<dyn Store>,
    operators: Operators,
    token_key: Arc<ring::hmac::Key>,
}

fn hex_sha256(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl RegistryAuth {
    pub fn new(store: Arc<dyn Store>, operators: Operators) -> RegistryAuth {
        let key: [u8; 32] = rand::random();
        RegistryAuth {
            store,
            operators,
            token_key: Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key)),
        }
    }

    /// Makes a credential for `operator` valid `ttl_secs`.
    pub async fn create_credential(
        &self,
        operator: &str,
        ttl_secs: u64,
    ) -> Result<NewCredential, CredentialError> {
        if ttl_secs == 0 || ttl_secs > MAX_CREDENTIAL_TTL_SECS {
            return Err(CredentialError::BadTtl);
        }
        let record = self
            .operators
            .get(operator)
            .await?
            .ok_or_else(|| CredentialError::NoOperator(operator.to_string()))?;
        let id = hex::encode(rand::random::<[u8; 8]>());
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let now = now_unix();
        let expires_unix = now + ttl_secs as i64;
        let cred = CredentialRecord {
            operator: operator.to_string(),
            id: id.clone(),
            secret_sha256: hex_sha256(&secret),
            created_unix: now,
            expires_unix,
            operator_created_unix: record.created_unix,
        };
        let key = format!("{CREDENTIALS}{operator}/{id}");
        let value = serde_json::to_vec(&cred).unwrap_or_default();
        match self
            .store
            .txn(Txn {
                compares: vec![Compare::Absent(key.clone())],
                ops: vec![Op::Put { key, value }],
            })
            .await?
        {
            TxnOutcome::Committed(_) => {}
            TxnOutcome::CompareFailed { .. } => {
                return Err(CredentialError::Store(StoreError::Io(
                    "credential id collision; retry".into(),
                )))
            }
        }
        tracing::info!(operator, credential = %id, expires = %crate::tokens::unix_rfc3339(expires_unix), "registry credential created");
        Ok(NewCredential {
            username: operator.to_string(),
            password: format!("{PASSWORD_PREFIX}{id}.{secret}"),
            expires_unix,
        })
    }

    /// The operator behind `user:password`, if the credential is valid.
    async fn check_password(&self, user: &str, password: &str) -> Result<Caller, RegistryError> {
        let refused = || {
            RegistryError::new(
                Code::Unauthorized,
                format!("registry credential of {user:?} not accepted (unknown, expired or revoked); run imctl registry login"),
            )
        };
        let rest = password.strip_prefix(PASSWORD_PREFIX).ok_or_else(refused)?;
        let (id, secret) = rest.split_once('.').ok_or_else(refused)?;
        if !crate::authz::valid_operator_name(user)
            || id.is_empty()
            || !id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(refused());
        }
        let kv = self
            .store
            .get(&format!("{CREDENTIALS}{user}/{id}"))
            .await
            .map_err(unavailable)?
            .ok_or_else(refused)?;
        let cred: CredentialRecord = serde_json::from_slice(&kv.value).map_err(|_| refused())?;
        let matches: bool = hex_sha256(secret)
            .as_bytes()
            .ct_eq(cred.secret_sha256.as_bytes())
            .into();
        if !matches || cred.expires_unix <= now_unix() {
            return Err(refused());
        }
        self.current_operator(user, cred.operator_created_unix)
            .await?
            .ok_or_else(refused)
    }

    /// The operator `name` with its current role, if its record is the
    /// one (by creation time) a credential or token was made for.
    async fn current_operator(
        &self,
        name: &str,
        created_unix: i64,
    ) -> Result<Option<Caller>, RegistryError> {
        let record = self
            .operators
            .get(name)
            .await
            .map_err(|e| RegistryError::new(Code::Unavailable, e.to_string()))?;
        Ok(record
            .filter(|r| r.created_unix == created_unix)
            .map(|r| Caller {
                name: r.name,
                role: r.role,
            }))
    }

    /// A bearer token for `caller`.
    async fn issue_token(&self, caller: &Caller) -> Result<String, RegistryError> {
        let record = self
            .operators
            .get(&caller.name)
            .await
            .map_err(|e| RegistryError::new(Code::Unavailable, e.to_string()))?
            .ok_or_else(|| RegistryError::new(Code::Unauthorized, "operator not found"))?;
        let claims = TokenClaims {
            sub: caller.name.clone(),
            oc: record.created_unix,
            exp: now_unix() + TOKEN_TTL_SECS,
        };
        let payload = b64().encode(serde_json::to_vec(&claims).unwrap_or_default());
        let sig = ring::hmac::sign(&self.token_key, payload.as_bytes());
        Ok(format!(
            "{TOKEN_PREFIX}{payload}.{}",
            b64().encode(sig.as_ref())
        ))
    }

    async fn check_token(&self, token: &str) -> Result<Caller, RegistryError> {
        let refused = || {
            RegistryError::new(
                Code::Unauthorized,
                "bearer token not accepted (expired or from another controller start)",
            )
        };
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or_else(refused)?;
        let (payload, sig) = rest.split_once('.').ok_or_else(refused)?;
        let sig = b64().decode(sig).map_err(|_| refused())?;
        ring::hmac::verify(&self.token_key, payload.as_bytes(), &sig).map_err(|_| refused())?;
        let claims: TokenClaims = b64()
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(refused)?;
        if claims.exp <= now_unix() {
            return Err(refused());
        }
        self.current_operator(&claims.sub, claims.oc)
            .await?
            .ok_or_else(refused)
    }

    /// The caller of a request: bearer token, basic credential or client
    /// certificate, in that order; otherwise `401` with the challenge.
    pub async fn caller(
        &self,
        headers: &HeaderMap,
        peer_cert: Option<&[u8]>,
        challenge: impl FnOnce() -> String,
    ) -> Result<Caller, RegistryError> {
        let with_challenge = |mut e: RegistryError, challenge: String| {
            e.challenge = Some(challenge);
            e
        };
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Some(auth) = auth {
            let r = if let Some(t) = auth.strip_prefix("Bearer ") {
                self.check_token(t.trim()).await
            } else if let Some(b) = auth.strip_prefix("Basic ") {
                match basic(b) {
                    Some((u, p)) => self.check_password(&u, &p).await,
                    None => Err(RegistryError::new(
                        Code::Unauthorized,
                        "basic credentials do not decode",
                    )),
                }
            } else {
                Err(RegistryError::new(
                    Code::Unauthorized,
                    "unsupported Authorization scheme; use Bearer or Basic",
                ))
            };
            return r.map_err(|e| {
                if e.code == Code::Unauthorized {
                    with_challenge(e, challenge())
                } else {
                    e
                }
            });
        }
        if let Some(der) = peer_cert {
            return self.operators.authenticate_der(der).await.map_err(|s| {
                let code = if s.code() == tonic::Code::Unavailable {
                    Code::Unavailable
                } else {
                    Code::Denied
                };
                RegistryError::new(code, s.message().to_string())
            });
        }
        Err(with_challenge(
            RegistryError::new(
                Code::Unauthorized,
                "authentication required: an operator client certificate, or a token (imctl registry login)",
            ),
            challenge(),
        ))
    }

    /// The token endpoint's answer for a caller who proved itself with a
    /// basic credential or a certificate (a bearer token does not buy
    /// another).
    pub async fn token_response(
        &self,
        headers: &HeaderMap,
        peer_cert: Option<&[u8]>,
    ) -> Result<serde_json::Value, RegistryError> {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller =
            match auth {
                Some(a) if a.starts_with("Basic ") => {
                    let (u, p) = basic(&a["Basic ".len()..]).ok_or_else(|| {
                        RegistryError::new(Code::Unauthorized, "basic credentials do not decode")
                    })?;
                    self.check_password(&u, &p).await?
                }
                Some(_) => {
                    return Err(RegistryError::new(
                        Code::Unauthorized,
                        "the token endpoint takes basic credentials or a client certificate",
                    ))
                }
                None => match peer_cert {
                    Some(der) => self.operators.authenticate_der(der).await.map_err(|s| {
                        RegistryError::new(Code::Unauthorized, s.message().to_string())
                    })?,
                    None => {
                        return Err(RegistryError::new(
                            Code::Unauthorized,
                            "credentials required (imctl registry login)",
                        ))
                    }
                },
            };
        let token = self.issue_token(&caller).await?;
        tracing::debug!(operator = %caller.name, role = %caller.role, "registry token issued");
        Ok(serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_TTL_SECS,
            "issued_at": crate::tokens::unix_rfc3339(now_unix()),
        }))
    }
}

fn unavailable(e: StoreError) -> RegistryError {
    RegistryError::new(
        Code::Unavailable,
        format!("cannot check the credential: {e}"),
    )
}

/// `user:password` of a basic Authorization value.
fn basic(b64_value: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64_value.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Role;
    use crate::pki::{ClusterCa, Identity};
    use crate::revocation::Revocations;
    use crate::store::embedded::EmbeddedStore;

    async fn fixture() -> (tempfile::TempDir, RegistryAuth, Operators) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let (ca, _) = ClusterCa::generate().unwrap();
        let rev = Revocations::start(store.clone()).await.unwrap();
        let ops = Operators::new(store.clone(), rev, Arc::new(ca));
        (dir, RegistryAuth::new(store, ops.clone()), ops)
    }

    fn basic_header(user: &str, password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        h.insert(header::AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    #[tokio::test]
    async fn credential_buys_a_token_that_carries_the_current_role() {
        let (_d, auth, ops) = fixture().await;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "operator:ed");
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        ops.create("ed", "edit", &csr, "admin").await.unwrap();
        let _ = Identity::Controller;

        let cred = auth.create_credential("ed", 3600).await.unwrap();
        assert!(auth.create_credential("nobody", 3600).await.is_err());
        let resp = auth
            .token_response(&basic_header(&cred.username, &cred.password), None)
            .await
            .unwrap();
        let token = resp["token"].as_str().unwrap().to_string();
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let caller = auth.caller(&h, None, || "c".into()).await.unwrap();
        assert_eq!((caller.name.as_str(), caller.role), ("ed", Role::Edit));

        // A wrong secret, a forged token, nothing at all: 401 + challenge.
        let bad = auth
            .token_response(&basic_header("ed", &format!("{}x", cred.password)), None)
            .await
            .unwrap_err();
        assert_eq!(bad.code, Code::Unauthorized);
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}x").parse().unwrap(),
        );
        let e = auth.caller(&h, None, || "chal".into()).await.unwrap_err();
        assert_eq!(
            (e.code, e.challenge.as_deref()),
            (Code::Unauthorized, Some("chal"))
        );
        let e = auth
            .caller(&HeaderMap::new(), None, || "chal".into())
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::Unauthorized);

        // Revoking the operator kills the credential.
        ops.revoke("ed", "admin").await.unwrap();
        assert!(auth
            .token_response(&basic_header(&cred.username, &cred.password), None)
            .await
            .is_err());
    }
}
