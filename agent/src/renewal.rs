//! Renews the node certificate before it expires: two thirds into its
//! lifetime the agent makes a new key and CSR and asks the controller
//! over its current mTLS identity ([`crate::node_identity::renew`]), saves the
//! new pair, rebuilds its clients ([`NodeClients`]) and publishes the new
//! identity, on which the sync stream reconnects once. Instances are not
//! touched. A failed renewal is retried, sooner as the expiry nears; an
//! expired certificate cannot be renewed, which is logged as the error it
//! is (the node must be deleted and join again).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::node_clients::NodeClients;
use crate::node_identity::{renew, NodeIdentity};

/// Shortest and longest pause before trying a failed renewal again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

pub struct Renewal {
    pub state_dir: PathBuf,
    pub controllers: Vec<String>,
    pub server_name: Option<String>,
    pub clients: NodeClients,
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

impl Renewal {
    /// Runs until `shutdown`, publishing every renewed identity on `ids`.
    pub async fn run(self, ids: watch::Sender<NodeIdentity>, shutdown: ironmesh_process::Shutdown) {
        loop {
            let id = ids.borrow().clone();
            let (due, expires) = match (id.renewal_due(), id.validity()) {
                (Ok(d), Ok((_, e))) => (d, e),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot read the node certificate; it will not be renewed");
                    return;
                }
            };
            tracing::info!(
                node = %id.node_name,
                renew_in_s = until(due).as_secs(),
                expires_in_s = until(expires).as_secs(),
                "node certificate renewal scheduled"
            );
            tokio::select! {
                _ = tokio::time::sleep(until(due)) => {}
                _ = shutdown.clone().wait() => return,
            }
            let mut retry = RETRY_MIN;
            let renewed = loop {
                match self.renew_once(&id).await {
                    Ok(new) => break new,
                    Err(e) => {
                        if SystemTime::now() >= expires {
                            tracing::error!(node = %id.node_name, error = %e, "the node certificate expired before it could be renewed; delete the node (imctl delete node) and join again with a new token");
                            return;
                        }
                        // Never wait past a tenth of what is left.
                        let wait = retry.min(until(expires) / 10).max(RETRY_MIN);
                        tracing::warn!(node = %id.node_name, error = %e, retry_in_ms = wait.as_millis() as u64, "node certificate renewal failed");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.clone().wait() => return,
                        }
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
            };
            if let Err(e) = renewed.save_renewed(&self.state_dir) {
                tracing::error!(error = %e, "cannot save the renewed node certificate; keeping the current one");
                continue;
            }
            if let Err(e) = self.clients.replace(&renewed) {
                tracing::error!(error = %e, "cannot build clients with the renewed certificate");
            }
            let expires = renewed
                .validity()
                .map(|(_, e)| humantime::format_rfc3339_seconds(e).to_string())
                .unwrap_or_default();
            tracing::info!(node = %renewed.node_name, %expires, "node certificate renewed");
            ids.send_replace(renewed);
        }
    }

    /// One renewal through the first controller that answers.
    async fn renew_once(
        &self,
        id: &NodeIdentity,
    ) -> Result<NodeIdentity, crate::node_identity::IdentityError> {
        let mut last = None;
        for url in &self.controllers {
            match renew(url, self.server_name.as_deref(), id).await {
                Ok(new) => return Ok(new),
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(
            last.unwrap_or(crate::node_identity::IdentityError::MissingForJoin(
                "no controller is configured",
            )),
        )
    }
}
