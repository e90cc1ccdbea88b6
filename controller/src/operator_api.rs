//! The operator surface: apply, get, list, delete, watch, images, logs,
//! flows, join tokens and operators.
//!
//! Every call requires an operator client certificate that
//! [`Operators::authenticate`] accepts, and a role that allows the call
//! ([`crate::authz`]); mutating calls write an audit line. Apply validates
//! all manifests first and writes them in one store transaction, or none.
//! Handlers only translate between gRPC and [`Resources`]; they hold no
//! cluster logic.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ironmesh_api::selector::LabelSelector;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{
    operator_service_server::OperatorService, watch_event, ApplyRequest, ApplyResponse,
    ApplyResult, CollectImageGarbageRequest, CollectImageGarbageResponse, CreateJoinTokenRequest,
    CreateJoinTokenResponse, CreateOperatorRequest, CreateOperatorResponse,
    CreateRegistryCredentialRequest, CreateRegistryCredentialResponse, CreateUiLoginRequest,
    CreateUiLoginResponse, DeleteJoinTokenRequest, DeleteJoinTokenResponse, DeleteRequest,
    DeleteResponse, GetRequest, JoinToken, ListImagesRequest, ListImagesResponse,
    ListJoinTokensRequest, ListJoinTokensResponse, ListOperatorsRequest, ListOperatorsResponse,
    ListRequest, ListResponse, LogsChunk, LogsRequest, OperatorInfo, RemoveImageRequest,
    RemoveImageResponse, Resource, RevokeOperatorRequest, RevokeOperatorResponse, WatchEvent,
    WatchRequest,
};
use tonic::{Request, Response, Status};

use crate::authz::{audit, Action, Caller, Operators};
use crate::images::ImageStore;
use crate::liveness::Liveness;
use crate::logs::LogRelay;
use crate::metrics::{ControllerMetrics, MethodLabel};
use crate::resources::{decode, prefix, ResourceError, Resources, StoredObject};
use crate::store::EventKind;
use crate::tokens::{JoinTokens, NewToken, TokenError, TokenRecord};

/// The largest operator request the server decodes: well above the apply
/// limit ([`ironmesh_api::limits::MAX_APPLY_BYTES`]) so that an oversized
/// apply is answered with its size and the limit, in words.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

pub struct OperatorApi {
    pub resources: Resources,
    pub images: ImageStore,
    /// Registry credentials (`CreateRegistryCredential`).
    pub registry_auth: crate::registry::auth::RegistryAuth,
    /// `--image-gc-grace`.
    pub image_gc_grace: std::time::Duration,
    pub logs: LogRelay,
    pub flows: crate::flow_log::FlowLog,
    pub liveness: Liveness,
    pub metrics: Arc<ControllerMetrics>,
    pub operators: Operators,
    pub tokens: JoinTokens,
    pub revocations: crate::revocation::Revocations,
    pub ca: Arc<crate::pki::ClusterCa>,
    /// Sign-in codes of the web UI; `None` when it is off (`--ui-listen ""`).
    pub ui: Option<crate::ui::auth::Auth>,
    /// Ends watch, log and flow streams with `UNAVAILABLE: controller
    /// shutting down`.
    pub shutdown: ironmesh_process::Shutdown,
}

fn manifest_status(e: crate::images::manifests::ManifestError) -> Status {
    use crate::images::manifests::ManifestError as E;
    let msg = e.to_string();
    match e {
        E::NameInvalid(_)
        | E::TagInvalid(_)
        | E::DigestInvalid(_)
        | E::ManifestInvalid(_)
        | E::TooLarge(_) => Status::invalid_argument(msg),
        E::ManifestUnknown { .. } | E::NameUnknown(_) => Status::not_found(msg),
        E::BlobUnknown(_) => Status::failed_precondition(msg),
        E::Conflict => Status::aborted(msg),
        E::Io(_) => Status::internal(msg),
        E::Store(_) => Status::unavailable(msg),
    }
}

fn token_status(e: TokenError) -> Status {
    let msg = e.to_string();
    match e {
        TokenError::NotFound(_) => Status::not_found(msg),
        TokenError::Invalid(_) => Status::invalid_argument(msg),
        TokenError::TooMany(_) => Status::resource_exhausted(msg),
        TokenError::Contended(_) => Status::aborted(msg),
        TokenError::Store(_) => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

fn token_info(r: TokenRecord) -> JoinToken {
    JoinToken {
        id: r.id,
        description: r.description,
        node: r.node.unwrap_or_default(),
        uses: r.uses,
        used: r.used,
        expires_unix: r.expires_unix,
        created_unix: r.created_unix,
        created_by: r.created_by,
    }
}

/// The least role an apply of these documents needs: edit, or admin when
/// one of them is of a kind only admins change. Documents that do not
/// parse are left to validation (which refuses them).
fn apply_needs(docs: &[Option<serde_json::Value>]) -> Action {
    let mut needed = Action::Write(Kind::Workload);
    for k in docs
        .iter()
        .flatten()
        .filter_map(|d| d.get("kind").and_then(serde_json::Value::as_str))
        .filter_map(|k| Kind::parse(k).ok())
    {
        if Action::Write(k).needs() > needed.needs() {
            needed = Action::Write(k);
        }
    }
    needed
}

fn parse_kind(s: &str) -> Result<Kind, Status> {
    Kind::parse(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn to_status(e: ResourceError) -> Status {
    match e {
        ResourceError::NotFound { .. } => Status::not_found(e.to_string()),
        ResourceError::Duplicate(..) => Status::invalid_argument(e.to_string()),
        ResourceError::Contended(_) => Status::aborted(e.to_string()),
        ResourceError::Corrupt { .. } => Status::data_loss(e.to_string()),
        ResourceError::Store(_) => Status::unavailable(e.to_string()),
        ResourceError::Conflict(_) => Status::failed_precondition(e.to_string()),
        ResourceError::Seal(_) | ResourceError::NoSealKey => Status::internal(e.to_string()),
    }
}

impl OperatorApi {
    fn to_resource(&self, mut o: StoredObject) -> Resource {
        if o.kind == Kind::Node {
            self.liveness.overlay(&mut o.object);
        }
        if o.kind == Kind::Secret {
            crate::secret_seal::redact(&mut o.object);
        }
        Resource {
            kind: o.kind.as_str().to_string(),
            name: o.name,
            json: o.object.to_string(),
            revision: o.revision,
        }
    }

    fn record<T>(&self, method: &str, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.metrics
            .operator_calls
            .get_or_create(&MethodLabel {
                method: method.into(),
                code,
            })
            .inc();
    }

    /// The authenticated caller, if its role allows `action`.
    async fn caller<T>(
        &self,
        req: &Request<T>,
        action: Action,
        method: &str,
    ) -> Result<Caller, Status> {
        let caller = self.operators.authenticate(req).await?;
        caller.may(action, method)?;
        Ok(caller)
    }

    async fn apply_inner(&self, req: Request<ApplyRequest>) -> Result<ApplyResponse, Status> {
        let caller = self.operators.authenticate(&req).await?;
        let req = req.into_inner();
        // The server takes messages up to MAX_REQUEST_BYTES so that this,
        // not the transport's "decoded message length too large", is what
        // an operator reads.
        let total: usize = req
            .manifests
            .iter()
            .map(|m| m.json.len() + m.origin.len())
            .sum();
        if let Some(msg) = ironmesh_api::limits::apply_too_large(total) {
            ControllerMetrics::count(&self.metrics.applies, "invalid");
            audit(&caller, "Apply", "", "failed");
            tracing::warn!(
                bytes = total,
                manifests = req.manifests.len(),
                "apply refused: too large"
            );
            return Err(Status::invalid_argument(msg));
        }
        let parsed: Vec<Option<serde_json::Value>> = req
            .manifests
            .iter()
            .map(|m| serde_json::from_str(&m.json).ok())
            .collect();
        caller.may(apply_needs(&parsed), "Apply")?;
        let r = self.apply_checked(&caller, req, parsed).await;
        let target = match &r {
            Ok(resp) => resp
                .results
                .iter()
                .map(|a| format!("{}/{}", a.kind, a.name))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => String::new(),
        };
        audit(
            &caller,
            "Apply",
            &target,
            if r.is_ok() { "ok" } else { "failed" },
        );
        r
    }

    async fn apply_checked(
        &self,
        caller: &Caller,
        req: ApplyRequest,
        parsed: Vec<Option<serde_json::Value>>,
    ) -> Result<ApplyResponse, Status> {
        if req.manifests.is_empty() {
            return Err(Status::invalid_argument(
                "apply needs at least one manifest",
            ));
        }
        let mut validated = Vec::with_capacity(req.manifests.len());
        let mut errors = Vec::new();
        for (m, doc) in req.manifests.iter().zip(parsed) {
            let origin = if m.origin.is_empty() {
                format!("manifest {}", validated.len() + errors.len() + 1)
            } else {
                m.origin.clone()
            };
            let doc: serde_json::Value = match doc {
                Some(d) => d,
                None => {
                    let e = serde_json::from_str::<serde_json::Value>(&m.json)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    errors.push(format!("{origin}: not valid JSON: {e}"));
                    continue;
                }
            };
            match ironmesh_api::validate(&doc) {
                Ok(v) => validated.push((origin, v)),
                Err(e) => errors.push(format!("{origin}: {e}")),
            }
        }
        if !errors.is_empty() {
            ControllerMetrics::count(&self.metrics.applies, "invalid");
            return Err(Status::invalid_argument(format!(
                "apply rejected, nothing was changed:\n  {}",
                errors.join("\n  ")
            )));
        }
        caller.may_apply_host_access(&validated, "Apply")?;
        let (revision, applied) = self
            .resources
            .apply(&validated, req.dry_run)
            .await
            .map_err(|e| {
                ControllerMetrics::count(&self.metrics.applies, "error");
                to_status(e)
            })?;
        ControllerMetrics::count(&self.metrics.applies, "ok");
        if !req.dry_run {
            self.metrics.store_revision.set(revision as i64);
        }
        tracing::info!(
            revision,
            objects = applied.len(),
            dry_run = req.dry_run,
            "applied"
        );
        Ok(ApplyResponse {
            revision,
            results: applied
                .into_iter()
                .map(|a| ApplyResult {
                    kind: a.kind.as_str().to_string(),
                    name: a.name,
                    action: a.action.as_str().to_string(),
                })
                .collect(),
        })
    }

    async fn get_inner(&self, req: Request<GetRequest>) -> Result<Resource, Status> {
        let caller = self.caller(&req, Action::Read, "Get").await?;
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        if req.reveal {
            return self.reveal(&caller, kind, &req.name).await;
        }
        self.resources.consistent().await;
        match self
            .resources
            .get(kind, &req.name)
            .await
            .map_err(to_status)?
        {
            Some(mut o) => {
                if kind == Kind::Workload {
                    // The workload certificates nodes hold, for describe.
                    let certs = crate::mesh::issued(self.resources.store(), &req.name)
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    if let (false, Some(status)) = (
                        certs.is_empty(),
                        o.object
                            .as_object_mut()
                            .map(|m| m.entry("status").or_insert_with(|| serde_json::json!({}))),
                    ) {
                        status["meshCertificates"] = serde_json::to_value(&certs)
                            .map_err(|e| Status::internal(e.to_string()))?;
                    }
                }
                Ok(self.to_resource(o))
            }
            None => Err(Status::not_found(format!(
                "{kind} {:?} not found",
                req.name
            ))),
        }
    }

    /// A Secret with its values, for an admin; audited.
    async fn reveal(&self, caller: &Caller, kind: Kind, name: &str) -> Result<Resource, Status> {
        if kind != Kind::Secret {
            return Err(Status::invalid_argument(format!(
                "--reveal is for Secret objects; {kind} objects have nothing hidden"
            )));
        }
        let target = format!("{kind}/{name}");
        if let Err(e) = caller.may(Action::RevealSecret, "Get") {
            audit(caller, "RevealSecret", &target, "denied");
            return Err(e);
        }
        self.resources.consistent().await;
        let stored = self
            .resources
            .get(kind, name)
            .await
            .map_err(to_status)?
            .ok_or_else(|| Status::not_found(format!("{kind} {name:?} not found")))?;
        let seal = self
            .resources
            .seal()
            .ok_or_else(|| to_status(ResourceError::NoSealKey))?;
        let object = seal
            .reveal(&crate::resources::key(kind, name), &stored.object)
            .map_err(|e| Status::data_loss(e.to_string()))?;
        audit(caller, "RevealSecret", &target, "ok");
        Ok(Resource {
            kind: kind.as_str().to_string(),
            name: stored.name,
            json: object.to_string(),
            revision: stored.revision,
        })
    }

    /// The eviction guard's message while eviction is paused.
    async fn eviction_warning(&self) -> Option<String> {
        let kv = self
            .resources
            .store()
            .get(crate::workloads::EVICTION_STATUS_KEY)
            .await
            .ok()??;
        let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
        (v.get("paused")? == true)
            .then(|| v.get("message")?.as_str().map(str::to_string))
            .flatten()
    }

    async fn list_inner(&self, req: Request<ListRequest>) -> Result<ListResponse, Status> {
        self.caller(&req, Action::Read, "List").await?;
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        let selector = LabelSelector::parse(&req.label_selector)
            .map_err(|e| Status::invalid_argument(format!("label selector: {e}")))?;
        self.resources.consistent().await;
        let (items, revision) = self
            .resources
            .list(kind, &selector)
            .await
            .map_err(to_status)?;
        let mut warnings = Vec::new();
        if kind == Kind::Node {
            warnings.extend(self.eviction_warning().await);
        }
        Ok(ListResponse {
            items: items.into_iter().map(|o| self.to_resource(o)).collect(),
            revision,
            warnings,
        })
    }

    async fn delete_inner(&self, req: Request<DeleteRequest>) -> Result<DeleteResponse, Status> {
        let caller = self.operators.authenticate(&req).await?;
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        caller.may(Action::Write(kind), "Delete")?;
        let target = format!("{kind}/{}", req.name);
        let r = self.delete_checked(&caller, kind, &req.name).await;
        audit(
            &caller,
            "Delete",
            &target,
            if r.is_ok() { "ok" } else { "failed" },
        );
        r
    }

    async fn delete_checked(
        &self,
        caller: &Caller,
        kind: Kind,
        name: &str,
    ) -> Result<DeleteResponse, Status> {
        let who = &caller.name;
        let req = DeleteRequest {
            kind: kind.as_str().to_string(),
            name: name.to_string(),
        };
        if kind == Kind::Node {
            // Revoke first: once the Node is gone nothing may bring it
            // back with the certificate it had.
            let node = self.resources.get(kind, name).await.map_err(to_status)?;
            let Some(node) = node else {
                return Err(to_status(ResourceError::NotFound {
                    kind,
                    name: name.to_string(),
                }));
            };
            let fp = node
                .object
                .pointer("/status/certificateFingerprint")
                .and_then(serde_json::Value::as_str);
            let revoked = self
                .revocations
                .revoke_node(name, fp, &format!("node deleted by operator {who}"))
                .await
                .map_err(|e| Status::unavailable(format!("cannot revoke node {name}: {e}")))?;
            tracing::info!(operator = %who, node = %name, revoked = ?revoked, "node certificate revoked");
        }
        if kind == Kind::Volume {
            crate::volumes::check_delete(&self.resources, &req.name)
                .await
                .map_err(Status::failed_precondition)?;
        }
        let revision = self
            .resources
            .delete(kind, &req.name)
            .await
            .map_err(to_status)?;
        self.metrics.store_revision.set(revision as i64);
        tracing::info!(operator = %who, %kind, name = %req.name, revision, "deleted");
        Ok(DeleteResponse { revision })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;
type LogsStream = Pin<Box<dyn Stream<Item = Result<LogsChunk, Status>> + Send>>;

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let r = self.apply_inner(req).await;
        self.record("Apply", &r);
        r.map(Response::new)
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<Resource>, Status> {
        let r = self.get_inner(req).await;
        self.record("Get", &r);
        r.map(Response::new)
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let r = self.list_inner(req).await;
        self.record("List", &r);
        r.map(Response::new)
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = self.delete_inner(req).await;
        self.record("Delete", &r);
        r.map(Response::new)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.caller(&req, Action::Read, "Watch").await?;
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        let mut initial = Vec::new();
        let mut after = req.from_revision;
        if after == 0 {
            let (items, rev) = self
                .resources
                .list(kind, &LabelSelector::default())
                .await
                .map_err(to_status)?;
            after = rev;
            for o in items {
                initial.push(Ok(WatchEvent {
                    r#type: watch_event::Type::Added as i32,
                    revision: o.revision,
                    resource: Some(self.to_resource(o)),
                }));
            }
        }
        let events = self
            .resources
            .store()
            .watch(&prefix(kind), after)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Compacted { .. } => Status::out_of_range(e.to_string()),
                other => Status::unavailable(other.to_string()),
            })?;
        let liveness = self.liveness.clone();
        let live = events.map(move |ev| {
            let ev = ev.map_err(|e| Status::unavailable(e.to_string()))?;
            let mut obj = decode(kind, &ev.kv).map_err(to_status)?;
            let ty = match ev.kind {
                EventKind::Delete => watch_event::Type::Deleted,
                EventKind::Put if ev.kv.create_revision == ev.revision => watch_event::Type::Added,
                EventKind::Put => watch_event::Type::Modified,
            };
            if kind == Kind::Node {
                liveness.overlay(&mut obj.object);
            }
            if kind == Kind::Secret {
                crate::secret_seal::redact(&mut obj.object);
            }
            Ok(WatchEvent {
                r#type: ty as i32,
                revision: ev.revision,
                resource: Some(Resource {
                    kind: kind.as_str().to_string(),
                    name: obj.name,
                    json: obj.object.to_string(),
                    revision: ev.revision,
                }),
            })
        });
        Ok(Response::new(crate::stopping::until_shutdown(
            futures::stream::iter(initial).chain(live),
            self.shutdown.clone(),
        )))
    }

    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.caller(&req, Action::Read, "ListImages").await?;
        let r = self.images.list_images(req.into_inner()).await;
        self.record("ListImages", &r);
        r.map(Response::new)
    }

    async fn remove_image(
        &self,
        req: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let caller = self
            .caller(&req, Action::DeleteImage, "RemoveImage")
            .await?;
        let name = req.into_inner().name;
        let r = self
            .images
            .remove_image(&name)
            .await
            .map(|digest| RemoveImageResponse {
                name: crate::images::normalize_name(&name).unwrap_or(name.clone()),
                manifest_digest: digest,
            })
            .map_err(manifest_status);
        audit(
            &caller,
            "RemoveImage",
            &name,
            if r.is_ok() { "ok" } else { "failed" },
        );
        self.record("RemoveImage", &r);
        r.map(Response::new)
    }

    async fn collect_image_garbage(
        &self,
        req: Request<CollectImageGarbageRequest>,
    ) -> Result<Response<CollectImageGarbageResponse>, Status> {
        let caller = self
            .caller(&req, Action::DeleteImage, "CollectImageGarbage")
            .await?;
        let r = self
            .images
            .collect_garbage(self.image_gc_grace)
            .await
            .inspect(|g| self.metrics.count_gc(g))
            .map(|g| CollectImageGarbageResponse {
                blobs_removed: g.blobs_removed,
                bytes_freed: g.bytes_freed,
                manifests_removed: g.manifests_removed,
                blobs_kept: g.blobs_kept,
                grace_seconds: self.image_gc_grace.as_secs(),
            })
            .map_err(manifest_status);
        audit(
            &caller,
            "CollectImageGarbage",
            "images",
            if r.is_ok() { "ok" } else { "failed" },
        );
        self.record("CollectImageGarbage", &r);
        r.map(Response::new)
    }

    async fn create_registry_credential(
        &self,
        req: Request<CreateRegistryCredentialRequest>,
    ) -> Result<Response<CreateRegistryCredentialResponse>, Status> {
        let caller = self
            .caller(&req, Action::Read, "CreateRegistryCredential")
            .await?;
        let ttl = match req.into_inner().ttl_seconds {
            0 => 30 * 24 * 3600,
            t => t,
        };
        let r = self
            .registry_auth
            .create_credential(&caller.name, ttl)
            .await
            .map(|c| CreateRegistryCredentialResponse {
                username: c.username,
                password: c.password,
                expires_unix: c.expires_unix,
            })
            .map_err(|e| match e {
                crate::registry::auth::CredentialError::BadTtl => {
                    Status::invalid_argument(e.to_string())
                }
                crate::registry::auth::CredentialError::NoOperator(_) => {
                    Status::permission_denied(e.to_string())
                }
                _ => Status::unavailable(e.to_string()),
            });
        audit(
            &caller,
            "CreateRegistryCredential",
            &caller.name,
            if r.is_ok() { "ok" } else { "failed" },
        );
        self.record("CreateRegistryCredential", &r);
        r.map(Response::new)
    }

    type LogsStream = LogsStream;

    async fn logs(&self, req: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        self.caller(&req, Action::Read, "Logs").await?;
        let req = req.into_inner();
        let r = self.logs.open(&self.resources, req).await;
        self.record("Logs", &r);
        r.map(|s| Response::new(crate::stopping::until_shutdown(s, self.shutdown.clone())))
    }

    type FlowsStream = crate::flow_log::FlowsStream;

    async fn flows(
        &self,
        req: Request<ironmesh_proto::v1::FlowsRequest>,
    ) -> Result<Response<Self::FlowsStream>, Status> {
        self.caller(&req, Action::Read, "Flows").await?;
        let r = self.flows.open(req.into_inner());
        self.record("Flows", &r);
        r.map(|s| Response::new(crate::stopping::until_shutdown(s, self.shutdown.clone())))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let caller = self
            .caller(&req, Action::ManageTokens, "CreateJoinToken")
            .await?;
        let r = req.into_inner();
        let out = self
            .tokens
            .create(NewToken {
                ttl: (r.ttl_seconds > 0).then(|| std::time::Duration::from_secs(r.ttl_seconds)),
                uses: r.uses,
                node: Some(r.node).filter(|n| !n.is_empty()),
                description: r.description,
                created_by: caller.name.clone(),
            })
            .await
            .map_err(token_status);
        audit(
            &caller,
            "CreateJoinToken",
            out.as_ref()
                .map(|(_, rec)| rec.id.as_str())
                .unwrap_or_default(),
            if out.is_ok() { "ok" } else { "failed" },
        );
        let r = out.map(|(token, rec)| CreateJoinTokenResponse {
            token,
            info: Some(token_info(rec)),
        });
        self.record("CreateJoinToken", &r);
        r.map(Response::new)
    }

    async fn list_join_tokens(
        &self,
        req: Request<ListJoinTokensRequest>,
    ) -> Result<Response<ListJoinTokensResponse>, Status> {
        self.caller(&req, Action::ManageTokens, "ListJoinTokens")
            .await?;
        let r = self
            .tokens
            .list()
            .await
            .map_err(token_status)
            .map(|t| ListJoinTokensResponse {
                tokens: t.into_iter().map(token_info).collect(),
            });
        self.record("ListJoinTokens", &r);
        r.map(Response::new)
    }

    async fn delete_join_token(
        &self,
        req: Request<DeleteJoinTokenRequest>,
    ) -> Result<Response<DeleteJoinTokenResponse>, Status> {
        let caller = self
            .caller(&req, Action::ManageTokens, "DeleteJoinToken")
            .await?;
        let id = req.into_inner().id;
        let r = self
            .tokens
            .delete(&id)
            .await
            .map_err(token_status)
            .map(|_| DeleteJoinTokenResponse {});
        audit(
            &caller,
            "DeleteJoinToken",
            &id,
            if r.is_ok() { "ok" } else { "failed" },
        );
        self.record("DeleteJoinToken", &r);
        r.map(Response::new)
    }

    async fn create_operator(
        &self,
        req: Request<CreateOperatorRequest>,
    ) -> Result<Response<CreateOperatorResponse>, Status> {
        let caller = self
            .caller(&req, Action::ManageOperators, "CreateOperator")
            .await?;
        let r = req.into_inner();
        let out = self
            .operators
            .create(&r.name, &r.role, &r.csr_pem, &caller.name)
            .await
            .map_err(Status::from)
            .map(|cert| CreateOperatorResponse {
                certificate_pem: cert,
                ca_certificate_pem: self.ca.cert_pem().to_string(),
            });
        audit(
            &caller,
            "CreateOperator",
            &format!("operator:{} role={}", r.name, r.role),
            if out.is_ok() { "ok" } else { "failed" },
        );
        self.record("CreateOperator", &out);
        out.map(Response::new)
    }

    async fn list_operators(
        &self,
        req: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        self.caller(&req, Action::ManageOperators, "ListOperators")
            .await?;
        let r = self
            .operators
            .list()
            .await
            .map_err(Status::from)
            .map(|ops| ListOperatorsResponse {
                operators: ops
                    .into_iter()
                    .map(|o| OperatorInfo {
                        expires_unix: o.certs.iter().map(|c| c.not_after).max().unwrap_or(0),
                        serials: o.certs.into_iter().map(|c| c.serial).collect(),
                        name: o.name,
                        role: o.role.as_str().to_string(),
                        created_unix: o.created_unix,
                        created_by: o.created_by,
                    })
                    .collect(),
            });
        self.record("ListOperators", &r);
        r.map(Response::new)
    }

    async fn revoke_operator(
        &self,
        req: Request<RevokeOperatorRequest>,
    ) -> Result<Response<RevokeOperatorResponse>, Status> {
        let caller = self
            .caller(&req, Action::ManageOperators, "RevokeOperator")
            .await?;
        let name = req.into_inner().name;
        let r = self
            .operators
            .revoke(&name, &caller.name)
            .await
            .map_err(Status::from)
            .map(|revoked_serials| RevokeOperatorResponse { revoked_serials });
        audit(
            &caller,
            "RevokeOperator",
            &format!("operator:{name}"),
            if r.is_ok() { "ok" } else { "failed" },
        );
        self.record("RevokeOperator", &r);
        r.map(Response::new)
    }

    async fn create_ui_login(
        &self,
        req: Request<CreateUiLoginRequest>,
    ) -> Result<Response<CreateUiLoginResponse>, Status> {
        let caller = self.caller(&req, Action::Read, "CreateUiLogin").await?;
        let r = match &self.ui {
            None => Err(Status::failed_precondition(
                "the web UI is off on this controller (--ui-listen is empty)",
            )),
            Some(ui) => {
                let (code, expires_unix) = ui.issue_code(&caller);
                Ok(CreateUiLoginResponse {
                    url: ui.login_url(&code),
                    code,
                    expires_unix,
                })
            }
        };
        audit(
            &caller,
            "CreateUiLogin",
            &caller.name,
            if r.is_ok() { "ok" } else { "failed" },
        );
        self.record("CreateUiLogin", &r);
        r.map(Response::new)
    }
}
