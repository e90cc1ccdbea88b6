//! The agent's side of the sync stream: hello, inventory, heartbeats,
//! instance states and events, assignment acks and log chunks up; welcome,
//! assignments and log requests down. Reconnects with exponential backoff
//! when the controller goes away; after each connect it sends a full
//! instance report, so nothing that changed meanwhile is lost.
//!
//! With several controllers (`--controller a,b,c`) a lost stream moves on
//! to the next controller at once; the backoff only grows once every
//! controller has failed in a row. The hello carries the last acknowledged
//! assignment revision, and the new controller sends the full assignment,
//! so a failover neither loses nor replays anything blindly.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use ironmesh_proto::v1::{
    agent_message, controller_message, node_service_client::NodeServiceClient, AgentMessage,
    Assignment, AssignmentAck, Heartbeat, Hello, InstanceReport, InstanceState, Inventory,
    LogChunk, LogRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::{endpoint, error_chain, NodeIdentity};
use crate::metrics::AgentMetrics;
use crate::supervisor::{DesiredInstance, Supervisor, SupervisorReport};

/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the inventory is read again (sent only when it changed).
const INVENTORY_REFRESH: Duration = Duration::from_secs(30);

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
}

/// Where supervisor reports go: the open session's outbound queue, if any.
type Outbound = watch::Sender<Option<mpsc::Sender<AgentMessage>>>;

/// Forwards supervisor reports to the current session; while disconnected
/// they are dropped (the next session starts with a full report).
fn forward_reports(
    mut reports: mpsc::Receiver<SupervisorReport>,
    metrics: Arc<AgentMetrics>,
) -> Outbound {
    let (out, rx) = watch::channel::<Option<mpsc::Sender<AgentMessage>>>(None);
    tokio::spawn(async move {
        // Last known (phase, restarts) per instance, for the gauges.
        let mut known: HashMap<String, (String, u32)> = HashMap::new();
        while let Some(r) = reports.recv().await {
            observe(&metrics, &mut known, &r);
            let msg = match r {
                SupervisorReport::State(st) => agent_message::Msg::Instances(InstanceReport {
                    full: false,
                    instances: vec![st],
                }),
                SupervisorReport::Event(ev) => agent_message::Msg::Event(ev),
            };
            let tx = rx.borrow().clone();
            if let Some(tx) = tx {
                let _ = tx.send(AgentMessage { msg: Some(msg) }).await;
            }
        }
    });
    out
}

/// Sends flow batches to the current session without waiting: a batch
/// that finds no session, or a full queue, is dropped.
fn forward_flows(
    mut flows: mpsc::Receiver<ironmesh_proto::v1::FlowBatch>,
    session: watch::Receiver<Option<mpsc::Sender<AgentMessage>>>,
) {
    tokio::spawn(async move {
        while let Some(batch) = flows.recv().await {
            let tx = session.borrow().clone();
            if let Some(tx) = tx {
                let _ = tx.try_send(AgentMessage {
                    msg: Some(agent_message::Msg::Flows(batch)),
                });
            }
        }
    });
}

fn observe(
    metrics: &AgentMetrics,
    known: &mut HashMap<String, (String, u32)>,
    r: &SupervisorReport,
) {
    use crate::metrics::{PhaseLabel, ReasonLabel};
    match r {
        SupervisorReport::State(st) => {
            let before = known.insert(st.name.clone(), (st.phase.clone(), st.restarts));
            if let Some((_, restarts)) = &before {
                if st.restarts > *restarts {
                    metrics.restarts.inc_by(u64::from(st.restarts - restarts));
                }
            }
            let mut counts: HashMap<&str, i64> = HashMap::new();
            for (phase, _) in known.values() {
                *counts.entry(phase.as_str()).or_default() += 1;
            }
            for phase in ["Pending", "Running", "Succeeded", "Failed"] {
                metrics
                    .instances
                    .get_or_create(&PhaseLabel {
                        phase: phase.to_string(),
                    })
                    .set(counts.get(phase).copied().unwrap_or(0));
            }
        }
        SupervisorReport::Event(ev) => {
            if ev.reason == "Deleted" {
                known.remove(&ev.instance);
            }
            metrics
                .events
                .get_or_create(&ReasonLabel {
                    reason: ev.reason.clone(),
                })
                .inc();
        }
    }
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
    mut cfg: SyncConfig,
    id: NodeIdentity,
    metrics: Arc<AgentMetrics>,
    reports: mpsc::Receiver<SupervisorReport>,
    shutdown: ironmesh_daemon::Shutdown,
) {
    let outbound = forward_reports(reports, metrics.clone());
    if let Some(flows) = cfg.flows.take() {
        forward_flows(flows, outbound.subscribe());
    }
    let mut backoff = BACKOFF_MIN;
    let mut acked: u64 = 0;
    let count = cfg.controllers.len().max(1);
    let mut current = 0usize;
    // Failed sessions since the last healthy one.
    let mut failed_in_a_row = 0usize;
    loop {
        if shutdown.is_requested() {
            return;
        }
        let started = std::time::Instant::now();
        let url = cfg.controllers.get(current).cloned().unwrap_or_default();
        let res = session(
            &cfg,
            &url,
            &id,
            &metrics,
            &mut acked,
            &outbound,
            shutdown.clone(),
        )
        .await;
        outbound.send_replace(None);
        metrics.connected.set(0);
        match res {
            Ok(()) => return,
            Err(e) => {
                // A session that lived a while was healthy: start over small.
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = BACKOFF_MIN;
                    failed_in_a_row = 0;
                }
                failed_in_a_row += 1;
                metrics.reconnects.inc();
                current = (current + 1) % count;
                if count > 1 && failed_in_a_row < count {
                    // Another controller may be up: try it right away.
                    tracing::warn!(error = %e, controller = %url, next = %cfg.controllers[current], "sync stream down; failing over");
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

async fn session(
    cfg: &SyncConfig,
    url: &str,
    id: &NodeIdentity,
    metrics: &AgentMetrics,
    acked: &mut u64,
    outbound: &Outbound,
    shutdown: ironmesh_daemon::Shutdown,
) -> Result<(), SyncError> {
    let channel = endpoint(url)
        .map_err(|e| SyncError::Connect(e.to_string()))?
        .tls_config(id.tls(cfg.server_name.as_deref()))
        .map_err(|e| SyncError::Connect(e.to_string()))?
        .connect()
        .await
        .map_err(|e| SyncError::Connect(error_chain(&e)))?;
    let mut client = NodeServiceClient::new(channel);

    let (tx, rx) = mpsc::channel::<AgentMessage>(256);
    let send = |tx: &mpsc::Sender<AgentMessage>, m: agent_message::Msg| {
        let tx = tx.clone();
        async move {
            tx.send(AgentMessage { msg: Some(m) })
                .await
                .map_err(|_| SyncError::Broken("outbound stream closed".into()))
        }
    };
    let mut inventory = read_inventory(&cfg.agent_version).await;
    let node_ip = cfg.node_ip.or_else(|| {
        inventory
            .as_ref()
            .and_then(crate::inventory::detect_node_ip)
    });
    if node_ip.is_none() {
        tracing::warn!("no node address found (set --node-ip): other nodes cannot route to this node's instances");
    }
    send(
        &tx,
        agent_message::Msg::Hello(Hello {
            node_name: id.node_name.clone(),
            agent_version: cfg.agent_version.clone(),
            acked_revision: *acked,
            node_ip: node_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            capabilities: Vec::new(),
        }),
    )
    .await?;
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
    send(
        &tx,
        agent_message::Msg::Instances(InstanceReport {
            full: true,
            instances: cfg.supervisor.snapshot(),
        }),
    )
    .await?;
    outbound.send_replace(Some(tx.clone()));
    let mut log_tasks: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let hb_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    tracing::info!(node = %welcome.node_name, controller = %url, heartbeat_ms = hb_every.as_millis() as u64, "connected to controller");

    let mut heartbeat = tokio::time::interval(hb_every);
    let mut refresh = tokio::time::interval(INVENTORY_REFRESH);
    refresh.tick().await; // the first tick is immediate; inventory was just sent
    let mut seq: u64 = 0;
    // The volumes the last assignment bound to this node (None until one came).
    let mut wanted_volumes: Option<Vec<crate::storage::WantedVolume>> = None;
    let mut storage_tick =
        tokio::time::interval(cfg.storage_report_interval.max(Duration::from_millis(200)));
    storage_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = heartbeat.tick() => {
                seq += 1;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or_default();
                if let Err(e) = send(&tx, agent_message::Msg::Heartbeat(Heartbeat { sequence: seq, sent_unix_ms: now })).await {
                    break Err(e);
                }
                metrics.heartbeats.inc();
            }
            _ = storage_tick.tick() => {
                storage_pass(cfg, wanted_volumes.clone(), tx.clone());
            }
            _ = refresh.tick() => {
                let fresh = read_inventory(&cfg.agent_version).await;
                if let Some(inv) = &fresh {
                    metrics.observe_inventory(inv);
                    if inventory.as_ref().map(stable) != Some(stable(inv)) {
                        tracing::info!("inventory changed; reporting");
                        if let Err(e) = send(&tx, agent_message::Msg::Inventory(inv.clone())).await {
                            break Err(e);
                        }
                        inventory = fresh;
                    }
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.msg {
                    Some(controller_message::Msg::Assignment(a)) => {
                        let revision = a.revision;
                        tracing::debug!(revision, instances = a.instances.len(), peers = a.peers.len(), "assignment received");
                        apply_peers(cfg, node_ip, &a.peers).await;
                        if let Some(dp) = &cfg.datapath {
                            apply_datapath(dp, &a);
                        }
                        wanted_volumes = Some(wanted(&a.volumes));
                        if let Some(wq) = &cfg.work_queue {
                            wq.sync(&a.instances).await;
                        }
                        let (desired, rejected) = desired_instances(a, cfg.work_queue.as_deref());
                        for st in rejected {
                            let _ = send(&tx, agent_message::Msg::Instances(InstanceReport { full: false, instances: vec![st] })).await;
                        }
                        cfg.supervisor.set_desired(desired).await;
                        storage_pass(cfg, wanted_volumes.clone(), tx.clone());
                        *acked = revision;
                        metrics.assignment_revision.set(revision as i64);
                        if let Err(e) = send(&tx, agent_message::Msg::Ack(AssignmentAck { revision })).await {
                            break Err(e);
                        }
                    }
                    Some(controller_message::Msg::LogRequest(req)) => {
                        log_tasks.retain(|_, t| !t.is_finished());
                        let id = req.request_id;
                        let task = tokio::spawn(serve_logs(cfg.supervisor.clone(), req, tx.clone()));
                        log_tasks.insert(id, task.abort_handle());
                    }
                    Some(controller_message::Msg::LogCancel(c)) => {
                        if let Some(t) = log_tasks.remove(&c.request_id) {
                            t.abort();
                        }
                    }
                    Some(controller_message::Msg::Welcome(_)) => {
                        break Err(SyncError::Protocol("second Welcome".into()));
                    }
                    None => break Err(SyncError::Protocol("empty controller message".into())),
                },
                Ok(None) => break Err(SyncError::Broken("controller closed the stream".into())),
                Err(s) => break Err(SyncError::Broken(format!("{:?}: {}", s.code(), s.message()))),
            }
        }
    };
    for (_, t) in log_tasks {
        t.abort();
    }
    result
}

/// The volumes of an assignment as storage wants them; unreadable
/// backends fall back to the pool's default (and are logged).
fn wanted(volumes: &[ironmesh_proto::v1::VolumeAssignment]) -> Vec<crate::storage::WantedVolume> {
    volumes
        .iter()
        .map(|v| crate::storage::WantedVolume {
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            backend: match v.backend.as_str() {
                "" => None,
                b => b
                    .parse()
                    .inspect_err(|e| tracing::warn!(volume = %v.name, error = %e, "unknown volume backend in the assignment"))
                    .ok(),
            },
            pool: (!v.pool.is_empty()).then(|| v.pool.clone()),
        })
        .collect()
}

/// In the background: converges the node's volumes on `wanted` (when an
/// assignment has been seen; volumes still mounted by instances here are
/// kept), then reports pools and volume usage.
fn storage_pass(
    cfg: &SyncConfig,
    wanted: Option<Vec<crate::storage::WantedVolume>>,
    tx: mpsc::Sender<AgentMessage>,
) {
    let Some(storage) = cfg.storage.clone() else {
        return;
    };
    let (in_use, removing) = cfg.supervisor.volumes_in_use();
    tokio::spawn(async move {
        let report = tokio::task::spawn_blocking(move || {
            if let Some(wanted) = &wanted {
                for e in storage.converge(wanted, &in_use, !removing) {
                    tracing::warn!(error = %e, "volume not converged");
                }
            }
            storage_report(&storage)
        })
        .await;
        match report {
            Ok(r) => {
                let _ = tx
                    .send(AgentMessage {
                        msg: Some(agent_message::Msg::Storage(r)),
                    })
                    .await;
            }
            Err(e) => tracing::warn!(error = %e, "storage pass failed"),
        }
    });
}

/// Pools and volume usage, as the controller wants them.
pub fn storage_report(storage: &crate::storage::Storage) -> ironmesh_proto::v1::StorageReport {
    use ironmesh_proto::v1::{StoragePool, StorageReport, VolumeUsage};
    StorageReport {
        pools: storage
            .pools()
            .into_iter()
            .map(|p| StoragePool {
                name: p.name,
                kind: p.kind,
                path: p.path.display().to_string(),
                capacity_bytes: p.capacity_bytes,
                free_bytes: p.free_bytes,
                allocated_bytes: p.allocated_bytes,
                backends: p.backends.iter().map(|b| b.to_string()).collect(),
            })
            .collect(),
        volumes: storage
            .volumes()
            .into_iter()
            .map(|v| VolumeUsage {
                name: v.name,
                pool: v.pool,
                backend: v.backend.to_string(),
                size_bytes: v.size_bytes,
                used_bytes: v.used_bytes,
            })
            .collect(),
    }
}

/// Makes the routes to other nodes' pod CIDRs match the assignment.
/// Failures are logged, not fatal: instances on this node still run.
async fn apply_peers(
    cfg: &SyncConfig,
    node_ip: Option<std::net::Ipv4Addr>,
    peers: &[ironmesh_proto::v1::PeerNode],
) {
    use crate::network::{CrossHostMode, PeerRoute};
    let mut routes = Vec::with_capacity(peers.len());
    for p in peers {
        match (p.pod_cidr.parse::<ipnet::Ipv4Net>(), p.node_ip.parse()) {
            (Ok(pod_cidr), Ok(via)) => routes.push(PeerRoute {
                node: p.name.clone(),
                pod_cidr,
                via,
            }),
            _ => {
                tracing::warn!(peer = %p.name, pod_cidr = %p.pod_cidr, node_ip = %p.node_ip, "ignoring a peer with an unreadable pod CIDR or address")
            }
        }
    }
    let mode = match (cfg.cross_host, node_ip) {
        (crate::config::CrossHost::Direct, _) => CrossHostMode::Direct,
        (crate::config::CrossHost::Vxlan, Some(local_ip)) => CrossHostMode::Vxlan {
            vni: cfg.vxlan_vni,
            device: format!("{}vx", cfg.network.config().link_prefix),
            local_ip,
        },
        (crate::config::CrossHost::Vxlan, None) => {
            tracing::error!("--cross-host vxlan needs this node's address (--node-ip)");
            return;
        }
    };
    if let Err(e) = cfg.network.set_peer_routes(&mode, &routes).await {
        tracing::warn!(error = %e, peers = routes.len(), "cannot update routes to other nodes");
    }
}

/// The reserved identity of this host's own addresses (identities from
/// label sets start at 256).
const HOST_IDENTITY: u32 = 1;

/// Every IPv4 address of this host's interfaces, except loopback.
fn host_ipv4_addresses() -> Vec<std::net::Ipv4Addr> {
    match crate::inventory::interface_addresses() {
        Ok(list) => list
            .iter()
            .filter_map(|(_, cidr)| cidr.split('/').next()?.parse::<std::net::Ipv4Addr>().ok())
            .filter(|ip| !ip.is_loopback())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's addresses for the host identity");
            Vec::new()
        }
    }
}

/// Writes the assignment's identities, policy and services into the BPF
/// maps (replace-set: stale entries go; the datapath diffs against what it
/// last wrote, so an unchanged assignment writes nothing and one changed
/// rule is one map write). Bad entries are logged and skipped; the rest is
/// written.
fn apply_datapath(dp: &crate::datapath::Datapath, a: &Assignment) {
    use crate::datapath::{
        Direction as RuleDirection, PolicyRule, Protocol, RateLimit, ServiceEntry,
    };
    use ironmesh_proto::v1::policy_rule::Direction;
    let proto = |p: &str| match p {
        "TCP" => Some(vec![Protocol::Tcp]),
        "UDP" => Some(vec![Protocol::Udp]),
        "" => Some(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp]),
        _ => None,
    };
    let mut identities: Vec<(std::net::Ipv4Addr, u32)> = a
        .identities
        .iter()
        .filter_map(|e| Some((e.ip.parse().ok()?, e.identity)))
        .collect();
    let mut rules = Vec::new();
    for r in &a.policy_rules {
        let direction = match Direction::try_from(r.direction) {
            Ok(Direction::Ingress) => RuleDirection::Ingress,
            Ok(Direction::Egress) => RuleDirection::Egress,
            _ => {
                tracing::warn!(rule = ?r, "skipping a policy rule without a direction");
                continue;
            }
        };
        let (Some(protos), Ok(port)) = (proto(&r.protocol), u16::try_from(r.port)) else {
            tracing::warn!(rule = ?r, "skipping a policy rule this agent cannot express");
            continue;
        };
        // Identity 0 on the peer side means any peer (see the proto).
        let named = |id: u32| (id != 0).then_some(id);
        for p in protos {
            rules.push(PolicyRule {
                direction,
                src_identity: named(r.src_identity),
                dst_identity: named(r.dst_identity),
                port: if p == Protocol::Icmp { 0 } else { port },
                proto: p,
                rate: (r.rate_per_second > 0).then_some(RateLimit {
                    per_second: r.rate_per_second,
                    burst: r.burst,
                }),
                rule_id: 0,
            });
        }
    }
    // This host's own addresses are the reserved host identity, always
    // allowed into its local instances: probes and operators on the node
    // must reach enforced instances (Cilium's allow-localhost=always). The
    // host is never egress-enforced, and the replies of an egress-enforced
    // instance to it pass by conntrack, so egress needs no host rule;
    // connections an egress-enforced instance opens to the host need a rule,
    // like any other destination.
    let host_ips = host_ipv4_addresses();
    for ip in &host_ips {
        identities.push((*ip, HOST_IDENTITY));
    }
    for dst in &a.ingress_enforced {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Icmp] {
            rules.push(PolicyRule::ingress(Some(HOST_IDENTITY), *dst, 0, p));
        }
    }
    rules.dedup();
    // One rule this agent cannot hold must not keep every other policy
    // change out of the kernel: drop it, loudly.
    rules.retain(|r| match r.check() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "skipping a policy rule the datapath cannot hold");
            false
        }
    });
    let services: Vec<ServiceEntry> = a
        .services
        .iter()
        .filter_map(|s| {
            Some(ServiceEntry {
                vip: s.vip.parse().ok()?,
                port: u16::try_from(s.port).ok()?,
                proto: proto(&s.protocol)?.into_iter().next()?,
                backends: s
                    .backends
                    .iter()
                    .filter_map(|b| Some((b.ip.parse().ok()?, u16::try_from(b.port).ok()?)))
                    .collect(),
            })
        })
        .collect();
    let results = [
        ("identities", dp.set_identities(&identities)),
        (
            "policy",
            dp.apply_policy(&rules, &a.ingress_enforced, &a.egress_enforced),
        ),
        ("services", dp.set_services(&services)),
    ];
    for (what, r) in results {
        if let Err(e) = r {
            tracing::warn!(error = %e, what, "cannot update the datapath");
        }
    }
    tracing::debug!(
        identities = identities.len(),
        rules = rules.len(),
        services = services.len(),
        "datapath updated"
    );
}

/// The instances of an assignment, decoded. Instances whose spec cannot be
/// read are not run; a Failed state says why.
fn desired_instances(
    a: Assignment,
    work_queue: Option<&crate::work_queue::WorkQueueProxy>,
) -> (Vec<DesiredInstance>, Vec<InstanceState>) {
    let mut desired = Vec::with_capacity(a.instances.len());
    let mut rejected = Vec::new();
    for i in a.instances {
        match serde_json::from_str::<ironmesh_api::workload::WorkloadSpec>(&i.spec_json) {
            Ok(spec) => desired.push(DesiredInstance {
                queue_dir: i
                    .task
                    .as_ref()
                    .and(work_queue)
                    .map(|wq| wq.socket_dir(&i.name)),
                name: i.name,
                workload: i.workload,
                spec_generation: i.spec_generation,
                spec,
                image_digest: i.image_digest,
                volumes: i.volumes,
            }),
            Err(e) => {
                tracing::warn!(instance = %i.name, error = %e, "assignment carries an unreadable spec");
                rejected.push(InstanceState {
                    name: i.name,
                    phase: "Failed".into(),
                    reason: "InvalidSpec".into(),
                    message: format!("this agent cannot read the instance spec: {e}"),
                    spec_generation: i.spec_generation,
                    ..Default::default()
                });
            }
        }
    }
    (desired, rejected)
}

/// Answers one log request: the recorded output, then (with follow) new
/// output until cancelled, as LogChunk messages.
async fn serve_logs(supervisor: Arc<Supervisor>, req: LogRequest, tx: mpsc::Sender<AgentMessage>) {
    let chunk = |data: Vec<u8>, eof: bool, error: String| AgentMessage {
        msg: Some(agent_message::Msg::Log(LogChunk {
            request_id: req.request_id,
            data,
            eof,
            error,
        })),
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
