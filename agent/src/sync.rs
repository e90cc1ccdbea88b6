//! The agent's side of the sync stream: hello, inventory, heartbeats and
//! assignment acks up; welcome and assignments down. Reconnects with
//! exponential backoff when the controller goes away.

use std::sync::Arc;
use std::time::Duration;

use ironmesh_proto::v1::{
    agent_message, controller_message, node_service_client::NodeServiceClient, AgentMessage,
    AssignmentAck, Heartbeat, Hello, Inventory,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::{endpoint, error_chain, NodeIdentity};
use crate::metrics::AgentMetrics;

/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the inventory is read again (sent only when it changed).
const INVENTORY_REFRESH: Duration = Duration::from_secs(30);

pub struct SyncConfig {
    pub controller: String,
    pub server_name: Option<String>,
    pub agent_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("controller refused the stream: {0}")]
    Refused(String),
    #[error("stream broke: {0}")]
    Broken(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Keeps a sync stream open until `shutdown`, reconnecting with backoff.
pub async fn run(
    cfg: SyncConfig,
    id: NodeIdentity,
    metrics: Arc<AgentMetrics>,
    shutdown: ironmesh_daemon::Shutdown,
) {
    let mut backoff = BACKOFF_MIN;
    let mut acked: u64 = 0;
    loop {
        if shutdown.is_requested() {
            return;
        }
        let started = std::time::Instant::now();
        let res = session(&cfg, &id, &metrics, &mut acked, shutdown.clone()).await;
        metrics.connected.set(0);
        match res {
            Ok(()) => return,
            Err(e) => {
                // A session that lived a while was healthy: start over small.
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = BACKOFF_MIN;
                }
                metrics.reconnects.inc();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "sync stream down");
            }
        }
        let jitter = Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 4));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.clone().wait() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    cfg: &SyncConfig,
    id: &NodeIdentity,
    metrics: &AgentMetrics,
    acked: &mut u64,
    shutdown: ironmesh_daemon::Shutdown,
) -> Result<(), SyncError> {
    let channel = endpoint(&cfg.controller)
        .map_err(|e| SyncError::Connect(e.to_string()))?
        .tls_config(id.tls(cfg.server_name.as_deref()))
        .map_err(|e| SyncError::Connect(e.to_string()))?
        .connect()
        .await
        .map_err(|e| SyncError::Connect(error_chain(&e)))?;
    let mut client = NodeServiceClient::new(channel);

    let (tx, rx) = mpsc::channel::<AgentMessage>(32);
    let send = |tx: &mpsc::Sender<AgentMessage>, m: agent_message::Msg| {
        let tx = tx.clone();
        async move {
            tx.send(AgentMessage { msg: Some(m) })
                .await
                .map_err(|_| SyncError::Broken("outbound stream closed".into()))
        }
    };
    send(
        &tx,
        agent_message::Msg::Hello(Hello {
            node_name: id.node_name.clone(),
            agent_version: cfg.agent_version.clone(),
            acked_revision: *acked,
        }),
    )
    .await?;
    let mut inventory = read_inventory(&cfg.agent_version).await;
    if let Some(inv) = &inventory {
        metrics.observe_inventory(inv);
        send(&tx, agent_message::Msg::Inventory(inv.clone())).await?;
    }

    let mut inbound = client
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                SyncError::Refused(s.message().to_string())
            }
            _ => SyncError::Broken(s.message().to_string()),
        })?
        .into_inner();

    let welcome = match inbound.message().await {
        Ok(Some(m)) => match m.msg {
            Some(controller_message::Msg::Welcome(w)) => w,
            other => {
                return Err(SyncError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        },
        Ok(None) => return Err(SyncError::Broken("closed before Welcome".into())),
        Err(s) => return Err(SyncError::Refused(s.message().to_string())),
    };
    metrics.connected.set(1);
    let hb_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    tracing::info!(node = %welcome.node_name, heartbeat_ms = hb_every.as_millis() as u64, "connected to controller");

    let mut heartbeat = tokio::time::interval(hb_every);
    let mut refresh = tokio::time::interval(INVENTORY_REFRESH);
    refresh.tick().await; // the first tick is immediate; inventory was just sent
    let mut seq: u64 = 0;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = heartbeat.tick() => {
                seq += 1;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or_default();
                send(&tx, agent_message::Msg::Heartbeat(Heartbeat { sequence: seq, sent_unix_ms: now })).await?;
                metrics.heartbeats.inc();
            }
            _ = refresh.tick() => {
                let fresh = read_inventory(&cfg.agent_version).await;
                if let Some(inv) = &fresh {
                    metrics.observe_inventory(inv);
                    if inventory.as_ref().map(stable) != Some(stable(inv)) {
                        tracing::info!("inventory changed; reporting");
                        send(&tx, agent_message::Msg::Inventory(inv.clone())).await?;
                        inventory = fresh;
                    }
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.msg {
                    Some(controller_message::Msg::Assignment(a)) => {
                        tracing::debug!(revision = a.revision, "assignment received");
                        *acked = a.revision;
                        metrics.assignment_revision.set(a.revision as i64);
                        send(&tx, agent_message::Msg::Ack(AssignmentAck { revision: a.revision })).await?;
                    }
                    Some(controller_message::Msg::LogRequest(_)) | Some(controller_message::Msg::LogCancel(_)) => {}
                    Some(controller_message::Msg::Welcome(_)) => {
                        return Err(SyncError::Protocol("second Welcome".into()));
                    }
                    None => return Err(SyncError::Protocol("empty controller message".into())),
                },
                Ok(None) => return Err(SyncError::Broken("controller closed the stream".into())),
                Err(s) => return Err(SyncError::Broken(format!("{:?}: {}", s.code(), s.message()))),
            }
        }
    }
}

async fn read_inventory(agent_version: &str) -> Option<Inventory> {
    let v = agent_version.to_string();
    match tokio::task::spawn_blocking(move || crate::inventory::discover(&v)).await {
        Ok(Ok(inv)) => Some(inv),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "inventory discovery failed");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "inventory task failed");
            None
        }
    }
}

/// The parts of an inventory that are not expected to change from minute to
/// minute (available memory always does).
fn stable(inv: &Inventory) -> Inventory {
    let mut s = inv.clone();
    if let Some(m) = s.memory.as_mut() {
        m.available_bytes = 0;
    }
    if let Some(c) = s.cpu.as_mut() {
        c.frequency_mhz = 0;
    }
    s
}
