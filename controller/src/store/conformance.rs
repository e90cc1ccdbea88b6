//! The backend-independent test suite of the [`Store`] contract, so that the
//! embedded backend and any later one (etcd) cannot drift apart.
//!
//! This file owns the checks, nothing else. Each check is a public async
//! function that takes a fresh, empty store (no keys; its revision is the
//! backend's starting point) and panics on a violation. A backend runs all of them, one `#[tokio::test]` each,
//! with [`conformance_tests!`] from its own test module:
//!
//! ```ignore
//! async fn fresh() -> (Arc<dyn Store>, Guard) { ... }            // empty store
//! async fn fresh_short_history() -> (Arc<dyn Store>, Guard) { ... } // keeps <= SHORT_HISTORY events
//! crate::store::conformance::conformance_tests!(fresh, fresh_short_history);
//! ```
//!
//! The guard is whatever must outlive the store (a temp dir, a namespace).
//! Checks never sleep to synchronise: where they must show that something
//! did *not* happen, they commit a marker and expect it as the next event.
//! Timeouts are only deadlines.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{
    Compare, Event, EventKind, Op, Revision, Store, StoreError, Txn, TxnOutcome, WatchStream,
};

/// Events a store from the short-history factory may retain, at most.
pub const SHORT_HISTORY: usize = 5;

/// How long any single expected thing may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// Generates one `#[tokio::test]` per check in a `conformance_suite`
/// module. `$fresh` and `$short` name async fns in the calling module that
/// return `(Arc<dyn Store>, guard)`: an empty store, and an empty store
/// that keeps at most [`SHORT_HISTORY`] events of watch history.
macro_rules! conformance_tests {
    ($fresh:ident, $short:ident) => {
        mod conformance_suite {
            $crate::store::conformance::conformance_tests!(@each $fresh;
                revisions_start_at_one_and_increase,
                get_list_and_prefix_isolation,
                overwrite_keeps_create_revision,
                delete_then_recreate_resets_create_revision,
                failed_compare_applies_nothing,
                multi_op_txn_is_one_revision,
                delete_of_missing_key_is_a_noop,
                invalid_requests_apply_nothing,
                watch_from_zero_replays_then_goes_live,
                watch_from_middle_revision,
                watch_from_future_revision,
                watch_with_prefix_filter,
                concurrent_watchers_see_everything,
                slow_watcher_loses_nothing
            );
            $crate::store::conformance::conformance_tests!(@each $short;
                compacted_history_is_reported
            );
        }
    };
    (@each $factory:ident; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let (store, _guard) = super::$factory().await;
                $crate::store::conformance::$check(store).await;
            }
        )+
    };
}
pub(crate) use conformance_tests;

// --- helpers ----------------------------------------------------------------

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

fn del(key: &str) -> Op {
    Op::Delete { key: key.into() }
}

async fn txn(s: &dyn Store, compares: Vec<Compare>, ops: Vec<Op>) -> TxnOutcome {
    tokio::time::timeout(DEADLINE, s.txn(Txn { compares, ops }))
        .await
        .expect("txn answers in time")
        .expect("txn succeeds")
}

async fn commit(s: &dyn Store, ops: Vec<Op>) -> Revision {
    match txn(s, vec![], ops).await {
        TxnOutcome::Committed(r) => r,
        other => panic!("unconditional txn did not commit: {other:?}"),
    }
}

async fn revision(s: &dyn Store) -> Revision {
    s.revision().await.expect("revision")
}

async fn watch(s: &dyn Store, prefix: &str, after: Revision) -> WatchStream {
    tokio::time::timeout(DEADLINE, s.watch(prefix, after))
        .await
        .expect("watch answers in time")
        .expect("watch starts")
}

async fn next(w: &mut WatchStream) -> Event {
    tokio::time::timeout(DEADLINE, w.next())
        .await
        .expect("a watch event in time")
        .expect("the watch stream is open")
        .expect("the watch event is not an error")
}

fn keys(kvs: &[super::KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

// --- revisions, reads and writes ----------------------------------------------

pub async fn revisions_start_at_one_and_increase(s: Arc<dyn Store>) {
    let s = &*s;
    // A fresh store has some revision r0 (0 for the embedded backend, 1 for
    // a new etcd); the contract is only that writes come after it.
    let r0 = revision(s).await;
    assert_eq!(s.list("").await.unwrap(), (vec![], r0));
    // A txn without ops creates no revision.
    assert_eq!(commit(s, vec![]).await, r0);
    let first = commit(s, vec![put("a", "1")]).await;
    assert!(
        first > r0,
        "the first write {first} is above the start {r0}"
    );
    let mut last = first;
    for i in 0..5 {
        let r = commit(s, vec![put(&format!("k{i}"), "v")]).await;
        assert!(r > last, "revision {r} after {last} is not increasing");
        last = r;
    }
    assert_eq!(revision(s).await, last);
    assert_eq!(
        commit(s, vec![]).await,
        last,
        "no-op txn answers the current revision"
    );
    assert_eq!(revision(s).await, last);
}

pub async fn get_list_and_prefix_isolation(s: Arc<dyn Store>) {
    let s = &*s;
    // Written out of order, with look-alike prefixes and non-ASCII keys.
    let r = commit(
        s,
        vec![
            put("a/\u{e9}", "e"),
            put("ab/x", "z"),
            put("a/2", "y"),
            put("a", "bare"),
            put("a/1", "x"),
            put("b/1", "b"),
            put("a/z", "last"),
        ],
    )
    .await;
    let (items, rev) = s.list("a/").await.unwrap();
    assert_eq!(rev, r, "list reports the revision it read at");
    assert_eq!(
        keys(&items),
        ["a/1", "a/2", "a/z", "a/\u{e9}"],
        "sorted by key bytes, prefix only"
    );
    assert_eq!(items[0].value, b"x");
    assert!(items
        .iter()
        .all(|kv| kv.create_revision == r && kv.mod_revision == r));
    let (all, _) = s.list("").await.unwrap();
    assert_eq!(
        keys(&all),
        ["a", "a/1", "a/2", "a/z", "a/\u{e9}", "ab/x", "b/1"]
    );
    let (none, rev) = s.list("zz/").await.unwrap();
    assert!(none.is_empty());
    assert_eq!(rev, r);
    let kv = s.get("a/2").await.unwrap().expect("a/2 exists");
    assert_eq!((kv.key.as_str(), kv.value.as_slice()), ("a/2", &b"y"[..]));
    assert!(s.get("a/3").await.unwrap().is_none());
    assert!(
        s.get("a/").await.unwrap().is_none(),
        "get is exact, not a prefix match"
    );
}

pub async fn overwrite_keeps_create_revision(s: Arc<dyn Store>) {
    let s = &*s;
    let created = commit(s, vec![put("k", "1")]).await;
    commit(s, vec![put("other", "1")]).await;
    let modified = commit(s, vec![put("k", "2")]).await;
    let kv = s.get("k").await.unwrap().expect("k exists");
    assert_eq!((kv.create_revision, kv.mod_revision), (created, modified));
    assert_eq!(kv.value, b"2");
    // The same value again is still a change.
    let again = commit(s, vec![put("k", "2")]).await;
    assert!(again > modified);
    let kv = s.get("k").await.unwrap().expect("k exists");
    assert_eq!((kv.create_revision, kv.mod_revision), (created, again));
}

pub async fn delete_then_recreate_resets_create_revision(s: Arc<dyn Store>) {
    let s = &*s;
    commit(s, vec![put("k", "1")]).await;
    commit(s, vec![del("k")]).await;
    assert!(s.get("k").await.unwrap().is_none());
    assert!(s.list("").await.unwrap().0.is_empty());
    let again = commit(s, vec![put("k", "2")]).await;
    let kv = s.get("k").await.unwrap().expect("k exists");
    assert_eq!((kv.create_revision, kv.mod_revision), (again, again));
}

pub async fn failed_compare_applies_nothing(s: Arc<dyn Store>) {
    let s = &*s;
    let r1 = commit(s, vec![put("k", "1")]).await;
    let mut w = watch(s, "", r1).await;
    // The first failing compare is reported, by index.
    let out = txn(
        s,
        vec![
            Compare::ModRevision("k".into(), r1),
            Compare::Absent("new".into()),
            Compare::Absent("k".into()),
            Compare::ModRevision("missing".into(), r1),
        ],
        vec![put("k", "2"), put("new", "x"), del("k2")],
    )
    .await;
    assert_eq!(out, TxnOutcome::CompareFailed { index: 2 });
    let out = txn(
        s,
        vec![Compare::ModRevision("missing".into(), r1)],
        vec![put("k", "2")],
    )
    .await;
    assert_eq!(
        out,
        TxnOutcome::CompareFailed { index: 0 },
        "ModRevision of a missing key fails"
    );
    let out = txn(
        s,
        vec![Compare::ModRevision("k".into(), r1 + 100)],
        vec![put("k", "2")],
    )
    .await;
    assert_eq!(
        out,
        TxnOutcome::CompareFailed { index: 0 },
        "a wrong ModRevision fails"
    );
    // Compares without ops are checked too.
    let out = txn(s, vec![Compare::Absent("k".into())], vec![]).await;
    assert_eq!(out, TxnOutcome::CompareFailed { index: 0 });
    assert_eq!(
        txn(s, vec![Compare::Absent("new".into())], vec![]).await,
        TxnOutcome::Committed(r1)
    );
    // Nothing applied, no revision, no event.
    assert_eq!(s.get("k").await.unwrap().expect("k exists").value, b"1");
    assert!(s.get("new").await.unwrap().is_none());
    assert_eq!(revision(s).await, r1);
    let out = txn(
        s,
        vec![
            Compare::ModRevision("k".into(), r1),
            Compare::Absent("new".into()),
        ],
        vec![put("k", "2"), put("new", "x")],
    )
    .await;
    let TxnOutcome::Committed(r2) = out else {
        panic!("compares that hold must commit: {out:?}");
    };
    assert!(r2 > r1);
    let e = next(&mut w).await;
    assert_eq!(
        (e.kv.key.as_str(), e.revision),
        ("k", r2),
        "the failed txns made no events"
    );
}

pub async fn multi_op_txn_is_one_revision(s: Arc<dyn Store>) {
    let s = &*s;
    let r0 = commit(s, vec![put("c", "old")]).await;
    let mut w = watch(s, "", r0).await;
    let r = commit(s, vec![put("b", "1"), del("c"), put("a", "1")]).await;
    assert!(r > r0);
    assert_eq!(revision(s).await, r);
    let (items, _) = s.list("").await.unwrap();
    assert_eq!(keys(&items), ["a", "b"]);
    assert!(items
        .iter()
        .all(|kv| kv.mod_revision == r && kv.create_revision == r));
    // Events of one txn share its revision and come in op order.
    let got: Vec<_> = [next(&mut w).await, next(&mut w).await, next(&mut w).await]
        .into_iter()
        .map(|e| (e.kind, e.kv.key, e.revision))
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::Put, "b".to_string(), r),
            (EventKind::Delete, "c".to_string(), r),
            (EventKind::Put, "a".to_string(), r),
        ]
    );
}

pub async fn delete_of_missing_key_is_a_noop(s: Arc<dyn Store>) {
    let s = &*s;
    let r0 = commit(s, vec![put("x", "0")]).await;
    let mut w = watch(s, "", r0).await;
    // Only missing deletes: nothing changes, no revision.
    assert_eq!(commit(s, vec![del("nope"), del("nope2")]).await, r0);
    assert_eq!(revision(s).await, r0);
    // Mixed with a real change: one revision, no event for the missing key.
    let r1 = commit(s, vec![del("nope"), put("x", "1")]).await;
    assert!(r1 > r0);
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.kv.key.as_str(), e.revision),
        (EventKind::Put, "x", r1)
    );
    let r2 = commit(s, vec![put("marker", "")]).await;
    let e = next(&mut w).await;
    assert_eq!((e.kv.key.as_str(), e.revision), ("marker", r2));
}

pub async fn invalid_requests_apply_nothing(s: Arc<dyn Store>) {
    let s = &*s;
    let r0 = commit(s, vec![put("k", "1")]).await;
    let cases = [
        Txn {
            compares: vec![],
            ops: vec![put("", "x")],
        },
        Txn {
            compares: vec![],
            ops: vec![put("ok", "x"), del("")],
        },
        Txn {
            compares: vec![Compare::Absent(String::new())],
            ops: vec![put("ok", "x")],
        },
        Txn {
            compares: vec![],
            ops: vec![put("ok", "1"), put("ok", "2")],
        },
        Txn {
            compares: vec![],
            ops: vec![put("k", "2"), del("k")],
        },
    ];
    for t in cases {
        match s.txn(t.clone()).await {
            Err(StoreError::Invalid(_)) => {}
            other => panic!("{t:?} must be Invalid, got {other:?}"),
        }
    }
    assert!(matches!(s.get("").await, Err(StoreError::Invalid(_))));
    assert_eq!(revision(s).await, r0);
    assert!(s.get("ok").await.unwrap().is_none());
    assert_eq!(s.get("k").await.unwrap().expect("k exists").value, b"1");
}

// --- watch --------------------------------------------------------------------

pub async fn watch_from_zero_replays_then_goes_live(s: Arc<dyn Store>) {
    let s = &*s;
    let r1 = commit(s, vec![put("a", "1")]).await;
    let r2 = commit(s, vec![put("a", "2")]).await;
    let r3 = commit(s, vec![del("a")]).await;
    let mut w = watch(s, "", 0).await;
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.revision, e.kv.value.as_slice()),
        (EventKind::Put, r1, &b"1"[..])
    );
    assert_eq!((e.kv.create_revision, e.kv.mod_revision), (r1, r1));
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.revision), (EventKind::Put, r2));
    assert_eq!((e.kv.create_revision, e.kv.mod_revision), (r1, r2));
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.revision, e.kv.key.as_str()),
        (EventKind::Delete, r3, "a")
    );
    assert_eq!(e.kv.value, b"2", "a delete carries the value it removed");
    assert_eq!((e.kv.create_revision, e.kv.mod_revision), (r1, r2));
    // Live.
    let r4 = commit(s, vec![put("b", "live")]).await;
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.kv.key.as_str(), e.revision),
        (EventKind::Put, "b", r4)
    );
    let r5 = commit(s, vec![put("b", "again")]).await;
    let e = next(&mut w).await;
    assert_eq!((e.kv.value.as_slice(), e.revision), (&b"again"[..], r5));
}

pub async fn watch_from_middle_revision(s: Arc<dyn Store>) {
    let s = &*s;
    let r1 = commit(s, vec![put("k/1", "a")]).await;
    let r2 = commit(s, vec![put("k/2", "a"), put("k/3", "a")]).await;
    let r3 = commit(s, vec![put("k/1", "b")]).await;
    let mut w = watch(s, "k/", r1).await;
    let got = [next(&mut w).await, next(&mut w).await, next(&mut w).await];
    let got: Vec<_> = got
        .iter()
        .map(|e| (e.kv.key.as_str(), e.revision))
        .collect();
    assert_eq!(
        got,
        [("k/2", r2), ("k/3", r2), ("k/1", r3)],
        "starts right after `after`"
    );
    let r4 = commit(s, vec![put("k/4", "a")]).await;
    assert_eq!(next(&mut w).await.revision, r4);
    // Watching from the current revision sees only what comes next.
    let mut w = watch(s, "", r4).await;
    let r5 = commit(s, vec![put("k/5", "a")]).await;
    let e = next(&mut w).await;
    assert_eq!((e.kv.key.as_str(), e.revision), ("k/5", r5));
}

pub async fn watch_from_future_revision(s: Arc<dyn Store>) {
    let s = &*s;
    let r1 = commit(s, vec![put("k", "1")]).await;
    let after = r1 + 1;
    let mut w = watch(s, "", after).await;
    let mut later = Vec::new();
    while later.last().is_none_or(|r| *r <= after) {
        later.push(commit(s, vec![put("k", &later.len().to_string())]).await);
    }
    // Only the events after `after`, whichever revisions they got.
    for want in later.iter().filter(|r| **r > after) {
        assert_eq!(next(&mut w).await.revision, *want);
    }
    let marker = commit(s, vec![put("marker", "")]).await;
    assert_eq!(next(&mut w).await.revision, marker);
}

pub async fn watch_with_prefix_filter(s: Arc<dyn Store>) {
    let s = &*s;
    let mut w = watch(s, "a/", 0).await;
    commit(s, vec![put("ab/x", "no"), put("b/1", "no")]).await;
    let r = commit(
        s,
        vec![put("a", "no"), put("a/1", "yes"), put("ab/y", "no")],
    )
    .await;
    commit(s, vec![put("ab/z", "no"), del("ab/x")]).await;
    let r2 = commit(s, vec![del("a/1")]).await;
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.kv.key.as_str(), e.revision),
        (EventKind::Put, "a/1", r)
    );
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.kv.key.as_str(), e.revision),
        (EventKind::Delete, "a/1", r2)
    );
    // Replay with the same filter gives the same events.
    let mut replay = watch(s, "a/", 0).await;
    assert_eq!(next(&mut replay).await.revision, r);
    assert_eq!(next(&mut replay).await.revision, r2);
    let r3 = commit(s, vec![put("ab/w", "no"), put("a/2", "yes")]).await;
    let e = next(&mut w).await;
    assert_eq!((e.kv.key.as_str(), e.revision), ("a/2", r3));
    assert_eq!(next(&mut replay).await.revision, r3);
}

/// Several writers race; two watchers started before, and one after the
/// first writes, each see every event exactly once, in revision order.
pub async fn concurrent_watchers_see_everything(s: Arc<dyn Store>) {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 40;
    let mut a = watch(&*s, "", 0).await;
    let mut b = watch(&*s, "", 0).await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut revs = Vec::with_capacity(PER_WRITER);
                for i in 0..PER_WRITER {
                    let r = commit(
                        &*s,
                        vec![
                            put(&format!("w{w}/{i}"), "v"),
                            put(&format!("all/{w}"), "v"),
                        ],
                    )
                    .await;
                    revs.push(r);
                }
                revs
            })
        })
        .collect();
    let mut c = watch(&*s, "", 0).await;
    let mut committed = BTreeSet::new();
    for h in writers {
        committed.extend(h.await.expect("writer task"));
    }
    assert_eq!(
        committed.len(),
        WRITERS * PER_WRITER,
        "every txn got its own revision"
    );
    for w in [&mut a, &mut b, &mut c] {
        let mut seen = Vec::new();
        let mut keys = BTreeSet::new();
        for _ in 0..WRITERS * PER_WRITER * 2 {
            let e = next(w).await;
            keys.insert(e.kv.key.clone());
            seen.push(e.revision);
        }
        assert!(seen.windows(2).all(|p| p[0] <= p[1]), "in revision order");
        let distinct: BTreeSet<_> = seen.iter().copied().collect();
        assert_eq!(
            distinct, committed,
            "every committed revision, nothing else"
        );
        assert!(
            seen.chunks(2).all(|p| p[0] == p[1]),
            "both events of each txn, together"
        );
        assert_eq!(keys.len(), WRITERS * PER_WRITER + WRITERS);
    }
}

/// A watcher that is not polled while many commits happen still gets all of
/// them afterwards, then live events.
pub async fn slow_watcher_loses_nothing(s: Arc<dyn Store>) {
    const N: usize = 600;
    let s = &*s;
    let mut w = watch(s, "", 0).await;
    let first = next_live_or_commit(s, &mut w).await;
    let mut revs = vec![first];
    for i in 0..N {
        revs.push(commit(s, vec![put(&format!("k/{}", i % 7), &i.to_string())]).await);
    }
    for (i, want) in revs.iter().enumerate().skip(1) {
        let e = next(&mut w).await;
        assert_eq!(e.revision, *want, "event {i}");
        assert_eq!(e.kv.value, (i - 1).to_string().as_bytes());
    }
    let live = commit(s, vec![put("live", "1")]).await;
    assert_eq!(next(&mut w).await.revision, live);
}

/// Commits one event and reads it, so the watcher is surely live (caught
/// up and waiting) before the burst.
async fn next_live_or_commit(s: &dyn Store, w: &mut WatchStream) -> Revision {
    let r = commit(s, vec![put("start", "")]).await;
    let e = next(w).await;
    assert_eq!(e.revision, r);
    r
}

// --- compaction ---------------------------------------------------------------

/// Needs a store that retains at most [`SHORT_HISTORY`] events.
pub async fn compacted_history_is_reported(s: Arc<dyn Store>) {
    let s = &*s;
    let mut revs = Vec::new();
    for i in 0..4 * SHORT_HISTORY {
        revs.push(commit(s, vec![put("k", &i.to_string())]).await);
    }
    let last = *revs.last().expect("some revisions");
    let oldest = match s.watch("", 0).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, 1, "the first revision watch(after = 0) needs");
            assert!(oldest > 1 && oldest <= last, "oldest {oldest} out of range");
            oldest
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("watching compacted history must fail"),
    };
    assert!(
        (last - oldest) < 2 * SHORT_HISTORY as u64,
        "retained history {oldest}..={last} is much longer than {SHORT_HISTORY} events"
    );
    // The error message names both revisions.
    if let Err(e) = s.watch("", 0).await {
        let msg = e.to_string();
        assert!(
            msg.contains("compacted") && msg.contains(&oldest.to_string()),
            "{msg}"
        );
    }
    // Right after the compaction point still works, with every retained event.
    let mut w = watch(s, "", oldest - 1).await;
    for want in revs.iter().filter(|r| **r >= oldest) {
        assert_eq!(next(&mut w).await.revision, *want);
    }
    // Reads are unaffected by compaction.
    let kv = s.get("k").await.unwrap().expect("k exists");
    assert_eq!((kv.create_revision, kv.mod_revision), (revs[0], last));
    let live = commit(s, vec![put("k", "live")]).await;
    assert_eq!(next(&mut w).await.revision, live);
}
