//! The agent's side of the sync stream, in three parts that do not wait on
//! each other:
//!
//! - `session`: connect, hello, welcome, heartbeats, inventory, log
//!   requests, reconnect with back-off and failover across controllers. It
//!   folds each incoming `Assignment` (whole or delta) into the whole
//!   desired state with [`ironmesh_proto::assignment::apply`] and hands the
//!   result on; a delta that does not fit ends the session, and the next
//!   stream starts with a whole assignment.
//! - [`desired`]: a pure function from a whole assignment to the node's
//!   desired state (instances, rejected specs, peer routes, datapath
//!   entries, volumes).
//! - `apply`: its own task that makes the node match the newest whole
//!   assignment it was handed (a `watch` channel: newest wins) and reports
//!   back the revision it applied; only then does the session ack it.
//!
//! `outbound` holds what goes up the stream besides the session's own
//! messages (batched instance reports, flows) and the priority lanes that
//! keep heartbeats ahead of everything else.
//!
//! With several controllers (`--controller a,b,c`) a lost stream moves on
//! to the next controller at once; the back-off only grows once every
//! controller has failed in a row. The hello carries the last applied
//! assignment revision, the new controller sends the whole assignment and
//! the agent a full instance report, so a failover neither loses nor
//! replays anything blindly.

mod apply;
pub mod desired;
mod outbound;
mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::metrics::AgentMetrics;
use crate::node_identity::NodeIdentity;
use crate::supervisor::{Supervisor, SupervisorReport};

pub use apply::storage_report;

pub struct SyncConfig {
    /// Every controller of the cluster (at least one), tried in order.
    pub controllers: Vec<String>,
    pub server_name: Option<String>,
    pub agent_version: String,
    /// Runs what the assignments ask for.
    pub supervisor: Arc<Supervisor>,
    /// `--node-ip`; detected from the inventory when `None`.
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// Instance networking: configured from Welcome, peer routes from
    /// each assignment.
    pub network: Arc<crate::network::Network>,
    /// The loaded datapath, if any: identities, policy and services from
    /// each assignment.
    pub datapath: Option<Arc<crate::datapath::Datapath>>,
    /// Why the datapath is not there when `datapath` is `None`: reported
    /// in Hello, and the node becomes `DatapathReady=False`.
    pub datapath_problem: Option<String>,
    pub cross_host: crate::config::CrossHost,
    pub vxlan_vni: u32,
    /// Volumes: provisioned and deleted as assignments list them, usage
    /// reported every `storage_report_interval`.
    pub storage: Option<Arc<crate::storage::Storage>>,
    pub storage_report_interval: Duration,
    /// Flow batches from [`crate::flow_export`], sent up while a session is
    /// open and dropped otherwise.
    pub flows: Option<mpsc::Receiver<ironmesh_proto::v1::FlowBatch>>,
    /// Work-queue sockets of pipeline step instances.
    pub work_queue: Option<Arc<crate::work_queue::WorkQueueProxy>>,
    /// The node's identity as [`crate::renewal`] renews it: each session
    /// connects with the newest, and a renewal ends the session so that the
    /// next one uses the new certificate (one reconnect per renewal).
    pub identity: Option<watch::Receiver<crate::node_identity::NodeIdentity>>,
    /// The node proxy (mTLS between hosts), fed each applied assignment.
    pub mesh: Option<Arc<crate::mesh::Mesh>>,
    /// The gateway listeners, fed each assignment's `gateways`.
    pub gateways: Option<Arc<crate::gateway::Gateways>>,
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
    /// The controller is stopping (`UNAVAILABLE: controller shutting
    /// down`): move to another controller at once.
    #[error("the controller is shutting down")]
    ControllerStopping,
    /// The node certificate was renewed: reconnect with the new one.
    #[error("the node certificate was renewed")]
    Renewed,
    /// An incremental assignment that does not fit what this stream
    /// delivered before: a message was missed.
    #[error("cannot fold the assignment: {0}")]
    Delta(#[from] ironmesh_proto::assignment::DeltaError),
}

/// How long the apply task may finish what it applies after shutdown.
const APPLY_GRACE: Duration = Duration::from_millis(700);

/// Keeps a sync stream open until `shutdown`, reconnecting with back-off,
/// while the apply task converges the node on the newest assignment.
/// Returns once the stream is closed and the apply task has finished what
/// it was applying.
pub async fn run(
    mut cfg: SyncConfig,
    id: NodeIdentity,
    metrics: Arc<AgentMetrics>,
    reports: mpsc::Receiver<SupervisorReport>,
    shutdown: ironmesh_process::Shutdown,
) {
    let current = outbound::forward_reports(reports, metrics.clone());
    if let Some(flows) = cfg.flows.take() {
        outbound::forward_flows(flows, current.subscribe());
    }
    let (feed, desired_rx) = apply::Feed::new();
    let (applied_tx, applied_rx) = watch::channel(apply::Applied::default());
    let applier = Arc::new(apply::Applier::new(
        &cfg,
        metrics.clone(),
        current.subscribe(),
    ));
    let apply_task = tokio::spawn(apply::run(desired_rx, applied_tx, move |h| {
        let applier = applier.clone();
        async move { applier.apply(&h).await }
    }));

    session::run(&cfg, &id, &metrics, &current, feed, applied_rx, shutdown).await;

    // The feed is gone with the sessions: the apply task finishes what it
    // is applying and ends, dropping its handles (the supervisor must not
    // stay shared once this returns).
    // Bounded: an image pull in progress must not hold the exit (the
    // agent stops within 2 s of SIGTERM; containers keep running).
    let mut apply_task = apply_task;
    match tokio::time::timeout(APPLY_GRACE, &mut apply_task).await {
        Ok(Err(e)) => tracing::warn!(error = %e, "assignment apply task failed"),
        Ok(Ok(())) => {}
        Err(_) => {
            tracing::warn!(
                grace_ms = APPLY_GRACE.as_millis() as u64,
                "assignment still being applied at shutdown; stopping it"
            );
            apply_task.abort();
            let _ = apply_task.await;
        }
    }
}
