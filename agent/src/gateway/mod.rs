//! The ingress gateway: the HTTP(S) listeners of the Gateways this node
//! serves (the assignment's `gateways`), bound on the node's address.
//! Each listener is an accept loop with a route table in a `watch`
//! channel: an assignment that changes routes builds a new
//! [`router::Table`] and swaps it in, so requests in flight finish on the
//! table they started with and no connection is dropped. A listener that
//! leaves the assignment stops accepting and lets its connections finish
//! their requests. Backends are the Service endpoints the assignment
//! carries. See docs/gateway.md.
//!
//! - [`router`]: route tables and the choice of a rule and a backend.
//! - [`jwt`]: token verification and claim rules (pure).
//! - [`jwks`]: key sets, inline or fetched over HTTPS in the background.
//! - [`proxy`]: one request, from the listener to a backend and back.
//! - [`metrics`]: per-route counters and latency histograms.

pub mod jwks;
pub mod jwt;
pub mod metrics;
pub mod proxy;
pub mod router;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ironmesh_api::gateway::{GatewaySpec, HTTPRouteSpec, ListenerProtocol};
use ironmesh_proto::v1::{GatewayAssignment, ServiceEntry};
use tokio::sync::{watch, Mutex};
use tokio_rustls::rustls;

use metrics::GatewayMetrics;
use proxy::{Pool, Shared};
use router::{Auth, Endpoints, RouteInput, Table};

/// Default `refreshInterval` of a JWKS URL.
const JWKS_REFRESH: Duration = Duration::from_secs(300);

/// The gateway listeners of this node.
pub struct Gateways {
    state: Mutex<State>,
    pool: Arc<Pool>,
    metrics: Arc<GatewayMetrics>,
}

#[derive(Default)]
struct State {
    listeners: HashMap<SocketAddr, Running>,
    /// Key sets by (url, CA, interval), shared by routes and kept across
    /// route changes so a reload does not fetch again.
    jwks: HashMap<(String, Option<String>, Duration), Arc<jwks::JwksSource>>,
}

struct Running {
    /// (gateway, listener) that owns the port.
    owner: (String, String),
    table: watch::Sender<Arc<Table>>,
    tls: watch::Sender<Option<tokio_rustls::TlsAcceptor>>,
    /// The certificate the acceptor was built from.
    cert: Option<String>,
    stop: watch::Sender<bool>,
}

/// A problem with one gateway entry; the rest is applied.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("Gateway {0:?}: unreadable spec: {1}")]
    Spec(String, String),
    #[error("Gateway {gateway:?} listener {listener:?}: {message}")]
    Listener {
        gateway: String,
        listener: String,
        message: String,
    },
}

impl Gateways {
    pub fn new(metrics: Arc<GatewayMetrics>) -> Gateways {
        Gateways {
            state: Mutex::new(State::default()),
            pool: Arc::new(Pool::default()),
            metrics,
        }
    }

    /// The addresses listened on now, for tests and logs.
    pub async fn listening(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.state.lock().await.listeners.keys().copied().collect();
        v.sort();
        v
    }

    /// Makes the listeners match `gateways`; `services` gives the
    /// backends' endpoints. Returns what could not be applied (logged too).
    pub async fn apply(
        &self,
        node_ip: Option<Ipv4Addr>,
        gateways: &[GatewayAssignment],
        services: &[ServiceEntry],
    ) -> Vec<GatewayError> {
        let mut errors = Vec::new();
        let mut endpoints = Endpoints::new();
        for s in services {
            let eps = s
                .backends
                .iter()
                .filter_map(|b| {
                    let ip: Ipv4Addr = b.ip.parse().ok()?;
                    Some(SocketAddr::from((ip, u16::try_from(b.port).ok()?)))
                })
                .collect();
            endpoints.insert((s.name.clone(), s.port), eps);
        }
        let ip = node_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mut state = self.state.lock().await;
        let mut used_jwks = HashMap::new();
        let mut wanted: HashMap<SocketAddr, Wanted> = HashMap::new();
        let mut sorted: Vec<&GatewayAssignment> = gateways.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        for g in sorted {
            let spec: GatewaySpec = match serde_json::from_str(&g.spec_json) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(GatewayError::Spec(g.name.clone(), e.to_string()));
                    continue;
                }
            };
            for l in &spec.listeners {
                let lerr = |message: String| GatewayError::Listener {
                    gateway: g.name.clone(),
                    listener: l.name.clone(),
                    message,
                };
                let Ok(port) = u16::try_from(l.port) else {
                    errors.push(lerr(format!("port {} out of range", l.port)));
                    continue;
                };
                let addr = SocketAddr::from((ip, port));
                if let Some((other, _, _)) = wanted.get(&addr) {
                    errors.push(lerr(format!("port {port} is already served by {other}")));
                    continue;
                }
                let cert = match l.protocol {
                    ListenerProtocol::HTTP => None,
                    ListenerProtocol::HTTPS => {
                        match g.certificates.iter().find(|c| c.listener == l.name) {
                            Some(c) => Some((c.cert_chain_pem.clone(), c.key_pem.clone())),
                            None => {
                                errors.push(lerr("no certificate in the assignment yet".into()));
                                continue;
                            }
                        }
                    }
                };
                let mut inputs = Vec::new();
                for r in &g.routes {
                    let spec: HTTPRouteSpec = match serde_json::from_str(&r.spec_json) {
                        Ok(s) => s,
                        Err(e) => {
                            errors.push(lerr(format!("route {:?} unreadable: {e}", r.name)));
                            continue;
                        }
                    };
                    let auth = match &spec.jwt {
                        None => None,
                        Some(j) => match key_source(&mut state.jwks, &mut used_jwks, j) {
                            Ok(keys) => Some(Auth {
                                policy: jwt::Policy::new(j.clone()),
                                keys,
                                verified: jwt::VerifiedCache::default(),
                            }),
                            Err(e) => {
                                // Unverifiable: leave the route out rather
                                // than serve it open.
                                errors.push(lerr(format!("route {:?}: {e}", r.name)));
                                continue;
                            }
                        },
                    };
                    inputs.push(RouteInput {
                        name: r.name.clone(),
                        spec,
                        skip_rules: r.conflicting_rules.clone(),
                        auth,
                    });
                }
                let (table, compile_errors) = Table::build(&g.name, l.clone(), inputs, &endpoints);
                for e in compile_errors {
                    errors.push(lerr(e.to_string()));
                }
                wanted.insert(addr, (format!("{}/{}", g.name, l.name), table, cert));
            }
        }
        state.jwks = used_jwks;

        // Listeners no longer wanted, or now owned by another listener.
        let gone: Vec<SocketAddr> = state
            .listeners
            .iter()
            .filter(|(addr, r)| {
                wanted.get(addr).is_none_or(|(owner, t, _)| {
                    *owner != format!("{}/{}", r.owner.0, r.owner.1)
                        || (t.listener.protocol == ListenerProtocol::HTTPS) != r.cert.is_some()
                })
            })
            .map(|(a, _)| *a)
            .collect();
        for addr in gone {
            if let Some(r) = state.listeners.remove(&addr) {
                tracing::info!(%addr, gateway = %r.owner.0, listener = %r.owner.1, "gateway listener stopping");
                r.stop.send_replace(true);
            }
        }
        for (addr, (_, table, cert)) in wanted {
            let (gateway, listener) = (table.gateway.clone(), table.listener.name.clone());
            let lerr = |message: String| GatewayError::Listener {
                gateway: gateway.clone(),
                listener: listener.clone(),
                message,
            };
            let acceptor = match &cert {
                None => None,
                Some((chain, key)) => match acceptor(chain, key) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        errors.push(lerr(e));
                        continue;
                    }
                },
            };
            if let Some(r) = state.listeners.get_mut(&addr) {
                r.table.send_replace(Arc::new(table));
                let chain = cert.map(|(c, _)| c);
                if r.cert != chain {
                    r.tls.send_replace(acceptor);
                    r.cert = chain;
                }
                continue;
            }
            let socket = match bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(lerr(format!("cannot listen on {addr}: {e}")));
                    continue;
                }
            };
            let tls_on = acceptor.is_some();
            let (table_tx, table_rx) = watch::channel(Arc::new(table));
            let (tls_tx, tls_rx) = watch::channel(acceptor);
            let (stop_tx, stop_rx) = watch::channel(false);
            let shared = Arc::new(Shared {
                table: table_rx,
                pool: self.pool.clone(),
                metrics: self.metrics.clone(),
                tls: tls_on,
            });
            tracing::info!(%addr, gateway = %gateway, listener = %listener, tls = tls_on, "gateway listener started");
            tokio::spawn(serve(socket, shared, tls_rx, stop_rx));
            state.listeners.insert(
                addr,
                Running {
                    owner: (gateway.clone(), listener.clone()),
                    table: table_tx,
                    tls: tls_tx,
                    cert: cert.map(|(c, _)| c),
                    stop: stop_tx,
                },
            );
        }
        for e in &errors {
            tracing::warn!(error = %e, "gateway entry not applied");
        }
        errors
    }

    /// Stops every listener (in-flight requests finish).
    pub async fn stop(&self) {
        let mut state = self.state.lock().await;
        for (_, r) in state.listeners.drain() {
            r.stop.send_replace(true);
        }
    }
}

/// A listener to run: its owner (`gateway/listener`), table and the
/// certificate chain and key for HTTPS.
type Wanted = (String, Table, Option<(String, String)>);

type JwksCache = HashMap<(String, Option<String>, Duration), Arc<jwks::JwksSource>>;

/// The route's key source: inline, or the shared fetcher of its URL.
fn key_source(
    cache: &mut JwksCache,
    used: &mut JwksCache,
    j: &ironmesh_api::gateway::JwtAuth,
) -> Result<Arc<jwks::JwksSource>, String> {
    if let Some(text) = &j.jwks.inline {
        let set = jwt::KeySet::parse(text.as_bytes())?;
        return Ok(jwks::JwksSource::inline(set));
    }
    let interval = j
        .jwks
        .refresh_interval
        .as_deref()
        .and_then(|d| ironmesh_api::gateway::duration(d).ok())
        .unwrap_or(JWKS_REFRESH);
    let url = match (&j.jwks.url, j.jwks.discovery) {
        (Some(url), _) => url.clone(),
        // One fetcher per issuer, apart from one of the same URL given.
        (None, true) => format!("discovery:{}", j.issuer),
        (None, false) => return Err("no JWKS url, inline set or discovery".into()),
    };
    let key = (url.clone(), j.jwks.ca_cert.clone(), interval);
    let source = match used.get(&key).or_else(|| cache.get(&key)) {
        Some(s) => s.clone(),
        None if j.jwks.url.is_none() => {
            jwks::JwksSource::discovered(&j.issuer, j.jwks.ca_cert.clone(), interval)
                .map_err(|e| e.to_string())?
        }
        None => jwks::JwksSource::remote(url, j.jwks.ca_cert.clone(), interval)
            .map_err(|e| e.to_string())?,
    };
    used.insert(key, source.clone());
    Ok(source)
}

fn acceptor(chain_pem: &str, key_pem: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    // A restarted agent binds again while old connections sit in TIME_WAIT.
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

/// Accepts until `stop`; each connection is served on its own task.
async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: watch::Receiver<Option<tokio_rustls::TlsAcceptor>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let acceptor = tls.borrow().clone();
                    tokio::spawn(connection(tcp, peer, shared.clone(), acceptor, stop.clone()));
                }
                Err(e) => {
                    // Out of descriptors, say: let some close.
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    match acceptor {
        None => serve_http(hyper_util::rt::TokioIo::new(tcp), peer, shared, stop).await,
        Some(a) => match tokio::time::timeout(Duration::from_secs(10), a.accept(tcp)).await {
            Ok(Ok(tls)) => serve_http(hyper_util::rt::TokioIo::new(tls), peer, shared, stop).await,
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        },
    }
}

async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| proxy::handle(shared.clone(), peer, req));
    // HTTP/1.1, or HTTP/2 (ALPN h2 on TLS, prior knowledge on plaintext).
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "gateway connection ended");
            }
            return;
        }
        _ = stop.changed() => conn.as_mut().graceful_shutdown(),
    }
    // The request in flight finishes; then the connection closes.
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "gateway connection ended");
    }
}
