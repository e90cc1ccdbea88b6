//! Node liveness: heartbeat bookkeeping and the reconciler that turns a node
//! NotReady when its heartbeats lapse for longer than the grace, and Ready
//! again when they return.
//!
//! Heartbeats are kept in memory (a store write per heartbeat would fsync
//! once a second per node); only transitions are written to the Node's
//! `Ready` condition. Reads of a Node overlay the live heartbeat time.
//!
//! With several controllers an agent streams to one of them; the others
//! learn that it is alive from presence records ([`crate::ha::presence`]):
//! a controller vouches for the nodes whose heartbeats it receives, and
//! [`Liveness::set_remote`] feeds those vouches in here. A vouched node
//! counts as heartbeating now; once the last vouch goes, its grace runs
//! from that moment.
//!
//! **Pacing.** Heartbeats cost the controller the same each, so their rate
//! is bounded (as Nomad bounds its heartbeat TTLs): the interval agents are
//! told is `--heartbeat-interval`, or longer once the cluster has more
//! than `--max-heartbeats-per-second` × that many nodes, and each node's
//! grace grows in proportion with the interval it was told. A change of
//! the interval reaches connected agents that understand it at once
//! (`Settings`); a node's grace only shrinks after its first heartbeat at
//! the shorter interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ironmesh_api::Kind;
use serde_json::{json, Value};

use crate::metrics::ControllerMetrics;
use crate::resources::{rfc3339, Resources};

#[derive(Debug, Clone)]
struct Live {
    last: Instant,
    last_wall: SystemTime,
    session: u64,
    connected: bool,
    /// Judged by this grace, from the interval the node was told.
    grace: Duration,
    /// A shorter grace that applies from the node's next heartbeat.
    pending: Option<Duration>,
}

/// In-memory heartbeat table, shared by the sync handler and the reconciler.
#[derive(Clone)]
pub struct Liveness {
    inner: Arc<Mutex<LivenessInner>>,
    grace: Duration,
    /// `--heartbeat-interval`: `grace` belongs to it.
    interval: Duration,
    /// `--max-heartbeats-per-second` over all nodes.
    max_rate: u32,
    /// The interval agents are told now (see [`Liveness::pace`]).
    paced: Arc<tokio::sync::watch::Sender<Duration>>,
    started: Instant,
}

struct LivenessInner {
    nodes: HashMap<String, Live>,
    /// Nodes other controllers vouch for (true), or stopped vouching for
    /// (false), and since when.
    remote: HashMap<String, (bool, Instant)>,
    next_session: u64,
}

impl Liveness {
    /// Liveness with a fixed interval: nodes are judged by `grace`.
    pub fn new(grace: Duration) -> Liveness {
        Liveness::paced(grace, grace, u32::MAX)
    }

    /// Liveness for agents told `interval` (longer past `max_rate`
    /// heartbeats a second in all) and judged by `grace` at that interval.
    pub fn paced(interval: Duration, grace: Duration, max_rate: u32) -> Liveness {
        let interval = interval.max(Duration::from_millis(1));
        Liveness {
            inner: Arc::new(Mutex::new(LivenessInner {
                nodes: HashMap::new(),
                remote: HashMap::new(),
                next_session: 1,
            })),
            grace,
            interval,
            max_rate: max_rate.max(1),
            paced: Arc::new(tokio::sync::watch::channel(interval).0),
            started: Instant::now(),
        }
    }

    /// The grace at the interval agents are told now.
    pub fn grace(&self) -> Duration {
        self.grace_for(*self.paced.borrow())
    }

    /// The grace of a node told `interval`: in proportion to the base.
    fn grace_for(&self, interval: Duration) -> Duration {
        if interval <= self.interval {
            return self.grace;
        }
        self.grace
            .mul_f64(interval.as_secs_f64() / self.interval.as_secs_f64())
    }

    /// The interval for a cluster of `nodes`: the base, or whole seconds
    /// enough to keep all heartbeats under the rate.
    pub fn interval_for(&self, nodes: usize) -> Duration {
        let needed = nodes as f64 / f64::from(self.max_rate);
        if needed <= self.interval.as_secs_f64() {
            return self.interval;
        }
        Duration::from_secs(needed.ceil() as u64)
    }

    /// Sets the interval from the cluster's size; returns it.
    pub fn pace(&self, nodes: usize) -> Duration {
        let want = self.interval_for(nodes);
        self.paced.send_if_modified(|cur| {
            let changed = *cur != want;
            *cur = want;
            changed
        });
        want
    }

    /// The interval agents are told now, and its changes.
    pub fn heartbeat_interval(&self) -> tokio::sync::watch::Receiver<Duration> {
        self.paced.subscribe()
    }

    /// `node` on `session` was told to heartbeat every `interval`.
    pub fn told(&self, node: &str, session: u64, interval: Duration) {
        let grace = self.grace_for(interval);
        let mut g = self.lock();
        if let Some(l) = g.nodes.get_mut(node) {
            if l.session == session {
                if grace >= l.grace {
                    l.grace = grace;
                    l.pending = None;
                } else {
                    l.pending = Some(grace);
                }
            }
        }
    }

    /// How long after start a node never heard from is left as stored:
    /// three graces, at least 10 s (the agents' longest reconnect back-off
    /// twice over).
    pub fn startup_grace(&self) -> Duration {
        (self.grace() * 3).max(Duration::from_secs(10))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LivenessInner> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sync stream opened, whose agent is told to heartbeat every
    /// `interval`; returns its session number. A newer session for the
    /// same node supersedes an older one.
    pub fn connect(&self, node: &str, interval: Duration) -> u64 {
        let grace = self.grace_for(interval);
        let mut g = self.lock();
        let session = g.next_session;
        g.next_session += 1;
        g.nodes.insert(
            node.to_string(),
            Live {
                last: Instant::now(),
                last_wall: SystemTime::now(),
                session,
                connected: true,
                grace,
                pending: None,
            },
        );
        session
    }

    /// Records a heartbeat from `node` on `session`.
    pub fn heartbeat(&self, node: &str, session: u64) {
        let mut g = self.lock();
        if let Some(l) = g.nodes.get_mut(node) {
            if l.session == session {
                l.last = Instant::now();
                l.last_wall = SystemTime::now();
                if let Some(grace) = l.pending.take() {
                    l.grace = grace;
                }
            }
        }
    }

    /// The stream of `session` ended.
    pub fn disconnect(&self, node: &str, session: u64) {
        let mut g = self.lock();
        if let Some(l) = g.nodes.get_mut(node) {
            if l.session == session {
                l.connected = false;
            }
        }
    }

    /// Nodes with an open stream here whose last heartbeat is at most
    /// half their grace old: the ones this controller vouches for.
    pub fn vouched(&self) -> Vec<String> {
        let g = self.lock();
        let mut v: Vec<String> = g
            .nodes
            .iter()
            .filter(|(_, l)| l.connected && l.last.elapsed() <= l.grace / 2)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether another controller vouches for `node` now.
    pub fn set_remote(&self, node: &str, vouched: bool) {
        let mut g = self.lock();
        match g.remote.get(node) {
            Some((was, _)) if *was == vouched => {}
            _ => {
                g.remote.insert(node.to_string(), (vouched, Instant::now()));
            }
        }
    }

    /// Wall-clock time of the node's last heartbeat seen by this controller.
    pub fn last_heartbeat(&self, node: &str) -> Option<SystemTime> {
        self.lock().nodes.get(node).map(|l| l.last_wall)
    }

    /// Whether the node is alive now: `Some(true)`/`Some(false)`, or `None`
    /// while this controller is too young to judge a node it has not heard
    /// from.
    fn judge(&self, node: &str) -> (Option<bool>, Option<Duration>, Duration) {
        let g = self.lock();
        let local = g.nodes.get(node).map(|l| l.last.elapsed());
        // A node heard of only through another controller: the grace of
        // the interval told now.
        let grace = g.nodes.get(node).map_or_else(|| self.grace(), |l| l.grace);
        let remote = g.remote.get(node).map(|(vouched, at)| {
            if *vouched {
                Duration::ZERO
            } else {
                at.elapsed()
            }
        });
        let since = match (local, remote) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match since {
            Some(since) => (Some(since <= grace), Some(since), grace),
            // A controller that just started has not heard from anyone:
            // a rack of agents reconnecting after a restart (each with its
            // own back-off) must not be judged by the one-node grace, or a
            // restart would turn nodes NotReady and evict their instances.
            None if self.started.elapsed() <= self.startup_grace() => (None, None, grace),
            None => (Some(false), None, grace),
        }
    }

    /// Overlays live heartbeat time onto a Node object's Ready condition.
    pub fn overlay(&self, node: &mut Value) {
        let Some(name) = node.pointer("/metadata/name").and_then(Value::as_str) else {
            return;
        };
        let Some(when) = self.last_heartbeat(name) else {
            return;
        };
        if let Some(conds) = node
            .pointer_mut("/status/conditions")
            .and_then(Value::as_array_mut)
        {
            for c in conds {
                if c.get("type").and_then(Value::as_str) == Some("Ready") {
                    c["lastHeartbeatTime"] = Value::String(rfc3339(when));
                }
            }
        }
    }
}

/// The Ready condition status ("True"/"False"/"Unknown") stored on a Node.
pub fn ready_status(node: &Value) -> Option<&str> {
    node.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))?
        .get("status")?
        .as_str()
}

/// Sets the Ready condition; returns false if it already had this status.
pub fn set_ready(node: &mut Value, ready: bool, reason: &str, message: &str) -> bool {
    let status = if ready { "True" } else { "False" };
    if ready_status(node) == Some(status) {
        return false;
    }
    let cond = json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": crate::resources::now_rfc3339(),
    });
    if !node.get("status").is_some_and(Value::is_object) {
        node["status"] = json!({});
    }
    let conds = &mut node["status"]["conditions"];
    if !conds.is_array() {
        *conds = json!([]);
    }
    if let Some(arr) = conds.as_array_mut() {
        arr.retain(|c| c.get("type").and_then(Value::as_str) != Some("Ready"));
        arr.push(cond);
    }
    true
}

/// Runs until `shutdown`: every tick, compares each Node's stored Ready
/// condition with what heartbeats say and writes transitions.
pub async fn run_reconciler(
    resources: Resources,
    liveness: Liveness,
    metrics: Arc<ControllerMetrics>,
    shutdown: ironmesh_process::Shutdown,
) {
    let tick = (liveness.grace / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = shutdown.clone();
    let stopped = stop.wait();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = interval.tick() => {}
        }
        if let Err(e) = reconcile_once(&resources, &liveness, &metrics).await {
            tracing::warn!(error = %e, "node liveness pass failed");
        }
    }
}

async fn reconcile_once(
    resources: &Resources,
    liveness: &Liveness,
    metrics: &ControllerMetrics,
) -> Result<(), crate::resources::ResourceError> {
    // Names and stored conditions only: this runs several times a second.
    let mut nodes = Vec::new();
    resources
        .scan(Kind::Node, |n| {
            nodes.push((n.name.clone(), ready_status(&n.object).map(str::to_string)))
        })
        .await?;
    let interval = liveness.pace(nodes.len());
    metrics
        .heartbeat_interval_ms
        .set(interval.as_millis() as i64);
    let (mut ready, mut not_ready, mut unknown) = (0i64, 0i64, 0i64);
    for (node, stored) in nodes {
        let (alive, since, grace) = liveness.judge(&node);
        let Some(alive) = alive else {
            match stored.as_deref() {
                Some("True") => ready += 1,
                Some("False") => not_ready += 1,
                _ => unknown += 1,
            }
            continue;
        };
        if alive {
            ready += 1
        } else {
            not_ready += 1
        }
        let want = if alive { "True" } else { "False" };
        if stored.as_deref() == Some(want) {
            continue;
        }
        let (reason, message) = if alive {
            (
                "HeartbeatsReceived",
                "agent is posting heartbeats".to_string(),
            )
        } else {
            (
                "HeartbeatsMissed",
                match since {
                    Some(s) => format!(
                        "no heartbeat for {:.1}s (grace {:.1}s)",
                        s.as_secs_f64(),
                        grace.as_secs_f64()
                    ),
                    None => format!(
                        "no heartbeat since the controller started (startup grace {:.1}s)",
                        liveness.startup_grace().as_secs_f64()
                    ),
                },
            )
        };
        let name = node;
        resources
            .update(Kind::Node, &name, |cur| {
                let mut obj = cur?.clone();
                set_ready(&mut obj, alive, reason, &message).then_some(obj)
            })
            .await?;
        tracing::info!(node = %name, ready = alive, reason, "node readiness changed");
        metrics.node_transitions.inc();
    }
    metrics.set_nodes(ready, not_ready, unknown);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn interval_grows_past_the_rate_in_whole_seconds_and_grace_follows() {
        let l = Liveness::paced(secs(1), secs(4), 100);
        assert_eq!(l.interval_for(50), secs(1));
        assert_eq!(l.interval_for(100), secs(1));
        assert_eq!(l.interval_for(101), secs(2));
        assert_eq!(l.interval_for(1000), secs(10));
        assert_eq!(l.pace(1000), secs(10));
        assert_eq!(*l.heartbeat_interval().borrow(), secs(10));
        assert_eq!(l.grace(), secs(40));
        assert_eq!(l.pace(10), secs(1));
        assert_eq!(l.grace(), secs(4));
    }

    #[test]
    fn a_shorter_grace_applies_only_after_the_next_heartbeat() {
        let l = Liveness::paced(secs(1), secs(4), 100);
        let s = l.connect("n1", secs(10));
        assert_eq!(l.lock().nodes["n1"].grace, secs(40));
        // The cluster shrank: the node is told 1 s, but its timer may
        // still run on 10 s until it heartbeats at the new pace.
        l.told("n1", s, secs(1));
        assert_eq!(l.lock().nodes["n1"].grace, secs(40));
        l.heartbeat("n1", s);
        assert_eq!(l.lock().nodes["n1"].grace, secs(4));
        // Growing applies at once.
        l.told("n1", s, secs(5));
        assert_eq!(l.lock().nodes["n1"].grace, secs(20));
        // An older session's news changes nothing.
        l.told("n1", s + 100, secs(50));
        assert_eq!(l.lock().nodes["n1"].grace, secs(20));
    }
}
