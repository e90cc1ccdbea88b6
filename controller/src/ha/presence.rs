//! Presence records: which controller receives which node's heartbeats.
//!
//! Heartbeats stay in each controller's memory (see [`crate::liveness`]);
//! what crosses controllers is one record per (node, controller),
//! `/cluster/presence/<node>/<controller>`, written on the controller's
//! etcd lease while the node streams to it with heartbeats younger than
//! half the grace, and deleted when that stops. Writes happen only on
//! those transitions (a connect, a disconnect, heartbeats lapsing), never
//! per heartbeat; a controller that dies takes its records with its lease.
//!
//! Every controller also watches the records of the others and feeds them
//! into its [`Liveness`], so whichever controller leads judges every node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::PutOptions;
use futures::StreamExt;
use ironmesh_process::Shutdown;
use tokio::sync::watch;

use super::PRESENCE_PREFIX;
use crate::liveness::Liveness;
use crate::store::etcd::EtcdStore;
use crate::store::{EventKind, Store};

/// How often the vouched set is compared with what is published.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Starts publishing this controller's vouches and following the others'.
pub fn start(
    store: EtcdStore,
    id: String,
    lease: watch::Receiver<Option<i64>>,
    liveness: Liveness,
    shutdown: Shutdown,
) {
    tokio::spawn(publish(
        store.clone(),
        id.clone(),
        lease,
        liveness.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(follow(store, id, liveness, shutdown));
}

fn record_key(node: &str, id: &str) -> String {
    format!("{PRESENCE_PREFIX}{node}/{id}")
}

async fn publish(
    store: EtcdStore,
    id: String,
    mut lease: watch::Receiver<Option<i64>>,
    liveness: Liveness,
    shutdown: Shutdown,
) {
    let mut published: BTreeSet<String> = BTreeSet::new();
    let mut published_on: Option<i64> = None;
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
            r = lease.changed() => if r.is_err() { return },
        }
        let current = *lease.borrow_and_update();
        if current != published_on {
            // A new lease holds none of the old records.
            published.clear();
            published_on = current;
        }
        let Some(lease_id) = current else { continue };
        let want: BTreeSet<String> = liveness.vouched().into_iter().collect();
        let mut kv = store.client().kv_client();
        for node in want.difference(&published).cloned().collect::<Vec<_>>() {
            let key = store.full_key(&record_key(&node, &id));
            let put = kv.put(
                key,
                id.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(lease_id)),
            );
            match tokio::time::timeout(Duration::from_secs(2), put).await {
                Ok(Ok(_)) => {
                    tracing::debug!(node = %node, "vouching for node");
                    published.insert(node);
                }
                Ok(Err(e)) => tracing::warn!(node = %node, error = %e, "cannot write presence"),
                Err(_) => tracing::warn!(node = %node, "etcd did not answer a presence write"),
            }
        }
        for node in published.difference(&want).cloned().collect::<Vec<_>>() {
            let key = store.full_key(&record_key(&node, &id));
            match tokio::time::timeout(Duration::from_secs(2), kv.delete(key, None)).await {
                Ok(Ok(_)) => {
                    tracing::debug!(node = %node, "stopped vouching for node");
                    published.remove(&node);
                }
                Ok(Err(e)) => tracing::warn!(node = %node, error = %e, "cannot delete presence"),
                Err(_) => tracing::warn!(node = %node, "etcd did not answer a presence delete"),
            }
        }
    }
}

/// `/cluster/presence/<node>/<controller>` → (node, controller).
fn parse(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(PRESENCE_PREFIX)?.split_once('/')
}

async fn follow(store: EtcdStore, id: String, liveness: Liveness, shutdown: Shutdown) {
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    // Nodes ever seen stay in the map (with an empty set once nobody
    // vouches), so a re-list also withdraws vouches that vanished meanwhile.
    let mut vouchers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    loop {
        let res = async {
            let (items, rev) = store.list(PRESENCE_PREFIX).await?;
            vouchers.values_mut().for_each(BTreeSet::clear);
            for kv in &items {
                if let Some((node, by)) = parse(&kv.key) {
                    vouchers
                        .entry(node.to_string())
                        .or_default()
                        .insert(by.to_string());
                }
            }
            publish_remote(&liveness, &vouchers, &id);
            let mut events = store.watch(PRESENCE_PREFIX, rev).await?;
            while let Some(ev) = events.next().await {
                let ev = ev?;
                let Some((node, by)) = parse(&ev.kv.key) else {
                    continue;
                };
                let set = vouchers.entry(node.to_string()).or_default();
                match ev.kind {
                    EventKind::Put => set.insert(by.to_string()),
                    EventKind::Delete => set.remove(by),
                };
                publish_remote(&liveness, &vouchers, &id);
            }
            Ok::<(), crate::store::StoreError>(())
        };
        tokio::select! {
            _ = &mut stopped => return,
            r = res => if let Err(e) = r {
                tracing::debug!(error = %e, "presence watch broke; re-listing");
            },
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

fn publish_remote(liveness: &Liveness, vouchers: &BTreeMap<String, BTreeSet<String>>, me: &str) {
    for (node, by) in vouchers {
        liveness.set_remote(node, by.iter().any(|c| c != me));
    }
}
