//! One listener's request path: pick the rule ([`super::router`]), check
//! the token ([`super::jwt`]), then redirect or proxy to a backend over a
//! pooled HTTP/1.1 connection with the rule's timeout and retries; every
//! request ends in one access log line and the route's metrics.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::watch;

use super::jwt::{self, JwtError};
use super::metrics::{GatewayMetrics, RequestLabels, RouteLabels};
use super::router::{Auth, Rule, Table};

/// Bodies both ways.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Connecting to a backend; past it the attempt is a connect failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Request bodies up to this size are kept so a retry can send them again;
/// larger ones stream through once, without retries.
const MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// How long a token check may wait for the issuer's key set.
const KEYS_WAIT: Duration = Duration::from_secs(2);
/// Idle connections kept per backend address.
const MAX_IDLE_PER_BACKEND: usize = 256;

/// What every connection of one listener shares.
pub struct Shared {
    pub table: watch::Receiver<Arc<Table>>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<GatewayMetrics>,
    pub tls: bool,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, error: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": error, "message": message}).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// W3C trace context: the incoming `traceparent` continued with a new
/// span of ours, or a new trace. Returns (trace id, header to send on).
pub fn trace_context(h: &HeaderMap) -> (String, String) {
    let span: [u8; 8] = rand::random();
    let span = hex::encode(span);
    if let Some(v) = h.get("traceparent").and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = v.trim().split('-').collect();
        let hex_of = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if let [version, trace, parent, flags] = parts[..] {
            if hex_of(version, 2)
                && version != "ff"
                && hex_of(trace, 32)
                && trace.bytes().any(|b| b != b'0')
                && hex_of(parent, 16)
                && parent.bytes().any(|b| b != b'0')
                && hex_of(flags, 2)
            {
                return (trace.to_string(), format!("00-{trace}-{span}-{flags}"));
            }
        }
    }
    let trace: [u8; 16] = rand::random();
    let trace = hex::encode(trace);
    (trace.clone(), format!("00-{trace}-{span}-01"))
}

/// The token as the route says where to find it.
pub fn token<'a>(h: &'a HeaderMap, src: &ironmesh_api::gateway::TokenSource) -> Option<&'a str> {
    let bearer = |v: &'a str| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    };
    if let Some(c) = &src.cookie {
        return h
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == c)
            .map(|(_, v)| v.trim());
    }
    match &src.header {
        Some(name) if !name.eq_ignore_ascii_case("authorization") => h
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim),
        _ => h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer),
    }
    .filter(|t| !t.is_empty())
}

/// Verifies the request's token; on success its claims.
pub async fn authenticate(
    auth: &Auth,
    h: &HeaderMap,
) -> Result<Arc<BTreeMap<String, Value>>, JwtError> {
    let raw = token(h, &auth.policy.spec.token_from).ok_or(JwtError::Missing)?;
    let keys = match auth.keys.current() {
        Some(k) => k,
        None => auth
            .keys
            .first(KEYS_WAIT)
            .await
            .ok_or(JwtError::KeysUnavailable)?,
    };
    if let Some(claims) = auth.verified.get(raw, &keys) {
        auth.policy.check_claims(&claims, SystemTime::now())?;
        return Ok(claims);
    }
    let tok = jwt::decode(raw, &auth.policy.spec.algorithms)?;
    let keys = match tok.verify(&keys) {
        // A key rotated in at the issuer: fetch the set again, once.
        Err(JwtError::UnknownKey(_)) => {
            let keys = auth
                .keys
                .refreshed(KEYS_WAIT)
                .await
                .ok_or(JwtError::KeysUnavailable)?;
            tok.verify(&keys)?;
            keys
        }
        r => {
            r?;
            keys
        }
    };
    let claims = Arc::new(tok.claims()?);
    auth.policy.check_claims(&claims, SystemTime::now())?;
    auth.verified.put(raw, &keys, claims.clone());
    Ok(claims)
}

fn refusal(gateway: &str, e: &JwtError) -> Response<Body> {
    let status = match e {
        JwtError::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED),
    };
    let error = match status {
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::SERVICE_UNAVAILABLE => "keys_unavailable",
        _ => "unauthorized",
    };
    let mut r = json_response(status, error, &e.to_string());
    let challenge = match e.code() {
        "" => format!("Bearer realm=\"{gateway}\""),
        code => format!(
            "Bearer realm=\"{gateway}\", error=\"{code}\", error_description=\"{}\"",
            e.to_string().replace('"', "'")
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Headers that describe one hop, never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for n in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(listed) {
        h.remove(n.as_str());
    }
}

fn apply_changes(h: &mut HeaderMap, c: &ironmesh_api::gateway::HeaderChanges) {
    for n in &c.remove {
        h.remove(n.as_str());
    }
    for (k, v) in &c.set {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    for (k, v) in &c.add {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
}

/// The request's host, lowercase, without a port.
fn host_of<B>(req: &Request<B>) -> String {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let h = if raw.starts_with('[') {
        raw.split_once(']')
            .map_or(raw, |(h, _)| h)
            .trim_start_matches('[')
    } else {
        raw.split(':').next().unwrap_or_default()
    };
    h.to_ascii_lowercase()
}

/// What the access log and metrics need at the end of a request.
struct Finish {
    metrics: Arc<GatewayMetrics>,
    gateway: String,
    route: String,
    method: String,
    host: String,
    path: String,
    status: u16,
    subject: String,
    trace_id: String,
    upstream: String,
    started: Instant,
}

impl Finish {
    fn done(self, bytes: u64) {
        let took = self.started.elapsed();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                gateway: self.gateway.clone(),
                route: self.route.clone(),
                code: self.status.to_string(),
            })
            .inc();
        self.metrics
            .latency
            .get_or_create(&RouteLabels {
                gateway: self.gateway.clone(),
                route: self.route.clone(),
            })
            .observe(took.as_secs_f64());
        tracing::info!(
            target: "ironmesh::gateway::access",
            gateway = %self.gateway,
            route = %self.route,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = self.status,
            bytes,
            duration_ms = took.as_secs_f64() * 1000.0,
            subject = %self.subject,
            trace_id = %self.trace_id,
            upstream = %self.upstream,
            "request"
        );
    }
}

/// The response body, counted; logs once it ends or is dropped.
struct Logged {
    inner: Body,
    bytes: u64,
    finish: Option<Finish>,
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.finish.take() {
                    f.done(this.bytes);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(self.bytes);
        }
    }
}

/// Serves one request; never fails (errors are answers).
pub async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let table = shared.table.borrow().clone();
    let host = host_of(&req);
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_string();
    let (trace_id, traceparent) = trace_context(req.headers());
    let mut finish = Finish {
        metrics: shared.metrics.clone(),
        gateway: table.gateway.clone(),
        route: String::new(),
        method: method.clone(),
        host: host.clone(),
        path: path.clone(),
        status: 0,
        subject: String::new(),
        trace_id,
        upstream: String::new(),
        started,
    };
    let mut resp =
        route_request(&shared, &table, peer, req, &host, &traceparent, &mut finish).await;
    if let Ok(v) = HeaderValue::from_str(&traceparent) {
        resp.headers_mut().insert("traceparent", v);
    }
    finish.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let logged = Logged {
        inner: body,
        bytes: 0,
        finish: Some(finish),
    };
    Ok(Response::from_parts(parts, logged.boxed()))
}

async fn route_request(
    shared: &Shared,
    table: &Table,
    peer: SocketAddr,
    req: Request<Incoming>,
    host: &str,
    traceparent: &str,
    finish: &mut Finish,
) -> Response<Body> {
    let Some((route, rule)) =
        table.select(host, req.method().as_str(), req.uri().path(), req.headers())
    else {
        return json_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "no route matches this request",
        );
    };
    finish.route = route.name.clone();
    let mut claim_headers = Vec::new();
    let mut drop_token_header = None;
    if let Some(auth) = &route.auth {
        match authenticate(auth, req.headers()).await {
            Ok(claims) => {
                finish.subject = claims
                    .get("sub")
                    .map(jwt::claim_header_value)
                    .unwrap_or_default();
                for c in &auth.policy.spec.claims_to_headers {
                    claim_headers.push((
                        c.header.clone(),
                        claims.get(&c.claim).map(jwt::claim_header_value),
                    ));
                }
                // The token is for the gateway (Envoy's default): not passed on.
                if auth.policy.spec.token_from.cookie.is_none() {
                    drop_token_header = Some(
                        auth.policy
                            .spec
                            .token_from
                            .header
                            .clone()
                            .unwrap_or_else(|| "authorization".into()),
                    );
                }
            }
            Err(e) => {
                tracing::debug!(route = %route.name, error = %e, "request refused");
                return refusal(&table.gateway, &e);
            }
        }
    }
    if let Some(rd) = &rule.redirect {
        return redirect(rd, shared.tls, host, table.listener.port, &req);
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(h) = drop_token_header {
        parts.headers.remove(h.as_str());
    }
    // Claim headers come only from the token: a client's own are dropped.
    for (name, value) in &claim_headers {
        parts.headers.remove(name.as_str());
        if let (Some(v), Ok(n)) = (value, HeaderName::from_bytes(name.as_bytes())) {
            if let Ok(v) = HeaderValue::from_str(v) {
                parts.headers.insert(n, v);
            }
        }
    }
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    let h = &mut parts.headers;
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if shared.tls { "https" } else { "http" }),
    );
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert("x-forwarded-host", v);
    }
    if let Ok(v) = HeaderValue::from_str(traceparent) {
        h.insert("traceparent", v);
    }
    apply_changes(h, &rule.request_headers);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Ok(uri) = path_and_query.parse::<http::Uri>() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "unusable request target",
        );
    };
    // An HTTP/2 client names the host in :authority; the backend speaks
    // HTTP/1.1 and needs it in Host.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let resp = match tokio::time::timeout(rule.timeout, forward(shared, rule, parts, body, finish))
        .await
    {
        Ok(r) => r,
        Err(_) => json_response(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the backend did not answer within the route's timeout",
        ),
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    apply_changes(&mut parts.headers, &rule.response_headers);
    Response::from_parts(parts, body)
}

fn redirect<B>(
    rd: &ironmesh_api::gateway::Redirect,
    tls: bool,
    host: &str,
    listener_port: u32,
    req: &Request<B>,
) -> Response<Body> {
    let scheme = rd
        .scheme
        .clone()
        .unwrap_or_else(|| if tls { "https" } else { "http" }.into());
    let host = rd.hostname.clone().unwrap_or_else(|| host.to_string());
    let port = rd.port.or_else(|| {
        // Keep the listener's port unless the scheme changes to its default.
        (rd.scheme.is_none() && rd.hostname.is_none()).then_some(listener_port)
    });
    let default_port = if scheme == "https" { 443 } else { 80 };
    let authority = match port {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host,
    };
    let path = rd
        .path
        .clone()
        .unwrap_or_else(|| req.uri().path().to_string());
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!("{scheme}://{authority}{path}{query}");
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::from_u16(rd.status_code).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Sends the request to a backend, retrying as the rule allows.
async fn forward(
    shared: &Shared,
    rule: &Rule,
    parts: http::request::Parts,
    body: Incoming,
    finish: &mut Finish,
) -> Response<Body> {
    // A body we can send again, or the stream to send once.
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_REPLAY_BYTES);
    let (replay, mut stream) = if rule.retries.is_some() && small {
        match Limited::new(body, MAX_REPLAY_BYTES as usize)
            .collect()
            .await
        {
            Ok(b) => (Some(b.to_bytes()), None),
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("cannot read the request body: {e}"),
                )
            }
        }
    } else {
        (None, Some(body))
    };
    if let Some(r) = &rule.retries {
        r.budget.request();
    }
    let mut attempt = 0u32;
    loop {
        let retry = |on: bool| -> bool {
            match &rule.retries {
                Some(r) if on && attempt < r.attempts && replay.is_some() => r.budget.try_retry(),
                _ => false,
            }
        };
        let Some(backend) = rule.pick(rand::random()) else {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_backend",
                "the rule has no backend with a weight",
            );
        };
        let Some(addr) = backend.endpoint() else {
            let msg = format!(
                "service {}:{} has no ready endpoint",
                backend.service, backend.port
            );
            if retry(rule.retries.as_ref().is_some_and(|r| r.on_connect_failure)) {
                attempt += 1;
                continue;
            }
            return json_response(StatusCode::SERVICE_UNAVAILABLE, "no_endpoint", &msg);
        };
        finish.upstream = addr.to_string();
        let body = match (&replay, stream.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s.boxed(),
            (None, None) => {
                return json_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream",
                    "the request body was already sent",
                )
            }
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        match shared.pool.send(addr, req).await {
            Ok(resp)
                if resp.status() == StatusCode::SERVICE_UNAVAILABLE
                    && retry(rule.retries.as_ref().is_some_and(|r| r.on_503)) =>
            {
                tracing::debug!(upstream = %addr, attempt, "503 from the backend; retrying");
                attempt += 1;
            }
            Ok(resp) => return resp.map(|b| b.boxed()),
            Err(SendError::Connect(e)) => {
                tracing::debug!(upstream = %addr, attempt, error = %e, "cannot connect to the backend");
                if !retry(rule.retries.as_ref().is_some_and(|r| r.on_connect_failure)) {
                    return json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream_connect",
                        &format!("cannot connect to {addr}: {e}"),
                    );
                }
                attempt += 1;
            }
            Err(SendError::Upstream(e)) => {
                return json_response(StatusCode::BAD_GATEWAY, "upstream", &format!("{addr}: {e}"));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Upstream(String),
}

/// Keep-alive HTTP/1.1 connections to backends, by address.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<SendRequest<Body>>>>,
}

impl Pool {
    /// A connection to `addr` that can take a request now, if one is idle.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        list.retain(|s| !s.is_closed());
        let i = list.iter().position(|s| s.is_ready())?;
        Some(list.swap_remove(i))
    }

    fn put(&self, addr: SocketAddr, s: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push(s);
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<Body>, SendError> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| SendError::Connect(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "backend connection ended");
            }
        });
        Ok(send)
    }

    /// Sends `req` on an idle connection, or a new one. A request an idle
    /// connection could not take (it closed meanwhile) goes on a new one.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let req = match self.take(addr) {
            Some(mut s) => match s.try_send_request(req).await {
                Ok(resp) => {
                    self.put(addr, s);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(req) => req,
                    None => return Err(SendError::Upstream(e.into_error().to_string())),
                },
            },
            None => req,
        };
        let mut s = self.connect(addr).await?;
        match s.send_request(req).await {
            Ok(resp) => {
                self.put(addr, s);
                Ok(resp)
            }
            Err(e) => Err(SendError::Upstream(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_api::gateway::TokenSource;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn trace_context_is_continued_or_created() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, out) = trace_context(&headers(&[("traceparent", incoming)]));
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(out, incoming, "a new span of ours");
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let (trace, out) = trace_context(&headers(&[("traceparent", bad)]));
            assert_eq!(trace.len(), 32);
            assert!(
                !out.contains("4bf92f35") && out.starts_with("00-") && out.ends_with("-01"),
                "{bad} → {out}"
            );
        }
    }

    #[test]
    fn tokens_come_from_where_the_route_says() {
        let h = headers(&[
            ("authorization", "Bearer abc.def.ghi"),
            ("x-token", "xyz"),
            ("cookie", "a=1; session=tok; b=2"),
        ]);
        assert_eq!(token(&h, &TokenSource::default()), Some("abc.def.ghi"));
        let src = TokenSource {
            header: Some("x-token".into()),
            cookie: None,
        };
        assert_eq!(token(&h, &src), Some("xyz"));
        let src = TokenSource {
            header: None,
            cookie: Some("session".into()),
        };
        assert_eq!(token(&h, &src), Some("tok"));
        assert_eq!(
            token(
                &headers(&[("authorization", "Basic dXNlcg==")]),
                &TokenSource::default()
            ),
            None
        );
        assert_eq!(
            token(
                &headers(&[("authorization", "bearer  t ")]),
                &TokenSource::default()
            ),
            Some("t")
        );
        assert_eq!(token(&headers(&[]), &TokenSource::default()), None);
    }

    #[test]
    fn refusals_carry_a_challenge_and_json() {
        let r = refusal("edge", &JwtError::Missing);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"edge\""
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = refusal("edge", &JwtError::Expired);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"edge\", error=\"invalid_token\", error_description=\"token expired\""
        );
        let r = refusal(
            "edge",
            &JwtError::Forbidden {
                claim: "scope".into(),
            },
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = headers(&[
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "5"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
