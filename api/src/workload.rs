//! Workload: a long-running set of replicas of one container.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::validate::{checks, Errors, Spec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default = "one")]
    pub replicas: i64,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// Requested CPU and memory; also the limits written to the cgroup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "default_cpu")]
    pub cpu: Quantity,
    #[serde(default = "default_memory")]
    pub memory: Quantity,
}

fn default_cpu() -> Quantity {
    "100m".into()
}
fn default_memory() -> Quantity {
    "64Mi".into()
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu: default_cpu(),
            memory: default_memory(),
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u32,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default)]
    pub initial_delay_seconds: u32,
    #[serde(default = "ten")]
    pub period_seconds: u32,
    #[serde(default = "one_u32")]
    pub timeout_seconds: u32,
    #[serde(default = "three")]
    pub failure_threshold: u32,
}

fn ten() -> u32 {
    10
}
fn one_u32() -> u32 {
    1
}
fn three() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecAction {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetAction {
    #[serde(default = "root")]
    pub path: String,
    pub port: u32,
}

fn root() -> String {
    "/".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocketAction {
    pub port: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    pub name: String,
    /// The Volume object to mount.
    pub volume: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub operator: TolerationOperator,
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<crate::node::TaintEffect>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spread {
    #[serde(default = "hostname_key")]
    pub topology_key: String,
    #[serde(default = "one_u32")]
    pub max_skew: u32,
}

fn hostname_key() -> String {
    "ironmesh.dev/hostname".into()
}

/// Checks shared by workloads and pipeline steps.
pub(crate) fn check_container(
    errs: &mut Errors,
    at: &str,
    image: &str,
    env: &[EnvVar],
    resources: &Resources,
) {
    checks::image(errs, &format!("{at}.image"), image);
    let mut seen = BTreeSet::new();
    for (i, e) in env.iter().enumerate() {
        checks::env_name(errs, &format!("{at}.env[{i}].name"), &e.name);
        if !seen.insert(&e.name) {
            errs.add(
                format!("{at}.env[{i}].name"),
                format!("{:?} is set twice", e.name),
            );
        }
    }
    checks::positive_cpu(errs, &format!("{at}.resources.cpu"), &resources.cpu);
    checks::positive_bytes(errs, &format!("{at}.resources.memory"), &resources.memory);
}

fn check_probe(errs: &mut Errors, at: &str, p: &Probe) {
    let set = [
        p.exec.is_some(),
        p.http_get.is_some(),
        p.tcp_socket.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        errs.add(
            at,
            format!("must set exactly one of exec, httpGet, tcpSocket (found {set})"),
        );
    }
    if let Some(e) = &p.exec {
        if e.command.is_empty() {
            errs.add(format!("{at}.exec.command"), "must not be empty");
        }
    }
    if let Some(h) = &p.http_get {
        if !h.path.starts_with('/') {
            errs.add(
                format!("{at}.httpGet.path"),
                format!("must start with '/', got {:?}", h.path),
            );
        }
        checks::port(errs, &format!("{at}.httpGet.port"), h.port);
    }
    if let Some(t) = &p.tcp_socket {
        checks::port(errs, &format!("{at}.tcpSocket.port"), t.port);
    }
    for (name, v) in [
        ("periodSeconds", p.period_seconds),
        ("timeoutSeconds", p.timeout_seconds),
        ("failureThreshold", p.failure_threshold),
    ] {
        if v == 0 {
            errs.add(format!("{at}.{name}"), "must be at least 1");
        }
    }
}

impl Spec for WorkloadSpec {
    fn check(&self, errs: &mut Errors) {
        check_container(errs, "spec", &self.image, &self.env, &self.resources);
        if !(0..=10_000).contains(&self.replicas) {
            errs.add(
                "spec.replicas",
                format!("must be between 0 and 10000, got {}", self.replicas),
            );
        }
        if let Some(w) = &self.working_dir {
            checks::absolute_path(errs, "spec.workingDir", w);
        }
        let mut ports = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            checks::port(
                errs,
                &format!("spec.ports[{i}].containerPort"),
                p.container_port,
            );
            if !ports.insert((p.container_port, p.protocol)) {
                errs.add(
                    format!("spec.ports[{i}]"),
                    format!("{}/{:?} is listed twice", p.container_port, p.protocol),
                );
            }
        }
        if let Some(p) = &self.liveness_probe {
            check_probe(errs, "spec.livenessProbe", p);
        }
        if let Some(p) = &self.readiness_probe {
            check_probe(errs, "spec.readinessProbe", p);
        }
        let (mut names, mut paths) = (BTreeSet::new(), BTreeSet::new());
        for (i, v) in self.volumes.iter().enumerate() {
            checks::dns_label(errs, &format!("spec.volumes[{i}].name"), &v.name);
            checks::dns_label(errs, &format!("spec.volumes[{i}].volume"), &v.volume);
            checks::absolute_path(errs, &format!("spec.volumes[{i}].mountPath"), &v.mount_path);
            if !names.insert(&v.name) {
                errs.add(
                    format!("spec.volumes[{i}].name"),
                    format!("{:?} is used twice", v.name),
                );
            }
            if !paths.insert(&v.mount_path) {
                errs.add(
                    format!("spec.volumes[{i}].mountPath"),
                    format!("{:?} is used twice", v.mount_path),
                );
            }
        }
        if let Some(c) = &self.capabilities {
            for (i, cap) in c.add.iter().enumerate() {
                if cap.is_empty() || !cap.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                    errs.add(
                        format!("spec.capabilities.add[{i}]"),
                        format!("{cap:?} is not a capability name such as NET_BIND_SERVICE"),
                    );
                }
            }
        }
        if let Some(p) = &self.placement {
            crate::meta::check_labels(errs, "spec.placement.nodeSelector", &p.node_selector);
            if let Some(s) = &p.spread {
                if s.max_skew == 0 {
                    errs.add("spec.placement.spread.maxSkew", "must be at least 1");
                }
            }
            for (i, t) in p.tolerations.iter().enumerate() {
                if t.operator == TolerationOperator::Exists && !t.value.is_empty() {
                    errs.add(
                        format!("spec.placement.tolerations[{i}].value"),
                        "must be empty when operator is Exists",
                    );
                }
            }
        }
    }
}
