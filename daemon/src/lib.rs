//! Process plumbing shared by `ironmesh-controller` and `ironmesh-agent`:
//! logging setup, the Prometheus `/metrics` endpoint, and the shutdown
//! signal. It owns no cluster logic.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global `tracing` subscriber. `filter` uses `RUST_LOG` syntax
/// (e.g. `info,ironmesh_controller=debug`).
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), DaemonError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| DaemonError::LogFilter(filter.to_string(), e.to_string()))?;
    use std::io::IsTerminal;
    // Colour only on a terminal; log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    res.map_err(|e| DaemonError::LogInit(e.to_string()))
}

/// Errors from process set-up.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid log filter {0:?}: {1}")]
    LogFilter(String, String),
    #[error("cannot install the logger: {0}")]
    LogInit(String),
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the {0} signal handler: {1}")]
    Signal(&'static str, std::io::Error),
}

/// A shutdown flag that flips once, on SIGTERM or SIGINT.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Starts listening for SIGTERM and SIGINT.
    pub fn on_signals() -> Result<(Shutdown, watch::Sender<bool>), DaemonError> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;
        let (tx, rx) = watch::channel(false);
        let sender = tx.clone();
        tokio::spawn(async move {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = which, "shutting down");
            let _ = sender.send(true);
        });
        Ok((Shutdown { rx }, tx))
    }

    /// A flag driven by the caller (tests, embedding).
    pub fn manual() -> (Shutdown, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (Shutdown { rx }, tx)
    }

    /// Resolves once shutdown was requested.
    pub async fn wait(mut self) {
        while !*self.rx.borrow() {
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// True once shutdown was requested.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Serves `GET /metrics` (Prometheus text format) and `GET /healthz` until
/// `shutdown`. Binds before returning so a bad address fails start-up.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), DaemonError> {
    use axum::{http::header, response::IntoResponse, routing::get, Router};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::MetricsBind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::MetricsBind { addr, source })?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response(),
                        Err(e) => {
                            tracing::error!(error = %e, "encoding metrics failed");
                            (
                                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                                String::from("metrics encoding failed"),
                            )
                                .into_response()
                        }
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.wait())
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    tracing::info!(addr = %bound, "serving metrics");
    Ok((bound, handle))
}

/// Writes `data` to `path` with `mode` via a temporary file, fsync and
/// rename, so a crash never leaves a half-written key or certificate.
pub fn write_file_atomic(path: &std::path::Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// An error and all its sources on one line (tonic's top-level transport
/// message alone is vague).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
