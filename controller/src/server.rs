//! Wires the controller together and runs it until shutdown: store, PKI,
//! the TLS gRPC server (node and operator surfaces on one port), the node
//! liveness reconciler and the metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use ironmesh_daemon::Shutdown;
use ironmesh_proto::v1::{
    node_service_server::NodeServiceServer, operator_service_server::OperatorServiceServer,
};
use prometheus_client::registry::Registry;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};

use crate::bootstrap;
use crate::config::ControllerConfig;
use crate::liveness::{self, Liveness};
use crate::metrics::ControllerMetrics;
use crate::node_api::NodeApi;
use crate::operator_api::OperatorApi;
use crate::resources::Resources;
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("cannot open the store at {path}: {source}")]
    Store {
        path: std::path::PathBuf,
        source: crate::store::StoreError,
    },
    #[error(transparent)]
    Daemon(#[from] ironmesh_daemon::DaemonError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("gRPC server failed: {0}")]
    Serve(String),
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(cfg: ControllerConfig, shutdown: Shutdown) -> Result<(), ServerError> {
    cfg.validate().map_err(ServerError::Config)?;
    let creds = bootstrap::prepare(&cfg)?;
    let store_path = cfg.data_dir.join("store.redb");
    let store: Arc<dyn Store> =
        Arc::new(
            EmbeddedStore::open(&store_path).map_err(|source| ServerError::Store {
                path: store_path.clone(),
                source,
            })?,
        );
    let resources = Resources::new(store.clone());

    let mut registry = Registry::default();
    let metrics = Arc::new(ControllerMetrics::new(&mut registry));
    if let Ok(rev) = store.revision().await {
        metrics.store_revision.set(rev as i64);
    }
    let (metrics_addr, metrics_task) =
        ironmesh_daemon::serve_metrics(cfg.metrics_listen, Arc::new(registry), shutdown.clone())
            .await?;

    let liveness = Liveness::new(cfg.node_grace);
    let reconciler = tokio::spawn(liveness::run_reconciler(
        resources.clone(),
        liveness.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let images = crate::images::ImageStore::open(cfg.data_dir.join("images"), store.clone())
        .map_err(|e| ServerError::Config(e.to_string()))?;
    let logs = crate::logs::LogRelay::default();
    let workloads = tokio::spawn(crate::workloads::run(
        resources.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let ipam = crate::ipam::Ipam::new(cfg.cluster_cidr, cfg.node_cidr_prefix)
        .map_err(ServerError::Config)?;
    let node_api = NodeApi {
        ca: Arc::new(creds.ca),
        ipam,
        images: images.clone(),
        logs: logs.clone(),
        bootstrap_token: creds.bootstrap_token,
        resources: resources.clone(),
        liveness: liveness.clone(),
        metrics: metrics.clone(),
        heartbeat_interval: cfg.heartbeat_interval,
    };
    let operator_api = OperatorApi {
        resources,
        images,
        logs,
        liveness,
        metrics,
    };
    // Client certificates are optional at the TLS layer so that Join works
    // before a node has one; every other RPC checks for one itself.
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            &creds.server_cert_pem,
            &creds.server_key_pem,
        ))
        .client_ca_root(Certificate::from_pem(node_api.ca.cert_pem()))
        .client_auth_optional(true);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    tracing::info!(
        %addr,
        metrics = %metrics_addr,
        data_dir = %cfg.data_dir.display(),
        admin_config = %creds.admin_config.display(),
        bootstrap_token_file = %creds.token_file.display(),
        "controller serving"
    );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Server::builder()
        .tls_config(tls)
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .add_service(NodeServiceServer::new(node_api))
        .add_service(OperatorServiceServer::new(operator_api))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().wait())
        .await
        .map_err(|e| ServerError::Serve(e.to_string()))?;
    let _ = reconciler.await;
    let _ = workloads.await;
    let _ = metrics_task.await;
    tracing::info!("controller stopped");
    Ok(())
}
