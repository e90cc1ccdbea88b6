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
//! The decision ([`plan`]) is pure; it reads no clock (the caller passes
//! `now`) and never touches the store.

use std::time::{Duration, SystemTime};

use ironmesh_api::node::Taint;
use serde_json::{json, Value};

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
    pub fn of(o: &StoredObject) -> NodeFacts {
        let ready = o
            .object
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| {
                c.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
            });
        let not_ready_since = ready
            .filter(|c| c.get("status").and_then(Value::as_str) == Some("False"))
            .map(|c| {
                c.get("lastTransitionTime")
                    .and_then(Value::as_str)
                    .and_then(crate::resources::parse_rfc3339)
                    // No readable time: count from the epoch, i.e. long ago.
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            });
        let taints = o
            .object
            .pointer("/spec/taints")
            .cloned()
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default();
        NodeFacts {
            name: o.name.clone(),
            not_ready_since,
            taints,
        }
    }
}

/// One instance's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delete it; the replica count replaces it elsewhere.
    Delete { instance: String, why: String },
    /// Keep it bound, Pending with reason `NodeNotReady` and this message.
    Hold { instance: String, message: String },
}

/// An instance as eviction sees it.
pub struct Bound<'a> {
    pub name: &'a str,
    pub node: &'a str,
    pub template: &'a ironmesh_api::workload::WorkloadSpec,
}

/// What to do now, and how long until the next NotReady node becomes due
/// (so the caller can wake up in time).
pub fn plan(
    nodes: &[NodeFacts],
    instances: &[Bound<'_>],
    volumes: &VolumeIndex,
    delay: Duration,
    now: SystemTime,
) -> (Vec<Action>, Option<Duration>) {
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
        for i in by_node.get(n.name.as_str()).into_iter().flatten() {
            let local = volumes.volume_on(i.template, &n.name);
            if due {
                match local {
                    Some(v) => actions.push(Action::Hold {
                        instance: i.name.to_string(),
                        message: format!("node {} is NotReady; volume {v} lives there", n.name),
                    }),
                    None => actions.push(Action::Delete {
                        instance: i.name.to_string(),
                        why: format!(
                            "node {} NotReady for more than {}",
                            n.name,
                            humantime::format_duration(delay)
                        ),
                    }),
                }
            } else if local.is_none()
                && crate::scheduler::evicted_by_taints(&n.taints, i.template.placement.as_ref())
            {
                actions.push(Action::Delete {
                    instance: i.name.to_string(),
                    why: format!("node {} has a NoExecute taint it does not tolerate", n.name),
                });
            }
        }
    }
    (actions, next)
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
            Action::Hold { instance, message } => {
                resources
                    .update(ironmesh_api::Kind::Instance, instance, |cur| {
                        let mut o = cur?.clone();
                        if o.pointer("/status/reason").and_then(Value::as_str)
                            == Some("NodeNotReady")
                            && o.pointer("/status/message").and_then(Value::as_str)
                                == Some(message.as_str())
                        {
                            return None;
                        }
                        if !o.get("status").is_some_and(Value::is_object) {
                            o["status"] = json!({});
                        }
                        o["status"]["phase"] = json!("Pending");
                        o["status"]["ready"] = json!(false);
                        o["status"]["reason"] = json!("NodeNotReady");
                        o["status"]["message"] = json!(message);
                        Some(o)
                    })
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
                    message: "node h1 is NotReady; volume data lives there".into()
                },
            ]
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
            object: json!({"status": {"conditions": [
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
