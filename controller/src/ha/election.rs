//! Leader election on the controller's etcd lease: the leader is whoever
//! created `/cluster/leader` on its live lease. A txn creates the record
//! only if it is absent (`create_revision == 0`), so at most one controller
//! holds it; when the holder's lease ends (kill, crash, lost etcd) etcd
//! deletes the record and the others, watching it, campaign at once.
//!
//! A leader steps down as soon as its session withdraws the lease (renewal
//! not confirmed in time, see [`super::session`]) or the record changes
//! under it; it campaigns again right away and, if its lease still holds
//! the record, simply leads on.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use ironmesh_process::Shutdown;
use tokio::sync::watch;

/// Starts campaigning; the receiver is true while this controller leads.
pub fn start(
    client: Client,
    leader_key: String,
    id: String,
    lease: watch::Receiver<Option<i64>>,
    shutdown: Shutdown,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(run(client, leader_key, id, lease, tx, shutdown));
    rx
}

enum Round {
    /// Stop campaigning (shutdown).
    Stop,
    /// Something changed; campaign again (after a pause when etcd failed).
    Again { pause: bool },
}

async fn run(
    client: Client,
    key: String,
    id: String,
    mut lease: watch::Receiver<Option<i64>>,
    tx: watch::Sender<bool>,
    shutdown: Shutdown,
) {
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    loop {
        let round = tokio::select! {
            _ = &mut stopped => Round::Stop,
            r = campaign(&client, &key, &id, &mut lease, &tx) => r,
        };
        if tx.send_replace(false) {
            tracing::warn!(controller = %id, "stepped down as leader");
        }
        match round {
            Round::Stop => return,
            Round::Again { pause: true } => tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            },
            Round::Again { pause: false } => {}
        }
    }
}

/// One campaign: wait for a lease, try to take the record, then hold it (or
/// wait for it to go) until something changes.
async fn campaign(
    client: &Client,
    key: &str,
    id: &str,
    lease: &mut watch::Receiver<Option<i64>>,
    tx: &watch::Sender<bool>,
) -> Round {
    let lease_id = loop {
        if let Some(l) = *lease.borrow_and_update() {
            break l;
        }
        if lease.changed().await.is_err() {
            return Round::Stop;
        }
    };
    let take = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            id,
            Some(PutOptions::new().with_lease(lease_id)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let mut kv = client.kv_client();
    let resp = match tokio::time::timeout(Duration::from_secs(3), kv.txn(take)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "leader campaign failed");
            return Round::Again { pause: true };
        }
        Err(_) => return Round::Again { pause: true },
    };
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let (leading, holder) = if resp.succeeded() {
        (true, id.to_string())
    } else {
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())),
            _ => None,
        });
        match current {
            // Ours from before (e.g. the watch broke): still ours.
            Some((holder, l)) if l == lease_id => (true, holder),
            Some((holder, _)) => (false, holder),
            // Gone between the compare and the read: campaign again.
            None => return Round::Again { pause: false },
        }
    };
    if leading && !tx.send_replace(true) {
        tracing::info!(controller = %id, lease = lease_id, "elected leader");
    } else if !leading {
        tracing::info!(controller = %id, leader = %holder, "following");
    }
    // Hold (or wait) until the record changes or our lease goes.
    let mut w = client.watch_client();
    let opts = WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = match w.watch(key, Some(opts)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the leader record");
            return Round::Again { pause: true };
        }
    };
    loop {
        tokio::select! {
            r = lease.changed() => {
                if r.is_err() { return Round::Stop; }
                if *lease.borrow() != Some(lease_id) {
                    return Round::Again { pause: false };
                }
            }
            m = stream.message() => match m {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        return Round::Again { pause: true };
                    }
                    if !resp.events().is_empty() {
                        return Round::Again { pause: false };
                    }
                }
                Ok(None) | Err(_) => return Round::Again { pause: true },
            },
        }
    }
}
