//! One test suite for every store backend, so their semantics cannot drift
//! apart. Each check gets a fresh, empty store from the factory.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{Compare, EventKind, Op, Store, Txn, TxnOutcome, WatchStream};

fn put(k: &str, v: &str) -> Op {
    Op::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
    }
}

async fn commit(s: &dyn Store, ops: Vec<Op>) -> u64 {
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

async fn next(w: &mut WatchStream) -> super::Event {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("watch event within 5s")
        .expect("stream open")
        .expect("no error")
}

/// Runs every check; `fresh` returns a new empty store and a guard that
/// keeps its resources alive.
pub async fn run_all<G>(mut fresh: impl FnMut() -> (Arc<dyn Store>, G)) {
    let (s, _g) = fresh();
    revisions_start_at_one_and_increase(&*s).await;
    let (s, _g) = fresh();
    get_list_and_prefix_isolation(&*s).await;
    let (s, _g) = fresh();
    overwrite_keeps_create_revision(&*s).await;
    let (s, _g) = fresh();
    failed_compare_applies_nothing(&*s).await;
    let (s, _g) = fresh();
    multi_op_txn_is_one_revision(&*s).await;
    let (s, _g) = fresh();
    delete_of_missing_key_is_a_noop(&*s).await;
    let (s, _g) = fresh();
    watch_replays_then_goes_live(&*s).await;
    let (s, _g) = fresh();
    watch_from_middle_with_prefix(&*s).await;
    let (s, _g) = fresh();
    concurrent_watchers_see_everything(s).await;
}

async fn revisions_start_at_one_and_increase(s: &dyn Store) {
    assert_eq!(s.revision().await.unwrap(), 0);
    assert_eq!(commit(s, vec![put("a", "1")]).await, 1);
    assert_eq!(commit(s, vec![put("b", "1")]).await, 2);
    assert_eq!(s.revision().await.unwrap(), 2);
    // An empty txn makes no revision.
    assert_eq!(commit(s, vec![]).await, 2);
}

async fn get_list_and_prefix_isolation(s: &dyn Store) {
    commit(s, vec![put("a/1", "x"), put("a/2", "y"), put("ab/x", "z")]).await;
    let (items, rev) = s.list("a/").await.unwrap();
    assert_eq!(rev, 1);
    let keys: Vec<_> = items.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["a/1", "a/2"]);
    assert_eq!(s.get("a/2").await.unwrap().unwrap().value, b"y");
    assert!(s.get("a/3").await.unwrap().is_none());
}

async fn overwrite_keeps_create_revision(s: &dyn Store) {
    commit(s, vec![put("k", "1")]).await;
    commit(s, vec![put("other", "1")]).await;
    commit(s, vec![put("k", "2")]).await;
    let kv = s.get("k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (1, 3));
    assert_eq!(kv.value, b"2");
}

async fn failed_compare_applies_nothing(s: &dyn Store) {
    commit(s, vec![put("k", "1")]).await;
    let out = s
        .txn(Txn {
            compares: vec![
                Compare::ModRevision("k".into(), 1),
                Compare::Absent("k".into()),
            ],
            ops: vec![put("k", "2"), put("new", "x")],
        })
        .await
        .unwrap();
    assert_eq!(out, TxnOutcome::CompareFailed { index: 1 });
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"1");
    assert!(s.get("new").await.unwrap().is_none());
    assert_eq!(s.revision().await.unwrap(), 1);
    let ok = s
        .txn(Txn {
            compares: vec![Compare::ModRevision("k".into(), 1)],
            ops: vec![put("k", "2")],
        })
        .await
        .unwrap();
    assert_eq!(ok, TxnOutcome::Committed(2));
}

async fn multi_op_txn_is_one_revision(s: &dyn Store) {
    let rev = commit(s, vec![put("a", "1"), put("b", "1"), put("c", "1")]).await;
    assert_eq!(rev, 1);
    let (items, _) = s.list("").await.unwrap();
    assert!(items.iter().all(|kv| kv.mod_revision == 1));
}

async fn delete_of_missing_key_is_a_noop(s: &dyn Store) {
    let mut w = s.watch("", 0).await.unwrap();
    commit(s, vec![Op::Delete { key: "nope".into() }]).await;
    commit(s, vec![put("x", "1")]).await;
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.key.as_str()), (EventKind::Put, "x"));
}

async fn watch_replays_then_goes_live(s: &dyn Store) {
    commit(s, vec![put("a", "1")]).await;
    commit(s, vec![Op::Delete { key: "a".into() }]).await;
    let mut w = s.watch("", 0).await.unwrap();
    let e1 = next(&mut w).await;
    assert_eq!((e1.kind, e1.revision), (EventKind::Put, 1));
    let e2 = next(&mut w).await;
    assert_eq!((e2.kind, e2.revision), (EventKind::Delete, 2));
    assert_eq!(e2.kv.value, b"1", "a delete carries the old value");
    commit(s, vec![put("b", "live")]).await;
    let e3 = next(&mut w).await;
    assert_eq!((e3.kv.key.as_str(), e3.revision), ("b", 3));
}

async fn watch_from_middle_with_prefix(s: &dyn Store) {
    commit(s, vec![put("p/1", "a")]).await;
    commit(s, vec![put("q/1", "a")]).await;
    commit(s, vec![put("p/2", "a")]).await;
    let mut w = s.watch("p/", 1).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.kv.key.as_str(), e.revision), ("p/2", 3));
    commit(s, vec![put("q/2", "a")]).await;
    commit(s, vec![put("p/3", "a")]).await;
    let e = next(&mut w).await;
    assert_eq!((e.kv.key.as_str(), e.revision), ("p/3", 5));
}

async fn concurrent_watchers_see_everything(s: Arc<dyn Store>) {
    let mut a = s.watch("", 0).await.unwrap();
    let mut b = s.watch("", 0).await.unwrap();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                commit(&*s, vec![put(&format!("k/{i}"), "v")]).await;
            }
        })
    };
    for w in [&mut a, &mut b] {
        for want in 1..=200u64 {
            assert_eq!(next(w).await.revision, want);
        }
    }
    writer.await.unwrap();
}
