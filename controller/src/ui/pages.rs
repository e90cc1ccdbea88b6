//! The pages of the web UI and the actions behind their buttons.
//!
//! Every page is rendered whole on the server; with the header
//! `X-UI-Fragment: 1` only its live part (`<main id="live">`) is sent, which
//! is what `ui.js` re-fetches when `/events` names one of the page's
//! topics. Lists take `?page=` (from 1) and `?limit=` (default
//! [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]) and read the cache without
//! copying what they do not show.
//!
//! Actions are POSTs: a session, its CSRF token and a role that allows
//! the change ([`crate::authz::Action`]) are checked, in that order, and an
//! audit line is written as for the gRPC calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{FlowRecord, FlowsRequest, ListImagesRequest, LogsRequest};
use maud::{html, Markup, DOCTYPE};
use serde_json::{json, Value};

use super::auth::Session;
use super::map::{self, Filter};
use super::{forbidden, Authed, Ui};
use crate::authz::{audit, Action};
use crate::liveness::ready_status;
use crate::resources::ResourceError;

/// Rows per page unless `?limit=` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// The most rows one page shows.
pub const MAX_LIMIT: usize = 1000;
/// Flows in the table below the map.
const FLOW_TABLE_ROWS: usize = 100;
/// Workloads in the policy matrix at most.
const MATRIX_MAX: usize = 60;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A decoded `application/x-www-form-urlencoded` body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Form(pub Vec<(String, String)>);

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    b.get(i + 1).and_then(|c| hex(*c)),
                    b.get(i + 2).and_then(|c| hex(*c)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Form {
    pub fn parse(body: &[u8]) -> Form {
        let s = String::from_utf8_lossy(body);
        Form(
            s.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }
}

/// Refuses (403) a POST without this session's CSRF token, as form field
/// `csrf` or header `x-csrf-token`.
pub fn check_csrf(s: &Session, headers: &HeaderMap, form: &Form) -> Result<(), Box<Response>> {
    let from_header = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if s.csrf_ok(form.get("csrf")) || s.csrf_ok(from_header) {
        Ok(())
    } else {
        Err(Box::new(forbidden("missing or wrong CSRF token")))
    }
}

/// Refuses (403) an action the session's role does not allow.
fn check_role(s: &Session, action: Action, method: &str) -> Result<(), Box<Response>> {
    s.caller()
        .may(action, method)
        .map_err(|st| Box::new(forbidden(st.message())))
}

/// Session, CSRF token and role of a POST, in that order.
fn check_post(
    s: &Session,
    headers: &HeaderMap,
    form: &Form,
    action: Action,
    method: &str,
) -> Result<(), Box<Response>> {
    check_csrf(s, headers, form)?;
    check_role(s, action, method)
}

/// One page of `kind` (the objects `p` selects) and how many there are.
async fn paged(
    ui: &Ui,
    kind: Kind,
    p: &Paging,
) -> Result<(Vec<Value>, usize), crate::resources::ResourceError> {
    let mut total = 0usize;
    let mut rows: Vec<Value> = Vec::new();
    let (offset, limit) = (p.offset(), p.limit());
    ui.resources
        .scan(kind, |o| {
            if total >= offset && rows.len() < limit {
                rows.push(o.object.clone());
            }
            total += 1;
        })
        .await?;
    Ok((rows, total))
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "UI page failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html(format!(
            "<!doctype html><title>Unavailable</title><h1>Unavailable</h1><p>{}</p>",
            map::esc(&e.to_string())
        )),
    )
        .into_response()
}

fn failed(status: StatusCode, why: &str) -> Response {
    (
        status,
        Html(format!(
            "<!doctype html><title>Failed</title><h1>Failed</h1><p>{}</p><p><a href=\"javascript:history.back()\">Back</a></p>",
            map::esc(why)
        )),
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

/// Where a form asked to go after the action (a path of this UI).
fn back_to(form: &Form, default: &str) -> String {
    let b = form.get("back");
    if b.starts_with('/') && !b.starts_with("//") {
        b.to_string()
    } else {
        default.to_string()
    }
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn n(v: &Value, p: &str) -> u64 {
    v.pointer(p).and_then(Value::as_u64).unwrap_or(0)
}

fn fragment(headers: &HeaderMap) -> bool {
    headers.get("x-ui-fragment").is_some()
}

/// `?page=&limit=`.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct Paging {
    #[serde(default)]
    pub page: Option<usize>,
    #[serde(default)]
    pub limit: Option<usize>,
}

impl Paging {
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
    }
    pub fn page(&self) -> usize {
        self.page.unwrap_or(1).max(1)
    }
    pub fn offset(&self) -> usize {
        (self.page() - 1).saturating_mul(self.limit())
    }
}

fn pager(path: &str, p: &Paging, total: usize) -> Markup {
    let pages = total.div_ceil(p.limit()).max(1);
    let page = p.page().min(pages);
    let link = |to: usize| format!("{path}?page={to}&limit={}", p.limit());
    html! {
        nav.pager aria-label="Pages" {
            @if page > 1 { a href=(link(page - 1)) rel="prev" { "← Previous" } }
            span { "Page " (page) " of " (pages) " (" (total) " in all)" }
            @if page < pages { a href=(link(page + 1)) rel="next" { "Next →" } }
        }
    }
}

const NAV: [(&str, &str); 10] = [
    ("/", "Overview"),
    ("/nodes", "Nodes"),
    ("/workloads", "Workloads"),
    ("/instances", "Instances"),
    ("/map", "Service map"),
    ("/policies", "Policies"),
    ("/pipelines", "Pipelines"),
    ("/images", "Images"),
    ("/volumes", "Volumes"),
    ("/charts", "Charts"),
];

/// A whole page (or, for `X-UI-Fragment`, its live part). `topics`:
/// the `/events` topics that make the page re-fetch itself.
fn page(
    s: &Session,
    headers: &HeaderMap,
    title: &str,
    active: &str,
    topics: &str,
    body: Markup,
    after: Option<Markup>,
) -> Response {
    let html = if fragment(headers) {
        body
    } else {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    meta name="csrf-token" content=(s.csrf);
                    title { (title) " — Ironmesh" }
                    link rel="stylesheet" href="/assets/ui.css";
                    script src="/assets/ui.js" defer {}
                }
                body data-role=(s.role.as_str()) {
                    a.skip href="#live" { "Skip to content" }
                    header.top {
                        span.brand { "Ironmesh" }
                        nav.main aria-label="Sections" {
                            ul {
                                @for (href, label) in NAV {
                                    li { a href=(href) aria-current=[(href == active).then_some("page")] { (label) } }
                                }
                            }
                        }
                        div.who {
                            span #operator { (s.operator) " (" (s.role.as_str()) ")" }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                    main #live data-topics=(topics) tabindex="-1" { (body) }
                    @if let Some(a) = after { (a) }
                }
            }
        }
    };
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(html.into_string()),
    )
        .into_response()
}

/// A POST button form with the session's CSRF token.
fn action_button(s: &Session, action: &str, label: &str, back: &str, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(s.csrf);
            input type="hidden" name="back" value=(back);
            button type="submit" class=(class) { (label) }
        }
    }
}

fn phase_class(p: &str) -> String {
    format!("phase phase-{}", p.to_ascii_lowercase())
}

// ---------------------------------------------------------------------------
// Overview
// ---------------------------------------------------------------------------

/// The overview's content: node and instance counts, recent events and
/// drops, the last hour's flows.
pub async fn overview(ui: &Ui) -> Result<Markup, ResourceError> {
    let (mut ready, mut not_ready, mut cordoned) = (0usize, 0usize, 0usize);
    ui.resources
        .scan(Kind::Node, |o| {
            if ready_status(&o.object) == Some("True") {
                ready += 1;
            } else {
                not_ready += 1;
            }
            if o.object.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
                cordoned += 1;
            }
        })
        .await?;
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0usize;
    // The newest events (time, instance, type, reason, message).
    const EVENTS: usize = 15;
    let mut events: Vec<(String, String, String, String, String)> = Vec::new();
    ui.resources
        .scan(Kind::Instance, |o| {
            total += 1;
            let p = s(&o.object, "/status/phase");
            let p = if p.is_empty() { "Pending" } else { p };
            match phases.get_mut(p) {
                Some(c) => *c += 1,
                None => {
                    phases.insert(p.to_string(), 1);
                }
            }
            if let Some(evs) = o.object.pointer("/status/events").and_then(Value::as_array) {
                for e in evs {
                    let t = s(e, "/time");
                    if events.len() >= EVENTS && events.last().is_some_and(|l| l.0.as_str() >= t) {
                        continue;
                    }
                    events.push((
                        t.to_string(),
                        o.name.clone(),
                        s(e, "/type").to_string(),
                        s(e, "/reason").to_string(),
                        s(e, "/message").to_string(),
                    ));
                    events.sort_by(|a, b| b.0.cmp(&a.0));
                    events.truncate(EVENTS);
                }
            }
        })
        .await?;
    let mut workloads = 0usize;
    ui.resources
        .scan(Kind::Workload, |_| workloads += 1)
        .await?;
    let drops = ui.flows.recent(&FlowsRequest {
        verdict: "dropped".into(),
        limit: 10,
        ..FlowsRequest::default()
    });
    let series = ui.rates.series(now_minute());
    Ok(html! {
        h1 { "Overview" }
        section.cards aria-label="Counts" {
            div.card #nodes-ready { h2 { "Nodes Ready" } p.big { (ready) } }
            div.card.warn[not_ready > 0] #nodes-notready { h2 { "Nodes NotReady" } p.big { (not_ready) } }
            div.card { h2 { "Cordoned" } p.big { (cordoned) } }
            div.card { h2 { "Workloads" } p.big { (workloads) } }
            div.card { h2 { "Instances" } p.big { (total) } }
        }
        section {
            h2 { "Instances by phase" }
            table #phases {
                thead { tr { th scope="col" { "Phase" } th scope="col" { "Instances" } } }
                tbody {
                    @for (p, c) in &phases {
                        tr { td { span class=(phase_class(p)) { (p) } } td.num { (c) } }
                    }
                }
            }
        }
        section {
            h2 { "Flows, last hour" }
            (map::sparkline("Allowed", "allowed", &series.iter().map(|m| m.allowed).collect::<Vec<_>>()))
            (map::sparkline("Dropped", "dropped", &series.iter().map(|m| m.dropped).collect::<Vec<_>>()))
        }
        section {
            h2 { "Recent events" }
            @if events.is_empty() { p { "No events." } } @else {
                table #events {
                    thead { tr { th scope="col" { "Time" } th scope="col" { "Instance" } th scope="col" { "Type" } th scope="col" { "Reason" } th scope="col" { "Message" } } }
                    tbody { @for (t, i, ty, r, m) in &events {
                        tr.warn[ty == "Warning"] { td { (t) } td { a href=(format!("/instances/{i}")) { (i) } } td { (ty) } td { (r) } td { (m) } }
                    } }
                }
            }
        }
        section {
            h2 { "Recent drops" }
            (flow_table(drops.iter().rev()))
        }
    })
}

fn now_minute() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64 / 60_000)
        .unwrap_or(0)
}

fn flow_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_default()
}

fn flow_table<'a>(flows: impl Iterator<Item = &'a FlowRecord>) -> Markup {
    let rows: Vec<&FlowRecord> = flows.collect();
    html! {
        @if rows.is_empty() { p { "No flows." } } @else {
            div.scroll { table.flows {
                thead { tr {
                    th scope="col" { "Time" } th scope="col" { "Source" } th scope="col" { "Destination" }
                    th scope="col" { "Port" } th scope="col" { "Verdict" } th scope="col" { "Bytes" } th scope="col" { "Node" }
                } }
                tbody { @for r in rows {
                    tr class=(map::verdict_class(&r.verdict)) {
                        td { (flow_time(r.time_unix_ms)) }
                        td { (map::end_name(&r.src_workload, &r.src_ip)) " " small { (r.src_ip) } }
                        td { (map::end_name(&r.dst_workload, &r.dst_ip)) " " small { (r.dst_ip) } }
                        td { (r.dst_port) "/" (r.protocol) }
                        td { span class=(format!("verdict {}", map::verdict_class(&r.verdict))) { (r.verdict) } }
                        td.num { (r.bytes_fwd + r.bytes_rev) }
                        td { (r.node) }
                    }
                } }
            } }
        }
    }
}

pub async fn overview_page(State(ui): State<Arc<Ui>>, a: Authed, headers: HeaderMap) -> Response {
    match overview(&ui).await {
        Ok(body) => page(
            &a.session,
            &headers,
            "Overview",
            "/",
            "nodes instances workloads flows all",
            body,
            None,
        ),
        Err(e) => unavailable(e),
    }
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

fn quantity_cpu(q: &str) -> u64 {
    ironmesh_api::quantity::parse_cpu_millis(q).unwrap_or(0)
}

fn quantity_bytes(q: &str) -> u64 {
    ironmesh_api::quantity::parse_bytes(q).unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{}Mi", b >> 20)
}

fn scalars(v: Option<&Value>) -> String {
    let Some(Value::Object(m)) = v else {
        return String::new();
    };
    m.iter()
        .filter_map(|(k, v)| match v {
            Value::String(s) if !s.is_empty() => Some(format!("{k}: {s}")),
            Value::Number(n) => Some(format!("{k}: {n}")),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn nodes_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    let (rows, total) = match paged(&ui, Kind::Node, &p).await {
        Ok(x) => x,
        Err(e) => return unavailable(e),
    };
    let names: BTreeSet<String> = rows
        .iter()
        .map(|r| s(r, "/metadata/name").to_string())
        .collect();
    // Placed on each shown node: (cpu millis, memory bytes, instances).
    let mut placed: HashMap<String, (u64, u64, usize)> = HashMap::new();
    if let Err(e) = ui
        .resources
        .scan(Kind::Instance, |o| {
            let node = s(&o.object, "/spec/node");
            if names.contains(node) {
                let e = placed.entry(node.to_string()).or_default();
                e.0 += quantity_cpu(s(&o.object, "/spec/template/resources/cpu"));
                e.1 += quantity_bytes(s(&o.object, "/spec/template/resources/memory"));
                e.2 += 1;
            }
        })
        .await
    {
        return unavailable(e);
    }
    let admin = a.session.is_admin();
    let back = format!("/nodes?page={}&limit={}", p.page(), p.limit());
    let body = html! {
        h1 { "Nodes" }
        @if !admin { p.note { "Cordon and drain need role admin." } }
        div.scroll { table #nodes {
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "Ready" } th scope="col" { "Schedulable" }
                th scope="col" { "CPU placed / allocatable" } th scope="col" { "Memory placed / allocatable" }
                th scope="col" { "Instances" } th scope="col" { "Taints" } th scope="col" { "Conditions" }
                th scope="col" { "Inventory" }
                @if admin { th scope="col" { "Actions" } }
            } }
            tbody { @for node in &rows {
                @let name = s(node, "/metadata/name");
                @let ready = ready_status(node).unwrap_or("Unknown");
                @let cordoned = node.pointer("/spec/unschedulable") == Some(&Value::Bool(true));
                @let (cpu, mem, count) = placed.get(name).copied().unwrap_or_default();
                @let alloc_cpu = quantity_cpu(s(node, "/status/allocatable/cpu"));
                @let alloc_mem = quantity_bytes(s(node, "/status/allocatable/memory"));
                tr data-node=(name) data-ready=(ready) {
                    th scope="row" { (name) }
                    td { span class=(if ready == "True" { "pill ok" } else { "pill bad" }) { (if ready == "True" { "Ready" } else { "NotReady" }) } }
                    td { (if cordoned { "cordoned" } else { "yes" }) }
                    td { (format!("{cpu}m / {alloc_cpu}m")) (bar(cpu, alloc_cpu)) }
                    td { (format!("{} / {}", mib(mem), mib(alloc_mem))) (bar(mem, alloc_mem)) }
                    td.num { (count) }
                    td { @for t in node.pointer("/spec/taints").and_then(Value::as_array).into_iter().flatten() {
                        code { (s(t, "/key")) "=" (s(t, "/value")) ":" (s(t, "/effect")) } " "
                    } }
                    td { @for c in node.pointer("/status/conditions").and_then(Value::as_array).into_iter().flatten() {
                        span.cond title=(s(c, "/message")) { (s(c, "/type")) "=" (s(c, "/status")) @if !s(c, "/reason").is_empty() { " (" (s(c, "/reason")) ")" } } " "
                    } }
                    td { small { (scalars(node.pointer("/status/nodeInfo"))) } }
                    @if admin { td.actions {
                        @if cordoned {
                            (action_button(&a.session, &format!("/nodes/{name}/uncordon"), "Uncordon", &back, ""))
                        } @else {
                            (action_button(&a.session, &format!("/nodes/{name}/cordon"), "Cordon", &back, ""))
                        }
                        (action_button(&a.session, &format!("/nodes/{name}/drain"), "Drain", &back, "danger"))
                    } }
                }
            } }
        } }
        (pager("/nodes", &p, total))
    };
    page(
        &a.session,
        &headers,
        "Nodes",
        "/nodes",
        "nodes instances",
        body,
        None,
    )
}

/// A usage bar (`meter`) of `used` out of `of`.
fn bar(used: u64, of: u64) -> Markup {
    html! {
        @if of > 0 {
            meter min="0" max=(of) value=(used.min(of)) high=((of as f64 * 0.9) as u64)
                aria-label=(format!("{}% used", used.saturating_mul(100) / of)) {}
        }
    }
}

/// Cordon, uncordon or drain (admin: they change the Node).
pub async fn node_action(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let form = Form::parse(&body);
    let method = format!("Ui{action}");
    if let Err(r) = check_post(
        &a.session,
        &headers,
        &form,
        Action::Write(Kind::Node),
        &method,
    ) {
        return *r;
    }
    let caller = a.session.caller();
    let on = match action.as_str() {
        "cordon" | "drain" => true,
        "uncordon" => false,
        _ => return failed(StatusCode::NOT_FOUND, "no such action"),
    };
    let node = match ui.resources.get(Kind::Node, &name).await {
        Ok(Some(n)) => n.object,
        Ok(None) => return failed(StatusCode::NOT_FOUND, &format!("node {name} not found")),
        Err(e) => return unavailable(e),
    };
    let mut spec = node.get("spec").cloned().unwrap_or_else(|| json!({}));
    if !spec.is_object() {
        spec = json!({});
    }
    let r = if spec
        .get("unschedulable")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        != on
    {
        spec["unschedulable"] = json!(on);
        apply_spec(&ui, Kind::Node, &node, spec, &method).await
    } else {
        Ok(())
    };
    let r = match (r, action.as_str()) {
        (Ok(()), "drain") => drain(&ui, &name).await,
        (r, _) => r,
    };
    audit(
        &caller,
        &method,
        &format!("Node/{name}"),
        if r.is_ok() { "ok" } else { "failed" },
    );
    match r {
        Ok(()) => see_other(&back_to(&form, "/nodes")),
        Err(e) => failed(StatusCode::CONFLICT, &e),
    }
}

/// Deletes every instance bound to `node` (after the cordon): the
/// workload controller places replacements elsewhere.
async fn drain(ui: &Ui, node: &str) -> Result<(), String> {
    let on = ui
        .resources
        .list_matching(Kind::Instance, |o| s(&o.object, "/spec/node") == node)
        .await
        .map_err(|e| e.to_string())?;
    for i in on {
        match ui.resources.delete(Kind::Instance, &i.name).await {
            Ok(_) | Err(ResourceError::NotFound { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Applies `object` back with `spec` (labels and annotations kept, status
/// left to the system), as `imctl` does.
async fn apply_spec(
    ui: &Ui,
    kind: Kind,
    object: &Value,
    spec: Value,
    origin: &str,
) -> Result<(), String> {
    let mut metadata = json!({"name": s(object, "/metadata/name")});
    for field in ["labels", "annotations"] {
        if let Some(v) = object.pointer(&format!("/metadata/{field}")) {
            metadata[field] = v.clone();
        }
    }
    let doc = json!({
        "apiVersion": ironmesh_api::API_VERSION,
        "kind": kind.as_str(),
        "metadata": metadata,
        "spec": spec,
    });
    apply_doc(ui, &doc, origin).await
}

async fn apply_doc(ui: &Ui, doc: &Value, origin: &str) -> Result<(), String> {
    let v = ironmesh_api::validate(doc).map_err(|e| e.to_string())?;
    ui.resources
        .apply(&[(origin.to_string(), v)], false)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// Workloads and instances
// ---------------------------------------------------------------------------

pub async fn workloads_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    let (rows, total) = match paged(&ui, Kind::Workload, &p).await {
        Ok(x) => x,
        Err(e) => return unavailable(e),
    };
    let body = html! {
        h1 { "Workloads" }
        div.scroll { table #workloads {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Ready" } th scope="col" { "Image" } th scope="col" { "Labels" } th scope="col" { "Conditions" } } }
            tbody { @for w in &rows {
                @let name = s(w, "/metadata/name");
                tr {
                    th scope="row" { a href=(format!("/workloads/{name}")) { (name) } }
                    td { (n(w, "/status/readyReplicas")) " / " (w.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1)) }
                    td { code { (s(w, "/spec/image")) } }
                    td { small { (scalars(w.pointer("/metadata/labels"))) } }
                    td { @for c in w.pointer("/status/conditions").and_then(Value::as_array).into_iter().flatten() {
                        span.cond title=(s(c, "/message")) { (s(c, "/type")) "=" (s(c, "/status")) } " "
                    } }
                }
            } }
        } }
        (pager("/workloads", &p, total))
    };
    page(
        &a.session,
        &headers,
        "Workloads",
        "/workloads",
        "workloads instances",
        body,
        None,
    )
}

fn last_event(i: &Value) -> Markup {
    let e = i
        .pointer("/status/events")
        .and_then(Value::as_array)
        .and_then(|a| a.last());
    html! {
        @if let Some(e) = e {
            span title=(s(e, "/message")) { (s(e, "/reason")) ": " (s(e, "/message")) }
        }
    }
}

fn instances_table(rows: &[Value]) -> Markup {
    html! {
        div.scroll { table #instances {
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "Owner" } th scope="col" { "Node" } th scope="col" { "Phase" }
                th scope="col" { "Ready" } th scope="col" { "Restarts" } th scope="col" { "Last event" }
            } }
            tbody { @for i in rows {
                @let name = s(i, "/metadata/name");
                @let phase = s(i, "/status/phase");
                tr data-instance=(name) data-phase=(phase) {
                    th scope="row" { a href=(format!("/instances/{name}")) { (name) } }
                    td { @if let Some(run) = i.pointer("/spec/task/run").and_then(Value::as_str) {
                        a href=(format!("/runs/{run}")) { (run) } " " (s(i, "/spec/task/step"))
                    } @else {
                        a href=(format!("/workloads/{}", s(i, "/spec/workload"))) { (s(i, "/spec/workload")) }
                    } }
                    td { (s(i, "/spec/node")) }
                    td { span class=(phase_class(if phase.is_empty() { "Pending" } else { phase })) { (if phase.is_empty() { "Pending" } else { phase }) } }
                    td { (if i.pointer("/status/ready") == Some(&Value::Bool(true)) { "yes" } else { "no" }) }
                    td.num { (n(i, "/status/restarts")) }
                    td { (last_event(i)) }
                }
            } }
        } }
    }
}

pub async fn workload_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let w = match ui.resources.get(Kind::Workload, &name).await {
        Ok(Some(w)) => w.object,
        Ok(None) => return failed(StatusCode::NOT_FOUND, &format!("workload {name} not found")),
        Err(e) => return unavailable(e),
    };
    let insts = match ui
        .resources
        .list_matching(Kind::Instance, |o| s(&o.object, "/spec/workload") == name)
        .await
    {
        Ok(v) => v.into_iter().map(|o| o.object).collect::<Vec<_>>(),
        Err(e) => return unavailable(e),
    };
    let body = html! {
        h1 { "Workload " (name) }
        dl.facts {
            dt { "Image" } dd { code { (s(&w, "/spec/image")) } }
            dt { "Replicas" } dd { (n(&w, "/status/readyReplicas")) " ready of " (w.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1)) }
            dt { "Labels" } dd { (scalars(w.pointer("/metadata/labels"))) }
        }
        h2 { "Instances" }
        (instances_table(&insts))
    };
    page(
        &a.session,
        &headers,
        &format!("Workload {name}"),
        "/workloads",
        "workloads instances",
        body,
        None,
    )
}

pub async fn instances_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    let (rows, total) = match paged(&ui, Kind::Instance, &p).await {
        Ok(x) => x,
        Err(e) => return unavailable(e),
    };
    let body = html! {
        h1 { "Instances" }
        (instances_table(&rows))
        (pager("/instances", &p, total))
    };
    page(
        &a.session,
        &headers,
        "Instances",
        "/instances",
        "instances",
        body,
        None,
    )
}

/// The last `lines` lines of an instance's log, from its node.
async fn log_tail(ui: &Ui, instance: &str, lines: u32) -> String {
    let req = LogsRequest {
        instance: instance.to_string(),
        follow: false,
        tail_lines: lines,
    };
    let stream = match ui.logs.open(&ui.resources, req).await {
        Ok(s) => s,
        Err(e) => return format!("(no logs: {})", e.message()),
    };
    let mut out = Vec::new();
    let collect = async {
        let mut stream = stream;
        while let Some(c) = stream.next().await {
            match c {
                Ok(c) => out.extend_from_slice(&c.data),
                Err(e) => {
                    out.extend_from_slice(format!("\n(logs ended: {})", e.message()).as_bytes());
                    break;
                }
            }
            if out.len() > 256 << 10 {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(3), collect)
        .await
        .is_err()
    {
        out.extend_from_slice(b"\n(the node did not answer in 3 s)");
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn instance_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let i = match ui.resources.get(Kind::Instance, &name).await {
        Ok(Some(i)) => i.object,
        Ok(None) => return failed(StatusCode::NOT_FOUND, &format!("instance {name} not found")),
        Err(e) => return unavailable(e),
    };
    let body = html! {
        h1 { "Instance " (name) }
        dl.facts {
            dt { "Workload" } dd { (s(&i, "/spec/workload")) }
            dt { "Node" } dd { (s(&i, "/spec/node")) }
            dt { "Phase" } dd { span class=(phase_class(s(&i, "/status/phase"))) { (s(&i, "/status/phase")) } }
            dt { "Ready" } dd { (if i.pointer("/status/ready") == Some(&Value::Bool(true)) { "yes" } else { "no" }) }
            dt { "Restarts" } dd { (n(&i, "/status/restarts")) }
            dt { "IP" } dd { (s(&i, "/status/ip")) }
            dt { "Reason" } dd { (s(&i, "/status/reason")) " " (s(&i, "/status/message")) }
        }
        h2 { "Events" }
        table #events {
            thead { tr { th scope="col" { "Time" } th scope="col" { "Type" } th scope="col" { "Reason" } th scope="col" { "Message" } th scope="col" { "Count" } } }
            tbody { @for e in i.pointer("/status/events").and_then(Value::as_array).into_iter().flatten().rev() {
                tr { td { (s(e, "/time")) } td { (s(e, "/type")) } td { (s(e, "/reason")) } td { (s(e, "/message")) } td.num { (n(e, "/count")) } }
            } }
        }
    };
    // The live tail (ui.js) fills it from the log stream: the last 200
    // lines, then new output as the node sends it.
    let tail = (!fragment(&headers)).then(|| {
        html! {
            section.logs aria-label="Log" {
                h2 { "Log (live)" }
                pre #log data-log-stream=(format!("/instances/{name}/log-stream")) tabindex="0" {}
                noscript { p { a href=(format!("/instances/{name}/log-stream")) { "The log as an event stream" } } }
            }
        }
    });
    page(
        &a.session,
        &headers,
        &format!("Instance {name}"),
        "/instances",
        "instances",
        body,
        tail,
    )
}

/// New log output of an instance as SSE `log` events (the page's live
/// tail appends them).
pub async fn instance_log_stream(
    State(ui): State<Arc<Ui>>,
    _a: Authed,
    Path(name): Path<String>,
) -> Response {
    let req = LogsRequest {
        instance: name,
        follow: true,
        tail_lines: 200,
    };
    match ui.logs.open(&ui.resources, req).await {
        Ok(s) => {
            let events = s.map(|c| {
                Ok::<_, std::convert::Infallible>(match c {
                    Ok(c) => Event::default()
                        .event("log")
                        .data(String::from_utf8_lossy(&c.data).replace('\r', "")),
                    Err(e) => Event::default().event("end").data(e.message()),
                })
            });
            Sse::new(events)
                .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
                .into_response()
        }
        Err(e) => failed(StatusCode::NOT_FOUND, e.message()),
    }
}

// ---------------------------------------------------------------------------
// Service map
// ---------------------------------------------------------------------------

/// The map page's content for `filter`: the SVG and the newest flows.
pub async fn service_map(ui: &Ui, filter: &Filter) -> Result<Markup, ResourceError> {
    let mut workloads = Vec::new();
    ui.resources
        .scan(Kind::Workload, |o| workloads.push(o.name.clone()))
        .await?;
    let flows = ui.flows.recent(&FlowsRequest::default());
    let g = map::graph(&flows, &workloads, filter);
    let table: Vec<&FlowRecord> = flows
        .iter()
        .rev()
        .filter(|r| filter.matches(r))
        .take(FLOW_TABLE_ROWS)
        .collect();
    let verdicts = ["", "allowed", "dropped", "rate-limited", "spoofed"];
    Ok(html! {
        h1 { "Service map" }
        form.filters method="get" action="/map" {
            label for="f-verdict" { "Verdict" }
            select #f-verdict name="verdict" {
                @for v in verdicts {
                    option value=(v) selected[filter.verdict == v] { (if v.is_empty() { "any" } else { v }) }
                }
            }
            label for="f-workload" { "Workload" }
            input #f-workload type="text" name="workload" value=(filter.workload) list="workload-names";
            datalist #workload-names { @for w in &workloads { option value=(w) {} } }
            label for="f-port" { "Port" }
            input #f-port type="number" name="port" min="0" max="65535" value=(filter.port);
            button type="submit" { "Filter" }
        }
        p.legend {
            span.verdict.allowed { "allowed" } " " span.verdict.dropped { "dropped" } " "
            span.verdict.rate-limited { "rate-limited" }
            " — edge labels: allowed/dropped/rate-limited flows; colour: the latest flow's verdict."
        }
        div.map { (map::svg(&g)) }
        h2 { "Edges" }
        div.scroll { table #edges {
            thead { tr { th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "Allowed" } th scope="col" { "Dropped" } th scope="col" { "Rate-limited" } th scope="col" { "Bytes" } th scope="col" { "Latest" } } }
            tbody { @for ((src, dst), e) in &g.edges {
                tr data-src=(src) data-dst=(dst) data-verdict=(map::verdict_class(&e.last_verdict)) {
                    td { (src) } td { (dst) } td.num { (e.allowed) } td.num { (e.dropped) } td.num { (e.rate_limited) } td.num { (e.bytes) }
                    td { span class=(format!("verdict {}", map::verdict_class(&e.last_verdict))) { (e.last_verdict) } }
                }
            } }
        } }
        h2 { "Flows" }
        (flow_table(table.into_iter()))
    })
}

pub async fn map_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Query(f): Query<Filter>,
) -> Response {
    match service_map(&ui, &f).await {
        Ok(body) => page(
            &a.session,
            &headers,
            "Service map",
            "/map",
            "flows workloads",
            body,
            None,
        ),
        Err(e) => unavailable(e),
    }
}

// ---------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------

fn subset(selector: Option<&Value>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        Some(Value::Object(m)) => m.iter().all(|(k, v)| {
            v.as_str()
                .is_some_and(|v| labels.get(k).map(String::as_str) == Some(v))
        }),
        _ => true,
    }
}

fn rule_ports(rule: &Value) -> String {
    let ports: Vec<String> = rule
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| n(p, "/port").to_string())
        .collect();
    if ports.is_empty() {
        "all ports".into()
    } else {
        format!("port {}", ports.join(","))
    }
}

/// Whether `src` may open connections to `dst` under `policies`, and why:
/// ingress of the policies selecting `dst`, egress of those selecting
/// `src` (a Policy with `ingress`/`egress` present denies what no rule
/// allows).
pub fn may_reach(
    policies: &[Value],
    src: &BTreeMap<String, String>,
    dst: &BTreeMap<String, String>,
) -> (bool, String) {
    let mut why = Vec::new();
    let mut ok = true;
    for (dir, me, peer, peers) in [("ingress", dst, src, "from"), ("egress", src, dst, "to")] {
        let selecting: Vec<&Value> = policies
            .iter()
            .filter(|p| {
                subset(p.pointer("/spec/selector"), me)
                    && p.pointer(&format!("/spec/{dir}")).is_some()
            })
            .collect();
        if selecting.is_empty() {
            continue;
        }
        let allowing: Vec<String> = selecting
            .iter()
            .flat_map(|p| {
                p.pointer(&format!("/spec/{dir}"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|r| {
                        let list = r.get(peers).and_then(Value::as_array);
                        list.is_none_or(|l| l.is_empty())
                            || list
                                .into_iter()
                                .flatten()
                                .any(|x| subset(x.get("selector"), peer))
                    })
                    .map(|r| format!("{} ({dir}, {})", s(p, "/metadata/name"), rule_ports(r)))
                    .collect::<Vec<_>>()
            })
            .collect();
        if allowing.is_empty() {
            ok = false;
            why.push(format!(
                "denied by {} ({dir}: no rule allows it)",
                selecting
                    .iter()
                    .map(|p| s(p, "/metadata/name"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else {
            why.push(format!("allowed by {}", allowing.join("; ")));
        }
    }
    if why.is_empty() {
        why.push("no Policy selects either end".into());
    }
    (ok, why.join("; "))
}

pub async fn policies_page(State(ui): State<Arc<Ui>>, a: Authed, headers: HeaderMap) -> Response {
    let mut policies = Vec::new();
    let mut workloads: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let mut total = 0usize;
    let r1 = ui
        .resources
        .scan(Kind::Policy, |o| policies.push(o.object.clone()))
        .await;
    let r2 = ui
        .resources
        .scan(Kind::Workload, |o| {
            total += 1;
            if workloads.len() < MATRIX_MAX {
                workloads.push((o.name.clone(), crate::resources::labels_of(&o.object)));
            }
        })
        .await;
    if let Err(e) = r1.and(r2) {
        return unavailable(e);
    }
    let body = html! {
        h1 { "Policies" }
        p { "Who may open connections to whom: rows are sources, columns destinations. Hover or focus a cell for the policies that decide it." }
        @if total > workloads.len() { p.note { "Showing the first " (workloads.len()) " of " (total) " workloads." } }
        div.scroll { table.matrix #policy-matrix {
            thead { tr { th scope="col" { "from \\ to" } @for (w, _) in &workloads { th scope="col" { (w) } } } }
            tbody { @for (src, sl) in &workloads {
                tr { th scope="row" { (src) }
                    @for (dst, dl) in &workloads {
                        @let (ok, why) = may_reach(&policies, sl, dl);
                        td class=(if ok { "allow" } else { "deny" }) title=(why) tabindex="0"
                            data-src=(src) data-dst=(dst) aria-label=(format!("{src} to {dst}: {why}")) {
                            (if ok { "✓" } else { "✗" })
                        }
                    }
                }
            } }
        } }
        h2 { "Policies" }
        div.scroll { table #policies {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Selects" } th scope="col" { "Ingress rules" } th scope="col" { "Egress rules" } } }
            tbody { @for p in &policies {
                tr {
                    th scope="row" { (s(p, "/metadata/name")) }
                    td { (scalars(p.pointer("/spec/selector"))) }
                    td { (p.pointer("/spec/ingress").map(|v| v.to_string()).unwrap_or_else(|| "—".into())) }
                    td { (p.pointer("/spec/egress").map(|v| v.to_string()).unwrap_or_else(|| "—".into())) }
                }
            } }
        } }
    };
    page(
        &a.session,
        &headers,
        "Policies",
        "/policies",
        "policies workloads",
        body,
        None,
    )
}

// ---------------------------------------------------------------------------
// Pipelines
// ---------------------------------------------------------------------------

pub async fn pipelines_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    let mut pipelines = Vec::new();
    let mut runs = Vec::new();
    let r1 = ui
        .resources
        .scan(Kind::Pipeline, |o| pipelines.push(o.object.clone()))
        .await;
    let r2 = ui
        .resources
        .scan(Kind::PipelineRun, |o| {
            runs.push((
                s(&o.object, "/metadata/creationTimestamp").to_string(),
                o.name.clone(),
                s(&o.object, "/spec/pipeline").to_string(),
                s(&o.object, "/status/phase").to_string(),
                s(&o.object, "/status/startTime").to_string(),
                s(&o.object, "/status/completionTime").to_string(),
            ))
        })
        .await;
    if let Err(e) = r1.and(r2) {
        return unavailable(e);
    }
    runs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let total = runs.len();
    let shown: Vec<_> = runs.iter().skip(p.offset()).take(p.limit()).collect();
    let edit = a.session.may_edit();
    let body = html! {
        h1 { "Pipelines" }
        div.scroll { table #pipelines {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Steps" } th scope="col" { "Schedule" } @if edit { th scope="col" { "Run" } } } }
            tbody { @for pl in &pipelines {
                @let name = s(pl, "/metadata/name");
                tr data-pipeline=(name) {
                    th scope="row" { (name) }
                    td { @for st in pl.pointer("/spec/steps").and_then(Value::as_array).into_iter().flatten() { code { (s(st, "/name")) } " " } }
                    td { (s(pl, "/spec/schedule")) }
                    @if edit { td {
                        form.run method="post" action=(format!("/pipelines/{name}/run")) {
                            input type="hidden" name="csrf" value=(a.session.csrf);
                            label for=(format!("params-{name}")) { "Parameters (NAME=VALUE, one a line)" }
                            textarea id=(format!("params-{name}")) name="params" rows="2" cols="28" {}
                            button type="submit" data-trigger=(name) { "Run " (name) }
                        }
                    } }
                }
            } }
        } }
        @if !edit { p.note { "Running and cancelling pipelines needs role edit." } }
        h2 { "Runs" }
        div.scroll { table #runs {
            thead { tr { th scope="col" { "Run" } th scope="col" { "Pipeline" } th scope="col" { "Phase" } th scope="col" { "Started" } th scope="col" { "Completed" } } }
            tbody { @for (_, name, pl, phase, st, done) in shown {
                tr data-run=(name) data-phase=(phase) {
                    th scope="row" { a href=(format!("/runs/{name}")) { (name) } }
                    td { (pl) }
                    td { span class=(phase_class(if phase.is_empty() { "Pending" } else { phase })) { (if phase.is_empty() { "Pending" } else { phase }) } }
                    td { (st) } td { (done) }
                }
            } }
        } }
        (pager("/pipelines", &p, total))
    };
    page(
        &a.session,
        &headers,
        "Pipelines",
        "/pipelines",
        "pipelines pipelineruns",
        body,
        None,
    )
}

/// `<pipeline>-<5 random characters>`, at most 63 characters.
fn run_name(pipeline: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let base: String = pipeline.chars().take(57).collect();
    format!("{}-{suffix}", base.trim_end_matches('-'))
}

/// Starts a run of a Pipeline with the form's parameters (edit).
pub async fn pipeline_run(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Path(pipeline): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let form = Form::parse(&body);
    let method = "UiPipelineRun";
    if let Err(r) = check_post(
        &a.session,
        &headers,
        &form,
        Action::Write(Kind::PipelineRun),
        method,
    ) {
        return *r;
    }
    let mut parameters = BTreeMap::new();
    for line in form
        .get("params")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        match line.split_once('=') {
            Some((k, v)) => {
                parameters.insert(k.trim().to_string(), v.to_string());
            }
            None => {
                return failed(
                    StatusCode::BAD_REQUEST,
                    &format!("parameter {line:?}: expected NAME=VALUE"),
                )
            }
        }
    }
    match ui.resources.get(Kind::Pipeline, &pipeline).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return failed(
                StatusCode::NOT_FOUND,
                &format!("pipeline {pipeline} not found"),
            )
        }
        Err(e) => return unavailable(e),
    }
    let name = run_name(&pipeline);
    let doc = json!({
        "apiVersion": ironmesh_api::API_VERSION,
        "kind": "PipelineRun",
        "metadata": {"name": name, "labels": {ironmesh_api::pipeline::PIPELINE_LABEL: pipeline}},
        "spec": {"pipeline": pipeline, "parameters": parameters},
    });
    let r = apply_doc(&ui, &doc, "web UI pipeline run").await;
    audit(
        &a.session.caller(),
        method,
        &format!("PipelineRun/{name}"),
        if r.is_ok() { "ok" } else { "failed" },
    );
    match r {
        Ok(()) => see_other(&format!("/runs/{name}")),
        Err(e) => failed(StatusCode::BAD_REQUEST, &e),
    }
}

/// Cancels a run (edit).
pub async fn run_cancel(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Path(run): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let form = Form::parse(&body);
    let method = "UiPipelineCancel";
    if let Err(r) = check_post(
        &a.session,
        &headers,
        &form,
        Action::Write(Kind::PipelineRun),
        method,
    ) {
        return *r;
    }
    let v = match ui.resources.get(Kind::PipelineRun, &run).await {
        Ok(Some(v)) => v.object,
        Ok(None) => return failed(StatusCode::NOT_FOUND, &format!("run {run} not found")),
        Err(e) => return unavailable(e),
    };
    let mut spec = v.get("spec").cloned().unwrap_or_else(|| json!({}));
    spec["cancel"] = json!(true);
    let r = apply_spec(&ui, Kind::PipelineRun, &v, spec, method).await;
    audit(
        &a.session.caller(),
        method,
        &format!("PipelineRun/{run}"),
        if r.is_ok() { "ok" } else { "failed" },
    );
    match r {
        Ok(()) => see_other(&format!("/runs/{run}")),
        Err(e) => failed(StatusCode::CONFLICT, &e),
    }
}

/// The DAG of a run: steps in columns by depth, arrows for `dependsOn`,
/// each step coloured by its phase with a square per index.
pub fn dag_svg(steps: &[(String, Vec<String>)], status: &Value) -> Markup {
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    // Longest path from a root; steps are few and acyclic (validated).
    for _ in 0..steps.len() {
        for (name, deps) in steps {
            let d = deps
                .iter()
                .filter_map(|d| depth.get(d.as_str()))
                .max()
                .map_or(0, |m| m + 1);
            depth.insert(name.as_str(), d);
        }
    }
    let mut rows_in: BTreeMap<usize, usize> = BTreeMap::new();
    let mut pos: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (name, _) in steps {
        let d = depth.get(name.as_str()).copied().unwrap_or(0);
        let row = rows_in.entry(d).or_default();
        pos.insert(
            name.as_str(),
            (20.0 + d as f64 * 200.0, 20.0 + *row as f64 * 90.0),
        );
        *row += 1;
    }
    let w = 40.0 + (depth.values().max().copied().unwrap_or(0) + 1) as f64 * 200.0;
    let h = 40.0 + rows_in.values().max().copied().unwrap_or(1) as f64 * 90.0;
    let step_status = |name: &str| -> Option<&Value> {
        status
            .pointer("/steps")
            .and_then(Value::as_array)?
            .iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(name))
    };
    html! {
        svg #run-dag viewBox=(format!("0 0 {w} {h}")) role="img" aria-label="Steps of the run and their dependencies" {
            defs { marker #dag-arrow viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto" { path d="M0,0L10,5L0,10z" {} } }
            @for (name, deps) in steps {
                @for d in deps {
                    @if let (Some((x1, y1)), Some((x2, y2))) = (pos.get(d.as_str()), pos.get(name.as_str())) {
                        line.dep x1=(x1 + 150.0) y1=(y1 + 30.0) x2=(*x2) y2=(y2 + 30.0) marker-end="url(#dag-arrow)" {}
                    }
                }
            }
            @for (name, _) in steps {
                @let (x, y) = pos.get(name.as_str()).copied().unwrap_or_default();
                @let st = step_status(name);
                @let phase = st.map(|s| self::s(s, "/phase")).filter(|p| !p.is_empty()).unwrap_or("Pending");
                g class=(format!("step {}", phase_class(phase))) data-step=(name) data-phase=(phase) {
                    title { (name) ": " (phase) }
                    rect x=(x) y=(y) width="150" height="60" rx="6" {}
                    text x=(x + 8.0) y=(y + 20.0) { (name) }
                    text.small x=(x + 8.0) y=(y + 36.0) { (phase) }
                    @for (k, ix) in st.and_then(|s| s.get("indexes")).and_then(Value::as_array).into_iter().flatten().enumerate() {
                        rect class=(format!("index {}", phase_class(self::s(ix, "/phase")))) x=(x + 8.0 + (k % 12) as f64 * 11.0) y=(y + 42.0 + (k / 12) as f64 * 11.0) width="9" height="9" {
                            title { (name) "[" (n(ix, "/index")) "]: " (self::s(ix, "/phase")) }
                        }
                    }
                }
            }
        }
    }
}

pub async fn run_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Path(run): Path<String>,
) -> Response {
    let v = match ui.resources.get(Kind::PipelineRun, &run).await {
        Ok(Some(v)) => v.object,
        Ok(None) => return failed(StatusCode::NOT_FOUND, &format!("run {run} not found")),
        Err(e) => return unavailable(e),
    };
    let pipeline = s(&v, "/spec/pipeline").to_string();
    // The spec the run follows, else the Pipeline's current one.
    let spec = match v.pointer("/status/pipelineSpec") {
        Some(sp) => sp.clone(),
        None => match ui.resources.get(Kind::Pipeline, &pipeline).await {
            Ok(Some(p)) => p.object.get("spec").cloned().unwrap_or(Value::Null),
            _ => Value::Null,
        },
    };
    let steps: Vec<(String, Vec<String>)> = spec
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|st| {
            (
                s(st, "/name").to_string(),
                st.get("dependsOn")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            )
        })
        .collect();
    let status = v.get("status").cloned().unwrap_or(Value::Null);
    let phase = s(&v, "/status/phase");
    let phase = if phase.is_empty() { "Pending" } else { phase };
    let finished = matches!(phase, "Succeeded" | "Failed" | "Cancelled");
    let body = html! {
        h1 { "Run " (run) }
        p { "Pipeline " strong { (pipeline) } ": " span #run-phase class=(phase_class(phase)) data-phase=(phase) { (phase) }
            @if !s(&v, "/status/message").is_empty() { " — " (s(&v, "/status/message")) } }
        @if a.session.may_edit() && !finished {
            (action_button(&a.session, &format!("/runs/{run}/cancel"), "Cancel run", &format!("/runs/{run}"), "danger"))
        }
        div.dag { (dag_svg(&steps, &status)) }
        h2 { "Steps" }
        div.scroll { table #steps {
            thead { tr { th scope="col" { "Step" } th scope="col" { "Phase" } th scope="col" { "Index" } th scope="col" { "Attempt" } th scope="col" { "Node" } th scope="col" { "Exit" } th scope="col" { "Logs" } } }
            tbody { @for st in status.pointer("/steps").and_then(Value::as_array).into_iter().flatten() {
                @for ix in st.get("indexes").and_then(Value::as_array).into_iter().flatten() {
                    tr {
                        th scope="row" { (s(st, "/name")) }
                        td { span class=(phase_class(s(ix, "/phase"))) { (s(ix, "/phase")) } }
                        td.num { (n(ix, "/index")) } td.num { (n(ix, "/attempt")) }
                        td { (s(ix, "/node")) }
                        td { (ix.get("exitCode").map(|c| c.to_string()).unwrap_or_default()) }
                        td { @if !s(ix, "/instance").is_empty() {
                            a href=(format!("/runs/{run}/logs?step={}&index={}", s(st, "/name"), n(ix, "/index"))) { "logs" }
                        } }
                    }
                }
            } }
        } }
    };
    page(
        &a.session,
        &headers,
        &format!("Run {run}"),
        "/pipelines",
        "pipelineruns instances",
        body,
        None,
    )
}

#[derive(serde::Deserialize)]
pub struct StepQuery {
    #[serde(default)]
    step: String,
    #[serde(default)]
    index: u64,
}

pub async fn run_logs_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Path(run): Path<String>,
    Query(q): Query<StepQuery>,
) -> Response {
    let v = match ui.resources.get(Kind::PipelineRun, &run).await {
        Ok(Some(v)) => v.object,
        Ok(None) => return failed(StatusCode::NOT_FOUND, &format!("run {run} not found")),
        Err(e) => return unavailable(e),
    };
    let instance = v
        .pointer("/status/steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|st| s(st, "/name") == q.step)
        .flat_map(|st| {
            st.get("indexes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|ix| n(ix, "/index") == q.index)
        .map(|ix| s(ix, "/instance").to_string())
        .unwrap_or_default();
    let text = if instance.is_empty() {
        "nothing has run yet for this step index".to_string()
    } else {
        log_tail(&ui, &instance, 1000).await
    };
    let body = html! {
        h1 { "Logs of " (run) " " (q.step) "[" (q.index) "]" }
        p { a href=(format!("/runs/{run}")) { "← Run " (run) } @if !instance.is_empty() { " · instance " a href=(format!("/instances/{instance}")) { (instance) } } }
        pre #step-log tabindex="0" { (text) }
    };
    page(
        &a.session,
        &headers,
        &format!("Logs of {run}"),
        "/pipelines",
        "",
        body,
        None,
    )
}

// ---------------------------------------------------------------------------
// Images, volumes, charts
// ---------------------------------------------------------------------------

pub async fn images_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    let images = match ui.images.list_images(ListImagesRequest {}).await {
        Ok(r) => r.images,
        Err(e) => return unavailable(e.message()),
    };
    let total = images.len();
    let body = html! {
        h1 { "Images" }
        div.scroll { table #images {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Digest" } th scope="col" { "Size" } th scope="col" { "Pushed" } } }
            tbody { @for i in images.iter().skip(p.offset()).take(p.limit()) {
                tr { th scope="row" { (i.name) } td { code title=(i.manifest_digest) { (i.manifest_digest.chars().take(19).collect::<String>()) } }
                     td.num { (mib(i.size)) } td { (flow_time(i.pushed_unix_ms)) } }
            } }
        } }
        (pager("/images", &p, total))
    };
    page(&a.session, &headers, "Images", "/images", "", body, None)
}

pub async fn volumes_page(
    State(ui): State<Arc<Ui>>,
    a: Authed,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    let (rows, total) = match paged(&ui, Kind::Volume, &p).await {
        Ok(x) => x,
        Err(e) => return unavailable(e),
    };
    let body = html! {
        h1 { "Volumes" }
        div.scroll { table #volumes {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Phase" } th scope="col" { "Node" } th scope="col" { "Pool" } th scope="col" { "Capacity" } th scope="col" { "Usage" } } }
            tbody { @for v in &rows {
                @let cap = quantity_bytes(if s(v, "/status/capacity").is_empty() { s(v, "/spec/size") } else { s(v, "/status/capacity") });
                @let used = n(v, "/status/usageBytes");
                tr {
                    th scope="row" { (s(v, "/metadata/name")) }
                    td { span class=(phase_class(s(v, "/status/phase"))) { (s(v, "/status/phase")) } }
                    td { (s(v, "/status/node")) } td { (s(v, "/status/pool")) }
                    td.num { (mib(cap)) }
                    td { (bar(used, cap)) " " (mib(used)) }
                }
            } }
        } }
        (pager("/volumes", &p, total))
    };
    page(
        &a.session, &headers, "Volumes", "/volumes", "volumes", body, None,
    )
}

pub async fn charts_page(State(ui): State<Arc<Ui>>, a: Authed, headers: HeaderMap) -> Response {
    let series = ui.rates.series(now_minute());
    let col = |f: fn(&map::Minute) -> u64| series.iter().map(f).collect::<Vec<_>>();
    let body = html! {
        h1 { "Flow rates, last hour" }
        p { "Flows per minute as the agents reported them to this controller (counted since it started)." }
        div.charts {
            (map::sparkline("Allowed flows", "allowed", &col(|m| m.allowed)))
            (map::sparkline("Dropped flows", "dropped", &col(|m| m.dropped)))
            (map::sparkline("Rate-limited flows", "rate-limited", &col(|m| m.rate_limited)))
            (map::sparkline("Bytes", "other", &col(|m| m.bytes)))
        }
    };
    page(
        &a.session, &headers, "Charts", "/charts", "flows", body, None,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn forms_decode() {
        let f = Form::parse(b"csrf=ab%2Fc&params=A%3D1%0D%0AB%3Dx+y&empty=");
        assert_eq!(f.get("csrf"), "ab/c");
        assert_eq!(f.get("params"), "A=1\r\nB=x y");
        assert_eq!(f.get("empty"), "");
        assert_eq!(f.get("missing"), "");
        assert_eq!(Form::parse(b"a=%zz%4").get("a"), "%zz%4");
    }

    #[test]
    fn the_matrix_follows_ingress_and_egress() {
        let l = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let (api, client, other) = (l("app", "api"), l("team", "analytics"), l("team", "x"));
        let deny = json!({"metadata": {"name": "api-readers"}, "spec": {
            "selector": {"app": "api"},
            "ingress": [{"from": [{"selector": {"team": "other"}}], "ports": [{"port": 8080}]}]}});
        assert!(may_reach(&[], &client, &api).0);
        let (ok, why) = may_reach(std::slice::from_ref(&deny), &client, &api);
        assert!(!ok, "{why}");
        assert!(why.contains("api-readers"), "{why}");
        assert!(
            may_reach(std::slice::from_ref(&deny), &api, &client).0,
            "api → client unaffected"
        );
        let allow = json!({"metadata": {"name": "a"}, "spec": {"selector": {"app": "api"},
            "ingress": [{"from": [{"selector": {"team": "analytics"}}]}]}});
        assert!(may_reach(&[deny.clone(), allow], &client, &api).0);
        let egress = json!({"metadata": {"name": "out"}, "spec": {"selector": {"team": "analytics"}, "egress": []}});
        assert!(!may_reach(&[egress], &client, &other).0);
    }

    #[test]
    fn paging_is_bounded() {
        let p = Paging {
            page: Some(0),
            limit: Some(100_000),
        };
        assert_eq!((p.page(), p.limit(), p.offset()), (1, MAX_LIMIT, 0));
        let p = Paging {
            page: Some(3),
            limit: None,
        };
        assert_eq!(p.offset(), 200);
    }

    #[test]
    fn dags_draw_every_step_with_its_phase() {
        let steps = vec![
            ("extract".to_string(), vec![]),
            ("transform".to_string(), vec!["extract".to_string()]),
            ("publish".to_string(), vec!["transform".to_string()]),
        ];
        let status = json!({"steps": [{"name": "extract", "phase": "Succeeded", "indexes": [{"index": 0, "phase": "Succeeded"}]}]});
        let svg = dag_svg(&steps, &status).into_string();
        assert!(
            svg.contains(r#"data-step="extract" data-phase="Succeeded""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"data-step="publish" data-phase="Pending""#),
            "{svg}"
        );
        assert_eq!(svg.matches("<line").count(), 2);
    }
}
