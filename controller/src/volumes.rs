//! The volume controller: binds every Volume to a node whose storage pool
//! has room, records the binding in the Volume's status, and answers what
//! the rest of the controller needs to know about volumes — the node an
//! instance that mounts volumes must run on ([`VolumeIndex::node_for`]),
//! the volumes of a node's assignment ([`VolumeIndex::bound_to`]), the usage agents
//! report ([`record_storage`]) and whether a Volume may be deleted
//! ([`check_delete`]).
//!
//! Binding: a Volume with `spec.node` is bound there, otherwise to the
//! Ready node whose pool (supporting `spec.backend`, or with any backend)
//! has the most room, ties broken by name — deterministic for the same
//! input. Room is the pool's capacity minus the sizes of the volumes
//! already bound to it (image files are sparse, so the pool's free space
//! alone would overcommit). A binding is never moved: the data lives on
//! that node. A Volume that fits nowhere stays `Pending` with a reason
//! naming, per node, why.
//!
//! Deletion is refused while a Workload or Instance mounts the volume. The
//! transaction that deletes a bound Volume also writes a removal record,
//! `/volume-removals/<node>/<volume>`: assignments name those volumes in
//! `remove_volumes`, the agent deletes the data, and the record goes once
//! the node no longer reports the volume. Nothing else makes an agent
//! delete data: a volume a node reports that is neither bound to it nor
//! being removed (a controller on a restored or wrong store) is kept and
//! marked orphaned — the Node's `VolumesOrphaned` condition and a
//! `VolumeOrphaned` event. A new Volume of the same name stays Pending
//! until the old data is gone. The binding itself is done here;
//! provisioning is the agent's.

use std::collections::BTreeMap;
use std::time::Duration;

use ironmesh_api::object::{Instance, Volume, Workload};
use ironmesh_api::selector::LabelSelector;
use ironmesh_api::volume::{VolumePhase, VolumeSpec, VolumeStatus};
use ironmesh_api::workload::WorkloadSpec;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{InstanceVolume, StorageReport, VolumeAssignment};
use serde_json::{json, Value};

use crate::liveness::ready_status;
use crate::resources::{ResourceError, Resources, StoredObject};
use crate::scheduler::{Cluster, Request};

/// Where removal records live: `/volume-removals/<node>/<volume>`.
pub const REMOVALS: &str = "/volume-removals/";

/// The removal records of one node.
pub fn removals_prefix(node: &str) -> String {
    format!("{REMOVALS}{node}/")
}

/// The removal record (key and value) a deleted Volume leaves for the
/// node it was bound to; `None` for a Volume never bound (no data).
pub fn removal_record(volume: &StoredObject) -> Option<(String, Vec<u8>)> {
    let v = volume_of(volume)?;
    let (node, pool, backend) = binding_of(&v)?;
    let record = RemovalRecord {
        uid: v.metadata.uid,
        pool,
        backend,
        deleted_at: crate::resources::now_rfc3339(),
    };
    Some((
        format!("{}{}", removals_prefix(&node), volume.name),
        serde_json::to_vec(&record).ok()?,
    ))
}

/// The value of a removal record.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RemovalRecord {
    /// The deleted Volume's uid (`null` when it had none).
    uid: Option<String>,
    pool: String,
    backend: String,
    deleted_at: String,
}

/// `(node, volume)` of a removal record's key.
pub fn parse_removal_key(key: &str) -> Option<(&str, &str)> {
    let (node, volume) = key.strip_prefix(REMOVALS)?.split_once('/')?;
    (!node.is_empty() && !volume.is_empty() && !volume.contains('/')).then_some((node, volume))
}

/// Longest wait between passes when nothing changes.
const RESYNC: Duration = Duration::from_secs(2);

/// Runs binding passes until `shutdown` (leader only).
pub async fn run(resources: Resources, shutdown: ironmesh_process::Shutdown) {
    use futures::{FutureExt, StreamExt};
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    loop {
        let rev = match resources.store().revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "volume controller cannot read the store revision");
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(RESYNC) => continue,
                }
            }
        };
        let mut events = match resources
            .store()
            .watch(&crate::resources::prefix(Kind::Volume), rev)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "volume controller cannot watch the store");
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(RESYNC) => continue,
                }
            }
        };
        loop {
            if let Err(e) = reconcile(&resources).await {
                tracing::warn!(error = %e, "volume pass failed");
            }
            tokio::select! {
                _ = &mut stopped => return,
                // Nodes join and report pools without touching volumes.
                _ = tokio::time::sleep(RESYNC) => {}
                ev = events.next() => match ev {
                    Some(Ok(_)) => while let Some(Some(Ok(_))) = events.next().now_or_never() {},
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "volume watch broke; reopening");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

/// A pool as a node reported it (Node `status.storage.pools[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    pub capacity_bytes: u64,
    pub backends: Vec<String>,
}

/// A node as the volume binder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePools {
    pub name: String,
    pub ready: bool,
    pub pools: Vec<PoolView>,
}

fn node_pools(o: &StoredObject) -> NodePools {
    let pools = o
        .object
        .pointer("/status/storage/pools")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some(PoolView {
                        name: p.get("name")?.as_str()?.to_string(),
                        capacity_bytes: p.get("capacityBytes")?.as_u64()?,
                        backends: p
                            .get("backends")?
                            .as_array()?
                            .iter()
                            .filter_map(|b| b.as_str().map(str::to_string))
                            .collect(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    NodePools {
        name: o.name.clone(),
        ready: ready_status(&o.object) == Some("True"),
        pools,
    }
}

fn backend_str(b: ironmesh_api::volume::VolumeBackend) -> &'static str {
    use ironmesh_api::volume::VolumeBackend;
    match b {
        VolumeBackend::File => "file",
        VolumeBackend::Btrfs => "btrfs",
    }
}

/// Where a volume was bound: (node, pool, backend).
pub type Binding = (String, String, String);

/// Chooses the node and pool for a volume of `size` bytes, given what is
/// already bound (`booked`: (node, pool) → bytes). Pure and deterministic.
pub fn choose(
    spec: &VolumeSpec,
    size: u64,
    nodes: &[NodePools],
    booked: &BTreeMap<(String, String), u64>,
) -> Result<Binding, String> {
    let want = spec.backend.map(backend_str);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(u64, Binding)> = None;
    let mut sorted: Vec<&NodePools> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut considered = 0;
    for n in sorted {
        if spec.node.as_ref().is_some_and(|want| *want != n.name) {
            continue;
        }
        considered += 1;
        if !n.ready {
            *reasons.entry("not ready".into()).or_default() += 1;
            continue;
        }
        let pools: Vec<&PoolView> = n
            .pools
            .iter()
            .filter(|p| want.is_none_or(|b| p.backends.iter().any(|x| x == b)))
            .collect();
        if pools.is_empty() {
            let why = match (n.pools.is_empty(), want) {
                (true, _) => "no storage pool".to_string(),
                (false, Some(b)) => format!("no pool with backend {b}"),
                (false, None) => "no storage pool".to_string(),
            };
            *reasons.entry(why).or_default() += 1;
            continue;
        }
        let mut fits = false;
        for p in pools {
            let used = booked
                .get(&(n.name.clone(), p.name.clone()))
                .copied()
                .unwrap_or(0);
            let room = p.capacity_bytes.saturating_sub(used);
            if room < size {
                continue;
            }
            fits = true;
            let backend = want
                .map(str::to_string)
                .or_else(|| p.backends.first().cloned())
                .unwrap_or_else(|| "file".to_string());
            // Most room wins; earlier (node, pool) on ties.
            if best.as_ref().is_none_or(|(r, _)| room > *r) {
                best = Some((room, (n.name.clone(), p.name.clone(), backend)));
            }
        }
        if !fits {
            *reasons.entry("insufficient storage".into()).or_default() += 1;
        }
    }
    if let Some((_, b)) = best {
        return Ok(b);
    }
    if let Some(node) = &spec.node {
        if considered == 0 {
            return Err(format!("node {node} has not joined"));
        }
    }
    if considered == 0 {
        return Err("0/0 nodes available: no node has joined".to_string());
    }
    let parts: Vec<String> = reasons.iter().map(|(w, n)| format!("{n} {w}")).collect();
    Err(format!(
        "0/{considered} nodes have room for {}: {}",
        ironmesh_api::quantity::format_bytes(size),
        parts.join(", ")
    ))
}

/// One pass: binds every unbound Volume it can.
pub async fn reconcile(resources: &Resources) -> Result<(), ResourceError> {
    let all = LabelSelector::default();
    let (volumes, _) = resources.list(Kind::Volume, &all).await?;
    let mut booked: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut unbound = Vec::new();
    for v in &volumes {
        let Some(volume) = volume_of(v) else { continue };
        let size = volume.spec.size.bytes().unwrap_or(0);
        match binding_of(&volume) {
            Some((node, pool, _)) => *booked.entry((node, pool)).or_default() += size,
            None => unbound.push((v, volume.spec, size)),
        }
    }
    if unbound.is_empty() {
        return Ok(());
    }
    let mut nodes: Vec<NodePools> = Vec::new();
    resources
        .scan(Kind::Node, |n| nodes.push(node_pools(n)))
        .await?;
    // Data of a deleted Volume still on its node: a new Volume of that
    // name waits (it would otherwise be bound over, or next to, the old
    // data). Records of nodes that no longer exist are dropped.
    let mut removing: BTreeMap<String, String> = BTreeMap::new();
    for kv in resources.store().list(REMOVALS).await?.0 {
        let Some((node, volume)) = parse_removal_key(&kv.key) else {
            continue;
        };
        if nodes.iter().any(|n| n.name == node) {
            removing.insert(volume.to_string(), node.to_string());
        } else {
            let txn = crate::store::Txn {
                compares: Vec::new(),
                ops: vec![crate::store::Op::Delete {
                    key: kv.key.clone(),
                }],
            };
            resources.store().txn(txn).await?;
        }
    }
    unbound.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (v, spec, size) in unbound {
        let status = if let Some(node) = removing.get(&v.name) {
            VolumeStatus {
                phase: VolumePhase::Pending,
                reason: "PreviousDataBeingRemoved".into(),
                message: format!(
                    "node {node} is still removing the data of the deleted volume {}",
                    v.name
                ),
                ..Default::default()
            }
        } else {
            bind_status(&v.name, &spec, size, &nodes, &mut booked)
        };
        resources
            .update_typed(Kind::Volume, &v.name, |cur: Option<Volume>| {
                let mut o = cur?;
                if binding_of(&o).is_some() || o.status.as_ref() == Some(&status) {
                    return None;
                }
                o.status = Some(status.clone());
                Some(o)
            })
            .await?;
    }
    Ok(())
}

/// The status binding one Volume: `Bound` to the chosen node's pool (and
/// booked), or `Pending` saying why it fits nowhere.
fn bind_status(
    volume: &str,
    spec: &VolumeSpec,
    size: u64,
    nodes: &[NodePools],
    booked: &mut BTreeMap<(String, String), u64>,
) -> VolumeStatus {
    let pending = |message: String| VolumeStatus {
        phase: VolumePhase::Pending,
        reason: "NoNodeWithRoom".into(),
        message,
        ..Default::default()
    };
    match choose(spec, size, nodes, booked) {
        Ok((node, pool, backend)) => {
            *booked.entry((node.clone(), pool.clone())).or_default() += size;
            tracing::info!(volume, %node, %pool, %backend, size, "volume bound");
            VolumeStatus {
                phase: VolumePhase::Bound,
                node: Some(node),
                pool: Some(pool),
                backend: Some(backend),
                capacity: Some(ironmesh_api::quantity::format_bytes(size)),
                ..Default::default()
            }
        }
        Err(why) => pending(why),
    }
}

/// The typed Volume; `None` (logged) when the stored one does not decode.
fn volume_of(v: &StoredObject) -> Option<Volume> {
    match v.typed() {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(volume = %v.name, error = %e, "unreadable volume");
            None
        }
    }
}

/// The binding recorded in a Volume's status.
pub fn binding_of(v: &Volume) -> Option<Binding> {
    let s = v.status.as_ref()?;
    if s.phase != VolumePhase::Bound {
        return None;
    }
    Some((s.node.clone()?, s.pool.clone()?, s.backend.clone()?))
}

/// Every Volume's binding (or why it has none), for one workload pass.
#[derive(Debug, Default)]
pub struct VolumeIndex {
    volumes: BTreeMap<String, Result<VolumeAssignmentWithNode, String>>,
}

#[derive(Debug, Clone)]
struct VolumeAssignmentWithNode {
    node: String,
    assignment: VolumeAssignment,
}

impl VolumeIndex {
    pub async fn load(resources: &Resources) -> Result<VolumeIndex, ResourceError> {
        let (volumes, _) = resources
            .list(Kind::Volume, &LabelSelector::default())
            .await?;
        Ok(Self::from_objects(&volumes))
    }

    pub fn from_objects(volumes: &[StoredObject]) -> VolumeIndex {
        let mut index = VolumeIndex::default();
        for v in volumes {
            let volume = volume_of(v);
            let bound = volume.as_ref().and_then(binding_of);
            let entry = match (bound, &volume) {
                (Some((node, pool, backend)), Some(volume)) => Ok(VolumeAssignmentWithNode {
                    node,
                    assignment: VolumeAssignment {
                        name: v.name.clone(),
                        size_bytes: volume.spec.size.bytes().unwrap_or(0),
                        backend,
                        pool,
                    },
                }),
                _ => Err(volume
                    .and_then(|o| o.status)
                    .map(|s| s.message)
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "waiting for the volume controller".to_string())),
            };
            index.volumes.insert(v.name.clone(), entry);
        }
        index
    }

    /// The node every instance of `spec` must run on: `Ok(None)` when it
    /// mounts no volume, `Err` (naming the volume) when a volume is
    /// missing or not bound yet, or when its volumes are on different
    /// nodes.
    pub fn node_for(&self, spec: &WorkloadSpec) -> Result<Option<String>, String> {
        let mut node: Option<(String, String)> = None;
        for m in &spec.volumes {
            let bound = match self.volumes.get(&m.volume) {
                None => return Err(format!("volume {} does not exist", m.volume)),
                Some(Err(why)) => {
                    return Err(format!("volume {} is not bound yet: {why}", m.volume))
                }
                Some(Ok(b)) => b,
            };
            match &node {
                Some((n, other)) if *n != bound.node => {
                    return Err(format!(
                        "volumes {other} and {} are bound to different nodes ({n}, {})",
                        m.volume, bound.node
                    ))
                }
                Some(_) => {}
                None => node = Some((bound.node.clone(), m.volume.clone())),
            }
        }
        Ok(node.map(|(n, _)| n))
    }

    /// The volumes an instance of `spec` on `node` mounts, in order; those
    /// not bound to `node` are left out.
    pub fn instance_volumes(&self, spec: &WorkloadSpec, node: &str) -> Vec<InstanceVolume> {
        spec.volumes
            .iter()
            .filter_map(|m| {
                let b = self.volumes.get(&m.volume)?.as_ref().ok()?;
                (b.node == node).then(|| InstanceVolume {
                    name: m.name.clone(),
                    volume: Some(b.assignment.clone()),
                    mount_path: m.mount_path.clone(),
                    read_only: m.read_only,
                })
            })
            .collect()
    }

    /// The first volume `spec` mounts that lives on `node`, if any.
    pub fn volume_on<'a>(&self, spec: &'a WorkloadSpec, node: &str) -> Option<&'a str> {
        spec.volumes
            .iter()
            .find(|m| {
                self.volumes
                    .get(&m.volume)
                    .and_then(|b| b.as_ref().ok())
                    .is_some_and(|b| b.node == node)
            })
            .map(|m| m.volume.as_str())
    }

    /// Every volume bound to `node`, by name.
    pub fn bound_to(&self, node: &str) -> Vec<VolumeAssignment> {
        self.volumes
            .values()
            .filter_map(|v| v.as_ref().ok())
            .filter(|b| b.node == node)
            .map(|b| b.assignment.clone())
            .collect()
    }
}

/// Places an instance of `spec` (see [`Cluster::place`]), on its volumes'
/// node if it mounts any, on a node of one of `platforms` (its image's,
/// if an index; empty: any).
pub fn place(
    cluster: &mut Cluster,
    index: &VolumeIndex,
    workload: &str,
    spec: &WorkloadSpec,
    req: Request,
    platforms: &[ironmesh_oci::Platform],
) -> Result<String, String> {
    let placement = spec.placement.as_ref();
    match index.node_for(spec)? {
        None => cluster.place_for(workload, req, placement, platforms),
        Some(node) => cluster.place_on_for(&node, workload, req, placement, platforms),
    }
}

/// Records a node's storage report: its pools into the Node's
/// `status.storage`, each volume's usage into its Volume's status (only
/// for volumes bound to that node).
pub async fn record_storage(
    resources: &Resources,
    node: &str,
    report: StorageReport,
) -> Result<(), ResourceError> {
    let pools: Vec<Value> = report
        .pools
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "kind": p.kind,
                "path": p.path,
                "capacityBytes": p.capacity_bytes,
                "freeBytes": p.free_bytes,
                "allocatedBytes": p.allocated_bytes,
                "backends": p.backends,
            })
        })
        .collect();
    let mut storage = json!({"pools": pools});
    if let Some(d) = &report.disk_use {
        storage["diskUse"] = json!({
            "imageBytes": d.image_bytes,
            "logBytes": d.log_bytes,
            "volumeBytes": d.volume_bytes,
            "stateBytes": d.state_bytes,
            "totalBytes": d.image_bytes
                .saturating_add(d.log_bytes)
                .saturating_add(d.volume_bytes)
                .saturating_add(d.state_bytes),
        });
    }
    let orphaned = settle_removals(resources, node, &report).await?;
    let orphaned: Vec<&str> = orphaned.iter().map(String::as_str).collect();
    resources
        .update(Kind::Node, node, |cur| {
            let mut o = cur?.clone();
            let mut changed = set_orphaned(&mut o, &orphaned);
            if o.pointer("/status/storage") != Some(&storage) {
                o["status"]["storage"] = storage.clone();
                changed = true;
            }
            changed.then_some(o)
        })
        .await?;
    for u in report.volumes {
        resources
            .update_typed(Kind::Volume, &u.name, |cur: Option<Volume>| {
                let mut o = cur?;
                let status = o.status.as_mut()?;
                if status.node.as_deref() != Some(node) || status.usage_bytes == Some(u.used_bytes)
                {
                    return None;
                }
                status.usage_bytes = Some(u.used_bytes);
                Some(o)
            })
            .await?;
    }
    Ok(())
}

/// After a storage report: drops the removal records of volumes the node
/// no longer holds, and returns the volumes it holds that are neither
/// bound to it nor being removed (orphaned).
async fn settle_removals(
    resources: &Resources,
    node: &str,
    report: &StorageReport,
) -> Result<Vec<String>, ResourceError> {
    let held: std::collections::BTreeSet<&str> =
        report.volumes.iter().map(|v| v.name.as_str()).collect();
    let (records, _) = resources.store().list(&removals_prefix(node)).await?;
    let mut removing = std::collections::BTreeSet::new();
    let mut gone = Vec::new();
    for kv in records {
        let Some((_, volume)) = parse_removal_key(&kv.key) else {
            continue;
        };
        if held.contains(volume) {
            removing.insert(volume.to_string());
        } else {
            tracing::info!(%node, volume, "volume data removed on its node");
            gone.push(crate::store::Op::Delete { key: kv.key });
        }
    }
    if !gone.is_empty() {
        let rev = match resources
            .store()
            .txn(crate::store::Txn {
                compares: Vec::new(),
                ops: gone,
            })
            .await?
        {
            crate::store::TxnOutcome::Committed(rev) => rev,
            crate::store::TxnOutcome::CompareFailed { .. } => 0,
        };
        resources.wrote(rev);
    }
    let bound = resources
        .list_matching(Kind::Volume, |v| {
            volume_of(v)
                .and_then(|v| binding_of(&v))
                .is_some_and(|(n, _, _)| n == node)
        })
        .await?;
    let orphaned: Vec<String> = held
        .iter()
        .filter(|v| !removing.contains(**v) && !bound.iter().any(|b| b.name == **v))
        .map(|v| v.to_string())
        .collect();
    if !orphaned.is_empty() {
        tracing::debug!(%node, volumes = ?orphaned, "node holds volumes this cluster does not know; kept");
    }
    Ok(orphaned)
}

/// The condition a node holding data of unknown volumes carries.
pub const ORPHANED_CONDITION: &str = "VolumesOrphaned";

/// Sets a Node object's `VolumesOrphaned` condition (True naming the
/// volumes, or False) and records a `VolumeOrphaned` event when the set
/// grows; returns whether anything changed.
pub fn set_orphaned(node: &mut Value, orphaned: &[&str]) -> bool {
    let status = if orphaned.is_empty() { "False" } else { "True" };
    let message = if orphaned.is_empty() {
        "every volume on this node is bound to it or being removed".to_string()
    } else {
        format!(
            "this node holds the data of volumes the cluster has no record of: {}; \
             kept. Create a Volume of that name with spec.node set to this node to use \
             the data again, then delete the Volume to remove it",
            orphaned.join(", ")
        )
    };
    if !node.get("status").is_some_and(Value::is_object) {
        node["status"] = json!({});
    }
    if !node["status"]["conditions"].is_array() {
        node["status"]["conditions"] = json!([]);
    }
    let Some(conds) = node["status"]["conditions"].as_array_mut() else {
        return false;
    };
    let cur = conds
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(ORPHANED_CONDITION));
    let was: Vec<String> = cur
        .and_then(|c| c.get("volumes"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if cur.is_some_and(|c| c.get("status").and_then(Value::as_str) == Some(status))
        && was == orphaned
    {
        return false;
    }
    // A node that never held an orphan gets no condition at all.
    if cur.is_none() && orphaned.is_empty() {
        return false;
    }
    conds.retain(|c| c.get("type").and_then(Value::as_str) != Some(ORPHANED_CONDITION));
    conds.push(json!({
        "type": ORPHANED_CONDITION,
        "status": status,
        "reason": if orphaned.is_empty() { "NoOrphanedVolumes" } else { "UnknownVolumeData" },
        "message": message,
        "volumes": orphaned,
        "lastTransitionTime": crate::resources::now_rfc3339(),
    }));
    let new: Vec<&str> = orphaned
        .iter()
        .copied()
        .filter(|v| !was.iter().any(|w| w == v))
        .collect();
    if !new.is_empty() {
        let mut events: Vec<ironmesh_api::instance::Event> = node
            .pointer("/status/events")
            .cloned()
            .and_then(|e| serde_json::from_value(e).ok())
            .unwrap_or_default();
        ironmesh_api::instance::record_event(
            &mut events,
            ironmesh_api::instance::Event {
                kind: "Warning".into(),
                reason: "VolumeOrphaned".into(),
                message: format!(
                    "volume data kept on the node with no Volume in the cluster: {}",
                    new.join(", ")
                ),
                time: crate::resources::now_rfc3339(),
                count: 1,
            },
        );
        node["status"]["events"] = json!(events);
    }
    true
}

/// Refuses to delete a Volume that a Workload or an Instance still mounts,
/// naming them.
pub async fn check_delete(resources: &Resources, volume: &str) -> Result<(), String> {
    let all = LabelSelector::default();
    let mounts = |spec: &WorkloadSpec| spec.volumes.iter().any(|m| m.volume == volume);
    let mut users = Vec::new();
    if let Ok((workloads, _)) = resources.list(Kind::Workload, &all).await {
        for w in workloads {
            if w.typed::<Workload>().is_ok_and(|o| mounts(&o.spec)) {
                users.push(format!("workload {}", w.name));
            }
        }
    }
    if let Ok((instances, _)) = resources.list(Kind::Instance, &all).await {
        for i in instances {
            if i.typed::<Instance>()
                .is_ok_and(|o| mounts(&o.spec.template))
            {
                users.push(format!("instance {}", i.name));
            }
        }
    }
    if users.is_empty() {
        return Ok(());
    }
    Err(format!(
        "volume {volume} is still mounted by {}; delete those (or remove the volume from the workload) first",
        users.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool, pools: &[(&str, u64, &[&str])]) -> NodePools {
        NodePools {
            name: name.into(),
            ready,
            pools: pools
                .iter()
                .map(|(n, c, b)| PoolView {
                    name: n.to_string(),
                    capacity_bytes: *c,
                    backends: b.iter().map(|x| x.to_string()).collect(),
                })
                .collect(),
        }
    }

    fn spec(json: Value) -> VolumeSpec {
        serde_json::from_value(json).unwrap()
    }

    const GI: u64 = 1 << 30;

    #[test]
    fn removal_records_are_left_only_by_bound_volumes() {
        let vol = |status: Value| StoredObject {
            kind: Kind::Volume,
            name: "data".into(),
            object: json!({"metadata": {"name": "data", "uid": "u1"}, "spec": {"size": "1Mi"}, "status": status}),
            revision: 3,
        };
        assert!(removal_record(&vol(json!({"phase": "Pending"}))).is_none());
        let (key, value) = removal_record(&vol(json!({
            "phase": "Bound", "node": "node-a", "pool": "default", "backend": "file"
        })))
        .unwrap();
        assert_eq!(key, "/volume-removals/node-a/data");
        assert_eq!(parse_removal_key(&key), Some(("node-a", "data")));
        let v: Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(v["uid"], "u1");
        assert_eq!(v["pool"], "default");
        for bad in [
            "/volume-removals/node-a",
            "/volume-removals//data",
            "/volume-removals/n/a/b",
            "/registry/x",
        ] {
            assert_eq!(parse_removal_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn orphaned_volumes_set_a_condition_and_one_event_per_new_volume() {
        let mut node = json!({"metadata": {"name": "node-a"}});
        assert!(
            !set_orphaned(&mut node, &[]),
            "no condition for a node without orphans"
        );
        assert!(node.pointer("/status/conditions/0").is_none());
        assert!(set_orphaned(&mut node, &["data"]));
        let cond = &node["status"]["conditions"][0];
        assert_eq!(cond["type"], ORPHANED_CONDITION);
        assert_eq!(cond["status"], "True");
        assert_eq!(cond["volumes"], json!(["data"]));
        assert!(cond["message"].as_str().unwrap().contains("data"));
        assert_eq!(node["status"]["events"][0]["reason"], "VolumeOrphaned");
        // The same report again changes nothing.
        assert!(!set_orphaned(&mut node, &["data"]));
        assert!(set_orphaned(&mut node, &["data", "logs"]));
        let events = node["status"]["events"].as_array().unwrap();
        assert_eq!(events.len(), 2);
        assert!(events[1]["message"].as_str().unwrap().ends_with(": logs"));
        assert!(set_orphaned(&mut node, &[]));
        assert_eq!(node["status"]["conditions"][0]["status"], "False");
        assert_eq!(node["status"]["conditions"].as_array().unwrap().len(), 1);
        assert!(!set_orphaned(&mut node, &[]));
    }

    #[test]
    fn binds_to_most_room_then_name_and_books() {
        let nodes = vec![
            node("a", true, &[("default", 10 * GI, &["file"])]),
            node("b", true, &[("default", 10 * GI, &["btrfs", "file"])]),
        ];
        let mut booked = BTreeMap::new();
        let s = spec(json!({"size": "4Gi"}));
        let first = choose(&s, 4 * GI, &nodes, &booked).unwrap();
        assert_eq!(first, ("a".into(), "default".into(), "file".into()));
        booked.insert(("a".to_string(), "default".to_string()), 4 * GI);
        let second = choose(&s, 4 * GI, &nodes, &booked).unwrap();
        assert_eq!(second, ("b".into(), "default".into(), "btrfs".into()));
    }

    #[test]
    fn honours_node_and_backend_and_explains() {
        let nodes = vec![
            node("a", true, &[("default", 10 * GI, &["file"])]),
            node("b", false, &[("default", 10 * GI, &["btrfs"])]),
            node("c", true, &[]),
        ];
        let booked = BTreeMap::new();
        let e = choose(
            &spec(json!({"size": "1Gi", "backend": "btrfs"})),
            GI,
            &nodes,
            &booked,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "0/3 nodes have room for 1Gi: 1 no pool with backend btrfs, 1 no storage pool, 1 not ready"
        );
        let e = choose(&spec(json!({"size": "20Gi"})), 20 * GI, &nodes, &booked).unwrap_err();
        assert!(e.contains("1 insufficient storage"), "{e}");
        let e = choose(
            &spec(json!({"size": "1Gi", "node": "zz"})),
            GI,
            &nodes,
            &booked,
        )
        .unwrap_err();
        assert_eq!(e, "node zz has not joined");
        let ok = choose(
            &spec(json!({"size": "1Gi", "node": "a"})),
            GI,
            &nodes,
            &booked,
        )
        .unwrap();
        assert_eq!(ok.0, "a");
    }

    #[test]
    fn instances_follow_their_volumes() {
        let obj = |name: &str, status: Value| StoredObject {
            kind: Kind::Volume,
            name: name.into(),
            object: json!({"metadata": {"name": name}, "spec": {"size": "16Mi"}, "status": status}),
            revision: 1,
        };
        let index = VolumeIndex::from_objects(&[
            obj(
                "d1",
                json!({"phase": "Bound", "node": "n1", "pool": "p", "backend": "file"}),
            ),
            obj(
                "d2",
                json!({"phase": "Bound", "node": "n2", "pool": "p", "backend": "file"}),
            ),
            obj(
                "d3",
                json!({"phase": "Pending", "message": "0/1 nodes have room"}),
            ),
        ]);
        let w = |vols: &[&str]| -> WorkloadSpec {
            serde_json::from_value(json!({
                "image": "x",
                "volumes": vols.iter().enumerate().map(|(i, v)| json!({"name": format!("m{i}"), "volume": v, "mountPath": format!("/m{i}")})).collect::<Vec<_>>(),
            }))
            .unwrap()
        };
        assert_eq!(index.node_for(&w(&[])), Ok(None));
        assert_eq!(index.node_for(&w(&["d1"])), Ok(Some("n1".into())));
        assert!(index
            .node_for(&w(&["d1", "d2"]))
            .unwrap_err()
            .contains("different nodes"));
        assert_eq!(
            index.node_for(&w(&["d3"])).unwrap_err(),
            "volume d3 is not bound yet: 0/1 nodes have room"
        );
        assert_eq!(
            index.node_for(&w(&["nope"])).unwrap_err(),
            "volume nope does not exist"
        );
        let iv = index.instance_volumes(&w(&["d1"]), "n1");
        assert_eq!(iv.len(), 1);
        assert_eq!(iv[0].volume.as_ref().unwrap().size_bytes, 16 << 20);
        assert_eq!(iv[0].mount_path, "/m0");
        assert!(index.instance_volumes(&w(&["d1"]), "n2").is_empty());
        assert_eq!(index.bound_to("n2").len(), 1);
    }
}
