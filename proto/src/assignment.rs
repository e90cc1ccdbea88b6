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

/// The capability an agent announces in `Hello` when it takes large
/// assignments in parts ([`split`], [`Parts`]).
pub const PARTS: &str = "assignment-parts";

/// Splits `a` into parts of about `max_bytes` encoded each when it is
/// bigger: the first part carries everything but the cluster-wide lists,
/// which are spread over the parts in order (so a sorted list stays
/// sorted once merged). Every part but the last has `more` set.
pub fn split(a: Assignment, max_bytes: usize) -> Vec<Assignment> {
    use prost::Message;
    if a.encoded_len() <= max_bytes {
        return vec![a];
    }
    let mut head = a;
    let lists = Lists::take(&mut head);
    let mut parts = vec![head];
    let mut cur = Assignment {
        revision: parts[0].revision,
        delta: parts[0].delta.as_ref().map(|d| crate::v1::AssignmentDelta {
            base_revision: d.base_revision,
            ..Default::default()
        }),
        ..Default::default()
    };
    let empty_len = cur.encoded_len();
    let mut size = empty_len;
    let flush = |cur: &mut Assignment, size: &mut usize, parts: &mut Vec<Assignment>| {
        if *size > empty_len {
            let next = Assignment {
                revision: cur.revision,
                delta: cur.delta.as_ref().map(|d| crate::v1::AssignmentDelta {
                    base_revision: d.base_revision,
                    ..Default::default()
                }),
                ..Default::default()
            };
            parts.push(std::mem::replace(cur, next));
            *size = empty_len;
        }
    };
    macro_rules! spread {
        ($items:expr, $len:expr, $c:ident => $($field:tt)+) => {
            for item in $items {
                let n = ($len)(&item) + 4;
                if size + n > max_bytes {
                    flush(&mut cur, &mut size, &mut parts);
                }
                size += n;
                let $c = &mut cur;
                $($field)+.push(item);
            }
        };
    }
    let msg = |m: &dyn MessageLen| m.len();
    let text = |s: &String| s.len();
    spread!(lists.identities, |x: &IdentityEntry| msg(x), c => c.identities);
    spread!(lists.policy_rules, |x: &PolicyRule| msg(x), c => c.policy_rules);
    spread!(lists.services, |x: &ServiceEntry| msg(x), c => c.services);
    spread!(lists.peers, |x: &PeerNode| msg(x), c => c.peers);
    spread!(lists.identities_set, |x: &IdentityEntry| msg(x),
        c => c.delta.get_or_insert_with(Default::default).identities_set);
    spread!(lists.identities_removed, text,
        c => c.delta.get_or_insert_with(Default::default).identities_removed);
    spread!(lists.policy_rules_added, |x: &PolicyRule| msg(x),
        c => c.delta.get_or_insert_with(Default::default).policy_rules_added);
    spread!(lists.policy_rules_removed, |x: &PolicyRule| msg(x),
        c => c.delta.get_or_insert_with(Default::default).policy_rules_removed);
    spread!(lists.services_set, |x: &ServiceEntry| msg(x),
        c => c.delta.get_or_insert_with(Default::default).services_set);
    spread!(lists.services_removed, |x: &ServiceEntry| msg(x),
        c => c.delta.get_or_insert_with(Default::default).services_removed);
    spread!(lists.peers_set, |x: &PeerNode| msg(x),
        c => c.delta.get_or_insert_with(Default::default).peers_set);
    spread!(lists.peers_removed, text,
        c => c.delta.get_or_insert_with(Default::default).peers_removed);
    flush(&mut cur, &mut size, &mut parts);
    let last = parts.len() - 1;
    for (i, p) in parts.iter_mut().enumerate() {
        p.more = i < last;
    }
    parts
}

/// Encoded length, object-safe (prost's `Message` is not).
trait MessageLen {
    fn len(&self) -> usize;
}

impl<M: prost::Message> MessageLen for M {
    fn len(&self) -> usize {
        self.encoded_len()
    }
}

/// The cluster-wide lists of an assignment, taken out of it.
struct Lists {
    identities: Vec<IdentityEntry>,
    policy_rules: Vec<PolicyRule>,
    services: Vec<ServiceEntry>,
    peers: Vec<PeerNode>,
    identities_set: Vec<IdentityEntry>,
    identities_removed: Vec<String>,
    policy_rules_added: Vec<PolicyRule>,
    policy_rules_removed: Vec<PolicyRule>,
    services_set: Vec<ServiceEntry>,
    services_removed: Vec<ServiceEntry>,
    peers_set: Vec<PeerNode>,
    peers_removed: Vec<String>,
}

impl Lists {
    fn take(a: &mut Assignment) -> Lists {
        use std::mem::take as t;
        let mut none = crate::v1::AssignmentDelta::default();
        let d = a.delta.as_mut().unwrap_or(&mut none);
        Lists {
            identities_set: t(&mut d.identities_set),
            identities_removed: t(&mut d.identities_removed),
            policy_rules_added: t(&mut d.policy_rules_added),
            policy_rules_removed: t(&mut d.policy_rules_removed),
            services_set: t(&mut d.services_set),
            services_removed: t(&mut d.services_removed),
            peers_set: t(&mut d.peers_set),
            peers_removed: t(&mut d.peers_removed),
            identities: t(&mut a.identities),
            policy_rules: t(&mut a.policy_rules),
            services: t(&mut a.services),
            peers: t(&mut a.peers),
        }
    }
}

/// Reassembles the parts of an assignment ([`split`]) on the agent.
#[derive(Debug, Default)]
pub struct Parts {
    acc: Option<Assignment>,
}

impl Parts {
    /// Takes one message; returns the whole assignment once its last part
    /// is in (at once for one that came whole). A part of another
    /// revision than the ones before it starts over from it.
    pub fn push(&mut self, part: Assignment) -> Option<Assignment> {
        use prost::Message;
        let more = part.more;
        let merged = match self.acc.take() {
            Some(mut acc) if acc.revision == part.revision => {
                // Protobuf concatenation: repeated fields append, the
                // delta merges field by field.
                if acc.merge(part.encode_to_vec().as_slice()).is_err() {
                    return None;
                }
                acc
            }
            _ => part,
        };
        if more {
            self.acc = Some(merged);
            None
        } else {
            let mut whole = merged;
            whole.more = false;
            Some(whole)
        }
    }
}

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
        cur.remove_volumes = next.remove_volumes;
        cur.gateways = next.gateways;
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
            ..Default::default()
        }
    }

    fn big_whole(n: usize) -> Assignment {
        Assignment {
            revision: 42,
            instances: vec![crate::v1::InstanceAssignment {
                name: "web-abcde".into(),
                ..Default::default()
            }],
            identities: (0..n)
                .map(|i| {
                    id(
                        &format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                        300 + (i % 50) as u32,
                    )
                })
                .collect(),
            peers: (0..200)
                .map(|i| PeerNode {
                    name: format!("node-{i}"),
                    pod_cidr: format!("10.{i}.0.0/24"),
                    node_ip: format!("192.0.2.{i}"),
                })
                .collect(),
            ingress_enforced: vec![300, 301],
            ..Default::default()
        }
    }

    #[test]
    fn a_large_assignment_travels_in_parts_and_reassembles_exactly() {
        use prost::Message;
        let whole = big_whole(10_000);
        assert!(whole.encoded_len() > 100_000);
        let parts = split(whole.clone(), 32 << 10);
        assert!(parts.len() > 4, "{} parts", parts.len());
        assert!(parts.iter().all(|p| p.encoded_len() <= 32 << 10));
        assert!(parts[..parts.len() - 1].iter().all(|p| p.more));
        assert!(!parts.last().unwrap().more);
        assert_eq!(
            parts[0].instances.len(),
            1,
            "the node's own part comes first"
        );
        let mut r = Parts::default();
        let mut out = None;
        for p in parts {
            assert!(out.is_none(), "nothing before the last part");
            out = r.push(p);
        }
        assert_eq!(out, Some(whole));

        // A delta too: its lists spread, its flags kept.
        let delta = Assignment {
            revision: 50,
            delta: Some(AssignmentDelta {
                base_revision: 42,
                local_changed: true,
                identities_set: big_whole(5_000).identities,
                identities_removed: (0..3000)
                    .map(|i| format!("10.9.{}.{}", i / 256, i % 256))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let parts = split(delta.clone(), 16 << 10);
        assert!(parts.len() > 2);
        let mut r = Parts::default();
        let got = parts
            .into_iter()
            .filter_map(|p| r.push(p))
            .collect::<Vec<_>>();
        assert_eq!(got, vec![delta]);

        // Small ones are left alone.
        let small = big_whole(10);
        assert_eq!(split(small.clone(), 32 << 10), vec![small.clone()]);
        assert_eq!(Parts::default().push(small.clone()), Some(small));
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
            .map(|(ip, identity)| IdentityEntry {
                ip,
                identity,
                ..Default::default()
            })
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
