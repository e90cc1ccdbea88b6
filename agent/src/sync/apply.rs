//! Makes the node match a whole assignment, in a task of its own so that a
//! slow apply (image pulls are not waited for, but routes, BPF maps and
//! containerd calls are) never holds up the session's heartbeats.
//!
//! The session hands whole assignments over a `watch` channel ([`Feed`]):
//! one handed over while another is being applied replaces any that is
//! still waiting, so after a burst only the newest is applied. Each apply
//! derives the desired state ([`super::desired`]), then writes peer routes,
//! the datapath maps, the work-queue sockets, the supervisor's desired set
//! and the volumes, and publishes what it applied ([`Applied`]); the
//! session acks that revision.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use ironmesh_proto::v1::{agent_message, AgentMessage, Assignment, InstanceReport};
use tokio::sync::{mpsc, watch};

use super::desired::{self, DatapathState, Skipped};
use super::outbound::msg;
use super::SyncConfig;
use crate::metrics::AgentMetrics;
use crate::storage::{Storage, VolumePlan};
use crate::supervisor::Supervisor;

/// One whole assignment on its way to the apply task.
#[derive(Debug)]
pub(super) struct Handoff {
    /// Counts hand-overs since the agent started (1, 2, ...).
    pub seq: u64,
    /// This node's address as the session found it (the VXLAN source).
    pub node_ip: Option<Ipv4Addr>,
    pub assignment: Assignment,
}

/// What the apply task applied last.
#[derive(Debug, Clone, Default)]
pub(super) struct Applied {
    /// The [`Handoff::seq`] it came with; 0 before the first.
    pub seq: u64,
    pub revision: u64,
    /// The volumes it binds to this node (`None` before the first).
    pub volumes: Option<Arc<VolumePlan>>,
}

/// The session's end of the apply task.
pub(super) struct Feed {
    tx: watch::Sender<Option<Arc<Handoff>>>,
    seq: u64,
}

impl Feed {
    pub(super) fn new() -> (Feed, watch::Receiver<Option<Arc<Handoff>>>) {
        let (tx, rx) = watch::channel(None);
        (Feed { tx, seq: 0 }, rx)
    }

    /// Hands `assignment` to the apply task, replacing one it has not
    /// started on yet. Returns its sequence number.
    pub(super) fn hand_off(&mut self, node_ip: Option<Ipv4Addr>, assignment: Assignment) -> u64 {
        self.seq += 1;
        self.tx.send_replace(Some(Arc::new(Handoff {
            seq: self.seq,
            node_ip,
            assignment,
        })));
        self.seq
    }

    /// The sequence number of the last hand-over (0: none yet).
    pub(super) fn last_seq(&self) -> u64 {
        self.seq
    }
}

/// The apply task: applies the newest hand-over with `apply` and publishes
/// it in `applied`, until the [`Feed`] is dropped. An apply that panics is
/// logged and not published (so not acked); the next hand-over is applied
/// as usual.
pub(super) async fn run<F, Fut>(
    mut desired: watch::Receiver<Option<Arc<Handoff>>>,
    applied: watch::Sender<Applied>,
    mut apply: F,
) where
    F: FnMut(Arc<Handoff>) -> Fut,
    Fut: Future<Output = Arc<VolumePlan>>,
{
    while desired.changed().await.is_ok() {
        let Some(h) = desired.borrow_and_update().clone() else {
            continue;
        };
        let revision = h.assignment.revision;
        match std::panic::AssertUnwindSafe(apply(h.clone()))
            .catch_unwind()
            .await
        {
            Ok(volumes) => {
                applied.send_replace(Applied {
                    seq: h.seq,
                    revision,
                    volumes: Some(volumes),
                });
            }
            Err(_) => {
                tracing::error!(
                    revision,
                    "applying the assignment panicked; it is not acked, the next one is applied as usual"
                );
            }
        }
    }
}

/// What applying writes to, and where rejected specs and storage reports
/// go (the open session's state lane, if any).
pub(super) struct Applier {
    supervisor: Arc<Supervisor>,
    network: Arc<crate::network::Network>,
    datapath: Option<Arc<crate::datapath::Datapath>>,
    mesh: Option<Arc<crate::mesh::Mesh>>,
    cross_host: crate::config::CrossHost,
    vxlan_vni: u32,
    storage: Option<Arc<Storage>>,
    work_queue: Option<Arc<crate::work_queue::WorkQueueProxy>>,
    gateways: Option<Arc<crate::gateway::Gateways>>,
    metrics: Arc<AgentMetrics>,
    session: watch::Receiver<Option<mpsc::Sender<AgentMessage>>>,
    /// What the previous apply skipped: logged again at debug level only.
    skipped: Mutex<Vec<Skipped>>,
}

impl Applier {
    pub(super) fn new(
        cfg: &SyncConfig,
        metrics: Arc<AgentMetrics>,
        session: watch::Receiver<Option<mpsc::Sender<AgentMessage>>>,
    ) -> Applier {
        Applier {
            supervisor: cfg.supervisor.clone(),
            network: cfg.network.clone(),
            datapath: cfg.datapath.clone(),
            mesh: cfg.mesh.clone(),
            cross_host: cfg.cross_host,
            vxlan_vni: cfg.vxlan_vni,
            storage: cfg.storage.clone(),
            work_queue: cfg.work_queue.clone(),
            gateways: cfg.gateways.clone(),
            metrics,
            session,
            skipped: Mutex::new(Vec::new()),
        }
    }

    /// Makes the node match `h`'s whole assignment. Failures are logged,
    /// not fatal: what can be applied is. Returns the volumes it wants.
    pub(super) async fn apply(&self, h: &Handoff) -> Arc<VolumePlan> {
        let a = &h.assignment;
        let revision = a.revision;
        let host_ips = self.datapath.as_ref().map(|_| host_ipv4_addresses());
        let socket_dir;
        let queue_dir: Option<&dyn Fn(&str) -> PathBuf> = match &self.work_queue {
            Some(wq) => {
                socket_dir = |name: &str| wq.socket_dir(name);
                Some(&socket_dir)
            }
            None => None,
        };
        let desired = desired::desired_state(
            a,
            &desired::Inputs {
                host_ips: host_ips.as_deref(),
                queue_dir,
            },
        );
        self.log_skipped(revision, &desired.skipped);
        tracing::debug!(
            revision,
            instances = desired.instances.len(),
            rejected = desired.rejected.len(),
            peers = desired.peers.len(),
            "applying assignment"
        );

        self.apply_peers(h.node_ip, &desired.peers).await;
        if let (Some(dp), Some(state)) = (&self.datapath, desired.datapath) {
            let pod_cidr = self.network.pod_cidr().await;
            if let Some(mesh) = &self.mesh {
                mesh.set_view(mesh_view(&state, &desired.peers));
            }
            write_datapath(dp.clone(), state, pod_cidr, self.mesh.is_some()).await;
        }
        if let Some(wq) = &self.work_queue {
            wq.sync(&a.instances).await;
        }
        if let Some(gw) = &self.gateways {
            // Errors are logged inside; the rest of the node applies.
            gw.apply(h.node_ip, &a.gateways, &a.services).await;
        }
        if !desired.rejected.is_empty() {
            let tx = self.session.borrow().clone();
            if let Some(tx) = tx {
                let _ = tx
                    .send(msg(agent_message::Msg::Instances(InstanceReport {
                        full: false,
                        instances: desired.rejected,
                    })))
                    .await;
            }
        }
        self.supervisor.set_desired(desired.instances).await;
        let volumes = Arc::new(desired.volumes);
        let tx = self.session.borrow().clone();
        storage_pass(
            self.storage.as_ref(),
            &self.supervisor,
            Some(volumes.clone()),
            tx,
        );
        self.metrics.assignment_revision.set(revision as i64);
        tracing::debug!(revision, "assignment applied");
        volumes
    }

    /// Warns about what this assignment could not use, once while it
    /// stays the same (every delta re-derives the whole state).
    fn log_skipped(&self, revision: u64, skipped: &[Skipped]) {
        let mut last = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        for s in skipped {
            if last.contains(s) {
                tracing::debug!(revision, entry = %s, "assignment entry still not used as sent");
            } else {
                tracing::warn!(revision, entry = %s, "assignment entry not used as sent");
            }
        }
        *last = skipped.to_vec();
    }

    /// Makes the routes to other nodes' pod CIDRs match. Failures are
    /// logged, not fatal: instances on this node still run.
    async fn apply_peers(&self, node_ip: Option<Ipv4Addr>, routes: &[crate::network::PeerRoute]) {
        use crate::config::CrossHost;
        use crate::network::CrossHostMode;
        let mode = match (self.cross_host, node_ip) {
            (CrossHost::Direct, _) => CrossHostMode::Direct,
            (CrossHost::Vxlan, Some(local_ip)) => CrossHostMode::Vxlan {
                vni: self.vxlan_vni,
                device: format!("{}vx", self.network.config().link_prefix),
                local_ip,
            },
            (CrossHost::Vxlan, None) => {
                tracing::error!("--cross-host vxlan needs this node's address (--node-ip)");
                return;
            }
        };
        if let Err(e) = self.network.set_peer_routes(&mode, routes).await {
            tracing::warn!(error = %e, peers = routes.len(), "cannot update routes to other nodes");
        }
    }
}

/// Writes identities, policy and services into the BPF maps (replace-sets:
/// stale entries go; the datapath diffs against what it last wrote, so an
/// unchanged assignment writes nothing and one changed rule is one map
/// write). Map writes are system calls: off the async threads.
async fn write_datapath(
    dp: Arc<crate::datapath::Datapath>,
    state: DatapathState,
    pod_cidr: Option<ipnet::Ipv4Net>,
    mesh_on: bool,
) {
    let done = tokio::task::spawn_blocking(move || {
        let identities = identity_flags(&state, pod_cidr, mesh_on);
        let results = [
            ("identities", dp.set_identities_with_flags(&identities)),
            (
                "policy",
                dp.apply_policy(
                    &state.rules,
                    &state.ingress_enforced,
                    &state.egress_enforced,
                ),
            ),
            ("services", dp.set_services(&state.services)),
        ];
        for (what, r) in results {
            if let Err(e) = r {
                tracing::warn!(error = %e, what, "cannot update the datapath");
            }
        }
        tracing::debug!(
            identities = state.identities.len(),
            rules = state.rules.len(),
            services = state.services.len(),
            "datapath updated"
        );
    })
    .await;
    if let Err(e) = done {
        tracing::warn!(error = %e, "datapath update task failed");
    }
}

/// Each address with its mesh flags. Without a proxy on this node its own
/// instances are never marked (strict would drop what no proxy accepts);
/// addresses outside this node's pod CIDR are remote.
fn identity_flags(
    state: &DatapathState,
    pod_cidr: Option<ipnet::Ipv4Net>,
    mesh_on: bool,
) -> Vec<(std::net::Ipv4Addr, u32, u32)> {
    let mesh: std::collections::HashMap<std::net::Ipv4Addr, bool> =
        state.mesh.iter().map(|m| (m.ip, m.strict)).collect();
    state
        .identities
        .iter()
        .map(|(ip, id)| {
            let local = pod_cidr.is_some_and(|c| c.contains(ip));
            let flags = match mesh.get(ip) {
                _ if !mesh_on => 0,
                None => 0,
                Some(strict) => {
                    ironmesh_ebpf::ID_MESH
                        | if *strict { ironmesh_ebpf::ID_STRICT } else { 0 }
                        | if local { 0 } else { ironmesh_ebpf::ID_REMOTE }
                }
            };
            (*ip, *id, flags)
        })
        .collect()
}

/// The proxies' view of one assignment.
fn mesh_view(
    state: &DatapathState,
    peers: &[crate::network::PeerRoute],
) -> crate::mesh::policy::View {
    use crate::mesh::policy::{MeshPeer, View};
    let mut v = View {
        rules: state.rules.clone(),
        ingress_enforced: state.ingress_enforced.iter().copied().collect(),
        egress_enforced: state.egress_enforced.iter().copied().collect(),
        nodes: peers.iter().map(|p| p.node.clone()).collect(),
        ..View::default()
    };
    for m in &state.mesh {
        v.workload_identity.insert(m.workload.clone(), m.identity);
        v.peers.insert(
            m.ip,
            MeshPeer {
                workload: m.workload.clone(),
                identity: m.identity,
                strict: m.strict,
            },
        );
    }
    v
}

/// Every IPv4 address of this host's interfaces, except loopback.
fn host_ipv4_addresses() -> Vec<Ipv4Addr> {
    match crate::inventory::interface_addresses() {
        Ok(list) => list
            .iter()
            .filter_map(|(_, cidr)| cidr.split('/').next()?.parse::<Ipv4Addr>().ok())
            .filter(|ip| !ip.is_loopback())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's addresses for the host identity");
            Vec::new()
        }
    }
}

/// In the background: converges the node's volumes on `wanted` (when an
/// assignment has been applied; volumes still mounted by instances here
/// are kept), then reports pools and volume usage to `tx` (dropped without
/// a session).
pub(super) fn storage_pass(
    storage: Option<&Arc<Storage>>,
    supervisor: &Supervisor,
    wanted: Option<Arc<VolumePlan>>,
    tx: Option<mpsc::Sender<AgentMessage>>,
) {
    let Some(storage) = storage.cloned() else {
        return;
    };
    let (in_use, removing) = supervisor.volumes_in_use();
    let runtime = supervisor.runtime();
    let state_dir = supervisor.state_dir();
    tokio::spawn(async move {
        let image_bytes = match runtime.content_bytes().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count image bytes");
                0
            }
        };
        let report = tokio::task::spawn_blocking(move || {
            if let Some(wanted) = &wanted {
                for e in storage.converge(wanted, &in_use, !removing) {
                    tracing::warn!(error = %e, "volume not converged");
                }
            }
            let mut r = storage_report(&storage);
            let (state_bytes, log_bytes) =
                crate::supervisor::state_disk_use(&state_dir, &[storage.volumes_dir()]);
            r.disk_use = Some(ironmesh_proto::v1::DiskUse {
                image_bytes,
                log_bytes,
                volume_bytes: r.volumes.iter().map(|v| v.used_bytes).sum(),
                state_bytes,
            });
            r
        })
        .await;
        match (report, tx) {
            (Ok(r), Some(tx)) => {
                let _ = tx.send(msg(agent_message::Msg::Storage(r))).await;
            }
            (Ok(_), None) => {}
            (Err(e), _) => tracing::warn!(error = %e, "storage pass failed"),
        }
    });
}

/// Pools and volume usage, as the controller wants them.
pub fn storage_report(storage: &Storage) -> ironmesh_proto::v1::StorageReport {
    use ironmesh_proto::v1::{StoragePool, StorageReport, VolumeUsage};
    StorageReport {
        pools: storage
            .pools()
            .into_iter()
            .map(|p| StoragePool {
                name: p.name,
                kind: p.kind,
                path: p.path.display().to_string(),
                capacity_bytes: p.capacity_bytes,
                free_bytes: p.free_bytes,
                allocated_bytes: p.allocated_bytes,
                backends: p.backends.iter().map(|b| b.to_string()).collect(),
            })
            .collect(),
        volumes: storage
            .volumes()
            .into_iter()
            .map(|v| VolumeUsage {
                name: v.name,
                pool: v.pool,
                backend: v.backend.to_string(),
                size_bytes: v.size_bytes,
                used_bytes: v.used_bytes,
            })
            .collect(),
        disk_use: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    fn whole(revision: u64) -> Assignment {
        Assignment {
            revision,
            ..Default::default()
        }
    }

    /// An apply task whose applies each wait for a permit of the returned
    /// semaphore and record the revisions they were given.
    fn gated() -> (
        Feed,
        watch::Receiver<Applied>,
        Arc<Semaphore>,
        mpsc::UnboundedReceiver<u64>,
        tokio::task::JoinHandle<()>,
    ) {
        let (feed, desired) = Feed::new();
        let (applied_tx, applied) = watch::channel(Applied::default());
        let gate = Arc::new(Semaphore::new(0));
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let g = gate.clone();
        let task = tokio::spawn(run(desired, applied_tx, move |h: Arc<Handoff>| {
            let gate = g.clone();
            let seen = seen_tx.clone();
            async move {
                seen.send(h.assignment.revision).unwrap();
                gate.acquire().await.unwrap().forget();
                assert_ne!(h.assignment.revision, 13, "a test panic");
                Arc::new(VolumePlan::default())
            }
        }));
        (feed, applied, gate, seen, task)
    }

    #[tokio::test]
    async fn only_the_newest_of_a_burst_is_applied_next() {
        let (mut feed, mut applied, gate, mut seen, task) = gated();
        feed.hand_off(None, whole(1));
        assert_eq!(seen.recv().await, Some(1), "the apply task started on 1");
        for r in 2..=5 {
            feed.hand_off(None, whole(r));
        }
        gate.add_permits(1);
        assert_eq!(seen.recv().await, Some(5), "2, 3 and 4 were replaced");
        gate.add_permits(1);
        let a = applied.wait_for(|a| a.revision == 5).await.unwrap().clone();
        assert_eq!(a.seq, 5);
        assert!(a.volumes.is_some());
        drop(feed);
        task.await.unwrap();
        assert_eq!(seen.recv().await, None, "nothing else was applied");
    }

    #[tokio::test]
    async fn a_panicking_apply_is_not_published_and_the_next_one_is_applied() {
        let (mut feed, mut applied, gate, mut seen, task) = gated();
        gate.add_permits(2);
        feed.hand_off(None, whole(13));
        assert_eq!(seen.recv().await, Some(13));
        feed.hand_off(None, whole(14));
        let a = applied.wait_for(|a| a.revision != 0).await.unwrap().clone();
        assert_eq!((a.seq, a.revision), (2, 14));
        drop(feed);
        task.await.unwrap();
    }
}
