//! Gives freed heap back to the operating system once a burst of work is
//! over. A rollout at 1,000 nodes queues hundreds of megabytes of
//! assignment deltas for a few seconds; glibc keeps what was freed in its
//! arenas, so without this the controller's RSS stays at that peak.

use std::time::Duration;

/// Quiet this long after a change before trimming.
const QUIET: Duration = Duration::from_millis(500);

/// Trims after each burst of store changes, until `shutdown`.
pub async fn run(cache: crate::cache::Cache, shutdown: ironmesh_daemon::Shutdown) {
    let mut changes = cache.subscribe();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = changes.changed() => if r.is_err() { return },
        }
        // Wait out the burst: every further change restarts the quiet time.
        loop {
            changes.borrow_and_update();
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(QUIET) => break,
                r = changes.changed() => if r.is_err() { return },
            }
        }
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory of the allocator.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::trace!(released = released != 0, "heap trimmed");
    }
}
