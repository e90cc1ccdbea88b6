//! Gateway and HTTPRoute: the way into the mesh from outside, in the
//! Kubernetes Gateway API habit. A Gateway places HTTP(S) listeners on the
//! nodes its selector matches; HTTPRoutes attach to a Gateway's listeners
//! and send matching requests to Services, optionally behind JWT
//! authentication. The agents on the selected nodes serve them
//! (docs/gateway.md).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::meta::Condition;
use crate::validate::{checks, Errors, Spec};

/// Most listeners one Gateway may have.
pub const MAX_LISTENERS: usize = 16;
/// Most rules one HTTPRoute may have.
pub const MAX_RULES: usize = 64;
/// Longest route regular expression, in bytes (compiled on every agent).
pub const MAX_REGEX_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// Nodes that serve the listeners: those whose labels include all of
    /// these. Empty selects every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// At least one; names and ports unique.
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// A DNS label, unique in the Gateway; routes name it.
    pub name: String,
    /// Bound on the node's address.
    pub port: u32,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Host names served; empty serves any. `*.example.com` matches one
    /// label or more in front of `example.com`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// HTTPS only: where the certificate comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ListenerProtocol {
    #[default]
    HTTP,
    HTTPS,
}

impl std::fmt::Display for ListenerProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListenerProtocol::HTTP => "HTTP",
            ListenerProtocol::HTTPS => "HTTPS",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTls {
    /// `ClusterCA` (default): the controller issues a certificate for the
    /// listener's hostnames from the cluster CA. `Secret`: the operator's
    /// own certificate and key, from the TLS Secret `secretName`.
    #[serde(default)]
    pub issuer: TlsIssuer,
    /// With `issuer: Secret`: the name of a Secret of type TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsIssuer {
    #[default]
    ClusterCA,
    Secret,
}

impl Spec for GatewaySpec {
    fn normalize(&mut self) {
        for l in &mut self.listeners {
            if l.protocol == ListenerProtocol::HTTPS && l.tls.is_none() {
                l.tls = Some(ListenerTls {
                    issuer: TlsIssuer::ClusterCA,
                    secret_name: None,
                });
            }
            for h in &mut l.hostnames {
                *h = h.to_ascii_lowercase();
            }
        }
    }

    fn check(&self, errs: &mut Errors) {
        crate::meta::check_labels(errs, "spec.nodeSelector", &self.node_selector);
        if self.listeners.is_empty() {
            errs.add(
                "spec.listeners",
                "must list at least one listener, e.g. [{name: web, port: 8080}]",
            );
        }
        if self.listeners.len() > MAX_LISTENERS {
            errs.add(
                "spec.listeners",
                format!(
                    "must list at most {MAX_LISTENERS} listeners, got {}",
                    self.listeners.len()
                ),
            );
        }
        let (mut names, mut ports) = (BTreeSet::new(), BTreeSet::new());
        for (i, l) in self.listeners.iter().enumerate() {
            let p = format!("spec.listeners[{i}]");
            checks::dns_label(errs, &format!("{p}.name"), &l.name);
            if !names.insert(&l.name) {
                errs.add(format!("{p}.name"), format!("{:?} is used twice", l.name));
            }
            checks::port(errs, &format!("{p}.port"), l.port);
            if !ports.insert(l.port) {
                errs.add(
                    format!("{p}.port"),
                    format!(
                        "{} is used by another listener; one port serves one listener",
                        l.port
                    ),
                );
            }
            for (j, h) in l.hostnames.iter().enumerate() {
                hostname(errs, &format!("{p}.hostnames[{j}]"), h);
            }
            if l.protocol == ListenerProtocol::HTTP && l.tls.is_some() {
                errs.add(format!("{p}.tls"), "is only for protocol HTTPS");
            }
            if let Some(tls) = &l.tls {
                match (tls.issuer, &tls.secret_name) {
                    (TlsIssuer::Secret, None) => errs.add(
                        format!("{p}.tls.secretName"),
                        "is required with issuer Secret (the name of a TLS Secret)",
                    ),
                    (TlsIssuer::Secret, Some(n)) => {
                        if let Some(problem) = crate::meta::dns_label_problem(n) {
                            errs.add(format!("{p}.tls.secretName"), problem);
                        }
                    }
                    (TlsIssuer::ClusterCA, Some(_)) => errs.add(
                        format!("{p}.tls.secretName"),
                        "is only for issuer Secret; the cluster CA issues its own",
                    ),
                    (TlsIssuer::ClusterCA, None) => {}
                }
            }
            if l.protocol == ListenerProtocol::HTTPS && l.hostnames.is_empty() {
                errs.add(
                    format!("{p}.hostnames"),
                    "must list the names the certificate is issued for (HTTPS)",
                );
            }
        }
    }
}

/// What the controller reports about a Gateway.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Nodes serving it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Routes attached, by listener.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attached_routes: BTreeMap<String, u32>,
    /// What keeps a listener from serving, e.g. a missing TLS Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// A host name pattern: a DNS name, or `*.` and a DNS name.
fn hostname(errs: &mut Errors, path: &str, h: &str) {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    if bare.len() > 253 || bare.is_empty() {
        errs.add(
            path,
            format!("must be a host name of 1 to 253 characters, got {h:?}"),
        );
        return;
    }
    for label in bare.split('.') {
        if crate::meta::dns_label_problem(&label.to_ascii_lowercase()).is_some() {
            errs.add(
                path,
                format!("must be a host name like api.example.com or *.example.com, got {h:?}"),
            );
            return;
        }
    }
}

/// Whether host `host` (no port, lowercase) matches `pattern`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|h| h.strip_suffix('.'))
            .is_some_and(|h| !h.is_empty()),
        None => pattern == host,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPRouteSpec {
    /// The Gateway listeners it attaches to; at least one.
    pub parent_refs: Vec<ParentRef>,
    /// Host names it answers for (matched against the request's Host);
    /// empty: every host name of the listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Authentication for every rule of the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtAuth>,
    /// At least one; the first rule that matches serves a request.
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// The Gateway's name.
    pub gateway: String,
    /// One listener of it; every listener when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// Any one of them matches; none listed matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Services with weights; required unless `redirect` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// Whole request, humantime (`10s`, `1m`); default 30s.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "HeaderChanges::is_empty")]
    pub request_headers: HeaderChanges,
    #[serde(default, skip_serializing_if = "HeaderChanges::is_empty")]
    pub response_headers: HeaderChanges,
    /// Answer with a redirect instead of proxying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
}

fn default_timeout() -> String {
    "30s".into()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// All must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// e.g. `GET`; any method when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    /// Starts with `/`; for `RegularExpression`, a regex matched against
    /// the whole path.
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathMatchType {
    /// Whole path segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    #[default]
    PathPrefix,
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Case-insensitive.
    pub name: String,
    pub value: String,
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchType,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HeaderMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// A Service's name.
    pub service: String,
    /// A port of the Service.
    pub port: u32,
    /// Share of requests relative to the rule's other backends; default 1,
    /// 0 sends none.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Further tries after the first; 1 to 5.
    pub attempts: u32,
    /// When to try again; default both.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Retries may add at most this percentage of the route's requests
    /// (measured over the last 10 seconds); default 20, at least 1 retry a
    /// second is always allowed.
    #[serde(default = "default_budget")]
    pub budget_percent: u32,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::Unavailable]
}

fn default_budget() -> u32 {
    20
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// The backend could not be connected to (nothing was sent).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The backend answered 503.
    #[serde(rename = "503")]
    Unavailable,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderChanges {
    /// Replace (or add) these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderChanges {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`; the request's when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Replaces the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 301, 302, 307 or 308; default 302.
    #[serde(default = "default_redirect_code")]
    pub status_code: u16,
}

fn default_redirect_code() -> u16 {
    302
}

/// JWT bearer authentication (Envoy's `jwt_authn` as the reference).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtAuth {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// The token's `aud` must hold one of them; at least one.
    pub audiences: Vec<String>,
    pub jwks: Jwks,
    /// Accepted `alg` values; default all of RS256, ES256, EdDSA. `none` is
    /// never accepted.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Leeway for `exp` and `nbf`, humantime; default `60s`, at most `5m`.
    #[serde(default = "default_skew")]
    pub clock_skew: String,
    /// Where the token is; default the `Authorization: Bearer` header.
    #[serde(default)]
    pub token_from: TokenSource,
    /// Claims copied into request headers for the backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims_to_headers: Vec<ClaimToHeader>,
    /// All must hold, or the request is refused with 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<ClaimRule>,
}

fn default_algorithms() -> Vec<JwtAlgorithm> {
    vec![
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ]
}

fn default_skew() -> String {
    "60s".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    RS256,
    ES256,
    EdDSA,
}

impl JwtAlgorithm {
    pub fn as_str(&self) -> &'static str {
        match self {
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }
}

/// Exactly one of `url`, `inline` and `discovery`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Jwks {
    /// `https://…`, fetched by the gateway nodes in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// OpenID Connect discovery: the key set is at the `jwks_uri` of
    /// `<issuer>/.well-known/openid-configuration` (the issuer must be an
    /// `https://` URL and the document's `issuer` must equal it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discovery: bool,
    /// The JWK Set as JSON text (`{"keys": [...]}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// PEM certificates that the JWKS server's certificate must chain to;
    /// the node's system roots when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// How often the set is fetched again, humantime; default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSource {
    /// A header holding the token as is (`Authorization` is read as
    /// `Bearer <token>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A cookie holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// Top-level claim name, e.g. `sub`.
    pub claim: String,
    pub header: String,
}

/// `claim` must satisfy exactly one of `equals` and `contains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimRule {
    pub claim: String,
    /// The claim is this string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// The claim is a list holding this string, or a space-separated string
    /// holding it as one word (as OAuth2 `scope` is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
}

/// Parses a humantime duration.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("must be a duration like 10s or 1m: {e}"))
}

fn header_name(errs: &mut Errors, path: &str, n: &str) {
    let ok = !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        errs.add(path, format!("must be an HTTP header name, got {n:?}"));
    }
}

fn header_value(errs: &mut Errors, path: &str, v: &str) {
    if v.len() > 4096 || v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
        errs.add(
            path,
            "must be a header value of at most 4096 characters without control characters",
        );
    }
}

fn regex(errs: &mut Errors, path: &str, r: &str) {
    if r.len() > MAX_REGEX_BYTES {
        errs.add(
            path,
            format!("must be at most {MAX_REGEX_BYTES} bytes, got {}", r.len()),
        );
        return;
    }
    if let Err(e) = regex::RegexBuilder::new(r).size_limit(1 << 20).build() {
        errs.add(path, format!("is not a valid regular expression: {e}"));
    }
}

/// Names of hop-by-hop and framing headers a route may not change.
const RESERVED_HEADERS: [&str; 8] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "host",
];

fn header_changes(errs: &mut Errors, path: &str, h: &HeaderChanges) {
    for (k, v) in h.set.iter().chain(&h.add) {
        let which = if h.set.contains_key(k) { "set" } else { "add" };
        let p = format!("{path}.{which}[{k:?}]");
        header_name(errs, &p, k);
        header_value(errs, &p, v);
        if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            errs.add(&p, format!("{k:?} is managed by the gateway"));
        }
    }
    for (i, k) in h.remove.iter().enumerate() {
        header_name(errs, &format!("{path}.remove[{i}]"), k);
    }
}

impl Spec for HTTPRouteSpec {
    fn normalize(&mut self) {
        for h in &mut self.hostnames {
            *h = h.to_ascii_lowercase();
        }
        for r in &mut self.rules {
            for m in &mut r.matches {
                if let Some(meth) = &mut m.method {
                    *meth = meth.to_ascii_uppercase();
                }
                for h in &mut m.headers {
                    h.name = h.name.to_ascii_lowercase();
                }
            }
        }
        if let Some(j) = &mut self.jwt {
            j.algorithms.sort();
            j.algorithms.dedup();
        }
    }

    fn check(&self, errs: &mut Errors) {
        if self.parent_refs.is_empty() {
            errs.add(
                "spec.parentRefs",
                "must name at least one Gateway, e.g. [{gateway: edge}]",
            );
        }
        for (i, p) in self.parent_refs.iter().enumerate() {
            checks::dns_label(errs, &format!("spec.parentRefs[{i}].gateway"), &p.gateway);
            if let Some(l) = &p.listener {
                checks::dns_label(errs, &format!("spec.parentRefs[{i}].listener"), l);
            }
        }
        for (i, h) in self.hostnames.iter().enumerate() {
            hostname(errs, &format!("spec.hostnames[{i}]"), h);
        }
        if self.rules.is_empty() {
            errs.add(
                "spec.rules",
                "must list at least one rule, e.g. [{backends: [{service: web, port: 80}]}]",
            );
        }
        if self.rules.len() > MAX_RULES {
            errs.add(
                "spec.rules",
                format!(
                    "must list at most {MAX_RULES} rules, got {}",
                    self.rules.len()
                ),
            );
        }
        for (i, r) in self.rules.iter().enumerate() {
            check_rule(errs, &format!("spec.rules[{i}]"), r);
        }
        if let Some(j) = &self.jwt {
            check_jwt(errs, "spec.jwt", j);
        }
    }
}

fn check_rule(errs: &mut Errors, p: &str, r: &RouteRule) {
    for (j, m) in r.matches.iter().enumerate() {
        let mp = format!("{p}.matches[{j}]");
        if let Some(path) = &m.path {
            match path.kind {
                PathMatchType::RegularExpression => {
                    regex(errs, &format!("{mp}.path.value"), &path.value)
                }
                _ => {
                    if !path.value.starts_with('/') {
                        errs.add(
                            format!("{mp}.path.value"),
                            format!("must start with '/', got {:?}", path.value),
                        );
                    }
                    if path.value.contains(['?', '#']) {
                        errs.add(
                            format!("{mp}.path.value"),
                            "must be a path without query or fragment",
                        );
                    }
                }
            }
        }
        for (k, h) in m.headers.iter().enumerate() {
            header_name(errs, &format!("{mp}.headers[{k}].name"), &h.name);
            match h.kind {
                HeaderMatchType::Exact => {
                    header_value(errs, &format!("{mp}.headers[{k}].value"), &h.value)
                }
                HeaderMatchType::RegularExpression => {
                    regex(errs, &format!("{mp}.headers[{k}].value"), &h.value)
                }
            }
        }
        if let Some(meth) = &m.method {
            if !matches!(
                meth.as_str(),
                "GET"
                    | "HEAD"
                    | "POST"
                    | "PUT"
                    | "DELETE"
                    | "PATCH"
                    | "OPTIONS"
                    | "CONNECT"
                    | "TRACE"
            ) {
                errs.add(
                    format!("{mp}.method"),
                    format!("must be one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE, got {meth:?}"),
                );
            }
        }
    }
    match (&r.redirect, r.backends.is_empty()) {
        (None, true) => errs.add(
            format!("{p}.backends"),
            "must list at least one backend, e.g. [{service: web, port: 80}], or set redirect",
        ),
        (Some(_), false) => errs.add(
            format!("{p}.redirect"),
            "a rule either redirects or has backends, not both",
        ),
        _ => {}
    }
    let mut seen = BTreeSet::new();
    for (j, b) in r.backends.iter().enumerate() {
        let bp = format!("{p}.backends[{j}]");
        checks::dns_label(errs, &format!("{bp}.service"), &b.service);
        checks::port(errs, &format!("{bp}.port"), b.port);
        if b.weight > 1_000_000 {
            errs.add(
                format!("{bp}.weight"),
                format!("must be between 0 and 1000000, got {}", b.weight),
            );
        }
        if !seen.insert((&b.service, b.port)) {
            errs.add(&bp, format!("{}:{} is listed twice", b.service, b.port));
        }
    }
    if !r.backends.is_empty() && r.backends.iter().all(|b| b.weight == 0) {
        errs.add(
            format!("{p}.backends"),
            "at least one backend must have a weight above 0",
        );
    }
    match duration(&r.timeout) {
        Err(e) => errs.add(format!("{p}.timeout"), e),
        Ok(d) if d < Duration::from_millis(1) || d > Duration::from_secs(3600) => errs.add(
            format!("{p}.timeout"),
            format!("must be between 1ms and 1h, got {:?}", r.timeout),
        ),
        Ok(_) => {}
    }
    if let Some(rt) = &r.retries {
        if !(1..=5).contains(&rt.attempts) {
            errs.add(
                format!("{p}.retries.attempts"),
                format!("must be between 1 and 5, got {}", rt.attempts),
            );
        }
        if rt.on.is_empty() {
            errs.add(
                format!("{p}.retries.on"),
                "must list connect-failure, 503 or both",
            );
        }
        if !(1..=100).contains(&rt.budget_percent) {
            errs.add(
                format!("{p}.retries.budgetPercent"),
                format!("must be between 1 and 100, got {}", rt.budget_percent),
            );
        }
    }
    header_changes(errs, &format!("{p}.requestHeaders"), &r.request_headers);
    header_changes(errs, &format!("{p}.responseHeaders"), &r.response_headers);
    if let Some(rd) = &r.redirect {
        if let Some(s) = &rd.scheme {
            if s != "http" && s != "https" {
                errs.add(
                    format!("{p}.redirect.scheme"),
                    format!("must be http or https, got {s:?}"),
                );
            }
        }
        if let Some(h) = &rd.hostname {
            hostname(errs, &format!("{p}.redirect.hostname"), h);
            if h.starts_with("*.") {
                errs.add(format!("{p}.redirect.hostname"), "must not be a wildcard");
            }
        }
        if let Some(port) = rd.port {
            checks::port(errs, &format!("{p}.redirect.port"), port);
        }
        if let Some(path) = &rd.path {
            if !path.starts_with('/') {
                errs.add(
                    format!("{p}.redirect.path"),
                    format!("must start with '/', got {path:?}"),
                );
            }
        }
        if ![301, 302, 307, 308].contains(&rd.status_code) {
            errs.add(
                format!("{p}.redirect.statusCode"),
                format!("must be one of 301, 302, 307, 308, got {}", rd.status_code),
            );
        }
    }
}

fn check_jwt(errs: &mut Errors, p: &str, j: &JwtAuth) {
    if j.issuer.is_empty() {
        errs.add(format!("{p}.issuer"), "must not be empty");
    }
    if j.audiences.is_empty() || j.audiences.iter().any(String::is_empty) {
        errs.add(
            format!("{p}.audiences"),
            "must list at least one non-empty audience",
        );
    }
    match (&j.jwks.url, &j.jwks.inline) {
        _ if j.jwks.discovery && (j.jwks.url.is_some() || j.jwks.inline.is_some()) => errs.add(
            format!("{p}.jwks"),
            "must set exactly one of url, inline and discovery",
        ),
        (None, None) if j.jwks.discovery => {
            if !j.issuer.starts_with("https://") || j.issuer.len() <= "https://".len() {
                errs.add(
                    format!("{p}.issuer"),
                    format!(
                        "must be an https:// URL for jwks.discovery (the discovery document is at <issuer>/.well-known/openid-configuration), got {:?}",
                        j.issuer
                    ),
                );
            }
        }
        (None, None) | (Some(_), Some(_)) => errs.add(
            format!("{p}.jwks"),
            "must set exactly one of url, inline and discovery",
        ),
        (Some(u), None) => {
            if !u.starts_with("https://") || u.len() <= "https://".len() {
                errs.add(
                    format!("{p}.jwks.url"),
                    format!("must be an https:// URL, got {u:?}"),
                );
            }
        }
        (None, Some(text)) => {
            let keys = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len));
            match keys {
                Some(n) if n > 0 => {}
                _ => errs.add(
                    format!("{p}.jwks.inline"),
                    "must be a JWK Set in JSON with at least one key: {\"keys\": [...]}",
                ),
            }
        }
    }
    if j.jwks.inline.is_some() && (j.jwks.ca_cert.is_some() || j.jwks.refresh_interval.is_some()) {
        errs.add(
            format!("{p}.jwks"),
            "caCert and refreshInterval are only for url and discovery",
        );
    }
    if let Some(ca) = &j.jwks.ca_cert {
        if !ca.contains("-----BEGIN CERTIFICATE-----") {
            errs.add(
                format!("{p}.jwks.caCert"),
                "must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
            );
        }
    }
    if let Some(r) = &j.jwks.refresh_interval {
        match duration(r) {
            Err(e) => errs.add(format!("{p}.jwks.refreshInterval"), e),
            Ok(d) if d < Duration::from_secs(10) => errs.add(
                format!("{p}.jwks.refreshInterval"),
                format!("must be at least 10s, got {r:?}"),
            ),
            Ok(_) => {}
        }
    }
    if j.algorithms.is_empty() {
        errs.add(
            format!("{p}.algorithms"),
            "must list at least one of RS256, ES256, EdDSA",
        );
    }
    match duration(&j.clock_skew) {
        Err(e) => errs.add(format!("{p}.clockSkew"), e),
        Ok(d) if d > Duration::from_secs(300) => errs.add(
            format!("{p}.clockSkew"),
            format!("must be at most 5m, got {:?}", j.clock_skew),
        ),
        Ok(_) => {}
    }
    match (&j.token_from.header, &j.token_from.cookie) {
        (Some(_), Some(_)) => errs.add(
            format!("{p}.tokenFrom"),
            "set at most one of header and cookie",
        ),
        (Some(h), None) => header_name(errs, &format!("{p}.tokenFrom.header"), h),
        (None, Some(c)) => {
            if c.is_empty()
                || c.bytes()
                    .any(|b| !b.is_ascii_graphic() || b"()<>@,;:\\\"/[]?={}".contains(&b))
            {
                errs.add(
                    format!("{p}.tokenFrom.cookie"),
                    format!("must be a cookie name, got {c:?}"),
                );
            }
        }
        (None, None) => {}
    }
    for (i, c) in j.claims_to_headers.iter().enumerate() {
        if c.claim.is_empty() {
            errs.add(
                format!("{p}.claimsToHeaders[{i}].claim"),
                "must not be empty",
            );
        }
        header_name(errs, &format!("{p}.claimsToHeaders[{i}].header"), &c.header);
    }
    for (i, r) in j.rules.iter().enumerate() {
        if r.claim.is_empty() {
            errs.add(format!("{p}.rules[{i}].claim"), "must not be empty");
        }
        if r.equals.is_some() == r.contains.is_some() {
            errs.add(
                format!("{p}.rules[{i}]"),
                "must set exactly one of equals and contains, e.g. {claim: scope, contains: orders:read}",
            );
        }
    }
}

/// What the controller reports about an HTTPRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteStatus {
    /// `Accepted`: attached to every listener named, with no rule shadowed
    /// by an older route (reason `Conflict` names it otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One route's rule that another, older route already serves: same
/// listener, host name and match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The route that loses the rule.
    pub route: String,
    pub rule: usize,
    /// The route that keeps it.
    pub with: String,
    pub gateway: String,
    pub hostname: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rules[{}] matches the same requests on Gateway {:?} host {:?} as HTTPRoute {:?}, which was there first",
            self.rule, self.gateway, self.hostname, self.with
        )
    }
}

/// Routes in precedence order (oldest first, then by name). A rule whose
/// (gateway, listener, hostname, match) an earlier route already has is a
/// [`Conflict`]: the earlier route keeps serving it.
pub fn conflicts(routes: &[(&str, &HTTPRouteSpec)]) -> Vec<Conflict> {
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for (name, spec) in routes {
        let hosts: Vec<&str> = if spec.hostnames.is_empty() {
            vec!["*"]
        } else {
            spec.hostnames.iter().map(String::as_str).collect()
        };
        let mut mine = BTreeMap::new();
        for (i, rule) in spec.rules.iter().enumerate() {
            let matches: Vec<String> = if rule.matches.is_empty() {
                vec![match_key(&RouteMatch::default())]
            } else {
                rule.matches.iter().map(match_key).collect()
            };
            let mut lost: Option<(String, String, String)> = None;
            for p in &spec.parent_refs {
                let listener = p.listener.as_deref().unwrap_or("*");
                for h in &hosts {
                    for m in &matches {
                        let key = format!("{}/{listener}/{h}/{m}", p.gateway);
                        match owner.get(&key) {
                            Some(o) if o != name => {
                                lost.get_or_insert((o.clone(), p.gateway.clone(), h.to_string()));
                            }
                            _ => {
                                mine.insert(key, name.to_string());
                            }
                        }
                    }
                }
            }
            if let Some((with, gateway, hostname)) = lost {
                out.push(Conflict {
                    route: name.to_string(),
                    rule: i,
                    with,
                    gateway,
                    hostname,
                });
            }
        }
        owner.extend(mine);
    }
    out
}

fn match_key(m: &RouteMatch) -> String {
    let mut headers: Vec<String> = m
        .headers
        .iter()
        .map(|h| format!("{}:{:?}:{}", h.name, h.kind, h.value))
        .collect();
    headers.sort();
    let path = m
        .path
        .as_ref()
        .map(|p| format!("{:?}:{}", p.kind, p.value))
        .unwrap_or_else(|| "PathPrefix:/".into());
    format!(
        "{path}|{}|{}",
        m.method.as_deref().unwrap_or("*"),
        headers.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn doc(kind: &str, spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": kind, "metadata": {"name": "edge"}, "spec": spec})
    }

    #[track_caller]
    fn rejects(kind: &str, spec: Value, path: &str, fragment: &str) {
        let e = validate(&doc(kind, spec)).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    fn route(rule: Value) -> Value {
        json!({"parentRefs": [{"gateway": "edge"}], "rules": [rule]})
    }

    fn jwt_route(jwt: Value) -> Value {
        json!({"parentRefs": [{"gateway": "edge"}], "jwt": jwt, "rules": [{"backends": [{"service": "web", "port": 80}]}]})
    }

    const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    #[test]
    fn gateway_defaults_and_listeners() {
        let v = validate(&doc(
            "Gateway",
            json!({"nodeSelector": {"role": "edge"}, "listeners": [
                {"name": "web", "port": 8080},
                {"name": "tls", "port": 8443, "protocol": "HTTPS", "hostnames": ["API.example.com"]},
            ]}),
        ))
        .unwrap();
        assert_eq!(
            v.object["spec"]["listeners"],
            json!([
                {"name": "web", "port": 8080, "protocol": "HTTP"},
                {"name": "tls", "port": 8443, "protocol": "HTTPS", "hostnames": ["api.example.com"], "tls": {"issuer": "ClusterCA"}},
            ])
        );
        assert_eq!(validate(&v.object).unwrap(), v);
        rejects(
            "Gateway",
            json!({"listeners": []}),
            "spec.listeners",
            "at least one listener",
        );
        rejects(
            "Gateway",
            json!({"listeners": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
            "spec.listeners[1].port",
            "used by another listener",
        );
        rejects(
            "Gateway",
            json!({"listeners": [{"name": "a", "port": 80, "protocol": "TCP"}]}),
            "spec.listeners[0].protocol",
            "must be one of HTTP, HTTPS",
        );
        rejects(
            "Gateway",
            json!({"listeners": [{"name": "a", "port": 443, "protocol": "HTTPS"}]}),
            "spec.listeners[0].hostnames",
            "certificate",
        );
        rejects(
            "Gateway",
            json!({"listeners": [{"name": "a", "port": 80, "hostnames": ["bad host"]}]}),
            "spec.listeners[0].hostnames[0]",
            "host name",
        );
        rejects(
            "Gateway",
            json!({"listeners": [{"name": "a", "port": 80, "tls": {}}]}),
            "spec.listeners[0].tls",
            "only for protocol HTTPS",
        );
    }

    #[test]
    fn wildcard_hosts_match_one_label_or_more() {
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(host_matches("api.example.com", "api.example.com"));
        assert!(!host_matches("api.example.com", "x.api.example.com"));
    }

    #[test]
    fn route_defaults() {
        let v = validate(&doc(
            "HTTPRoute",
            json!({"parentRefs": [{"gateway": "edge"}], "hostnames": ["Api.Example.com"], "rules": [
                {"matches": [{"path": {"value": "/orders"}, "method": "get", "headers": [{"name": "X-Env", "value": "prod"}]}],
                 "backends": [{"service": "orders", "port": 80}],
                 "retries": {"attempts": 2}},
            ]}),
        ))
        .unwrap();
        assert_eq!(
            v.object["spec"],
            json!({"parentRefs": [{"gateway": "edge"}], "hostnames": ["api.example.com"], "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/orders"}, "method": "GET", "headers": [{"name": "x-env", "value": "prod", "type": "Exact"}]}],
                 "backends": [{"service": "orders", "port": 80, "weight": 1}],
                 "timeout": "30s",
                 "retries": {"attempts": 2, "on": ["connect-failure", "503"], "budgetPercent": 20}},
            ]})
        );
        assert_eq!(validate(&v.object).unwrap(), v);
    }

    #[test]
    fn route_rules_are_checked_with_their_paths() {
        rejects(
            "HTTPRoute",
            json!({"parentRefs": [], "rules": [{"backends": [{"service": "a", "port": 80}]}]}),
            "spec.parentRefs",
            "at least one Gateway",
        );
        rejects(
            "HTTPRoute",
            route(json!({})),
            "spec.rules[0].backends",
            "at least one backend",
        );
        rejects(
            "HTTPRoute",
            route(
                json!({"matches": [{"path": {"value": "orders"}}], "backends": [{"service": "a", "port": 80}]}),
            ),
            "spec.rules[0].matches[0].path.value",
            "must start with '/'",
        );
        rejects(
            "HTTPRoute",
            route(
                json!({"matches": [{"path": {"type": "RegularExpression", "value": "/(a"}}], "backends": [{"service": "a", "port": 80}]}),
            ),
            "spec.rules[0].matches[0].path.value",
            "not a valid regular expression",
        );
        rejects(
            "HTTPRoute",
            route(
                json!({"matches": [{"path": {"type": "Glob", "value": "/a"}}], "backends": [{"service": "a", "port": 80}]}),
            ),
            "spec.rules[0].matches[0].path.type",
            "must be one of PathPrefix, Exact, RegularExpression",
        );
        rejects(
            "HTTPRoute",
            route(
                json!({"matches": [{"method": "FETCH"}], "backends": [{"service": "a", "port": 80}]}),
            ),
            "spec.rules[0].matches[0].method",
            "must be one of GET",
        );
        rejects(
            "HTTPRoute",
            route(json!({"backends": [{"service": "a", "port": 80, "weight": 0}]})),
            "spec.rules[0].backends",
            "weight above 0",
        );
        rejects(
            "HTTPRoute",
            route(json!({"backends": [{"service": "a", "port": 80}], "timeout": "soon"})),
            "spec.rules[0].timeout",
            "must be a duration",
        );
        rejects(
            "HTTPRoute",
            route(json!({"backends": [{"service": "a", "port": 80}], "retries": {"attempts": 9}})),
            "spec.rules[0].retries.attempts",
            "between 1 and 5",
        );
        rejects(
            "HTTPRoute",
            route(
                json!({"backends": [{"service": "a", "port": 80}], "retries": {"attempts": 1, "on": ["500"]}}),
            ),
            "spec.rules[0].retries.on[0]",
            "must be one of connect-failure, 503",
        );
        rejects(
            "HTTPRoute",
            route(
                json!({"backends": [{"service": "a", "port": 80}], "requestHeaders": {"set": {"Host": "x"}}}),
            ),
            "spec.rules[0].requestHeaders.set[\"Host\"]",
            "managed by the gateway",
        );
        rejects(
            "HTTPRoute",
            route(
                json!({"backends": [{"service": "a", "port": 80}], "redirect": {"scheme": "https"}}),
            ),
            "spec.rules[0].redirect",
            "not both",
        );
        rejects(
            "HTTPRoute",
            route(json!({"redirect": {"statusCode": 200}})),
            "spec.rules[0].redirect.statusCode",
            "301, 302, 307, 308",
        );
    }

    #[test]
    fn jwt_settings() {
        let v = validate(&doc(
            "HTTPRoute",
            jwt_route(json!({"issuer": "https://issuer", "audiences": ["orders"], "jwks": {"inline": JWKS}})),
        ))
        .unwrap();
        assert_eq!(
            v.object["spec"]["jwt"]["algorithms"],
            json!(["RS256", "ES256", "EdDSA"])
        );
        assert_eq!(v.object["spec"]["jwt"]["clockSkew"], "60s");
        rejects(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "i", "audiences": ["a"], "jwks": {"inline": JWKS}, "algorithms": ["none"]}),
            ),
            "spec.jwt.algorithms[0]",
            "must be one of RS256, ES256, EdDSA, got \"none\"",
        );
        rejects(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "i", "audiences": ["a"], "jwks": {"inline": JWKS}, "algorithms": ["HS256"]}),
            ),
            "spec.jwt.algorithms[0]",
            "must be one of RS256, ES256, EdDSA",
        );
        rejects(
            "HTTPRoute",
            jwt_route(json!({"issuer": "i", "audiences": [], "jwks": {"inline": JWKS}})),
            "spec.jwt.audiences",
            "at least one",
        );
        rejects(
            "HTTPRoute",
            jwt_route(json!({"issuer": "i", "audiences": ["a"], "jwks": {}})),
            "spec.jwt.jwks",
            "exactly one of url, inline and discovery",
        );
        rejects(
            "HTTPRoute",
            jwt_route(json!({"issuer": "i", "audiences": ["a"], "jwks": {"discovery": true}})),
            "spec.jwt.issuer",
            "https:// URL for jwks.discovery",
        );
        rejects(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "https://i", "audiences": ["a"], "jwks": {"discovery": true, "inline": JWKS}}),
            ),
            "spec.jwt.jwks",
            "exactly one of url, inline and discovery",
        );
        validate(&doc(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "https://login.example.com", "audiences": ["a"],
                "jwks": {"discovery": true, "refreshInterval": "1m"}}),
            ),
        ))
        .expect("discovery with an https issuer is valid");
        rejects(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "i", "audiences": ["a"], "jwks": {"url": "http://issuer/jwks"}}),
            ),
            "spec.jwt.jwks.url",
            "https://",
        );
        rejects(
            "HTTPRoute",
            jwt_route(json!({"issuer": "i", "audiences": ["a"], "jwks": {"inline": "{}"}})),
            "spec.jwt.jwks.inline",
            "JWK Set",
        );
        rejects(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "i", "audiences": ["a"], "jwks": {"inline": JWKS}, "clockSkew": "1h"}),
            ),
            "spec.jwt.clockSkew",
            "at most 5m",
        );
        rejects(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "i", "audiences": ["a"], "jwks": {"inline": JWKS}, "tokenFrom": {"header": "x", "cookie": "y"}}),
            ),
            "spec.jwt.tokenFrom",
            "at most one",
        );
        rejects(
            "HTTPRoute",
            jwt_route(
                json!({"issuer": "i", "audiences": ["a"], "jwks": {"inline": JWKS}, "rules": [{"claim": "scope"}]}),
            ),
            "spec.jwt.rules[0]",
            "exactly one of equals and contains",
        );
    }

    fn spec(v: Value) -> HTTPRouteSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_older_route_keeps_a_contested_match() {
        let a = spec(
            json!({"parentRefs": [{"gateway": "edge"}], "hostnames": ["api.example.com"], "rules": [
            {"matches": [{"path": {"value": "/orders"}}], "backends": [{"service": "a", "port": 80}]}]}),
        );
        let b = spec(
            json!({"parentRefs": [{"gateway": "edge"}], "hostnames": ["api.example.com"], "rules": [
            {"matches": [{"path": {"value": "/other"}}], "backends": [{"service": "b", "port": 80}]},
            {"matches": [{"path": {"value": "/orders"}}], "backends": [{"service": "b", "port": 80}]}]}),
        );
        let c = spec(
            json!({"parentRefs": [{"gateway": "edge"}], "hostnames": ["other.example.com"], "rules": [
            {"matches": [{"path": {"value": "/orders"}}], "backends": [{"service": "c", "port": 80}]}]}),
        );
        let found = conflicts(&[("a", &a), ("b", &b), ("c", &c)]);
        assert_eq!(
            found,
            vec![Conflict {
                route: "b".into(),
                rule: 1,
                with: "a".into(),
                gateway: "edge".into(),
                hostname: "api.example.com".into(),
            }]
        );
        assert!(found[0].to_string().contains("HTTPRoute \"a\""));
    }
}
