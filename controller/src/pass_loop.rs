//! The loop of the store-driven controllers (workloads, pipelines): run a
//! pass, then wait for the next change (a burst of changes is coalesced
//! into one pass) or for the time the pass asked for, whichever comes
//! first. Changes come from the [cache](crate::cache) when there is one
//! (one watch for the whole controller), else from a watch on
//! `/registry/`, reopened when it breaks.

use std::future::Future;
use std::time::Duration;

use futures::{FutureExt, StreamExt};

use crate::resources::Resources;

/// Least wait after a change before the next pass.
const COALESCE: Duration = Duration::from_millis(20);
/// Longest wait after a change: a pass that was slow because it waited on
/// the store (thousands of creates) must not hold back the next one.
const PACE_MAX: Duration = Duration::from_secs(1);

/// Runs `pass` until `shutdown`. `pass` returns how long to wait at most
/// before the next pass; `retry` paces attempts to reopen the watch.
pub async fn run<F, Fut>(
    resources: &Resources,
    name: &'static str,
    retry: Duration,
    shutdown: ironmesh_process::Shutdown,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Duration>,
{
    let stopped = shutdown.wait();
    tokio::pin!(stopped);
    if let Some(cache) = resources.cache().await {
        let mut changes = cache.subscribe();
        loop {
            changes.borrow_and_update();
            let started = tokio::time::Instant::now();
            let wait = pass().await;
            let took = started.elapsed();
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(wait) => {}
                r = changes.changed() => {
                    if r.is_err() { return }
                    // Gather the rest of the burst (our own writes among
                    // it); a slow pass waits as long as it took (up to
                    // PACE_MAX), so a busy store cannot keep this
                    // controller on a core.
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(took.clamp(COALESCE, PACE_MAX)) => {}
                    }
                }
            }
        }
    }
    loop {
        // (Re)open the watch first, then pass: no change can fall between.
        let opened = match resources.store().revision().await {
            Ok(rev) => resources.store().watch("/registry/", rev).await,
            Err(e) => Err(e),
        };
        let mut events = match opened {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(controller = name, error = %e, "cannot watch the store");
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(retry) => continue,
                }
            }
        };
        loop {
            let wait = pass().await;
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(wait) => {}
                ev = events.next() => match ev {
                    Some(Ok(_)) => {
                        // Coalesce a burst (an apply of many objects, our own writes).
                        while let Some(Some(Ok(_))) = events.next().now_or_never() {}
                    }
                    Some(Err(e)) => {
                        tracing::warn!(controller = name, error = %e, "store watch broke; reopening");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}
