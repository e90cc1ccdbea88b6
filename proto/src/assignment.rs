//! Incremental assignments: [`apply`] folds an `Assignment` that carries an
//! [`AssignmentDelta`](crate::v1::AssignmentDelta) into the whole desired
//! state the stream delivered before. The controller builds deltas so that
//! `apply(previous, delta)` equals the whole assignment it would have sent;
//! the agent keeps the result and hands it to the code that applies a whole
//! assignment, which already diffs against what it wrote.

use std::collections::BTreeMap;

use crate::v1::{Assignment, IdentityEntry, PeerNode, PolicyRule, ServiceEntry};

/// The capability an agent announces in `Hello` when it applies deltas.
pub const INCREMENTAL: &str = "incremental-assignments";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaError {
    /// The delta is against a revision this side did not apply last: a
    /// message was missed. Reconnect for a whole assignment.
    Gap { base: u64, have: u64 },
    /// A delta arrived before any whole assignment on this stream.
    NoBase,
}

impl std::fmt::Display for DeltaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeltaError::Gap { base, have } => write!(
                f,
                "assignment delta is against revision {base} but revision {have} was applied last"
            ),
            DeltaError::NoBase => write!(f, "assignment delta arrived before a whole assignment"),
        }
    }
}

impl std::error::Error for DeltaError {}

/// The key a service port is known by in deltas.
pub fn service_key(s: &ServiceEntry) -> (String, u32, String) {
    (s.name.clone(), s.port, s.protocol.clone())
}

/// A policy rule's identity in deltas: every field, since rules have no name.
pub fn rule_key(r: &PolicyRule) -> (i32, u32, u32, u32, String, u32, u32) {
    (
        r.direction,
        r.src_identity,
        r.dst_identity,
        r.port,
        r.protocol.clone(),
        r.rate_per_second,
        r.burst,
    )
}

/// Folds `next` into `current` (the last whole assignment this stream
/// gave). A whole `next` replaces `current`; a delta is checked against
/// `current.revision` first. On error `current` is unchanged.
pub fn apply(current: &mut Option<Assignment>, next: Assignment) -> Result<(), DeltaError> {
    let Some(delta) = next.delta.clone() else {
        *current = Some(next);
        return Ok(());
    };
    let Some(cur) = current.as_mut() else {
        return Err(DeltaError::NoBase);
    };
    if cur.revision != delta.base_revision {
        return Err(DeltaError::Gap {
            base: delta.base_revision,
            have: cur.revision,
        });
    }
    cur.revision = next.revision;
    if delta.local_changed {
        cur.instances = next.instances;
        cur.volumes = next.volumes;
    }
    if delta.enforcement_changed {
        cur.ingress_enforced = next.ingress_enforced;
        cur.egress_enforced = next.egress_enforced;
    }
    if !delta.identities_set.is_empty() || !delta.identities_removed.is_empty() {
        cur.identities = merge_identities(
            std::mem::take(&mut cur.identities),
            delta.identities_set,
            &delta.identities_removed,
        );
    }
    if !delta.policy_rules_added.is_empty() || !delta.policy_rules_removed.is_empty() {
        let mut rules: BTreeMap<_, PolicyRule> = std::mem::take(&mut cur.policy_rules)
            .into_iter()
            .map(|r| (rule_key(&r), r))
            .collect();
        for r in &delta.policy_rules_removed {
            rules.remove(&rule_key(r));
        }
        for r in delta.policy_rules_added {
            rules.insert(rule_key(&r), r);
        }
        cur.policy_rules = rules.into_values().collect();
    }
    if !delta.services_set.is_empty() || !delta.services_removed.is_empty() {
        let mut services: BTreeMap<_, ServiceEntry> = std::mem::take(&mut cur.services)
            .into_iter()
            .map(|s| (service_key(&s), s))
            .collect();
        for s in &delta.services_removed {
            services.remove(&service_key(s));
        }
        for s in delta.services_set {
            services.insert(service_key(&s), s);
        }
        cur.services = services.into_values().collect();
    }
    if !delta.peers_set.is_empty() || !delta.peers_removed.is_empty() {
        let mut peers: BTreeMap<String, PeerNode> = std::mem::take(&mut cur.peers)
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        for name in &delta.peers_removed {
            peers.remove(name);
        }
        for p in delta.peers_set {
            peers.insert(p.name.clone(), p);
        }
        cur.peers = peers.into_values().collect();
    }
    Ok(())
}

/// The identity list (sorted by address) with `set` upserted and `removed`
/// taken out (an address in both is set, as in a map where removals come
/// first), in one merge: a cluster has tens of thousands of addresses
/// and a delta a handful, so this must not rebuild a map per message.
fn merge_identities(
    mut current: Vec<IdentityEntry>,
    mut set: Vec<IdentityEntry>,
    removed: &[String],
) -> Vec<IdentityEntry> {
    if !current.is_sorted_by(|a, b| a.ip <= b.ip) {
        current.sort_by(|a, b| a.ip.cmp(&b.ip));
    }
    // Later entries for one address win, as in a map.
    set.reverse();
    set.sort_by(|a, b| a.ip.cmp(&b.ip));
    set.dedup_by(|later, earlier| later.ip == earlier.ip);
    let removed: std::collections::HashSet<&str> = removed.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(current.len() + set.len());
    let mut set = set.into_iter().peekable();
    for e in current {
        while set.peek().is_some_and(|s| s.ip < e.ip) {
            out.extend(set.next());
        }
        if set.peek().is_some_and(|s| s.ip == e.ip) {
            out.extend(set.next());
            continue;
        }
        if !removed.contains(e.ip.as_str()) {
            out.push(e);
        }
    }
    out.extend(set);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::AssignmentDelta;

    fn id(ip: &str, identity: u32) -> IdentityEntry {
        IdentityEntry {
            ip: ip.into(),
            identity,
        }
    }

    #[test]
    fn a_delta_sets_and_removes_and_keeps_the_rest() {
        let mut cur = None;
        apply(
            &mut cur,
            Assignment {
                revision: 5,
                identities: vec![id("10.0.0.1", 300), id("10.0.0.2", 301)],
                peers: vec![PeerNode {
                    name: "b".into(),
                    pod_cidr: "10.0.1.0/24".into(),
                    node_ip: "192.0.2.2".into(),
                }],
                ingress_enforced: vec![300],
                ..Default::default()
            },
        )
        .unwrap();
        apply(
            &mut cur,
            Assignment {
                revision: 9,
                delta: Some(AssignmentDelta {
                    base_revision: 5,
                    identities_set: vec![id("10.0.0.3", 302), id("10.0.0.1", 305)],
                    identities_removed: vec!["10.0.0.2".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .unwrap();
        let a = cur.as_ref().unwrap();
        assert_eq!(a.revision, 9);
        assert_eq!(a.identities, vec![id("10.0.0.1", 305), id("10.0.0.3", 302)]);
        assert_eq!(a.peers.len(), 1, "peers were not in the delta and stay");
        assert_eq!(a.ingress_enforced, vec![300], "enforcement unchanged");
    }

    #[test]
    fn the_identity_merge_matches_a_map() {
        let ip = |n: u32| format!("10.0.{}.{}", n / 200, n % 200);
        let current: Vec<IdentityEntry> = {
            let mut v: Vec<_> = (0..500).step_by(2).map(|n| id(&ip(n), n)).collect();
            v.sort_by(|a, b| a.ip.cmp(&b.ip));
            v
        };
        let set: Vec<IdentityEntry> = (0..500)
            .step_by(7)
            .map(|n| id(&ip(n), n + 1))
            .chain([id(&ip(3), 9), id(&ip(3), 10)])
            .collect();
        let removed: Vec<String> = (0..500).step_by(5).map(ip).collect();
        let mut model: BTreeMap<String, u32> =
            current.iter().map(|e| (e.ip.clone(), e.identity)).collect();
        for r in &removed {
            model.remove(r);
        }
        for e in &set {
            model.insert(e.ip.clone(), e.identity);
        }
        let merged = merge_identities(current, set, &removed);
        let want: Vec<IdentityEntry> = model
            .into_iter()
            .map(|(ip, identity)| IdentityEntry { ip, identity })
            .collect();
        assert_eq!(merged, want);
    }

    #[test]
    fn a_gap_or_a_missing_base_is_refused_and_changes_nothing() {
        let delta = |base| Assignment {
            revision: 12,
            delta: Some(AssignmentDelta {
                base_revision: base,
                identities_removed: vec!["10.0.0.1".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut none = None;
        assert_eq!(apply(&mut none, delta(3)), Err(DeltaError::NoBase));
        let whole = Assignment {
            revision: 4,
            identities: vec![id("10.0.0.1", 300)],
            ..Default::default()
        };
        let mut cur = Some(whole.clone());
        assert_eq!(
            apply(&mut cur, delta(3)),
            Err(DeltaError::Gap { base: 3, have: 4 })
        );
        assert_eq!(cur, Some(whole));
    }
}
