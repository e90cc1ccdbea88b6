//! Work queues of pipeline runs: one durable queue per worker step of a
//! run, kept in the controller's store (so it survives controller restarts
//! and, on etcd, fails over with the leader) and reached by step containers
//! through their agent (NodeService.QueueLease/QueueAck/QueuePush).
//!
//! Why in the controller: the platform has no broker to depend on, and a
//! step's items belong with the run's other state — durable in the same
//! store, deleted with the run, authorised by the same node identities. An
//! item is a key under `pending/`, moved to `leased/` (with the leasing
//! instance) and then to `done/`, each move one compare-and-swap
//! transaction, so a worker that dies leaves its items leased to it and the
//! run controller puts them back.
//!
//! Keys (outside `/registry/`, so queue traffic wakes no reconciler):
//! `/queues/<run>/<step>/{pending,leased,done}/<item key>` and
//! `/queues/<run>/<step>/seeded/<chunk>` for the idempotent seeding of a
//! step's inline items.

use std::sync::Arc;

use ironmesh_api::pipeline::QueueStatus;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::store::{Compare, Op, Store, StoreError, Txn, TxnOutcome};

/// Prefix of every queue key.
pub const PREFIX: &str = "/queues/";

/// Ops per transaction: etcd's default `--max-txn-ops` is 128.
const CHUNK: usize = 100;
/// Most items one lease hands out.
pub const MAX_LEASE: usize = 16;
/// Most items one push may add.
pub const MAX_PUSH: usize = 10_000;
/// Most items pushed to the queues of one run, over its life: a looping
/// producer must not fill the controller's store.
pub const MAX_RUN_PUSHED: u64 = 1_000_000;
/// Compare-and-swap attempts on the run's pushed counter.
const CAS_RETRIES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("item {0:?} is not leased to this instance")]
    NotLeased(String),
    #[error("stored queue entry {key} is unreadable: {error}")]
    Corrupt { key: String, error: String },
    #[error("a push may add at most {MAX_PUSH} items, this one has {0}: push in batches")]
    PushTooLarge(usize),
    #[error("run {run} has had {pushed} items pushed; a run may be pushed at most {MAX_RUN_PUSHED} in all")]
    RunFull { run: String, pushed: u64 },
    #[error("the pushed-items counter of run {0} is contended; try again")]
    Contended(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    item: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    instance: String,
    /// Leased: Unix second the lease ends; then any worker may take it
    /// (a worker that died or never got the reply does not hold it).
    #[serde(default, skip_serializing_if = "is_zero")]
    until: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One leased item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    pub id: String,
    pub item: String,
}

/// What a lease got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    Items(Vec<Leased>),
    /// Nothing pending, but items are leased to others (they may come back).
    Wait,
    /// Nothing pending and nothing leased.
    Drained,
}

/// The queue of one worker step of one run.
#[derive(Clone)]
pub struct Queue {
    store: Arc<dyn Store>,
    run: String,
    base: String,
}

impl Queue {
    pub fn new(store: Arc<dyn Store>, run: &str, step: &str) -> Queue {
        Queue {
            store,
            run: run.to_string(),
            base: format!("{PREFIX}{run}/{step}/"),
        }
    }

    /// Items pushed to any queue of this run so far (step names cannot
    /// start with '.', so this key is no step's).
    fn pushed_key(&self) -> String {
        format!("{PREFIX}{}/.pushed", self.run)
    }

    fn key(&self, state: &str, id: &str) -> String {
        format!("{}{state}/{id}", self.base)
    }

    /// Queues `items` of the step's spec once, whatever happens to this
    /// call: chunk `k` is written together with its `seeded/k` marker.
    pub async fn seed(&self, items: &[String]) -> Result<(), QueueError> {
        for (k, chunk) in items.chunks(CHUNK - 1).enumerate() {
            let marker = self.key("seeded", &format!("{k:06}"));
            let mut ops = vec![Op::Put {
                key: marker.clone(),
                value: Vec::new(),
            }];
            for (i, item) in chunk.iter().enumerate() {
                let id = format!("s{:08}", k * (CHUNK - 1) + i);
                ops.push(Op::Put {
                    key: self.key("pending", &id),
                    value: encode(&Entry {
                        item: item.clone(),
                        ..Entry::default()
                    }),
                });
            }
            // A marker already there means this chunk went in before.
            self.store
                .txn(Txn {
                    compares: vec![Compare::Absent(marker)],
                    ops,
                })
                .await?;
        }
        Ok(())
    }

    /// Adds `items` (at least once: a retried push may add them twice),
    /// within [`MAX_PUSH`] per call and [`MAX_RUN_PUSHED`] per run.
    pub async fn push(&self, items: &[String]) -> Result<usize, QueueError> {
        if items.len() > MAX_PUSH {
            return Err(QueueError::PushTooLarge(items.len()));
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tag: u32 = rand::rng().random();
        let counter = self.pushed_key();
        // The whole push must fit, so a refusal leaves nothing half-pushed
        // (the per-chunk check below still holds against concurrent pushes).
        let pushed_now = self.pushed(&counter).await?;
        if pushed_now + items.len() as u64 > MAX_RUN_PUSHED {
            return Err(QueueError::RunFull {
                run: self.run.clone(),
                pushed: pushed_now,
            });
        }
        for (k, chunk) in items.chunks(CHUNK - 1).enumerate() {
            let ops: Vec<Op> = chunk
                .iter()
                .enumerate()
                .map(|(i, item)| Op::Put {
                    key: self.key("pending", &format!("u{stamp:020}{tag:08x}{k:04}{i:03}")),
                    value: encode(&Entry {
                        item: item.clone(),
                        ..Entry::default()
                    }),
                })
                .collect();
            // Each chunk moves the counter with it, compare-and-swap.
            let mut committed = false;
            for _ in 0..CAS_RETRIES {
                let cur = self.store.get(&counter).await?;
                let pushed: u64 = cur
                    .as_ref()
                    .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
                    .unwrap_or(0);
                let next = pushed + chunk.len() as u64;
                if next > MAX_RUN_PUSHED {
                    return Err(QueueError::RunFull {
                        run: self.run.clone(),
                        pushed,
                    });
                }
                let compare = match &cur {
                    Some(kv) => Compare::ModRevision(counter.clone(), kv.mod_revision),
                    None => Compare::Absent(counter.clone()),
                };
                let mut all = ops.clone();
                all.push(Op::Put {
                    key: counter.clone(),
                    value: next.to_string().into_bytes(),
                });
                if let TxnOutcome::Committed(_) = self
                    .store
                    .txn(Txn {
                        compares: vec![compare],
                        ops: all,
                    })
                    .await?
                {
                    committed = true;
                    break;
                }
            }
            if !committed {
                return Err(QueueError::Contended(self.run.clone()));
            }
        }
        Ok(items.len())
    }

    async fn pushed(&self, counter: &str) -> Result<u64, QueueError> {
        Ok(self
            .store
            .get(counter)
            .await?
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// Leases up to `max` items to `instance` for `lease_for`: pending
    /// ones, or, when none are pending, leased ones whose lease ran out.
    pub async fn lease(
        &self,
        instance: &str,
        max: usize,
        lease_for: std::time::Duration,
    ) -> Result<LeaseOutcome, QueueError> {
        let max = max.clamp(1, MAX_LEASE);
        loop {
            let now = now_secs();
            let (mut pending, _) = self.store.list(&self.key("pending", "")).await?;
            let mut expired = false;
            if pending.is_empty() {
                let (leased, _) = self.store.list(&self.key("leased", "")).await?;
                if leased.is_empty() {
                    return Ok(LeaseOutcome::Drained);
                }
                pending = Vec::with_capacity(leased.len());
                for kv in leased {
                    if decode(&kv.key, &kv.value)?.until < now {
                        pending.push(kv);
                    }
                }
                if pending.is_empty() {
                    return Ok(LeaseOutcome::Wait);
                }
                expired = true;
            }
            // Workers racing for the head of the queue would mostly lose;
            // start at a random place near it instead.
            let window = pending.len().min(4 * MAX_LEASE);
            let start = if pending.len() > max {
                rand::rng().random_range(0..window.saturating_sub(max).max(1))
            } else {
                0
            };
            let take = &pending[start..(start + max).min(pending.len())];
            let mut txn = Txn::default();
            let mut got = Vec::with_capacity(take.len());
            for kv in take {
                let id = kv.key.rsplit('/').next().unwrap_or_default().to_string();
                let mut e: Entry = decode(&kv.key, &kv.value)?;
                if expired {
                    tracing::info!(item = %e.item, from = %e.instance, to = %instance, "lease expired; item handed out again");
                }
                e.instance = instance.to_string();
                e.until = now + lease_for.as_secs().max(1);
                txn.compares
                    .push(Compare::ModRevision(kv.key.clone(), kv.mod_revision));
                if !expired {
                    txn.ops.push(Op::Delete {
                        key: kv.key.clone(),
                    });
                }
                txn.ops.push(Op::Put {
                    key: self.key("leased", &id),
                    value: encode(&e),
                });
                got.push(Leased { id, item: e.item });
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed(_) => return Ok(LeaseOutcome::Items(got)),
                TxnOutcome::CompareFailed { .. } => continue,
            }
        }
    }

    /// Completes (or, with `release`, puts back) items leased to
    /// `instance`.
    pub async fn ack(
        &self,
        instance: &str,
        ids: &[String],
        release: bool,
    ) -> Result<usize, QueueError> {
        for chunk in ids.chunks(CHUNK / 2) {
            let mut txn = Txn::default();
            for id in chunk {
                if id.is_empty() || id.contains('/') {
                    return Err(QueueError::NotLeased(id.clone()));
                }
                let key = self.key("leased", id);
                let Some(kv) = self.store.get(&key).await? else {
                    // A retried ack whose first try went through (the
                    // reply was lost) is not an error.
                    let done = self.store.get(&self.key("done", id)).await?;
                    match done {
                        Some(d) if !release && decode(&key, &d.value)?.instance == instance => {
                            continue
                        }
                        _ => return Err(QueueError::NotLeased(id.clone())),
                    }
                };
                let mut e: Entry = decode(&key, &kv.value)?;
                if e.instance != instance {
                    return Err(QueueError::NotLeased(id.clone()));
                }
                txn.compares
                    .push(Compare::ModRevision(key.clone(), kv.mod_revision));
                txn.ops.push(Op::Delete { key });
                e.until = 0;
                let value = if release {
                    e.instance.clear();
                    encode(&e)
                } else {
                    // Only who completed it: the item is not needed any more.
                    encode(&Entry {
                        instance: e.instance.clone(),
                        ..Entry::default()
                    })
                };
                let to = if release { "pending" } else { "done" };
                txn.ops.push(Op::Put {
                    key: self.key(to, id),
                    value,
                });
            }
            if let TxnOutcome::CompareFailed { index } = self.store.txn(txn).await? {
                return Err(QueueError::NotLeased(chunk[index].clone()));
            }
        }
        Ok(ids.len())
    }

    /// Puts back every item leased to one of `instances` (workers that
    /// ended without finishing them). Returns how many.
    pub async fn release_all_of(&self, instances: &[&str]) -> Result<usize, QueueError> {
        let (leased, _) = self.store.list(&self.key("leased", "")).await?;
        let mut n = 0;
        for kv in leased {
            let mut e: Entry = decode(&kv.key, &kv.value)?;
            if !instances.contains(&e.instance.as_str()) {
                continue;
            }
            let id = kv.key.rsplit('/').next().unwrap_or_default().to_string();
            e.instance.clear();
            e.until = 0;
            let outcome = self
                .store
                .txn(Txn {
                    compares: vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
                    ops: vec![
                        Op::Delete { key: kv.key },
                        Op::Put {
                            key: self.key("pending", &id),
                            value: encode(&e),
                        },
                    ],
                })
                .await?;
            if matches!(outcome, TxnOutcome::Committed(_)) {
                n += 1;
            }
        }
        Ok(n)
    }

    pub async fn status(&self) -> Result<QueueStatus, QueueError> {
        let count = |state: &'static str| {
            let prefix = self.key(state, "");
            async move { self.store.list(&prefix).await.map(|(l, _)| l.len() as u64) }
        };
        Ok(QueueStatus {
            pending: count("pending").await?,
            leased: count("leased").await?,
            done: count("done").await?,
        })
    }
}

/// Deletes every queue key of `run`.
pub async fn delete_run(store: &Arc<dyn Store>, run: &str) -> Result<usize, StoreError> {
    let (keys, _) = store.list(&format!("{PREFIX}{run}/")).await?;
    let n = keys.len();
    for chunk in keys.chunks(CHUNK) {
        store
            .txn(Txn {
                compares: Vec::new(),
                ops: chunk
                    .iter()
                    .map(|kv| Op::Delete {
                        key: kv.key.clone(),
                    })
                    .collect(),
            })
            .await?;
    }
    Ok(n)
}

fn encode(e: &Entry) -> Vec<u8> {
    serde_json::to_vec(e).unwrap_or_default()
}

fn decode(key: &str, v: &[u8]) -> Result<Entry, QueueError> {
    serde_json::from_slice(v).map_err(|e| QueueError::Corrupt {
        key: key.to_string(),
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        (dir, Arc::new(s))
    }

    const LEASE: std::time::Duration = std::time::Duration::from_secs(60);

    fn items(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("item-{i}")).collect()
    }

    #[tokio::test]
    async fn seed_is_idempotent_and_every_item_is_leased_once() {
        let (_d, s) = store().await;
        let q = Queue::new(s.clone(), "run", "work");
        q.seed(&items(250)).await.unwrap();
        q.seed(&items(250)).await.unwrap();
        assert_eq!(q.status().await.unwrap().pending, 250);
        let mut seen = std::collections::BTreeSet::new();
        loop {
            match q.lease("w1", 7, LEASE).await.unwrap() {
                LeaseOutcome::Items(got) => {
                    let ids: Vec<String> = got.iter().map(|l| l.id.clone()).collect();
                    for l in got {
                        assert!(seen.insert(l.item.clone()), "{} twice", l.item);
                    }
                    assert_eq!(q.ack("w1", &ids, false).await.unwrap(), ids.len());
                }
                LeaseOutcome::Drained => break,
                LeaseOutcome::Wait => panic!("nothing is leased"),
            }
        }
        assert_eq!(seen.len(), 250);
        let st = q.status().await.unwrap();
        assert_eq!((st.pending, st.leased, st.done), (0, 0, 250));
    }

    #[tokio::test]
    async fn pushes_are_capped_per_call_and_per_run() {
        let (_d, s) = store().await;
        let q = Queue::new(s.clone(), "run", "work");
        assert!(matches!(
            q.push(&items(MAX_PUSH + 1)).await,
            Err(QueueError::PushTooLarge(n)) if n == MAX_PUSH + 1
        ));
        assert_eq!(q.status().await.unwrap().pending, 0, "nothing half-pushed");
        q.push(&items(250)).await.unwrap();
        let other = Queue::new(s.clone(), "run", "other");
        other.push(&items(5)).await.unwrap();
        let counter = s.get("/queues/run/.pushed").await.unwrap().unwrap();
        assert_eq!(counter.value, b"255");
        // A run that reached the cap gets a clear refusal.
        s.txn(Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: "/queues/run/.pushed".into(),
                value: (MAX_RUN_PUSHED - 1).to_string().into_bytes(),
            }],
        })
        .await
        .unwrap();
        let e = q.push(&items(2)).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("a run may be pushed at most 1000000 in all"),
            "{e}"
        );
        assert_eq!(q.status().await.unwrap().pending, 250);
        assert!(delete_run(&s, "run").await.unwrap() > 0);
        assert!(s.get("/queues/run/.pushed").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_dead_workers_items_come_back_and_others_cannot_ack_them() {
        let (_d, s) = store().await;
        let q = Queue::new(s.clone(), "run", "work");
        q.push(&items(3)).await.unwrap();
        let LeaseOutcome::Items(got) = q.lease("w1", 16, LEASE).await.unwrap() else {
            panic!("expected items");
        };
        assert_eq!(got.len(), 3);
        assert_eq!(q.lease("w2", 1, LEASE).await.unwrap(), LeaseOutcome::Wait);
        assert!(matches!(
            q.ack("w2", &[got[0].id.clone()], false).await,
            Err(QueueError::NotLeased(_))
        ));
        assert_eq!(q.release_all_of(&["w1"]).await.unwrap(), 3);
        let LeaseOutcome::Items(again) = q.lease("w2", 16, LEASE).await.unwrap() else {
            panic!("expected items back");
        };
        assert_eq!(again.len(), 3);
        // An ack retried after its reply was lost still succeeds.
        let ids = vec![again[0].id.clone()];
        assert_eq!(q.ack("w2", &ids, false).await.unwrap(), 1);
        assert_eq!(q.ack("w2", &ids, false).await.unwrap(), 1);
        assert!(q.ack("w1", &ids, false).await.is_err());
        assert!(delete_run(&s, "run").await.unwrap() > 0);
        assert!(s.list(PREFIX).await.unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn an_expired_lease_goes_to_the_next_worker() {
        let (_d, s) = store().await;
        let q = Queue::new(s.clone(), "run", "work");
        q.push(&items(2)).await.unwrap();
        // A zero-length lease is rounded up to one second.
        let LeaseOutcome::Items(first) =
            q.lease("w1", 16, std::time::Duration::ZERO).await.unwrap()
        else {
            panic!("expected items");
        };
        assert_eq!(first.len(), 2);
        assert_eq!(q.lease("w2", 16, LEASE).await.unwrap(), LeaseOutcome::Wait);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let again = loop {
            if let LeaseOutcome::Items(got) = q.lease("w2", 16, LEASE).await.unwrap() {
                break got;
            }
            assert!(std::time::Instant::now() < deadline, "lease never expired");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        assert_eq!(again.len(), 2);
        let ids: Vec<String> = again.iter().map(|l| l.id.clone()).collect();
        assert!(q.ack("w1", &ids, false).await.is_err(), "w1 lost its lease");
        assert_eq!(q.ack("w2", &ids, false).await.unwrap(), 2);
        assert_eq!(
            q.lease("w1", 1, LEASE).await.unwrap(),
            LeaseOutcome::Drained
        );
    }
}
