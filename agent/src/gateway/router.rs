//! A listener's route table: the HTTPRoutes attached to it compiled once
//! (regexes built, durations parsed, backends resolved to endpoints), and
//! the choice of one rule per request. A table is immutable; a route
//! change builds a new one and swaps it in ([`super::Gateways`]), so a
//! request in flight finishes on the table it started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ironmesh_api::gateway::{
    host_matches, HTTPRouteSpec, HeaderChanges, HeaderMatchType, Listener, PathMatchType, Redirect,
    RetryOn, RouteMatch,
};
use regex::Regex;

use super::jwks::JwksSource;
use super::jwt;

/// A compiled listener: what [`Table::select`] chooses from.
pub struct Table {
    pub gateway: String,
    pub listener: Listener,
    pub routes: Vec<Route>,
}

pub struct Route {
    pub name: String,
    hostnames: Vec<String>,
    pub auth: Option<Auth>,
    pub rules: Vec<Rule>,
}

/// A route's JWT check: the settings, where the keys are, and the
/// tokens whose signature already verified.
pub struct Auth {
    pub policy: jwt::Policy,
    pub keys: Arc<JwksSource>,
    pub verified: jwt::VerifiedCache,
}

pub struct Rule {
    pub index: usize,
    matches: Vec<Match>,
    pub backends: Vec<Backend>,
    total_weight: u64,
    pub timeout: Duration,
    pub retries: Option<Retries>,
    pub request_headers: HeaderChanges,
    pub response_headers: HeaderChanges,
    pub redirect: Option<Redirect>,
}

pub struct Retries {
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_503: bool,
    pub budget: RetryBudget,
}

struct Match {
    path: PathRule,
    headers: Vec<(String, HeaderRule)>,
    method: Option<String>,
}

enum PathRule {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

enum HeaderRule {
    Exact(String),
    Regex(Regex),
}

/// A Service port with its ready endpoints (from the assignment's
/// services).
pub struct Backend {
    pub service: String,
    pub port: u32,
    pub weight: u32,
    pub endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Backend {
    /// The next endpoint, round robin; `None` when none is ready.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i).copied()
    }
}

/// Retries may add at most `percent` of the rule's requests in a 10 s
/// window, and always at least 10, so a failing
/// backend is not hit with several times its load.
pub struct RetryBudget {
    percent: u64,
    window: Mutex<(Instant, u64, u64)>,
}

const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const MIN_RETRIES_PER_WINDOW: u64 = 10;

impl RetryBudget {
    pub fn new(percent: u32) -> RetryBudget {
        RetryBudget {
            percent: u64::from(percent),
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    fn roll(w: &mut (Instant, u64, u64)) {
        if w.0.elapsed() >= BUDGET_WINDOW {
            *w = (Instant::now(), 0, 0);
        }
    }

    /// Counts a first attempt.
    pub fn request(&self) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Self::roll(&mut w);
        w.1 += 1;
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Self::roll(&mut w);
        let allowed = (w.1 * self.percent / 100).max(MIN_RETRIES_PER_WINDOW);
        if w.2 < allowed {
            w.2 += 1;
            true
        } else {
            false
        }
    }
}

/// Service ports by (name, port) → endpoints.
pub type Endpoints = HashMap<(String, u32), Vec<SocketAddr>>;

/// Why a route did not compile (validation makes this rare: a route from
/// a newer controller, say).
#[derive(Debug, thiserror::Error)]
#[error("HTTPRoute {route:?} rules[{rule}]: {message}")]
pub struct CompileError {
    pub route: String,
    pub rule: usize,
    pub message: String,
}

/// One attached route as the assignment carries it.
pub struct RouteInput {
    pub name: String,
    pub spec: HTTPRouteSpec,
    pub skip_rules: Vec<u32>,
    pub auth: Option<Auth>,
}

impl Table {
    /// Compiles the routes that attach to `listener` of `gateway`, in
    /// precedence order; rules named in `skip_rules` (shadowed by an older
    /// route) are left out.
    pub fn build(
        gateway: &str,
        listener: Listener,
        inputs: Vec<RouteInput>,
        endpoints: &Endpoints,
    ) -> (Table, Vec<CompileError>) {
        let mut routes = Vec::new();
        let mut errors = Vec::new();
        for input in inputs {
            let attaches = input.spec.parent_refs.iter().any(|p| {
                p.gateway == gateway && p.listener.as_ref().is_none_or(|l| *l == listener.name)
            });
            if !attaches {
                continue;
            }
            let mut rules = Vec::new();
            for (i, r) in input.spec.rules.iter().enumerate() {
                if input.skip_rules.contains(&(i as u32)) {
                    continue;
                }
                match compile_rule(i, r, endpoints) {
                    Ok(rule) => rules.push(rule),
                    Err(message) => errors.push(CompileError {
                        route: input.name.clone(),
                        rule: i,
                        message,
                    }),
                }
            }
            routes.push(Route {
                name: input.name,
                hostnames: input.spec.hostnames,
                auth: input.auth,
                rules,
            });
        }
        (
            Table {
                gateway: gateway.to_string(),
                listener,
                routes,
            },
            errors,
        )
    }

    /// Whether the listener serves `host` at all.
    pub fn serves_host(&self, host: &str) -> bool {
        self.listener.hostnames.is_empty()
            || self
                .listener
                .hostnames
                .iter()
                .any(|p| host_matches(p, host))
    }

    /// The rule that serves a request: among every rule with a matching
    /// route host name and a matching match, the most specific (exact
    /// host over wildcard over any; exact path over the longest prefix
    /// over a regex; then a method; then more header matches); the first
    /// in precedence order on a tie.
    pub fn select<'a>(
        &'a self,
        host: &str,
        method: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<(&'a Route, &'a Rule)> {
        if !self.serves_host(host) {
            return None;
        }
        let mut best: Option<(Rank, &Route, &Rule)> = None;
        for route in &self.routes {
            let host_rank = if route.hostnames.is_empty() {
                0
            } else if route.hostnames.iter().any(|h| h == host) {
                2
            } else if route.hostnames.iter().any(|h| host_matches(h, host)) {
                1
            } else {
                continue;
            };
            for rule in &route.rules {
                let rank = if rule.matches.is_empty() {
                    Some((2, 1, 0, 0))
                } else {
                    rule.matches
                        .iter()
                        .filter_map(|m| m.rank(method, path, headers))
                        .max()
                };
                let Some((p, len, meth, hdrs)) = rank else {
                    continue;
                };
                let key = (host_rank, p, len, meth, hdrs);
                if best.as_ref().is_none_or(|(b, _, _)| key > *b) {
                    best = Some((key, route, rule));
                }
            }
        }
        best.map(|(_, route, rule)| (route, rule))
    }
}

/// (host, path kind, path length, method, headers): larger is more specific.
type Rank = (u8, u8, usize, u8, usize);

impl Match {
    /// `None` when it does not match; else how specific it is.
    fn rank(
        &self,
        method: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<(u8, usize, u8, usize)> {
        let (p, len) = match &self.path {
            PathRule::Exact(v) => (v == path).then_some((3, v.len()))?,
            PathRule::Prefix(v) => prefix_matches(v, path).then_some((2, v.len()))?,
            PathRule::Regex(r) => r.is_match(path).then_some((1, 0))?,
        };
        if let Some(m) = &self.method {
            if m != method {
                return None;
            }
        }
        for (name, rule) in &self.headers {
            let value = headers.get(name).and_then(|v| v.to_str().ok())?;
            let ok = match rule {
                HeaderRule::Exact(want) => value == want,
                HeaderRule::Regex(r) => r.is_match(value),
            };
            if !ok {
                return None;
            }
        }
        Some((p, len, u8::from(self.method.is_some()), self.headers.len()))
    }
}

/// Whole segments: `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    match path.strip_prefix(p) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Anchored, as the Gateway API means a path regex: the whole path.
fn whole(r: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{r})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| e.to_string())
}

fn compile_match(m: &RouteMatch) -> Result<Match, String> {
    let path = match &m.path {
        None => PathRule::Prefix("/".into()),
        Some(p) => match p.kind {
            PathMatchType::PathPrefix => PathRule::Prefix(p.value.clone()),
            PathMatchType::Exact => PathRule::Exact(p.value.clone()),
            PathMatchType::RegularExpression => PathRule::Regex(whole(&p.value)?),
        },
    };
    let mut headers = Vec::new();
    for h in &m.headers {
        let rule = match h.kind {
            HeaderMatchType::Exact => HeaderRule::Exact(h.value.clone()),
            HeaderMatchType::RegularExpression => HeaderRule::Regex(whole(&h.value)?),
        };
        headers.push((h.name.to_ascii_lowercase(), rule));
    }
    Ok(Match {
        path,
        headers,
        method: m.method.clone(),
    })
}

fn compile_rule(
    index: usize,
    r: &ironmesh_api::gateway::RouteRule,
    endpoints: &Endpoints,
) -> Result<Rule, String> {
    let matches = r
        .matches
        .iter()
        .map(compile_match)
        .collect::<Result<Vec<_>, _>>()?;
    let backends: Vec<Backend> = r
        .backends
        .iter()
        .map(|b| Backend {
            service: b.service.clone(),
            port: b.port,
            weight: b.weight,
            endpoints: endpoints
                .get(&(b.service.clone(), b.port))
                .cloned()
                .unwrap_or_default(),
            next: AtomicUsize::new(0),
        })
        .collect();
    Ok(Rule {
        index,
        matches,
        total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
        backends,
        timeout: ironmesh_api::gateway::duration(&r.timeout)?,
        retries: r.retries.as_ref().map(|rt| Retries {
            attempts: rt.attempts,
            on_connect_failure: rt.on.contains(&RetryOn::ConnectFailure),
            on_503: rt.on.contains(&RetryOn::Unavailable),
            budget: RetryBudget::new(rt.budget_percent),
        }),
        request_headers: r.request_headers.clone(),
        response_headers: r.response_headers.clone(),
        redirect: r.redirect.clone(),
    })
}

impl Rule {
    /// A backend by weight, given a uniformly random `roll`.
    pub fn pick(&self, roll: u64) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut at = roll % self.total_weight;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if at < w {
                return Some(b);
            }
            at -= w;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listener(hostnames: &[&str]) -> Listener {
        serde_json::from_value(json!({"name": "web", "port": 8080, "hostnames": hostnames}))
            .unwrap()
    }

    fn input(name: &str, spec: serde_json::Value) -> RouteInput {
        let v = ironmesh_api::validate(
            &json!({"apiVersion": "ironmesh.dev/v1", "kind": "HTTPRoute",
            "metadata": {"name": name}, "spec": spec}),
        )
        .unwrap();
        RouteInput {
            name: name.into(),
            spec: v.spec().unwrap(),
            skip_rules: Vec::new(),
            auth: None,
        }
    }

    fn to(service: &str) -> serde_json::Value {
        json!([{"service": service, "port": 80}])
    }

    fn pick(
        t: &Table,
        host: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        t.select(host, method, path, &h).map(|(route, rule)| {
            format!(
                "{}/{}",
                route.name,
                rule.backends
                    .first()
                    .map_or("redirect", |b| b.service.as_str())
            )
        })
    }

    #[test]
    fn the_most_specific_match_wins() {
        let routes = vec![
            input(
                "catch-all",
                json!({"parentRefs": [{"gateway": "edge"}], "rules": [{"backends": to("default")}]}),
            ),
            input(
                "orders",
                json!({"parentRefs": [{"gateway": "edge"}], "hostnames": ["api.example.com"], "rules": [
                    {"matches": [{"path": {"value": "/orders"}}], "backends": to("orders")},
                    {"matches": [{"path": {"type": "Exact", "value": "/orders/special"}}], "backends": to("special")},
                    {"matches": [{"path": {"value": "/orders"}, "method": "POST"}], "backends": to("writer")},
                    {"matches": [{"path": {"value": "/orders"}, "headers": [{"name": "x-canary", "value": "yes"}]}], "backends": to("canary")},
                    {"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+/items"}}], "backends": to("items")},
                ]}),
            ),
            input(
                "wild",
                json!({"parentRefs": [{"gateway": "edge"}], "hostnames": ["*.example.com"], "rules": [
                {"matches": [{"path": {"value": "/orders/deep/er"}}], "backends": to("wild")}]}),
            ),
            input(
                "elsewhere",
                json!({"parentRefs": [{"gateway": "other"}], "rules": [{"backends": to("nope")}]}),
            ),
        ];
        let (t, errs) = Table::build("edge", listener(&[]), routes, &Endpoints::new());
        assert!(errs.is_empty());
        assert_eq!(t.routes.len(), 3, "routes of other gateways are left out");
        let h = "api.example.com";
        assert_eq!(
            pick(&t, h, "GET", "/orders", &[]).as_deref(),
            Some("orders/orders")
        );
        assert_eq!(
            pick(&t, h, "GET", "/orders/1", &[]).as_deref(),
            Some("orders/orders")
        );
        assert_eq!(
            pick(&t, h, "GET", "/ordersx", &[]).as_deref(),
            Some("catch-all/default")
        );
        assert_eq!(
            pick(&t, h, "GET", "/orders/special", &[]).as_deref(),
            Some("orders/special")
        );
        assert_eq!(
            pick(&t, h, "POST", "/orders", &[]).as_deref(),
            Some("orders/writer")
        );
        assert_eq!(
            pick(&t, h, "GET", "/orders", &[("x-canary", "yes")]).as_deref(),
            Some("orders/canary")
        );
        assert_eq!(
            pick(&t, h, "GET", "/orders", &[("x-canary", "no")]).as_deref(),
            Some("orders/orders")
        );
        assert_eq!(
            pick(&t, h, "GET", "/v2/items", &[]).as_deref(),
            Some("orders/items")
        );
        // Anchored: a regex matches the whole path only.
        assert_eq!(
            pick(&t, h, "GET", "/x/v2/items", &[]).as_deref(),
            Some("catch-all/default")
        );
        // An exact host beats a wildcard even with a longer path.
        assert_eq!(
            pick(&t, h, "GET", "/orders/deep/er", &[]).as_deref(),
            Some("orders/orders")
        );
        assert_eq!(
            pick(&t, "shop.example.com", "GET", "/orders/deep/er/x", &[]).as_deref(),
            Some("wild/wild")
        );
        assert_eq!(
            pick(&t, "other.test", "GET", "/orders", &[]).as_deref(),
            Some("catch-all/default")
        );
    }

    #[test]
    fn listener_hosts_listener_names_and_shadowed_rules() {
        let mut shadowed = input(
            "b",
            json!({"parentRefs": [{"gateway": "edge", "listener": "web"}], "rules": [
            {"matches": [{"path": {"value": "/a"}}], "backends": to("b-a")},
            {"matches": [{"path": {"value": "/b"}}], "backends": to("b-b")}]}),
        );
        shadowed.skip_rules = vec![0];
        let routes = vec![
            shadowed,
            input(
                "tls-only",
                json!({"parentRefs": [{"gateway": "edge", "listener": "tls"}], "rules": [{"backends": to("t")}]}),
            ),
        ];
        let (t, _) = Table::build(
            "edge",
            listener(&["*.example.com"]),
            routes,
            &Endpoints::new(),
        );
        assert_eq!(t.routes.len(), 1);
        assert_eq!(pick(&t, "a.example.com", "GET", "/a", &[]), None);
        assert_eq!(
            pick(&t, "a.example.com", "GET", "/b", &[]).as_deref(),
            Some("b/b-b")
        );
        assert_eq!(pick(&t, "example.org", "GET", "/b", &[]), None);
    }

    #[test]
    fn weights_split_as_configured() {
        let (t, _) = Table::build(
            "edge",
            listener(&[]),
            vec![input(
                "canary",
                json!({"parentRefs": [{"gateway": "edge"}], "rules": [{"backends": [
                {"service": "stable", "port": 80, "weight": 90}, {"service": "next", "port": 80, "weight": 10},
                {"service": "off", "port": 80, "weight": 0}]}]}),
            )],
            &Endpoints::new(),
        );
        let rule = &t.routes[0].rules[0];
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for roll in 0..1000u64 {
            *counts.entry(&rule.pick(roll).unwrap().service).or_default() += 1;
        }
        assert_eq!(counts.get("stable"), Some(&900));
        assert_eq!(counts.get("next"), Some(&100));
        assert_eq!(counts.get("off"), None);
        // And with random rolls, within a few percent.
        let mut next = 0;
        for _ in 0..10_000 {
            if rule.pick(rand::random()).unwrap().service == "next" {
                next += 1;
            }
        }
        assert!((800..1200).contains(&next), "{next}");
    }

    #[test]
    fn endpoints_rotate_and_the_budget_runs_out() {
        let mut eps = Endpoints::new();
        let a: SocketAddr = "10.1.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.1.0.2:80".parse().unwrap();
        eps.insert(("web".into(), 80), vec![a, b]);
        let (t, _) = Table::build(
            "edge",
            listener(&[]),
            vec![input(
                "r",
                json!({"parentRefs": [{"gateway": "edge"}], "rules": [{"backends": to("web"), "retries": {"attempts": 2, "budgetPercent": 50}}]}),
            )],
            &eps,
        );
        let rule = &t.routes[0].rules[0];
        let be = rule.pick(0).unwrap();
        assert_eq!(
            [be.endpoint(), be.endpoint(), be.endpoint()],
            [Some(a), Some(b), Some(a)]
        );
        let budget = &rule.retries.as_ref().unwrap().budget;
        for _ in 0..100 {
            budget.request();
        }
        let granted = (0..200).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 50);
    }
}
