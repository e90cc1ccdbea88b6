//! Which certificates still speak for their identity: each node's current
//! certificate and the list of revoked serials.
//!
//! Keys:
//! - `/pki/nodes/<name>`: the node's current certificate (serial, expiry,
//!   fingerprint), written by [`crate::join`] in the join's transaction.
//!   Only the current certificate may `Sync`; a take-over of the name needs
//!   the Node deleted first or a token bound to it.
//! - `/pki/revoked/<serial>` (or `fp:<fingerprint>` for a certificate from
//!   before serials were recorded): revoked until the certificate's own
//!   expiry, then swept. Deleting a Node or an operator revokes what it
//!   held; a re-provisioned node's old certificate is revoked at the join.
//!
//! TLS verifies the chain to the cluster CA; this module answers the
//! question TLS cannot: is this still the certificate of that identity.
//! Checks read the store (one get), so a revocation committed on any
//! controller holds everywhere at once; a watch of the revoked prefix
//! wakes long-lived streams so that they end when their certificate is
//! revoked.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::pki::CertInfo;
use crate::store::{Compare, EventKind, KeyValue, Op, Store, StoreError, Txn, TxnOutcome};
use crate::tokens::{now_unix, unix_rfc3339};

pub const NODE_CERTS: &str = "/pki/nodes/";
pub const REVOKED: &str = "/pki/revoked/";
/// How often expired revocations are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Pause before watching again after the watch failed.
const RETRY: Duration = Duration::from_millis(500);

/// A node's current certificate, and the one it renewed (valid until its
/// own expiry, so that connections made before the renewal keep working).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCert {
    pub serial: String,
    pub not_after: i64,
    pub fingerprint: String,
    pub issued_unix: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousCert>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousCert {
    pub serial: String,
    pub not_after: i64,
}

impl NodeCert {
    pub fn of(info: &CertInfo) -> NodeCert {
        NodeCert {
            serial: info.serial.clone(),
            not_after: info.not_after,
            fingerprint: info.fingerprint.clone(),
            issued_unix: now_unix(),
            previous: None,
        }
    }

    /// Whether `serial` may speak for the node now: the current
    /// certificate, or the renewed one until it expires.
    pub fn accepts(&self, serial: &str, now: i64) -> bool {
        self.serial == serial
            || self
                .previous
                .as_ref()
                .is_some_and(|p| p.serial == serial && p.not_after > now)
    }

    /// The puts that revoke everything this record still accepts.
    pub fn revoke_ops(&self, identity: &str, reason: &str) -> Vec<Op> {
        let mut ops = vec![revoke_op(&self.serial, identity, self.not_after, reason)];
        if let Some(p) = &self.previous {
            if p.not_after > now_unix() {
                ops.push(revoke_op(&p.serial, identity, p.not_after, reason));
            }
        }
        ops
    }
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    /// `node:<name>` or `operator:<name>`.
    pub identity: String,
    pub not_after: i64,
    pub revoked_unix: i64,
    pub reason: String,
}

impl Revoked {
    /// One sentence for an error message.
    pub fn describe(&self) -> String {
        format!(
            "the certificate of {} was revoked at {} ({})",
            self.identity,
            unix_rfc3339(self.revoked_unix),
            self.reason
        )
    }
}

pub fn node_key(node: &str) -> String {
    format!("{NODE_CERTS}{node}")
}

pub fn revoked_key(serial: &str) -> String {
    format!("{REVOKED}{serial}")
}

fn fingerprint_key(fp: &str) -> String {
    format!("{REVOKED}fp:{fp}")
}

/// The put that revokes `serial` until `not_after`.
pub fn revoke_op(serial: &str, identity: &str, not_after: i64, reason: &str) -> Op {
    let r = Revoked {
        identity: identity.to_string(),
        not_after,
        revoked_unix: now_unix(),
        reason: reason.to_string(),
    };
    Op::Put {
        key: revoked_key(serial),
        value: serde_json::to_vec(&r).unwrap_or_default(),
    }
}

pub fn encode_node_cert(c: &NodeCert) -> Vec<u8> {
    serde_json::to_vec(c).unwrap_or_default()
}

pub fn decode_node_cert(kv: &KeyValue) -> Option<NodeCert> {
    serde_json::from_slice(&kv.value).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum CertCheckError {
    #[error("{}; join again with a new token (imctl token create)", .0.describe())]
    Revoked(Revoked),
    #[error("certificate {serial} is not the current certificate of node {node} (it was re-provisioned at {since}); join again with a new token")]
    NotCurrent {
        node: String,
        serial: String,
        since: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The revocation list of one store, with a watch-fed copy that wakes
/// streams when something is revoked.
#[derive(Clone)]
pub struct Revocations {
    store: Arc<dyn Store>,
    revoked: Arc<RwLock<HashSet<String>>>,
    changed: watch::Sender<u64>,
}

impl Revocations {
    /// Loads the list and follows the store's changes to it until the
    /// store closes; sweeps expired entries every ten minutes.
    pub async fn start(store: Arc<dyn Store>) -> Result<Revocations, StoreError> {
        let (changed, _) = watch::channel(0);
        let r = Revocations {
            store,
            revoked: Arc::new(RwLock::new(HashSet::new())),
            changed,
        };
        let after = r.reload().await?;
        tokio::spawn(r.clone().follow(after));
        Ok(r)
    }

    async fn reload(&self) -> Result<u64, StoreError> {
        let (kvs, rev) = self.store.list(REVOKED).await?;
        let set: HashSet<String> = kvs
            .iter()
            .map(|kv| kv.key.trim_start_matches(REVOKED).to_string())
            .collect();
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = set;
        self.changed.send_modify(|g| *g += 1);
        Ok(rev)
    }

    async fn follow(self, mut after: u64) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            let mut events = match self.store.watch(REVOKED, after).await {
                Ok(e) => e,
                Err(StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation watch failed; listing again");
                    tokio::time::sleep(RETRY).await;
                    match self.reload().await {
                        Ok(rev) => after = rev,
                        Err(StoreError::Closed) => return,
                        Err(_) => {}
                    }
                    continue;
                }
            };
            loop {
                tokio::select! {
                    _ = sweep.tick() => self.sweep().await,
                    ev = events.next() => match ev {
                        Some(Ok(ev)) => {
                            after = ev.revision;
                            let serial = ev.kv.key.trim_start_matches(REVOKED).to_string();
                            {
                                let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
                                match ev.kind {
                                    EventKind::Put => set.insert(serial),
                                    EventKind::Delete => set.remove(&serial),
                                };
                            }
                            self.changed.send_modify(|g| *g += 1);
                        }
                        Some(Err(StoreError::Closed)) | None => return,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "revocation watch ended; listing again");
                            tokio::time::sleep(RETRY).await;
                            match self.reload().await {
                                Ok(rev) => after = rev,
                                Err(StoreError::Closed) => return,
                                Err(_) => {}
                            }
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Drops revocations of certificates that have expired anyway (TLS
    /// refuses those). Best effort.
    async fn sweep(&self) {
        let Ok((kvs, _)) = self.store.list(REVOKED).await else {
            return;
        };
        let now = now_unix();
        let ops: Vec<Op> = kvs
            .iter()
            .filter(|kv| {
                serde_json::from_slice::<Revoked>(&kv.value).is_ok_and(|r| r.not_after < now)
            })
            .take(crate::resources::BATCH)
            .map(|kv| Op::Delete {
                key: kv.key.clone(),
            })
            .collect();
        if ops.is_empty() {
            return;
        }
        let n = ops.len();
        if let Err(e) = self
            .store
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await
        {
            tracing::warn!(error = %e, "cannot sweep expired revocations");
        } else {
            tracing::info!(entries = n, "swept revocations of expired certificates");
        }
    }

    /// Wakes whenever the revocation list changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// From the watch-fed copy (for streams already admitted).
    pub fn is_revoked_cached(&self, serial: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    /// From the store: the revocation of `serial`, if it is revoked.
    pub async fn revoked(&self, serial: &str) -> Result<Option<Revoked>, StoreError> {
        Ok(self
            .store
            .get(&revoked_key(serial))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    /// Whether `info` (a node certificate of `node`) may speak for the
    /// node now: not revoked, and the node's current certificate. A node
    /// certificate from before certificates were recorded is adopted as
    /// current (unless its fingerprint was revoked).
    pub async fn check_node(&self, node: &str, info: &CertInfo) -> Result<(), CertCheckError> {
        if let Some(r) = self.revoked(&info.serial).await? {
            return Err(CertCheckError::Revoked(r));
        }
        for _ in 0..crate::tokens::JOIN_RETRIES {
            let k = node_key(node);
            match self.store.get(&k).await? {
                Some(kv) => {
                    let cur = decode_node_cert(&kv);
                    return match cur {
                        Some(c) if c.accepts(&info.serial, now_unix()) => Ok(()),
                        Some(c) => Err(CertCheckError::NotCurrent {
                            node: node.to_string(),
                            serial: info.serial.clone(),
                            since: unix_rfc3339(c.issued_unix),
                        }),
                        // An unreadable record is replaced by this one.
                        None => self.adopt(node, info, Some(kv.mod_revision)).await,
                    };
                }
                None => {
                    let fp = fingerprint_key(&info.fingerprint);
                    if let Some(kv) = self.store.get(&fp).await? {
                        if let Ok(r) = serde_json::from_slice::<Revoked>(&kv.value) {
                            return Err(CertCheckError::Revoked(r));
                        }
                    }
                    match self.adopt(node, info, None).await {
                        Err(CertCheckError::NotCurrent { .. }) => continue,
                        other => return other,
                    }
                }
            }
        }
        Err(CertCheckError::Store(StoreError::Io(format!(
            "the certificate record of node {node} keeps changing"
        ))))
    }

    async fn adopt(
        &self,
        node: &str,
        info: &CertInfo,
        replacing: Option<u64>,
    ) -> Result<(), CertCheckError> {
        let k = node_key(node);
        let compare = match replacing {
            Some(rev) => Compare::ModRevision(k.clone(), rev),
            None => Compare::Absent(k.clone()),
        };
        let out = self
            .store
            .txn(Txn {
                compares: vec![compare],
                ops: vec![Op::Put {
                    key: k,
                    value: encode_node_cert(&NodeCert::of(info)),
                }],
            })
            .await?;
        match out {
            TxnOutcome::Committed(_) => {
                tracing::info!(node, serial = %info.serial, "recorded the node's certificate as current");
                Ok(())
            }
            // Someone recorded another certificate meanwhile: read again.
            TxnOutcome::CompareFailed { .. } => Err(CertCheckError::NotCurrent {
                node: node.to_string(),
                serial: info.serial.clone(),
                since: String::new(),
            }),
        }
    }

    /// Records `next` as the node's current certificate in place of `cur`,
    /// which must be the current one (a renewal by its holder); `cur`
    /// stays valid until it expires. Refused when `cur` is not current.
    pub async fn renew(
        &self,
        node: &str,
        cur: &CertInfo,
        next: &CertInfo,
    ) -> Result<NodeCert, CertCheckError> {
        let k = node_key(node);
        let Some(kv) = self.store.get(&k).await? else {
            return Err(CertCheckError::NotCurrent {
                node: node.to_string(),
                serial: cur.serial.clone(),
                since: String::new(),
            });
        };
        let old = decode_node_cert(&kv);
        if old.as_ref().map(|c| c.serial.as_str()) != Some(cur.serial.as_str()) {
            return Err(CertCheckError::NotCurrent {
                node: node.to_string(),
                serial: cur.serial.clone(),
                since: old.map(|c| unix_rfc3339(c.issued_unix)).unwrap_or_default(),
            });
        }
        let mut rec = NodeCert::of(next);
        rec.previous = Some(PreviousCert {
            serial: cur.serial.clone(),
            not_after: cur.not_after,
        });
        let out = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(k.clone(), kv.mod_revision)],
                ops: vec![Op::Put {
                    key: k,
                    value: encode_node_cert(&rec),
                }],
            })
            .await?;
        match out {
            TxnOutcome::Committed(_) => Ok(rec),
            // A concurrent renewal or delete won: this one is not current.
            TxnOutcome::CompareFailed { .. } => Err(CertCheckError::NotCurrent {
                node: node.to_string(),
                serial: cur.serial.clone(),
                since: String::new(),
            }),
        }
    }

    /// Revokes the current certificate of `node` and forgets it, so the
    /// name is free for a new join. `fingerprint` (from the Node's status)
    /// is revoked instead when no certificate was recorded. Returns what
    /// was revoked (serials, or `fp:` entries).
    pub async fn revoke_node(
        &self,
        node: &str,
        fingerprint: Option<&str>,
        reason: &str,
    ) -> Result<Vec<String>, StoreError> {
        let identity = format!("node:{node}");
        let k = node_key(node);
        for _ in 0..crate::tokens::JOIN_RETRIES {
            let cur = self.store.get(&k).await?;
            let (compare, ops, revoked) = match &cur {
                Some(kv) => match decode_node_cert(kv) {
                    Some(c) => (
                        Compare::ModRevision(k.clone(), kv.mod_revision),
                        c.revoke_ops(&identity, reason)
                            .into_iter()
                            .chain(std::iter::once(Op::Delete { key: k.clone() }))
                            .collect(),
                        std::iter::once(c.serial.clone())
                            .chain(c.previous.iter().map(|p| p.serial.clone()))
                            .collect(),
                    ),
                    None => (
                        Compare::ModRevision(k.clone(), kv.mod_revision),
                        vec![Op::Delete { key: k.clone() }],
                        Vec::new(),
                    ),
                },
                None => {
                    let Some(fp) = fingerprint.filter(|f| !f.is_empty()) else {
                        return Ok(Vec::new());
                    };
                    // Kept for a year: the longest a certificate from before
                    // serials were recorded can live.
                    let not_after = now_unix() + 366 * 24 * 3600;
                    let r = Revoked {
                        identity: identity.clone(),
                        not_after,
                        revoked_unix: now_unix(),
                        reason: reason.to_string(),
                    };
                    (
                        Compare::Absent(k.clone()),
                        vec![Op::Put {
                            key: fingerprint_key(fp),
                            value: serde_json::to_vec(&r).unwrap_or_default(),
                        }],
                        vec![format!("fp:{fp}")],
                    )
                }
            };
            if let TxnOutcome::Committed(_) = self
                .store
                .txn(Txn {
                    compares: vec![compare],
                    ops,
                })
                .await?
            {
                return Ok(revoked);
            }
        }
        Err(StoreError::Io(format!(
            "the certificate record of node {node} keeps changing"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Identity;
    use crate::store::embedded::EmbeddedStore;

    fn info(serial: &str) -> CertInfo {
        CertInfo {
            identity: Identity::Node("n1".into()),
            serial: serial.into(),
            not_after: now_unix() + 3600,
            fingerprint: format!("fp-{serial}"),
        }
    }

    async fn revocations() -> (tempfile::TempDir, Revocations) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        (dir, Revocations::start(Arc::new(store)).await.unwrap())
    }

    #[tokio::test]
    async fn first_certificate_is_adopted_and_another_is_not_current() {
        let (_d, r) = revocations().await;
        r.check_node("n1", &info("aa")).await.unwrap();
        r.check_node("n1", &info("aa")).await.unwrap();
        let err = r.check_node("n1", &info("bb")).await.unwrap_err();
        assert!(matches!(err, CertCheckError::NotCurrent { .. }), "{err}");
    }

    #[tokio::test]
    async fn revoked_node_certificate_is_refused_and_streams_are_woken() {
        let (_d, r) = revocations().await;
        r.check_node("n1", &info("aa")).await.unwrap();
        let mut rx = r.subscribe();
        rx.borrow_and_update();
        let revoked = r
            .revoke_node("n1", None, "node deleted by operator admin")
            .await
            .unwrap();
        assert_eq!(revoked, vec!["aa".to_string()]);
        let err = r.check_node("n1", &info("aa")).await.unwrap_err();
        assert!(
            err.to_string().contains("revoked") && err.to_string().contains("node deleted"),
            "{err}"
        );
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_revoked_cached("aa"));
        // The name is free: a new certificate is adopted.
        r.check_node("n1", &info("cc")).await.unwrap();
    }

    #[tokio::test]
    async fn a_renewed_certificate_stays_valid_until_it_expires_and_is_revoked_with_the_node() {
        let (_d, r) = revocations().await;
        r.check_node("n1", &info("aa")).await.unwrap();
        let renewed = r.renew("n1", &info("aa"), &info("bb")).await.unwrap();
        assert_eq!(renewed.serial, "bb");
        r.check_node("n1", &info("bb")).await.unwrap();
        r.check_node("n1", &info("aa")).await.unwrap();
        // Renewing again drops the oldest one.
        r.renew("n1", &info("bb"), &info("cc")).await.unwrap();
        assert!(matches!(
            r.check_node("n1", &info("aa")).await,
            Err(CertCheckError::NotCurrent { .. })
        ));
        // Only the current certificate may renew.
        assert!(r.renew("n1", &info("bb"), &info("dd")).await.is_err());
        let mut revoked = r.revoke_node("n1", None, "deleted").await.unwrap();
        revoked.sort();
        assert_eq!(revoked, vec!["bb".to_string(), "cc".to_string()]);
        assert!(matches!(
            r.check_node("n1", &info("bb")).await,
            Err(CertCheckError::Revoked(_))
        ));
    }

    #[tokio::test]
    async fn unrecorded_certificate_is_revoked_by_fingerprint() {
        let (_d, r) = revocations().await;
        let got = r.revoke_node("n1", Some("fp-aa"), "deleted").await.unwrap();
        assert_eq!(got, vec!["fp:fp-aa".to_string()]);
        assert!(matches!(
            r.check_node("n1", &info("aa")).await,
            Err(CertCheckError::Revoked(_))
        ));
        r.check_node("n1", &info("bb")).await.unwrap();
    }
}
