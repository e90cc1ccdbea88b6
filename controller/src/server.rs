//! Wires the controller together and runs it until shutdown: store, PKI,
//! the TLS gRPC server (node and operator surfaces on one port), the node
//! liveness reconciler and the metrics endpoint.
//!
//! With `--store etcd://…` it also joins the controllers' coordination
//! ([`crate::ha`]): an etcd session, the leader election (only the leader
//! runs the liveness reconciler and the workload controller; every
//! controller serves the API), presence records, and the CA and bootstrap
//! token shared through etcd.

use std::net::SocketAddr;
use std::sync::Arc;

use ironmesh_process::Shutdown;
use ironmesh_proto::v1::{
    node_service_server::NodeServiceServer, operator_service_server::OperatorServiceServer,
};
use prometheus_client::registry::Registry;
use tonic::transport::Server;

use crate::bootstrap;
use crate::config::ControllerConfig;
use crate::ha::Leadership;
use crate::liveness::{self, Liveness};
use crate::metrics::ControllerMetrics;
use crate::node_api::NodeApi;
use crate::operator_api::OperatorApi;
use crate::resources::Resources;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::{EtcdConfig, EtcdStore, EtcdTls};
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
    #[error("cannot reach etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: crate::store::StoreError,
    },
    #[error(transparent)]
    Secrets(#[from] crate::ha::shared_secrets::SecretsError),
    #[error(transparent)]
    Seal(#[from] crate::secret_seal::SealError),
    #[error(transparent)]
    Daemon(#[from] ironmesh_process::DaemonError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("gRPC server failed: {0}")]
    Serve(String),
    #[error("cannot record the bootstrap token: {0}")]
    Token(#[from] crate::tokens::TokenError),
    #[error("cannot register the first operator: {0}")]
    Operator(#[from] crate::authz::OperatorError),
}

/// How long open connections get to finish after shutdown is requested.
const SERVE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the reconcilers and the metrics server get after that.
const TASKS_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the controller until `shutdown` resolves; returns within
/// `SERVE_GRACE` + `TASKS_GRACE` of it.
pub async fn run(cfg: ControllerConfig, shutdown: Shutdown) -> Result<(), ServerError> {
    cfg.validate().map_err(ServerError::Config)?;
    let opened = open_store(&cfg).await?;
    let store = opened.store.clone();
    let shared = match (&opened.etcd, &cfg.ca_key_file) {
        (Some(_), Some(key_file)) => {
            let key = crate::ha::shared_secrets::SealKey::from_file(key_file)?;
            let s = crate::ha::shared_secrets::load_or_create(
                &*store,
                &key,
                cfg.bootstrap_token.as_deref(),
            )
            .await?;
            if s.created {
                tracing::info!("created the cluster CA and bootstrap token in etcd");
            } else {
                tracing::info!("loaded the shared cluster CA and bootstrap token from etcd");
            }
            Some(bootstrap::SharedCredentials {
                ca: s.ca,
                bootstrap_token: s.bootstrap_token,
            })
        }
        _ => None,
    };
    let creds = bootstrap::prepare(&cfg, shared)?;
    let cache = crate::cache::Cache::start(store.clone())
        .await
        .map_err(|source| ServerError::Store {
            path: cfg.data_dir.clone(),
            source,
        })?;
    let seal =
        crate::secret_seal::SecretSeal::load_or_create(cfg.ca_key_file.as_deref(), &cfg.data_dir)?;
    let resources = Resources::new(store.clone())
        .with_cache(cache.clone())
        .with_seal(Arc::new(seal));

    let mut registry = Registry::default();
    let metrics = Arc::new(ControllerMetrics::new(&mut registry));
    if let Ok(rev) = store.revision().await {
        metrics.store_revision.set(rev as i64);
    }
    let (metrics_addr, metrics_task) =
        ironmesh_process::serve_metrics(cfg.metrics_listen, Arc::new(registry), shutdown.clone())
            .await?;

    let liveness = Liveness::paced(
        cfg.heartbeat_interval,
        cfg.node_grace,
        cfg.max_heartbeats_per_second,
    );
    let leadership = match &opened.etcd {
        None => Leadership::always(),
        Some(etcd) => {
            let id = crate::ha::controller_id(&cfg.advertise_url());
            let lease = crate::ha::session::start(etcd.client(), cfg.leader_ttl, shutdown.clone());
            crate::ha::presence::start(
                etcd.clone(),
                id.clone(),
                lease.clone(),
                liveness.clone(),
                shutdown.clone(),
            );
            Leadership::from_receiver(crate::ha::election::start(
                etcd.client(),
                etcd.full_key(crate::ha::LEADER_KEY),
                id,
                lease,
                shutdown.clone(),
            ))
        }
    };
    // Only the leader reconciles; every controller serves the API.
    let service_cidr = cfg.service_cidr;
    let data_dir = cfg.data_dir.clone();
    let placement = crate::workloads::Settings {
        reserve: crate::scheduler::Reserve {
            cpu_millis: cfg.reserve_cpu,
            memory_bytes: cfg.reserve_memory,
        },
        eviction_delay: cfg.eviction_delay,
        unhealthy_threshold: cfg.eviction_unhealthy_threshold,
        eviction_rate: cfg.eviction_rate,
    };
    let reconcilers = {
        let (resources, liveness, metrics) = (resources.clone(), liveness.clone(), metrics.clone());
        tokio::spawn(
            leadership.run_while_leader(metrics.clone(), shutdown.clone(), move |stop| {
                let (resources, liveness, metrics) =
                    (resources.clone(), liveness.clone(), metrics.clone());
                let data_dir = data_dir.clone();
                async move {
                    let reconciler = tokio::spawn(liveness::run_reconciler(
                        resources.clone(),
                        liveness,
                        metrics.clone(),
                        stop.clone(),
                    ));
                    let services = tokio::spawn(crate::services::run(
                        resources.clone(),
                        service_cidr,
                        stop.clone(),
                    ));
                    let sources = tokio::spawn(crate::sources::run(
                        resources.clone(),
                        data_dir.clone(),
                        stop.clone(),
                    ));
                    let volumes =
                        tokio::spawn(crate::volumes::run(resources.clone(), stop.clone()));
                    let pipelines = tokio::spawn(crate::pipelines::run(
                        resources.clone(),
                        metrics.clone(),
                        stop.clone(),
                    ));
                    let routes =
                        tokio::spawn(crate::gateways::run_status(resources.clone(), stop.clone()));
                    let workloads =
                        tokio::spawn(crate::workloads::run(resources, metrics, placement, stop));
                    let _ = reconciler.await;
                    let _ = workloads.await;
                    let _ = services.await;
                    let _ = volumes.await;
                    let _ = sources.await;
                    let _ = pipelines.await;
                    let _ = routes.await;
                }
            }),
        )
    };

    let images = crate::images::ImageStore::open(cfg.data_dir.join("images"), store.clone())
        .map_err(|e| ServerError::Config(e.to_string()))?;
    let logs = crate::logs::LogRelay::default();
    let flows = crate::flow_log::FlowLog::default();
    let ipam = crate::ipam::Ipam::new(cfg.cluster_cidr, cfg.node_cidr_prefix)
        .map_err(ServerError::Config)?;
    // Every controller serves its own agents, so every one computes
    // assignments (reads only; the leader's reconcilers write).
    let mesh = crate::mesh::MeshSettings {
        trust_domain: cfg.trust_domain.clone(),
        cert_lifetime: time::Duration::try_from(cfg.workload_cert_lifetime)
            .map_err(|e| ServerError::Config(format!("--workload-cert-lifetime: {e}")))?,
        default_mode: crate::mesh::default_mode(&store, cfg.mesh_default_mode)
            .await
            .map_err(|e| ServerError::Config(format!("mesh default mode: {e}")))?,
    };
    tracing::info!(default_mode = mesh.default_mode.as_str(), trust_domain = %mesh.trust_domain, "mesh");
    let assignments = crate::assignments::Assignments::with_mesh_default(mesh.default_mode)
        .with_secret_seal(resources.seal().cloned());
    let ca = Arc::new(creds.ca);
    tokio::spawn(crate::assignments::run(
        assignments.clone(),
        cache.clone(),
        Some(ca.clone()),
        metrics.clone(),
        shutdown.clone(),
    ));
    let revocations = crate::revocation::Revocations::start(store.clone())
        .await
        .map_err(|source| ServerError::Store {
            path: cfg.data_dir.clone(),
            source,
        })?;
    let tokens = crate::tokens::JoinTokens::new(store.clone(), cfg.bootstrap_token_ttl);
    if let Some(rec) = tokens
        .ensure_bootstrap(&creds.bootstrap_token, cfg.bootstrap_token_ttl)
        .await?
    {
        tracing::info!(
            token = %rec.id,
            expires = %crate::tokens::unix_rfc3339(rec.expires_unix),
            path = %creds.token_file.display(),
            "recorded the bootstrap token as a join token; it expires (imctl token create makes more)"
        );
    }
    let operators = crate::authz::Operators::new(store.clone(), revocations.clone(), ca.clone());
    if let Some(cert) = &creds.admin_cert_pem {
        operators
            .register_local(bootstrap::FIRST_OPERATOR, cert)
            .await?;
    }
    let node_cert_lifetime = time::Duration::try_from(cfg.node_cert_lifetime)
        .map_err(|e| ServerError::Config(format!("--node-cert-lifetime: {e}")))?;
    let node_api = NodeApi {
        ca: ca.clone(),
        ipam,
        images: images.clone(),
        logs: logs.clone(),
        flows: flows.clone(),
        admission: crate::join::Admission {
            ca: ca.clone(),
            tokens: tokens.clone(),
            limiter: crate::join_limit::JoinLimiter::new(
                cfg.join_failure_limit,
                cfg.join_failure_window,
            ),
            resources: resources.clone(),
            node_cert_lifetime,
        },
        revocations: revocations.clone(),
        blobs: crate::blob_access::BlobAccess::new(resources.clone(), images.clone()),
        resources: resources.clone(),
        liveness: liveness.clone(),
        metrics: metrics.clone(),
        assignments,
        mesh,
        shutdown: shutdown.clone(),
    };
    let registry_auth = crate::registry::auth::RegistryAuth::new(store.clone(), operators.clone());
    if !cfg.image_gc_interval.is_zero() {
        tokio::spawn(crate::images::gc::run(
            images.clone(),
            cfg.image_gc_interval,
            cfg.image_gc_grace,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let registry_images = images.clone();
    // The web UI's listener, bound before the operator API so that
    // CreateUiLogin knows the URL. A UI that cannot bind is logged and
    // left off: agents and operators need the API more than the page.
    let ui_listener = match cfg.ui_addr().map_err(ServerError::Config)? {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen for the web UI; serving without it");
                None
            }
        },
    };
    let ui_local = ui_listener.as_ref().and_then(|l| l.local_addr().ok());
    let ui_auth = ui_local.map(|a| crate::ui::auth::Auth::new(crate::ui::base_url(a)));
    let ui_parts = (
        resources.clone(),
        liveness.clone(),
        flows.clone(),
        logs.clone(),
        images.clone(),
        operators.clone(),
    );
    let operator_api = OperatorApi {
        resources,
        images,
        registry_auth: registry_auth.clone(),
        image_gc_grace: cfg.image_gc_grace,
        logs,
        flows,
        liveness,
        metrics,
        operators,
        tokens,
        revocations,
        ca,
        ui: ui_auth.clone(),
        shutdown: shutdown.clone(),
    };
    // Issued at every start (so SAN changes take effect) and renewed while
    // the controller runs.
    let mut sans = creds.server_sans.clone();
    if let Some(r) = cfg.registry_listen {
        let ip = r.ip().to_string();
        if !r.ip().is_unspecified() && !sans.contains(&ip) {
            sans.push(ip);
        }
    }
    if let Some(u) = ui_local {
        let ip = u.ip().to_string();
        if !u.ip().is_unspecified() && !sans.contains(&ip) {
            sans.push(ip);
        }
    }
    let serving = crate::serving_tls::ServingCert::issue(
        node_api.ca.clone(),
        sans,
        cfg.serving_cert_lifetime,
    )
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let tls = crate::serving_tls::server_config(serving.clone(), node_api.ca.cert_pem())
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let registry_task = match cfg.registry_listen {
        None => None,
        Some(addr) => {
            let tls =
                crate::serving_tls::registry_server_config(serving.clone(), node_api.ca.cert_pem())
                    .map_err(|e| ServerError::Tls(e.to_string()))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            let registry = Arc::new(crate::registry::Registry {
                uploads: crate::registry::uploads::Uploads::new(registry_images.clone()),
                images: registry_images,
                auth: registry_auth,
                advertised_host: local.to_string(),
                metrics: node_api.metrics.clone(),
            });
            tracing::info!(addr = %local, "registry serving (OCI Distribution v1.1)");
            let shutdown = shutdown.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = crate::registry::serve(registry, listener, tls, shutdown).await {
                    tracing::error!(error = %e, "registry listener failed");
                }
            }))
        }
    };
    let ui_task = match (ui_listener, ui_auth) {
        (Some(listener), Some(auth)) => {
            let tls = crate::ui::tls_config(serving.clone())
                .map_err(|e| ServerError::Tls(e.to_string()))?;
            let (resources, liveness, flows, logs, images, operators) = ui_parts;
            tracing::info!(url = %auth.base_url(), "web UI serving; sign in with `imctl ui`");
            let ui = Arc::new(
                crate::ui::Ui::new(resources, liveness, flows, logs, images, auth)
                    .with_operators(operators),
            );
            let shutdown = shutdown.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = crate::ui::serve(ui, listener, tls, shutdown).await {
                    tracing::error!(error = %e, "web UI failed");
                }
            }))
        }
        _ => None,
    };
    tokio::spawn(crate::serving_tls::run_renewal(
        serving,
        node_api.metrics.serving_cert_expiry.clone(),
        shutdown.clone(),
    ));

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
        store = %cfg.store,
        admin_config = %creds.admin_config.display(),
        bootstrap_token_file = %creds.token_file.display(),
        "controller serving"
    );
    let incoming = crate::serving_tls::incoming(listener, tls, shutdown.clone());
    let serve = Server::builder()
        .add_service(NodeServiceServer::new(node_api))
        .add_service(
            OperatorServiceServer::new(operator_api)
                .max_decoding_message_size(crate::operator_api::MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.clone().wait());
    // Streams end themselves on shutdown (crate::stopping); a unary call
    // or a client that never reads must not hold the process beyond the
    // grace (systemd would SIGKILL it).
    let grace = async {
        shutdown.clone().wait().await;
        tokio::time::sleep(SERVE_GRACE).await;
    };
    tokio::select! {
        r = serve => r.map_err(|e| ServerError::Serve(e.to_string()))?,
        _ = grace => tracing::warn!(grace_ms = SERVE_GRACE.as_millis() as u64, "connections still open after the grace; closing them"),
    }
    let stopped = tokio::time::timeout(TASKS_GRACE, async {
        if let Some(t) = registry_task {
            let _ = t.await;
        }
        if let Some(t) = ui_task {
            let _ = t.await;
        }
        let _ = reconcilers.await;
        let _ = metrics_task.await;
    })
    .await;
    if stopped.is_err() {
        tracing::warn!(
            grace_ms = TASKS_GRACE.as_millis() as u64,
            "reconcilers still running after the grace; leaving them"
        );
    }
    tracing::info!("controller stopped");
    Ok(())
}

struct OpenedStore {
    store: Arc<dyn Store>,
    /// Set when the store is etcd (several controllers may share it).
    etcd: Option<EtcdStore>,
}

/// Opens the store `--store` names.
async fn open_store(cfg: &ControllerConfig) -> Result<OpenedStore, ServerError> {
    let Some(endpoints) = EtcdConfig::endpoints_from_spec(&cfg.store) else {
        let path = cfg.data_dir.join("store.redb");
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| ServerError::Store {
            path: cfg.data_dir.clone(),
            source: crate::store::StoreError::Io(e.to_string()),
        })?;
        let s = EmbeddedStore::open(&path)
            .map_err(|source| ServerError::Store {
                path: path.clone(),
                source,
            })?
            .with_history_limit(cfg.store_history_events)
            .with_history_bytes(cfg.store_history_bytes);
        return Ok(OpenedStore {
            store: Arc::new(s),
            etcd: None,
        });
    };
    let mut endpoints = endpoints.map_err(ServerError::Config)?;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", p.display())))
    };
    let tls =
        if cfg.etcd_ca.is_some() || cfg.etcd_cert.is_some() || cfg.store.starts_with("etcds://") {
            for e in endpoints.iter_mut() {
                if let Some(rest) = e.strip_prefix("http://") {
                    *e = format!("https://{rest}");
                }
            }
            Some(EtcdTls {
                ca_pem: cfg.etcd_ca.as_deref().map(read).transpose()?,
                identity: match (&cfg.etcd_cert, &cfg.etcd_key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                },
            })
        } else {
            None
        };
    let shown = endpoints.join(",");
    let etcd = EtcdStore::connect(EtcdConfig {
        endpoints,
        prefix: cfg.etcd_prefix.clone(),
        tls,
        history: Some(cfg.etcd_history).filter(|h| *h > 0),
    })
    .await
    .map_err(|source| ServerError::Etcd {
        endpoints: shown.clone(),
        source,
    })?;
    tracing::info!(endpoints = %shown, prefix = %cfg.etcd_prefix, "connected to etcd");
    Ok(OpenedStore {
        store: Arc::new(etcd.clone()),
        etcd: Some(etcd),
    })
}
