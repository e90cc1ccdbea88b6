//! The assignments reconciler: turns the [cache](crate::cache)'s view into
//! what each node is sent on its sync stream.
//!
//! One pass per batch of store revisions (a burst is coalesced): the
//! cluster-wide part every node shares (address → identity, compiled
//! policy, service backends, peers) is derived once, then each node's own
//! part (its instances and volumes). Both are published; a node whose part
//! did not change is not woken for it. The shared part is kept with a short
//! history of its changes, so a stream that announced
//! [`INCREMENTAL`](ironmesh_proto::assignment::INCREMENTAL) is sent only
//! what changed since its last message (one new instance costs each other
//! node an identity entry), and any other stream is sent whole assignments.
//!
//! This module only reads: identities are allocated by the workload
//! controller on the leader, never here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ironmesh_api::workload::MeshMode;
use ironmesh_api::Kind;
use ironmesh_proto::assignment::{rule_key, service_key};
use ironmesh_proto::v1::MeshMode as ProtoMeshMode;
use ironmesh_proto::v1::{
    Assignment, AssignmentDelta, GatewayAssignment, IdentityEntry, InstanceAssignment, PeerNode,
    PipelineTask, PolicyRule, ServiceEntry, VolumeAssignment,
};
use serde_json::Value;
use tokio::sync::watch;

use crate::cache::{Cache, View};
use crate::metrics::ControllerMetrics;
use crate::store::Revision;

/// How long a pass waits for more of a burst before it starts.
const COALESCE: Duration = Duration::from_millis(25);
/// Longest pause between passes while changes keep coming.
const PACE_MAX: Duration = Duration::from_secs(1);
/// Least time between two messages to one stream. Changes within it are
/// sent as one delta: while instances start across the cluster, every pass
/// changes the shared part, and a thousand streams each sent every pass
/// cost more than they carry. A change after a quiet spell goes at once.
const PACE: Duration = Duration::from_millis(200);
/// Shared-part changes kept for streams that are behind; a stream further
/// behind gets a whole assignment.
const HISTORY: usize = 256;

type RuleKey = (i32, u32, u32, u32, String, u32, u32);
type ServiceKey = (String, u32, String);

/// What every node shares.
#[derive(Debug, Default, Clone, PartialEq)]
struct SharedPart {
    /// By address.
    identities: BTreeMap<String, IdentityEntry>,
    rules: BTreeMap<RuleKey, PolicyRule>,
    ingress_enforced: Vec<u32>,
    egress_enforced: Vec<u32>,
    services: BTreeMap<ServiceKey, ServiceEntry>,
    peers: BTreeMap<String, PeerNode>,
}

/// One node's own part.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LocalPart {
    /// Shared with the pass memo: an unchanged instance is the same `Arc`.
    pub instances: Vec<Arc<InstanceAssignment>>,
    pub volumes: Vec<VolumeAssignment>,
    /// Deleted volumes whose data the node still holds.
    pub remove_volumes: Vec<String>,
    /// Gateways the node serves, with their routes.
    pub gateways: Vec<GatewayAssignment>,
}

/// Changes of the shared part; `None` removes the key.
#[derive(Debug, Default, Clone)]
struct SharedDelta {
    identities: BTreeMap<String, Option<IdentityEntry>>,
    rules: BTreeMap<RuleKey, Option<PolicyRule>>,
    enforcement_changed: bool,
    services: BTreeMap<ServiceKey, Option<ServiceEntry>>,
    peers: BTreeMap<String, Option<PeerNode>>,
}

fn diff_maps<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    out: &mut BTreeMap<K, Option<V>>,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.insert(k.clone(), Some(v.clone()));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.insert(k.clone(), None);
        }
    }
}

impl SharedDelta {
    fn between(old: &SharedPart, new: &SharedPart) -> SharedDelta {
        let mut d = SharedDelta::default();
        diff_maps(&old.identities, &new.identities, &mut d.identities);
        diff_maps(&old.rules, &new.rules, &mut d.rules);
        diff_maps(&old.services, &new.services, &mut d.services);
        diff_maps(&old.peers, &new.peers, &mut d.peers);
        d.enforcement_changed = old.ingress_enforced != new.ingress_enforced
            || old.egress_enforced != new.egress_enforced;
        d
    }

    /// `self` then `later`, as one delta.
    fn extend(&mut self, later: &SharedDelta) {
        self.identities
            .extend(later.identities.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.rules
            .extend(later.rules.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.services
            .extend(later.services.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.peers
            .extend(later.peers.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.enforcement_changed |= later.enforcement_changed;
    }
}

struct Published {
    revision: Revision,
    /// Bumped whenever the shared part changes.
    version: u64,
    shared: Arc<SharedPart>,
    /// `(version, delta from version - 1)`, oldest first.
    history: VecDeque<(u64, Arc<SharedDelta>)>,
    local: HashMap<String, Arc<LocalPart>>,
}

/// The published assignments, shared by the reconciler and every stream.
#[derive(Clone)]
pub struct Assignments {
    published: Arc<RwLock<Published>>,
    empty: Arc<LocalPart>,
    /// Bumped after every pass that published something.
    pass: watch::Sender<u64>,
    /// Passes so far and revision reached: for tests and metrics.
    computed: watch::Sender<Revision>,
    pace: Duration,
    /// The mesh mode of instances whose Workload sets none.
    mesh_default: MeshMode,
    /// Opens the TLS Secrets of gateway listeners.
    secret_seal: Option<Arc<crate::secret_seal::SecretSeal>>,
}

impl Default for Assignments {
    fn default() -> Self {
        Assignments {
            published: Arc::new(RwLock::new(Published {
                revision: 0,
                version: 0,
                shared: Arc::default(),
                history: VecDeque::new(),
                local: HashMap::new(),
            })),
            empty: Arc::default(),
            pass: watch::channel(0).0,
            computed: watch::channel(0).0,
            pace: PACE,
            mesh_default: MeshMode::Off,
            secret_seal: None,
        }
    }
}

/// One stream's place in the published assignments.
pub struct Subscription {
    assignments: Assignments,
    node: String,
    incremental: bool,
    wake: watch::Receiver<u64>,
    sent: Option<Sent>,
    last_sent: Option<tokio::time::Instant>,
}

struct Sent {
    revision: Revision,
    version: u64,
    local: Arc<LocalPart>,
}

impl Assignments {
    /// Assignments whose instances without a spec.mesh.mode get `mode`.
    pub fn with_mesh_default(mode: MeshMode) -> Assignments {
        Assignments {
            mesh_default: mode,
            ..Assignments::default()
        }
    }

    /// Gateway listeners with `issuer: Secret` get their certificate from
    /// Secrets opened with `seal`.
    pub fn with_secret_seal(
        mut self,
        seal: Option<Arc<crate::secret_seal::SecretSeal>>,
    ) -> Assignments {
        self.secret_seal = seal;
        self
    }

    /// Streams get at most one message per `pace`.
    pub fn with_pace(mut self, pace: Duration) -> Assignments {
        self.pace = pace;
        self
    }

    /// The revision the last pass computed.
    pub fn computed(&self) -> watch::Receiver<Revision> {
        self.computed.subscribe()
    }

    /// A stream's subscription; `incremental` if its agent applies deltas.
    pub fn subscribe(&self, node: &str, incremental: bool) -> Subscription {
        let mut wake = self.pass.subscribe();
        wake.mark_changed();
        Subscription {
            assignments: self.clone(),
            node: node.to_string(),
            incremental,
            wake,
            sent: None,
            last_sent: None,
        }
    }

    /// The whole assignment of `node` as of the last pass.
    pub fn whole(&self, node: &str) -> Assignment {
        let p = self.published.read().unwrap_or_else(|e| e.into_inner());
        let local = p.local.get(node).unwrap_or(&self.empty);
        whole(p.revision, &p.shared, local, node)
    }

    fn publish(&self, revision: Revision, shared: SharedPart, local: HashMap<String, LocalPart>) {
        let mut p = self.published.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        if *p.shared != shared {
            let delta = SharedDelta::between(&p.shared, &shared);
            p.version += 1;
            let v = p.version;
            p.history.push_back((v, Arc::new(delta)));
            while p.history.len() > HISTORY {
                p.history.pop_front();
            }
            p.shared = Arc::new(shared);
            changed = true;
        }
        let mut next: HashMap<String, Arc<LocalPart>> = HashMap::with_capacity(local.len());
        for (node, part) in local {
            match p.local.get(&node) {
                Some(old) if same_local(old, &part) => {
                    next.insert(node, old.clone());
                }
                _ => {
                    changed = true;
                    next.insert(node, Arc::new(part));
                }
            }
        }
        changed |= p.local.keys().any(|n| !next.contains_key(n));
        p.local = next;
        p.revision = revision;
        drop(p);
        if changed {
            self.pass.send_modify(|n| *n += 1);
        }
        self.computed.send_replace(revision);
    }
}

/// Equal parts; instances compare by pointer first (the memo hands out the
/// same `Arc` for an unchanged instance).
fn same_local(a: &LocalPart, b: &LocalPart) -> bool {
    a.volumes == b.volumes
        && a.remove_volumes == b.remove_volumes
        && a.gateways == b.gateways
        && a.instances.len() == b.instances.len()
        && a.instances
            .iter()
            .zip(&b.instances)
            .all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

fn whole(revision: Revision, shared: &SharedPart, local: &LocalPart, node: &str) -> Assignment {
    Assignment {
        revision,
        instances: local.instances.iter().map(|i| (**i).clone()).collect(),
        peers: shared
            .peers
            .values()
            .filter(|p| p.name != node)
            .cloned()
            .collect(),
        identities: shared.identities.values().cloned().collect(),
        policy_rules: shared.rules.values().cloned().collect(),
        ingress_enforced: shared.ingress_enforced.clone(),
        egress_enforced: shared.egress_enforced.clone(),
        services: shared.services.values().cloned().collect(),
        volumes: local.volumes.clone(),
        remove_volumes: local.remove_volumes.clone(),
        gateways: local.gateways.clone(),
        delta: None,
        more: false,
    }
}

impl Subscription {
    /// The next message for this stream: a whole assignment first, then
    /// (when something changed) a delta or a whole one.
    pub async fn next(&mut self) -> Assignment {
        loop {
            if self.wake.changed().await.is_err() {
                // The reconciler is gone; nothing more will change.
                std::future::pending::<()>().await;
            }
            if let Some(at) = self.last_sent {
                let due = at + self.assignments.pace;
                if due > tokio::time::Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
            }
            if let Some(a) = self.build() {
                self.last_sent = Some(tokio::time::Instant::now());
                return a;
            }
        }
    }

    fn build(&mut self) -> Option<Assignment> {
        let a = &self.assignments;
        let p = a.published.read().unwrap_or_else(|e| e.into_inner());
        if p.revision == 0 && p.version == 0 && p.local.is_empty() {
            // Nothing computed yet.
            return None;
        }
        let local = p.local.get(&self.node).unwrap_or(&a.empty).clone();
        let msg = match &self.sent {
            Some(s) if s.version == p.version && Arc::ptr_eq(&s.local, &local) => return None,
            Some(s) if self.incremental => {
                let first = p.history.front().map(|(v, _)| *v).unwrap_or(u64::MAX);
                if s.version != p.version && first > s.version + 1 {
                    whole(p.revision, &p.shared, &local, &self.node)
                } else {
                    let mut d = SharedDelta::default();
                    for (_, step) in p.history.iter().filter(|(v, _)| *v > s.version) {
                        d.extend(step);
                    }
                    delta_message(
                        p.revision,
                        s.revision,
                        &d,
                        &p.shared,
                        (!Arc::ptr_eq(&s.local, &local)).then_some(&*local),
                        &self.node,
                    )
                }
            }
            _ => whole(p.revision, &p.shared, &local, &self.node),
        };
        self.sent = Some(Sent {
            revision: p.revision,
            version: p.version,
            local,
        });
        Some(msg)
    }
}

fn delta_message(
    revision: Revision,
    base: Revision,
    d: &SharedDelta,
    shared: &SharedPart,
    local: Option<&LocalPart>,
    node: &str,
) -> Assignment {
    let mut delta = AssignmentDelta {
        base_revision: base,
        local_changed: local.is_some(),
        enforcement_changed: d.enforcement_changed,
        ..Default::default()
    };
    for (ip, id) in &d.identities {
        match id {
            Some(entry) => delta.identities_set.push(entry.clone()),
            None => delta.identities_removed.push(ip.clone()),
        }
    }
    for (k, r) in &d.rules {
        match r {
            Some(r) => delta.policy_rules_added.push(r.clone()),
            None => delta.policy_rules_removed.push(PolicyRule {
                direction: k.0,
                src_identity: k.1,
                dst_identity: k.2,
                port: k.3,
                protocol: k.4.clone(),
                rate_per_second: k.5,
                burst: k.6,
            }),
        }
    }
    for (k, s) in &d.services {
        match s {
            Some(s) => delta.services_set.push(s.clone()),
            None => delta.services_removed.push(ServiceEntry {
                name: k.0.clone(),
                port: k.1,
                protocol: k.2.clone(),
                ..Default::default()
            }),
        }
    }
    for (name, p) in d.peers.iter().filter(|(n, _)| n.as_str() != node) {
        match p {
            Some(p) => delta.peers_set.push(p.clone()),
            None => delta.peers_removed.push(name.clone()),
        }
    }
    let (instances, volumes, remove_volumes, gateways) = local
        .map(|l| {
            (
                l.instances.iter().map(|i| (**i).clone()).collect(),
                l.volumes.clone(),
                l.remove_volumes.clone(),
                l.gateways.clone(),
            )
        })
        .unwrap_or_default();
    let (ingress_enforced, egress_enforced) = if d.enforcement_changed {
        (
            shared.ingress_enforced.clone(),
            shared.egress_enforced.clone(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Assignment {
        revision,
        instances,
        volumes,
        remove_volumes,
        gateways,
        ingress_enforced,
        egress_enforced,
        delta: Some(delta),
        ..Default::default()
    }
}

/// What a pass needs of one instance, read out of its object once per
/// revision of it.
struct Facts {
    revision: Revision,
    ip: Option<String>,
    identity: Option<u32>,
    ready: bool,
    workload: String,
    node: Option<String>,
    image: String,
    /// spec.template.mesh.mode, if the Workload sets one.
    mesh: Option<MeshMode>,
    /// The assignment, and the image digest and volumes stamp it was built
    /// with.
    assignment: Option<(Option<String>, u64, Arc<InstanceAssignment>)>,
}

/// Per-instance work kept between passes: an instance whose object, image
/// digest and volumes did not change is not decoded again.
#[derive(Default)]
struct Memo {
    instances: HashMap<String, Facts>,
    certs: crate::gateways::CertMemo,
}

fn facts_of(o: &crate::resources::StoredObject) -> Facts {
    let v = &o.object;
    let spec = v.get("spec");
    let status = v.get("status");
    let s = |parent: Option<&Value>, k: &str| {
        parent
            .and_then(|p| p.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Facts {
        revision: o.revision,
        ip: s(status, "ip"),
        identity: spec
            .and_then(|p| p.get("identity"))
            .and_then(Value::as_u64)
            .map(|i| i as u32),
        ready: status.and_then(|p| p.get("ready")).and_then(Value::as_bool) == Some(true),
        workload: s(spec, "workload").unwrap_or_default(),
        node: s(spec, "node"),
        image: spec
            .and_then(|p| p.get("template"))
            .and_then(|t| t.get("image"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        mesh: spec
            .and_then(|p| p.pointer("/template/mesh/mode"))
            .and_then(Value::as_str)
            .and_then(|m| m.parse().ok()),
        assignment: None,
    }
}

/// Runs passes until `shutdown`.
pub async fn run(
    assignments: Assignments,
    cache: Cache,
    ca: Option<Arc<crate::pki::ClusterCa>>,
    metrics: Arc<ControllerMetrics>,
    shutdown: ironmesh_process::Shutdown,
) {
    let mut changes = cache.subscribe();
    changes.mark_changed();
    let mut memo = Memo {
        certs: crate::gateways::CertMemo::with_seal(assignments.secret_seal.clone()),
        ..Memo::default()
    };
    let mut last_took = Duration::ZERO;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = changes.changed() => if r.is_err() { return },
        }
        // Let the rest of a burst arrive; it is all one pass. A pass that
        // took long waits longer, so passes never take more than about a
        // third of a core however fast the store changes.
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep((last_took * 2).clamp(COALESCE, PACE_MAX)) => {}
        }
        changes.borrow_and_update();
        let started = std::time::Instant::now();
        let (revision, shared, local) = {
            let view = cache.read();
            let (shared, local) =
                compute(&view, ca.as_deref(), &mut memo, assignments.mesh_default);
            (view.revision, shared, local)
        };
        assignments.publish(revision, shared, local);
        last_took = started.elapsed();
        metrics.assignment_passes.inc();
        tracing::debug!(
            revision,
            took_ms = started.elapsed().as_millis() as u64,
            "assignments computed"
        );
    }
}

fn compute(
    view: &View,
    ca: Option<&crate::pki::ClusterCa>,
    memo: &mut Memo,
    mesh_default: MeshMode,
) -> (SharedPart, HashMap<String, LocalPart>) {
    let volumes_list: Vec<crate::resources::StoredObject> = view
        .objects(Kind::Volume)
        .values()
        .map(|o| (**o).clone())
        .collect();
    // Volumes are few; any change to one re-derives every instance's mounts.
    let volumes_stamp = volumes_list
        .iter()
        .map(|v| v.revision)
        .max()
        .unwrap_or(0)
        .wrapping_mul(31)
        .wrapping_add(volumes_list.len() as u64);
    let volumes = crate::volumes::VolumeIndex::from_objects(&volumes_list);

    // Endpoints for the policy compiler: every workload whose label set has
    // an identity (allocated by the workload controller).
    let mut endpoints = Vec::new();
    let mut labels_of_workload = HashMap::new();
    for w in view.objects(Kind::Workload).values() {
        let labels = crate::resources::labels_of(&w.object);
        if let Some(identity) = view.identity(&crate::workload_identities::canonical(&labels)) {
            endpoints.push(crate::policy::Endpoint {
                labels: labels.clone(),
                identity,
            });
        }
        labels_of_workload.insert(w.name.clone(), labels);
    }

    let mut shared = SharedPart::default();
    let mut ready = Vec::new();
    let mut local: HashMap<String, LocalPart> = HashMap::new();
    let mut digests: HashMap<String, Option<String>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for i in view.objects(Kind::Instance).values() {
        seen.insert(i.name.as_str());
        // Looked up twice rather than through the entry API, which would
        // clone every name on every pass.
        if memo
            .instances
            .get(&i.name)
            .is_none_or(|f| f.revision != i.revision)
        {
            memo.instances.insert(i.name.clone(), facts_of(i));
        }
        let Some(facts) = memo.instances.get_mut(&i.name) else {
            continue;
        };
        if let (Some(ip), Some(id)) = (&facts.ip, facts.identity) {
            let mesh = match facts.mesh.unwrap_or(mesh_default) {
                MeshMode::Off => ProtoMeshMode::Off,
                MeshMode::Permissive => ProtoMeshMode::Permissive,
                MeshMode::Strict => ProtoMeshMode::Strict,
            };
            shared.identities.insert(
                ip.clone(),
                IdentityEntry {
                    ip: ip.clone(),
                    identity: id,
                    workload: facts.workload.clone(),
                    mesh: mesh as i32,
                },
            );
            if let (true, Ok(ip), Some(labels)) = (
                facts.ready,
                ip.parse(),
                labels_of_workload.get(&facts.workload),
            ) {
                ready.push(crate::services::ReadyInstance {
                    ip,
                    labels: labels.clone(),
                });
            }
        }
        let Some(node) = facts.node.clone() else {
            continue;
        };
        let digest = digests
            .entry(facts.image.clone())
            .or_insert_with(|| {
                let name = crate::images::normalize_name(&facts.image).ok()?;
                view.image_digest(&name).map(str::to_string)
            })
            .clone();
        let assignment = match &facts.assignment {
            Some((d, vs, a)) if *d == digest && *vs == volumes_stamp => a.clone(),
            _ => {
                let Some(template) = i.object.pointer("/spec/template") else {
                    continue;
                };
                let a = Arc::new(instance_assignment(
                    &i.name, &i.object, template, &node, &digest, &volumes,
                ));
                facts.assignment = Some((digest, volumes_stamp, a.clone()));
                a
            }
        };
        local.entry(node).or_default().instances.push(assignment);
    }
    memo.instances
        .retain(|name, _| seen.contains(name.as_str()));
    for n in view.objects(Kind::Node).values() {
        let bound = volumes.bound_to(&n.name);
        if !bound.is_empty() {
            local.entry(n.name.clone()).or_default().volumes = bound;
        }
        let removals: Vec<String> = view.removals(&n.name).cloned().collect();
        if !removals.is_empty() {
            local.entry(n.name.clone()).or_default().remove_volumes = removals;
        }
        let s = |p: &str| {
            n.object
                .pointer(p)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        if let (Some(pod_cidr), Some(node_ip)) = (s("/status/podCIDR"), s("/status/internalIP")) {
            shared.peers.insert(
                n.name.clone(),
                PeerNode {
                    name: n.name.clone(),
                    pod_cidr,
                    node_ip,
                },
            );
        }
    }
    for (node, gateways) in crate::gateways::node_gateways(view, ca, &mut memo.certs) {
        local.entry(node).or_default().gateways = gateways;
    }
    // Instances come in name order (the view's order); keep it explicit.
    for part in local.values_mut() {
        part.instances.sort_by(|a, b| a.name.cmp(&b.name));
    }

    let specs: Vec<ironmesh_api::policy::PolicySpec> = view
        .objects(Kind::Policy)
        .values()
        .filter_map(|p| Some(p.typed::<ironmesh_api::object::Policy>().ok()?.spec))
        .collect();
    let compiled = crate::policy::compile(&specs, &endpoints);
    shared.rules = compiled
        .rules
        .into_iter()
        .map(|r| (rule_key(&r), r))
        .collect();
    shared.ingress_enforced = compiled.ingress_enforced;
    shared.egress_enforced = compiled.egress_enforced;
    let services: Vec<crate::resources::StoredObject> = view
        .objects(Kind::Service)
        .values()
        .map(|o| (**o).clone())
        .collect();
    shared.services = crate::services::endpoints(&services, &ready)
        .into_iter()
        .map(|s| (service_key(&s), s))
        .collect();
    (shared, local)
}

fn instance_assignment(
    name: &str,
    o: &Value,
    template: &Value,
    node: &str,
    digest: &Option<String>,
    volumes: &crate::volumes::VolumeIndex,
) -> InstanceAssignment {
    InstanceAssignment {
        name: name.to_string(),
        workload: o
            .pointer("/spec/workload")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        spec_generation: o
            .pointer("/spec/workloadGeneration")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        spec_json: template.to_string(),
        image_digest: digest.clone().unwrap_or_default(),
        volumes: serde_json::from_value::<ironmesh_api::workload::WorkloadSpec>(template.clone())
            .map(|spec| volumes.instance_volumes(&spec, node))
            .unwrap_or_default(),
        task: o
            .pointer("/spec/task")
            .and_then(|t| serde_json::from_value::<ironmesh_api::instance::TaskRef>(t.clone()).ok())
            .map(|t| PipelineTask {
                run: t.run,
                step: t.step,
                index: t.index,
                worker: t.worker,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> PeerNode {
        PeerNode {
            name: name.into(),
            pod_cidr: "10.244.1.0/24".into(),
            node_ip: "192.0.2.9".into(),
        }
    }

    fn shared(ids: &[(&str, u32)], peers: &[&str]) -> SharedPart {
        SharedPart {
            identities: ids
                .iter()
                .map(|(ip, id)| {
                    (
                        ip.to_string(),
                        IdentityEntry {
                            ip: ip.to_string(),
                            identity: *id,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            peers: peers.iter().map(|p| (p.to_string(), peer(p))).collect(),
            ..Default::default()
        }
    }

    fn local(names: &[&str]) -> LocalPart {
        LocalPart {
            instances: names
                .iter()
                .map(|n| {
                    Arc::new(InstanceAssignment {
                        name: n.to_string(),
                        ..Default::default()
                    })
                })
                .collect(),
            volumes: Vec::new(),
            remove_volumes: Vec::new(),
            gateways: Vec::new(),
        }
    }

    fn now<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
        futures::FutureExt::now_or_never(f)
    }

    /// The fold of every message an incremental stream gets equals the
    /// whole assignment at each step, and an unchanged node gets nothing.
    #[test]
    fn deltas_fold_into_the_whole_assignment_and_unchanged_nodes_get_nothing() {
        let a = Assignments::default().with_pace(Duration::ZERO);
        let mut inc = a.subscribe("n1", true);
        let mut full = a.subscribe("n1", false);
        let mut other = a.subscribe("n2", true);
        assert!(now(inc.next()).is_none(), "nothing before the first pass");

        let mut locals = HashMap::from([("n1".to_string(), local(&["web-a"]))]);
        a.publish(
            10,
            shared(&[("10.0.0.1", 300)], &["n1", "n2"]),
            locals.clone(),
        );
        let mut folded = None;
        let first = now(inc.next()).unwrap();
        assert!(first.delta.is_none(), "a stream starts whole");
        ironmesh_proto::assignment::apply(&mut folded, first).unwrap();
        assert_eq!(folded.as_ref().unwrap(), &a.whole("n1"));
        assert_eq!(
            folded.as_ref().unwrap().peers,
            vec![peer("n2")],
            "no self peer"
        );
        assert!(now(full.next()).unwrap().delta.is_none());
        let mut other_fold = None;
        ironmesh_proto::assignment::apply(&mut other_fold, now(other.next()).unwrap()).unwrap();

        // n1's own part changes and an identity is added: n1 gets both, n2
        // only the identity.
        locals.insert("n1".into(), local(&["web-a", "web-b"]));
        a.publish(
            14,
            shared(&[("10.0.0.1", 300), ("10.0.0.2", 300)], &["n1", "n2"]),
            locals.clone(),
        );
        let d = now(inc.next()).unwrap();
        let delta = d.delta.clone().unwrap();
        assert_eq!(delta.base_revision, 10);
        assert!(delta.local_changed);
        assert_eq!(delta.identities_set.len(), 1);
        ironmesh_proto::assignment::apply(&mut folded, d).unwrap();
        assert_eq!(folded.as_ref().unwrap(), &a.whole("n1"));
        let o = now(other.next()).unwrap();
        assert!(!o.delta.as_ref().unwrap().local_changed);
        assert!(o.instances.is_empty());
        ironmesh_proto::assignment::apply(&mut other_fold, o).unwrap();
        assert_eq!(other_fold.as_ref().unwrap(), &a.whole("n2"));
        assert!(
            now(full.next()).unwrap().delta.is_none(),
            "old agents get whole ones"
        );

        // A pass that changes nothing wakes nobody.
        a.publish(
            15,
            shared(&[("10.0.0.1", 300), ("10.0.0.2", 300)], &["n1", "n2"]),
            locals.clone(),
        );
        assert!(now(inc.next()).is_none());
        assert!(now(other.next()).is_none());

        // Removal of an identity and of a peer.
        a.publish(20, shared(&[("10.0.0.2", 300)], &["n1"]), locals);
        let o = now(other.next()).unwrap();
        ironmesh_proto::assignment::apply(&mut other_fold, o).unwrap();
        assert_eq!(other_fold.as_ref().unwrap(), &a.whole("n2"));
        let d = now(inc.next()).unwrap();
        ironmesh_proto::assignment::apply(&mut folded, d).unwrap();
        assert_eq!(folded.as_ref().unwrap(), &a.whole("n1"));
    }

    /// A stream that falls further behind than the history gets a whole
    /// assignment, which still folds.
    #[test]
    fn a_stream_behind_the_history_gets_a_whole_assignment() {
        let a = Assignments::default().with_pace(Duration::ZERO);
        let mut s = a.subscribe("n1", true);
        a.publish(1, shared(&[], &[]), HashMap::new());
        let mut folded = None;
        if let Some(m) = now(s.next()) {
            ironmesh_proto::assignment::apply(&mut folded, m).unwrap();
        }
        for i in 0..(HISTORY as u32 + 10) {
            a.publish(
                2 + u64::from(i),
                shared(&[(&format!("10.0.{}.{}", i / 250, i % 250), 300)], &[]),
                HashMap::new(),
            );
        }
        let m = now(s.next()).unwrap();
        assert!(m.delta.is_none());
        ironmesh_proto::assignment::apply(&mut folded, m).unwrap();
        assert_eq!(folded.unwrap(), a.whole("n1"));
    }

    /// The check: a burst of 1,000 writes, each its own store
    /// transaction, reaches every node as a handful of coalesced messages
    /// (O(nodes) in all), not one per write (O(nodes x writes)).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_writes_costs_each_node_a_few_messages_not_one_per_write() {
        use crate::resources::{Change, Resources};
        use serde_json::json;
        const NODES: usize = 20;
        const WRITES: usize = 1000;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(
            crate::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(),
        );
        let cache = Cache::start(store.clone()).await.unwrap();
        let res = Resources::new(store).with_cache(cache.clone());
        let nodes: Vec<String> = (0..NODES).map(|n| format!("n{n}")).collect();
        res.update_many(Kind::Node, &nodes, |name, _| {
            let n: usize = name[1..].parse().unwrap();
            Change::Put(json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node",
                "metadata": {"name": name}, "spec": {},
                "status": {"podCIDR": format!("10.244.{n}.0/24"), "internalIP": format!("192.0.2.{}", n + 1)}}))
        })
        .await
        .unwrap();
        let instances: Vec<String> = (0..WRITES).map(|i| format!("web-{i}")).collect();
        res.update_many(Kind::Instance, &instances, |name, _| {
            let i: usize = name[4..].parse().unwrap();
            Change::Put(json!({"apiVersion": "ironmesh.dev/v1", "kind": "Instance",
                "metadata": {"name": name},
                "spec": {"workload": "web", "workloadGeneration": 1, "node": format!("n{}", i % NODES),
                         "identity": 300, "template": {"image": "web:1"}},
                "status": {"phase": "Pending"}}))
        })
        .await
        .unwrap();

        let a = Assignments::default();
        let registry = &mut prometheus_client::registry::Registry::default();
        let metrics = Arc::new(ControllerMetrics::new(registry));
        let (shutdown, stop) = ironmesh_process::Shutdown::manual();
        tokio::spawn(run(
            a.clone(),
            cache.clone(),
            None,
            metrics.clone(),
            shutdown,
        ));
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (folded_tx, mut folded_rx) = tokio::sync::mpsc::unbounded_channel();
        for (idx, n) in nodes.iter().enumerate() {
            let mut sub = a.subscribe(n, true);
            let (received, folded_tx) = (received.clone(), folded_tx.clone());
            tokio::spawn(async move {
                let mut folded = None;
                loop {
                    let m = sub.next().await;
                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    ironmesh_proto::assignment::apply(&mut folded, m).unwrap();
                    let ids = folded
                        .as_ref()
                        .map_or(0, |f: &Assignment| f.identities.len());
                    if folded_tx.send((idx, ids)).is_err() {
                        return;
                    }
                }
            });
        }
        async fn wait(want: usize, rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, usize)>) {
            let mut done = std::collections::HashSet::new();
            tokio::time::timeout(Duration::from_secs(60), async {
                while done.len() < NODES {
                    let (node, ids) = rx.recv().await.unwrap();
                    if ids >= want {
                        done.insert(node);
                    }
                }
            })
            .await
            .expect("every node sees the writes");
        }
        wait(0, &mut folded_rx).await;
        let before = received.load(std::sync::atomic::Ordering::Relaxed);
        let passes_before = metrics.assignment_passes.get();

        // The burst: every instance gets its address, one transaction each.
        for (i, name) in instances.iter().enumerate() {
            res.update(Kind::Instance, name, |cur| {
                let mut o = cur?.clone();
                o["status"] = json!({"phase": "Running", "ready": true,
                    "ip": format!("10.244.{}.{}", i % NODES, 2 + i / NODES)});
                Some(o)
            })
            .await
            .unwrap();
        }
        wait(WRITES, &mut folded_rx).await;
        let messages = received.load(std::sync::atomic::Ordering::Relaxed) - before;
        let passes = metrics.assignment_passes.get() - passes_before;
        println!("{WRITES} writes -> {passes} passes -> {messages} messages to {NODES} nodes");
        assert!(
            messages <= NODES * (passes as usize + 1),
            "one message per node per pass at most: {messages} for {passes} passes"
        );
        assert!(
            messages * 10 <= NODES * WRITES,
            "{messages} messages for {WRITES} writes to {NODES} nodes: not coalesced"
        );
        let _ = stop.send(true);
    }
}
