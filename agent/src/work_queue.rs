//! The work-queue socket of pipeline step containers.
//!
//! Every step instance gets a directory of its own with an HTTP/1.1 socket
//! in it, bind-mounted at `/run/ironmesh` in the container
//! (`IRONMESH_QUEUE=/run/ironmesh/queue.sock`). The agent relays each
//! request to the controller's queue (NodeService.QueueLease/Ack/Push) as
//! this node, naming the instance the socket belongs to — so a container
//! can only ever act as itself, and needs no credentials or network route
//! to the controller. One directory per instance (not per socket file) so
//! that a socket re-created after an agent restart shows up in a container
//! that kept running.
//!
//! ```text
//! POST /v1/lease?max=N   → {"items":[{"id":"…","item":"…"}],"drained":false}
//!                          (no items and not drained: others hold leases; ask again)
//! POST /v1/ack           {"ids":["…"],"release":false} → {"acknowledged":1}
//! POST /v1/push          {"step":"work","items":["…"]} → {"pushed":2}
//! ```
//! Errors come back as a non-2xx status with `{"error":"…"}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ironmesh_proto::v1::{
    node_service_client::NodeServiceClient, InstanceAssignment, QueueAckRequest, QueueLeaseRequest,
    QueuePushRequest,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Serves the queue sockets of this node's step instances.
pub struct WorkQueueProxy {
    dir: PathBuf,
    clients: Vec<NodeServiceClient<Channel>>,
    /// When set, the clients to use (they follow renewed certificates).
    shared: Option<crate::node_clients::NodeClients>,
    servers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

#[derive(Clone)]
struct Ctx {
    instance: String,
    clients: Vec<NodeServiceClient<Channel>>,
    shared: Option<crate::node_clients::NodeClients>,
}

impl WorkQueueProxy {
    /// Sockets live under `<dir>/<instance>/queue.sock`; `clients` are the
    /// controllers, tried in order while one is unavailable.
    pub fn new(dir: PathBuf, clients: Vec<NodeServiceClient<Channel>>) -> WorkQueueProxy {
        WorkQueueProxy {
            dir,
            clients,
            shared: None,
            servers: Mutex::new(HashMap::new()),
        }
    }

    /// Take the clients from `clients` at each call (they follow the
    /// node's renewed certificates).
    pub fn with_clients(mut self, clients: crate::node_clients::NodeClients) -> WorkQueueProxy {
        self.shared = Some(clients);
        self
    }

    /// The directory mounted at `/run/ironmesh` in `instance`'s container:
    /// named by a hash of the instance name, so that the socket path stays
    /// well under the 108-byte limit of Unix socket addresses whatever the
    /// name's length.
    pub fn socket_dir(&self, instance: &str) -> PathBuf {
        self.dir.join(dir_name(instance))
    }

    /// Serves a socket for every step instance in `assigned`, and removes
    /// the sockets of instances no longer there.
    pub async fn sync(&self, assigned: &[InstanceAssignment]) {
        let wanted: Vec<&str> = assigned
            .iter()
            .filter(|i| i.task.is_some())
            .map(|i| i.name.as_str())
            .collect();
        let wanted_dirs: Vec<String> = wanted.iter().map(|n| dir_name(n)).collect();
        let mut servers = self.servers.lock().await;
        servers.retain(|name, task| {
            let keep = wanted.contains(&name.as_str()) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        // Left by an earlier agent process or by instances gone meanwhile.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !wanted_dirs.contains(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for name in wanted {
            if servers.contains_key(name) {
                continue;
            }
            match self.listen(name) {
                Ok(task) => {
                    servers.insert(name.to_string(), task);
                }
                Err(e) => {
                    tracing::warn!(instance = %name, error = %e, "cannot serve the work-queue socket")
                }
            }
        }
    }

    fn listen(&self, instance: &str) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let dir = self.socket_dir(instance);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("queue.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        // Containers may run as any user.
        set_mode(&path, 0o666)?;
        let ctx = Ctx {
            instance: instance.to_string(),
            clients: self.clients.clone(),
            shared: self.shared.clone(),
        };
        let app = Router::new()
            .route("/v1/lease", post(lease))
            .route("/v1/ack", post(ack))
            .route("/v1/push", post(push))
            .with_state(ctx);
        tracing::info!(instance = %instance, socket = %path.display(), "work-queue socket ready");
        let name = instance.to_string();
        Ok(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(instance = %name, error = %e, "work-queue socket stopped");
            }
        }))
    }
}

/// 16 hex digits of the name's SHA-256.
fn dir_name(instance: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(instance.as_bytes())[..8])
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, json!({"error": message.into()}).to_string()).into_response()
}

fn from_status(s: tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, s.message())
}

fn ok(v: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Calls `f` on each controller in turn while they are unavailable.
async fn call<T, F, Fut>(ctx: &Ctx, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut(NodeServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = tonic::Status::unavailable("no controller configured");
    let clients = match &ctx.shared {
        Some(s) => s.current().to_vec(),
        None => ctx.clients.clone(),
    };
    for c in &clients {
        match f(c.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable => last = s,
            Err(s) => return Err(s),
        }
    }
    Err(last)
}

async fn lease(State(ctx): State<Ctx>, RawQuery(q): RawQuery) -> Response {
    let mut max = 1u32;
    for kv in q.as_deref().unwrap_or_default().split('&') {
        if let Some(v) = kv.strip_prefix("max=") {
            match v.parse::<u32>() {
                Ok(n) if n >= 1 => max = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("max={v}: must be a number ≥ 1"),
                    )
                }
            }
        }
    }
    let req = QueueLeaseRequest {
        instance: ctx.instance.clone(),
        max,
    };
    match call(&ctx, |mut c| {
        let req = req.clone();
        async move { c.queue_lease(req).await }
    })
    .await
    {
        Ok(r) => ok(json!({
            "items": r.items.iter().map(|i| json!({"id": i.id, "item": i.item})).collect::<Vec<_>>(),
            "drained": r.drained,
        })),
        Err(s) => from_status(s),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    ids: Vec<String>,
    #[serde(default)]
    release: bool,
}

async fn ack(State(ctx): State<Ctx>, body: Bytes) -> Response {
    let b: AckBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"ids\":[…],\"release\":bool}}: {e}"),
            )
        }
    };
    let req = QueueAckRequest {
        instance: ctx.instance.clone(),
        ids: b.ids,
        release: b.release,
    };
    match call(&ctx, |mut c| {
        let req = req.clone();
        async move { c.queue_ack(req).await }
    })
    .await
    {
        Ok(r) => ok(json!({"acknowledged": r.acknowledged})),
        Err(s) => from_status(s),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    step: String,
    items: Vec<String>,
}

async fn push(State(ctx): State<Ctx>, body: Bytes) -> Response {
    let b: PushBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"step\":\"…\",\"items\":[…]}}: {e}"),
            )
        }
    };
    let req = QueuePushRequest {
        instance: ctx.instance.clone(),
        step: b.step,
        items: b.items,
    };
    match call(&ctx, |mut c| {
        let req = req.clone();
        async move { c.queue_push(req).await }
    })
    .await
    {
        Ok(r) => ok(json!({"pushed": r.pushed})),
        Err(s) => from_status(s),
    }
}
