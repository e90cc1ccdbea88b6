//! The outbound connection pool: one mTLS HTTP/2 connection per source
//! workload (and certificate), destination address and expected identity;
//! every captured connection between them is one CONNECT stream on it.
//! A connection made with a certificate since renewed is not reused: it
//! finishes its streams and closes, so rotation fails no request.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio_rustls::TlsConnector;

use super::certs::{server_name, WorkloadCert};
use super::Mesh;

/// h2 windows: large enough that one stream fills a fast link.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// Frames up to 256 KiB: fewer frame headers and TLS records per byte.
pub(crate) const MAX_FRAME: u32 = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    src_workload: String,
    generation: u64,
    dst: SocketAddrV4,
    expect: String,
}

#[derive(Default)]
pub struct Pool {
    conns: tokio::sync::Mutex<HashMap<Key, SendRequest<Bytes>>>,
}

impl Pool {
    /// A ready stream opener to `dst`'s proxy for `cert`'s workload,
    /// reused or new (its socket made in the instance's namespace, so it
    /// leaves by the instance's own interface and address).
    pub(crate) async fn get(
        &self,
        mesh: &Arc<Mesh>,
        cert: &WorkloadCert,
        sockets: &super::netns::SocketFactory,
        dst: SocketAddrV4,
        expect: &str,
    ) -> Result<SendRequest<Bytes>, String> {
        let key = Key {
            src_workload: cert.workload.clone(),
            generation: cert.generation,
            dst,
            expect: expect.to_string(),
        };
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&key) {
            match c.clone().ready().await {
                Ok(ready) => return Ok(ready),
                Err(_) => {
                    conns.remove(&key);
                }
            }
        }
        // Connections of older certificates for the same pair are dropped
        // from the pool (their open streams go on).
        conns.retain(|k, _| {
            !(k.src_workload == key.src_workload
                && k.dst == key.dst
                && k.generation != key.generation)
        });
        let sock = sockets.tcp().await.map_err(|e| format!("socket: {e}"))?;
        let tcp = sock
            .connect(dst.into())
            .await
            .map_err(|e| format!("connecting to {dst}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let cfg = mesh
            .certs
            .client_config(cert, expect)
            .map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(cfg)
            .connect(server_name(), tcp)
            .await
            .map_err(|e| {
                mesh.metrics
                    .handshake_failures
                    .get_or_create(&super::MeshMetrics::dir("outbound"))
                    .inc();
                format!("mTLS with {dst}: {e}")
            })?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(1000)
            .handshake(tls)
            .await
            .map_err(|e| format!("HTTP/2 with {dst}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%dst, error = %e, "mesh tunnel connection ended");
            }
        });
        conns.insert(key, send.clone());
        send.ready()
            .await
            .map_err(|e| format!("HTTP/2 with {dst}: {e}"))
    }
}
