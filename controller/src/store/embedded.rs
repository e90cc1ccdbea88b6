//! The embedded store backend, the default: one redb file, fsync on every
//! commit, so an acknowledged write survives a crash or `kill -9`.
//!
//! This file owns the on-disk layout and the mapping of the [`Store`]
//! semantics onto redb. Tables:
//!
//! - `kv`: key → record (`create_revision`, `mod_revision`, value).
//! - `log`: revision → the events of that revision, in op order. Every
//!   revision has at least one event (a txn that changes nothing creates no
//!   revision), so the log holds the contiguous revisions
//!   `compacted + 1 ..= revision`. Watches read from here.
//! - `meta`: `format` (layout version), `revision` (last committed),
//!   `compacted` (highest revision trimmed from the log, 0 if none) and
//!   `log_events` (events currently in the log).
//!
//! Encoding is deliberately simple and versioned: every `kv` record and
//! `log` entry starts with a format byte (`FORMAT_V1`) and the file
//! carries a layout version in `meta`, so either can change later with an
//! explicit migration instead of guesswork. Integers are big-endian.
//!
//! Writes run on tokio's blocking pool (redb serialises write transactions);
//! after a commit the committed revision is published on a `watch` channel.
//! Watch streams only use that as a wake-up and always read events from the
//! `log` table, so a slow watcher never loses events: it just reads more
//! from the log when it next runs, or gets `Compacted` if it fell behind the
//! retained history.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// Page cache of the store file. Small: the watch-fed cache serves the
/// reads, the OS page cache holds the file anyway, and at 1,000 nodes
/// 32 MiB of it was an eighth of the controller's memory (docs/scale.md).
const STORE_CACHE_BYTES: usize = 8 << 20;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::{
    validate_txn, Compare, Event, EventKind, KeyValue, Op, Revision, Store, StoreError, Txn,
    TxnOutcome, WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Layout version of the whole file (tables and meta keys).
const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
/// Highest revision whose events were trimmed from the log.
const META_COMPACTED: &str = "compacted";
const META_LOG_EVENTS: &str = "log_events";
/// Bytes of the log entries currently in the log (absent in files written
/// before it was kept: counted once at open).
const META_LOG_BYTES: &str = "log_bytes";

/// The only layout this build reads and writes.
const LAYOUT_V1: u64 = 1;
/// Leading byte of every `kv` record and `log` entry.
const FORMAT_V1: u8 = 1;
const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;

/// Default number of events kept in the log for watches.
pub const DEFAULT_HISTORY_LIMIT: usize = 100_000;
/// Default bytes of history kept: each event holds a whole object, so a
/// count alone lets a few large objects rewritten often fill the disk.
pub const DEFAULT_HISTORY_BYTES: u64 = 64 << 20;

/// How much history the log keeps: whole revisions are trimmed, oldest
/// first, while either bound is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub events: usize,
    pub bytes: u64,
}

impl Default for History {
    fn default() -> Self {
        History {
            events: DEFAULT_HISTORY_LIMIT,
            bytes: DEFAULT_HISTORY_BYTES,
        }
    }
}
/// Revisions read from the log per blocking call while a watcher catches up.
const WATCH_BATCH: usize = 256;

/// The default store backend: one redb file. Cheap to clone; clones share
/// the file. The file is closed when the last clone is dropped (watch
/// streams do not keep it open; they end with [`StoreError::Closed`]).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    history_limit: History,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("history_limit", &self.history_limit)
            .finish_non_exhaustive()
    }
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// The last committed revision, published after each commit.
    committed: watch::Sender<Revision>,
    /// Txns waiting for the writer (group commit, see [`Inner::write_queued`]).
    queue: std::sync::Mutex<Queue>,
}

/// A txn waiting to be written, and where its outcome goes.
type Pending = (
    Txn,
    tokio::sync::oneshot::Sender<Result<TxnOutcome, StoreError>>,
);

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// A blocking task is draining `pending`.
    writing: bool,
}

/// Most txns written under one commit (one fsync).
const GROUP_MAX: usize = 256;

/// Maps a redb error to a store error, with what we were doing.
fn db_err(context: &str, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(m) => StoreError::Corrupt(format!("{context}: {m}")),
        redb::Error::ValueTooLarge(n) => {
            StoreError::Invalid(format!("{context}: {n} bytes is more than one entry can hold"))
        }
        redb::Error::DatabaseClosed => StoreError::Closed,
        redb::Error::DatabaseAlreadyOpen => StoreError::Io(format!(
            "{context}: the store file is already open (another controller process, or another handle in this one)"
        )),
        other => StoreError::Io(format!("{context}: {other}")),
    }
}

/// Runs blocking redb work off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Err(StoreError::Closed),
        Err(e) => Err(StoreError::Io(format!("store task failed: {e}"))),
    }
}

impl EmbeddedStore {
    /// Opens the store file at `path`, creating it (and its parent
    /// directory) if missing. Blocks while redb checks the file, which after
    /// an unclean shutdown includes a repair.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // The directories and the file we create must themselves be durable
        // before the first acknowledged write, so remember what is new.
        let mut new_entries: Vec<PathBuf> = Vec::new();
        let mut missing = Some(path);
        while let Some(p) = missing.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            new_entries.push(p.to_path_buf());
            missing = p.parent();
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::Io(format!("create {}: {e}", dir.display())))?;
        let shown = path.display().to_string();
        let repairing = AtomicBool::new(false);
        let db = Database::builder()
            // redb caches up to 1 GiB by default; the controller's memory
            // budget is a fraction of that, and the watch-fed cache holds
            // what is read often.
            .set_cache_size(STORE_CACHE_BYTES)
            // A file damaged outside redb fails to open with an error
            // instead of a possible panic later; the store is small enough
            // for the full check to be cheap.
            .set_check_integrity_on_open(true)
            .set_repair_callback(move |session| {
                if !repairing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        path = %shown,
                        "repairing the store file after an unclean shutdown"
                    );
                }
                tracing::debug!(progress = session.progress(), "store repair");
            })
            .create(path)
            .map_err(|e| db_err(&format!("open {}", path.display()), e))?;
        let revision = init_layout(&db)?;
        let mut db = db;
        compact(&mut db, path);
        for entry in &new_entries {
            sync_parent_dir(entry)?;
        }
        let (committed, _) = watch::channel(revision);
        tracing::info!(path = %path.display(), revision, "embedded store opened");
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                committed,
                queue: std::sync::Mutex::default(),
            }),
            history_limit: History::default(),
        })
    }

    /// Keeps at most `events` events in the watch log (default
    /// [`DEFAULT_HISTORY_LIMIT`]); older revisions are trimmed, whole, in
    /// the write transaction that goes over the limit. The newest revision is
    /// always kept, even when it alone has more events than the limit.
    pub fn with_history_limit(mut self, events: usize) -> Self {
        self.history_limit.events = events;
        self
    }

    /// Keeps at most `bytes` of log entries (default
    /// [`DEFAULT_HISTORY_BYTES`]), trimmed the same way.
    pub fn with_history_bytes(mut self, bytes: u64) -> Self {
        self.history_limit.bytes = bytes;
        self
    }
}

/// Makes the directory entry of a newly created `entry` durable.
fn sync_parent_dir(entry: &Path) -> Result<(), StoreError> {
    let dir = match entry.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Io(format!("sync directory {}: {e}", dir.display())))
}

/// Creates the tables on a new file, checks the layout of an existing one,
/// and returns the current revision.
/// Gives the pages freed by trimmed history and deleted objects back to
/// the file system. redb needs the only handle for this, so it runs at
/// open; while running, freed pages are reused by new writes, so the file
/// does not grow past its high-water mark. A failure only costs space.
fn compact(db: &mut Database, path: &Path) {
    let size = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let (before, started) = (size(), std::time::Instant::now());
    match db.compact() {
        Ok(_) => {
            let after = size();
            if after < before {
                tracing::info!(path = %path.display(), before, after,
                    elapsed_ms = started.elapsed().as_millis() as u64, "store file compacted");
            }
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "store compaction failed; the file keeps its free pages")
        }
    }
}

fn init_layout(db: &Database) -> Result<Revision, StoreError> {
    let wtx = db.begin_write().map_err(|e| db_err("begin write", e))?;
    let revision = {
        wtx.open_table(KV).map_err(|e| db_err("open table kv", e))?;
        let log = wtx
            .open_table(LOG)
            .map_err(|e| db_err("open table log", e))?;
        let mut meta = wtx
            .open_table(META)
            .map_err(|e| db_err("open table meta", e))?;
        match meta_get(&meta, META_FORMAT)? {
            None => {
                if meta_get(&meta, META_REVISION)?.is_some() {
                    return Err(StoreError::Corrupt("store file has no layout version".into()));
                }
                meta.insert(META_FORMAT, LAYOUT_V1)
                    .map_err(|e| db_err("write meta", e))?;
            }
            Some(LAYOUT_V1) => {}
            Some(v) => {
                return Err(StoreError::Corrupt(format!(
                    "store file layout version {v} is not supported by this build (supports {LAYOUT_V1})"
                )))
            }
        }
        let revision = meta_get(&meta, META_REVISION)?.unwrap_or(0);
        if meta_get(&meta, META_LOG_BYTES)?.is_none() {
            let mut bytes = 0u64;
            for e in log.iter().map_err(|e| db_err("read log", e))? {
                let (_, v) = e.map_err(|e| db_err("read log", e))?;
                bytes = bytes.saturating_add(v.value().len() as u64);
            }
            meta.insert(META_LOG_BYTES, bytes)
                .map_err(|e| db_err("write meta", e))?;
        }
        let last_logged = log
            .last()
            .map_err(|e| db_err("read log", e))?
            .map(|(k, _)| k.value());
        if let Some(last) = last_logged {
            if last != revision {
                return Err(StoreError::Corrupt(format!(
                    "log ends at revision {last} but the store is at {revision}"
                )));
            }
        }
        revision
    };
    wtx.commit().map_err(|e| db_err("commit layout", e))?;
    Ok(revision)
}

fn meta_get(
    meta: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    Ok(meta
        .get(key)
        .map_err(|e| db_err("read meta", e))?
        .map(|v| v.value()))
}

// --- encoding -------------------------------------------------------------

fn encode_record(create: Revision, modr: Revision, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(17 + value.len());
    b.push(FORMAT_V1);
    b.extend_from_slice(&create.to_be_bytes());
    b.extend_from_slice(&modr.to_be_bytes());
    b.extend_from_slice(value);
    b
}

fn decode_record(key: &str, b: &[u8]) -> Result<KeyValue, StoreError> {
    let mut r = Reader::new(b, || format!("record of key {key:?}"));
    r.format()?;
    let create_revision = r.u64()?;
    let mod_revision = r.u64()?;
    Ok(KeyValue {
        key: key.to_string(),
        value: r.rest().to_vec(),
        create_revision,
        mod_revision,
    })
}

/// A log entry: format byte, event count (u32), then per event: kind (u8),
/// create and mod revision (u64), key length (u32), key, value length (u32),
/// value.
struct LogEntry {
    buf: Vec<u8>,
    events: u32,
}

impl LogEntry {
    fn new() -> Self {
        LogEntry {
            buf: vec![FORMAT_V1, 0, 0, 0, 0],
            events: 0,
        }
    }

    fn push(
        &mut self,
        kind: u8,
        kv_key: &str,
        create: Revision,
        modr: Revision,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let len = |n: usize, what: &str| {
            u32::try_from(n)
                .map_err(|_| StoreError::Invalid(format!("{what} of {n} bytes is too large")))
        };
        let klen = len(kv_key.len(), "key")?;
        let vlen = len(value.len(), "value")?;
        self.buf.push(kind);
        self.buf.extend_from_slice(&create.to_be_bytes());
        self.buf.extend_from_slice(&modr.to_be_bytes());
        self.buf.extend_from_slice(&klen.to_be_bytes());
        self.buf.extend_from_slice(kv_key.as_bytes());
        self.buf.extend_from_slice(&vlen.to_be_bytes());
        self.buf.extend_from_slice(value);
        self.events += 1;
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf[1..5].copy_from_slice(&self.events.to_be_bytes());
        self.buf
    }
}

/// The number of events in a log entry, without decoding them.
fn log_event_count(revision: Revision, b: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader::new(b, || format!("log entry {revision}"));
    r.format()?;
    Ok(u64::from(r.u32()?))
}

/// The events of a log entry whose key starts with `prefix`.
fn decode_log_entry(
    revision: Revision,
    b: &[u8],
    prefix: &str,
    out: &mut VecDeque<Event>,
) -> Result<(), StoreError> {
    let mut r = Reader::new(b, || format!("log entry {revision}"));
    r.format()?;
    let n = r.u32()?;
    for _ in 0..n {
        let kind = match r.u8()? {
            KIND_PUT => EventKind::Put,
            KIND_DELETE => EventKind::Delete,
            other => return Err(r.bad(&format!("unknown event kind {other}"))),
        };
        let create_revision = r.u64()?;
        let mod_revision = r.u64()?;
        let klen = r.len()?;
        let key = r.take(klen)?;
        let vlen = r.len()?;
        if !key.starts_with(prefix.as_bytes()) {
            r.take(vlen)?;
            continue;
        }
        let key = std::str::from_utf8(key)
            .map_err(|_| r.bad("key is not UTF-8"))?
            .to_string();
        let value = r.take(vlen)?.to_vec();
        out.push_back(Event {
            kind,
            kv: KeyValue {
                key,
                value,
                create_revision,
                mod_revision,
            },
            revision,
        });
    }
    if !r.rest().is_empty() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(())
}

/// Bounds-checked reading of the encodings above.
struct Reader<'a, W: Fn() -> String> {
    b: &'a [u8],
    what: W,
}

impl<'a, W: Fn() -> String> Reader<'a, W> {
    fn new(b: &'a [u8], what: W) -> Self {
        Reader { b, what }
    }

    fn bad(&self, why: &str) -> StoreError {
        StoreError::Corrupt(format!("{}: {why}", (self.what)()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.b.len() < n {
            return Err(self.bad("truncated"));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        let n = self.u32()?;
        usize::try_from(n).map_err(|_| self.bad("length does not fit in memory"))
    }

    fn format(&mut self) -> Result<(), StoreError> {
        match self.u8()? {
            FORMAT_V1 => Ok(()),
            other => Err(self.bad(&format!("unknown format byte {other}"))),
        }
    }

    fn rest(&self) -> &'a [u8] {
        self.b
    }
}

// --- write path -------------------------------------------------------------

/// What a write transaction decided before it is committed or aborted.
enum Staged {
    CompareFailed(usize),
    Unchanged(Revision),
    Commit {
        revision: Revision,
        events: u64,
        trimmed_to: Option<Revision>,
    },
}

/// Clears [`Queue::writing`] when the writer unwinds, so a panic cannot
/// leave every later txn waiting. Holds the writer's handle on the store.
struct WriterGuard(Option<Arc<Inner>>);

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let Some(inner) = self.0.take() else { return };
        let mut q = inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.writing = false;
        // Txns queued after the last take would wait for a writer that
        // never comes; fail them instead.
        for (_, tx) in q.pending.drain(..) {
            let _ = tx.send(Err(StoreError::Io("the store writer failed".into())));
        }
    }
}

/// One txn's outcome, on its way back.
type Reply = (
    tokio::sync::oneshot::Sender<Result<TxnOutcome, StoreError>>,
    Result<TxnOutcome, StoreError>,
);

impl Inner {
    /// The writer: takes what is queued, writes it under one commit, and
    /// goes on until the queue is empty. Runs on a blocking thread. Its
    /// handle on the store is dropped before the last answers go out, so a
    /// caller that drops the store after its write really closes the file.
    fn write_queued(inner: Arc<Inner>, history_limit: History) {
        let mut guard = WriterGuard(Some(inner));
        loop {
            let Some(this) = guard.0.clone() else { return };
            let batch: Vec<Pending> = {
                let mut q = this.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = q.pending.len().min(GROUP_MAX);
                q.pending.drain(..n).collect()
            };
            let replies = this.write_batch(batch, history_limit);
            let last = {
                let mut q = this.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.pending.is_empty() {
                    q.writing = false;
                    true
                } else {
                    false
                }
            };
            if last {
                guard.0 = None;
                drop(this);
            }
            for (tx, r) in replies {
                let _ = tx.send(r);
            }
            if last {
                return;
            }
        }
    }

    /// Writes `batch` (one commit when it holds several txns).
    fn write_batch(&self, batch: Vec<Pending>, history_limit: History) -> Vec<Reply> {
        if batch.len() <= 1 {
            return batch
                .into_iter()
                .map(|(txn, tx)| (tx, self.apply(&txn, history_limit)))
                .collect();
        }
        match self.apply_group(batch.iter().map(|(txn, _)| txn), history_limit) {
            Ok(Ok(outcomes)) => batch
                .into_iter()
                .zip(outcomes)
                .map(|((_, tx), outcome)| (tx, Ok(outcome)))
                .collect(),
            // The commit itself failed: its outcome is unknown, so no txn
            // of it may be tried again.
            Ok(Err(e)) => {
                let message = e.to_string();
                let mut first = Some(e);
                batch
                    .into_iter()
                    .map(|(_, tx)| {
                        let e = first
                            .take()
                            .unwrap_or_else(|| StoreError::Io(message.clone()));
                        (tx, Err(e))
                    })
                    .collect()
            }
            // A failure while staging (a value too large, say) must fail
            // only its own txn: write them one by one instead.
            Err(e) => {
                tracing::debug!(error = %e, txns = batch.len(), "group commit failed; writing its txns one by one");
                batch
                    .into_iter()
                    .map(|(txn, tx)| (tx, self.apply(&txn, history_limit)))
                    .collect()
            }
        }
    }

    /// Stages `txns` in one write transaction, in order, and commits once,
    /// then publishes the new revision itself (a caller that stops waiting
    /// cannot leave watchers un-notified). All or nothing: a staging error
    /// (the outer `Err`) aborts the whole group; the inner `Err` is a
    /// failed commit, whose outcome is unknown.
    #[allow(clippy::type_complexity)]
    fn apply_group<'a>(
        &self,
        txns: impl ExactSizeIterator<Item = &'a Txn>,
        history_limit: History,
    ) -> Result<Result<Vec<TxnOutcome>, StoreError>, StoreError> {
        let mut wtx = self
            .db
            .begin_write()
            .map_err(|e| db_err("begin write", e))?;
        wtx.set_durability(Durability::Immediate)
            .map_err(|e| db_err("set durability", e))?;
        let mut outcomes = Vec::with_capacity(txns.len());
        let mut last = None;
        for txn in txns {
            match stage(&wtx, txn, history_limit) {
                Ok(Staged::CompareFailed(index)) => {
                    outcomes.push(TxnOutcome::CompareFailed { index })
                }
                Ok(Staged::Unchanged(revision)) => outcomes.push(TxnOutcome::Committed(revision)),
                Ok(Staged::Commit {
                    revision,
                    events,
                    trimmed_to,
                }) => {
                    tracing::trace!(revision, events, "store txn staged");
                    if let Some(to) = trimmed_to {
                        tracing::debug!(compacted = to, "trimmed store history");
                    }
                    last = Some(revision);
                    outcomes.push(TxnOutcome::Committed(revision));
                }
                Err(e) => {
                    abort(wtx);
                    return Err(e);
                }
            }
        }
        let Some(revision) = last else {
            abort(wtx);
            return Ok(Ok(outcomes));
        };
        if let Err(e) = wtx.commit() {
            // redb: the outcome of a failed commit is unknown and the
            // database refuses further writes until reopened.
            tracing::error!(path = %self.path.display(), revision, error = %e,
                "store commit failed; its outcome is unknown until the store is reopened");
            return Ok(Err(db_err(
                &format!("commit revisions up to {revision} (outcome unknown)"),
                e,
            )));
        }
        tracing::trace!(revision, txns = outcomes.len(), "store commit");
        self.committed.send_if_modified(|cur| {
            let newer = revision > *cur;
            if newer {
                *cur = revision;
            }
            newer
        });
        Ok(Ok(outcomes))
    }

    /// One txn, alone under its own commit.
    fn apply(&self, txn: &Txn, history_limit: History) -> Result<TxnOutcome, StoreError> {
        if txn.ops.is_empty() {
            return self.check_only(&txn.compares);
        }
        match self.apply_group(std::iter::once(txn), history_limit) {
            Ok(Ok(mut outcomes)) => outcomes
                .pop()
                .ok_or_else(|| StoreError::Io("a txn of one had no outcome".into())),
            Ok(Err(e)) | Err(e) => Err(e),
        }
    }

    /// A txn without ops: evaluate the compares at one snapshot.
    fn check_only(&self, compares: &[Compare]) -> Result<TxnOutcome, StoreError> {
        let rtx = self.db.begin_read().map_err(|e| db_err("begin read", e))?;
        let kv = rtx.open_table(KV).map_err(|e| db_err("open table kv", e))?;
        let meta = rtx
            .open_table(META)
            .map_err(|e| db_err("open table meta", e))?;
        if let Some(index) = first_failed(&kv, compares)? {
            return Ok(TxnOutcome::CompareFailed { index });
        }
        Ok(TxnOutcome::Committed(
            meta_get(&meta, META_REVISION)?.unwrap_or(0),
        ))
    }

    /// Events after `after` (at most [`WATCH_BATCH`] revisions), filtered by
    /// prefix; the last revision read; whether more may follow right away.
    fn read_log(&self, prefix: &str, after: Revision) -> Result<LogBatch, StoreError> {
        let rtx = self.db.begin_read().map_err(|e| db_err("begin read", e))?;
        let meta = rtx
            .open_table(META)
            .map_err(|e| db_err("open table meta", e))?;
        check_not_compacted(&meta, after)?;
        let log = rtx
            .open_table(LOG)
            .map_err(|e| db_err("open table log", e))?;
        let mut batch = LogBatch {
            events: VecDeque::new(),
            last: after,
            more: false,
        };
        let start = after.saturating_add(1);
        for (n, entry) in log
            .range(start..)
            .map_err(|e| db_err("read log", e))?
            .enumerate()
        {
            if n == WATCH_BATCH {
                batch.more = true;
                break;
            }
            let (r, v) = entry.map_err(|e| db_err("read log", e))?;
            let r = r.value();
            if r != batch.last + 1 {
                return Err(StoreError::Corrupt(format!(
                    "log has no revision {} (next is {r})",
                    batch.last + 1
                )));
            }
            decode_log_entry(r, v.value(), prefix, &mut batch.events)?;
            batch.last = r;
        }
        Ok(batch)
    }
}

struct LogBatch {
    events: VecDeque<Event>,
    last: Revision,
    more: bool,
}

fn check_not_compacted(
    meta: &impl ReadableTable<&'static str, u64>,
    after: Revision,
) -> Result<(), StoreError> {
    let compacted = meta_get(meta, META_COMPACTED)?.unwrap_or(0);
    if after < compacted {
        return Err(StoreError::Compacted {
            requested: after + 1,
            oldest: compacted + 1,
        });
    }
    Ok(())
}

fn abort(wtx: redb::WriteTransaction) {
    if let Err(e) = wtx.abort() {
        tracing::warn!(error = %e, "aborting a store write transaction failed");
    }
}

/// The index of the first compare that does not hold, if any.
fn first_failed(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    compares: &[Compare],
) -> Result<Option<usize>, StoreError> {
    for (index, c) in compares.iter().enumerate() {
        let holds = match c {
            Compare::Absent(k) => kv
                .get(k.as_str())
                .map_err(|e| db_err("read kv", e))?
                .is_none(),
            Compare::ModRevision(k, want) => {
                match kv.get(k.as_str()).map_err(|e| db_err("read kv", e))? {
                    Some(v) => decode_record(k, v.value())?.mod_revision == *want,
                    None => false,
                }
            }
        };
        if !holds {
            return Ok(Some(index));
        }
    }
    Ok(None)
}

/// Checks the compares and writes the ops, the log entry, the trim and the
/// meta into `wtx`, without committing.
fn stage(
    wtx: &redb::WriteTransaction,
    txn: &Txn,
    history_limit: History,
) -> Result<Staged, StoreError> {
    let mut kv = wtx.open_table(KV).map_err(|e| db_err("open table kv", e))?;
    let mut meta = wtx
        .open_table(META)
        .map_err(|e| db_err("open table meta", e))?;
    let current = meta_get(&meta, META_REVISION)?.unwrap_or(0);
    if let Some(index) = first_failed(&kv, &txn.compares)? {
        return Ok(Staged::CompareFailed(index));
    }
    let revision = current
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("revision counter overflow".into()))?;
    let mut entry = LogEntry::new();
    for op in &txn.ops {
        match op {
            Op::Put { key, value } => {
                let create = match kv.get(key.as_str()).map_err(|e| db_err("read kv", e))? {
                    Some(old) => decode_record(key, old.value())?.create_revision,
                    None => revision,
                };
                entry.push(KIND_PUT, key, create, revision, value)?;
                kv.insert(
                    key.as_str(),
                    encode_record(create, revision, value).as_slice(),
                )
                .map_err(|e| db_err(&format!("write key {key:?}"), e))?;
            }
            Op::Delete { key } => {
                let old = match kv
                    .remove(key.as_str())
                    .map_err(|e| db_err(&format!("delete key {key:?}"), e))?
                {
                    Some(old) => Some(decode_record(key, old.value())?),
                    None => None,
                };
                if let Some(old) = old {
                    entry.push(
                        KIND_DELETE,
                        key,
                        old.create_revision,
                        old.mod_revision,
                        &old.value,
                    )?;
                }
            }
        }
    }
    if entry.events == 0 {
        // Only deletes of missing keys: nothing changed, no revision.
        return Ok(Staged::Unchanged(current));
    }
    let events = u64::from(entry.events);
    let mut log = wtx
        .open_table(LOG)
        .map_err(|e| db_err("open table log", e))?;
    let written = entry.finish();
    log.insert(revision, written.as_slice())
        .map_err(|e| db_err("write log", e))?;

    // Trim whole revisions, oldest first, never the one just written,
    // while the log holds too many events or too many bytes.
    let mut retained = meta_get(&meta, META_LOG_EVENTS)?
        .unwrap_or(0)
        .saturating_add(events);
    let mut retained_bytes = meta_get(&meta, META_LOG_BYTES)?
        .unwrap_or(0)
        .saturating_add(written.len() as u64);
    let mut trimmed_to = None;
    while retained > history_limit.events as u64 || retained_bytes > history_limit.bytes {
        let oldest = match log.first().map_err(|e| db_err("read log", e))? {
            Some((r, v)) => (
                r.value(),
                log_event_count(r.value(), v.value())?,
                v.value().len() as u64,
            ),
            None => break,
        };
        if oldest.0 >= revision {
            break;
        }
        log.remove(oldest.0).map_err(|e| db_err("trim log", e))?;
        retained = retained.saturating_sub(oldest.1);
        retained_bytes = retained_bytes.saturating_sub(oldest.2);
        trimmed_to = Some(oldest.0);
    }
    if let Some(to) = trimmed_to {
        meta.insert(META_COMPACTED, to)
            .map_err(|e| db_err("write meta", e))?;
    }
    meta.insert(META_LOG_EVENTS, retained)
        .map_err(|e| db_err("write meta", e))?;
    meta.insert(META_LOG_BYTES, retained_bytes)
        .map_err(|e| db_err("write meta", e))?;
    meta.insert(META_REVISION, revision)
        .map_err(|e| db_err("write meta", e))?;
    Ok(Staged::Commit {
        revision,
        events,
        trimmed_to,
    })
}

// --- the trait ----------------------------------------------------------------

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        if key.is_empty() {
            return Err(StoreError::Invalid("get of an empty key".into()));
        }
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || {
            let rtx = inner.db.begin_read().map_err(|e| db_err("begin read", e))?;
            let kv = rtx.open_table(KV).map_err(|e| db_err("open table kv", e))?;
            let found = kv.get(key.as_str()).map_err(|e| db_err("read kv", e))?;
            found.map(|v| decode_record(&key, v.value())).transpose()
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let rtx = inner.db.begin_read().map_err(|e| db_err("begin read", e))?;
            let meta = rtx
                .open_table(META)
                .map_err(|e| db_err("open table meta", e))?;
            let revision = meta_get(&meta, META_REVISION)?.unwrap_or(0);
            let kv = rtx.open_table(KV).map_err(|e| db_err("open table kv", e))?;
            let mut out = Vec::new();
            for entry in kv
                .range(prefix.as_str()..)
                .map_err(|e| db_err("read kv", e))?
            {
                let (k, v) = entry.map_err(|e| db_err("read kv", e))?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                out.push(decode_record(k, v.value())?);
            }
            Ok((out, revision))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        validate_txn(&txn)?;
        if txn.ops.is_empty() {
            let inner = self.inner.clone();
            return blocking(move || inner.check_only(&txn.compares)).await;
        }
        // Group commit: txns that arrive while one commit is on disk are
        // written together under the next one, one fsync for all of them
        // (as etcd batches its backend commits). Each keeps its own
        // revision and compares.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.pending.push((txn, tx));
            !std::mem::replace(&mut q.writing, true)
        };
        if start_writer {
            let inner = self.inner.clone();
            let limit = self.history_limit;
            // Not awaited: the writer drains what others queue after us too.
            drop(tokio::task::spawn_blocking(move || {
                Inner::write_queued(inner, limit)
            }));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Io(
                "the store writer stopped before answering".into(),
            )),
        }
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            let rtx = inner.db.begin_read().map_err(|e| db_err("begin read", e))?;
            let meta = rtx
                .open_table(META)
                .map_err(|e| db_err("open table meta", e))?;
            Ok(meta_get(&meta, META_REVISION)?.unwrap_or(0))
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        // Subscribe before the first read, so no commit can slip between them.
        let notify = self.inner.committed.subscribe();
        // Fail the call itself (not the stream) when the start is compacted.
        let inner = self.inner.clone();
        blocking(move || {
            let rtx = inner.db.begin_read().map_err(|e| db_err("begin read", e))?;
            let meta = rtx
                .open_table(META)
                .map_err(|e| db_err("open table meta", e))?;
            check_not_compacted(&meta, after)
        })
        .await?;
        let state = WatchState {
            inner: Arc::downgrade(&self.inner),
            prefix: Arc::from(prefix),
            cursor: after,
            buf: VecDeque::new(),
            notify,
            need_read: true,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, next_event)))
    }
}

struct WatchState {
    /// Weak, so an open watch does not keep the file open after the store
    /// is dropped.
    inner: Weak<Inner>,
    prefix: Arc<str>,
    /// Every event up to this revision has been read from the log.
    cursor: Revision,
    buf: VecDeque<Event>,
    notify: watch::Receiver<Revision>,
    need_read: bool,
    done: bool,
}

async fn next_event(mut st: WatchState) -> Option<(Result<Event, StoreError>, WatchState)> {
    loop {
        if let Some(e) = st.buf.pop_front() {
            return Some((Ok(e), st));
        }
        if st.done {
            return None;
        }
        if st.need_read {
            let Some(inner) = st.inner.upgrade() else {
                st.done = true;
                return Some((Err(StoreError::Closed), st));
            };
            let (prefix, after) = (st.prefix.clone(), st.cursor);
            match blocking(move || inner.read_log(&prefix, after)).await {
                Ok(batch) => {
                    st.cursor = batch.last;
                    st.buf = batch.events;
                    st.need_read = batch.more;
                }
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            }
            continue;
        }
        // Caught up: wait for a commit past the cursor. A commit published
        // since the last read wakes this at once.
        if st.notify.changed().await.is_err() {
            st.done = true;
            return Some((Err(StoreError::Closed), st));
        }
        st.need_read = *st.notify.borrow_and_update() > st.cursor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;
    use futures::StreamExt;
    use std::time::Duration;

    async fn fresh() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        (Arc::new(s), dir)
    }

    async fn fresh_short_history() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("store.redb"))
            .unwrap()
            .with_history_limit(conformance::SHORT_HISTORY);
        (Arc::new(s), dir)
    }

    crate::store::conformance::conformance_tests!(fresh, fresh_short_history);

    #[tokio::test]
    async fn embedded_revisions_start_at_zero_and_first_write_is_one() {
        let (s, _dir) = fresh().await;
        assert_eq!(s.revision().await.unwrap(), 0);
        let r = s
            .txn(Txn {
                compares: vec![],
                ops: vec![put("a", b"1")],
            })
            .await
            .unwrap();
        assert_eq!(r, TxnOutcome::Committed(1));
    }

    fn put(k: &str, v: &[u8]) -> Op {
        Op::Put {
            key: k.into(),
            value: v.to_vec(),
        }
    }

    async fn commit(s: &EmbeddedStore, ops: Vec<Op>) -> Revision {
        match s
            .txn(Txn {
                compares: vec![],
                ops,
            })
            .await
            .unwrap()
        {
            TxnOutcome::Committed(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn next(w: &mut WatchStream) -> Result<Event, StoreError> {
        tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch answers within 10s")
            .expect("watch stream still open")
    }

    #[tokio::test]
    async fn data_and_revision_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/store.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            for i in 0..10u8 {
                commit(&s, vec![put(&format!("k/{i}"), &[i])]).await;
            }
            commit(&s, vec![put("k/0", b"again")]).await;
            commit(&s, vec![Op::Delete { key: "k/9".into() }]).await;
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.revision().await.unwrap(), 12);
        let (items, rev) = s.list("k/").await.unwrap();
        assert_eq!(rev, 12);
        assert_eq!(items.len(), 9);
        let k0 = s.get("k/0").await.unwrap().unwrap();
        assert_eq!((k0.create_revision, k0.mod_revision), (1, 11));
        assert_eq!(k0.value, b"again");
        // Revisions continue and are never reused.
        assert_eq!(commit(&s, vec![put("k/9", b"back")]).await, 13);
        assert_eq!(s.get("k/9").await.unwrap().unwrap().create_revision, 13);
        // The history survived too.
        let mut w = s.watch("k/", 0).await.unwrap();
        for want in 1..=13 {
            assert_eq!(next(&mut w).await.unwrap().revision, want);
        }
    }

    #[tokio::test]
    async fn acknowledged_write_is_on_disk_without_flush_or_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let crash_image = dir.path().join("crash.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(commit(&s, vec![put("a", b"1")]).await, 1);
        assert_eq!(commit(&s, vec![put("b", b"2")]).await, 2);
        // The file as a kill -9 right now would leave it: the store is still
        // open, so no drop or clean shutdown has run.
        std::fs::copy(&path, &crash_image).unwrap();
        drop(s);
        // Reopen the original after a plain drop, no explicit flush...
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.get("b").await.unwrap().unwrap().value, b"2");
        assert_eq!(s.revision().await.unwrap(), 2);
        // ...and the crash image, which redb must recover.
        let c = EmbeddedStore::open(&crash_image).unwrap();
        assert_eq!(c.revision().await.unwrap(), 2);
        assert_eq!(c.get("a").await.unwrap().unwrap().value, b"1");
        assert_eq!(c.get("b").await.unwrap().unwrap().value, b"2");
        assert_eq!(commit(&c, vec![put("c", b"3")]).await, 3);
    }

    #[tokio::test]
    async fn history_limit_trims_whole_revisions_and_yields_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("store.redb"))
            .unwrap()
            .with_history_limit(5);
        for i in 0..10u8 {
            commit(&s, vec![put("a", &[i])]).await;
        }
        // Revisions 6..=10 are the 5 retained events.
        match s.watch("", 0).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (1, 6))
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("watch from a compacted revision must fail"),
        }
        assert!(matches!(
            s.watch("", 4).await,
            Err(StoreError::Compacted {
                requested: 5,
                oldest: 6
            })
        ));
        let mut w = s.watch("", 5).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().revision, 6);

        // A 3-event revision pushes out whole revisions: 11 (3) + 10, 9.
        commit(&s, vec![put("x", b"1"), put("y", b"1"), put("z", b"1")]).await;
        assert!(matches!(
            s.watch("", 7).await,
            Err(StoreError::Compacted {
                requested: 8,
                oldest: 9
            })
        ));
        let mut w2 = s.watch("", 8).await.unwrap();
        let revs: Vec<_> = {
            let mut v = Vec::new();
            for _ in 0..5 {
                v.push(next(&mut w2).await.unwrap().revision);
            }
            v
        };
        assert_eq!(revs, [9, 10, 11, 11, 11]);

        // A revision larger than the limit is kept whole; older ones go.
        let big: Vec<Op> = (0..8).map(|i| put(&format!("big/{i}"), b"v")).collect();
        let r = commit(&s, big).await;
        assert_eq!(r, 12);
        assert!(matches!(
            s.watch("", 10).await,
            Err(StoreError::Compacted {
                requested: 11,
                oldest: 12
            })
        ));
        let mut w3 = s.watch("big/", 11).await.unwrap();
        for i in 0..8 {
            let e = next(&mut w3).await.unwrap();
            assert_eq!((e.revision, e.kv.key), (12, format!("big/{i}")));
        }

        // A lagging watcher that falls behind the history gets Compacted
        // from the stream, then the stream ends.
        let mut lag = s.watch("", 12).await.unwrap();
        for i in 0..20u8 {
            commit(&s, vec![put("a", &[i])]).await;
        }
        match next(&mut lag).await {
            Err(StoreError::Compacted {
                requested: 13,
                oldest,
            }) => assert!(oldest > 13),
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(lag.next().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_txns_commit_in_groups_each_with_its_own_revision_and_compares() {
        let (s, _dir) = fresh().await;
        commit_dyn(&s, vec![put("guard", b"0")]).await;
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                // Every 10th txn carries a compare that must fail; the
                // others' commits must not depend on it.
                let compares = if i % 10 == 0 {
                    vec![Compare::Absent("guard".into())]
                } else {
                    vec![Compare::Absent(format!("k/{i}"))]
                };
                s.txn(Txn {
                    compares,
                    ops: vec![put(&format!("k/{i}"), &i.to_be_bytes())],
                })
                .await
                .unwrap()
            }));
        }
        let mut revisions = std::collections::BTreeSet::new();
        let mut failed = 0;
        for t in tasks {
            match t.await.unwrap() {
                TxnOutcome::Committed(r) => assert!(revisions.insert(r), "revision {r} twice"),
                TxnOutcome::CompareFailed { index: 0 } => failed += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(failed, 30);
        assert_eq!(revisions.len(), 270);
        assert_eq!(s.revision().await.unwrap(), 271);
        let (items, _) = s.list("k/").await.unwrap();
        assert_eq!(items.len(), 270);
        assert!(s.get("k/10").await.unwrap().is_none());
    }

    async fn commit_dyn(s: &Arc<dyn Store>, ops: Vec<Op>) {
        s.txn(Txn {
            compares: vec![],
            ops,
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn history_limit_applies_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            for i in 0..10u8 {
                commit(&s, vec![put("a", &[i])]).await;
            }
        }
        let s = EmbeddedStore::open(&path).unwrap().with_history_limit(3);
        commit(&s, vec![put("a", b"last")]).await;
        assert!(matches!(
            s.watch("", 7).await,
            Err(StoreError::Compacted {
                requested: 8,
                oldest: 9
            })
        ));
        let mut w = s.watch("", 8).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().revision, 9);
    }

    /// The oldest revision a watch may still start after.
    async fn oldest_kept(s: &EmbeddedStore) -> Revision {
        match s.watch("", 0).await {
            Err(StoreError::Compacted { oldest, .. }) => oldest,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => 1,
        }
    }

    #[tokio::test]
    async fn history_is_trimmed_by_bytes_and_the_file_shrinks_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let big = vec![b'x'; 100 << 10];
        {
            // 1 MiB of history: ~10 revisions of 100 KiB each.
            let s = EmbeddedStore::open(&path)
                .unwrap()
                .with_history_bytes(1 << 20);
            for i in 0..200u32 {
                let mut v = big.clone();
                v[..4].copy_from_slice(&i.to_be_bytes());
                commit(&s, vec![put("a", &v)]).await;
            }
            let oldest = oldest_kept(&s).await;
            assert!(
                (190..=192).contains(&oldest),
                "about 10 revisions of 100 KiB fit in 1 MiB; oldest kept {oldest}"
            );
            // The newest revision is kept even when alone it is over.
            commit(&s, vec![put("b", &vec![b'y'; 2 << 20])]).await;
            assert_eq!(oldest_kept(&s).await, 201);
            let mut w = s.watch("", 200).await.unwrap();
            assert_eq!(next(&mut w).await.unwrap().revision, 201);
        }
        let grown = std::fs::metadata(&path).unwrap().len();
        {
            // Delete both keys, then trim everything but that delete.
            let s = EmbeddedStore::open(&path)
                .unwrap()
                .with_history_bytes(1 << 20)
                .with_history_limit(1);
            commit(
                &s,
                vec![
                    Op::Delete { key: "a".into() },
                    Op::Delete { key: "b".into() },
                ],
            )
            .await;
            commit(&s, vec![put("c", b"1")]).await;
        }
        let _reopened = EmbeddedStore::open(&path).unwrap();
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(
            after < grown / 2,
            "compaction at open gave the space back: {grown} -> {after} bytes"
        );
    }

    #[tokio::test]
    async fn dropping_the_store_closes_the_file_and_ends_watches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        commit(&s, vec![put("a", b"1")]).await;
        let mut w = s.watch("", 0).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().revision, 1);
        drop(s);
        // The open watch does not hold the file.
        let again = EmbeddedStore::open(&path).unwrap();
        assert!(matches!(next(&mut w).await, Err(StoreError::Closed)));
        assert!(w.next().await.is_none());
        assert_eq!(again.revision().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn second_open_of_the_same_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _s = EmbeddedStore::open(&path).unwrap();
        match EmbeddedStore::open(&path) {
            Err(StoreError::Io(m)) => assert!(m.contains("already open"), "{m}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a second open must fail"),
        }
    }

    #[tokio::test]
    async fn unknown_layout_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        drop(EmbeddedStore::open(&path).unwrap());
        {
            let db = Database::create(&path).unwrap();
            let wtx = db.begin_write().unwrap();
            wtx.open_table(META)
                .unwrap()
                .insert(META_FORMAT, 99)
                .unwrap();
            wtx.commit().unwrap();
        }
        match EmbeddedStore::open(&path) {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("layout version 99"), "{m}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("an unknown layout must be refused"),
        }
    }

    #[tokio::test]
    async fn corrupt_record_is_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        drop(EmbeddedStore::open(&path).unwrap());
        {
            let db = Database::create(&path).unwrap();
            let wtx = db.begin_write().unwrap();
            wtx.open_table(KV)
                .unwrap()
                .insert("bad", [9u8, 1, 2].as_slice())
                .unwrap();
            wtx.commit().unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert!(matches!(s.get("bad").await, Err(StoreError::Corrupt(_))));
        assert!(matches!(s.list("").await, Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn encodings_round_trip_and_reject_truncation() {
        let rec = encode_record(3, 7, b"value");
        let kv = decode_record("k", &rec).unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.value.as_slice()),
            (3, 7, &b"value"[..])
        );
        assert!(decode_record("k", &rec[..10]).is_err());

        let mut e = LogEntry::new();
        e.push(KIND_PUT, "p/a", 1, 4, b"x").unwrap();
        e.push(KIND_DELETE, "q/b", 2, 3, b"").unwrap();
        let bytes = e.finish();
        assert_eq!(log_event_count(4, &bytes).unwrap(), 2);
        let mut all = VecDeque::new();
        decode_log_entry(4, &bytes, "", &mut all).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].kind, EventKind::Delete);
        assert_eq!(all[1].kv.mod_revision, 3);
        let mut only_p = VecDeque::new();
        decode_log_entry(4, &bytes, "p/", &mut only_p).unwrap();
        assert_eq!(only_p.len(), 1);
        assert_eq!(only_p[0].kv.key, "p/a");
        for cut in 0..bytes.len() {
            assert!(decode_log_entry(4, &bytes[..cut], "", &mut VecDeque::new()).is_err());
        }
    }
}
