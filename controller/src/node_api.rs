//! The node surface: `Join` (bootstrap token + CSR → node certificate) and
//! `Sync` (one bidirectional stream per agent).
//!
//! The node's identity always comes from its verified client certificate;
//! the `node_name` an agent sends in `Hello` is only checked against it,
//! and the certificate must be the node's current, unrevoked one
//! ([`crate::revocation`]). Who may join is [`crate::join`]'s decision,
//! which blobs a node may fetch [`crate::blob_access`]'s, and what a report
//! may say [`crate::report_checks`]'s. This module records what agents
//! report (inventory into Node status, heartbeats into [`Liveness`]); it
//! does not judge readiness.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ironmesh_api::instance::InstanceStatus;
use ironmesh_api::object::Instance;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{
    agent_message, controller_message, node_service_server::NodeService, AgentMessage,
    ControllerMessage, DatapathStatus, FetchBlobRequest, InstanceEvent, InstanceState, Inventory,
    IssueWorkloadCertificateRequest, JoinRequest, JoinResponse, QueueAckRequest, QueueAckResponse,
    QueueItem, QueueLeaseRequest, QueueLeaseResponse, QueuePushRequest, QueuePushResponse,
    RenewCertificateRequest, Settings, Welcome, WorkloadCertificate,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::liveness::{set_ready, Liveness};
use crate::metrics::ControllerMetrics;
use crate::pki::{ClusterCa, Identity};
use crate::resources::Resources;

/// How long an agent has to send `Hello` after opening a stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the stream waits after Hello for the agent's inventory before
/// it registers the node without one.
const INVENTORY_WAIT: Duration = Duration::from_secs(2);

pub struct NodeApi {
    pub ca: Arc<ClusterCa>,
    pub ipam: crate::ipam::Ipam,
    pub images: crate::images::ImageStore,
    pub logs: crate::logs::LogRelay,
    pub flows: crate::flow_log::FlowLog,
    pub admission: crate::join::Admission,
    pub revocations: crate::revocation::Revocations,
    pub blobs: crate::blob_access::BlobAccess,
    pub resources: Resources,
    pub liveness: Liveness,
    pub metrics: Arc<ControllerMetrics>,
    pub assignments: crate::assignments::Assignments,
    pub mesh: crate::mesh::MeshSettings,
    /// Ends every Sync stream with `UNAVAILABLE: controller shutting down`.
    pub shutdown: ironmesh_process::Shutdown,
}

/// The caller's verified certificate.
fn peer_cert<T>(req: &Request<T>) -> Result<crate::pki::CertInfo, Status> {
    let leaf = req
        .peer_certs()
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    crate::pki::cert_info_from_der(&leaf)
        .map_err(|e| Status::unauthenticated(format!("client certificate not accepted: {e}")))
}

fn cert_status(e: crate::revocation::CertCheckError) -> Status {
    match e {
        crate::revocation::CertCheckError::Store(e) => {
            Status::unavailable(format!("cannot check the node certificate: {e}"))
        }
        other => Status::permission_denied(other.to_string()),
    }
}

fn queue_status(e: crate::queue::QueueError) -> Status {
    match e {
        crate::queue::QueueError::NotLeased(_) => Status::failed_precondition(e.to_string()),
        crate::queue::QueueError::PushTooLarge(_) => Status::invalid_argument(e.to_string()),
        crate::queue::QueueError::RunFull { .. } => Status::resource_exhausted(e.to_string()),
        crate::queue::QueueError::Contended(_) => Status::aborted(e.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

impl NodeApi {
    /// The calling node, if its certificate is a node's current, unrevoked
    /// one; `what` names the call in the refusal of any other caller.
    async fn node_caller<T>(
        &self,
        req: &Request<T>,
        what: &str,
    ) -> Result<(String, crate::pki::CertInfo), Status> {
        let info = peer_cert(req)?;
        let node = match &info.identity {
            Identity::Node(n) => n.clone(),
            other => {
                return Err(Status::permission_denied(format!(
                    "{what} requires a node certificate; caller is {other}"
                )))
            }
        };
        if let Err(e) = self.revocations.check_node(&node, &info).await {
            tracing::warn!(node = %node, serial = %info.serial, error = %e, "node call refused");
            return Err(cert_status(e));
        }
        Ok((node, info))
    }

    /// The step's `leaseSeconds`, from the run's snapshot of its Pipeline.
    async fn lease_seconds(
        &self,
        task: &ironmesh_api::instance::TaskRef,
    ) -> Result<Duration, Status> {
        let run = self
            .resources
            .get(Kind::PipelineRun, &task.run)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("pipeline run {} is gone", task.run)))?;
        let secs = run
            .object
            .pointer("/status/pipelineSpec/steps")
            .and_then(Value::as_array)
            .and_then(|steps| steps.iter().find(|s| s["name"] == task.step.as_str()))
            .and_then(|s| s.get("leaseSeconds"))
            .and_then(Value::as_u64)
            .unwrap_or(ironmesh_api::pipeline::DEFAULT_LEASE_SECONDS.into());
        Ok(Duration::from_secs(secs))
    }

    /// The task of `instance`, if it is a pipeline step bound to `node`.
    async fn step_instance(
        &self,
        node: &str,
        instance: &str,
    ) -> Result<ironmesh_api::instance::TaskRef, Status> {
        let o = self
            .resources
            .get(Kind::Instance, instance)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("instance {instance:?} does not exist")))?;
        let spec: ironmesh_api::instance::InstanceSpec = o
            .object
            .get("spec")
            .cloned()
            .and_then(|s| serde_json::from_value(s).ok())
            .ok_or_else(|| Status::internal(format!("instance {instance:?} is unreadable")))?;
        if spec.node.as_deref() != Some(node) {
            return Err(Status::permission_denied(format!(
                "instance {instance:?} is not bound to node {node}"
            )));
        }
        spec.task.ok_or_else(|| {
            Status::failed_precondition(format!(
                "instance {instance:?} is not a pipeline step; only steps have work queues"
            ))
        })
    }
}

/// True if `name` is a DNS-1123 label, the rule for node names.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A sync stream's outbound queue. Boxed: tokio allocates a channel's
/// slots 32 at a time, and an unboxed `ControllerMessage` (an inline
/// `Assignment`) with its `Status` made that ~16 kB per stream, ~30 MB at
/// 1,000 nodes (docs/scale.md).
pub type Outbound = mpsc::Sender<Box<Result<ControllerMessage, Status>>>;

type SyncStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let remote = req.remote_addr();
        let req = req.into_inner();
        match self.admission.join(&req, remote).await {
            Ok(resp) => {
                ControllerMetrics::count(&self.metrics.joins, "ok");
                tracing::info!(node = %req.node_name, ?remote, "node joined");
                Ok(Response::new(resp))
            }
            Err(e) => {
                ControllerMetrics::count(&self.metrics.joins, e.label());
                tracing::warn!(node = %req.node_name, ?remote, error = %e, "join refused");
                Err(e.into())
            }
        }
    }

    async fn renew_certificate(
        &self,
        req: Request<RenewCertificateRequest>,
    ) -> Result<Response<JoinResponse>, Status> {
        let (node, info) = self.node_caller(&req, "renewing a certificate").await?;
        let csr = req.into_inner().csr_pem;
        let out = self
            .admission
            .renew(&self.revocations, &node, &info, &csr)
            .await;
        ControllerMetrics::count(
            &self.metrics.joins,
            if out.is_ok() {
                "renewed"
            } else {
                "renew_refused"
            },
        );
        out.map(Response::new)
    }

    async fn issue_workload_certificate(
        &self,
        req: Request<IssueWorkloadCertificateRequest>,
    ) -> Result<Response<WorkloadCertificate>, Status> {
        let (node, _) = self
            .node_caller(&req, "asking for a workload certificate")
            .await?;
        let out = crate::mesh::issue(
            &self.ca,
            &self.resources,
            &self.mesh,
            &node,
            req.into_inner(),
        )
        .await;
        if let Err(e) = &out {
            tracing::warn!(node = %node, error = %e.message(), "workload certificate refused");
        }
        ControllerMetrics::count(
            &self.metrics.joins,
            if out.is_ok() {
                "workload_cert_issued"
            } else {
                "workload_cert_refused"
            },
        );
        out.map(Response::new)
    }

    type FetchBlobStream = crate::images::BlobStream;

    async fn fetch_blob(
        &self,
        req: Request<FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let (node, _) = self.node_caller(&req, "fetching blobs").await?;
        let req = req.into_inner();
        self.blobs.check(&node, &req.digest).await?;
        self.images.fetch_blob(req).await.map(Response::new)
    }

    async fn queue_lease(
        &self,
        req: Request<QueueLeaseRequest>,
    ) -> Result<Response<QueueLeaseResponse>, Status> {
        let (node, _) = self.node_caller(&req, "work queues").await?;
        let r = req.into_inner();
        let task = self.step_instance(&node, &r.instance).await?;
        if !task.worker {
            return Err(Status::failed_precondition(format!(
                "step {} of run {} is not a worker step; only workers lease items",
                task.step, task.run
            )));
        }
        let lease_for = self.lease_seconds(&task).await?;
        let q = crate::queue::Queue::new(self.resources.store().clone(), &task.run, &task.step);
        let out = q
            .lease(&r.instance, r.max as usize, lease_for)
            .await
            .map_err(queue_status)?;
        Ok(Response::new(match out {
            crate::queue::LeaseOutcome::Items(items) => QueueLeaseResponse {
                items: {
                    self.metrics.count_queue("leased", items.len());
                    items
                }
                .into_iter()
                .map(|l| QueueItem {
                    id: l.id,
                    item: l.item,
                })
                .collect(),
                drained: false,
            },
            crate::queue::LeaseOutcome::Wait => QueueLeaseResponse::default(),
            crate::queue::LeaseOutcome::Drained => QueueLeaseResponse {
                items: Vec::new(),
                drained: true,
            },
        }))
    }

    async fn queue_ack(
        &self,
        req: Request<QueueAckRequest>,
    ) -> Result<Response<QueueAckResponse>, Status> {
        let (node, _) = self.node_caller(&req, "work queues").await?;
        let r = req.into_inner();
        let task = self.step_instance(&node, &r.instance).await?;
        let q = crate::queue::Queue::new(self.resources.store().clone(), &task.run, &task.step);
        let n = q
            .ack(&r.instance, &r.ids, r.release)
            .await
            .map_err(queue_status)?;
        self.metrics
            .count_queue(if r.release { "released" } else { "acked" }, n);
        Ok(Response::new(QueueAckResponse {
            acknowledged: n as u32,
        }))
    }

    async fn queue_push(
        &self,
        req: Request<QueuePushRequest>,
    ) -> Result<Response<QueuePushResponse>, Status> {
        let (node, _) = self.node_caller(&req, "work queues").await?;
        let r = req.into_inner();
        let task = self.step_instance(&node, &r.instance).await?;
        let run = self
            .resources
            .get(Kind::PipelineRun, &task.run)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("pipeline run {} is gone", task.run)))?;
        let spec: Option<ironmesh_api::pipeline::PipelineSpec> = run
            .object
            .pointer("/status/pipelineSpec")
            .and_then(|s| serde_json::from_value(s.clone()).ok());
        let workers: Vec<String> = spec
            .iter()
            .flat_map(|s| s.steps.iter())
            .filter(|s| s.mode == ironmesh_api::pipeline::StepMode::Worker)
            .map(|s| s.name.clone())
            .collect();
        if !workers.contains(&r.step) {
            return Err(Status::invalid_argument(format!(
                "run {} has no worker step {:?}; its worker steps are [{}]",
                task.run,
                r.step,
                workers.join(", ")
            )));
        }
        if let Some(bad) = r.items.iter().position(|i| i.is_empty() || i.len() > 4096) {
            return Err(Status::invalid_argument(format!(
                "item {bad}: an item must be 1 to 4096 bytes"
            )));
        }
        let q = crate::queue::Queue::new(self.resources.store().clone(), &task.run, &r.step);
        let n = q.push(&r.items).await.map_err(queue_status)?;
        self.metrics.count_queue("pushed", n);
        tracing::debug!(run = %task.run, step = %r.step, items = n, from = %r.instance, "items queued");
        Ok(Response::new(QueuePushResponse { pushed: n as u32 }))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let info = peer_cert(&req)?;
        let node = match &info.identity {
            Identity::Node(n) => n.clone(),
            other => {
                return Err(Status::permission_denied(format!(
                    "sync requires a node certificate; caller is {other}"
                )))
            }
        };
        let fingerprint = info.fingerprint.clone();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??
            .ok_or_else(|| Status::cancelled("stream closed before Hello"))?;
        let hello = match first.msg {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.node_name != node {
            tracing::warn!(certificate = %node, claimed = %hello.node_name, "sync refused: node claims another identity");
            return Err(Status::permission_denied(format!(
                "certificate is for node {node:?} but the stream claims {:?}",
                hello.node_name
            )));
        }

        // A revoked or superseded certificate records nothing: a deleted
        // Node stays deleted.
        if let Err(e) = self.revocations.check_node(&node, &info).await {
            tracing::warn!(node = %node, serial = %info.serial, error = %e, "sync refused");
            return Err(cert_status(e));
        }

        if !hello.node_ip.is_empty() && hello.node_ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "node_ip {:?} is not an IPv4 address",
                hello.node_ip
            )));
        }
        // Agents send their inventory right after Hello: take it into the
        // same write that marks the node Ready, so a Ready node always has
        // its capacity (and a reconnect costs one write, not two).
        let mut held = None;
        let mut inventory = None;
        match tokio::time::timeout(INVENTORY_WAIT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(agent_message::Msg::Inventory(inv)),
            }))) => {
                crate::report_checks::check_inventory(&inv)?;
                inventory = Some(inv)
            }
            Ok(Ok(Some(other))) => held = Some(other),
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed after Hello")),
            Ok(Err(e)) => return Err(e),
            Err(_) => {}
        }
        let known = self
            .resources
            .get(Kind::Node, &node)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.object.pointer("/status/podCIDR")?.as_str()?.parse().ok());
        let pod_cidr = self
            .ipam
            .allocate(self.resources.store().as_ref(), &node, known)
            .await
            .map_err(|e| {
                tracing::warn!(node = %node, error = %e, "sync refused: no pod CIDR for the node");
                Status::resource_exhausted(e.to_string())
            })?;
        self.register_node(
            &node,
            &fingerprint,
            &pod_cidr.to_string(),
            &hello.node_ip,
            inventory.as_ref(),
            hello.datapath.as_ref(),
        )
        .await?;
        let mut paced = self.liveness.heartbeat_interval();
        let interval = *paced.borrow_and_update();
        let session = self.liveness.connect(&node, interval);
        self.metrics.sync_streams.inc();
        tracing::info!(node = %node, session, agent_version = %hello.agent_version, acked = hello.acked_revision, "sync stream opened");

        let (tx, rx): (Outbound, _) = mpsc::channel(64);
        let welcome = ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(Welcome {
                node_name: node.clone(),
                heartbeat_interval_ms: interval.as_millis() as u32,
                pod_cidr: pod_cidr.to_string(),
                cluster_cidr: self.ipam.cluster.to_string(),
                trust_domain: self.mesh.trust_domain.clone(),
            })),
        };
        // A fresh channel with room for 64: this cannot block.
        let _ = tx.send(Box::new(Ok(welcome))).await;
        self.logs.connect(&node, session, tx.clone());
        let incremental = hello
            .capabilities
            .iter()
            .any(|c| c == ironmesh_proto::assignment::INCREMENTAL);
        let settings = hello
            .capabilities
            .iter()
            .any(|c| c == ironmesh_proto::SETTINGS);
        let in_parts = hello
            .capabilities
            .iter()
            .any(|c| c == ironmesh_proto::assignment::PARTS);
        tokio::spawn(forward_assignments(
            node.clone(),
            self.assignments.subscribe(&node, incremental),
            in_parts,
            self.metrics.clone(),
            tx.clone(),
        ));

        let resources = self.resources.clone();
        let liveness = self.liveness.clone();
        let metrics = self.metrics.clone();
        let logs = self.logs.clone();
        let flows = self.flows.clone();
        let revocations = self.revocations.clone();
        let mut revoked = revocations.subscribe();
        revoked.borrow_and_update();
        let serial = info.serial;
        let stopping = self.shutdown.clone().wait();
        tokio::spawn(async move {
            tokio::pin!(stopping);
            if let Some(m) = held {
                if let Err(e) = handle_agent_message(
                    &node, pod_cidr, session, m, &resources, &liveness, &metrics, &logs, &flows,
                )
                .await
                {
                    let _ = tx.send(Box::new(Err(e))).await;
                    liveness.disconnect(&node, session);
                    logs.disconnect(&node, session);
                    metrics.sync_streams.dec();
                    return;
                }
            }
            let outcome = loop {
                tokio::select! {
                    _ = tx.closed() => break "controller side closed".to_string(),
                    // The response stream ends itself with the status
                    // (until_shutdown); this only stops reading.
                    _ = &mut stopping => break ironmesh_proto::SHUTTING_DOWN.to_string(),
                    // The cluster grew or shrank past a pacing step: tell
                    // the agent (the grace follows, see liveness).
                    r = paced.changed(), if settings => {
                        if r.is_err() {
                            break "controller shutting down".to_string();
                        }
                        let interval = *paced.borrow_and_update();
                        liveness.told(&node, session, interval);
                        let m = ControllerMessage {
                            msg: Some(controller_message::Msg::Settings(Settings {
                                heartbeat_interval_ms: interval.as_millis() as u32,
                            })),
                        };
                        if tx.send(Box::new(Ok(m))).await.is_err() {
                            break "controller side closed".to_string();
                        }
                        tracing::debug!(node = %node, interval_ms = interval.as_millis() as u64, "heartbeat interval changed");
                    }
                    // The certificate was revoked while the stream was
                    // open (Node deleted, or re-provisioned): end it.
                    Ok(()) = revoked.changed() => {
                        if revocations.is_revoked_cached(&serial) {
                            let why = format!("the certificate of node {node} was revoked; join again with a new token (imctl token create)");
                            let _ = tx.send(Box::new(Err(Status::permission_denied(why.clone())))).await;
                            break why;
                        }
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => {
                            if let Err(e) = handle_agent_message(&node, pod_cidr, session, m, &resources, &liveness, &metrics, &logs, &flows).await {
                                let _ = tx.send(Box::new(Err(e.clone()))).await;
                                break e.message().to_string();
                            }
                        }
                        Ok(None) => break "agent closed the stream".to_string(),
                        Err(e) => break format!("stream error: {}", e.message()),
                    }
                }
            };
            liveness.disconnect(&node, session);
            logs.disconnect(&node, session);
            metrics.sync_streams.dec();
            tracing::info!(node = %node, session, reason = %outcome, "sync stream ended");
        });
        Ok(Response::new(crate::stopping::until_shutdown(
            futures::StreamExt::map(ReceiverStream::new(rx), |m| *m),
            self.shutdown.clone(),
        )))
    }
}

impl NodeApi {
    /// Creates the Node object on first contact, records the certificate
    /// fingerprint, and marks it Ready.
    async fn register_node(
        &self,
        node: &str,
        fingerprint: &str,
        pod_cidr: &str,
        node_ip: &str,
        inventory: Option<&Inventory>,
        datapath: Option<&DatapathStatus>,
    ) -> Result<(), Status> {
        let name = node.to_string();
        let inventory = inventory.map(inventory_status);
        self.resources
            .update(Kind::Node, node, |cur| {
                let mut obj = match cur {
                    Some(o) => o.clone(),
                    None => json!({
                        "apiVersion": ironmesh_api::API_VERSION,
                        "kind": "Node",
                        "metadata": {"name": name, "labels": {"ironmesh.dev/hostname": name}},
                        "spec": {},
                        "status": {},
                    }),
                };
                let mut changed = cur.is_none();
                if obj.pointer("/status/podCIDR").and_then(Value::as_str) != Some(pod_cidr) {
                    obj["status"]["podCIDR"] = json!(pod_cidr);
                    changed = true;
                }
                if !node_ip.is_empty()
                    && obj.pointer("/status/internalIP").and_then(Value::as_str) != Some(node_ip)
                {
                    obj["status"]["internalIP"] = json!(node_ip);
                    changed = true;
                }
                if obj
                    .pointer("/status/certificateFingerprint")
                    .and_then(Value::as_str)
                    != Some(fingerprint)
                {
                    obj["status"]["certificateFingerprint"] = json!(fingerprint);
                    changed = true;
                }
                if let Some(status) = &inventory {
                    for (k, v) in status.as_object().into_iter().flatten() {
                        if obj["status"].get(k) != Some(v) {
                            obj["status"][k] = v.clone();
                            changed = true;
                        }
                    }
                }
                changed |= set_ready(
                    &mut obj,
                    true,
                    "AgentConnected",
                    "agent opened its sync stream",
                );
                if let Some(d) = datapath {
                    changed |= set_datapath_ready(&mut obj, d);
                }
                changed.then_some(obj)
            })
            .await
            .map_err(|e| Status::unavailable(format!("cannot record node {node:?}: {e}")))?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)] // one shared handle per concern the stream feeds
async fn handle_agent_message(
    node: &str,
    pod_cidr: ironmesh_api::net::Ipv4Cidr,
    session: u64,
    m: AgentMessage,
    resources: &Resources,
    liveness: &Liveness,
    metrics: &ControllerMetrics,
    logs: &crate::logs::LogRelay,
    flows: &crate::flow_log::FlowLog,
) -> Result<(), Status> {
    match m.msg {
        Some(agent_message::Msg::Heartbeat(_)) => {
            liveness.heartbeat(node, session);
            metrics.heartbeats.inc();
        }
        Some(agent_message::Msg::Inventory(inv)) => {
            crate::report_checks::check_inventory(&inv)?;
            liveness.heartbeat(node, session);
            let status = inventory_status(&inv);
            resources
                .update(Kind::Node, node, |cur| {
                    let mut obj = cur?.clone();
                    let before = obj.clone();
                    for (k, v) in status.as_object().into_iter().flatten() {
                        obj["status"][k] = v.clone();
                    }
                    (obj != before).then_some(obj)
                })
                .await
                .map_err(|e| Status::unavailable(format!("cannot record inventory: {e}")))?;
            tracing::debug!(
                node,
                cpus = inv.cpu.as_ref().map(|c| c.logical),
                "inventory recorded"
            );
        }
        Some(agent_message::Msg::Ack(a)) => {
            tracing::debug!(node, revision = a.revision, "assignment acknowledged");
        }
        Some(agent_message::Msg::Instances(report)) => {
            crate::report_checks::check_instance_states(&report.instances, pod_cidr)?;
            liveness.heartbeat(node, session);
            record_instance_states(resources, node, report.instances).await?;
        }
        Some(agent_message::Msg::Event(ev)) => {
            crate::report_checks::check_event(&ev)?;
            record_instance_event(resources, node, ev).await?;
        }
        Some(agent_message::Msg::Log(chunk)) => logs.deliver(node, chunk),
        Some(agent_message::Msg::Flows(batch)) => flows.ingest(resources, node, batch).await,
        Some(agent_message::Msg::Storage(report)) => {
            crate::report_checks::check_storage(&report)?;
            crate::volumes::record_storage(resources, node, report)
                .await
                .map_err(|e| Status::unavailable(format!("cannot record storage: {e}")))?;
        }
        Some(agent_message::Msg::Hello(_)) => {
            return Err(Status::invalid_argument("Hello may only be sent once"));
        }
        None => return Err(Status::invalid_argument("empty agent message")),
    }
    Ok(())
}

/// Largest assignment message to an agent that takes parts: each stream's
/// encode buffer keeps the capacity of the largest message it sent, and a
/// whole assignment of a 10,000-instance cluster is ~130 kB — times 1,000
/// streams. 4 kB rather than 16 kB: with the lean codec
/// (`ironmesh_proto::codec`) that is about all a quiet stream keeps.
pub const ASSIGNMENT_PART_BYTES: usize = 4 << 10;

/// Sends the node's assignment as the assignments reconciler publishes it
/// (in parts when `in_parts`), until the stream closes.
async fn forward_assignments(
    node: String,
    mut sub: crate::assignments::Subscription,
    in_parts: bool,
    metrics: Arc<ControllerMetrics>,
    tx: Outbound,
) {
    use prost::Message;
    loop {
        let a = tokio::select! {
            _ = tx.closed() => return,
            a = sub.next() => a,
        };
        metrics.count_assignment(a.delta.is_some(), a.encoded_len());
        tracing::debug!(node = %node, revision = a.revision, delta = a.delta.is_some(), instances = a.instances.len(), "assignment sent");
        let parts = if in_parts {
            ironmesh_proto::assignment::split(a, ASSIGNMENT_PART_BYTES)
        } else {
            vec![a]
        };
        for part in parts {
            let msg = ControllerMessage {
                msg: Some(controller_message::Msg::Assignment(part)),
            };
            if tx.send(Box::new(Ok(msg))).await.is_err() {
                return;
            }
        }
    }
}

/// Records what the agent on `node` says about its instances, in one
/// transaction per batch. Reports about instances bound elsewhere, or about
/// an older spec, are ignored; a report naming an invalid instance is
/// refused whole.
async fn record_instance_states(
    resources: &Resources,
    node: &str,
    states: Vec<InstanceState>,
) -> Result<(), Status> {
    if let Some(bad) = states.iter().find(|st| !valid_node_name(&st.name)) {
        return Err(Status::invalid_argument(format!(
            "instance name {:?} in a report is not valid",
            bad.name
        )));
    }
    // The last state of an instance in one report wins.
    let by_name: std::collections::HashMap<String, InstanceState> =
        states.into_iter().map(|st| (st.name.clone(), st)).collect();
    let mut names: Vec<String> = by_name.keys().cloned().collect();
    names.sort();
    resources
        .update_many(Kind::Instance, &names, |name, cur| {
            let (Some(cur), Some(st)) = (cur, by_name.get(name)) else {
                return crate::resources::Change::Keep;
            };
            match Instance::deserialize(cur) {
                Ok(cur) => instance_with_state(cur, node, st).map_or(
                    crate::resources::Change::Keep,
                    |o| crate::resources::Change::Put(crate::resources::to_json(&o)),
                ),
                Err(e) => {
                    tracing::warn!(instance = %name, error = %e, "unreadable instance; report ignored");
                    crate::resources::Change::Keep
                }
            }
        })
        .await
        .map_err(|e| Status::unavailable(format!("cannot record instance states: {e}")))?;
    Ok(())
}

/// The instance object with the reported state as its status, or `None`
/// when the report does not apply to it.
pub(crate) fn instance_with_state(
    mut o: Instance,
    node: &str,
    st: &InstanceState,
) -> Option<Instance> {
    if o.spec.node.as_deref() != Some(node) || o.spec.workload_generation != st.spec_generation {
        return None;
    }
    let started_at = (st.started_unix_ms > 0).then(|| {
        crate::resources::rfc3339(unix_time(Duration::from_millis(st.started_unix_ms as u64)))
    });
    let events = o.status.take().map(|s| s.events).unwrap_or_default();
    o.status = Some(InstanceStatus {
        phase: crate::workloads::reported_phase(st),
        ready: st.ready,
        restarts: st.restarts,
        // An agent before `optional exit_code` sent no field for exit 0.
        exit_code: st.exit_code.or((st.legacy_has_exit_code).then_some(0)),
        reason: st.reason.clone(),
        message: st.message.clone(),
        pid: (st.pid > 0).then_some(st.pid),
        ip: (!st.ip.is_empty()).then(|| st.ip.clone()),
        started_at,
        events,
    });
    Some(o)
}

/// Appends an event to the instance's recent events.
async fn record_instance_event(
    resources: &Resources,
    node: &str,
    ev: InstanceEvent,
) -> Result<(), Status> {
    if !valid_node_name(&ev.instance) {
        return Err(Status::invalid_argument(format!(
            "instance name {:?} in an event is not valid",
            ev.instance
        )));
    }
    let time =
        crate::resources::rfc3339(unix_time(Duration::from_millis(ev.unix_ms.max(0) as u64)));
    let event = ironmesh_api::instance::Event {
        kind: if ev.r#type == "Warning" {
            "Warning"
        } else {
            "Normal"
        }
        .to_string(),
        reason: ev.reason.clone(),
        message: ev.message.clone(),
        time,
        count: 1,
    };
    resources
        .update_typed(Kind::Instance, &ev.instance, |cur: Option<Instance>| {
            let mut o = cur?;
            if o.spec.node.as_deref() != Some(node) {
                return None;
            }
            ironmesh_api::instance::record_event(&mut o.status_mut().events, event.clone());
            Some(o)
        })
        .await
        .map_err(|e| {
            Status::unavailable(format!("cannot record event of {:?}: {e}", ev.instance))
        })?;
    Ok(())
}

/// The taint a node whose datapath is not ready carries (NoSchedule):
/// nothing new is placed there unless it tolerates running unprotected.
pub const DATAPATH_TAINT: &str = "ironmesh.dev/datapath-unavailable";

/// Keeps the `DatapathReady` condition and the [`DATAPATH_TAINT`] of a
/// Node object in line with what its agent reported; returns whether
/// anything changed. As Kubernetes taints nodes by condition, the taint is
/// written to `spec.taints`, where the scheduler and `imctl` see it.
pub fn set_datapath_ready(node: &mut Value, d: &DatapathStatus) -> bool {
    let (status, reason, message) = if d.ready {
        (
            "True",
            "DatapathLoaded",
            "eBPF programs loaded and attached".to_string(),
        )
    } else {
        let why = if d.message.is_empty() {
            "the agent reported no reason".to_string()
        } else {
            d.message.chars().take(1024).collect()
        };
        ("False", "DatapathNotLoaded", why)
    };
    let mut changed = false;
    if !node.get("status").is_some_and(Value::is_object) {
        node["status"] = json!({});
    }
    if !node["status"]["conditions"].is_array() {
        node["status"]["conditions"] = json!([]);
    }
    if let Some(conds) = node["status"]["conditions"].as_array_mut() {
        let cur = conds
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some("DatapathReady"));
        let same = cur.is_some_and(|c| {
            c.get("status").and_then(Value::as_str) == Some(status)
                && c.get("message").and_then(Value::as_str) == Some(message.as_str())
        });
        if !same {
            conds.retain(|c| c.get("type").and_then(Value::as_str) != Some("DatapathReady"));
            conds.push(json!({
                "type": "DatapathReady",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": crate::resources::now_rfc3339(),
            }));
            changed = true;
        }
    }
    if !node.get("spec").is_some_and(Value::is_object) {
        node["spec"] = json!({});
    }
    if !node["spec"]["taints"].is_array() {
        node["spec"]["taints"] = json!([]);
    }
    if let Some(taints) = node["spec"]["taints"].as_array_mut() {
        let has = taints.iter().any(|t| {
            t.get("key").and_then(Value::as_str) == Some(DATAPATH_TAINT)
                && t.get("effect").and_then(Value::as_str) == Some("NoSchedule")
        });
        if d.ready && has {
            taints.retain(|t| t.get("key").and_then(Value::as_str) != Some(DATAPATH_TAINT));
            changed = true;
        } else if !d.ready && !has {
            taints.push(json!({"key": DATAPATH_TAINT, "value": "", "effect": "NoSchedule"}));
            changed = true;
        }
    }
    if node["spec"]["taints"].as_array().is_some_and(Vec::is_empty) {
        if let Some(spec) = node["spec"].as_object_mut() {
            spec.remove("taints");
        }
    }
    changed
}

/// The epoch plus `since`, saturating instead of panicking (reports are
/// bounded by [`crate::report_checks`] first; this is the backstop).
fn unix_time(since: Duration) -> std::time::SystemTime {
    std::time::UNIX_EPOCH
        .checked_add(since)
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// The Node status fields that come from the agent's inventory.
pub fn inventory_status(inv: &Inventory) -> Value {
    let cpu = inv.cpu.clone().unwrap_or_default();
    let mem = inv.memory.unwrap_or_default();
    let capacity = json!({
        "cpu": cpu.logical.to_string(),
        "memory": ironmesh_api::quantity::format_bytes(mem.total_bytes),
    });
    let addresses: Vec<String> = inv
        .nics
        .iter()
        .filter(|n| !n.r#virtual)
        .flat_map(|n| n.addresses.iter().cloned())
        .collect();
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": addresses,
        "nodeInfo": {
            "hostname": inv.hostname,
            "os": inv.os,
            "kernel": inv.kernel,
            "arch": inv.arch,
            "agentVersion": inv.agent_version,
            "bootTime": crate::resources::rfc3339(unix_time(Duration::from_secs(inv.boot_time_unix))),
        },
        "inventory": {
            "cpu": {
                "logical": cpu.logical,
                "physical": cpu.physical,
                "model": cpu.model,
                "vendor": cpu.vendor,
                "frequencyMhz": cpu.frequency_mhz,
            },
            "memory": {
                "totalBytes": mem.total_bytes,
                "availableBytes": mem.available_bytes,
                "swapTotalBytes": mem.swap_total_bytes,
            },
            "disks": inv.disks.iter().map(|d| json!({
                "name": d.name,
                "sizeBytes": d.size_bytes,
                "rotational": d.rotational,
                "model": d.model,
                "removable": d.removable,
                "readOnly": d.read_only,
            })).collect::<Vec<_>>(),
            "nics": inv.nics.iter().map(|n| json!({
                "name": n.name,
                "mac": n.mac,
                "mtu": n.mtu,
                "addresses": n.addresses,
                "operState": n.oper_state,
                "speedMbps": n.speed_mbps,
                "virtual": n.r#virtual,
            })).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_status_sets_condition_and_taint_and_lifts_them() {
        let mut node = json!({"spec": {"taints": [{"key": "gpu", "value": "", "effect": "NoSchedule"}]}, "status": {}});
        let down = DatapathStatus {
            ready: false,
            message: "not on a bpf filesystem".into(),
        };
        assert!(set_datapath_ready(&mut node, &down));
        assert!(!set_datapath_ready(&mut node, &down), "no change twice");
        let cond = &node["status"]["conditions"][0];
        assert_eq!(cond["type"], "DatapathReady");
        assert_eq!(cond["status"], "False");
        assert_eq!(cond["message"], "not on a bpf filesystem");
        let taints = node["spec"]["taints"].as_array().expect("taints");
        assert_eq!(taints.len(), 2);
        assert_eq!(taints[1]["key"], DATAPATH_TAINT);
        assert_eq!(taints[1]["effect"], "NoSchedule");
        let spec: ironmesh_api::node::NodeSpec =
            serde_json::from_value(node["spec"].clone()).expect("a valid Node spec");
        assert_eq!(spec.taints.len(), 2);

        let up = DatapathStatus {
            ready: true,
            message: String::new(),
        };
        assert!(set_datapath_ready(&mut node, &up));
        assert_eq!(node["status"]["conditions"][0]["status"], "True");
        let taints = node["spec"]["taints"].as_array().expect("taints");
        assert_eq!(taints.len(), 1, "only the operator's taint is left");
        assert_eq!(taints[0]["key"], "gpu");
    }

    #[test]
    fn node_names_follow_dns_labels() {
        assert!(valid_node_name("rack1-a"));
        assert!(!valid_node_name("Rack1"));
        assert!(!valid_node_name("-a"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name(&"a".repeat(64)));
    }

    #[tokio::test]
    async fn a_report_that_changes_nothing_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let r = Resources::new(Arc::new(store));
        r.update(Kind::Instance, "web-0", |_| {
            Some(
                json!({"apiVersion": ironmesh_api::API_VERSION, "kind": "Instance",
                "metadata": {"name": "web-0"},
                "spec": {"workload": "web", "node": "n1", "workloadGeneration": 1,
                         "template": {"image": "busybox", "replicas": 1}}}),
            )
        })
        .await
        .unwrap();
        let st = InstanceState {
            name: "web-0".into(),
            phase: ironmesh_proto::v1::InstancePhase::Running.into(),
            ready: true,
            pid: 42,
            spec_generation: 1,
            ip: "10.244.0.5".into(),
            ..Default::default()
        };
        record_instance_states(&r, "n1", vec![st.clone()])
            .await
            .unwrap();
        let after_first = r.store().revision().await.unwrap();
        // The agent reports the same state again (every retry, every
        // reconnect): no write, no revision, no history event.
        for _ in 0..3 {
            record_instance_states(&r, "n1", vec![st.clone()])
                .await
                .unwrap();
        }
        assert_eq!(r.store().revision().await.unwrap(), after_first);
        // A real change is written.
        let changed = InstanceState { restarts: 1, ..st };
        record_instance_states(&r, "n1", vec![changed])
            .await
            .unwrap();
        assert_eq!(r.store().revision().await.unwrap(), after_first + 1);
    }
}
