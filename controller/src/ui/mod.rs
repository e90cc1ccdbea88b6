//! The web UI: a control panel served by the controller on its own HTTPS
//! listener (`--ui-listen`, default `127.0.0.1:7444`; docs/ui.md).
//!
//! Pages are rendered on the server ([maud]) from the controller's cache
//! and flow ring; a small script of our own (`assets/ui.js`) listens to
//! one Server-Sent Events stream (`/events`) and re-fetches the part of
//! the page whose topic changed. The events come from one store watch and
//! one flow subscription per controller ([`feeds`]), never from a poll per
//! browser.
//!
//! - [`auth`]: one-time codes, sessions, CSRF tokens.
//! - [`pages`]: the pages and the actions behind their buttons.
//! - [`map`]: the service map (SVG) and the per-minute flow counters.

pub mod auth;
pub mod map;
pub mod pages;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use ironmesh_process::Shutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

use crate::flow_log::FlowLog;
use crate::images::ImageStore;
use crate::liveness::Liveness;
use crate::logs::LogRelay;
use crate::resources::Resources;

/// Everything the pages read and the actions write.
pub struct Ui {
    pub resources: Resources,
    pub liveness: Liveness,
    pub flows: FlowLog,
    pub logs: LogRelay,
    pub images: ImageStore,
    pub auth: auth::Auth,
    pub rates: map::FlowRates,
    /// Topics that changed (`nodes`, `instances`, `flows`, …), for `/events`.
    pub changes: broadcast::Sender<String>,
    /// When set, every request checks that the session's operator still
    /// exists (a revoked operator is signed out at once) and takes its
    /// current role.
    pub operators: Option<crate::authz::Operators>,
}

impl Ui {
    /// Sessions follow the operators' records (see [`Ui::operators`]).
    pub fn with_operators(mut self, operators: crate::authz::Operators) -> Ui {
        self.operators = Some(operators);
        self
    }

    pub fn new(
        resources: Resources,
        liveness: Liveness,
        flows: FlowLog,
        logs: LogRelay,
        images: ImageStore,
        auth: auth::Auth,
    ) -> Ui {
        let (changes, _) = broadcast::channel(256);
        Ui {
            operators: None,
            resources,
            liveness,
            flows,
            logs,
            images,
            auth,
            rates: map::FlowRates::default(),
            changes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("UI TLS configuration: {0}")]
    Tls(String),
    #[error("UI listener: {0}")]
    Io(#[from] std::io::Error),
}

/// TLS for the UI: the controller's serving certificate, no client
/// certificate asked for (browsers would prompt for one), HTTP/1.1.
pub fn tls_config(
    serving: Arc<crate::serving_tls::ServingCert>,
) -> Result<Arc<ServerConfig>, UiError> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UiError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The base URL of a UI listening on `local` (an unspecified address is
/// reached on loopback).
pub fn base_url(local: SocketAddr) -> String {
    let ip = if local.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        local.ip()
    };
    format!("https://{}", SocketAddr::new(ip, local.port()))
}

/// The routes, for [`serve`] and for tests and benchmarks.
pub fn router(ui: Arc<Ui>) -> Router {
    Router::new()
        .route("/", get(pages::overview_page))
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/events", get(events))
        .route("/assets/ui.css", get(css))
        .route("/assets/ui.js", get(js))
        .route("/nodes", get(pages::nodes_page))
        .route("/nodes/{name}/{action}", post(pages::node_action))
        .route("/workloads", get(pages::workloads_page))
        .route("/workloads/{name}", get(pages::workload_page))
        .route("/instances", get(pages::instances_page))
        .route("/instances/{name}", get(pages::instance_page))
        .route(
            "/instances/{name}/log-stream",
            get(pages::instance_log_stream),
        )
        .route("/map", get(pages::map_page))
        .route("/policies", get(pages::policies_page))
        .route("/pipelines", get(pages::pipelines_page))
        .route("/pipelines/{name}/run", post(pages::pipeline_run))
        .route("/runs/{name}", get(pages::run_page))
        .route("/runs/{name}/cancel", post(pages::run_cancel))
        .route("/runs/{name}/logs", get(pages::run_logs_page))
        .route("/images", get(pages::images_page))
        .route("/volumes", get(pages::volumes_page))
        .route("/charts", get(pages::charts_page))
        .fallback(not_found)
        .with_state(ui)
}

/// TLS connections as an axum listener.
struct TlsListener {
    incoming: tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(tls)) => {
                    let addr = tls
                        .get_ref()
                        .0
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (tls, addr);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "UI connection failed"),
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves `ui` on `listener` until `shutdown`, and runs its feeds.
pub async fn serve(
    ui: Arc<Ui>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> Result<(), UiError> {
    let local = listener.local_addr()?;
    feeds(ui.clone(), shutdown.clone());
    let incoming = crate::serving_tls::incoming(listener, tls, shutdown.clone());
    axum::serve(TlsListener { incoming, local }, router(ui))
        .with_graceful_shutdown(shutdown.wait())
        .await?;
    Ok(())
}

/// How often changes are sent to browsers at most.
const DEBOUNCE: Duration = Duration::from_millis(400);

/// The topic of a store key (`/registry/<plural>/<name>`).
fn topic_of(key: &str) -> Option<&str> {
    key.strip_prefix("/registry/")?.split('/').next()
}

/// Starts the two feeds of `/events`: one store watch of every resource,
/// and one subscription to the flow stream (which also fills
/// [`Ui::rates`]). Changes are coalesced for 400 ms.
pub fn feeds(ui: Arc<Ui>, shutdown: Shutdown) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
    {
        let ui = ui.clone();
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while !shutdown.is_requested() {
                let store = ui.resources.store().clone();
                let from = store.revision().await.unwrap_or(0);
                match store.watch("/registry/", from).await {
                    Ok(mut events) => loop {
                        let next = tokio::select! {
                            e = events.next() => e,
                            _ = shutdown.clone().wait() => return,
                        };
                        match next {
                            Some(Ok(ev)) => {
                                if let Some(t) = topic_of(&ev.kv.key) {
                                    if tx.send(t.to_string()).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Some(Err(e)) => {
                                tracing::debug!(error = %e, "UI watch ended; watching again");
                                break;
                            }
                            None => break,
                        }
                    },
                    Err(e) => tracing::debug!(error = %e, "UI cannot watch the store"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tx.send("all".to_string()).await;
            }
        });
    }
    {
        let ui = ui.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while !shutdown.is_requested() {
                let req = ironmesh_proto::v1::FlowsRequest {
                    follow: true,
                    limit: 1,
                    ..Default::default()
                };
                if let Ok(mut s) = ui.flows.open(req) {
                    let mut first = true;
                    loop {
                        let next = tokio::select! {
                            r = s.next() => r,
                            _ = shutdown.clone().wait() => return,
                        };
                        match next {
                            Some(Ok(r)) => {
                                // The first is the newest already in the ring.
                                if !std::mem::take(&mut first) {
                                    ui.rates.add(&r);
                                }
                                let _ = tx.try_send("flows".to_string());
                            }
                            _ => break,
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    tokio::spawn(async move {
        let mut pending: BTreeSet<String> = BTreeSet::new();
        loop {
            let first = tokio::select! {
                t = rx.recv() => t,
                _ = shutdown.clone().wait() => return,
            };
            let Some(first) = first else { return };
            pending.insert(first);
            let until = tokio::time::Instant::now() + DEBOUNCE;
            while let Ok(Some(t)) = tokio::time::timeout_at(until, rx.recv()).await {
                pending.insert(t);
            }
            for t in std::mem::take(&mut pending) {
                let _ = ui.changes.send(t);
            }
        }
    });
}

/// The signed-in operator of a request (cookie), or a 401 page.
pub struct Authed {
    pub session: auth::Session,
    pub id: String,
}

impl FromRequestParts<Arc<Ui>> for Authed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Arc<Ui>) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(auth::session_id)
            .map(str::to_string);
        let Some((id, mut session)) = id.and_then(|id| ui.auth.session(&id).map(|s| (id, s)))
        else {
            return Err(unauthorized());
        };
        if let Some(ops) = &ui.operators {
            match ops.get(&session.operator).await {
                Ok(Some(record)) => session.role = record.role,
                Ok(None) => {
                    // Revoked since sign-in: the session ends with it.
                    ui.auth.end(&id);
                    tracing::info!(operator = %session.operator, "web UI session ended: the operator was revoked");
                    return Err(unauthorized());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check the web UI operator");
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "cannot check the operator; try again",
                    )
                        .into_response());
                }
            }
        }
        Ok(Authed { session, id })
    }
}

/// The page every unauthenticated request gets.
pub fn unauthorized() -> Response {
    let body = maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Sign in — Ironmesh" } link rel="stylesheet" href="/assets/ui.css"; }
            body { main.signin {
                h1 { "Sign in to Ironmesh" }
                p { "Run " code { "imctl ui" } " and open the URL it prints. The code in it works once, for 5 minutes." }
            } }
        }
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::CACHE_CONTROL, "no-store")],
        Html(body.into_string()),
    )
        .into_response()
}

/// A refused request (403) with a reason.
pub fn forbidden(why: &str) -> Response {
    tracing::info!(reason = why, "UI request refused");
    (
        StatusCode::FORBIDDEN,
        Html(format!(
            "<!doctype html><title>Forbidden</title><h1>Forbidden</h1><p>{}</p>",
            map::esc(why)
        )),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    #[serde(default)]
    code: String,
}

async fn login(
    State(ui): State<Arc<Ui>>,
    axum::extract::Query(q): axum::extract::Query<LoginQuery>,
) -> Response {
    match ui.auth.exchange(&q.code) {
        Some((id, s)) => {
            tracing::info!(target: "audit", operator = %s.operator, role = %s.role, method = "UiLogin", outcome = "ok", "operator call");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, auth::Auth::cookie(&id)),
                    (header::LOCATION, "/".to_string()),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                ],
            )
                .into_response()
        }
        None => {
            tracing::info!("UI sign-in refused: unknown, used or expired code");
            unauthorized()
        }
    }
}

async fn logout(
    State(ui): State<Arc<Ui>>,
    authed: Authed,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form = pages::Form::parse(&body);
    if let Err(r) = pages::check_csrf(&authed.session, &headers, &form) {
        return *r;
    }
    ui.auth.end(&authed.id);
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, auth::Auth::clear_cookie()),
            (header::LOCATION, "/login".to_string()),
        ],
    )
        .into_response()
}

async fn events(
    State(ui): State<Arc<Ui>>,
    _authed: Authed,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let rx = ui.changes.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let topic = match rx.recv().await {
            Ok(t) => t,
            Err(broadcast::error::RecvError::Lagged(_)) => "all".to_string(),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Event::default().event("change").data(topic)), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        JS,
    )
}

async fn not_found(_authed: Authed) -> Response {
    (StatusCode::NOT_FOUND, Html("<!doctype html><title>Not found</title><h1>Not found</h1><p><a href=\"/\">Overview</a></p>")).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn topics_come_from_keys() {
        assert_eq!(topic_of("/registry/nodes/n1"), Some("nodes"));
        assert_eq!(topic_of("/pki/operators/x"), None);
    }

    #[test]
    fn base_urls_reach_loopback_for_any_address() {
        assert_eq!(
            base_url("0.0.0.0:7444".parse().unwrap()),
            "https://127.0.0.1:7444"
        );
        assert_eq!(
            base_url("10.1.2.3:7444".parse().unwrap()),
            "https://10.1.2.3:7444"
        );
    }
}
