//! Process plumbing shared by `ironmesh-controller` and `ironmesh-agent`
//! (and, for files and errors, by `imctl` and `ironmesh-sim`): logging
//! setup, the Prometheus `/metrics` endpoint, the shutdown signal
//! (SIGTERM or SIGINT), atomic writes of keys and certificates
//! (`write_file_atomic`) and one-line error chains (`error_chain`). It owns
//! no cluster logic.

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

/// Writes `data` to `path` with `mode`, so a crash never leaves a
/// half-written key or certificate and no other process can read or swap
/// the bytes on the way: a temporary file with a unique name beside `path`
/// is created with `O_EXCL` and `mode` (never a pre-existing file or a
/// symlink someone planted), written and fsynced, renamed over `path`, and
/// the directory is fsynced so the rename itself survives a crash. The
/// temporary file is removed when anything fails.
pub fn write_file_atomic(path: &std::path::Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // `create_new` is O_CREAT|O_EXCL: it fails on any existing entry,
    // symlinks included, so nothing planted at the name is followed.
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let mut name = std::ffi::OsString::from(".");
        name.push(file_name);
        name.push(format!(
            ".{}.{}.{nanos:08x}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let written = (|| {
        // The umask may have narrowed `mode`; a public file must still be
        // readable, and a secret never more than asked.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_write_replaces_with_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.key");
        write_file_atomic(&p, b"one", 0o600).unwrap();
        write_file_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("node.key")]);
    }

    #[test]
    fn atomic_write_never_follows_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        // Whatever temporary name is chosen, the final path is replaced by
        // rename, not written through: a symlink at the target is swapped
        // for the new file and the file it pointed at is untouched.
        let p = dir.path().join("ca.key");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write_file_atomic(&p, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn atomic_write_into_a_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no/such/dir/file");
        assert!(write_file_atomic(&p, b"x", 0o600).is_err());
    }
}
