//! The image store as an OCI registry: the Distribution Spec v1.1 over
//! HTTPS on its own listener (`--registry-listen`), so skopeo, podman,
//! buildah, crane and oras push and pull with no Ironmesh tool.
//!
//! It serves the same [`ImageStore`] as `imctl image push` and the agents'
//! `FetchBlob`: a tag pushed here is an image name placement resolves and
//! `imctl image ls` lists. TLS uses the controller's serving certificate
//! (signed by the cluster CA, renewed in place) and asks for, but does not
//! require, a client certificate, because token clients have none.
//!
//! - [`routes`]: which path and method is which operation, and the answers.
//! - [`uploads`]: chunked and monolithic blob uploads, hashed as they stream.
//! - [`auth`]: operator certificates, registry credentials, bearer tokens.
//! - [`errors`]: the spec's error codes and JSON bodies.

pub mod auth;
pub mod errors;
pub mod routes;
pub mod uploads;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::routing::{any, get};
use axum::Router;
use futures::StreamExt;
use ironmesh_process::Shutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::images::ImageStore;

/// What the routes need.
pub struct Registry {
    pub images: ImageStore,
    pub auth: auth::RegistryAuth,
    pub uploads: uploads::Uploads,
    /// `host:port` for the challenge's realm when a request has no Host.
    pub advertised_host: String,
    pub metrics: Arc<crate::metrics::ControllerMetrics>,
}

/// The peer of one connection: its address and, if it sent one, its
/// verified client certificate (DER).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub cert: Option<Vec<u8>>,
}

/// The routes, for [`serve`] and for tests.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v2", get(routes::base))
        .route("/v2/", get(routes::base))
        .route(auth::TOKEN_PATH, get(routes::token))
        .route("/v2/{*rest}", any(routes::dispatch))
        .with_state(registry)
}

/// TLS connections as an axum listener; the peer certificate travels as
/// the connection's address.
struct TlsListener {
    incoming: tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(tls)) => {
                    let (tcp, conn) = tls.get_ref();
                    let addr = tcp
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    let cert = conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    return (tls, Peer { addr, cert });
                }
                Some(Err(e)) => tracing::debug!(error = %e, "registry connection failed"),
                // Shut down: serve stops through its graceful shutdown.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            cert: None,
        })
    }
}

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// Serves `registry` on `listener` with `tls` until `shutdown`.
pub async fn serve(
    registry: Arc<Registry>,
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let incoming = crate::serving_tls::incoming(listener, tls, shutdown.clone());
    let app = router(registry).into_make_service_with_connect_info::<Peer>();
    axum::serve(TlsListener { incoming, local }, app)
        .with_graceful_shutdown(shutdown.wait())
        .await
}

#[cfg(test)]
mod tests;
