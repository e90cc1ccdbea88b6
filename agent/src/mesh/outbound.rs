//! Outbound: connections a local mesh instance opened to a mesh instance
//! on another node, captured by `connect4` to the listener in its own
//! namespace, carried as an HTTP/2 CONNECT stream over mTLS to the
//! destination node's proxy. Never a plaintext fallback: a connection that
//! cannot be tunnelled is closed.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::inbound::Local;
use super::{ConnReport, Mesh, MeshMetrics, MESH_HBONE_PORT};

/// The header carrying the original client address to the destination
/// proxy, which believes it only when it belongs to the certificate's
/// workload.
pub const FORWARDED: &str = "forwarded";

pub(crate) async fn serve(mesh: Arc<Mesh>, local: Arc<Local>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(instance = %local.instance, error = %e, "outbound accept failed");
                continue;
            }
        };
        let (mesh, local) = (mesh.clone(), local.clone());
        tokio::spawn(async move { handle(mesh, local, tcp, peer).await });
    }
}

async fn handle(mesh: Arc<Mesh>, local: Arc<Local>, tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let SocketAddr::V4(peer) = peer else { return };
    let orig = match mesh.datapath.mesh_take_original(local.cookie, peer) {
        Ok(Some(o)) => o,
        Ok(None) => {
            tracing::debug!(instance = %local.instance, %peer, "connection to the outbound listener without a captured destination; closed");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a captured destination");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let view = mesh.view();
    let src = SocketAddrV4::new(local.ip, peer.port());
    let src_identity = view
        .workload_identity
        .get(&local.workload)
        .copied()
        .unwrap_or(0);
    let mut report = ConnReport {
        direction: "outbound",
        result: "error",
        src,
        dst: orig,
        src_id: local.spiffe_id.clone(),
        dst_id: String::new(),
        src_identity,
        dst_identity: 0,
        bytes_out: 0,
        bytes_in: 0,
        started,
    };
    let Some(dst) = view.peers.get(orig.ip()) else {
        tracing::info!(instance = %local.instance, dst = %orig, "destination left the mesh; connection closed");
        mesh.report(report);
        return;
    };
    report.dst_id = mesh.spiffe_of(&local.spiffe_id, &dst.workload);
    report.dst_identity = dst.identity;
    if !view.allows_egress(src_identity, dst.identity, orig.port()) {
        report.result = "denied";
        reset(tcp);
        mesh.report(report);
        return;
    }
    let Some(cert) = mesh.certs.current(&local.workload) else {
        mesh.report(report);
        return;
    };
    let open = mesh
        .metrics
        .open
        .get_or_create(&MeshMetrics::dir("outbound"))
        .clone();
    open.inc();
    let tunnel = SocketAddrV4::new(*orig.ip(), MESH_HBONE_PORT);
    let r = async {
        let mut send = mesh
            .pool
            .get(&mesh, &cert, &local.sockets, tunnel, &report.dst_id)
            .await?;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(orig.to_string())
            .header(FORWARDED, format!("for=\"{src}\""))
            .body(())
            .map_err(|e| e.to_string())?;
        let (resp, tx) = send.send_request(req, false).map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        Ok::<_, String>((resp, tx))
    }
    .await;
    match r {
        Ok((resp, tx)) if resp.status() == http::StatusCode::OK => {
            let (out, inb) = super::relay::relay(tcp, tx, resp.into_body()).await;
            report.result = "ok";
            report.bytes_out = out;
            report.bytes_in = inb;
        }
        Ok((resp, mut tx)) => {
            report.result = if resp.status() == http::StatusCode::FORBIDDEN {
                "denied"
            } else {
                "refused"
            };
            tracing::debug!(instance = %local.instance, dst = %orig, status = %resp.status(), "destination proxy refused the connection");
            tx.send_reset(h2::Reason::CANCEL);
            reset(tcp);
        }
        Err(e) => {
            tracing::warn!(instance = %local.instance, dst = %orig, error = %e, "cannot tunnel the connection; closed");
            reset(tcp);
        }
    }
    open.dec();
    mesh.report(report);
}

/// Closes with RST, so the client sees a refusal rather than an empty answer.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_linger(Some(std::time::Duration::ZERO));
    drop(tcp);
}
