//! High availability: several controllers on one etcd.
//!
//! This module owns the coordination between controllers and nothing about
//! resources: the controller's etcd lease ([`session`]), the election of the
//! one leader that runs the reconcilers ([`election`]), the record of which
//! controller vouches for which node's heartbeats ([`presence`]) and the
//! cluster CA and bootstrap token shared through the store
//! ([`shared_secrets`]). With the embedded store there is one controller and
//! it is always the leader ([`Leadership::always`]).
//!
//! Keys it writes (store keys, under the etcd prefix):
//! `/cluster/leader` (the leader's id, on its lease),
//! `/cluster/presence/<node>/<controller>` (on the vouching controller's
//! lease), `/cluster/ca` and `/cluster/bootstrap-token`.

pub mod election;
pub mod presence;
pub mod session;
pub mod shared_secrets;

use std::future::Future;
use std::sync::Arc;

use ironmesh_process::Shutdown;
use tokio::sync::watch;

use crate::metrics::ControllerMetrics;

/// Store key of the leader record.
pub const LEADER_KEY: &str = "/cluster/leader";
/// Store key prefix of presence records.
pub const PRESENCE_PREFIX: &str = "/cluster/presence/";

/// Whether this controller leads now; cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
}

impl Leadership {
    /// A controller that is always the leader (embedded store).
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(true);
        // Keep the sender alive for the life of the process.
        std::mem::forget(tx);
        Leadership { rx }
    }

    pub fn from_receiver(rx: watch::Receiver<bool>) -> Leadership {
        Leadership { rx }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Runs `start(stop)` whenever this controller becomes the leader, and
    /// triggers `stop` (awaiting the task) when it stops being the leader or
    /// on `shutdown`. Publishes the leader gauge and logs transitions.
    pub async fn run_while_leader<F, Fut>(
        self,
        metrics: Arc<ControllerMetrics>,
        shutdown: Shutdown,
        mut start: F,
    ) where
        F: FnMut(Shutdown) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut rx = self.rx;
        let stopped = shutdown.clone().wait();
        tokio::pin!(stopped);
        loop {
            // Wait to lead.
            while !*rx.borrow_and_update() {
                tokio::select! {
                    _ = &mut stopped => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
            tracing::info!("this controller is now the leader; starting reconcilers");
            metrics.leader.set(1);
            metrics.leader_transitions.inc();
            let (child, stop) = Shutdown::manual();
            let task = tokio::spawn(start(child));
            let mut done = false;
            while *rx.borrow_and_update() {
                tokio::select! {
                    _ = &mut stopped => { done = true; break }
                    r = rx.changed() => if r.is_err() { done = true; break },
                }
            }
            let _ = stop.send(true);
            let _ = task.await;
            metrics.leader.set(0);
            if done {
                return;
            }
            metrics.leader_transitions.inc();
            tracing::warn!("this controller lost leadership; reconcilers stopped");
        }
    }
}

/// A name for this controller usable inside a key: the advertise URL
/// without its scheme, with anything but `[A-Za-z0-9.:_-]` replaced by `_`.
pub fn controller_id(advertise_url: &str) -> String {
    advertise_url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".:_-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_ids_are_key_safe() {
        assert_eq!(controller_id("https://10.0.0.1:7443"), "10.0.0.1:7443");
        assert_eq!(controller_id("https://[::1]:7443/"), "_::1_:7443");
    }
}
