//! Inbound: the HBONE listener (port 15008) in a mesh instance's
//! namespace. Verifies the peer's chain (cluster CA), its SPIFFE ID and
//! that its node is still in the cluster, judges each CONNECT by the
//! certificate's workload against the Policy rules (403 when denied: the
//! instance never sees the connection), then connects to the instance and
//! relays. The instance sees the original client's address: the datapath's
//! getpeername hook answers with it for the delivery socket.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use super::certs::peer_identity;
use super::pool::{CONN_WINDOW, MAX_FRAME, STREAM_WINDOW};
use super::{ConnReport, Mesh, MeshMetrics};

/// One local mesh instance, as its listeners know it.
pub struct Local {
    pub instance: String,
    pub workload: String,
    pub spiffe_id: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    /// Its network namespace's cookie.
    pub cookie: u64,
    /// Makes sockets in its namespace.
    pub sockets: super::netns::SocketFactory,
}

pub(crate) async fn serve(
    mesh: Arc<Mesh>,
    local: Arc<Local>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(instance = %local.instance, error = %e, "inbound accept failed");
                continue;
            }
        };
        let (mesh, local, acceptor) = (mesh.clone(), local.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    mesh.metrics
                        .handshake_failures
                        .get_or_create(&MeshMetrics::dir("inbound"))
                        .inc();
                    tracing::info!(instance = %local.instance, %peer, error = %e, "mesh handshake refused");
                    return;
                }
            };
            let id = match tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| peer_identity(c))
            {
                Some(Ok(id)) => id,
                other => {
                    mesh.metrics
                        .handshake_failures
                        .get_or_create(&MeshMetrics::dir("inbound"))
                        .inc();
                    tracing::info!(instance = %local.instance, %peer, problem = ?other.map(|r| r.err()), "mesh peer certificate without a usable identity");
                    return;
                }
            };
            if !mesh.view().nodes.contains(&id.node) {
                mesh.metrics
                    .handshake_failures
                    .get_or_create(&MeshMetrics::dir("inbound"))
                    .inc();
                tracing::warn!(instance = %local.instance, %peer, node = %id.node, spiffe_id = %id.spiffe_id, "mesh peer's node is not in the cluster (revoked or removed); refused");
                return;
            }
            let mut conn = match h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_concurrent_streams(1000)
                .handshake::<_, Bytes>(tls)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
                    return;
                }
            };
            let tunnel_peer = match peer {
                SocketAddr::V4(p) => p,
                SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            };
            while let Some(req) = conn.accept().await {
                let Ok((req, respond)) = req else { break };
                let (mesh, local, id) = (mesh.clone(), local.clone(), id.clone());
                tokio::spawn(async move {
                    stream(mesh, local, id, tunnel_peer, req, respond).await;
                });
            }
        });
    }
}

async fn stream(
    mesh: Arc<Mesh>,
    local: Arc<Local>,
    id: super::certs::PeerIdentity,
    tunnel_peer: SocketAddrV4,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let started = Instant::now();
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, code: http::StatusCode| {
        if let Ok(resp) = http::Response::builder().status(code).body(()) {
            let _ = respond.send_response(resp, true);
        }
    };
    if req.method() != http::Method::CONNECT {
        answer(&mut respond, http::StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let target: Option<SocketAddrV4> = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let Some(target) = target.filter(|t| *t.ip() == local.ip) else {
        answer(&mut respond, http::StatusCode::MISDIRECTED_REQUEST);
        return;
    };
    let view = mesh.view();
    // The node may have been removed (revoked) since the handshake: a
    // pooled connection carries no new stream after that.
    if !view.nodes.contains(&id.node) {
        mesh.metrics
            .handshake_failures
            .get_or_create(&MeshMetrics::dir("inbound"))
            .inc();
        answer(&mut respond, http::StatusCode::FORBIDDEN);
        return;
    }
    let src_workload = id
        .spiffe_id
        .strip_prefix(&mesh.spiffe_of(&local.spiffe_id, ""))
        .map(str::to_string);
    let src_identity = src_workload
        .as_ref()
        .and_then(|w| view.workload_identity.get(w).copied())
        .unwrap_or(0);
    let dst_identity = view.peers.get(&local.ip).map(|p| p.identity).unwrap_or(0);
    // The client's address as the source proxy says, believed only when it
    // is an instance of the certificate's workload.
    let claimed: Option<SocketAddrV4> = req
        .headers()
        .get(super::outbound::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("for=\""))
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse().ok());
    let client = claimed
        .filter(|c| {
            view.peers
                .get(c.ip())
                .is_some_and(|p| Some(&p.workload) == src_workload.as_ref())
        })
        .unwrap_or(tunnel_peer);
    let mut report = ConnReport {
        direction: "inbound",
        result: "error",
        src: client,
        dst: target,
        src_id: id.spiffe_id.clone(),
        dst_id: local.spiffe_id.clone(),
        src_identity,
        dst_identity,
        bytes_out: 0,
        bytes_in: 0,
        started,
    };
    if src_workload.is_none() || !view.allows(src_identity, dst_identity, target.port()) {
        report.result = "denied";
        tracing::info!(instance = %local.instance, src = %id.spiffe_id, port = target.port(), "mesh connection denied by policy");
        answer(&mut respond, http::StatusCode::FORBIDDEN);
        mesh.report(report);
        return;
    }
    let delivered = async {
        let sock = local.sockets.tcp().await.map_err(|e| e.to_string())?;
        sock.bind(SocketAddrV4::new(local.ip, 0).into())
            .map_err(|e| e.to_string())?;
        let SocketAddr::V4(from) = sock.local_addr().map_err(|e| e.to_string())? else {
            return Err("not IPv4".to_string());
        };
        // Before connecting: the instance may accept() at once.
        mesh.datapath
            .mesh_peer_set(local.cookie, from, client)
            .map_err(|e| e.to_string())?;
        match sock.connect(target.into()).await {
            Ok(s) => Ok((s, from)),
            Err(e) => {
                mesh.datapath.mesh_peer_remove(local.cookie, from);
                Err(format!("connecting to {target}: {e}"))
            }
        }
    }
    .await;
    let (tcp, from) = match delivered {
        Ok(x) => x,
        Err(e) => {
            report.result = "refused";
            tracing::debug!(instance = %local.instance, error = %e, "mesh delivery failed");
            answer(&mut respond, http::StatusCode::SERVICE_UNAVAILABLE);
            mesh.report(report);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let open = mesh
        .metrics
        .open
        .get_or_create(&MeshMetrics::dir("inbound"))
        .clone();
    open.inc();
    let resp = match http::Response::builder()
        .status(http::StatusCode::OK)
        .body(())
    {
        Ok(r) => r,
        Err(_) => return,
    };
    match respond.send_response(resp, false) {
        Ok(tx) => {
            let (to_client, from_client) = super::relay::relay(tcp, tx, req.into_body()).await;
            report.result = "ok";
            report.bytes_in = from_client;
            report.bytes_out = to_client;
        }
        Err(e) => tracing::debug!(error = %e, "mesh stream reset before it opened"),
    }
    open.dec();
    mesh.datapath.mesh_peer_remove(local.cookie, from);
    mesh.report(report);
}
