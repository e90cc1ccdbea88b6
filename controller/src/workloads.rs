//! The workload controller: keeps exactly `replicas` Instances per Workload,
//! binds new ones to nodes through the [`scheduler`](crate::scheduler),
//! replaces instances of an older workload generation, removes instances
//! whose workload is gone, and summarises instance status into the
//! Workload's status.
//!
//! It runs after every store change (coalesced) and on a slow tick, so an
//! instance that did not fit is retried when a node joins or frees room.
//!
//! Failure handling lives here too: when a node's Ready condition has been
//! False for longer than the eviction delay, its instances that mount no
//! volume there are deleted (the replica count then creates replacements on
//! Ready nodes, and the node's next assignment no longer lists them, so its
//! agent removes them when it returns); instances whose volume lives there
//! stay bound and Pending with reason `NodeNotReady`. Instances on a node
//! with a `NoExecute` taint they do not tolerate are evicted the same way.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ironmesh_api::instance::{InstanceSpec, InstanceStatus, WORKLOAD_LABEL};
use ironmesh_api::object::{Instance, Node, Workload};
use ironmesh_api::selector::LabelSelector;
use ironmesh_api::workload::{InstancePhase, InstanceSummary, WorkloadSpec, WorkloadStatus};
use ironmesh_api::{Condition, ConditionStatus, Kind};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::eviction::{Bound, NodeFacts};
use crate::liveness::ready_status;
use crate::resources::{ResourceError, Resources, StoredObject};
use crate::scheduler::{Cluster, NodeCapacity, Request, Reserve};

/// Longest wait between passes when nothing changes: every change that
/// matters (nodes, instances, workloads, volumes) wakes a pass itself, and
/// evictions ask for theirs; this only bounds what a missed wake-up costs.
const RESYNC: Duration = Duration::from_secs(10);
/// Wait after a failed pass, and before reopening a broken watch.
const RETRY: Duration = Duration::from_secs(2);

/// What the operator configures about placement and eviction.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Kept back on every node (`--reserve-cpu`, `--reserve-memory`).
    pub reserve: Reserve,
    /// How long a node may be NotReady before its instances move
    /// (`--eviction-delay`).
    pub eviction_delay: Duration,
    /// Share of nodes (0–1) that may be NotReady before eviction pauses
    /// (`--eviction-unhealthy-threshold`).
    pub unhealthy_threshold: f64,
    /// Nodes emptied per second at most (`--eviction-rate`).
    pub eviction_rate: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            reserve: Reserve::default(),
            eviction_delay: Duration::from_secs(5),
            unhealthy_threshold: 0.5,
            eviction_rate: 1.0,
        }
    }
}

/// Store key of the eviction guard's state, for `imctl get nodes` on any
/// controller: `{"paused": bool, "message": "..."}`.
pub const EVICTION_STATUS_KEY: &str = "/cluster/eviction";

/// Eviction state kept between passes.
struct EvictionState {
    rate: crate::eviction::RateLimit,
    /// What [`EVICTION_STATUS_KEY`] holds, once known.
    published: Option<Option<String>>,
}

/// Runs passes until `shutdown`.
pub async fn run(
    resources: Resources,
    metrics: std::sync::Arc<crate::metrics::ControllerMetrics>,
    settings: Settings,
    shutdown: ironmesh_process::Shutdown,
) {
    let res = &resources;
    let (metrics, settings) = (&metrics, &settings);
    let memo = &std::sync::Mutex::new(Memo::default());
    let eviction = &tokio::sync::Mutex::new(EvictionState {
        rate: crate::eviction::RateLimit::new(settings.eviction_rate),
        published: None,
    });
    crate::pass_loop::run(res, "workloads", RETRY, shutdown, || async move {
        match reconcile_with(res, settings, memo, eviction, metrics).await {
            Ok(counts) => {
                counts.publish(metrics);
                counts.next_eviction.map_or(RESYNC, |due| RESYNC.min(due))
            }
            Err(e) => {
                tracing::warn!(error = %e, "workload pass failed");
                RETRY
            }
        }
    })
    .await;
}

/// A Workload as the controller needs it.
struct WorkloadView {
    name: String,
    generation: u64,
    spec: WorkloadSpec,
    labels: BTreeMap<String, String>,
    /// The stored status, to skip writing an unchanged one.
    status: Option<WorkloadStatus>,
}

/// An Instance as the controller needs it.
#[derive(Clone)]
struct InstanceView {
    name: String,
    spec: InstanceSpec,
    status: InstanceStatus,
    created: String,
    /// [`fingerprint`] of its template, computed once per decode.
    template: u64,
}

/// What a workload spec runs, as a hash: equal for specs that differ only
/// in replicas. Compared for every instance on every pass, so it must not
/// clone or walk the spec each time.
fn fingerprint(spec: &WorkloadSpec) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut v = serde_json::to_value(spec).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("replicas");
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

fn request_of(spec: &WorkloadSpec) -> Request {
    Request {
        cpu_millis: spec.resources.cpu_millis().unwrap_or(0),
        memory_bytes: spec.resources.memory_bytes().unwrap_or(0),
    }
}

/// The platforms of each image (as workloads name it) that is an index;
/// images not in the map are single-platform or not pushed, and may run on
/// any node. From the cache, or from the store when the cache is behind.
async fn image_platforms(
    resources: &Resources,
    images: std::collections::BTreeSet<&str>,
) -> HashMap<String, Vec<ironmesh_oci::Platform>> {
    let mut out = HashMap::new();
    let named: Vec<(&str, String)> = images
        .into_iter()
        .filter_map(|i| Some((i, crate::images::normalize_name(i).ok()?)))
        .collect();
    if let Some(cache) = resources.cache().await {
        let v = cache.read();
        for (image, name) in &named {
            let p = v.image_platforms(name);
            if !p.is_empty() {
                out.insert(image.to_string(), p.to_vec());
            }
        }
        return out;
    }
    #[derive(serde::Deserialize)]
    struct Record {
        #[serde(default)]
        platforms: Vec<ironmesh_oci::Platform>,
    }
    for (image, name) in &named {
        let key = format!("/images/{name}");
        let Ok(Some(kv)) = resources.store().get(&key).await else {
            continue;
        };
        if let Ok(r) = serde_json::from_slice::<Record>(&kv.value) {
            if !r.platforms.is_empty() {
                out.insert(image.to_string(), r.platforms);
            }
        }
    }
    out
}

fn node_capacity(o: &StoredObject) -> NodeCapacity {
    let node = o.typed::<Node>().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "unreadable node; nothing is placed there");
        Node::new(Kind::Node, o.name.clone(), Default::default())
    });
    let status = node.status.unwrap_or_default();
    NodeCapacity {
        name: o.name.clone(),
        ready: ready_status(&o.object) == Some("True"),
        unschedulable: node.spec.unschedulable,
        labels: node.metadata.labels,
        taints: node.spec.taints,
        architecture: ironmesh_oci::oci_architecture(&status.node_info.arch).to_string(),
        cpu_millis: ironmesh_api::quantity::parse_cpu_millis(&status.allocatable.cpu).unwrap_or(0),
        memory_bytes: ironmesh_api::quantity::parse_bytes(&status.allocatable.memory).unwrap_or(0),
    }
}

fn instance_view(o: &StoredObject) -> Option<InstanceView> {
    let i: Instance = match o.typed() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(instance = %o.name, error = %e, "unreadable instance");
            return None;
        }
    };
    Some(InstanceView {
        name: o.name.clone(),
        template: fingerprint(&i.spec.template),
        spec: i.spec,
        status: i.status.unwrap_or_default(),
        created: i.metadata.creation_timestamp.unwrap_or_default(),
    })
}

/// A fresh instance name: `<workload>-<5 random letters and digits>`.
fn instance_name(workload: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let base: String = workload.chars().take(57).collect();
    format!("{}-{suffix}", base.trim_end_matches('-'))
}

/// Instance counts seen by a pass (before its own changes).
#[derive(Debug, Default)]
pub struct PassCounts {
    pub by_phase: BTreeMap<&'static str, i64>,
    pub unschedulable: i64,
    /// When the next NotReady node becomes due for eviction.
    pub next_eviction: Option<Duration>,
}

impl PassCounts {
    fn publish(&self, metrics: &crate::metrics::ControllerMetrics) {
        for phase in ["Pending", "Running", "Succeeded", "Failed", "Unknown"] {
            metrics
                .instances
                .get_or_create(&crate::metrics::PhaseLabel {
                    phase: phase.to_string(),
                })
                .set(self.by_phase.get(phase).copied().unwrap_or(0));
        }
        metrics.unschedulable.set(self.unschedulable);
    }
}

fn phase_name(p: InstancePhase) -> &'static str {
    match p {
        InstancePhase::Pending => "Pending",
        InstancePhase::Running => "Running",
        InstancePhase::Succeeded => "Succeeded",
        InstancePhase::Failed => "Failed",
        InstancePhase::Unknown => "Unknown",
    }
}

/// Writes the guard's state to [`EVICTION_STATUS_KEY`] (only on change).
async fn publish_eviction_status(
    resources: &Resources,
    why: Option<&str>,
) -> Result<(), ResourceError> {
    let value = serde_json::to_vec(&json!({"paused": why.is_some(), "message": why.unwrap_or("")}))
        .unwrap_or_default();
    resources
        .store()
        .txn(crate::store::Txn {
            compares: vec![],
            ops: vec![crate::store::Op::Put {
                key: EVICTION_STATUS_KEY.to_string(),
                value,
            }],
        })
        .await?;
    Ok(())
}

/// Decoded instances kept between passes, by name with the revision they
/// were decoded at: a pass decodes only what changed.
#[derive(Default)]
pub struct Memo {
    instances: HashMap<String, (crate::store::Revision, Option<std::sync::Arc<InstanceView>>)>,
}

impl Memo {
    fn views(
        &mut self,
        objects: &[std::sync::Arc<StoredObject>],
    ) -> Vec<std::sync::Arc<InstanceView>> {
        let mut seen = std::collections::HashSet::with_capacity(objects.len());
        let mut out = Vec::with_capacity(objects.len());
        for o in objects {
            seen.insert(o.name.as_str());
            let view = match self.instances.get(&o.name) {
                Some((rev, v)) if *rev == o.revision => v.clone(),
                _ => {
                    let v = instance_view(o).map(std::sync::Arc::new);
                    self.instances
                        .insert(o.name.clone(), (o.revision, v.clone()));
                    v
                }
            };
            out.extend(view);
        }
        self.instances
            .retain(|name, _| seen.contains(name.as_str()));
        out
    }
}

/// How many instances a Workload's status lists by name (the rest are
/// counted; `imctl get instances` lists them all).
pub const STATUS_INSTANCES_MAX: usize = 100;

/// One pass over all workloads.
pub async fn reconcile(
    resources: &Resources,
    settings: &Settings,
) -> Result<PassCounts, ResourceError> {
    let eviction = tokio::sync::Mutex::new(EvictionState {
        rate: crate::eviction::RateLimit::new(settings.eviction_rate),
        published: None,
    });
    let metrics = crate::metrics::ControllerMetrics::new(&mut Default::default());
    reconcile_with(
        resources,
        settings,
        &std::sync::Mutex::new(Memo::default()),
        &eviction,
        &metrics,
    )
    .await
}

async fn reconcile_with(
    resources: &Resources,
    settings: &Settings,
    memo: &std::sync::Mutex<Memo>,
    eviction: &tokio::sync::Mutex<EvictionState>,
    metrics: &crate::metrics::ControllerMetrics,
) -> Result<PassCounts, ResourceError> {
    let all = LabelSelector::default();
    let (workloads, nodes, instance_objects) = match resources.cache().await {
        Some(cache) => {
            let v = cache.read();
            let list = |k: Kind| -> Vec<std::sync::Arc<StoredObject>> {
                v.objects(k).values().cloned().collect()
            };
            (list(Kind::Workload), list(Kind::Node), list(Kind::Instance))
        }
        None => {
            let arcs = |l: Vec<StoredObject>| -> Vec<std::sync::Arc<StoredObject>> {
                l.into_iter().map(std::sync::Arc::new).collect()
            };
            (
                arcs(resources.list(Kind::Workload, &all).await?.0),
                arcs(resources.list(Kind::Node, &all).await?.0),
                arcs(resources.list(Kind::Instance, &all).await?.0),
            )
        }
    };
    let workloads: Vec<WorkloadView> = workloads
        .iter()
        .filter_map(|o| {
            let w: Workload = o.typed().ok()?;
            Some(WorkloadView {
                name: o.name.clone(),
                generation: w.generation(),
                labels: w.metadata.labels,
                spec: w.spec,
                status: w.status,
            })
        })
        .collect();
    let mut instances: Vec<std::sync::Arc<InstanceView>> = memo
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .views(&instance_objects);
    drop(instance_objects);
    let mut counts = PassCounts::default();
    let volumes = crate::volumes::VolumeIndex::load(resources).await?;
    {
        let facts: Vec<NodeFacts> = nodes.iter().map(|n| NodeFacts::of(n)).collect();
        let bound: Vec<Bound<'_>> = instances
            .iter()
            .filter_map(|i| {
                Some(Bound {
                    name: &i.name,
                    node: i.spec.node.as_deref()?,
                    template: &i.spec.template,
                })
            })
            .collect();
        let why = crate::eviction::paused(&facts, settings.unhealthy_threshold);
        let mut state = eviction.lock().await;
        let budget = state.rate.available(std::time::Instant::now());
        let plan = crate::eviction::plan_guarded(
            &facts,
            &bound,
            &volumes,
            settings.eviction_delay,
            std::time::SystemTime::now(),
            why.as_deref(),
            budget,
        );
        state.rate.spend(plan.evicted_nodes);
        counts.next_eviction = plan.next;
        if plan.rate_limited > 0 {
            tracing::info!(
                nodes = plan.rate_limited,
                "NotReady nodes wait for eviction (--eviction-rate)"
            );
            let wait = state.rate.wait().max(Duration::from_millis(100));
            counts.next_eviction = Some(counts.next_eviction.map_or(wait, |n| n.min(wait)));
        }
        metrics.eviction_paused.set(i64::from(why.is_some()));
        if state.published.as_ref() != Some(&why) {
            publish_eviction_status(resources, why.as_deref()).await?;
            match &why {
                Some(w) => tracing::warn!(reason = %w, "eviction paused"),
                None if state.published.is_some() => tracing::info!("eviction resumed"),
                None => {}
            }
            state.published = Some(why);
        }
        drop(state);
        let deleted = crate::eviction::apply(resources, &plan.actions).await?;
        metrics.evictions.inc_by(deleted.len() as u64);
        // Replacements for the evicted are created below, in this pass.
        instances.retain(|i| !deleted.contains(&i.name));
    }
    for i in &instances {
        *counts
            .by_phase
            .entry(phase_name(i.status.phase))
            .or_default() += 1;
        if i.spec.node.is_none() {
            counts.unschedulable += 1;
        }
    }

    let mut cluster = Cluster::with_reserve(
        nodes.iter().map(|n| node_capacity(n)).collect(),
        settings.reserve,
    );
    let images: std::collections::BTreeSet<&str> = workloads
        .iter()
        .map(|w| w.spec.image.as_str())
        .chain(instances.iter().map(|i| i.spec.template.image.as_str()))
        .collect();
    let platforms = image_platforms(resources, images).await;
    let platforms_of = |image: &str| platforms.get(image).map(Vec::as_slice).unwrap_or(&[]);
    for i in &instances {
        // A finished pipeline step is kept for its logs but holds nothing.
        if matches!(
            i.status.phase,
            InstancePhase::Succeeded | InstancePhase::Failed
        ) && i.spec.task.is_some()
        {
            continue;
        }
        if let Some(n) = &i.spec.node {
            cluster.book(n, &i.spec.workload, request_of(&i.spec.template));
        }
    }

    // Writes are gathered and made in batches at the end of the pass.
    let mut binds: Vec<(String, Result<String, String>)> = Vec::new();
    let mut deletes: Vec<(String, &'static str)> = Vec::new();
    let mut creates: Vec<Instance> = Vec::new();

    // Pipeline step instances belong to their run (crate::pipelines); this
    // pass only places them.
    for i in instances.iter().filter(|i| i.spec.task.is_some()) {
        if i.spec.node.is_none() {
            let placed = crate::volumes::place(
                &mut cluster,
                &volumes,
                &i.spec.workload,
                &i.spec.template,
                request_of(&i.spec.template),
                platforms_of(&i.spec.template.image),
            );
            binds.push((i.name.clone(), placed));
        }
    }
    instances.retain(|i| i.spec.task.is_none());

    let mut by_workload: HashMap<&str, Vec<&InstanceView>> = HashMap::new();
    for i in &instances {
        by_workload
            .entry(i.spec.workload.as_str())
            .or_default()
            .push(i);
    }

    // Instances whose workload is gone.
    let names: std::collections::HashSet<&str> =
        workloads.iter().map(|w| w.name.as_str()).collect();
    for i in &instances {
        if !names.contains(i.spec.workload.as_str()) {
            deletes.push((i.name.clone(), "its workload was deleted"));
        }
    }

    let mut statuses = Vec::new();
    for w in &workloads {
        let owned = by_workload.remove(w.name.as_str()).unwrap_or_default();
        // Only a change of what runs replaces instances; scaling does not.
        let template = fingerprint(&w.spec);
        let (mut current, stale): (Vec<&InstanceView>, Vec<&InstanceView>) =
            owned.into_iter().partition(|i| i.template == template);
        for i in &stale {
            deletes.push((i.name.clone(), "its workload changed"));
        }
        let want = usize::try_from(w.spec.replicas.max(0)).unwrap_or(0);
        // Scale down: drop unplaced and not-ready ones first, then the newest.
        if current.len() > want {
            current.sort_by(|a, b| {
                (
                    a.spec.node.is_some(),
                    a.status.ready,
                    std::cmp::Reverse(&a.created),
                )
                    .cmp(&(
                        b.spec.node.is_some(),
                        b.status.ready,
                        std::cmp::Reverse(&b.created),
                    ))
            });
            let extra = current.len() - want;
            for i in current.drain(..extra) {
                deletes.push((i.name.clone(), "scaled down"));
            }
        }
        // Bind unplaced instances when a node has room now.
        for i in &current {
            if i.spec.node.is_none() {
                let placed = crate::volumes::place(
                    &mut cluster,
                    &volumes,
                    &w.name,
                    &i.spec.template,
                    request_of(&i.spec.template),
                    platforms_of(&i.spec.template.image),
                );
                binds.push((i.name.clone(), placed));
            }
        }
        let mut created = Vec::new();
        if current.len() < want {
            // One identity per label set, allocated here on the leader
            // before any instance carries it (never on a read path).
            let identity = identity_of(resources, w).await;
            // Names are random; 10,000 of them collide a few times, and a
            // collision would leave a replica for the next pass.
            let mut taken: std::collections::HashSet<String> =
                current.iter().map(|i| i.name.clone()).collect();
            for _ in current.len()..want {
                let placed = crate::volumes::place(
                    &mut cluster,
                    &volumes,
                    &w.name,
                    &w.spec,
                    request_of(&w.spec),
                    platforms_of(&w.spec.image),
                );
                let (object, view) = new_instance(w, placed, identity, &mut taken);
                creates.push(object);
                created.push(view);
            }
        } else if want > 0 {
            // Workloads that exist before any instance still get their
            // identity, so policies can name them.
            identity_of(resources, w).await;
        }
        statuses.push((w, workload_status(w, &current, &created)));
    }

    write_batches(resources, binds, deletes, creates).await?;
    for (w, status) in statuses {
        write_workload_status(resources, w, status).await?;
    }
    Ok(counts)
}

/// The identity of a workload's label set: from the cache when it has one,
/// else allocated. `None` (logged) if allocation fails; the instance gets
/// one on a later pass.
async fn identity_of(resources: &Resources, w: &WorkloadView) -> Option<u32> {
    let canonical = crate::workload_identities::canonical(&w.labels);
    if let Some(cache) = resources.cache().await {
        if let Some(id) = cache.read().identity(&canonical) {
            return Some(id);
        }
    }
    match crate::workload_identities::identity_for(resources.store().as_ref(), &w.labels).await {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(workload = %w.name, error = %e, "cannot allocate an identity; the instance gets one later");
            None
        }
    }
}

/// Makes the pass's binds, deletes and creates, a batch at a time.
async fn write_batches(
    resources: &Resources,
    binds: Vec<(String, Result<String, String>)>,
    deletes: Vec<(String, &'static str)>,
    creates: Vec<Instance>,
) -> Result<(), ResourceError> {
    if !deletes.is_empty() {
        let names: Vec<String> = deletes.iter().map(|(n, _)| n.clone()).collect();
        resources
            .update_many(Kind::Instance, &names, |_, _| {
                crate::resources::Change::Delete
            })
            .await?;
        let mut why: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, reason) in &deletes {
            tracing::debug!(instance = %name, %reason, "instance removed");
            *why.entry(reason).or_default() += 1;
        }
        for (reason, count) in why {
            tracing::info!(count, %reason, "instances removed");
        }
    }
    if !binds.is_empty() {
        let names: Vec<String> = binds.iter().map(|(n, _)| n.clone()).collect();
        let by_name: HashMap<&str, &Result<String, String>> =
            binds.iter().map(|(n, p)| (n.as_str(), p)).collect();
        resources
            .update_many(Kind::Instance, &names, |name, cur| {
                let (Some(cur), Some(placed)) = (cur, by_name.get(name)) else {
                    return crate::resources::Change::Keep;
                };
                let cur = match Instance::deserialize(cur) {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::warn!(instance = %name, error = %e, "unreadable instance");
                        return crate::resources::Change::Keep;
                    }
                };
                match bound(cur, placed) {
                    Some(o) => crate::resources::Change::Put(crate::resources::to_json(&o)),
                    None => crate::resources::Change::Keep,
                }
            })
            .await?;
        let placed = binds.iter().filter(|(_, p)| p.is_ok()).count();
        if placed > 0 {
            tracing::info!(count = placed, "pending instances placed");
        }
    }
    if !creates.is_empty() {
        let names: Vec<String> = creates.iter().map(|o| o.name().to_string()).collect();
        let by_name: HashMap<&str, &Instance> =
            names.iter().map(String::as_str).zip(&creates).collect();
        resources
            .update_many(Kind::Instance, &names, |name, cur| {
                match (cur, by_name.get(name)) {
                    (None, Some(o)) => crate::resources::Change::Put(crate::resources::to_json(o)),
                    _ => crate::resources::Change::Keep,
                }
            })
            .await?;
        for o in &creates {
            tracing::debug!(instance = %o.name(), node = ?o.spec.node, "instance created");
        }
        let unplaced = creates.iter().filter(|o| o.spec.node.is_none()).count();
        tracing::info!(
            count = creates.len(),
            unschedulable = unplaced,
            "instances created"
        );
    }
    Ok(())
}

/// Deletes an instance (already gone is fine) and logs why.
pub(crate) async fn delete_instance(
    resources: &Resources,
    name: &str,
    why: &str,
) -> Result<(), ResourceError> {
    match resources.delete(Kind::Instance, name).await {
        Ok(_) | Err(ResourceError::NotFound { .. }) => {
            tracing::info!(instance = %name, reason = %why, "instance removed");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The status of an instance placed on a node, not yet reported.
fn scheduled_status() -> InstanceStatus {
    InstanceStatus {
        phase: InstancePhase::Pending,
        reason: "Scheduled".into(),
        ..Default::default()
    }
}

/// The status of an instance no node fits, with why.
fn unschedulable_status(message: &str) -> InstanceStatus {
    InstanceStatus {
        phase: InstancePhase::Pending,
        reason: "Unschedulable".into(),
        message: message.into(),
        ..Default::default()
    }
}

/// A new instance object of `w` and its view.
fn new_instance(
    w: &WorkloadView,
    placed: Result<String, String>,
    identity: Option<u32>,
    taken: &mut std::collections::HashSet<String>,
) -> (Instance, InstanceView) {
    let mut name = instance_name(&w.name);
    while !taken.insert(name.clone()) {
        name = instance_name(&w.name);
    }
    let mut labels = w.labels.clone();
    labels.insert(WORKLOAD_LABEL.to_string(), w.name.clone());
    let spec = InstanceSpec {
        workload: w.name.clone(),
        workload_generation: w.generation,
        node: placed.as_ref().ok().cloned(),
        template: w.spec.clone(),
        identity,
        task: None,
    };
    let status = match &placed {
        Ok(_) => scheduled_status(),
        Err(why) => unschedulable_status(why),
    };
    let view = InstanceView {
        name: name.clone(),
        template: fingerprint(&spec.template),
        spec: spec.clone(),
        status: status.clone(),
        created: String::new(),
    };
    let mut object = Instance::new(Kind::Instance, name, spec);
    object.metadata.labels = labels;
    object.status = Some(status);
    (object, view)
}

/// The instance bound as `placed` says, or `None` if it is bound already.
fn bound(mut o: Instance, placed: &Result<String, String>) -> Option<Instance> {
    if o.spec.node.is_some() {
        return None;
    }
    match placed {
        Ok(node) => {
            o.spec.node = Some(node.clone());
            o.status = Some(scheduled_status());
        }
        Err(why) => o.status = Some(unschedulable_status(why)),
    }
    Some(o)
}

fn workload_status(
    w: &WorkloadView,
    current: &[&InstanceView],
    created: &[InstanceView],
) -> WorkloadStatus {
    let mut all: Vec<&InstanceView> = current.to_vec();
    all.extend(created.iter());
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let ready = all.iter().filter(|i| i.status.ready).count();
    let summaries: Vec<InstanceSummary> = all
        .iter()
        .take(STATUS_INSTANCES_MAX)
        .map(|i| InstanceSummary {
            name: i.name.clone(),
            node: i.spec.node.clone(),
            phase: i.status.phase,
            ready: i.status.ready,
            restarts: i.status.restarts,
            exit_code: i.status.exit_code,
            message: match (i.status.reason.as_str(), i.status.message.as_str()) {
                ("", m) => m.to_string(),
                (r, "") => r.to_string(),
                (r, m) => format!("{r}: {m}"),
            },
            ..Default::default()
        })
        .collect();
    let want = w.spec.replicas.max(0) as u64;
    let available = ready as u64 >= want;
    let unschedulable = all
        .iter()
        .find(|i| i.spec.node.is_none())
        .map(|i| i.status.message.clone());
    let condition = |type_: &str, status, reason: &str, message: String| Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        ..Default::default()
    };
    let mut conditions = vec![if available {
        condition(
            "Available",
            ConditionStatus::True,
            "MinimumReplicasReady",
            format!("{ready}/{want} replicas ready"),
        )
    } else {
        condition(
            "Available",
            ConditionStatus::False,
            "ReplicasNotReady",
            format!("{ready}/{want} replicas ready"),
        )
    }];
    if let Some(msg) = unschedulable {
        conditions.push(condition(
            "Scheduled",
            ConditionStatus::False,
            "Unschedulable",
            msg,
        ));
    }
    WorkloadStatus {
        observed_generation: Some(w.generation),
        replicas: u32::try_from(all.len()).unwrap_or(u32::MAX),
        ready_replicas: u32::try_from(ready).unwrap_or(u32::MAX),
        conditions,
        instances: summaries,
    }
}

async fn write_workload_status(
    resources: &Resources,
    w: &WorkloadView,
    status: WorkloadStatus,
) -> Result<(), ResourceError> {
    if w.status.as_ref() == Some(&status) {
        return Ok(());
    }
    resources
        .update_typed(Kind::Workload, &w.name, |cur: Option<Workload>| {
            let mut o = cur?;
            // Apply may have bumped the generation meanwhile; the next pass
            // writes the status for it.
            if o.metadata.generation != Some(w.generation) {
                return None;
            }
            // Keep transition-free conditions stable: compare without time.
            if o.status.as_ref() == Some(&status) {
                return None;
            }
            o.status = Some(status.clone());
            Some(o)
        })
        .await?;
    Ok(())
}

/// Maps the phase an agent reports onto the API's phase.
/// The phase an agent reported: the enum, or the string an agent from
/// before it sent (`legacy_phase`), which only such an agent sets.
pub fn reported_phase(st: &ironmesh_proto::v1::InstanceState) -> InstancePhase {
    use ironmesh_proto::v1::InstancePhase as Reported;
    if st.phase() == Reported::Pending && !st.legacy_phase.is_empty() {
        return match st.legacy_phase.as_str() {
            "Running" => InstancePhase::Running,
            "Succeeded" => InstancePhase::Succeeded,
            "Failed" => InstancePhase::Failed,
            _ => InstancePhase::Pending,
        };
    }
    phase_of(st.phase())
}

pub fn phase_of(p: ironmesh_proto::v1::InstancePhase) -> InstancePhase {
    use ironmesh_proto::v1::InstancePhase as Reported;
    match p {
        Reported::Pending => InstancePhase::Pending,
        Reported::Running => InstancePhase::Running,
        Reported::Succeeded => InstancePhase::Succeeded,
        Reported::Failed => InstancePhase::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_agents_string_phase_is_read_when_the_enum_is_absent() {
        use ironmesh_proto::v1::{InstancePhase as Reported, InstanceState};
        let old = InstanceState {
            legacy_phase: "Succeeded".into(),
            ..Default::default()
        };
        assert_eq!(reported_phase(&old), InstancePhase::Succeeded);
        let new = InstanceState {
            phase: Reported::Running.into(),
            ..Default::default()
        };
        assert_eq!(reported_phase(&new), InstancePhase::Running);
        assert_eq!(
            reported_phase(&InstanceState::default()),
            InstancePhase::Pending
        );
        let odd = InstanceState {
            legacy_phase: "Exploded".into(),
            ..Default::default()
        };
        assert_eq!(reported_phase(&odd), InstancePhase::Pending);
    }

    #[test]
    fn instance_names_are_dns_labels_with_the_workload_prefix() {
        let n = instance_name("web");
        assert!(n.starts_with("web-") && n.len() == 9, "{n}");
        let long = "a".repeat(63);
        let n = instance_name(&long);
        assert!(n.len() <= 63, "{n}");
        assert!(ironmesh_api::meta::dns_label_problem(&n).is_none(), "{n}");
    }

    /// Placement reads an index's platforms from its tag record and keeps
    /// instances off nodes of other CPUs, saying why.
    #[tokio::test]
    async fn an_index_lacking_the_nodes_platform_leaves_the_instance_unplaced_with_the_reason() {
        use crate::store::embedded::EmbeddedStore;
        use crate::store::{Op, Store, Txn};
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let res = Resources::new(store.clone());
        let put = |kind: Kind, v: Value| {
            let res = &res;
            async move {
                let name = v["metadata"]["name"].as_str().unwrap().to_string();
                res.update(kind, &name, |_| Some(v.clone())).await.unwrap();
            }
        };
        put(
            Kind::Node,
            json!({
                "apiVersion": "ironmesh.dev/v1", "kind": "Node", "metadata": {"name": "n1"},
                "spec": {},
                "status": {
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "allocatable": {"cpu": "4", "memory": "4Gi"},
                    "nodeInfo": {"arch": "x86_64"},
                },
            }),
        )
        .await;
        let record = |platforms: Value| {
            json!({"name": "app/multi:1", "manifestDigest": format!("sha256:{}", "a".repeat(64)),
                   "size": 1, "pushedUnixMs": 0, "platforms": platforms})
            .to_string()
            .into_bytes()
        };
        let tag = |platforms: Value| Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: "/images/app/multi:1".into(),
                value: record(platforms),
            }],
        };
        store
            .txn(tag(json!([{"os": "linux", "architecture": "s390x"}])))
            .await
            .unwrap();
        put(
            Kind::Workload,
            json!({
                "apiVersion": "ironmesh.dev/v1", "kind": "Workload", "metadata": {"name": "w"},
                "spec": {"replicas": 1, "image": "app/multi:1"},
            }),
        )
        .await;
        reconcile(&res, &Settings::default()).await.unwrap();
        let all = LabelSelector::default();
        let (instances, _) = res.list(Kind::Instance, &all).await.unwrap();
        assert_eq!(instances.len(), 1);
        let i = &instances[0].object;
        assert_eq!(i.pointer("/spec/node"), None, "{i}");
        assert_eq!(
            i.pointer("/status/reason"),
            Some(&json!("Unschedulable")),
            "{i}"
        );
        assert_eq!(
            i.pointer("/status/message").and_then(Value::as_str),
            Some(
                "0/1 nodes available: 1 of a platform the image does not offer \
                 (the image offers linux/s390x)"
            ),
            "{i}"
        );
        let w = res.get(Kind::Workload, "w").await.unwrap().unwrap().object;
        assert!(
            w.get("status")
                .unwrap()
                .to_string()
                .contains("the image offers linux/s390x"),
            "{w}"
        );

        // The index gains amd64: the next pass places it.
        store
            .txn(tag(json!([{"os": "linux", "architecture": "s390x"},
                            {"os": "linux", "architecture": "amd64"}])))
            .await
            .unwrap();
        reconcile(&res, &Settings::default()).await.unwrap();
        let (instances, _) = res.list(Kind::Instance, &all).await.unwrap();
        assert_eq!(
            instances[0].object.pointer("/spec/node"),
            Some(&json!("n1")),
            "{}",
            instances[0].object
        );
    }
}
