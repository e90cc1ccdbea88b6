//! Failure handling: decides which instances leave a node that has been
//! NotReady for longer than the eviction delay (or that carries a
//! `NoExecute` taint they do not tolerate), and applies that decision.
//!
//! Instances that mount no volume on the node are deleted; the workload
//! controller's replica count then creates replacements on Ready nodes in
//! the same pass, and the node's assignment stops listing the deleted ones,
//! so its agent removes their containers when it comes back — nothing runs
//! twice. Instances whose volume lives on the node cannot move: they stay
//! bound and show `Pending`/`NodeNotReady` until the node returns.
//!
//! Two brakes, in the habit of Kubernetes' node lifecycle controller: when
//! more than a share of all nodes (`--eviction-unhealthy-threshold`,
//! default 50 %) are NotReady, eviction pauses — a partition or a stalled
//! store must not restart every workload — and each held instance gets an
//! `EvictionPaused` event; otherwise at most `--eviction-rate` nodes per
//! second are emptied.
//!
//! The decision ([`plan_guarded`]) is pure; it reads no clock (the caller
//! passes `now`) and never touches the store.

use std::time::{Duration, SystemTime};

use ironmesh_api::node::Taint;
use ironmesh_api::object::{Instance, Node};
use ironmesh_api::workload::InstancePhase;
use ironmesh_api::ConditionStatus;

use crate::resources::{ResourceError, Resources, StoredObject};
use crate::volumes::VolumeIndex;

/// What eviction needs to know about a node.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub name: String,
    /// Since when the Ready condition has been False, if it is.
    pub not_ready_since: Option<SystemTime>,
    pub taints: Vec<Taint>,
}

impl NodeFacts {
    /// The facts of a stored Node; one that does not decode is never
    /// evicted from (and logged).
    pub fn of(o: &StoredObject) -> NodeFacts {
        let node = match o.typed::<Node>() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable node; nothing is evicted from it");
                return NodeFacts {
                    name: o.name.clone(),
                    ..Default::default()
                };
            }
        };
        let not_ready_since = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .filter(|c| c.status == ConditionStatus::False)
            .map(|c| {
                c.last_transition_time
                    .as_deref()
                    .and_then(crate::resources::parse_rfc3339)
                    // No readable time: count from the epoch, i.e. long ago.
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            });
        NodeFacts {
            name: o.name.clone(),
            not_ready_since,
            taints: node.spec.taints,
        }
    }
}

/// One instance's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delete it; the replica count replaces it elsewhere.
    Delete { instance: String, why: String },
    /// Keep it bound, Pending with `reason` (`NodeNotReady`, or
    /// `EvictionPaused` with an event) and this message.
    Hold {
        instance: String,
        reason: &'static str,
        message: String,
    },
}

/// Why eviction is paused, if it is: more than `threshold` (a share, 0–1)
/// of `nodes` are NotReady.
pub fn paused(nodes: &[NodeFacts], threshold: f64) -> Option<String> {
    let total = nodes.len();
    let down = nodes.iter().filter(|n| n.not_ready_since.is_some()).count();
    (total > 0 && down as f64 > threshold * total as f64).then(|| {
        format!(
            "eviction paused: {down} of {total} nodes are NotReady, more than {:.0}% (--eviction-unhealthy-threshold); instances stay where they are until enough nodes return",
            threshold * 100.0
        )
    })
}

/// Node evictions allowed per second, as a token bucket holding at most
/// one second's worth (and at least one node).
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: f64,
    tokens: f64,
    last: Option<std::time::Instant>,
}

impl RateLimit {
    pub fn new(per_second: f64) -> RateLimit {
        RateLimit {
            per_second,
            tokens: per_second.max(1.0),
            last: None,
        }
    }

    /// Whole node evictions allowed at `now`.
    pub fn available(&mut self, now: std::time::Instant) -> usize {
        if let Some(last) = self.last {
            let earned = now.saturating_duration_since(last).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + earned).min(self.per_second.max(1.0));
        }
        self.last = Some(now);
        self.tokens.floor() as usize
    }

    /// Spends `n` evictions (after [`RateLimit::available`]).
    pub fn spend(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// How long until the next eviction is allowed.
    pub fn wait(&self) -> Duration {
        if self.tokens >= 1.0 || self.per_second <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.per_second)
    }
}

/// What [`plan_guarded`] decided.
#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// How long until the next NotReady node becomes due.
    pub next: Option<Duration>,
    /// Nodes emptied by this plan (each spends one of the rate's tokens).
    pub evicted_nodes: usize,
    /// Due nodes left for later by the rate limit.
    pub rate_limited: usize,
}

/// An instance as eviction sees it.
pub struct Bound<'a> {
    pub name: &'a str,
    pub node: &'a str,
    pub template: &'a ironmesh_api::workload::WorkloadSpec,
}

/// What to do now, and how long until the next NotReady node becomes due
/// (so the caller can wake up in time); no guard and no rate limit.
pub fn plan(
    nodes: &[NodeFacts],
    instances: &[Bound<'_>],
    volumes: &VolumeIndex,
    delay: Duration,
    now: SystemTime,
) -> (Vec<Action>, Option<Duration>) {
    let p = plan_guarded(nodes, instances, volumes, delay, now, None, usize::MAX);
    (p.actions, p.next)
}

/// [`plan`] with the guard: while `paused` (see [`paused`]) nothing is
/// evicted for being NotReady and the instances are held with its
/// message; otherwise at most `budget` nodes are emptied. NoExecute taints
/// (an operator's decision) are neither paused nor limited.
pub fn plan_guarded(
    nodes: &[NodeFacts],
    instances: &[Bound<'_>],
    volumes: &VolumeIndex,
    delay: Duration,
    now: SystemTime,
    paused: Option<&str>,
    mut budget: usize,
) -> Plan {
    let mut out = Plan::default();
    let mut actions = Vec::new();
    let mut next: Option<Duration> = None;
    // By node once, not a walk of every instance per node (10M compares
    // at 1,000 nodes and 10,000 instances).
    let mut by_node: std::collections::HashMap<&str, Vec<&Bound<'_>>> =
        std::collections::HashMap::new();
    for i in instances {
        by_node.entry(i.node).or_default().push(i);
    }
    for n in nodes {
        let down_for = n
            .not_ready_since
            .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO));
        let due = match down_for {
            Some(d) if d >= delay => true,
            Some(d) => {
                let left = delay - d;
                next = Some(next.map_or(left, |n| n.min(left)));
                false
            }
            None => false,
        };
        if !due && n.taints.is_empty() {
            continue;
        }
        let on_node = by_node.get(n.name.as_str()).map_or(&[][..], Vec::as_slice);
        let movable = on_node
            .iter()
            .any(|i| volumes.volume_on(i.template, &n.name).is_none());
        // Paused: hold everything; out of budget: leave the node for a
        // later pass (it stays due).
        let mut due_now = due;
        if due && movable && paused.is_none() {
            if budget == 0 {
                out.rate_limited += 1;
                due_now = false;
            } else {
                budget -= 1;
                out.evicted_nodes += 1;
            }
        }
        for i in on_node {
            let local = volumes.volume_on(i.template, &n.name);
            if due && (due_now || paused.is_some()) {
                match (local, paused) {
                    (Some(v), _) => actions.push(Action::Hold {
                        instance: i.name.to_string(),
                        reason: "NodeNotReady",
                        message: format!("node {} is NotReady; volume {v} lives there", n.name),
                    }),
                    (None, Some(why)) => actions.push(Action::Hold {
                        instance: i.name.to_string(),
                        reason: "EvictionPaused",
                        message: format!("node {} is NotReady; {why}", n.name),
                    }),
                    (None, None) => actions.push(Action::Delete {
                        instance: i.name.to_string(),
                        why: format!(
                            "node {} NotReady for more than {}",
                            n.name,
                            humantime::format_duration(delay)
                        ),
                    }),
                }
            } else if !due
                && local.is_none()
                && crate::scheduler::evicted_by_taints(&n.taints, i.template.placement.as_ref())
            {
                actions.push(Action::Delete {
                    instance: i.name.to_string(),
                    why: format!("node {} has a NoExecute taint it does not tolerate", n.name),
                });
            }
        }
    }
    out.actions = actions;
    out.next = next;
    out
}

/// Applies `actions` (the deletes as one batch); returns the names of the
/// deleted instances.
pub async fn apply(
    resources: &Resources,
    actions: &[Action],
) -> Result<Vec<String>, ResourceError> {
    let mut deleted = Vec::new();
    for a in actions {
        if let Action::Delete { instance, why } = a {
            tracing::info!(%instance, reason = %why, "instance evicted");
            deleted.push(instance.clone());
        }
    }
    if !deleted.is_empty() {
        resources
            .update_many(ironmesh_api::Kind::Instance, &deleted, |_, _| {
                crate::resources::Change::Delete
            })
            .await?;
    }
    for a in actions {
        match a {
            Action::Delete { .. } => {}
            Action::Hold {
                instance,
                reason,
                message,
            } => {
                resources
                    .update_typed(
                        ironmesh_api::Kind::Instance,
                        instance,
                        |cur: Option<Instance>| {
                            let mut o = cur?;
                            if o.status
                                .as_ref()
                                .is_some_and(|s| s.reason == *reason && s.message == *message)
                            {
                                return None;
                            }
                            let status = o.status_mut();
                            status.phase = InstancePhase::Pending;
                            status.ready = false;
                            status.reason = reason.to_string();
                            status.message = message.clone();
                            if *reason == "EvictionPaused" {
                                ironmesh_api::instance::record_event(
                                    &mut status.events,
                                    ironmesh_api::instance::Event {
                                        kind: "Warning".into(),
                                        reason: "EvictionPaused".into(),
                                        message: message.clone(),
                                        time: crate::resources::now_rfc3339(),
                                        count: 1,
                                    },
                                );
                            }
                            Some(o)
                        },
                    )
                    .await?;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_api::node::TaintEffect;
    use ironmesh_api::workload::{VolumeMount, WorkloadSpec};
    use serde_json::{json, Value};

    fn spec() -> WorkloadSpec {
        serde_json::from_value(json!({"image": "web:1"})).unwrap()
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn node(name: &str, down_since: Option<u64>) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            not_ready_since: down_since.map(t),
            taints: vec![],
        }
    }

    fn volume_index() -> VolumeIndex {
        let v: Value = json!({
            "apiVersion": "ironmesh.dev/v1",
            "kind": "Volume",
            "metadata": {"name": "data"},
            "spec": {"size": "1Gi"},
            "status": {"phase": "Bound", "node": "h1", "pool": "default", "backend": "image"},
        });
        VolumeIndex::from_objects(&[StoredObject {
            kind: ironmesh_api::Kind::Volume,
            name: "data".into(),
            object: v,
            revision: 1,
        }])
    }

    #[test]
    fn stateless_instances_leave_after_the_delay_and_stateful_ones_wait() {
        let stateless = spec();
        let mut stateful = spec();
        stateful.volumes = vec![VolumeMount {
            name: "d".into(),
            volume: "data".into(),
            mount_path: "/data".into(),
            read_only: false,
        }];
        let inst = [
            Bound {
                name: "web-a",
                node: "h1",
                template: &stateless,
            },
            Bound {
                name: "db-a",
                node: "h1",
                template: &stateful,
            },
            Bound {
                name: "web-b",
                node: "h2",
                template: &stateless,
            },
        ];
        let nodes = [node("h1", Some(0)), node("h2", None)];
        let vols = volume_index();
        let delay = Duration::from_secs(5);

        let (actions, next) = plan(&nodes, &inst, &vols, delay, t(3));
        assert!(actions.is_empty());
        assert_eq!(next, Some(Duration::from_secs(2)));

        let (actions, next) = plan(&nodes, &inst, &vols, delay, t(5));
        assert_eq!(next, None);
        assert_eq!(
            actions,
            [
                Action::Delete {
                    instance: "web-a".into(),
                    why: "node h1 NotReady for more than 5s".into()
                },
                Action::Hold {
                    instance: "db-a".into(),
                    reason: "NodeNotReady",
                    message: "node h1 is NotReady; volume data lives there".into()
                },
            ]
        );
    }

    fn one_per_node<'a>(names: &'a [(&'a str, &'a str)], spec: &'a WorkloadSpec) -> Vec<Bound<'a>> {
        names
            .iter()
            .map(|(name, node)| Bound {
                name,
                node,
                template: spec,
            })
            .collect()
    }

    #[test]
    fn more_than_half_not_ready_pauses_eviction_and_says_why() {
        let spec = spec();
        let inst = one_per_node(&[("a", "h1"), ("b", "h2"), ("c", "h3"), ("d", "h4")], &spec);
        let vols = VolumeIndex::default();
        let delay = Duration::from_secs(5);
        let nodes = [
            node("h1", Some(0)),
            node("h2", Some(0)),
            node("h3", Some(0)),
            node("h4", None),
        ];
        let why = paused(&nodes, 0.5).expect("3 of 4 is more than half");
        assert!(
            why.contains("3 of 4 nodes are NotReady, more than 50%"),
            "{why}"
        );
        let p = plan_guarded(&nodes, &inst, &vols, delay, t(60), Some(&why), usize::MAX);
        assert_eq!(p.evicted_nodes, 0);
        assert_eq!(p.actions.len(), 3);
        assert!(p.actions.iter().all(|a| matches!(a,
            Action::Hold { reason: "EvictionPaused", message, .. } if message.contains("eviction paused"))),
            "{:?}", p.actions);
        // Exactly half is not more than half.
        assert_eq!(paused(&nodes[2..], 0.5), None);
        assert_eq!(paused(&[], 0.5), None);
    }

    #[test]
    fn the_rate_limit_empties_nodes_one_budget_at_a_time() {
        let spec = spec();
        let inst = one_per_node(&[("a", "h1"), ("b", "h2"), ("c", "h3")], &spec);
        let vols = VolumeIndex::default();
        let nodes = [node("h1", Some(0)), node("h2", Some(0)), node("h3", None)];
        let p = plan_guarded(&nodes, &inst, &vols, Duration::from_secs(5), t(60), None, 1);
        assert_eq!((p.evicted_nodes, p.rate_limited), (1, 1));
        assert_eq!(p.actions.len(), 1, "{:?}", p.actions);

        let start = std::time::Instant::now();
        let mut rate = RateLimit::new(1.0);
        assert_eq!(rate.available(start), 1);
        rate.spend(1);
        assert_eq!(rate.available(start), 0);
        assert_eq!(rate.wait(), Duration::from_secs(1));
        assert_eq!(rate.available(start + Duration::from_millis(500)), 0);
        assert_eq!(
            rate.available(start + Duration::from_secs(5)),
            1,
            "banks at most one second"
        );
    }

    #[test]
    fn untolerated_no_execute_taint_evicts() {
        let spec = spec();
        let inst = [Bound {
            name: "web-a",
            node: "h1",
            template: &spec,
        }];
        let mut n = node("h1", None);
        n.taints = vec![Taint {
            key: "maintenance".into(),
            value: String::new(),
            effect: TaintEffect::NoExecute,
        }];
        let (actions, _) = plan(
            &[n],
            &inst,
            &VolumeIndex::default(),
            Duration::from_secs(5),
            t(0),
        );
        assert!(matches!(&actions[..], [Action::Delete { instance, .. }] if instance == "web-a"));
    }

    #[test]
    fn node_facts_read_the_ready_condition() {
        let o = StoredObject {
            kind: ironmesh_api::Kind::Node,
            name: "h1".into(),
            revision: 1,
            object: json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node",
                "metadata": {"name": "h1"}, "spec": {}, "status": {"conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": "2024-01-02T03:04:05Z"}
            ]}}),
        };
        let f = NodeFacts::of(&o);
        assert_eq!(
            f.not_ready_since,
            crate::resources::parse_rfc3339("2024-01-02T03:04:05Z")
        );
        assert!(f.not_ready_since.is_some());
    }
}
