//! Policy: which identities may reach which, on which ports, at what rate.
//!
//! Semantics follow Kubernetes NetworkPolicy: a Policy selects workloads by
//! label (`selector`; empty selects every workload). A workload selected by
//! any Policy with `ingress` rules accepts only traffic some rule allows
//! (default deny); one selected by a Policy with `egress` rules may only
//! open what some rule allows. Workloads no Policy selects are open. Rules
//! add up across Policies. A rule allows traffic from (or to) the workloads
//! its `from` (or `to`) peers select — empty means any identity — on its
//! ports — empty means all ports. Replies of allowed connections always
//! pass. `rateLimit` caps new connections per second per source identity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{checks, Errors, Spec};
use crate::workload::Protocol;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default)]
    pub from: Vec<Peer>,
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default)]
    pub to: Vec<Peer>,
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub connections_per_second: u32,
    /// Defaults to `connectionsPerSecond`.
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
    for (i, p) in ports.iter().enumerate() {
        checks::port(errs, &format!("{at}.ports[{i}].port"), p.port);
    }
    if let Some(r) = rate {
        if r.connections_per_second == 0 {
            errs.add(
                format!("{at}.rateLimit.connectionsPerSecond"),
                "must be greater than zero",
            );
        }
        if r.burst == Some(0) {
            errs.add(format!("{at}.rateLimit.burst"), "must be at least 1");
        }
    }
}

impl Spec for PolicySpec {
    fn check(&self, errs: &mut Errors) {
        crate::meta::check_labels(errs, "spec.selector", &self.selector);
        if self.ingress.is_empty() && self.egress.is_empty() {
            errs.add("spec", "must have at least one ingress or egress rule");
        }
        for (i, r) in self.ingress.iter().enumerate() {
            check_rule(
                errs,
                &format!("spec.ingress[{i}]"),
                "from",
                &r.from,
                &r.ports,
                &r.rate_limit,
            );
        }
        for (i, r) in self.egress.iter().enumerate() {
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
