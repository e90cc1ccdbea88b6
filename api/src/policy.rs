//! Policy: which identities may reach which, on which ports, at what rate.
//!
//! The semantics follow Kubernetes NetworkPolicy:
//!
//! - A Policy *selects* workloads by label (`selector`; an empty selector
//!   selects every workload). Its rules apply to the instances of the
//!   selected workloads.
//! - Listing `ingress` (even as an empty list) makes the selected workloads
//!   **default-deny for incoming connections**: only what some ingress rule
//!   of some Policy selecting them allows gets in. Likewise `egress` for
//!   outgoing connections. A direction that no Policy selecting a workload
//!   lists stays open; a workload no Policy selects is open both ways. So
//!   `ingress: []` denies all incoming traffic.
//! - Rules add up, within a Policy and across Policies; there are no deny
//!   rules.
//! - An ingress rule allows connections **from** the identities its `from`
//!   peers select (a peer's `selector` matches workload labels; an empty
//!   `from` list means any identity, including callers outside the mesh),
//!   to the listed `ports` of the selected workload (an empty `ports` list
//!   means all ports). An egress rule is the same with `to`, the ports being
//!   the destination's.
//! - Replies on an allowed connection always pass; policy is checked when a
//!   connection opens.
//! - `rateLimit` caps the new connections per second that the rule admits,
//!   per source identity, as a token bucket of size `burst` (default: the
//!   rate). Connections over the limit are dropped.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::validate::{checks, Errors, Spec};
use crate::workload::Protocol;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// The workloads this Policy applies to; empty selects all.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// When present (even empty), selected workloads deny incoming
    /// connections that no rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// When present (even empty), selected workloads may only open the
    /// connections some rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// Allows connections from `from` to `ports` of the selected workloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// Empty: any identity.
    #[serde(default)]
    pub from: Vec<Peer>,
    /// Empty: all ports.
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Allows connections from the selected workloads to `to` on `ports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// Empty: any destination.
    #[serde(default)]
    pub to: Vec<Peer>,
    /// Empty: all ports.
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// The workloads whose labels include all of `selector` (empty: every
/// workload in the mesh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPort {
    pub port: u32,
    #[serde(default)]
    pub protocol: Protocol,
}

/// New connections per second per source identity, with a burst allowance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Greater than zero.
    pub connections_per_second: u32,
    /// At least 1; filled with `connectionsPerSecond` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

fn check_rule(
    errs: &mut Errors,
    at: &str,
    peers_field: &str,
    peers: &[Peer],
    ports: &[PolicyPort],
    rate: &Option<RateLimit>,
) {
    for (i, p) in peers.iter().enumerate() {
        crate::meta::check_labels(
            errs,
            &format!("{at}.{peers_field}[{i}].selector"),
            &p.selector,
        );
    }
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        checks::port(errs, &format!("{at}.ports[{i}].port"), p.port);
        if !seen.insert((p.port, p.protocol)) {
            errs.add(
                format!("{at}.ports[{i}]"),
                format!("{}/{} is listed twice", p.port, p.protocol),
            );
        }
    }
    if let Some(r) = rate {
        if r.connections_per_second == 0 {
            errs.add(
                format!("{at}.rateLimit.connectionsPerSecond"),
                "must be greater than zero, got 0 (to deny, leave the traffic out of every rule)",
            );
        }
        if r.burst == Some(0) {
            errs.add(format!("{at}.rateLimit.burst"), "must be at least 1, got 0");
        }
    }
}

fn fill_burst(rate: &mut Option<RateLimit>) {
    if let Some(r) = rate {
        r.burst.get_or_insert(r.connections_per_second);
    }
}

impl Spec for PolicySpec {
    fn normalize(&mut self) {
        for r in self.ingress.iter_mut().flatten() {
            fill_burst(&mut r.rate_limit);
        }
        for r in self.egress.iter_mut().flatten() {
            fill_burst(&mut r.rate_limit);
        }
    }

    fn check(&self, errs: &mut Errors) {
        crate::meta::check_labels(errs, "spec.selector", &self.selector);
        if self.ingress.is_none() && self.egress.is_none() {
            errs.add(
                "spec",
                "must list ingress or egress rules (an empty list denies all traffic in that direction)",
            );
        }
        for (i, r) in self.ingress.iter().flatten().enumerate() {
            check_rule(
                errs,
                &format!("spec.ingress[{i}]"),
                "from",
                &r.from,
                &r.ports,
                &r.rate_limit,
            );
        }
        for (i, r) in self.egress.iter().flatten().enumerate() {
            check_rule(
                errs,
                &format!("spec.egress[{i}]"),
                "to",
                &r.to,
                &r.ports,
                &r.rate_limit,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn pol(spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Policy", "metadata": {"name": "db-access"}, "spec": spec})
    }

    #[track_caller]
    fn rejects(spec: Value, path: &str, fragment: &str) {
        let e = validate(&pol(spec)).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    #[test]
    fn defaults_are_filled() {
        let v = validate(&pol(json!({
            "selector": {"app": "db"},
            "ingress": [{"from": [{"selector": {"app": "web"}}], "ports": [{"port": 5432}], "rateLimit": {"connectionsPerSecond": 100}}],
        })))
        .unwrap();
        assert_eq!(
            v.object["spec"],
            json!({
                "selector": {"app": "db"},
                "ingress": [{"from": [{"selector": {"app": "web"}}], "ports": [{"port": 5432, "protocol": "TCP"}], "rateLimit": {"connectionsPerSecond": 100, "burst": 100}}],
            })
        );
        assert_eq!(validate(&v.object).unwrap(), v);
    }

    #[test]
    fn empty_lists_are_meaningful() {
        // Deny all ingress to every workload.
        let v = validate(&pol(json!({"ingress": []}))).unwrap();
        assert_eq!(v.object["spec"], json!({"selector": {}, "ingress": []}));
        let typed: PolicySpec = v.spec().unwrap();
        assert_eq!(typed.ingress, Some(vec![]));
        assert_eq!(typed.egress, None);
        // Allow anything in, from anyone.
        let v = validate(&pol(json!({"ingress": [{}]}))).unwrap();
        assert_eq!(
            v.object["spec"]["ingress"],
            json!([{"from": [], "ports": []}])
        );
        rejects(
            json!({"selector": {"a": "b"}}),
            "spec",
            "must list ingress or egress",
        );
    }

    #[test]
    fn rules() {
        rejects(
            json!({"ingress": [{"rateLimit": {"connectionsPerSecond": 0}}]}),
            "spec.ingress[0].rateLimit.connectionsPerSecond",
            "must be greater than zero",
        );
        rejects(
            json!({"egress": [{"rateLimit": {"connectionsPerSecond": 5, "burst": 0}}]}),
            "spec.egress[0].rateLimit.burst",
            "at least 1",
        );
        rejects(
            json!({"egress": [{"rateLimit": {}}]}),
            "spec.egress[0].rateLimit.connectionsPerSecond",
            "is required",
        );
        rejects(
            json!({"ingress": [{"ports": [{"port": 0}]}]}),
            "spec.ingress[0].ports[0].port",
            "between 1 and 65535",
        );
        rejects(
            json!({"ingress": [{"ports": [{"port": 80}, {"port": 80}]}]}),
            "spec.ingress[0].ports[1]",
            "80/TCP is listed twice",
        );
        rejects(
            json!({"ingress": [{"from": [{"selector": {"app": "-x"}}]}]}),
            "spec.ingress[0].from[0].selector[\"app\"]",
            "is invalid",
        );
        rejects(
            json!({"egress": [{"to": [{"selector": {"bad key": "x"}}]}]}),
            "spec.egress[0].to[0].selector[\"bad key\"]",
            "is invalid",
        );
        rejects(
            json!({"egress": [{"from": []}]}),
            "spec.egress[0].from",
            "unknown field; expected one of to, ports, rateLimit",
        );
        rejects(
            json!({"ingress": [{"to": []}]}),
            "spec.ingress[0].to",
            "unknown field; expected one of from, ports, rateLimit",
        );
        rejects(
            json!({"selector": {"app": ""}, "ingress": {}}),
            "spec.ingress",
            "must be a list",
        );
    }
}
