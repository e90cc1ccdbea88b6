//! The controller's etcd session: one lease, kept alive while this process
//! runs and can reach etcd. Keys written on it (the leader record, presence
//! records) vanish when the controller dies or loses etcd for longer than
//! the lease TTL.
//!
//! `run` publishes the live lease id, or `None` while there is none. It
//! withdraws the id *before* the TTL can have run out on etcd's side (no
//! confirmed renewal for 2/3 of the TTL), so a controller never believes in
//! a lease etcd may already have expired.

use std::time::{Duration, Instant};

use etcd_client::Client;
use ironmesh_process::Shutdown;
use tokio::sync::watch;

/// Starts the session task; the receiver holds the current lease id.
pub fn start(client: Client, ttl: Duration, shutdown: Shutdown) -> watch::Receiver<Option<i64>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(run(client, ttl, tx, shutdown));
    rx
}

async fn run(client: Client, ttl: Duration, tx: watch::Sender<Option<i64>>, shutdown: Shutdown) {
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let renew_every = Duration::from_secs(ttl_secs as u64) / 3;
    let trust_for = Duration::from_secs(ttl_secs as u64) * 2 / 3;
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    let mut lease: Option<i64> = None;
    loop {
        if shutdown.is_requested() {
            break;
        }
        let mut lc = client.lease_client();
        let id = match tokio::time::timeout(renew_every, lc.grant(ttl_secs, None)).await {
            Ok(Ok(g)) => g.id(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot create the controller's etcd lease");
                tokio::select! { _ = &mut stopped => break, _ = tokio::time::sleep(renew_every) => continue }
            }
            Err(_) => {
                tracing::warn!("etcd did not answer a lease grant");
                continue;
            }
        };
        lease = Some(id);
        tracing::info!(lease = id, ttl_s = ttl_secs, "etcd session started");
        let _ = tx.send(Some(id));
        let mut last_ok = Instant::now();
        let kept = async {
            let (mut keeper, mut stream) = lc.keep_alive(id).await.map_err(|e| e.to_string())?;
            let mut tick = tokio::time::interval(renew_every);
            loop {
                tick.tick().await;
                if last_ok.elapsed() > trust_for {
                    return Err("no lease renewal confirmed in time".to_string());
                }
                if let Err(e) = keeper.keep_alive().await {
                    return Err(e.to_string());
                }
                match tokio::time::timeout(renew_every, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = Instant::now(),
                    Ok(Ok(Some(_))) => return Err("the lease expired".to_string()),
                    Ok(Ok(None)) => return Err("keep-alive stream closed".to_string()),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => {} // late answer; judged by last_ok next tick
                }
            }
        };
        let outcome = tokio::select! {
            _ = &mut stopped => None,
            r = kept => Some(r),
        };
        let _ = tx.send(None);
        match outcome {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(lease = id, error = %e, "etcd session lost; starting a new one");
                // Best effort: free what the old lease held right away.
                let _ = tokio::time::timeout(Duration::from_millis(500), lc.revoke(id)).await;
                lease = None;
                tokio::select! { _ = &mut stopped => break, _ = tokio::time::sleep(Duration::from_millis(300)) => {} }
            }
            Some(Ok(())) => {}
        }
    }
    // Clean stop: revoking deletes the leader and presence records now, so
    // another controller takes over without waiting for the TTL.
    if let Some(id) = lease {
        let mut lc = client.lease_client();
        match tokio::time::timeout(Duration::from_secs(2), lc.revoke(id)).await {
            Ok(Ok(_)) => tracing::info!(lease = id, "etcd session ended"),
            _ => tracing::warn!(
                lease = id,
                "could not revoke the etcd lease; it expires on its own"
            ),
        }
    }
}
