//! The agent's container runtime: drives containerd through its gRPC API.
//!
//! This module owns the connection to one containerd socket and one
//! containerd namespace ([`Runtime`]), and the error type every runtime
//! call returns ([`RuntimeError`]). Every request made through a
//! [`Runtime`] carries the `containerd-namespace` header (an interceptor
//! adds it), so two agents with different namespaces never see each
//! other's images, containers or tasks.
//!
//! The work is split by what it owns:
//! - [`image`]: importing OCI image layouts into containerd's content
//!   store, snapshotter and image service, and resolving an image for a run;
//! - [`oci_spec`]: the OCI runtime spec of one instance;
//! - [`container`]: the lifecycle of one instance's container and task.
//!
//! Tested against containerd 1.6 (Debian 12's 1.6.20) with runc 1.1 and
//! the overlayfs snapshotter; the client protos are containerd 2.x's, of
//! which only services that exist in 1.6 are used (no transfer service).

pub mod container;
pub mod image;
pub mod oci_spec;
pub mod seccomp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient,
    snapshots::snapshots_client::SnapshotsClient, tasks_client::TasksClient,
    version_client::VersionClient,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

pub use container::{
    ContainerState, CreatedContainer, ExecOutput, ExitStatus, StopOutcome, TaskIo, TaskState,
    TaskStatus,
};
pub use image::{ImageChange, ImportProgress, ImportReport, ImportedImage, ResolvedImage};
pub use oci_spec::{BindMount, ImageDefaults, InstanceSpec, Resources, SpecError, User};

/// The default containerd socket of a packaged containerd.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// The runtime shim every container is created with.
pub const RUNC_V2: &str = "io.containerd.runc.v2";
/// Metadata key that selects the containerd namespace of a request.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// Metadata key that adds what a request creates to a lease.
const LEASE_HEADER: &str = "containerd-lease";

/// Where and how the runtime talks to containerd.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The containerd namespace all objects live in.
    pub namespace: String,
    /// Snapshotter used to unpack images and to prepare root filesystems.
    pub snapshotter: String,
    /// containerd runtime name of every container.
    pub runtime: String,
    /// runc binary the shim runs (`None`: the shim's default, `runc` on PATH).
    pub runc_binary: Option<String>,
    /// runc state root (`None`: the shim's default, `/run/containerd/runc`).
    /// The shim adds the namespace below it.
    pub runc_root: Option<PathBuf>,
    /// cgroup parent of all instances: an instance's `cgroupsPath` is
    /// `<cgroup_prefix>/<id>`.
    pub cgroup_prefix: String,
    /// Deadline of every unary call except waiting for an exit.
    pub call_timeout: Duration,
    /// Deadline for connecting to the socket.
    pub connect_timeout: Duration,
}

impl RuntimeConfig {
    /// A configuration with the defaults: overlayfs, runc v2, cgroups under
    /// `/ironmesh/<namespace>`, 30 s per call, 5 s to connect.
    pub fn new(socket: impl Into<PathBuf>, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        RuntimeConfig {
            socket: socket.into(),
            cgroup_prefix: format!("/ironmesh/{namespace}"),
            namespace,
            snapshotter: "overlayfs".to_string(),
            runtime: RUNC_V2.to_string(),
            runc_binary: None,
            runc_root: None,
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |reason: String| Err(RuntimeError::Config(reason));
        if !is_identifier(&self.namespace) {
            return bad(format!(
                "containerd namespace {:?} must be letters and digits, \
                 optionally joined by single '.', '_' or '-' (at most 76 characters)",
                self.namespace
            ));
        }
        if !self.cgroup_prefix.starts_with('/')
            || self.cgroup_prefix.ends_with('/')
            || self.cgroup_prefix.contains("..")
            || self.cgroup_prefix.contains("//")
        {
            return bad(format!(
                "cgroup prefix {:?} must be an absolute path without a trailing '/' or '..'",
                self.cgroup_prefix
            ));
        }
        if self.snapshotter.is_empty() || self.runtime.is_empty() {
            return bad("snapshotter and runtime must be named".to_string());
        }
        if let Some(root) = &self.runc_root {
            if !root.is_absolute() {
                return bad(format!(
                    "runc root {} must be an absolute path",
                    root.display()
                ));
            }
        }
        Ok(())
    }
}

/// What went wrong in a runtime call; always names the object and the call.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid runtime configuration: {0}")]
    Config(String),
    #[error("cannot connect to containerd at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// containerd answered a call with an error status.
    #[error("containerd {call} for {object} failed ({:?}): {}", status.code(), status.message())]
    Call {
        call: &'static str,
        object: String,
        status: Status,
    },
    /// A stream ended or answered out of protocol.
    #[error("containerd {call} for {object}: {reason}")]
    Protocol {
        call: &'static str,
        object: String,
        reason: String,
    },
    #[error("{call} for {object} did not finish within {timeout:?}")]
    Timeout {
        call: &'static str,
        object: String,
        timeout: Duration,
    },
    /// The input (an image layout, an instance) is not acceptable.
    #[error("{object}: {reason}")]
    Invalid { object: String, reason: String },
    #[error("instance {id}: {source}")]
    Spec {
        id: String,
        #[source]
        source: SpecError,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// The gRPC code containerd answered with, if this is a call error.
    pub fn code(&self) -> Option<Code> {
        match self {
            RuntimeError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// containerd said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }

    /// containerd said the object already exists.
    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(Code::AlreadyExists)
    }

    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        RuntimeError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(object: impl Into<String>, reason: impl Into<String>) -> Self {
        RuntimeError::Invalid {
            object: object.into(),
            reason: reason.into(),
        }
    }
}

/// Maps a gRPC status to a [`RuntimeError::Call`] naming the call and object.
pub(crate) fn call_err(
    call: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(Status) -> RuntimeError {
    let object = object.into();
    move |status| RuntimeError::Call {
        call,
        object,
        status,
    }
}

/// Adds the `containerd-namespace` header to every request.
#[derive(Clone)]
pub(crate) struct NamespaceHeader(MetadataValue<Ascii>);

impl tonic::service::Interceptor for NamespaceHeader {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, self.0.clone());
        Ok(request)
    }
}

pub(crate) type Svc = InterceptedService<Channel, NamespaceHeader>;

/// A connection to containerd, scoped to one containerd namespace.
///
/// Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Runtime {
    config: Arc<RuntimeConfig>,
    channel: Channel,
    namespace: NamespaceHeader,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("socket", &self.config.socket)
            .field("namespace", &self.config.namespace)
            .finish()
    }
}

impl Runtime {
    /// Connects to containerd's socket and checks that it answers.
    pub async fn connect(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        config.validate()?;
        let socket = config.socket.clone();
        let connect_err = |source| RuntimeError::Connect {
            socket: socket.clone(),
            source,
        };
        // The URI is required by tonic but unused: the connector dials the
        // unix socket.
        let path = config.socket.clone();
        let channel = Endpoint::from_static("http://containerd.invalid")
            .connect_timeout(config.connect_timeout)
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(connect_err)?;
        let namespace = NamespaceHeader(
            config
                .namespace
                .parse()
                .map_err(|_| RuntimeError::Config("namespace is not ASCII".to_string()))?,
        );
        let runtime = Runtime {
            config: Arc::new(config),
            channel,
            namespace,
        };
        runtime.version().await?;
        Ok(runtime)
    }

    /// The configuration this runtime was connected with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The containerd namespace of every call.
    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// containerd's version string, e.g. `1.6.20~ds1`.
    pub async fn version(&self) -> Result<String, RuntimeError> {
        let reply = VersionClient::with_interceptor(self.channel.clone(), self.namespace.clone())
            .version(self.request(()))
            .await
            .map_err(call_err(
                "Version.Version",
                format!("socket {}", self.config.socket.display()),
            ))?;
        Ok(reply.into_inner().version)
    }

    /// The `cgroupsPath` an instance's container gets.
    pub fn cgroups_path(&self, id: &str) -> String {
        format!("{}/{}", self.config.cgroup_prefix, id)
    }

    pub(crate) fn containers(&self) -> ContainersClient<Svc> {
        ContainersClient::with_interceptor(self.channel.clone(), self.namespace.clone())
    }

    pub(crate) fn content(&self) -> ContentClient<Svc> {
        ContentClient::with_interceptor(self.channel.clone(), self.namespace.clone())
    }

    pub(crate) fn diff(&self) -> DiffClient<Svc> {
        DiffClient::with_interceptor(self.channel.clone(), self.namespace.clone())
    }

    pub(crate) fn images(&self) -> ImagesClient<Svc> {
        ImagesClient::with_interceptor(self.channel.clone(), self.namespace.clone())
    }

    pub(crate) fn leases(&self) -> LeasesClient<Svc> {
        LeasesClient::with_interceptor(self.channel.clone(), self.namespace.clone())
    }

    pub(crate) fn snapshots(&self) -> SnapshotsClient<Svc> {
        SnapshotsClient::with_interceptor(self.channel.clone(), self.namespace.clone())
    }

    pub(crate) fn tasks(&self) -> TasksClient<Svc> {
        TasksClient::with_interceptor(self.channel.clone(), self.namespace.clone())
    }

    /// A unary request with the call deadline.
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.config.call_timeout);
        request
    }

    /// A unary request whose created objects are held by `lease`.
    pub(crate) fn leased<T>(&self, message: T, lease: &str) -> Request<T> {
        let mut request = self.request(message);
        with_lease(&mut request, lease);
        request
    }

    /// Takes a lease that expires on its own after `ttl`, should the agent
    /// die before deleting it.
    pub(crate) async fn create_lease(
        &self,
        purpose: &str,
        ttl: Duration,
    ) -> Result<String, RuntimeError> {
        use containerd_client::services::v1::CreateRequest;
        let expire = time::OffsetDateTime::now_utc() + ttl;
        let expire = expire
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let id = format!("ironmesh-{purpose}-{}", unique_suffix());
        let mut labels = std::collections::HashMap::new();
        labels.insert("containerd.io/gc.expire".to_string(), expire);
        let reply = self
            .leases()
            .create(self.request(CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(call_err("Leases.Create", format!("lease {id}")))?;
        Ok(reply.into_inner().lease.map(|l| l.id).unwrap_or(id))
    }

    pub(crate) async fn delete_lease(&self, id: &str) -> Result<(), RuntimeError> {
        use containerd_client::services::v1::DeleteRequest;
        match self
            .leases()
            .delete(self.request(DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(call_err("Leases.Delete", format!("lease {id}"))(status)),
        }
    }
}

pub(crate) fn with_lease<T>(request: &mut Request<T>, lease: &str) {
    if let Ok(value) = lease.parse() {
        request.metadata_mut().insert(LEASE_HEADER, value);
    }
}

/// containerd's identifier rule (namespaces, container and exec ids):
/// alphanumeric components joined by single `.`, `_` or `-`, at most 76.
pub(crate) fn is_identifier(s: &str) -> bool {
    if s.is_empty() || s.len() > 76 {
        return false;
    }
    let mut prev_sep = true;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            prev_sep = false;
        } else if matches!(c, '.' | '_' | '-') {
            if prev_sep {
                return false;
            }
            prev_sep = true;
        } else {
            return false;
        }
    }
    !prev_sep
}

/// A short suffix unique within this process and unlikely across processes.
pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos:x}", std::process::id())
}

/// Converts a protobuf timestamp.
pub(crate) fn system_time(ts: Option<&prost_types::Timestamp>) -> Option<std::time::SystemTime> {
    let ts = ts?;
    if ts.seconds < 0 {
        return None;
    }
    Some(
        std::time::UNIX_EPOCH
            + Duration::from_secs(ts.seconds as u64)
            + Duration::from_nanos(ts.nanos.max(0) as u64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_follow_containerd_rules() {
        for ok in ["web-1", "a", "A.b_c-d", "x1"] {
            assert!(is_identifier(ok), "{ok}");
        }
        let long = "a".repeat(77);
        for bad in ["", "-a", "a-", "a--b", "a/b", "a b", "ä", long.as_str()] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn config_is_validated() {
        let mut c = RuntimeConfig::new("/run/x.sock", "ironmesh");
        assert_eq!(c.cgroup_prefix, "/ironmesh/ironmesh");
        assert!(c.validate().is_ok());
        c.namespace = "bad/ns".into();
        assert!(c.validate().is_err());
        let mut c = RuntimeConfig::new("/run/x.sock", "ns");
        c.cgroup_prefix = "relative".into();
        assert!(c.validate().is_err());
        c.cgroup_prefix = "/a/../b".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn call_errors_name_object_and_call() {
        let e = call_err("Tasks.Start", "container web-1")(Status::not_found("no such task"));
        assert!(e.is_not_found());
        assert_eq!(
            e.to_string(),
            "containerd Tasks.Start for container web-1 failed (NotFound): no such task"
        );
    }
}
