//! One sync stream at a time: connect, hello, welcome, then heartbeats,
//! inventory refreshes, storage reports and log requests, while incoming
//! assignments are folded into the whole desired state and handed to the
//! apply task; reconnects with back-off, failing over across controllers.
//! After each connect it sends a full instance report, so nothing that
//! changed meanwhile is lost.
//!
//! Nothing in the session loop waits for applying, for the inventory to be
//! read, or for room in a queue (see `outbound`), so heartbeats keep their
//! pace whatever else is going on.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use ironmesh_proto::assignment::INCREMENTAL;
use ironmesh_proto::v1::{
    agent_message, controller_message, node_service_client::NodeServiceClient, AgentMessage,
    Assignment, AssignmentAck, Heartbeat, Hello, InstanceReport, Inventory, LogChunk, LogRequest,
};
use tokio::sync::{mpsc, watch};

use super::apply::{self, Applied, Feed};
use super::outbound::{self, msg, Current, Lanes};
use super::{SyncConfig, SyncError};
use crate::metrics::AgentMetrics;
use crate::node_identity::{endpoint, error_chain, NodeIdentity};
use crate::supervisor::Supervisor;

/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The largest message taken from the controller (a whole assignment).
const MAX_CONTROLLER_MESSAGE: usize = 256 << 20;
/// How often the inventory is read again (sent only when it changed).
const INVENTORY_REFRESH: Duration = Duration::from_secs(30);

/// Keeps a sync stream open until `shutdown`, reconnecting with back-off.
/// Returns when shut down; dropping `feed` then ends the apply task.
pub(super) async fn run(
    cfg: &SyncConfig,
    id: &NodeIdentity,
    metrics: &AgentMetrics,
    current: &Current,
    mut feed: Feed,
    mut applied: watch::Receiver<Applied>,
    shutdown: ironmesh_process::Shutdown,
) {
    let mut backoff = BACKOFF_MIN;
    let count = cfg.controllers.len().max(1);
    let mut current_controller = 0usize;
    // Failed sessions since the last healthy one.
    let mut failed_in_a_row = 0usize;
    loop {
        if shutdown.is_requested() {
            return;
        }
        let started = std::time::Instant::now();
        let url = cfg
            .controllers
            .get(current_controller)
            .cloned()
            .unwrap_or_default();
        // The newest identity (renewed certificates replace the first).
        let mut renewals = cfg.identity.clone();
        let id_now = match renewals.as_mut() {
            Some(rx) => rx.borrow_and_update().clone(),
            None => id.clone(),
        };
        let res = session(
            cfg,
            &url,
            &id_now,
            renewals,
            metrics,
            current,
            &mut feed,
            &mut applied,
            shutdown.clone(),
        )
        .await;
        current.send_replace(None);
        metrics.connected.set(0);
        match res {
            Ok(()) => return,
            Err(SyncError::ControllerStopping) => {
                // Not a failure of the cluster: the next controller (or
                // this one's successor on restart) is tried at once, and
                // the back-off starts over.
                metrics.reconnects.inc();
                current_controller = (current_controller + 1) % count;
                tracing::info!(controller = %url, next = %cfg.controllers.get(current_controller).map(String::as_str).unwrap_or_default(), "controller is shutting down; reconnecting");
                backoff = BACKOFF_MIN;
                failed_in_a_row = 0;
                continue;
            }
            Err(SyncError::Renewed) => {
                tracing::info!(controller = %url, "node certificate renewed; reconnecting with it");
                backoff = BACKOFF_MIN;
                failed_in_a_row = 0;
                continue;
            }
            Err(e) => {
                // A session that lived a while was healthy: start over small.
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = BACKOFF_MIN;
                    failed_in_a_row = 0;
                }
                failed_in_a_row += 1;
                metrics.reconnects.inc();
                current_controller = (current_controller + 1) % count;
                if count > 1 && failed_in_a_row < count {
                    // Another controller may be up: try it right away.
                    let next = cfg
                        .controllers
                        .get(current_controller)
                        .map(String::as_str)
                        .unwrap_or_default();
                    tracing::warn!(error = %e, controller = %url, next = %next, "sync stream down; failing over");
                    tokio::select! {
                        _ = tokio::time::sleep(BACKOFF_MIN / 2) => {}
                        _ = shutdown.clone().wait() => return,
                    }
                    continue;
                }
                failed_in_a_row = 0;
                tracing::warn!(error = %e, controller = %url, retry_in_ms = backoff.as_millis() as u64, "sync stream down");
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

/// Queues `m` on the control lane without waiting. `Ok(false)`: the lane is
/// full (the connection is not draining); the caller decides what to skip.
fn control(lanes: &Lanes, m: agent_message::Msg) -> Result<bool, SyncError> {
    match lanes.control.try_send(msg(m)) {
        Ok(()) => Ok(true),
        Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
        Err(mpsc::error::TrySendError::Closed(_)) => {
            Err(SyncError::Broken("outbound stream closed".into()))
        }
    }
}

#[allow(clippy::too_many_arguments)] // the session's share of what run holds
async fn session(
    cfg: &SyncConfig,
    url: &str,
    id: &NodeIdentity,
    mut renewals: Option<watch::Receiver<NodeIdentity>>,
    metrics: &AgentMetrics,
    current: &Current,
    feed: &mut Feed,
    applied: &mut watch::Receiver<Applied>,
    shutdown: ironmesh_process::Shutdown,
) -> Result<(), SyncError> {
    let channel = endpoint(url)
        .map_err(|e| SyncError::Connect(e.to_string()))?
        .tls_config(id.tls(cfg.server_name.as_deref()))
        .map_err(|e| SyncError::Connect(e.to_string()))?
        .connect()
        .await
        .map_err(|e| SyncError::Connect(error_chain(&e)))?;
    // A whole assignment carries every instance's spec (each up to the
    // 1.5 MiB object limit): tonic's 4 MiB default broke the stream of a
    // node with a few large instances on every reconnect.
    let mut client =
        NodeServiceClient::new(channel).max_decoding_message_size(MAX_CONTROLLER_MESSAGE);

    let (lanes, outbound_stream) = outbound::lanes();
    let mut inventory = read_inventory(&cfg.agent_version).await;
    let node_ip = cfg.node_ip.or_else(|| {
        inventory
            .as_ref()
            .and_then(crate::inventory::detect_node_ip)
    });
    if node_ip.is_none() {
        tracing::warn!("no node address found (set --node-ip): other nodes cannot route to this node's instances");
    }
    // This stream acks only what it handed over itself; what was applied
    // before (perhaps after the last stream broke) goes in the hello.
    let first_seq = feed.last_seq() + 1;
    let applied_revision = applied.borrow_and_update().revision;
    // A fresh lane has room for both.
    control(
        &lanes,
        agent_message::Msg::Hello(Hello {
            node_name: id.node_name.clone(),
            agent_version: cfg.agent_version.clone(),
            acked_revision: applied_revision,
            node_ip: node_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            capabilities: vec![
                INCREMENTAL.into(),
                ironmesh_proto::SETTINGS.into(),
                ironmesh_proto::assignment::PARTS.into(),
            ],
            datapath: Some(ironmesh_proto::v1::DatapathStatus {
                ready: cfg.datapath.is_some(),
                message: match (&cfg.datapath, &cfg.datapath_problem) {
                    (Some(_), _) => String::new(),
                    (None, Some(why)) => why.clone(),
                    (None, None) => "the datapath is not loaded".to_string(),
                },
            }),
        }),
    )?;
    if let Some(inv) = &inventory {
        metrics.observe_inventory(inv);
        control(&lanes, agent_message::Msg::Inventory(inv.clone()))?;
    }

    let mut inbound = client
        .sync(outbound_stream)
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
    if !welcome.pod_cidr.is_empty() {
        match welcome.pod_cidr.parse::<ipnet::Ipv4Net>() {
            Ok(cidr) => {
                if let Err(e) = cfg.network.configure(cidr).await {
                    tracing::error!(pod_cidr = %cidr, error = %e, "cannot configure instance networking");
                } else {
                    tracing::info!(pod_cidr = %cidr, "instance addresses come from this pod CIDR");
                }
            }
            Err(e) => {
                return Err(SyncError::Protocol(format!(
                    "controller sent pod CIDR {:?}: {e}",
                    welcome.pod_cidr
                )))
            }
        }
    }
    // Everything the controller may have missed while we were away.
    lanes
        .state
        .send(msg(agent_message::Msg::Instances(InstanceReport {
            full: true,
            instances: cfg.supervisor.snapshot(),
        })))
        .await
        .map_err(|_| SyncError::Broken("outbound stream closed".into()))?;
    current.send_replace(Some(lanes.state.clone()));
    let mut log_tasks: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let hb_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    tracing::info!(node = %welcome.node_name, controller = %url, heartbeat_ms = hb_every.as_millis() as u64, "connected to controller");

    let mut heartbeat = tokio::time::interval(hb_every);
    let mut seq: u64 = 0;
    // Heartbeats skipped in a row because the control lane was full.
    let mut hb_skipped: u64 = 0;
    let mut refresh = tokio::time::interval(INVENTORY_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await; // the first tick is immediate; inventory was just sent
                          // Inventory is read off the loop; the result comes back here.
    let (inv_tx, mut inv_rx) = mpsc::channel::<Option<Inventory>>(1);
    let mut reading_inventory = false;
    let mut storage_tick =
        tokio::time::interval(cfg.storage_report_interval.max(Duration::from_millis(200)));
    storage_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The whole desired state this stream has given so far.
    let mut whole: Option<Assignment> = None;
    let mut parts = ironmesh_proto::assignment::Parts::default();
    // An applied revision not yet acked (the control lane was full).
    let mut pending_ack: Option<u64> = None;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            Some(changed) = async {
                match renewals.as_mut() {
                    Some(rx) => Some(rx.changed().await),
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_ok() {
                    break Err(SyncError::Renewed);
                }
                // The renewal task ended: keep the certificate we have.
                renewals = None;
            }
            _ = heartbeat.tick() => {
                seq += 1;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or_default();
                match control(&lanes, agent_message::Msg::Heartbeat(Heartbeat { sequence: seq, sent_unix_ms: now })) {
                    Ok(true) => {
                        metrics.heartbeats.inc();
                        if hb_skipped > 0 {
                            tracing::info!(skipped = hb_skipped, "heartbeats are sent again");
                            hb_skipped = 0;
                        }
                    }
                    Ok(false) => {
                        if hb_skipped == 0 {
                            tracing::warn!(controller = %url, "outbound stream is not draining; skipping heartbeats");
                        }
                        hb_skipped += 1;
                    }
                    Err(e) => break Err(e),
                }
                if let Err(e) = flush_ack(&lanes, &mut pending_ack) {
                    break Err(e);
                }
            }
            _ = storage_tick.tick() => {
                let wanted = applied.borrow().volumes.clone();
                apply::storage_pass(cfg.storage.as_ref(), &cfg.supervisor, wanted, Some(lanes.state.clone()));
            }
            _ = refresh.tick(), if !reading_inventory => {
                reading_inventory = true;
                let tx = inv_tx.clone();
                let version = cfg.agent_version.clone();
                tokio::spawn(async move {
                    let _ = tx.send(read_inventory(&version).await).await;
                });
            }
            Some(fresh) = inv_rx.recv() => {
                reading_inventory = false;
                if let Some(inv) = &fresh {
                    metrics.observe_inventory(inv);
                    if inventory.as_ref().map(stable) != Some(stable(inv)) {
                        match control(&lanes, agent_message::Msg::Inventory(inv.clone())) {
                            Ok(true) => {
                                tracing::info!("inventory changed; reported");
                                inventory = fresh;
                            }
                            // Not recorded as sent: the next refresh tries again.
                            Ok(false) => tracing::debug!("inventory changed; outbound stream full, reporting later"),
                            Err(e) => break Err(e),
                        }
                    }
                }
            }
            changed = applied.changed() => {
                if changed.is_err() {
                    break Err(SyncError::Broken("the assignment apply task ended".into()));
                }
                if let Some(revision) = ack_for(&applied.borrow_and_update(), first_seq) {
                    pending_ack = Some(revision);
                }
                if let Err(e) = flush_ack(&lanes, &mut pending_ack) {
                    break Err(e);
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.msg {
                    Some(controller_message::Msg::Assignment(part)) => {
                        // A large assignment comes in parts; apply it whole.
                        if let Some(a) = parts.push(part) {
                            if let Err(e) = receive_assignment(&mut whole, a, feed, node_ip) {
                                break Err(e);
                            }
                        }
                    }
                    Some(controller_message::Msg::LogRequest(req)) => {
                        log_tasks.retain(|_, t| !t.is_finished());
                        let id = req.request_id;
                        let task = tokio::spawn(serve_logs(cfg.supervisor.clone(), req, lanes.logs.clone()));
                        log_tasks.insert(id, task.abort_handle());
                    }
                    Some(controller_message::Msg::LogCancel(c)) => {
                        if let Some(t) = log_tasks.remove(&c.request_id) {
                            t.abort();
                        }
                    }
                    Some(controller_message::Msg::Settings(s)) => {
                        let every = Duration::from_millis(u64::from(s.heartbeat_interval_ms.max(100)));
                        tracing::info!(heartbeat_ms = every.as_millis() as u64, "controller changed the heartbeat interval");
                        // Its first tick is now: the controller shortens a
                        // grace only after a heartbeat at the new pace.
                        heartbeat = tokio::time::interval(every);
                    }
                    Some(controller_message::Msg::Welcome(_)) => {
                        break Err(SyncError::Protocol("second Welcome".into()));
                    }
                    None => break Err(SyncError::Protocol("empty controller message".into())),
                },
                Ok(None) => break Err(SyncError::Broken("controller closed the stream".into())),
                Err(s) if ironmesh_proto::is_shutting_down(&s) => break Err(SyncError::ControllerStopping),
                Err(s) => break Err(SyncError::Broken(format!("{:?}: {}", s.code(), s.message()))),
            }
        }
    };
    for (_, t) in log_tasks {
        t.abort();
    }
    result
}

/// Folds one assignment from the stream into `whole` (what this stream
/// gave so far) and hands the result to the apply task; returns the
/// hand-over's sequence number. A delta that does not fit is an error: the
/// session ends, and the next stream starts with a whole assignment.
fn receive_assignment(
    whole: &mut Option<Assignment>,
    a: Assignment,
    feed: &mut Feed,
    node_ip: Option<Ipv4Addr>,
) -> Result<u64, SyncError> {
    tracing::debug!(
        revision = a.revision,
        delta_base = a.delta.as_ref().map(|d| d.base_revision),
        instances = a.instances.len(),
        peers = a.peers.len(),
        "assignment received"
    );
    ironmesh_proto::assignment::apply(whole, a)?;
    let Some(folded) = whole.as_ref() else {
        return Err(SyncError::Protocol("folding left no assignment".into()));
    };
    Ok(feed.hand_off(node_ip, folded.clone()))
}

/// The revision to ack for what the apply task published, if this session
/// (whose first hand-over is `first_seq`) handed it over.
fn ack_for(applied: &Applied, first_seq: u64) -> Option<u64> {
    (applied.seq >= first_seq).then_some(applied.revision)
}

/// Queues the pending ack, if any and if the control lane has room (else
/// it stays pending for the next heartbeat).
fn flush_ack(lanes: &Lanes, pending: &mut Option<u64>) -> Result<(), SyncError> {
    if let Some(revision) = *pending {
        if control(lanes, agent_message::Msg::Ack(AssignmentAck { revision }))? {
            *pending = None;
        }
    }
    Ok(())
}

/// Answers one log request: the recorded output, then (with follow) new
/// output until cancelled, as LogChunk messages on the log lane. The lane
/// is bounded and read last: a slow reader makes this task wait, never the
/// session (see `outbound`).
async fn serve_logs(supervisor: Arc<Supervisor>, req: LogRequest, tx: mpsc::Sender<AgentMessage>) {
    let chunk = |data: Vec<u8>, eof: bool, error: String| {
        msg(agent_message::Msg::Log(LogChunk {
            request_id: req.request_id,
            data,
            eof,
            error,
        }))
    };
    match supervisor
        .logs(&req.instance, req.tail_lines, req.follow)
        .await
    {
        Ok(mut rx) => {
            while let Some(data) = rx.recv().await {
                if tx.send(chunk(data, false, String::new())).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(chunk(Vec::new(), true, String::new())).await;
        }
        Err(e) => {
            let _ = tx.send(chunk(Vec::new(), true, e.to_string())).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_proto::assignment::DeltaError;
    use ironmesh_proto::v1::{AssignmentDelta, IdentityEntry, PeerNode};
    use tokio::sync::Semaphore;

    fn id(ip: &str, identity: u32) -> IdentityEntry {
        IdentityEntry {
            ip: ip.into(),
            identity,
            ..Default::default()
        }
    }

    fn delta(revision: u64, base: u64, d: AssignmentDelta) -> Assignment {
        Assignment {
            revision,
            delta: Some(AssignmentDelta {
                base_revision: base,
                ..d
            }),
            ..Default::default()
        }
    }

    /// Deltas that arrive while a whole assignment is being applied are
    /// folded in order; the apply task then gets the newest whole state,
    /// once, and that is what the session acks.
    #[tokio::test]
    async fn deltas_are_folded_in_order_and_the_newest_whole_state_is_applied() {
        let (mut feed, desired) = Feed::new();
        let (applied_tx, mut applied) = watch::channel(Applied::default());
        let gate = Arc::new(Semaphore::new(0));
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<Assignment>();
        let g = gate.clone();
        let task = tokio::spawn(apply::run(desired, applied_tx, move |h| {
            let gate = g.clone();
            let seen = seen_tx.clone();
            async move {
                seen.send(h.assignment.clone()).unwrap();
                gate.acquire().await.unwrap().forget();
                Arc::new(crate::storage::VolumePlan::default())
            }
        }));
        let first_seq = feed.last_seq() + 1;

        let mut whole = None;
        let first = Assignment {
            revision: 5,
            identities: vec![id("10.0.0.1", 300)],
            peers: vec![PeerNode {
                name: "b".into(),
                pod_cidr: "10.0.1.0/24".into(),
                node_ip: "192.0.2.2".into(),
            }],
            ..Default::default()
        };
        receive_assignment(&mut whole, first.clone(), &mut feed, None).unwrap();
        assert_eq!(seen.recv().await, Some(first), "applying 5");

        // While 5 is being applied, two deltas come in.
        receive_assignment(
            &mut whole,
            delta(
                6,
                5,
                AssignmentDelta {
                    identities_set: vec![id("10.0.0.2", 301)],
                    ..Default::default()
                },
            ),
            &mut feed,
            None,
        )
        .unwrap();
        receive_assignment(
            &mut whole,
            delta(
                7,
                6,
                AssignmentDelta {
                    peers_removed: vec!["b".into()],
                    ..Default::default()
                },
            ),
            &mut feed,
            None,
        )
        .unwrap();
        gate.add_permits(1);
        let next = seen.recv().await.unwrap();
        assert_eq!(
            next.revision, 7,
            "6 was replaced by 7 before it was started"
        );
        assert_eq!(
            next.identities,
            vec![id("10.0.0.1", 300), id("10.0.0.2", 301)]
        );
        assert!(next.peers.is_empty());
        assert!(
            next.delta.is_none(),
            "the apply task gets whole assignments"
        );
        gate.add_permits(1);
        let done = applied.wait_for(|a| a.revision == 7).await.unwrap().clone();
        assert_eq!(ack_for(&done, first_seq), Some(7));

        // A delta against a revision this stream did not give last ends the
        // session and hands nothing over.
        let before = feed.last_seq();
        let err = receive_assignment(
            &mut whole,
            delta(9, 6, AssignmentDelta::default()),
            &mut feed,
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, SyncError::Delta(DeltaError::Gap { base: 6, have: 7 })),
            "{err}"
        );
        assert_eq!(feed.last_seq(), before);
        assert_eq!(whole.as_ref().map(|a| a.revision), Some(7));

        drop(feed);
        task.await.unwrap();
        assert_eq!(seen.recv().await, None, "5 and 7 only");
    }

    #[test]
    fn a_delta_first_on_a_stream_is_refused() {
        let (mut feed, _desired) = Feed::new();
        let mut whole = None;
        let err = receive_assignment(
            &mut whole,
            delta(3, 2, AssignmentDelta::default()),
            &mut feed,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, SyncError::Delta(DeltaError::NoBase)), "{err}");
        assert_eq!(feed.last_seq(), 0);
    }

    #[test]
    fn a_session_acks_only_what_it_handed_over() {
        let applied = |seq, revision| Applied {
            seq,
            revision,
            volumes: None,
        };
        // This session's first hand-over is 4: 3 came from the stream before.
        assert_eq!(ack_for(&applied(3, 10), 4), None);
        assert_eq!(ack_for(&applied(4, 12), 4), Some(12));
        assert_eq!(ack_for(&applied(0, 0), 1), None, "nothing applied yet");
    }
}
