//! Service: a stable virtual IP and ports in front of the ready instances a
//! label selector picks, balanced in the kernel.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::validate::{checks, Errors, Spec};
use crate::workload::Protocol;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    /// Allocated from the service CIDR when not given.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u32,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u32>,
    #[serde(default)]
    pub protocol: Protocol,
}

impl Spec for ServiceSpec {
    fn check(&self, errs: &mut Errors) {
        if self.selector.is_empty() {
            errs.add("spec.selector", "must select at least one label");
        }
        crate::meta::check_labels(errs, "spec.selector", &self.selector);
        if self.ports.is_empty() {
            errs.add("spec.ports", "must list at least one port");
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            checks::port(errs, &format!("spec.ports[{i}].port"), p.port);
            if let Some(t) = p.target_port {
                checks::port(errs, &format!("spec.ports[{i}].targetPort"), t);
            }
            if !seen.insert((p.port, p.protocol)) {
                errs.add(
                    format!("spec.ports[{i}]"),
                    format!("{}/{:?} is listed twice", p.port, p.protocol),
                );
            }
        }
        if let Some(ip) = &self.cluster_ip {
            checks::ipv4(errs, "spec.clusterIP", ip);
        }
    }
}
