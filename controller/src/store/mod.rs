//! The controller's store: a revisioned key-value space with atomic
//! transactions and watch, behind one trait so that the embedded backend
//! (default) and an etcd backend (for several controllers) share semantics.
//!
//! Revisions start at 0 for an empty store; every transaction with at least
//! one op commits at the next revision, durably, before it is acknowledged.
//! This module owns those semantics and nothing about what the keys mean.

pub mod embedded;

#[cfg(test)]
pub mod conformance;

use std::pin::Pin;

pub type Revision = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// A precondition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key must not exist.
    Absent(String),
    /// The key must exist with exactly this mod revision.
    ModRevision(String, Revision),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    Committed(Revision),
    /// Nothing was written; the compare at `index` did not hold.
    CompareFailed {
        index: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For `Put`, `kv` is the new value; for `Delete`, the value as
/// it was before the delete. `revision` is the change's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub revision: Revision,
}

pub type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<Event, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("revision {requested} has been compacted; oldest available is {oldest}")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("store is closed")]
    Closed,
    #[error("invalid store request: {0}")]
    Invalid(String),
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// All keys with this prefix, sorted by key, read at one consistent
    /// revision (returned).
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Atomic: all compares hold and all ops apply at one new revision,
    /// durably before returning, or nothing happens. A txn with no ops
    /// creates no revision. Deleting a missing key is a no-op (no event).
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    async fn revision(&self) -> Result<Revision, StoreError>;
    /// Every event with revision > `after` for keys starting with `prefix`,
    /// in order, then live events as they commit, without gaps or
    /// duplicates. `Compacted` if the history needed was dropped.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError>;
}
