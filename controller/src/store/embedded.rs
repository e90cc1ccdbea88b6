//! The embedded store backend: one redb file, fsync on every commit.
//!
//! Tables: `kv` (key → versioned record), `log` (revision → the events of
//! that revision, for watch) and `meta` (current revision, compaction
//! point, retained event count). Records start with a format byte so the
//! encoding can change later without guessing.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::{
    Compare, Event, EventKind, KeyValue, Op, Revision, Store, StoreError, Txn, TxnOutcome,
    WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_REVISION: &str = "revision";
/// Highest revision whose events were trimmed from the log.
const META_COMPACTED: &str = "compacted";
const META_LOG_EVENTS: &str = "log_events";

const FORMAT_V1: u8 = 1;
/// Revisions read from the log per batch while a watcher catches up.
const WATCH_BATCH: usize = 512;

/// The default store backend. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    history_limit: usize,
    committed: Arc<watch::Sender<Revision>>,
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Io(format!("create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Io(format!("open {}: {e}", path.display())))?;
        // Make sure the tables exist so reads never see "table missing".
        let tx = db.begin_write().map_err(io)?;
        {
            tx.open_table(KV).map_err(io)?;
            tx.open_table(LOG).map_err(io)?;
            tx.open_table(META).map_err(io)?;
        }
        tx.commit().map_err(io)?;
        let rev = read_meta(&db, META_REVISION)?;
        let (tx, _) = watch::channel(rev);
        tracing::info!(path = %path.display(), revision = rev, "embedded store opened");
        Ok(EmbeddedStore {
            db: Arc::new(db),
            history_limit: 100_000,
            committed: Arc::new(tx),
        })
    }

    /// Keeps at most `events` events in the watch log (default 100,000).
    pub fn with_history_limit(mut self, events: usize) -> Self {
        self.history_limit = events.max(1);
        self
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
    }
}

fn read_meta(db: &Database, key: &str) -> Result<u64, StoreError> {
    let rtx = db.begin_read().map_err(io)?;
    let t = rtx.open_table(META).map_err(io)?;
    Ok(t.get(key).map_err(io)?.map(|v| v.value()).unwrap_or(0))
}

fn encode_record(create: Revision, modr: Revision, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(17 + value.len());
    b.push(FORMAT_V1);
    b.extend_from_slice(&create.to_be_bytes());
    b.extend_from_slice(&modr.to_be_bytes());
    b.extend_from_slice(value);
    b
}

fn decode_record(key: &str, b: &[u8]) -> Result<KeyValue, StoreError> {
    if b.len() < 17 || b[0] != FORMAT_V1 {
        return Err(StoreError::Corrupt(format!("record for {key:?}")));
    }
    let create = u64::from_be_bytes(b[1..9].try_into().map_err(io)?);
    let modr = u64::from_be_bytes(b[9..17].try_into().map_err(io)?);
    Ok(KeyValue {
        key: key.to_string(),
        value: b[17..].to_vec(),
        create_revision: create,
        mod_revision: modr,
    })
}

fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut b = vec![FORMAT_V1];
    for e in events {
        b.push(match e.kind {
            EventKind::Put => 1,
            EventKind::Delete => 2,
        });
        b.extend_from_slice(&(e.kv.key.len() as u32).to_be_bytes());
        b.extend_from_slice(e.kv.key.as_bytes());
        b.extend_from_slice(&e.kv.create_revision.to_be_bytes());
        b.extend_from_slice(&e.kv.mod_revision.to_be_bytes());
        b.extend_from_slice(&(e.kv.value.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.kv.value);
    }
    b
}

fn decode_events(revision: Revision, b: &[u8]) -> Result<Vec<Event>, StoreError> {
    let bad = || StoreError::Corrupt(format!("log entry {revision}"));
    if b.first() != Some(&FORMAT_V1) {
        return Err(bad());
    }
    let mut out = Vec::new();
    let mut i = 1;
    let take = |i: &mut usize, n: usize| -> Result<&[u8], StoreError> {
        let s = b.get(*i..*i + n).ok_or_else(bad)?;
        *i += n;
        Ok(s)
    };
    let u32_at = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize;
    let u64_at = |s: &[u8]| u64::from_be_bytes(s.try_into().unwrap_or([0; 8]));
    while i < b.len() {
        let kind = match take(&mut i, 1)?[0] {
            1 => EventKind::Put,
            2 => EventKind::Delete,
            _ => return Err(bad()),
        };
        let klen = u32_at(take(&mut i, 4)?);
        let key = String::from_utf8(take(&mut i, klen)?.to_vec()).map_err(|_| bad())?;
        let create = u64_at(take(&mut i, 8)?);
        let modr = u64_at(take(&mut i, 8)?);
        let vlen = u32_at(take(&mut i, 4)?);
        let value = take(&mut i, vlen)?.to_vec();
        out.push(Event {
            kind,
            kv: KeyValue {
                key,
                value,
                create_revision: create,
                mod_revision: modr,
            },
            revision,
        });
    }
    Ok(out)
}

/// The whole write path, run on a blocking thread.
fn commit_txn(db: &Database, txn: &Txn, history_limit: usize) -> Result<TxnOutcome, StoreError> {
    let mut wtx = db.begin_write().map_err(io)?;
    wtx.set_durability(Durability::Immediate).map_err(io)?;
    let outcome;
    {
        let mut kv = wtx.open_table(KV).map_err(io)?;
        let mut meta = wtx.open_table(META).map_err(io)?;
        let current = meta
            .get(META_REVISION)
            .map_err(io)?
            .map(|v| v.value())
            .unwrap_or(0);
        for (index, c) in txn.compares.iter().enumerate() {
            let holds = match c {
                Compare::Absent(k) => kv.get(k.as_str()).map_err(io)?.is_none(),
                Compare::ModRevision(k, rev) => match kv.get(k.as_str()).map_err(io)? {
                    Some(v) => decode_record(k, v.value())?.mod_revision == *rev,
                    None => false,
                },
            };
            if !holds {
                return Ok(TxnOutcome::CompareFailed { index });
            }
        }
        if txn.ops.is_empty() {
            return Ok(TxnOutcome::Committed(current));
        }
        let rev = current + 1;
        let mut events = Vec::with_capacity(txn.ops.len());
        for op in &txn.ops {
            match op {
                Op::Put { key, value } => {
                    if key.is_empty() {
                        return Err(StoreError::Invalid("empty key".into()));
                    }
                    let create = match kv.get(key.as_str()).map_err(io)? {
                        Some(v) => decode_record(key, v.value())?.create_revision,
                        None => rev,
                    };
                    kv.insert(key.as_str(), encode_record(create, rev, value).as_slice())
                        .map_err(io)?;
                    events.push(Event {
                        kind: EventKind::Put,
                        kv: KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: create,
                            mod_revision: rev,
                        },
                        revision: rev,
                    });
                }
                Op::Delete { key } => {
                    let old = match kv.remove(key.as_str()).map_err(io)? {
                        Some(v) => Some(decode_record(key, v.value())?),
                        None => None,
                    };
                    if let Some(old) = old {
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv: old,
                            revision: rev,
                        });
                    }
                }
            }
        }
        let mut log = wtx.open_table(LOG).map_err(io)?;
        log.insert(rev, encode_events(&events).as_slice())
            .map_err(io)?;
        let mut retained = meta
            .get(META_LOG_EVENTS)
            .map_err(io)?
            .map(|v| v.value())
            .unwrap_or(0)
            + events.len() as u64;
        let mut compacted = None;
        while retained > history_limit as u64 {
            let Some((r, v)) = log.pop_first().map_err(io)? else {
                break;
            };
            let r = r.value();
            retained = retained.saturating_sub(decode_events(r, v.value())?.len() as u64);
            compacted = Some(r);
            if r == rev {
                break;
            }
        }
        if let Some(c) = compacted {
            meta.insert(META_COMPACTED, c).map_err(io)?;
        }
        meta.insert(META_LOG_EVENTS, retained).map_err(io)?;
        meta.insert(META_REVISION, rev).map_err(io)?;
        outcome = TxnOutcome::Committed(rev);
    }
    wtx.commit().map_err(io)?;
    Ok(outcome)
}

/// Events with revision in (after, …], at most `WATCH_BATCH` revisions, and
/// the last revision read (revisions may have no events).
fn read_log(db: &Database, after: Revision) -> Result<(Vec<Event>, Revision), StoreError> {
    let rtx = db.begin_read().map_err(io)?;
    let meta = rtx.open_table(META).map_err(io)?;
    let compacted = meta
        .get(META_COMPACTED)
        .map_err(io)?
        .map(|v| v.value())
        .unwrap_or(0);
    if after < compacted {
        return Err(StoreError::Compacted {
            requested: after + 1,
            oldest: compacted + 1,
        });
    }
    let log = rtx.open_table(LOG).map_err(io)?;
    let mut out = Vec::new();
    let mut last = after;
    for entry in log.range((after + 1)..).map_err(io)?.take(WATCH_BATCH) {
        let (r, v) = entry.map_err(io)?;
        last = r.value();
        out.extend(decode_events(last, v.value())?);
    }
    Ok((out, last))
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let rtx = db.begin_read().map_err(io)?;
            let kv = rtx.open_table(KV).map_err(io)?;
            match kv.get(key.as_str()).map_err(io)? {
                Some(v) => Ok(Some(decode_record(&key, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |db| {
            let rtx = db.begin_read().map_err(io)?;
            let meta = rtx.open_table(META).map_err(io)?;
            let rev = meta
                .get(META_REVISION)
                .map_err(io)?
                .map(|v| v.value())
                .unwrap_or(0);
            let kv = rtx.open_table(KV).map_err(io)?;
            let mut out = Vec::new();
            for entry in kv.range(prefix.as_str()..).map_err(io)? {
                let (k, v) = entry.map_err(io)?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                out.push(decode_record(k, v.value())?);
            }
            Ok((out, rev))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let limit = self.history_limit;
        let outcome = self.blocking(move |db| commit_txn(db, &txn, limit)).await?;
        if let TxnOutcome::Committed(rev) = outcome {
            self.committed.send_if_modified(|cur| {
                let newer = rev > *cur;
                if newer {
                    *cur = rev;
                }
                newer
            });
        }
        Ok(outcome)
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking(|db| read_meta(db, META_REVISION)).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        // Fail early on a compacted start, like etcd does.
        let first = {
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || read_log(&db, after))
                .await
                .map_err(|e| StoreError::Io(e.to_string()))??
        };
        struct State {
            db: Arc<Database>,
            prefix: String,
            cursor: Revision,
            buf: VecDeque<Event>,
            notify: watch::Receiver<Revision>,
            failed: bool,
        }
        let mut state = State {
            db: self.db.clone(),
            prefix: prefix.to_string(),
            cursor: after,
            buf: VecDeque::new(),
            notify: self.committed.subscribe(),
            failed: false,
        };
        let (first, last) = first;
        state.cursor = last;
        for e in first {
            if e.kv.key.starts_with(&state.prefix) {
                state.buf.push_back(e);
            }
        }
        let stream = futures::stream::unfold(state, |mut st| async move {
            if st.failed {
                return None;
            }
            loop {
                if let Some(e) = st.buf.pop_front() {
                    return Some((Ok(e), st));
                }
                // Wait until something newer than the cursor committed.
                while *st.notify.borrow_and_update() <= st.cursor {
                    if st.notify.changed().await.is_err() {
                        return None;
                    }
                }
                let db = st.db.clone();
                let after = st.cursor;
                let res = tokio::task::spawn_blocking(move || read_log(&db, after))
                    .await
                    .map_err(|e| StoreError::Io(e.to_string()))
                    .and_then(|r| r);
                match res {
                    Ok((events, last)) => {
                        st.cursor = last;
                        for e in events {
                            if e.kv.key.starts_with(&st.prefix) {
                                st.buf.push_back(e);
                            }
                        }
                    }
                    Err(e) => {
                        st.failed = true;
                        return Some((Err(e), st));
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join("store.redb")).unwrap()
    }

    #[tokio::test]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        conformance::run_all(|| {
            let d = tempfile::tempdir().unwrap();
            let s = EmbeddedStore::open(&d.path().join("s.redb")).unwrap();
            (Arc::new(s) as Arc<dyn Store>, d)
        })
        .await;
        drop(dir);
    }

    #[tokio::test]
    async fn data_and_revision_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(&dir);
            for i in 0..10 {
                s.txn(Txn {
                    compares: vec![],
                    ops: vec![Op::Put {
                        key: format!("k/{i}"),
                        value: vec![i as u8],
                    }],
                })
                .await
                .unwrap();
            }
        }
        let s = open(&dir);
        assert_eq!(s.revision().await.unwrap(), 10);
        let (items, rev) = s.list("k/").await.unwrap();
        assert_eq!(items.len(), 10);
        assert_eq!(rev, 10);
        // Revisions continue, never reused.
        let out = s
            .txn(Txn {
                compares: vec![],
                ops: vec![Op::Delete { key: "k/0".into() }],
            })
            .await
            .unwrap();
        assert_eq!(out, TxnOutcome::Committed(11));
    }

    #[tokio::test]
    async fn history_limit_trims_and_reports_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).with_history_limit(5);
        for i in 0..10u8 {
            s.txn(Txn {
                compares: vec![],
                ops: vec![Op::Put {
                    key: "a".into(),
                    value: vec![i],
                }],
            })
            .await
            .unwrap();
        }
        match s.watch("", 0).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!(requested, 1);
                assert_eq!(oldest, 6);
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("watch from a compacted revision must fail"),
        }
        use futures::StreamExt;
        let mut w = s.watch("", 5).await.unwrap();
        let e = w.next().await.unwrap().unwrap();
        assert_eq!(e.revision, 6);
    }
}
