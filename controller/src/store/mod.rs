//! The controller's durable store: a revisioned key-value space with atomic,
//! compare-guarded transactions and ordered watch, behind one [`Store`] trait
//! so that the embedded backend ([`embedded`], the default) and an etcd
//! backend (for operators who run several controllers) share one set of
//! semantics. `conformance` (test builds only) holds the test suite every
//! backend must pass.
//!
//! This module owns those semantics and nothing about what keys or values
//! mean (that is `resources`). The rules every backend keeps:
//!
//! - A fresh store starts at some revision (0 for the embedded backend, 1
//!   for a new etcd); every committed write gets a higher one. Revisions are
//!   strictly increasing and never reused, also across restarts.
//! - A transaction either applies all of its ops at one new revision, durably
//!   (fsync'd) before it is acknowledged, or applies nothing. A transaction
//!   that changes nothing (no ops, or only deletes of missing keys) creates
//!   no revision and answers `Committed(current revision)`, as etcd does.
//! - Keys are non-empty; one transaction touches a key at most once (etcd
//!   rejects the same). Violations are [`StoreError::Invalid`] and apply
//!   nothing.
//! - Every change is one [`Event`]; a watch delivers, for its prefix, every
//!   event after the requested revision exactly once and in order, then live
//!   events, or [`StoreError::Compacted`] when that history is gone.

pub mod embedded;
pub mod etcd;

#[cfg(test)]
pub mod conformance;

use std::pin::Pin;

/// A point in the store's history (0 is "before anything" for every
/// backend: watching after 0 replays all retained history).
pub type Revision = u64;

/// One stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision at which the key was (last) created.
    pub create_revision: Revision,
    /// The revision of the last change to the key.
    pub mod_revision: Revision,
}

/// A precondition of a transaction, checked at the revision it would commit
/// on top of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key must not exist.
    Absent(String),
    /// The key must exist with exactly this mod revision.
    ModRevision(String, Revision),
}

/// A change inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Deleting a missing key is a no-op and produces no event.
    Delete {
        key: String,
    },
}

/// All `compares` must hold for `ops` to apply, all at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The ops applied at this revision (or, if nothing changed, this is the
    /// current revision and no new one was created).
    Committed(Revision),
    /// Nothing was written; `compares[index]` is the first that did not hold.
    CompareFailed { index: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change to one key.
///
/// For `Put`, `kv` is the new key-value (`kv.mod_revision == revision`; it
/// is a creation when `kv.create_revision == revision`). For `Delete`, `kv`
/// is the key-value as it was before the delete, and `revision` is the
/// delete's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub revision: Revision,
}

/// The events of a watch. It ends after yielding an error (for example
/// [`StoreError::Closed`] when the store shuts down).
pub type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<Event, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not read or write; the request may be retried. For
    /// a failed commit the outcome is unknown: re-read before retrying.
    #[error("store I/O error: {0}")]
    Io(String),
    /// Stored data does not decode or breaks an invariant of the store.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// A watch needed history that was dropped. `requested` is the first
    /// revision the watch needed (`after + 1`), `oldest` the oldest revision
    /// still available; the caller should re-list and watch from there.
    #[error("revision {requested} has been compacted; oldest available is {oldest}")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// The store has been shut down.
    #[error("store is closed")]
    Closed,
    /// The request itself is wrong (empty key, key repeated in a txn, value
    /// too large); retrying it cannot succeed.
    #[error("invalid store request: {0}")]
    Invalid(String),
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's current value, if it exists.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// All keys with this prefix, sorted by key, read at one consistent
    /// revision (returned).
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Atomic: all compares hold and all ops apply at one new revision,
    /// durably (fsync'd) before returning, or nothing happens. A txn with no
    /// ops creates no revision and returns `Committed(current)`. Deleting a
    /// missing key is a no-op (no event). If the returned future is dropped
    /// before it answers, or it answers `Err(Io)`, the txn may or may not
    /// have committed: re-read before retrying.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    /// The revision of the last committed change.
    async fn revision(&self) -> Result<Revision, StoreError>;
    /// Every event with revision > `after` for keys starting with `prefix`,
    /// in revision order (ops inside one txn in op order), then live events
    /// as they commit, without gaps or duplicates. `Err(Compacted)` if
    /// history needed was dropped (from this call, or from the stream if it
    /// falls that far behind).
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError>;
}

/// Checks the request rules shared by all backends: non-empty keys, and no
/// key touched twice by one transaction's ops.
pub fn validate_txn(txn: &Txn) -> Result<(), StoreError> {
    for c in &txn.compares {
        let (Compare::Absent(k) | Compare::ModRevision(k, _)) = c;
        if k.is_empty() {
            return Err(StoreError::Invalid("compare on an empty key".into()));
        }
    }
    let mut seen = std::collections::HashSet::with_capacity(txn.ops.len());
    for op in &txn.ops {
        let (Op::Put { key, .. } | Op::Delete { key }) = op;
        if key.is_empty() {
            return Err(StoreError::Invalid("op on an empty key".into()));
        }
        if !seen.insert(key.as_str()) {
            return Err(StoreError::Invalid(format!(
                "key {key:?} appears more than once in one transaction"
            )));
        }
    }
    Ok(())
}
