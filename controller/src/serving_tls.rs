//! The controller's TLS listener, with a serving certificate that renews
//! itself while the controller runs.
//!
//! tonic's own TLS config holds one certificate for the life of the
//! server, so the controller terminates TLS itself: every handshake asks
//! [`ServingCert`] for the current certificate, and a task re-issues it
//! from the cluster CA two thirds into its lifetime. Connections already
//! open keep the certificate they were made with; agents and imctl trust
//! the CA, not the certificate, so nothing has to reconnect.
//!
//! Client certificates stay optional at the TLS layer (Join works before a
//! node has one); each RPC checks for one itself, as with tonic's TLS.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::ring as provider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use ironmesh_process::Shutdown;

use crate::pki::{ClusterCa, Identity};

/// A handshake that takes longer than this is dropped, so a client that
/// connects and says nothing holds no accept slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry interval when re-issuing fails (it needs only the CA key).
const RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServingTlsError {
    #[error("cannot issue the serving certificate: {0}")]
    Issue(#[from] crate::pki::PkiError),
    #[error("serving certificate: {0}")]
    Pem(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The serving certificate in use, and what it takes to re-issue it.
pub struct ServingCert {
    ca: Arc<ClusterCa>,
    sans: Vec<String>,
    lifetime: Duration,
    current: RwLock<Current>,
}

struct Current {
    key: Arc<CertifiedKey>,
    serial: String,
    not_after_unix: i64,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("sans", &self.sans)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl ServingCert {
    /// Issues the first certificate for `sans`, valid for `lifetime`.
    pub fn issue(
        ca: Arc<ClusterCa>,
        sans: Vec<String>,
        lifetime: Duration,
    ) -> Result<Arc<ServingCert>, ServingTlsError> {
        let current = Self::fresh(&ca, &sans, lifetime)?;
        Ok(Arc::new(ServingCert {
            ca,
            sans,
            lifetime,
            current: RwLock::new(current),
        }))
    }

    fn fresh(
        ca: &ClusterCa,
        sans: &[String],
        lifetime: Duration,
    ) -> Result<Current, ServingTlsError> {
        let lifetime = time::Duration::try_from(lifetime)
            .map_err(|e| ServingTlsError::Config(format!("lifetime: {e}")))?;
        let (cert_pem, key_pem) = ca.issue_for(&Identity::Controller, sans, true, lifetime)?;
        let info = crate::pki::cert_info_from_pem(&cert_pem)?;
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ServingTlsError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| ServingTlsError::Pem(e.to_string()))?;
        let signer = provider::sign::any_supported_type(&key)
            .map_err(|e| ServingTlsError::Pem(e.to_string()))?;
        Ok(Current {
            key: Arc::new(CertifiedKey::new(certs, signer)),
            serial: info.serial,
            not_after_unix: info.not_after,
        })
    }

    /// Serial (hex) and expiry (Unix seconds) of the certificate in use.
    pub fn current(&self) -> (String, i64) {
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        (c.serial.clone(), c.not_after_unix)
    }

    /// Re-issues the certificate now; new handshakes get the new one.
    pub fn renew(&self) -> Result<(String, i64), ServingTlsError> {
        let next = Self::fresh(&self.ca, &self.sans, self.lifetime)?;
        let out = (next.serial.clone(), next.not_after_unix);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(out)
    }

    /// When the certificate in use should be replaced: two thirds into its
    /// lifetime, as agents do with theirs.
    fn renew_in(&self) -> Duration {
        let (_, not_after) = self.current();
        let now = crate::tokens::now_unix();
        let left = Duration::from_secs(not_after.saturating_sub(now).max(0) as u64);
        left.saturating_sub(self.lifetime / 3)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        Some(c.key.clone())
    }
}

/// A rustls server config that serves `cert`, asks for (but does not
/// require) a client certificate signed by `ca_pem`, and speaks HTTP/2.
pub fn server_config(
    cert: Arc<ServingCert>,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, ServingTlsError> {
    build_config(cert, ca_pem, vec![b"h2".to_vec()])
}

/// The same for the registry's HTTPS listener, which speaks HTTP/1.1
/// (what every registry client speaks).
pub fn registry_server_config(
    cert: Arc<ServingCert>,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, ServingTlsError> {
    build_config(cert, ca_pem, vec![b"http/1.1".to_vec()])
}

fn build_config(
    cert: Arc<ServingCert>,
    ca_pem: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, ServingTlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| ServingTlsError::Pem(e.to_string()))?;
        roots
            .add(c)
            .map_err(|e| ServingTlsError::Config(e.to_string()))?;
    }
    let provider = Arc::new(provider::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServingTlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServingTlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// Accepts TCP connections on `listener` and completes their TLS
/// handshakes concurrently (a slow client delays no other). The stream
/// ends when `shutdown` fires.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.clone().wait() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off a
                    // little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Renews `cert` two thirds into each certificate's lifetime until
/// `shutdown`; `expiry` is set to the expiry of the certificate in use.
pub async fn run_renewal(
    cert: Arc<ServingCert>,
    expiry: prometheus_client::metrics::gauge::Gauge,
    shutdown: Shutdown,
) {
    expiry.set(cert.current().1);
    let mut wait = cert.renew_in();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.clone().wait() => return,
        }
        match cert.renew() {
            Ok((serial, not_after)) => {
                expiry.set(not_after);
                tracing::info!(
                    serial = %serial,
                    expires = %crate::tokens::unix_rfc3339(not_after),
                    "renewed the controller's serving certificate"
                );
                wait = cert.renew_in();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the controller's serving certificate; retrying");
                wait = RETRY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_replaces_the_certificate_two_thirds_in() {
        let (ca, _) = ClusterCa::generate().unwrap();
        let cert = ServingCert::issue(
            Arc::new(ca),
            vec!["localhost".into(), "127.0.0.1".into()],
            Duration::from_secs(90),
        )
        .unwrap();
        let (first, not_after) = cert.current();
        let now = crate::tokens::now_unix();
        assert!((not_after - now - 90).abs() <= 2, "{not_after} vs {now}");
        // Due 60 s in, i.e. with 30 s of 90 left.
        let due = cert.renew_in().as_secs();
        assert!((58..=60).contains(&due), "{due}");
        let (second, _) = cert.renew().unwrap();
        assert_ne!(first, second);
        assert_eq!(cert.current().0, second);
    }
}
