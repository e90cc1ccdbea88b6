//! Workload identities: small integers derived from label sets.
//!
//! Every distinct label set of a workload gets one identity, the same on
//! every node and across controller restarts: the allocation is a store
//! record `/identities/labels/<canonical labels>` holding the number, made
//! with a compare-absent transaction after bumping `/identities/next` with
//! a compare-and-swap, so racing allocators never hand out one number
//! twice. Identities below [`FIRST`] are reserved (0: any / outside the
//! mesh).

use std::collections::BTreeMap;

use crate::store::{Compare, Op, Store, StoreError, Txn, TxnOutcome};

/// The first identity handed out.
pub const FIRST: u32 = 256;
const NEXT_KEY: &str = "/identities/next";
const LABELS_PREFIX: &str = "/identities/labels/";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("identity allocation kept conflicting with concurrent writers")]
    Contended,
    #[error("stored identity record {key} is unreadable")]
    Corrupt { key: String },
}

/// `k1=v1,k2=v2` in key order: the record name of a label set.
pub fn canonical(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_u32(key: &str, v: &[u8]) -> Result<u32, IdentityError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| IdentityError::Corrupt {
            key: key.to_string(),
        })
}

/// The identity of `labels`, allocating one if the set is new.
pub async fn identity_for(
    store: &dyn Store,
    labels: &BTreeMap<String, String>,
) -> Result<u32, IdentityError> {
    let key = format!("{LABELS_PREFIX}{}", canonical(labels));
    for _ in 0..32 {
        if let Some(kv) = store.get(&key).await? {
            return parse_u32(&key, &kv.value);
        }
        let next = store.get(NEXT_KEY).await?;
        let (id, compare) = match &next {
            Some(kv) => (
                parse_u32(NEXT_KEY, &kv.value)?,
                Compare::ModRevision(NEXT_KEY.to_string(), kv.mod_revision),
            ),
            None => (FIRST, Compare::Absent(NEXT_KEY.to_string())),
        };
        let txn = Txn {
            compares: vec![compare, Compare::Absent(key.clone())],
            ops: vec![
                Op::Put {
                    key: NEXT_KEY.to_string(),
                    value: (id + 1).to_string().into_bytes(),
                },
                Op::Put {
                    key: key.clone(),
                    value: id.to_string().into_bytes(),
                },
            ],
        };
        if let TxnOutcome::Committed(_) = store.txn(txn).await? {
            tracing::info!(identity = id, labels = %canonical(labels), "identity allocated");
            return Ok(id);
        }
    }
    Err(IdentityError::Contended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn same_labels_same_identity_distinct_sets_distinct_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let a = identity_for(&store, &labels(&[("app", "web"), ("tier", "fe")]))
            .await
            .unwrap();
        let b = identity_for(&store, &labels(&[("tier", "fe"), ("app", "web")]))
            .await
            .unwrap();
        let c = identity_for(&store, &labels(&[("app", "db")]))
            .await
            .unwrap();
        let empty = identity_for(&store, &BTreeMap::new()).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a, FIRST);
        assert_ne!(a, c);
        assert_ne!(c, empty);
        assert!(empty >= FIRST);
    }
}
