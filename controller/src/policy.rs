//! Policy compilation: Policy objects and workload identities in, datapath
//! rules out.
//!
//! The semantics are those documented on [`ironmesh_api::policy`]
//! (Kubernetes NetworkPolicy): a Policy listing `ingress` makes the
//! workloads it selects default-deny for incoming connections, and each
//! ingress rule allows `(source identity, destination identity, port,
//! protocol)`; `egress` likewise. The result is a flat, sorted, de-duplicated
//! rule set that agents write into BPF maps; a change of policy changes map
//! entries, never a program.

use std::collections::{BTreeMap, BTreeSet};

use ironmesh_api::policy::{PolicyPort, PolicySpec, RateLimit};
use ironmesh_proto::v1::{policy_rule::Direction, PolicyRule};

/// A workload as policy sees it: its labels and identity.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub labels: BTreeMap<String, String>,
    pub identity: u32,
}

/// What the agents enforce.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    pub rules: Vec<PolicyRule>,
    pub ingress_enforced: Vec<u32>,
    pub egress_enforced: Vec<u32>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn protocol(p: &PolicyPort) -> String {
    p.protocol.to_string()
}

/// (port, protocol) pairs of a rule; all ports of all protocols when empty.
fn ports(list: &[PolicyPort]) -> Vec<(u32, String)> {
    if list.is_empty() {
        vec![(0, String::new())]
    } else {
        list.iter().map(|p| (p.port, protocol(p))).collect()
    }
}

fn rate(r: &Option<RateLimit>) -> (u32, u32) {
    match r {
        Some(r) => (
            r.connections_per_second,
            r.burst.unwrap_or(r.connections_per_second),
        ),
        None => (0, 0),
    }
}

/// The identities of the endpoints any peer selects; `[0]` (anyone) when
/// the peer list is empty.
fn peers(list: &[ironmesh_api::policy::Peer], endpoints: &[Endpoint]) -> BTreeSet<u32> {
    if list.is_empty() {
        return BTreeSet::from([0]);
    }
    endpoints
        .iter()
        .filter(|e| list.iter().any(|p| selects(&p.selector, &e.labels)))
        .map(|e| e.identity)
        .collect()
}

/// Compiles `policies` against the cluster's `endpoints`.
pub fn compile(policies: &[PolicySpec], endpoints: &[Endpoint]) -> Compiled {
    let mut rules: BTreeSet<(i32, u32, u32, u32, String, u32, u32)> = BTreeSet::new();
    let mut ingress_enforced = BTreeSet::new();
    let mut egress_enforced = BTreeSet::new();
    for p in policies {
        let selected: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| selects(&p.selector, &e.labels))
            .collect();
        if let Some(ingress) = &p.ingress {
            for e in &selected {
                ingress_enforced.insert(e.identity);
                for r in ingress {
                    let (rps, burst) = rate(&r.rate_limit);
                    for src in peers(&r.from, endpoints) {
                        for (port, proto) in ports(&r.ports) {
                            rules.insert((
                                Direction::Ingress as i32,
                                src,
                                e.identity,
                                port,
                                proto,
                                rps,
                                burst,
                            ));
                        }
                    }
                }
            }
        }
        if let Some(egress) = &p.egress {
            for e in &selected {
                egress_enforced.insert(e.identity);
                for r in egress {
                    let (rps, burst) = rate(&r.rate_limit);
                    for dst in peers(&r.to, endpoints) {
                        for (port, proto) in ports(&r.ports) {
                            rules.insert((
                                Direction::Egress as i32,
                                e.identity,
                                dst,
                                port,
                                proto,
                                rps,
                                burst,
                            ));
                        }
                    }
                }
            }
        }
    }
    Compiled {
        rules: rules
            .into_iter()
            .map(
                |(
                    direction,
                    src_identity,
                    dst_identity,
                    port,
                    protocol,
                    rate_per_second,
                    burst,
                )| {
                    PolicyRule {
                        direction,
                        src_identity,
                        dst_identity,
                        port,
                        protocol,
                        rate_per_second,
                        burst,
                    }
                },
            )
            .collect(),
        ingress_enforced: ingress_enforced.into_iter().collect(),
        egress_enforced: egress_enforced.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(labels: &[(&str, &str)], identity: u32) -> Endpoint {
        Endpoint {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            identity,
        }
    }

    fn policy(yaml: &str) -> PolicySpec {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn ingress_rules_allow_selected_sources_on_ports() {
        let eps = [
            ep(&[("app", "orders")], 300),
            ep(&[("team", "analytics")], 301),
            ep(&[("team", "other")], 302),
        ];
        let c = compile(
            &[policy(
                "selector: {app: orders}\ningress:\n  - from: [{selector: {team: analytics}}]\n    ports: [{port: 8080}]\n    rateLimit: {connectionsPerSecond: 5}\n",
            )],
            &eps,
        );
        assert_eq!(c.ingress_enforced, [300]);
        assert!(c.egress_enforced.is_empty());
        assert_eq!(
            c.rules,
            [PolicyRule {
                direction: Direction::Ingress as i32,
                src_identity: 301,
                dst_identity: 300,
                port: 8080,
                protocol: "TCP".into(),
                rate_per_second: 5,
                burst: 5,
            }]
        );
    }

    #[test]
    fn empty_lists_mean_deny_all_or_anyone_on_any_port() {
        let eps = [ep(&[("app", "db")], 400), ep(&[("app", "web")], 401)];
        let deny_all = compile(&[policy("selector: {app: db}\ningress: []\n")], &eps);
        assert_eq!(deny_all.ingress_enforced, [400]);
        assert!(deny_all.rules.is_empty());

        let anyone = compile(
            &[policy("selector: {app: db}\ningress:\n  - from: []\n")],
            &eps,
        );
        assert_eq!(anyone.rules.len(), 1);
        assert_eq!(anyone.rules[0].src_identity, 0);
        assert_eq!(anyone.rules[0].port, 0);
        assert_eq!(anyone.rules[0].protocol, "");
    }

    #[test]
    fn rules_add_up_and_are_deduplicated_and_egress_is_separate() {
        let eps = [ep(&[("app", "a")], 500), ep(&[("app", "b")], 501)];
        let p = "selector: {app: a}\negress:\n  - to: [{selector: {app: b}}]\n    ports: [{port: 53, protocol: UDP}]\n";
        let c = compile(&[policy(p), policy(p)], &eps);
        assert_eq!(c.egress_enforced, [500]);
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.rules[0].direction, Direction::Egress as i32);
        assert_eq!(
            (c.rules[0].src_identity, c.rules[0].dst_identity),
            (500, 501)
        );
        assert_eq!(c.rules[0].protocol, "UDP");
    }
}
