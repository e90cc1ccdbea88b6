//! Join tokens as managed objects: what an agent presents to `Join`.
//!
//! A token is `imt.<id>.<secret>`; the store keeps only its SHA-256 under
//! `/tokens/<id>`, with its expiry, how many joins it allows and has
//! allowed, the node it is bound to (if any) and who made it. A token given
//! to the controller from outside (`--bootstrap-token`, or one from before
//! tokens were objects) has any shape; its id is derived from its hash.
//!
//! This module owns the records and the decision whether a token admits a
//! join; it does not sign certificates or know about Nodes ([`crate::join`]
//! does). Every check compares hashes in constant time, and a failed check
//! says only as much as a holder of the token may know: an unknown token
//! and a wrong secret are the same error.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::store::{Compare, KeyValue, Op, Store, StoreError, Txn, TxnOutcome};

/// Store prefix of token records.
pub const PREFIX: &str = "/tokens/";
/// Markers of bootstrap tokens once recorded, so that a bootstrap token an
/// operator deleted (or that expired) is not recreated at the next start.
const ISSUED_PREFIX: &str = "/tokens-issued/";
/// One key per join made with a token (`<id>/<node>`): the use count of an
/// unlimited token, kept apart from its record so that many nodes joining
/// at once with one token never contend on it.
const USED_PREFIX: &str = "/tokens-used/";
/// Longest lifetime a token may have.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most tokens kept at once (expired ones count until they are swept).
pub const MAX_TOKENS: usize = 10_000;
/// Expired tokens stay listed this long, then are swept.
const EXPIRED_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
const CAS_RETRIES: usize = 16;

/// One token as stored (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the whole token, hex.
    pub sha256: String,
    #[serde(default)]
    pub description: String,
    /// Only this node may join with it (and may re-provision it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Joins allowed; 0 is unlimited.
    #[serde(default)]
    pub uses: u32,
    #[serde(default)]
    pub used: u32,
    /// Unix seconds.
    pub expires_unix: i64,
    pub created_unix: i64,
    #[serde(default)]
    pub created_by: String,
}

impl TokenRecord {
    pub fn expired_at(&self, now: i64) -> bool {
        now >= self.expires_unix
    }

    pub fn used_up(&self) -> bool {
        self.uses > 0 && self.used >= self.uses
    }
}

/// What a new token is for.
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    /// None: the controller's default.
    pub ttl: Option<Duration>,
    /// 0: unlimited (1 when bound to a node).
    pub uses: u32,
    pub node: Option<String>,
    pub description: String,
    pub created_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unknown id or wrong secret: indistinguishable on purpose.
    #[error("bootstrap token is not valid (no such join token, or a wrong secret)")]
    NotValid,
    #[error(
        "join token {id} expired at {at}; ask an administrator for a new one (imctl token create)"
    )]
    Expired { id: String, at: String },
    #[error("join token {id} is used up ({uses} of {uses} joins); ask an administrator for a new one (imctl token create)")]
    UsedUp { id: String, uses: u32 },
    #[error("join token {id} is bound to node {bound:?} and cannot join node {asked:?}")]
    WrongNode {
        id: String,
        bound: String,
        asked: String,
    },
    #[error("join token {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("too many join tokens ({0}); delete unused ones (imctl token ls, imctl token delete)")]
    TooMany(usize),
    #[error("join token {id} is stored in a form that does not decode: {message}")]
    Corrupt { id: String, message: String },
    #[error("join token {0} is being changed by others; try again")]
    Contended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A token that admits a join, with what is needed to use it up in the
/// same transaction as the join's other writes.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub record: TokenRecord,
    mod_revision: u64,
}

impl Admitted {
    /// The compares and puts that count one use of the token by `node`;
    /// they fail the transaction if the token changed (was deleted, or a
    /// limited token was used) since it was checked. An unlimited token's
    /// record is not written, so concurrent joins with it do not conflict.
    pub fn use_ops(&self, node: &str) -> (Vec<Compare>, Vec<Op>) {
        let key = key(&self.record.id);
        let mut ops = vec![Op::Put {
            key: format!("{USED_PREFIX}{}/{node}", self.record.id),
            value: now_unix().to_string().into_bytes(),
        }];
        if self.record.uses > 0 {
            let mut next = self.record.clone();
            next.used = next.used.saturating_add(1);
            ops.push(Op::Put {
                key: key.clone(),
                value: encode(&next),
            });
        }
        (vec![Compare::ModRevision(key, self.mod_revision)], ops)
    }
}

/// The tokens in one store.
#[derive(Clone)]
pub struct JoinTokens {
    store: Arc<dyn Store>,
    default_ttl: Duration,
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

fn encode(r: &TokenRecord) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

fn decode(kv: &KeyValue) -> Result<TokenRecord, TokenError> {
    serde_json::from_slice(&kv.value).map_err(|e| TokenError::Corrupt {
        id: kv.key.trim_start_matches(PREFIX).to_string(),
        message: e.to_string(),
    })
}

/// Now, Unix seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RFC 3339 of Unix seconds, for messages.
pub fn unix_rfc3339(t: i64) -> String {
    crate::resources::rfc3339(UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
}

/// SHA-256 of a token, hex.
pub fn hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The id of a token: the `<id>` of `imt.<id>.<secret>`, or for a token
/// of any other shape the first 16 hex digits of its hash.
pub fn id_of(token: &str) -> String {
    if let Some(rest) = token.strip_prefix("imt.") {
        if let Some((id, secret)) = rest.split_once('.') {
            if id.len() == 16
                && id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                && !secret.is_empty()
            {
                return id.to_string();
            }
        }
    }
    hash(token)[..16].to_string()
}

/// A fresh random token, `imt.<16 hex>.<48 hex>`.
pub fn generate() -> String {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 24];
    rand::Rng::fill(&mut rand::rng(), &mut id[..]);
    rand::Rng::fill(&mut rand::rng(), &mut secret[..]);
    format!("imt.{}.{}", hex::encode(id), hex::encode(secret))
}

impl JoinTokens {
    pub fn new(store: Arc<dyn Store>, default_ttl: Duration) -> JoinTokens {
        JoinTokens { store, default_ttl }
    }

    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// Makes a new token; returns the secret (shown once) and its record.
    pub async fn create(&self, spec: NewToken) -> Result<(String, TokenRecord), TokenError> {
        let ttl = spec.ttl.unwrap_or(self.default_ttl);
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::Invalid(format!(
                "a join token's ttl must be between 1s and {} (got {})",
                humantime::format_duration(MAX_TTL),
                humantime::format_duration(ttl)
            )));
        }
        if let Some(n) = &spec.node {
            if !crate::node_api::valid_node_name(n) {
                return Err(TokenError::Invalid(format!(
                    "node {n:?} is not a valid node name: use 1-63 lowercase letters, digits and '-'"
                )));
            }
        }
        if spec.description.len() > 256 {
            return Err(TokenError::Invalid(
                "a token's description may be at most 256 bytes".into(),
            ));
        }
        let (existing, _) = self.store.list(PREFIX).await?;
        self.sweep(&existing).await;
        if existing.len() >= MAX_TOKENS {
            return Err(TokenError::TooMany(existing.len()));
        }
        let token = generate();
        let now = now_unix();
        let record = TokenRecord {
            id: id_of(&token),
            sha256: hash(&token),
            description: spec.description,
            uses: if spec.uses == 0 && spec.node.is_some() {
                1
            } else {
                spec.uses
            },
            node: spec.node,
            used: 0,
            expires_unix: now.saturating_add(ttl.as_secs() as i64),
            created_unix: now,
            created_by: spec.created_by,
        };
        let k = key(&record.id);
        match self
            .store
            .txn(Txn {
                compares: vec![Compare::Absent(k.clone())],
                ops: vec![Op::Put {
                    key: k,
                    value: encode(&record),
                }],
            })
            .await?
        {
            TxnOutcome::Committed(_) => Ok((token, record)),
            // 64 random bits collided: vanishingly rare, never silent.
            TxnOutcome::CompareFailed { .. } => Err(TokenError::Contended(record.id)),
        }
    }

    /// Records a token that came from outside (the first token written at
    /// first start, or `--bootstrap-token`) unless it was recorded before:
    /// a bootstrap token that an operator deleted, or that expired and was
    /// swept, is never brought back by a restart. Returns the record when
    /// it was created now.
    pub async fn ensure_bootstrap(
        &self,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<TokenRecord>, TokenError> {
        let id = id_of(token);
        let now = now_unix();
        let record = TokenRecord {
            id: id.clone(),
            sha256: hash(token),
            description: "bootstrap token (created at first start)".into(),
            node: None,
            uses: 0,
            used: 0,
            expires_unix: now.saturating_add(ttl.min(MAX_TTL).as_secs() as i64),
            created_unix: now,
            created_by: "controller".into(),
        };
        let marker = format!("{ISSUED_PREFIX}{id}");
        let out = self
            .store
            .txn(Txn {
                compares: vec![Compare::Absent(marker.clone()), Compare::Absent(key(&id))],
                ops: vec![
                    Op::Put {
                        key: marker,
                        value: now.to_string().into_bytes(),
                    },
                    Op::Put {
                        key: key(&id),
                        value: encode(&record),
                    },
                ],
            })
            .await?;
        Ok(matches!(out, TxnOutcome::Committed(_)).then_some(record))
    }

    /// The record of a token id.
    pub async fn get(&self, id: &str) -> Result<Option<TokenRecord>, TokenError> {
        match self.store.get(&key(id)).await? {
            Some(kv) => decode(&kv).map(Some),
            None => Ok(None),
        }
    }

    /// Every token, oldest first.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let (kvs, _) = self.store.list(PREFIX).await?;
        self.sweep(&kvs).await;
        let (used, _) = self.store.list(USED_PREFIX).await?;
        let mut joins: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        for kv in &used {
            if let Some((id, _)) = kv.key.trim_start_matches(USED_PREFIX).split_once('/') {
                *joins.entry(id).or_default() += 1;
            }
        }
        let now = now_unix();
        let mut out: Vec<TokenRecord> = kvs
            .iter()
            .filter_map(|kv| decode(kv).ok())
            .filter(|r| now < r.expires_unix.saturating_add(EXPIRED_KEPT.as_secs() as i64))
            .map(|mut r| {
                if r.uses == 0 {
                    r.used = joins.get(r.id.as_str()).copied().unwrap_or(0);
                }
                r
            })
            .collect();
        out.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(out)
    }

    /// Deletes a token by id; joins with it are refused from now on.
    pub async fn delete(&self, id: &str) -> Result<(), TokenError> {
        let k = key(id);
        if self.store.get(&k).await?.is_none() {
            return Err(TokenError::NotFound(id.to_string()));
        }
        self.store
            .txn(Txn {
                compares: Vec::new(),
                ops: vec![Op::Delete { key: k }],
            })
            .await?;
        self.forget_uses(id).await;
        Ok(())
    }

    /// Deletes the use markers of a token that is gone. Best effort.
    async fn forget_uses(&self, id: &str) {
        let Ok((kvs, _)) = self.store.list(&format!("{USED_PREFIX}{id}/")).await else {
            return;
        };
        for chunk in kvs.chunks(crate::resources::BATCH) {
            let ops = chunk
                .iter()
                .map(|kv| Op::Delete {
                    key: kv.key.clone(),
                })
                .collect();
            if let Err(e) = self
                .store
                .txn(Txn {
                    compares: Vec::new(),
                    ops,
                })
                .await
            {
                tracing::warn!(token = id, error = %e, "cannot forget a deleted token's uses");
                return;
            }
        }
    }

    /// Whether `token` admits a join of `node`. Nothing is written: the
    /// caller counts the use with [`Admitted::use_ops`] in the join's
    /// transaction.
    pub async fn admit(&self, token: &str, node: &str) -> Result<Admitted, TokenError> {
        let id = id_of(token);
        let Some(kv) = self.store.get(&key(&id)).await? else {
            return Err(TokenError::NotValid);
        };
        let record = decode(&kv)?;
        let ok: bool = hash(token)
            .as_bytes()
            .ct_eq(record.sha256.as_bytes())
            .into();
        if !ok {
            return Err(TokenError::NotValid);
        }
        if record.expired_at(now_unix()) {
            return Err(TokenError::Expired {
                id,
                at: unix_rfc3339(record.expires_unix),
            });
        }
        if record.used_up() {
            return Err(TokenError::UsedUp {
                id,
                uses: record.uses,
            });
        }
        if let Some(bound) = &record.node {
            if bound != node {
                return Err(TokenError::WrongNode {
                    id,
                    bound: bound.clone(),
                    asked: node.to_string(),
                });
            }
        }
        Ok(Admitted {
            record,
            mod_revision: kv.mod_revision,
        })
    }

    /// Deletes tokens that expired more than a week ago. Best effort: a
    /// failure leaves them for the next sweep.
    async fn sweep(&self, kvs: &[KeyValue]) {
        let cutoff = now_unix() - EXPIRED_KEPT.as_secs() as i64;
        let gone: Vec<(String, String)> = kvs
            .iter()
            .filter_map(|kv| decode(kv).ok().map(|r| (kv.key.clone(), r)))
            .filter(|(_, r)| r.expires_unix < cutoff)
            .take(crate::resources::BATCH)
            .map(|(k, r)| (k, r.id))
            .collect();
        if gone.is_empty() {
            return;
        }
        let ops: Vec<Op> = gone
            .iter()
            .map(|(k, _)| Op::Delete { key: k.clone() })
            .collect();
        for (_, id) in &gone {
            self.forget_uses(id).await;
        }
        let n = ops.len();
        match self
            .store
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await
        {
            Ok(_) => tracing::info!(tokens = n, "swept long-expired join tokens"),
            Err(e) => tracing::warn!(error = %e, "cannot sweep expired join tokens"),
        }
    }
}

/// Retries of a join's transaction when the token or credential changed
/// underneath.
pub const JOIN_RETRIES: usize = CAS_RETRIES;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn tokens() -> (tempfile::TempDir, JoinTokens) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        (
            dir,
            JoinTokens::new(Arc::new(store), Duration::from_secs(3600)),
        )
    }

    async fn use_once(t: &JoinTokens, a: &Admitted, node: &str) -> TxnOutcome {
        let (compares, ops) = a.use_ops(node);
        t.store.txn(Txn { compares, ops }).await.unwrap()
    }

    #[test]
    fn ids_come_from_the_token_or_its_hash() {
        let t = generate();
        assert!(t.starts_with("imt.") && t.len() == 4 + 16 + 1 + 48, "{t}");
        assert_eq!(id_of(&t), &t[4..20]);
        let legacy = "imb.0123456789abcdef0123";
        assert_eq!(id_of(legacy), hash(legacy)[..16]);
        // A forged id cannot carry an upper-case or short id.
        assert_eq!(id_of("imt.ABC.x"), hash("imt.ABC.x")[..16]);
    }

    #[tokio::test]
    async fn created_token_admits_and_is_stored_hashed() {
        let (_d, t) = tokens();
        let (secret, rec) = t
            .create(NewToken {
                description: "rack 4".into(),
                ..NewToken::default()
            })
            .await
            .unwrap();
        let raw = t.store.get(&key(&rec.id)).await.unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&raw.value).contains(&secret[21..]));
        let a = t.admit(&secret, "n1").await.unwrap();
        assert_eq!(a.record.description, "rack 4");
        // Same id, other secret: not valid, and not told which part is wrong.
        let forged = format!("{}.{}", &secret[..20], "0".repeat(48));
        assert!(matches!(
            t.admit(&forged, "n1").await,
            Err(TokenError::NotValid)
        ));
        assert!(matches!(
            t.admit("imt.nothing", "n1").await,
            Err(TokenError::NotValid)
        ));
    }

    #[tokio::test]
    async fn used_up_token_is_refused_with_its_count() {
        let (_d, t) = tokens();
        let (secret, _) = t
            .create(NewToken {
                uses: 2,
                ..NewToken::default()
            })
            .await
            .unwrap();
        for n in ["n1", "n2"] {
            let a = t.admit(&secret, n).await.unwrap();
            assert!(matches!(
                use_once(&t, &a, n).await,
                TxnOutcome::Committed(_)
            ));
        }
        let err = t.admit(&secret, "n").await.unwrap_err();
        assert!(matches!(err, TokenError::UsedUp { uses: 2, .. }), "{err}");
        assert!(err.to_string().contains("2 of 2"), "{err}");
    }

    #[tokio::test]
    async fn a_use_counted_twice_from_one_check_fails_the_second_txn() {
        let (_d, t) = tokens();
        let (secret, _) = t
            .create(NewToken {
                uses: 1,
                ..NewToken::default()
            })
            .await
            .unwrap();
        let a = t.admit(&secret, "a").await.unwrap();
        let b = t.admit(&secret, "b").await.unwrap();
        assert!(matches!(
            use_once(&t, &a, "a").await,
            TxnOutcome::Committed(_)
        ));
        assert!(matches!(
            use_once(&t, &b, "b").await,
            TxnOutcome::CompareFailed { .. }
        ));
    }

    #[tokio::test]
    async fn unlimited_token_counts_joins_without_conflicts() {
        let (_d, t) = tokens();
        let (secret, rec) = t.create(NewToken::default()).await.unwrap();
        // Checked at once, used one after the other: none conflicts.
        let admitted: Vec<_> = futures::future::join_all((0..5).map(|i| {
            let (t, secret) = (t.clone(), secret.clone());
            async move { t.admit(&secret, &format!("n{i}")).await.unwrap() }
        }))
        .await;
        for (i, a) in admitted.iter().enumerate() {
            assert!(matches!(
                use_once(&t, a, &format!("n{i}")).await,
                TxnOutcome::Committed(_)
            ));
        }
        let listed = t.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].used, 5);
        // Deleting the token makes a checked-but-unused admission fail.
        let late = t.admit(&secret, "late").await.unwrap();
        t.delete(&rec.id).await.unwrap();
        assert!(matches!(
            use_once(&t, &late, "late").await,
            TxnOutcome::CompareFailed { .. }
        ));
        assert!(t.store.list(USED_PREFIX).await.unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn expired_token_is_refused_with_when() {
        let (_d, t) = tokens();
        let (secret, rec) = t.create(NewToken::default()).await.unwrap();
        let mut old = rec.clone();
        old.expires_unix = now_unix() - 10;
        t.store
            .txn(Txn {
                compares: Vec::new(),
                ops: vec![Op::Put {
                    key: key(&rec.id),
                    value: encode(&old),
                }],
            })
            .await
            .unwrap();
        let err = t.admit(&secret, "n").await.unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired at"), "{err}");
    }

    #[tokio::test]
    async fn node_bound_token_joins_only_that_node_once() {
        let (_d, t) = tokens();
        let (secret, rec) = t
            .create(NewToken {
                node: Some("vm".into()),
                ..NewToken::default()
            })
            .await
            .unwrap();
        assert_eq!(rec.uses, 1);
        let err = t.admit(&secret, "other").await.unwrap_err();
        assert!(matches!(err, TokenError::WrongNode { .. }), "{err}");
        t.admit(&secret, "vm").await.unwrap();
        assert!(t
            .create(NewToken {
                node: Some("Not A Name".into()),
                ..NewToken::default()
            })
            .await
            .is_err());
        assert!(t
            .create(NewToken {
                ttl: Some(MAX_TTL * 2),
                ..NewToken::default()
            })
            .await
            .is_err());
    }

    #[tokio::test]
    async fn bootstrap_token_is_recorded_once_and_never_resurrected() {
        let (_d, t) = tokens();
        let tok = "imb.0123456789abcdef0123456789";
        assert!(t
            .ensure_bootstrap(tok, Duration::from_secs(60))
            .await
            .unwrap()
            .is_some());
        assert!(t
            .ensure_bootstrap(tok, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none());
        t.admit(tok, "n").await.unwrap();
        t.delete(&id_of(tok)).await.unwrap();
        assert!(t
            .ensure_bootstrap(tok, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none());
        assert!(matches!(t.admit(tok, "n").await, Err(TokenError::NotValid)));
        assert!(matches!(
            t.delete(&id_of(tok)).await,
            Err(TokenError::NotFound(_))
        ));
    }
}
