//! One simulated agent: a single task that joins, keeps a sync stream open
//! and reconnects with the real agent's backoff when it breaks.
//!
//! On the stream it does what `agent/src/sync/` does, minus containers:
//! `Hello` (with its last acknowledged revision and the
//! `incremental-assignments` capability), `Inventory`, a full instance
//! report after `Welcome`, heartbeats at the interval the controller asked
//! for, and for every assignment: fold it with
//! [`ironmesh_proto::assignment::apply`], acknowledge it, and report the
//! instances it had not reported yet as Running (one `InstanceReport` per
//! assignment). A delta that does not apply ends the stream, so the next one
//! starts from a whole assignment. Instances survive reconnects: a
//! simulated node "keeps running" what it ran, as the real agent's
//! containers do.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use ironmesh_proto::assignment::{self, DeltaError};
use ironmesh_proto::v1::{
    agent_message, controller_message, node_service_client::NodeServiceClient, AgentMessage,
    Assignment, AssignmentAck, Heartbeat, Hello, InstanceReport, InstanceState, LogChunk,
};
use prost::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::{self, endpoint, error_chain, NodeIdentity};
use crate::inventory::{self, AddressPool};
use crate::stats::{NodeStats, Received};
use crate::FleetConfig;

/// First and largest reconnect delay (the real agent's).
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lived this long was healthy: the backoff starts over.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// A condition on a node's folded assignment, checked after every
/// acknowledged assignment (see [`crate::Fleet::watch`]).
pub(crate) type Predicate = dyn Fn(&str, &Assignment) -> bool + Send + Sync;

/// What every agent of a fleet shares.
pub(crate) struct Shared {
    pub cfg: FleetConfig,
    /// Joins in flight at once.
    pub join_slots: Semaphore,
    pub watches: RwLock<Vec<Arc<Predicate>>>,
}

impl Shared {
    pub fn watches(&self) -> Vec<Arc<Predicate>> {
        self.watches
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One simulated node.
pub(crate) struct Agent {
    pub name: String,
    pub node_ip: Ipv4Addr,
    pub state: Mutex<AgentState>,
}

/// An instance the node "runs".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningInstance {
    pub workload: String,
    pub spec_generation: u64,
    pub ip: Ipv4Addr,
    pub started_unix_ms: i64,
}

/// Where an agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Joining,
    /// Joined; opening a sync stream (or waiting to retry).
    Connecting,
    /// Welcome received on the current stream.
    Connected,
    /// The controller refused the join; the agent stopped.
    Failed,
}

#[derive(Default)]
pub(crate) struct AgentState {
    pub phase: Phase,
    /// Streams that got a Welcome.
    pub sessions: u64,
    /// Assignments acknowledged on the current stream.
    pub session_acks: u64,
    pub acked_revision: u64,
    /// Every acknowledgement: (revision, when).
    pub acks: Vec<(u64, Instant)>,
    pub received: Received,
    pub delta_errors: u64,
    /// Streams that ended (for any reason).
    pub disconnects: u64,
    /// Why streams ended (or could not start), by kind of cause.
    pub disconnect_reasons: BTreeMap<String, u64>,
    pub last_error: Option<String>,
    pub pool: Option<AddressPool>,
    /// The stream's folded assignment; `None` until its first message.
    pub current: Option<Assignment>,
    pub instances: BTreeMap<String, RunningInstance>,
    /// Instances this node started (first reported), over its lifetime.
    pub started_instances: u64,
    /// Instances replaced by a newer spec generation.
    pub replaced_instances: u64,
    pub report_messages: u64,
    pub reported_states: u64,
    /// When each watch (by id) first held after an acknowledgement.
    pub watch_hits: Vec<Option<Instant>>,
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl RunningInstance {
    fn state(&self, name: &str) -> InstanceState {
        InstanceState {
            name: name.to_string(),
            phase: ironmesh_proto::v1::InstancePhase::Running.into(),
            ready: true,
            reason: "Started".into(),
            started_unix_ms: self.started_unix_ms,
            spec_generation: self.spec_generation,
            ip: self.ip.to_string(),
            ..Default::default()
        }
    }
}

impl AgentState {
    /// A Welcome arrived: a new stream, with `pod_cidr`. Returns the full
    /// report of what the node runs.
    fn on_welcome(&mut self, node: &str, pod_cidr: Ipv4Net) -> Vec<InstanceState> {
        self.phase = Phase::Connected;
        self.sessions += 1;
        self.session_acks = 0;
        // A new stream starts from a whole assignment.
        self.current = None;
        if self.pool.as_ref().map(AddressPool::cidr) != Some(pod_cidr) {
            if self.pool.is_some() {
                tracing::warn!(node, %pod_cidr, "pod CIDR changed; instances get new addresses");
            }
            let mut pool = AddressPool::new(pod_cidr);
            for inst in self.instances.values_mut() {
                if !pool.reserve(inst.ip) {
                    match pool.allocate() {
                        Some(ip) => inst.ip = ip,
                        None => tracing::warn!(node, "pod CIDR too small for the instances kept"),
                    }
                }
            }
            self.pool = Some(pool);
        }
        self.instances
            .iter()
            .map(|(name, inst)| inst.state(name))
            .collect()
    }

    /// Folds `a` in; on success returns the revision to acknowledge and the
    /// states of instances not reported before.
    fn on_assignment(
        &mut self,
        node: &str,
        a: Assignment,
        watches: &[Arc<Predicate>],
    ) -> Result<(u64, Vec<InstanceState>), DeltaError> {
        let bytes = a.encoded_len() as u64;
        let local_changed = a.delta.as_ref().is_none_or(|d| d.local_changed);
        if a.delta.is_some() {
            self.received.delta_msgs += 1;
            self.received.delta_bytes += bytes;
        } else {
            self.received.whole_msgs += 1;
            self.received.whole_bytes += bytes;
        }
        if let Err(e) = assignment::apply(&mut self.current, a) {
            self.delta_errors += 1;
            return Err(e);
        }
        let Some(cur) = self.current.as_ref() else {
            return Err(DeltaError::NoBase);
        };
        let revision = cur.revision;
        let now = Instant::now();
        self.acked_revision = revision;
        self.acks.push((revision, now));
        self.session_acks += 1;

        let mut report = Vec::new();
        if local_changed {
            let assigned: HashMap<&str, u64> = cur
                .instances
                .iter()
                .map(|i| (i.name.as_str(), i.spec_generation))
                .collect();
            let pool = &mut self.pool;
            self.instances.retain(|name, inst| {
                let keep = assigned.contains_key(name.as_str());
                if !keep {
                    if let Some(p) = pool.as_mut() {
                        p.release(inst.ip);
                    }
                }
                keep
            });
            for i in &cur.instances {
                match self.instances.get_mut(&i.name) {
                    Some(r) if r.spec_generation == i.spec_generation => {}
                    Some(r) => {
                        // The real agent replaces a container of an older
                        // generation; same address, new start.
                        r.spec_generation = i.spec_generation;
                        r.started_unix_ms = now_unix_ms();
                        self.replaced_instances += 1;
                        report.push(r.state(&i.name));
                    }
                    None => match self.pool.as_mut().and_then(AddressPool::allocate) {
                        Some(ip) => {
                            let r = RunningInstance {
                                workload: i.workload.clone(),
                                spec_generation: i.spec_generation,
                                ip,
                                started_unix_ms: now_unix_ms(),
                            };
                            report.push(r.state(&i.name));
                            self.instances.insert(i.name.clone(), r);
                            self.started_instances += 1;
                        }
                        None => report.push(InstanceState {
                            name: i.name.clone(),
                            phase: ironmesh_proto::v1::InstancePhase::Failed.into(),
                            reason: "NetworkSetupError".into(),
                            message: "no free address in the node's pod CIDR".into(),
                            spec_generation: i.spec_generation,
                            ..Default::default()
                        }),
                    },
                }
            }
        }
        self.check_watches(node, watches, now);
        Ok((revision, report))
    }

    pub fn check_watches(&mut self, node: &str, watches: &[Arc<Predicate>], now: Instant) {
        if self.watch_hits.len() < watches.len() {
            self.watch_hits.resize(watches.len(), None);
        }
        let Some(cur) = self.current.as_ref() else {
            return;
        };
        for (hit, pred) in self.watch_hits.iter_mut().zip(watches) {
            if hit.is_none() && pred(node, cur) {
                *hit = Some(now);
            }
        }
    }
}

impl Agent {
    pub fn new(name: String, node_ip: Ipv4Addr) -> Agent {
        Agent {
            name,
            node_ip,
            state: Mutex::new(AgentState::default()),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        // Plain counters and maps: a panic elsewhere leaves them usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> NodeStats {
        let st = self.lock();
        NodeStats {
            name: self.name.clone(),
            node_ip: self.node_ip,
            phase: st.phase,
            sessions: st.sessions,
            session_acks: st.session_acks,
            acked_revision: st.acked_revision,
            received: st.received,
            delta_errors: st.delta_errors,
            disconnects: st.disconnects,
            last_error: st.last_error.clone(),
            pod_cidr: st.pool.as_ref().map(AddressPool::cidr),
            instances: st.instances.len(),
            started_instances: st.started_instances,
            replaced_instances: st.replaced_instances,
            report_messages: st.report_messages,
            reported_states: st.reported_states,
        }
    }

    /// When this node first acknowledged a revision of at least `rev`.
    pub fn first_ack_at_or_after(&self, rev: u64) -> Option<Instant> {
        let st = self.lock();
        // Revisions only grow within a stream but may repeat across
        // streams; the first one at or above `rev` is the answer.
        st.acks.iter().find(|(r, _)| *r >= rev).map(|(_, t)| *t)
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("stream broke: {0}")]
    Broken(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}; reconnecting for a whole assignment")]
    Delta(DeltaError),
}

impl SessionError {
    /// The cause without what varies between nodes (addresses, revisions),
    /// for counting.
    fn kind(&self) -> String {
        let short = |s: &str| {
            let s: String = s
                .chars()
                .map(|c| if c.is_ascii_digit() { 'N' } else { c })
                .collect();
            s.chars().take(200).collect::<String>()
        };
        match self {
            SessionError::Connect(m) => format!("connect: {}", short(m)),
            SessionError::Broken(m) => format!("broken: {}", short(m)),
            SessionError::Protocol(m) => format!("protocol: {}", short(m)),
            SessionError::Delta(DeltaError::Gap { .. }) => "delta: gap".into(),
            SessionError::Delta(DeltaError::NoBase) => "delta: no base".into(),
        }
    }
}

/// A status with its code and the chain of causes behind it (a transport
/// error says what broke only in its sources, e.g. a keep-alive timeout).
fn status_text(s: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    let mut cur = std::error::Error::source(s);
    while let Some(c) = cur {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = c.source();
    }
    text
}

/// The agent's whole life: join, then sessions until the task is aborted.
pub(crate) async fn run(agent: Arc<Agent>, shared: Arc<Shared>) {
    let Some(id) = join(&agent, &shared).await else {
        return;
    };
    agent.lock().phase = Phase::Connecting;
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let res = session(&agent, &shared, &id).await;
        let delay = {
            let mut st = agent.lock();
            st.phase = Phase::Connecting;
            st.disconnects += 1;
            if started.elapsed() > HEALTHY_SESSION {
                backoff = BACKOFF_MIN;
            }
            let why = match &res {
                Err(e) => {
                    tracing::debug!(node = %agent.name, error = %e, "sync stream down");
                    st.last_error = Some(e.to_string());
                    e.kind()
                }
                Ok(()) => "stream ended".to_string(),
            };
            *st.disconnect_reasons.entry(why).or_default() += 1;
            match res {
                // A missed message is not the controller's trouble: at once.
                Err(SessionError::Delta(_)) => BACKOFF_MIN,
                _ => {
                    let d = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    d
                }
            }
        };
        let jitter = Duration::from_millis(rand::random_range(0..=delay.as_millis() as u64 / 4));
        tokio::time::sleep(delay + jitter).await;
    }
}

/// What a node does when the controller refused its join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Stop, as the real agent does (it exits with the controller's reason).
    GiveUp,
    /// The name is taken, most likely by this node's own earlier attempt
    /// whose answer was lost (the key that went with it is gone): join
    /// again with a token bound to the name.
    Reprovision,
}

/// `tried_before`: an earlier attempt failed in a way that may have reached
/// the controller; `bound_token`: the refused join already used a token
/// bound to the name (it is not tried twice).
fn on_refusal(
    e: &identity::IdentityError,
    tried_before: bool,
    bound_token: bool,
    can_reprovision: bool,
) -> Refusal {
    match e {
        identity::IdentityError::NameTaken(_)
            if tried_before && !bound_token && can_reprovision =>
        {
            Refusal::Reprovision
        }
        _ => Refusal::GiveUp,
    }
}

/// How long the token for a re-provisioning join is good for.
const REPROVISION_TOKEN_TTL: Duration = Duration::from_secs(600);

async fn join(agent: &Agent, shared: &Shared) -> Option<NodeIdentity> {
    let cfg = &shared.cfg;
    let mut backoff = BACKOFF_MIN;
    let mut token = cfg.bootstrap_token.clone();
    let mut bound_token = false;
    let mut tried_before = false;
    loop {
        let res = {
            let Ok(_slot) = shared.join_slots.acquire().await else {
                return None;
            };
            identity::join(
                &cfg.controller_url,
                cfg.server_name.as_deref(),
                &cfg.ca_pem,
                &token,
                &agent.name,
            )
            .await
        };
        let refused = match res {
            Ok(id) => return Some(id),
            Err(e) if e.is_transient() => {
                tracing::debug!(node = %agent.name, error = %e, "join failed; retrying");
                agent.lock().last_error = Some(e.to_string());
                // The call may have reached the controller and succeeded.
                tried_before = true;
                None
            }
            Err(e) => Some(e),
        };
        if let Some(e) = refused {
            match on_refusal(
                &e,
                tried_before,
                bound_token,
                cfg.reprovision_with.is_some(),
            ) {
                Refusal::Reprovision => {
                    tracing::info!(node = %agent.name, error = %e, "join refused after a lost answer; re-joining with a token bound to the node");
                    match node_token(cfg, &agent.name).await {
                        Ok(t) => {
                            token = t;
                            bound_token = true;
                            continue;
                        }
                        Err(why) => {
                            // Worth another try: the controller is busy.
                            tracing::debug!(node = %agent.name, error = %why, "cannot get a token bound to the node; retrying");
                            agent.lock().last_error = Some(why);
                        }
                    }
                }
                Refusal::GiveUp => {
                    tracing::warn!(node = %agent.name, error = %e, "join refused");
                    let mut st = agent.lock();
                    st.phase = Phase::Failed;
                    st.last_error = Some(e.to_string());
                    return None;
                }
            }
        }
        let jitter = Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 4));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A one-use token bound to `node`, made with the fleet's operator
/// credential (the operator's side of re-provisioning).
async fn node_token(cfg: &FleetConfig, node: &str) -> Result<String, String> {
    let Some(op_cfg) = &cfg.reprovision_with else {
        return Err("no operator credential to re-provision with".into());
    };
    let mut op = crate::operator::Operator::connect(op_cfg)
        .await
        .map_err(|e| e.to_string())?;
    op.create_node_token(
        node,
        REPROVISION_TOKEN_TTL,
        "ironmesh-sim: re-join after a lost Join answer",
    )
    .await
    .map_err(|e| e.to_string())
}

async fn session(agent: &Agent, shared: &Shared, id: &NodeIdentity) -> Result<(), SessionError> {
    let cfg = &shared.cfg;
    let channel = endpoint(&cfg.controller_url)
        .map_err(|e| SessionError::Connect(e.to_string()))?
        .tls_config(id.tls(cfg.server_name.as_deref()))
        .map_err(|e| SessionError::Connect(e.to_string()))?
        .connect()
        .await
        .map_err(|e| SessionError::Connect(error_chain(&e)))?;
    let mut client = NodeServiceClient::new(channel).max_decoding_message_size(256 << 20);

    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let send = |m: agent_message::Msg| {
        let tx = tx.clone();
        async move {
            tx.send(AgentMessage { msg: Some(m) })
                .await
                .map_err(|_| SessionError::Broken("outbound stream closed".into()))
        }
    };
    let acked = agent.lock().acked_revision;
    send(agent_message::Msg::Hello(Hello {
        node_name: agent.name.clone(),
        agent_version: cfg.agent_version.clone(),
        acked_revision: acked,
        node_ip: agent.node_ip.to_string(),
        capabilities: if cfg.incremental {
            vec![
                assignment::INCREMENTAL.to_string(),
                ironmesh_proto::SETTINGS.to_string(),
                assignment::PARTS.to_string(),
            ]
        } else {
            Vec::new()
        },
        // Simulated agents have no datapath to report.
        datapath: None,
    }))
    .await?;
    send(agent_message::Msg::Inventory(inventory::inventory(
        &agent.name,
        agent.node_ip,
        cfg.cpus,
        cfg.memory_bytes,
        &cfg.agent_version,
    )))
    .await?;

    let mut inbound = client
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|s| SessionError::Broken(status_text(&s)))?
        .into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(m)) => match m.msg {
            Some(controller_message::Msg::Welcome(w)) => w,
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        },
        Ok(None) => return Err(SessionError::Broken("closed before Welcome".into())),
        Err(s) => return Err(SessionError::Broken(status_text(&s))),
    };
    let pod_cidr: Ipv4Net = welcome.pod_cidr.parse().map_err(|e| {
        SessionError::Protocol(format!(
            "controller sent pod CIDR {:?}: {e}",
            welcome.pod_cidr
        ))
    })?;
    if pod_cidr.network() != pod_cidr.addr() || pod_cidr.prefix_len() > 29 {
        return Err(SessionError::Protocol(format!(
            "pod CIDR {pod_cidr} cannot hold instances"
        )));
    }
    let full = {
        let mut st = agent.lock();
        let full = st.on_welcome(&agent.name, pod_cidr);
        st.report_messages += 1;
        st.reported_states += full.len() as u64;
        full
    };
    send(agent_message::Msg::Instances(InstanceReport {
        full: true,
        instances: full,
    }))
    .await?;

    let hb_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let mut heartbeat = tokio::time::interval(hb_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut parts = assignment::Parts::default();
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                seq += 1;
                send(agent_message::Msg::Heartbeat(Heartbeat {
                    sequence: seq,
                    sent_unix_ms: now_unix_ms(),
                }))
                .await?;
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.msg {
                    Some(controller_message::Msg::Assignment(part)) => {
                        let Some(a) = parts.push(part) else {
                            continue;
                        };
                        let watches = shared.watches();
                        let (revision, report) = {
                            let mut st = agent.lock();
                            let out = st.on_assignment(&agent.name, a, &watches);
                            if let Ok((_, report)) = &out {
                                if !report.is_empty() {
                                    st.report_messages += 1;
                                    st.reported_states += report.len() as u64;
                                }
                            }
                            out.map_err(SessionError::Delta)?
                        };
                        send(agent_message::Msg::Ack(AssignmentAck { revision })).await?;
                        if !report.is_empty() {
                            send(agent_message::Msg::Instances(InstanceReport {
                                full: false,
                                instances: report,
                            }))
                            .await?;
                        }
                    }
                    Some(controller_message::Msg::LogRequest(req)) => {
                        send(agent_message::Msg::Log(LogChunk {
                            request_id: req.request_id,
                            data: Vec::new(),
                            eof: true,
                            error: format!("{} is a simulated node: it keeps no logs", agent.name),
                        }))
                        .await?;
                    }
                    Some(controller_message::Msg::LogCancel(_)) => {}
                    Some(controller_message::Msg::Settings(s)) => {
                        let every = Duration::from_millis(u64::from(s.heartbeat_interval_ms.max(100)));
                        heartbeat = tokio::time::interval(every);
                        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    Some(controller_message::Msg::Welcome(_)) => {
                        return Err(SessionError::Protocol("second Welcome".into()));
                    }
                    None => return Err(SessionError::Protocol("empty controller message".into())),
                },
                Ok(None) => return Err(SessionError::Broken("controller closed the stream".into())),
                Err(s) => {
                    return Err(SessionError::Broken(status_text(&s)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_proto::v1::{AssignmentDelta, IdentityEntry, InstanceAssignment};

    #[test]
    fn a_taken_name_after_a_lost_answer_is_joined_again_with_a_bound_token() {
        use identity::IdentityError;
        let taken = IdentityError::NameTaken("node sim-00001 already exists".into());
        // The retry of a join whose answer was lost: re-provision.
        assert_eq!(on_refusal(&taken, true, false, true), Refusal::Reprovision);
        // A first attempt that finds the name taken is another node's.
        assert_eq!(on_refusal(&taken, false, false, true), Refusal::GiveUp);
        // Refused even with a bound token: nothing more to try.
        assert_eq!(on_refusal(&taken, true, true, true), Refusal::GiveUp);
        // No operator credential: as the real agent, stop.
        assert_eq!(on_refusal(&taken, true, false, false), Refusal::GiveUp);
        // Any other refusal stops at once.
        let bad = IdentityError::Refused("the join token is not valid".into());
        assert_eq!(on_refusal(&bad, true, false, true), Refusal::GiveUp);
    }

    fn inst(name: &str, generation: u64) -> InstanceAssignment {
        InstanceAssignment {
            name: name.into(),
            workload: "w".into(),
            spec_generation: generation,
            ..Default::default()
        }
    }

    fn connected() -> AgentState {
        let mut st = AgentState::default();
        assert!(st
            .on_welcome("n1", "10.0.4.0/24".parse().unwrap())
            .is_empty());
        st
    }

    #[test]
    fn new_instances_are_reported_once_and_forgotten_when_unlisted() {
        let mut st = connected();
        let whole = Assignment {
            revision: 5,
            instances: vec![inst("w-a", 1), inst("w-b", 1)],
            ..Default::default()
        };
        let (rev, report) = st.on_assignment("n1", whole.clone(), &[]).unwrap();
        assert_eq!(rev, 5);
        assert_eq!(report.len(), 2);
        assert!(report
            .iter()
            .all(|s| s.phase() == ironmesh_proto::v1::InstancePhase::Running && s.ready));
        assert_eq!(report[0].ip, "10.0.4.2");
        assert_eq!(report[1].ip, "10.0.4.3");

        // The same again: nothing new.
        let (_, report) = st
            .on_assignment(
                "n1",
                Assignment {
                    revision: 6,
                    ..whole
                },
                &[],
            )
            .unwrap();
        assert!(report.is_empty());

        // A delta without local changes keeps the instances.
        let (_, report) = st
            .on_assignment(
                "n1",
                Assignment {
                    revision: 7,
                    delta: Some(AssignmentDelta {
                        base_revision: 6,
                        identities_set: vec![IdentityEntry {
                            ip: "10.0.9.2".into(),
                            identity: 300,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
        assert!(report.is_empty());
        assert_eq!(st.instances.len(), 2);
        assert_eq!(st.received.delta_msgs, 1);
        assert_eq!(st.received.whole_msgs, 2);

        // A local change drops w-a and adds w-c, which reuses w-a's address.
        let (_, report) = st
            .on_assignment(
                "n1",
                Assignment {
                    revision: 9,
                    instances: vec![inst("w-b", 1), inst("w-c", 1)],
                    delta: Some(AssignmentDelta {
                        base_revision: 7,
                        local_changed: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].name, "w-c");
        assert_eq!(report[0].ip, "10.0.4.2");
        assert_eq!(st.started_instances, 3);
        assert_eq!(
            st.current.as_ref().unwrap().identities.len(),
            1,
            "the fold kept the identity"
        );
    }

    #[test]
    fn a_gap_is_an_error_and_a_reconnect_keeps_the_instances() {
        let mut st = connected();
        st.on_assignment(
            "n1",
            Assignment {
                revision: 5,
                instances: vec![inst("w-a", 1)],
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        let gap = Assignment {
            revision: 8,
            delta: Some(AssignmentDelta {
                base_revision: 6,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            st.on_assignment("n1", gap, &[]).unwrap_err(),
            DeltaError::Gap { base: 6, have: 5 }
        );
        assert_eq!(st.delta_errors, 1);
        assert_eq!(st.acked_revision, 5);

        let full = st.on_welcome("n1", "10.0.4.0/24".parse().unwrap());
        assert_eq!(full.len(), 1, "the full report lists what runs");
        assert!(st.current.is_none(), "a new stream starts from nothing");
        let (_, report) = st
            .on_assignment(
                "n1",
                Assignment {
                    revision: 9,
                    instances: vec![inst("w-a", 1)],
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
        assert!(report.is_empty(), "not reported as new again");
        assert_eq!(st.started_instances, 1);
        assert_eq!(st.sessions, 2);
    }

    #[test]
    fn a_newer_generation_is_reported_again() {
        let mut st = connected();
        st.on_assignment(
            "n1",
            Assignment {
                revision: 5,
                instances: vec![inst("w-a", 1)],
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        let (_, report) = st
            .on_assignment(
                "n1",
                Assignment {
                    revision: 6,
                    instances: vec![inst("w-a", 2)],
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].spec_generation, 2);
        assert_eq!(st.replaced_instances, 1);
    }

    #[test]
    fn watches_record_the_first_ack_that_satisfies_them() {
        let mut st = connected();
        let w: Vec<Arc<Predicate>> = vec![Arc::new(|_: &str, a: &Assignment| a.revision >= 6)];
        st.on_assignment(
            "n1",
            Assignment {
                revision: 5,
                ..Default::default()
            },
            &w,
        )
        .unwrap();
        assert_eq!(st.watch_hits, vec![None]);
        st.on_assignment(
            "n1",
            Assignment {
                revision: 6,
                ..Default::default()
            },
            &w,
        )
        .unwrap();
        let first = st.watch_hits[0].unwrap();
        st.on_assignment(
            "n1",
            Assignment {
                revision: 7,
                ..Default::default()
            },
            &w,
        )
        .unwrap();
        assert_eq!(st.watch_hits[0], Some(first));
    }
}
