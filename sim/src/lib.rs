//! `ironmesh-sim`: many simulated Ironmesh agents in one process, on the
//! real node protocol.
//!
//! A [`Fleet`] is N simulated nodes against one controller. Each node goes
//! through everything a real agent goes through: it makes its own key and
//! CSR and joins with the bootstrap token ([`identity`]), opens
//! `NodeService.Sync` over mutual TLS with the certificate it got, says
//! `Hello` (announcing incremental assignments), reports an
//! [inventory](inventory::inventory), heartbeats, folds every assignment
//! with [`ironmesh_proto::assignment::apply`], acknowledges it and reports
//! its instances Running with addresses from its pod CIDR. Nothing runs:
//! there are no containers, routes or BPF maps, so one process holds a
//! thousand nodes. The controller cannot tell them from real agents.
//!
//! The fleet counts, per node, the assignment messages and bytes it
//! received (whole and delta apart) and when it acknowledged each revision,
//! so a driver can ask when every node had a change ([`Fleet::all_acked`],
//! [`Fleet::watch`]) and what it cost ([`Fleet::nodes`], figures in
//! [`stats`]). [`manifests`] holds the objects the scale scenario applies
//! and [`operator`] the operator client the bench and the tests drive.
//!
//! All agents share one tokio runtime (the caller's) and each is a single
//! task (plus its connection's driver inside tonic).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use ironmesh_proto::v1::Assignment;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

mod agent;
pub mod identity;
pub mod inventory;
pub mod manifests;
pub mod operator;
pub mod stats;

pub use agent::{Phase, RunningInstance};
pub use operator::{Operator, OperatorError};
pub use stats::{median, percentile, NodeStats, Received};

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `https://host:port` of the controller.
    pub controller_url: String,
    /// Name the controller's certificate must carry, if not the URL's host.
    pub server_name: Option<String>,
    /// The cluster CA certificate (PEM), trusted for the join.
    pub ca_pem: String,
    pub bootstrap_token: String,
    pub nodes: usize,
    /// Node names are `<prefix>-<00001>`.
    pub name_prefix: String,
    /// Logical CPUs each node reports.
    pub cpus: u32,
    /// Memory each node reports, bytes.
    pub memory_bytes: u64,
    /// Joins in flight at once (0: no limit). Agents of a rack that boot
    /// together are spread by their boot times; a fleet started in one
    /// instant is not, and this stands in for that.
    pub join_concurrency: usize,
    pub agent_version: String,
    /// Announce `incremental-assignments` in Hello (true by default); off,
    /// the nodes are what an agent without deltas is and get whole
    /// assignments.
    pub incremental: bool,
    /// An operator credential (imctl's config) the fleet may use when a
    /// node's join answer was lost: the controller recorded the join, so
    /// a retry with the bootstrap token is refused (`ALREADY_EXISTS`), and
    /// the node gets a token bound to its name as an operator would give
    /// it (`imctl token create --node NAME`). Without it such a node fails.
    pub reprovision_with: Option<ironmesh_api::client_config::ClientConfig>,
}

impl FleetConfig {
    /// `nodes` nodes of 16 CPUs and 64 GiB each.
    pub fn new(controller_url: &str, ca_pem: &str, bootstrap_token: &str, nodes: usize) -> Self {
        FleetConfig {
            controller_url: controller_url.to_string(),
            server_name: None,
            ca_pem: ca_pem.to_string(),
            bootstrap_token: bootstrap_token.trim().to_string(),
            nodes,
            name_prefix: "sim".into(),
            cpus: 16,
            memory_bytes: 64 << 30,
            join_concurrency: 64,
            agent_version: format!("{}-sim", env!("CARGO_PKG_VERSION")),
            incremental: true,
            reprovision_with: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("a fleet must be started inside a tokio runtime")]
    NoRuntime,
    #[error("{0} nodes requested; at most {max} have distinct node addresses", max = inventory::MAX_NODES)]
    TooMany(usize),
    #[error(
        "node name prefix {0:?} does not make valid node names (lowercase letters, digits, '-')"
    )]
    BadPrefix(String),
}

/// A watch registered with [`Fleet::watch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchId(usize);

/// N simulated agents. Dropping it stops them (their streams close).
pub struct Fleet {
    agents: Vec<Arc<agent::Agent>>,
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<agent::Shared>,
    started: Instant,
}

impl Fleet {
    /// Starts every agent on the current tokio runtime and returns at once;
    /// they join and connect in the background.
    pub fn start(cfg: FleetConfig) -> Result<Fleet, FleetError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| FleetError::NoRuntime)?;
        if cfg.nodes > inventory::MAX_NODES {
            return Err(FleetError::TooMany(cfg.nodes));
        }
        let valid = !cfg.name_prefix.is_empty()
            && cfg.name_prefix.len() <= 50
            && cfg
                .name_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !cfg.name_prefix.starts_with('-');
        if !valid {
            return Err(FleetError::BadPrefix(cfg.name_prefix));
        }
        let slots = match cfg.join_concurrency {
            0 => Semaphore::MAX_PERMITS,
            n => n,
        };
        let shared = Arc::new(agent::Shared {
            join_slots: Semaphore::new(slots),
            watches: RwLock::new(Vec::new()),
            cfg,
        });
        let width = shared.cfg.nodes.to_string().len().max(5);
        let mut agents = Vec::with_capacity(shared.cfg.nodes);
        let mut tasks = Vec::with_capacity(shared.cfg.nodes);
        for i in 0..shared.cfg.nodes {
            let name = format!("{}-{:0width$}", shared.cfg.name_prefix, i + 1);
            let ip = inventory::node_ip(i).ok_or(FleetError::TooMany(shared.cfg.nodes))?;
            let a = Arc::new(agent::Agent::new(name, ip));
            tasks.push(handle.spawn(agent::run(a.clone(), shared.clone())));
            agents.push(a);
        }
        Ok(Fleet {
            agents,
            tasks,
            shared,
            started: Instant::now(),
        })
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// When [`Fleet::start`] returned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A snapshot of every node, in name order.
    pub fn nodes(&self) -> Vec<NodeStats> {
        self.agents.iter().map(|a| a.stats()).collect()
    }

    /// Nodes whose current stream got its Welcome.
    pub fn connected(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.lock().phase == Phase::Connected)
            .count()
    }

    /// Nodes connected that acknowledged at least one assignment on their
    /// current stream, and (if `min_sessions`) had at least that many
    /// streams.
    pub fn synced(&self, min_sessions: u64) -> usize {
        self.agents
            .iter()
            .filter(|a| {
                let st = a.lock();
                st.phase == Phase::Connected && st.session_acks > 0 && st.sessions >= min_sessions
            })
            .count()
    }

    /// Nodes whose join was refused (they stopped), with the reason.
    pub fn failed(&self) -> Vec<(String, String)> {
        self.agents
            .iter()
            .filter_map(|a| {
                let st = a.lock();
                (st.phase == Phase::Failed)
                    .then(|| (a.name.clone(), st.last_error.clone().unwrap_or_default()))
            })
            .collect()
    }

    /// Why streams ended, fleet-wide: cause → count.
    pub fn disconnect_reasons(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for a in &self.agents {
            for (k, v) in &a.lock().disconnect_reasons {
                *all.entry(k.clone()).or_default() += v;
            }
        }
        all
    }

    /// Assignment bytes and messages received by the whole fleet.
    pub fn received(&self) -> Received {
        let mut r = Received::default();
        for a in &self.agents {
            r.add(&a.lock().received);
        }
        r
    }

    /// What each node runs: node → instance → details.
    pub fn instances(&self) -> BTreeMap<String, BTreeMap<String, RunningInstance>> {
        self.agents
            .iter()
            .map(|a| (a.name.clone(), a.lock().instances.clone()))
            .collect()
    }

    /// The instance names each node's folded assignment lists (empty for a
    /// node without an assignment on its current stream).
    pub fn assigned(&self) -> BTreeMap<String, Vec<String>> {
        self.inspect(|_, a| {
            a.map(|a| a.instances.iter().map(|i| i.name.clone()).collect())
                .unwrap_or_default()
        })
        .into_iter()
        .collect()
    }

    /// Calls `f` with each node's name and folded assignment (under that
    /// node's lock: keep it short).
    pub fn inspect<T>(
        &self,
        mut f: impl FnMut(&str, Option<&Assignment>) -> T,
    ) -> Vec<(String, T)> {
        self.agents
            .iter()
            .map(|a| {
                let st = a.lock();
                (a.name.clone(), f(&a.name, st.current.as_ref()))
            })
            .collect()
    }

    /// For each node, when it first acknowledged a revision of at least
    /// `rev` (`None`: not yet).
    pub fn first_acks(&self, rev: u64) -> Vec<Option<Instant>> {
        self.agents
            .iter()
            .map(|a| a.first_ack_at_or_after(rev))
            .collect()
    }

    /// When the last node acknowledged a revision of at least `rev`, once
    /// all have.
    pub fn all_acked(&self, rev: u64) -> Option<Instant> {
        latest(self.first_acks(rev))
    }

    /// Registers a condition on the folded assignment; each node records
    /// when it first held after an acknowledgement (it is checked right
    /// away too, so nodes that already satisfy it count from now).
    pub fn watch(
        &self,
        pred: impl Fn(&str, &Assignment) -> bool + Send + Sync + 'static,
    ) -> WatchId {
        let id = {
            let mut w = self
                .shared
                .watches
                .write()
                .unwrap_or_else(|e| e.into_inner());
            w.push(Arc::new(pred));
            w.len() - 1
        };
        let watches = self.shared.watches();
        let now = Instant::now();
        for a in &self.agents {
            a.lock().check_watches(&a.name, &watches, now);
        }
        WatchId(id)
    }

    /// Per node, when `watch` first held.
    pub fn watch_hits(&self, watch: WatchId) -> Vec<Option<Instant>> {
        self.agents
            .iter()
            .map(|a| a.lock().watch_hits.get(watch.0).copied().flatten())
            .collect()
    }

    /// When `watch` held on the last node, once it holds on all.
    pub fn watch_all(&self, watch: WatchId) -> Option<Instant> {
        latest(self.watch_hits(watch))
    }

    /// Stops every agent; their streams close.
    pub fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The latest of `times`, if none is missing.
fn latest(times: Vec<Option<Instant>>) -> Option<Instant> {
    times
        .into_iter()
        .try_fold(None::<Instant>, |acc, t| Some(acc.max(Some(t?))))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_needs_every_time() {
        let t = Instant::now();
        let later = t + std::time::Duration::from_millis(5);
        assert_eq!(latest(vec![Some(t), Some(later)]), Some(later));
        assert_eq!(latest(vec![Some(t), None]), None);
        assert_eq!(latest(vec![]), None);
    }

    #[test]
    fn a_fleet_needs_a_runtime_and_valid_names() {
        let cfg = FleetConfig::new("https://127.0.0.1:1", "", "t", 1);
        assert!(matches!(
            Fleet::start(cfg.clone()),
            Err(FleetError::NoRuntime)
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let bad = FleetConfig {
            name_prefix: "Sim".into(),
            ..cfg
        };
        assert!(matches!(Fleet::start(bad), Err(FleetError::BadPrefix(_))));
    }
}
