//! Workload: a long-running set of replicas of one container, with its
//! resources, ports, probes, restart policy, volumes, capabilities and
//! placement.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::meta::Condition;
use crate::quantity::Quantity;
use crate::validate::{checks, Errors, Spec};

/// The node label that names a node's host; the default spread key.
pub const HOSTNAME_LABEL: &str = "ironmesh.dev/hostname";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Image reference, e.g. `registry.local/web:1.2`.
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's cmd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// 0 to 10000; default 1.
    #[serde(default = "one_i64")]
    pub replicas: i64,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// Failing it restarts the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    /// Failing it takes the instance out of service backends.
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
    /// User, group and seccomp profile of the container's process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// How the instances take part in the mesh (mTLS between hosts); unset:
    /// the cluster's default (`--mesh-default-mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSpec {
    pub mode: MeshMode,
}

/// A workload's mesh mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MeshMode {
    /// Outside the mesh: plaintext on the kernel path, as before the mesh.
    Off,
    /// Through the node proxies to other meshed instances; plaintext from
    /// other hosts still accepted.
    Permissive,
    /// Connections from other hosts and from the host only through the
    /// proxies (mTLS); plaintext dropped in the datapath.
    Strict,
}

impl MeshMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MeshMode::Off => "off",
            MeshMode::Permissive => "permissive",
            MeshMode::Strict => "strict",
        }
    }
}

impl std::str::FromStr for MeshMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(MeshMode::Off),
            "permissive" => Ok(MeshMode::Permissive),
            "strict" => Ok(MeshMode::Strict),
            other => Err(format!(
                "mesh mode {other:?}: use off, permissive or strict"
            )),
        }
    }
}

fn one_i64() -> i64 {
    1
}
fn one_u32() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    /// `[A-Za-z_][A-Za-z0-9_]*`, unique in the list.
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// Requested CPU and memory; also the limits written to the cgroup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Default `100m`.
    #[serde(default = "default_cpu")]
    pub cpu: Quantity,
    /// Default `64Mi`.
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    /// Most processes (and threads) the container may have at once; 1 to
    /// 4,194,304, default [`DEFAULT_PIDS_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// The pids limit of a container whose Workload sets none.
pub const DEFAULT_PIDS_LIMIT: u32 = 4096;
/// The kernel's largest pid count (`PID_MAX_LIMIT` on 64-bit).
pub const MAX_PIDS_LIMIT: u32 = 4_194_304;

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
            pids: None,
        }
    }
}

impl Resources {
    /// CPU in millicores (valid once the object passed validation).
    pub fn cpu_millis(&self) -> Result<u64, String> {
        self.cpu.cpu_millis()
    }

    /// Memory in bytes (valid once the object passed validation).
    pub fn memory_bytes(&self) -> Result<u64, String> {
        self.memory.bytes()
    }

    /// The pids limit, with the default filled in.
    pub fn pids_limit(&self) -> u32 {
        self.pids.unwrap_or(DEFAULT_PIDS_LIMIT)
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

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::TCP => "TCP",
            Protocol::UDP => "UDP",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    /// A DNS label of at most 15 characters, unique in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u32,
    #[serde(default)]
    pub protocol: Protocol,
}

/// A health check: exactly one of `exec`, `httpGet`, `tcpSocket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// Succeeds when the command exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// Succeeds on an HTTP status from 200 to 399.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    /// Succeeds when a TCP connection opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default)]
    pub initial_delay_seconds: u32,
    /// Default 10, at least 1.
    #[serde(default = "ten")]
    pub period_seconds: u32,
    /// Default 1, at least 1.
    #[serde(default = "one_u32")]
    pub timeout_seconds: u32,
    /// Consecutive failures before the probe counts as failed; default 3.
    #[serde(default = "three")]
    pub failure_threshold: u32,
}

fn ten() -> u32 {
    10
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
    /// Starts with '/'; default "/".
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
    /// Restart whenever the container exits.
    #[default]
    Always,
    /// Restart when it exits non-zero.
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    /// Unique in the list.
    pub name: String,
    /// The Volume object to mount.
    pub volume: String,
    /// Absolute, unique in the list.
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Linux capabilities added to the container's default set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capabilities {
    /// Names without the `CAP_` prefix, e.g. `NET_BIND_SERVICE`.
    #[serde(default)]
    pub add: Vec<String>,
}

/// Docker's (and containerd's) default capability set: a Workload may add
/// these without anything more. Any other capability reaches the host and
/// needs an admin operator (see [`WorkloadSpec::host_access`]).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Who the container's process runs as, and its system-call filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityContext {
    /// Numeric uid; default the image's user (root when it names none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<u32>,
    /// Numeric gid; default the image's group, else the uid's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<u32>,
    /// Refuse to start when the process would run as uid 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub run_as_non_root: bool,
    #[serde(default)]
    pub seccomp_profile: SeccompProfile,
}

/// The seccomp filter of a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompProfile {
    /// Docker's default allow-list (every other system call fails with
    /// EPERM).
    #[default]
    RuntimeDefault,
    /// No filter: needs an admin operator.
    Unconfined,
}

/// The Linux capabilities, without the `CAP_` prefix.
pub const LINUX_CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Where instances may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Only nodes with all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints these instances accept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
}

/// Matches a node taint: `Equal` matches key and value, `Exists` any value
/// of the key (an empty key with `Exists` matches every taint). Without an
/// `effect` it matches every effect.
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

impl Toleration {
    /// Whether this toleration accepts the taint.
    pub fn tolerates(&self, t: &crate::node::Taint) -> bool {
        if self.effect.is_some_and(|e| e != t.effect) {
            return false;
        }
        match self.operator {
            TolerationOperator::Exists => self.key.is_empty() || self.key == t.key,
            TolerationOperator::Equal => self.key == t.key && self.value == t.value,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

/// Spread instances across the values of a node label: no value may have
/// more than `maxSkew` instances above the least-loaded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spread {
    /// A node label key; default `ironmesh.dev/hostname` (one per host).
    #[serde(default = "hostname_key")]
    pub topology_key: String,
    /// At least 1; default 1.
    #[serde(default = "one_u32")]
    pub max_skew: u32,
}

fn hostname_key() -> String {
    HOSTNAME_LABEL.into()
}

/// What the controller reports about a workload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    /// Instances that exist.
    #[serde(default)]
    pub replicas: u32,
    /// Instances whose readiness probe passes (or that have none).
    #[serde(default)]
    pub ready_replicas: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Always written, `[]` with no instances.
    #[serde(default)]
    pub instances: Vec<InstanceSummary>,
}

/// One of a Workload's Instances as its status lists it (the Instance's
/// own status is [`crate::instance::InstanceStatus`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSummary {
    /// E.g. `web-0`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default)]
    pub phase: InstancePhase,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstancePhase {
    /// Placed, not running yet (image fetch, setup).
    #[default]
    Pending,
    Running,
    /// Exited 0 and will not be restarted.
    Succeeded,
    /// Exited non-zero and will not be restarted.
    Failed,
    /// The node stopped reporting.
    Unknown,
}

/// Checks shared by workloads and pipeline steps: image, argv and env
/// sizes, env names, resources.
pub(crate) struct Container<'a> {
    pub image: &'a str,
    pub command: &'a [String],
    pub args: &'a [String],
    pub env: &'a [EnvVar],
    pub resources: &'a Resources,
}

pub(crate) fn check_container(errs: &mut Errors, at: &str, c: Container<'_>) {
    let Container {
        image,
        command,
        args,
        env,
        resources,
    } = c;
    checks::image(errs, &format!("{at}.image"), image);
    checks::argv(errs, at, command, args, env);
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
    if let Some(p) = resources.pids {
        if !(1..=MAX_PIDS_LIMIT).contains(&p) {
            errs.add(
                format!("{at}.resources.pids"),
                format!("must be between 1 and {MAX_PIDS_LIMIT}, got {p}"),
            );
        }
    }
}

impl WorkloadSpec {
    /// What this spec asks for that reaches beyond Docker's default
    /// sandbox, as `(field path, what it is)`: capabilities outside
    /// [`DEFAULT_CAPABILITIES`] and an `Unconfined` seccomp profile. Only
    /// an admin operator (or a Source with `allowPrivileged`) may apply a
    /// Workload with any.
    pub fn host_access(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, cap) in self
            .capabilities
            .iter()
            .flat_map(|c| c.add.iter())
            .enumerate()
        {
            if !DEFAULT_CAPABILITIES.contains(&cap.as_str()) {
                out.push((
                    format!("spec.capabilities.add[{i}]"),
                    format!("capability {cap} is outside the default set"),
                ));
            }
        }
        if self
            .security_context
            .as_ref()
            .is_some_and(|s| s.seccomp_profile == SeccompProfile::Unconfined)
        {
            out.push((
                "spec.securityContext.seccompProfile".to_string(),
                "seccomp profile Unconfined turns off the system-call filter".to_string(),
            ));
        }
        out
    }
}

fn check_probe(errs: &mut Errors, at: &str, p: &Probe) {
    let set: Vec<&str> = [
        ("exec", p.exec.is_some()),
        ("httpGet", p.http_get.is_some()),
        ("tcpSocket", p.tcp_socket.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, s)| s.then_some(n))
    .collect();
    if set.len() != 1 {
        errs.add(
            at,
            if set.is_empty() {
                "must set exactly one of exec, httpGet, tcpSocket; found none".to_string()
            } else {
                format!(
                    "must set exactly one of exec, httpGet, tcpSocket; found {}",
                    set.join(" and ")
                )
            },
        );
    }
    if let Some(e) = &p.exec {
        if e.command.is_empty() {
            errs.add(
                format!("{at}.exec.command"),
                "must not be empty, e.g. [\"/bin/check\"]",
            );
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
            errs.add(format!("{at}.{name}"), "must be at least 1, got 0");
        }
    }
}

fn check_capability(errs: &mut Errors, path: String, cap: &str) {
    if LINUX_CAPABILITIES.contains(&cap) {
        return;
    }
    let upper = cap.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    let msg = if LINUX_CAPABILITIES.contains(&bare) {
        format!("must be written {bare:?} (uppercase, without the CAP_ prefix), got {cap:?}")
    } else {
        format!("{cap:?} is not a Linux capability; expected a name such as NET_BIND_SERVICE, NET_ADMIN or SYS_PTRACE")
    };
    errs.add(path, msg);
}

impl Spec for WorkloadSpec {
    fn check(&self, errs: &mut Errors) {
        check_container(
            errs,
            "spec",
            Container {
                image: &self.image,
                command: &self.command,
                args: &self.args,
                env: &self.env,
                resources: &self.resources,
            },
        );
        if !(0..=10_000).contains(&self.replicas) {
            errs.add(
                "spec.replicas",
                format!("must be between 0 and 10000, got {}", self.replicas),
            );
        }
        if let Some(w) = &self.working_dir {
            checks::absolute_path(errs, "spec.workingDir", w);
        }
        let (mut ports, mut port_names) = (BTreeSet::new(), BTreeSet::new());
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(n) = &p.name {
                checks::port_name(errs, &format!("spec.ports[{i}].name"), n);
                if !port_names.insert(n) {
                    errs.add(
                        format!("spec.ports[{i}].name"),
                        format!("{n:?} is used twice"),
                    );
                }
            }
            checks::port(
                errs,
                &format!("spec.ports[{i}].containerPort"),
                p.container_port,
            );
            if !ports.insert((p.container_port, p.protocol)) {
                errs.add(
                    format!("spec.ports[{i}]"),
                    format!("{}/{} is listed twice", p.container_port, p.protocol),
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
            let normalised = v.mount_path.trim_end_matches('/');
            if !paths.insert(normalised) {
                errs.add(
                    format!("spec.volumes[{i}].mountPath"),
                    format!("{:?} is used twice", v.mount_path),
                );
            }
        }
        if let Some(c) = &self.capabilities {
            let mut seen = BTreeSet::new();
            for (i, cap) in c.add.iter().enumerate() {
                check_capability(errs, format!("spec.capabilities.add[{i}]"), cap);
                if !seen.insert(cap) {
                    errs.add(
                        format!("spec.capabilities.add[{i}]"),
                        format!("{cap:?} is listed twice"),
                    );
                }
            }
        }
        if let Some(sc) = &self.security_context {
            if sc.run_as_non_root && sc.run_as_user == Some(0) {
                errs.add(
                    "spec.securityContext.runAsUser",
                    "is 0 (root) while runAsNonRoot is true; set a non-zero uid or drop runAsNonRoot",
                );
            }
        }
        if let Some(p) = &self.placement {
            crate::meta::check_labels(errs, "spec.placement.nodeSelector", &p.node_selector);
            for (i, t) in p.tolerations.iter().enumerate() {
                let at = format!("spec.placement.tolerations[{i}]");
                if t.key.is_empty() {
                    if t.operator == TolerationOperator::Equal {
                        errs.add(
                            format!("{at}.key"),
                            "is required with operator Equal (use operator Exists with no key to tolerate every taint)",
                        );
                    }
                } else {
                    checks::label_key(errs, &format!("{at}.key"), &t.key);
                }
                if t.operator == TolerationOperator::Exists && !t.value.is_empty() {
                    errs.add(
                        format!("{at}.value"),
                        format!("must be empty with operator Exists, got {:?}", t.value),
                    );
                } else if let Some(msg) = crate::meta::label_value_problem(&t.value) {
                    errs.add(format!("{at}.value"), msg);
                }
            }
            if let Some(s) = &p.spread {
                checks::label_key(errs, "spec.placement.spread.topologyKey", &s.topology_key);
                if s.max_skew == 0 {
                    errs.add("spec.placement.spread.maxSkew", "must be at least 1, got 0");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn wl(spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Workload", "metadata": {"name": "web"}, "spec": spec})
    }

    /// `{"image": "web:1"}` plus the given fields.
    fn with(extra: Value) -> Value {
        let mut spec = json!({"image": "web:1"});
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        wl(spec)
    }

    #[track_caller]
    fn rejects(doc: Value, path: &str, fragment: &str) {
        let e = validate(&doc).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    #[test]
    fn defaults_are_filled() {
        let v = validate(&wl(json!({"image": "web:1"}))).unwrap();
        assert_eq!(
            v.object["spec"],
            json!({
                "image": "web:1",
                "replicas": 1,
                "resources": {"cpu": "100m", "memory": "64Mi"},
                "restartPolicy": "Always",
                "readOnlyRootFilesystem": false,
            })
        );
        let v = validate(&with(json!({
            "ports": [{"containerPort": 80}],
            "readinessProbe": {"httpGet": {"port": 80}},
            "placement": {"spread": {}},
            "resources": {"cpu": 2},
        })))
        .unwrap();
        let s = &v.object["spec"];
        assert_eq!(s["ports"][0]["protocol"], "TCP");
        assert_eq!(
            s["readinessProbe"],
            json!({"httpGet": {"path": "/", "port": 80}, "initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3})
        );
        assert_eq!(
            s["placement"]["spread"],
            json!({"topologyKey": "ironmesh.dev/hostname", "maxSkew": 1})
        );
        assert_eq!(s["resources"], json!({"cpu": "2", "memory": "64Mi"}));
    }

    #[test]
    fn round_trip_is_stable() {
        let full = with(json!({
            "command": ["/bin/web"], "args": ["--port", "80"],
            "env": [{"name": "MODE", "value": "prod"}], "workingDir": "/srv",
            "replicas": 3, "resources": {"cpu": "500m", "memory": "1Gi"},
            "ports": [{"name": "http", "containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}],
            "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"tcpSocket": {"port": 80}, "initialDelaySeconds": 5},
            "restartPolicy": "OnFailure",
            "volumes": [{"name": "data", "volume": "web-data", "mountPath": "/data", "readOnly": true}],
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_BIND_SERVICE"]},
            "placement": {"nodeSelector": {"disk": "ssd"}, "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}], "spread": {"maxSkew": 2}},
        }));
        let v = validate(&full).unwrap();
        let again = validate(&v.object).unwrap();
        assert_eq!(again, v);
        let typed: WorkloadSpec = v.spec().unwrap();
        assert_eq!(typed.replicas, 3);
        assert_eq!(typed.resources.cpu_millis(), Ok(500));
        assert_eq!(typed.resources.memory_bytes(), Ok(1 << 30));
        assert_eq!(typed.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(serde_json::to_value(&typed).unwrap(), v.object["spec"]);
    }

    #[test]
    fn image_and_replicas() {
        rejects(wl(json!({})), "spec.image", "is required");
        rejects(wl(json!({"image": ""})), "spec.image", "is required");
        rejects(
            wl(json!({"image": "web 1"})),
            "spec.image",
            "must not contain whitespace",
        );
        rejects(
            with(json!({"replicas": -1})),
            "spec.replicas",
            "must be between 0 and 10000, got -1",
        );
        rejects(
            with(json!({"replicas": 10001})),
            "spec.replicas",
            "got 10001",
        );
        rejects(
            with(json!({"replicas": "3"})),
            "spec.replicas",
            "must be a whole number, got \"3\"",
        );
        assert!(validate(&with(json!({"replicas": 0}))).is_ok());
        assert!(validate(&with(json!({"replicas": 10000}))).is_ok());
        rejects(
            with(json!({"replicaz": 1})),
            "spec.replicaz",
            "unknown field; expected one of image, command",
        );
    }

    #[test]
    fn env_and_working_dir() {
        rejects(
            with(json!({"env": [{"name": "1X"}]})),
            "spec.env[0].name",
            "not a valid environment variable name",
        );
        rejects(
            with(json!({"env": [{"name": "A-B"}]})),
            "spec.env[0].name",
            "[A-Za-z_][A-Za-z0-9_]*",
        );
        rejects(
            with(json!({"env": [{"name": "A"}, {"name": "A", "value": "2"}]})),
            "spec.env[1].name",
            "\"A\" is set twice",
        );
        rejects(
            with(json!({"env": [{"value": "x"}]})),
            "spec.env[0].name",
            "is required",
        );
        rejects(
            with(json!({"env": [{"name": "A", "value": 1}]})),
            "spec.env[0].value",
            "quote it",
        );
        rejects(
            with(json!({"workingDir": "srv"})),
            "spec.workingDir",
            "must be an absolute path, got \"srv\"",
        );
    }

    #[test]
    fn resources() {
        rejects(
            with(json!({"resources": {"cpu": "lots"}})),
            "spec.resources.cpu",
            "not a CPU quantity",
        );
        rejects(
            with(json!({"resources": {"cpu": "0"}})),
            "spec.resources.cpu",
            "must be greater than zero",
        );
        rejects(
            with(json!({"resources": {"memory": 0}})),
            "spec.resources.memory",
            "must be greater than zero",
        );
        rejects(
            with(json!({"resources": {"memory": "1GB"}})),
            "spec.resources.memory",
            "not a size",
        );
        rejects(
            with(json!({"resources": {"memory": true}})),
            "spec.resources.memory",
            "must be a quantity such as",
        );
        rejects(
            with(json!({"resources": {"gpu": 1}})),
            "spec.resources.gpu",
            "unknown field; expected one of cpu, memory",
        );
        assert!(validate(&with(
            json!({"resources": {"cpu": 0.25, "memory": 1048576}})
        ))
        .is_ok());
    }

    #[test]
    fn ports() {
        rejects(
            with(json!({"ports": [{"containerPort": 70000}]})),
            "spec.ports[0].containerPort",
            "must be between 1 and 65535, got 70000",
        );
        rejects(
            with(json!({"ports": [{"containerPort": 0}]})),
            "spec.ports[0].containerPort",
            "between 1 and 65535",
        );
        rejects(
            with(json!({"ports": [{"containerPort": -1}]})),
            "spec.ports[0].containerPort",
            "must be a whole number from 0 to 4294967295, got -1",
        );
        rejects(
            with(json!({"ports": [{"containerPort": 80, "protocol": "SCTP"}]})),
            "spec.ports[0].protocol",
            "must be one of TCP, UDP, got \"SCTP\"",
        );
        rejects(
            with(
                json!({"ports": [{"containerPort": 80}, {"containerPort": 80, "protocol": "TCP"}]}),
            ),
            "spec.ports[1]",
            "80/TCP is listed twice",
        );
        assert!(validate(&with(
            json!({"ports": [{"containerPort": 53}, {"containerPort": 53, "protocol": "UDP"}]})
        ))
        .is_ok());
        rejects(
            with(json!({"ports": [{"name": "HTTP", "containerPort": 80}]})),
            "spec.ports[0].name",
            "lowercase",
        );
        rejects(
            with(json!({"ports": [{"name": "a-very-long-port-name", "containerPort": 80}]})),
            "spec.ports[0].name",
            "at most 15",
        );
        rejects(
            with(
                json!({"ports": [{"name": "http", "containerPort": 80}, {"name": "http", "containerPort": 81}]}),
            ),
            "spec.ports[1].name",
            "used twice",
        );
    }

    #[test]
    fn probes() {
        rejects(
            with(json!({"readinessProbe": {"httpGet": {"port": 80}, "tcpSocket": {"port": 80}}})),
            "spec.readinessProbe",
            "exactly one of exec, httpGet, tcpSocket; found httpGet and tcpSocket",
        );
        rejects(
            with(json!({"livenessProbe": {"periodSeconds": 5}})),
            "spec.livenessProbe",
            "found none",
        );
        rejects(
            with(json!({"livenessProbe": {"exec": {"command": []}}})),
            "spec.livenessProbe.exec.command",
            "must not be empty",
        );
        rejects(
            with(json!({"livenessProbe": {"httpGet": {"path": "healthz", "port": 80}}})),
            "spec.livenessProbe.httpGet.path",
            "must start with '/'",
        );
        rejects(
            with(json!({"livenessProbe": {"httpGet": {"port": 0}}})),
            "spec.livenessProbe.httpGet.port",
            "between 1 and 65535",
        );
        rejects(
            with(json!({"livenessProbe": {"tcpSocket": {"port": 65536}}})),
            "spec.livenessProbe.tcpSocket.port",
            "between 1 and 65535",
        );
        rejects(
            with(json!({"livenessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 0}})),
            "spec.livenessProbe.periodSeconds",
            "at least 1",
        );
        rejects(
            with(json!({"livenessProbe": {"tcpSocket": {"port": 80}, "timeoutSeconds": 0}})),
            "spec.livenessProbe.timeoutSeconds",
            "at least 1",
        );
        rejects(
            with(json!({"livenessProbe": {"tcpSocket": {"port": 80}, "failureThreshold": 0}})),
            "spec.livenessProbe.failureThreshold",
            "at least 1",
        );
        rejects(
            with(json!({"livenessProbe": {"tcpSocket": {"port": 80}, "grpc": {}}})),
            "spec.livenessProbe.grpc",
            "unknown field",
        );
    }

    #[test]
    fn restart_policy() {
        rejects(
            with(json!({"restartPolicy": "Sometimes"})),
            "spec.restartPolicy",
            "must be one of Always, OnFailure, Never, got \"Sometimes\"",
        );
        let v = validate(&with(json!({"restartPolicy": "Never"}))).unwrap();
        assert_eq!(v.object["spec"]["restartPolicy"], "Never");
    }

    #[test]
    fn volumes() {
        let vol =
            |name: &str, path: &str| json!({"name": name, "volume": "data", "mountPath": path});
        rejects(
            with(json!({"volumes": [vol("d", "data")]})),
            "spec.volumes[0].mountPath",
            "must be an absolute path",
        );
        rejects(
            with(json!({"volumes": [vol("d", "/a"), vol("d", "/b")]})),
            "spec.volumes[1].name",
            "\"d\" is used twice",
        );
        rejects(
            with(json!({"volumes": [vol("a", "/a"), vol("b", "/a/")]})),
            "spec.volumes[1].mountPath",
            "used twice",
        );
        rejects(
            with(json!({"volumes": [{"name": "d", "volume": "Data", "mountPath": "/d"}]})),
            "spec.volumes[0].volume",
            "lowercase",
        );
        rejects(
            with(json!({"volumes": [{"name": "d", "mountPath": "/d"}]})),
            "spec.volumes[0].volume",
            "is required",
        );
    }

    #[test]
    fn capabilities() {
        rejects(
            with(json!({"capabilities": {"add": ["net_admin"]}})),
            "spec.capabilities.add[0]",
            "must be written \"NET_ADMIN\"",
        );
        rejects(
            with(json!({"capabilities": {"add": ["CAP_NET_ADMIN"]}})),
            "spec.capabilities.add[0]",
            "without the CAP_ prefix",
        );
        rejects(
            with(json!({"capabilities": {"add": ["NET_BIND_SERVICE", "FLY"]}})),
            "spec.capabilities.add[1]",
            "\"FLY\" is not a Linux capability",
        );
        rejects(
            with(json!({"capabilities": {"add": ["BPF", "BPF"]}})),
            "spec.capabilities.add[1]",
            "listed twice",
        );
        rejects(
            with(json!({"capabilities": {"drop": ["ALL"]}})),
            "spec.capabilities.drop",
            "unknown field; expected one of add",
        );
    }

    #[test]
    fn security_context_and_pids() {
        let v = validate(&with(json!({
            "resources": {"pids": 64},
            "securityContext": {"runAsUser": 1000, "runAsNonRoot": true},
        })))
        .unwrap();
        assert_eq!(
            v.object["spec"]["securityContext"],
            json!({"runAsUser": 1000, "runAsNonRoot": true, "seccompProfile": "RuntimeDefault"})
        );
        let typed: WorkloadSpec = v.spec().unwrap();
        assert_eq!(typed.resources.pids_limit(), 64);
        assert!(typed.host_access().is_empty());
        let plain: WorkloadSpec = validate(&with(json!({}))).unwrap().spec().unwrap();
        assert_eq!(plain.resources.pids_limit(), DEFAULT_PIDS_LIMIT);
        rejects(
            with(json!({"resources": {"pids": 0}})),
            "spec.resources.pids",
            "must be between 1 and 4194304, got 0",
        );
        rejects(
            with(json!({"securityContext": {"runAsUser": 0, "runAsNonRoot": true}})),
            "spec.securityContext.runAsUser",
            "is 0 (root) while runAsNonRoot is true",
        );
        rejects(
            with(json!({"securityContext": {"seccompProfile": "Loose"}})),
            "spec.securityContext.seccompProfile",
            "must be one of RuntimeDefault, Unconfined",
        );
        rejects(
            with(json!({"securityContext": {"runAsUser": -1}})),
            "spec.securityContext.runAsUser",
            "whole number",
        );
        let wide: WorkloadSpec = validate(&with(json!({
            "capabilities": {"add": ["NET_RAW", "SYS_ADMIN"]},
            "securityContext": {"seccompProfile": "Unconfined"},
        })))
        .unwrap()
        .spec()
        .unwrap();
        assert_eq!(
            wide.host_access(),
            vec![
                (
                    "spec.capabilities.add[1]".to_string(),
                    "capability SYS_ADMIN is outside the default set".to_string()
                ),
                (
                    "spec.securityContext.seccompProfile".to_string(),
                    "seccomp profile Unconfined turns off the system-call filter".to_string()
                ),
            ]
        );
    }

    #[test]
    fn placement() {
        rejects(
            with(json!({"placement": {"nodeSelector": {"disk": "a b"}}})),
            "spec.placement.nodeSelector[\"disk\"]",
            "is invalid",
        );
        rejects(
            with(json!({"placement": {"tolerations": [{"value": "x"}]}})),
            "spec.placement.tolerations[0].key",
            "is required with operator Equal",
        );
        rejects(
            with(
                json!({"placement": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}}),
            ),
            "spec.placement.tolerations[0].value",
            "must be empty with operator Exists",
        );
        rejects(
            with(json!({"placement": {"tolerations": [{"key": "gpu", "operator": "In"}]}})),
            "spec.placement.tolerations[0].operator",
            "must be one of Equal, Exists, got \"In\"",
        );
        rejects(
            with(json!({"placement": {"tolerations": [{"key": "gpu", "effect": "Never"}]}})),
            "spec.placement.tolerations[0].effect",
            "must be one of NoSchedule, PreferNoSchedule, NoExecute",
        );
        rejects(
            with(json!({"placement": {"spread": {"maxSkew": 0}}})),
            "spec.placement.spread.maxSkew",
            "at least 1",
        );
        rejects(
            with(json!({"placement": {"spread": {"topologyKey": "bad key"}}})),
            "spec.placement.spread.topologyKey",
            "is invalid",
        );
        assert!(validate(&with(
            json!({"placement": {"tolerations": [{"operator": "Exists"}]}})
        ))
        .is_ok());
    }

    #[test]
    fn tolerations_match_taints() {
        use crate::node::{Taint, TaintEffect};
        let taint = Taint {
            key: "gpu".into(),
            value: "a100".into(),
            effect: TaintEffect::NoSchedule,
        };
        let tol = |key: &str, op, value: &str, effect| Toleration {
            key: key.into(),
            operator: op,
            value: value.into(),
            effect,
        };
        use TolerationOperator::*;
        assert!(tol("gpu", Equal, "a100", None).tolerates(&taint));
        assert!(!tol("gpu", Equal, "h100", None).tolerates(&taint));
        assert!(tol("gpu", Exists, "", Some(TaintEffect::NoSchedule)).tolerates(&taint));
        assert!(!tol("gpu", Exists, "", Some(TaintEffect::NoExecute)).tolerates(&taint));
        assert!(tol("", Exists, "", None).tolerates(&taint));
        assert!(!tol("other", Exists, "", None).tolerates(&taint));
    }

    #[test]
    fn status_round_trip() {
        let s = WorkloadStatus {
            observed_generation: Some(2),
            replicas: 2,
            ready_replicas: 1,
            conditions: vec![],
            instances: vec![InstanceSummary {
                name: "web-0".into(),
                node: Some("n1".into()),
                phase: InstancePhase::Running,
                ready: true,
                restarts: 1,
                ip: Some("10.42.0.5".into()),
                ..Default::default()
            }],
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["readyReplicas"], 1);
        assert_eq!(v["instances"][0]["phase"], "Running");
        assert_eq!(serde_json::from_value::<WorkloadStatus>(v).unwrap(), s);
        assert_eq!(
            serde_json::from_value::<WorkloadStatus>(json!({})).unwrap(),
            WorkloadStatus::default()
        );
    }
}
