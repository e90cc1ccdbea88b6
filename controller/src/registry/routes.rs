//! The OCI Distribution Spec v1.1 endpoints: which path and method is
//! which operation, who may do it, and the headers each answer carries.
//!
//! Repository names contain slashes, so `/v2/<name>/…` is matched here
//! from the end of the path (`…/blobs/uploads/<id>`, `…/blobs/<digest>`,
//! `…/manifests/<ref>`, `…/tags/list`, `…/referrers/<digest>`) rather than
//! by the router.

use std::io::SeekFrom;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::errors::{Code, RegistryError};
use super::uploads::check_digest;
use super::{Peer, Registry};
use crate::authz::{audit, Action, Caller};
use crate::images::manifests::{check_repository, parse_reference, MAX_MANIFEST_BYTES};

const DIGEST_HEADER: &str = "docker-content-digest";
const UPLOAD_UUID: &str = "docker-upload-uuid";
const API_VERSION: &str = "docker-distribution-api-version";
/// Size of one read when streaming a blob out.
const READ_CHUNK: usize = 256 << 10;
/// Default and largest page of tags or repositories.
const PAGE_MAX: usize = 10_000;

/// What a `/v2/<rest>` path names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Catalog,
    Tags(String),
    UploadStart(String),
    Upload(String, String),
    Blob(String, String),
    Manifest(String, String),
    Referrers(String, String),
}

fn target(rest: &str) -> Option<Target> {
    if rest == "_catalog" {
        return Some(Target::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let repo = |k: usize| (n > k).then(|| segs[..n - k].join("/"));
    match segs.as_slice() {
        [.., "tags", "list"] => repo(2).map(Target::Tags),
        [.., "blobs", "uploads", ""] | [.., "blobs", "uploads"] if n >= 3 => {
            let k = if segs[n - 1].is_empty() { 3 } else { 2 };
            repo(k).map(Target::UploadStart)
        }
        [.., "blobs", "uploads", id] => repo(3).map(|r| Target::Upload(r, id.to_string())),
        [.., "blobs", d] => repo(2).map(|r| Target::Blob(r, d.to_string())),
        [.., "manifests", r] => repo(2).map(|repo| Target::Manifest(repo, r.to_string())),
        [.., "referrers", d] => repo(2).map(|r| Target::Referrers(r, d.to_string())),
        _ => None,
    }
}

/// One query parameter, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn with_headers(status: StatusCode, headers: &[(&str, String)], body: Body) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    for (k, v) in headers {
        if let Ok(name) = header::HeaderName::from_bytes(k.as_bytes()) {
            h.insert(name, hv(v));
        }
    }
    resp
}

/// The challenge for a request to `host` about `scope`.
fn challenge(headers: &HeaderMap, fallback_host: &str, scope: Option<String>) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains('"'))
        .unwrap_or(fallback_host);
    let mut c = format!(
        "Bearer realm=\"https://{host}{}\",service=\"{}\"",
        super::auth::TOKEN_PATH,
        super::auth::SERVICE
    );
    if let Some(s) = scope {
        c.push_str(&format!(",scope=\"{s}\""));
    }
    c
}

async fn authorize(
    reg: &Registry,
    peer: &Peer,
    headers: &HeaderMap,
    action: Action,
    what: &str,
    scope: Option<String>,
) -> Result<Caller, RegistryError> {
    let host = reg.advertised_host.clone();
    let caller = reg
        .auth
        .caller(headers, peer.cert.as_deref(), || {
            challenge(headers, &host, scope)
        })
        .await?;
    if let Err(s) = caller.may(action, what) {
        return Err(RegistryError::new(Code::Denied, s.message().to_string()));
    }
    Ok(caller)
}

/// `GET /v2/`: 200 for a caller the registry knows, else the challenge.
pub async fn base(
    State(reg): State<Arc<Registry>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    match authorize(&reg, &peer, &headers, Action::Read, "registry /v2/", None).await {
        Ok(_) => with_headers(
            StatusCode::OK,
            &[
                ("content-type", "application/json".into()),
                (API_VERSION, "registry/2.0".into()),
            ],
            Body::from("{}"),
        ),
        Err(e) => e.into_response(),
    }
}

/// `GET /token`: a bearer token for a basic credential or a certificate.
pub async fn token(
    State(reg): State<Arc<Registry>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    match reg
        .auth
        .token_response(&headers, peer.cert.as_deref())
        .await
    {
        Ok(v) => with_headers(
            StatusCode::OK,
            &[("content-type", "application/json".into())],
            Body::from(v.to_string()),
        ),
        Err(e) => e.into_response(),
    }
}

/// Everything under `/v2/<name>/…` and `/v2/_catalog`.
pub async fn dispatch(
    State(reg): State<Arc<Registry>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match handle(&reg, &peer, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.code != Code::Unauthorized {
                tracing::debug!(%method, %path, code = e.code.as_str(), error = %e.message, "registry request refused");
            }
            e.into_response()
        }
    };
    reg.metrics
        .registry_requests
        .get_or_create(&crate::metrics::HttpLabel {
            method: method.to_string(),
            status: resp.status().as_u16().to_string(),
        })
        .inc();
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, peer = %peer.addr, "registry request");
    resp
}

async fn handle(reg: &Registry, peer: &Peer, req: Request) -> Result<Response, RegistryError> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    let target = target(rest).ok_or_else(|| {
        RegistryError::new(Code::Unsupported, format!("no registry endpoint at {path}"))
            .with_status(StatusCode::NOT_FOUND)
    })?;
    let method = req.method().clone();
    let query = req.uri().query().map(str::to_string);
    let q = |name: &str| query_param(query.as_deref(), name);
    let headers = req.headers().clone();
    let repo_of = |t: &Target| match t {
        Target::Catalog => None,
        Target::Tags(r)
        | Target::UploadStart(r)
        | Target::Upload(r, _)
        | Target::Blob(r, _)
        | Target::Manifest(r, _)
        | Target::Referrers(r, _) => Some(r.clone()),
    };
    let action = match (&method, &target) {
        (&Method::GET | &Method::HEAD, _) => Action::Read,
        (&Method::DELETE, Target::Manifest(..)) => Action::DeleteImage,
        (&Method::DELETE, Target::Blob(..)) => Action::DeleteImage,
        _ => Action::PushImage,
    };
    let scope = repo_of(&target).map(|r| {
        let verb = match action {
            Action::Read => "pull",
            Action::DeleteImage => "delete",
            _ => "pull,push",
        };
        format!("repository:{r}:{verb}")
    });
    let what = format!("registry {method} {path}");
    let caller = authorize(reg, peer, &headers, action, &what, scope).await?;
    if let Some(r) = repo_of(&target) {
        check_repository(&r).map_err(RegistryError::from)?;
    }
    let mutating = !matches!(action, Action::Read);
    let result = route(reg, &method, target, &q, &headers, req.into_body()).await;
    if mutating {
        audit(
            &caller,
            &format!("registry {method}"),
            &path,
            if result.is_ok() { "ok" } else { "failed" },
        );
    }
    result
}

async fn route(
    reg: &Registry,
    method: &Method,
    target: Target,
    q: &(dyn Fn(&str) -> Option<String> + Sync),
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, RegistryError> {
    match (method, target) {
        (&Method::GET, Target::Catalog) => catalog(reg, q).await,
        (&Method::GET, Target::Tags(repo)) => tags(reg, &repo, q).await,
        (&Method::GET | &Method::HEAD, Target::Blob(repo, d)) => {
            get_blob(reg, &repo, &d, headers, method == Method::HEAD).await
        }
        (&Method::DELETE, Target::Blob(..)) => Err(RegistryError::new(
            Code::Unsupported,
            "blobs are not deleted one by one: delete manifests or tags, and garbage collection frees the blobs nothing refers to",
        )),
        (&Method::POST, Target::UploadStart(repo)) => start_upload(reg, &repo, q, body).await,
        (&Method::PATCH, Target::Upload(repo, id)) => {
            let start = content_range_start(headers)?;
            let size = match reg.uploads.append(&id, &repo, start, body).await {
                Ok(size) => size,
                Err(e) if e.code == Code::RangeInvalid => {
                    // Where the upload stands, so the client can go on.
                    let size = reg.uploads.status(&id, &repo).unwrap_or(0);
                    let mut resp = e.into_response();
                    resp.headers_mut()
                        .insert("range", hv(&format!("0-{}", size.saturating_sub(1))));
                    resp.headers_mut()
                        .insert("location", hv(&format!("/v2/{repo}/blobs/uploads/{id}")));
                    return Ok(resp);
                }
                Err(e) => return Err(e),
            };
            Ok(upload_progress(StatusCode::ACCEPTED, &repo, &id, size))
        }
        (&Method::PUT, Target::Upload(repo, id)) => {
            let digest = q("digest").ok_or_else(|| {
                RegistryError::new(Code::DigestInvalid, "PUT of an upload needs ?digest=")
            })?;
            check_digest(&digest)?;
            let (stored, size) = reg.uploads.finish(&id, &repo, &digest, body).await?;
            count_upload(reg, stored, size);
            Ok(blob_created(&repo, &digest))
        }
        (&Method::GET, Target::Upload(repo, id)) => {
            let size = reg.uploads.status(&id, &repo)?;
            Ok(upload_progress(StatusCode::NO_CONTENT, &repo, &id, size))
        }
        (&Method::DELETE, Target::Upload(repo, id)) => {
            reg.uploads.cancel(&id, &repo)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (&Method::GET | &Method::HEAD, Target::Manifest(repo, r)) => {
            let reference = parse_reference(&r)?;
            let (record, data) = reg.images.get_manifest(&repo, &reference).await?;
            let headers = [
                ("content-type", record.media_type.clone()),
                (DIGEST_HEADER, record.digest.clone()),
                ("content-length", data.len().to_string()),
            ];
            let body = if method == Method::HEAD {
                Body::empty()
            } else {
                Body::from(data)
            };
            Ok(with_headers(StatusCode::OK, &headers, body))
        }
        (&Method::PUT, Target::Manifest(repo, r)) => {
            let reference = parse_reference(&r)?;
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let data = read_limited(body, MAX_MANIFEST_BYTES).await?;
            let pushed = reg
                .images
                .put_manifest(&repo, &reference, content_type.as_deref(), &data)
                .await?;
            let mut h = vec![
                ("location", format!("/v2/{repo}/manifests/{}", pushed.digest)),
                (DIGEST_HEADER, pushed.digest.clone()),
            ];
            if let Some(s) = pushed.subject {
                h.push(("oci-subject", s));
            }
            Ok(with_headers(StatusCode::CREATED, &h, Body::empty()))
        }
        (&Method::DELETE, Target::Manifest(repo, r)) => {
            let reference = parse_reference(&r)?;
            reg.images.delete_manifest(&repo, &reference).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (&Method::GET, Target::Referrers(repo, d)) => {
            check_digest(&d)?;
            let artifact_type = q("artifactType");
            let manifests = reg
                .images
                .referrers(&repo, &d, artifact_type.as_deref())
                .await?;
            let body = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": ironmesh_oci::media::OCI_INDEX,
                "manifests": manifests,
            });
            let mut h = vec![(
                "content-type",
                ironmesh_oci::media::OCI_INDEX.to_string(),
            )];
            if artifact_type.is_some() {
                h.push(("oci-filters-applied", "artifactType".to_string()));
            }
            Ok(with_headers(StatusCode::OK, &h, Body::from(body.to_string())))
        }
        (m, t) => Err(RegistryError::new(
            Code::Unsupported,
            format!("{m} is not supported on {t:?}"),
        )),
    }
}

fn count_upload(reg: &Registry, stored: bool, size: u64) {
    reg.metrics.registry_upload_bytes.inc_by(size);
    if stored {
        reg.metrics.registry_blobs_uploaded.inc();
    }
}

fn blob_created(repo: &str, digest: &str) -> Response {
    with_headers(
        StatusCode::CREATED,
        &[
            ("location", format!("/v2/{repo}/blobs/{digest}")),
            (DIGEST_HEADER, digest.to_string()),
            ("content-length", "0".into()),
        ],
        Body::empty(),
    )
}

fn upload_progress(status: StatusCode, repo: &str, id: &str, size: u64) -> Response {
    with_headers(
        status,
        &[
            ("location", format!("/v2/{repo}/blobs/uploads/{id}")),
            ("range", format!("0-{}", size.saturating_sub(1))),
            (UPLOAD_UUID, id.to_string()),
            ("content-length", "0".into()),
        ],
        Body::empty(),
    )
}

/// `POST …/blobs/uploads/`: a mount, a monolithic upload, or a session.
async fn start_upload(
    reg: &Registry,
    repo: &str,
    q: &(dyn Fn(&str) -> Option<String> + Sync),
    body: Body,
) -> Result<Response, RegistryError> {
    if let Some(mount) = q("mount") {
        check_digest(&mount)?;
        // Blobs are shared by every repository of the store: a blob the
        // store holds is mounted wherever it came from.
        if reg.images.stat_blob(&mount).await?.is_some() {
            tracing::debug!(repository = repo, digest = %mount, from = ?q("from"), "blob mounted");
            return Ok(blob_created(repo, &mount));
        }
    }
    let id = reg.uploads.start(repo).await?;
    if let Some(digest) = q("digest") {
        check_digest(&digest)?;
        let (stored, size) = reg.uploads.finish(&id, repo, &digest, body).await?;
        count_upload(reg, stored, size);
        return Ok(blob_created(repo, &digest));
    }
    Ok(upload_progress(StatusCode::ACCEPTED, repo, &id, 0))
}

/// The first byte of a `Content-Range: <start>-<end>` header, if given.
fn content_range_start(headers: &HeaderMap) -> Result<Option<u64>, RegistryError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let start = s
        .split_once('-')
        .and_then(|(a, _)| a.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            RegistryError::new(
                Code::RangeInvalid,
                format!("Content-Range {s:?} is not <start>-<end>"),
            )
        })?;
    Ok(Some(start))
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a blob of `len`.
fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && end < len).then_some((start, end))
}

async fn get_blob(
    reg: &Registry,
    repo: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, RegistryError> {
    check_digest(digest)?;
    let Some((mut file, len)) = reg.images.open_blob(digest).await? else {
        return Err(RegistryError::new(
            Code::BlobUnknown,
            format!("blob {digest} is not in the registry (repository {repo})"),
        ));
    };
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(v) => match parse_range(v, len) {
            Some(r) => Some(r),
            None => {
                let mut resp = RegistryError::new(
                    Code::RangeInvalid,
                    format!("range {v:?} is not satisfiable for a blob of {len} bytes"),
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::CONTENT_RANGE, hv(&format!("bytes */{len}")));
                return Ok(resp);
            }
        },
    };
    let (status, start, count) = match range {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        None => (StatusCode::OK, 0, len),
    };
    let mut h = vec![
        ("content-type", "application/octet-stream".to_string()),
        (DIGEST_HEADER, digest.to_string()),
        ("content-length", count.to_string()),
        ("accept-ranges", "bytes".to_string()),
        ("etag", format!("\"{digest}\"")),
    ];
    if let Some((s, e)) = range {
        h.push(("content-range", format!("bytes {s}-{e}/{len}")));
    }
    if head {
        return Ok(with_headers(status, &h, Body::empty()));
    }
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| RegistryError::new(Code::Unavailable, e.to_string()))?;
    }
    let stream = futures::stream::unfold((file, count), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let want = left.min(READ_CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        match file.read_exact(&mut buf).await {
            Ok(_) => Some((Ok::<_, std::io::Error>(buf), (file, left - want as u64))),
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    Ok(with_headers(status, &h, Body::from_stream(stream)))
}

async fn read_limited(body: Body, limit: u64) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            RegistryError::new(
                Code::ManifestInvalid,
                format!("body could not be read: {e}"),
            )
        })?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(RegistryError::new(
                Code::SizeInvalid,
                format!("manifest larger than {limit} bytes"),
            )
            .with_status(StatusCode::PAYLOAD_TOO_LARGE));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// `n` and `last` of a listing, and the page of `items` they select.
fn page(
    items: Vec<String>,
    q: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<(Vec<String>, Option<String>), RegistryError> {
    let n = match q("n") {
        None => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            RegistryError::new(Code::Unsupported, format!("n={n:?} is not a number"))
                .with_status(StatusCode::BAD_REQUEST)
        })?),
    };
    let last = q("last");
    let after: Vec<String> = items
        .into_iter()
        .filter(|t| last.as_ref().is_none_or(|l| t > l))
        .collect();
    let n = n.unwrap_or(PAGE_MAX).min(PAGE_MAX);
    let more = after.len() > n;
    let page: Vec<String> = after.into_iter().take(n).collect();
    let next = (more && n > 0)
        .then(|| page.last().cloned())
        .flatten()
        .map(|l| format!("n={n}&last={l}"));
    Ok((page, next))
}

async fn tags(
    reg: &Registry,
    repo: &str,
    q: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Response, RegistryError> {
    let all = reg.images.list_tags(repo).await?;
    let (page, next) = page(all, q)?;
    let body = serde_json::json!({"name": repo, "tags": page});
    let mut h = vec![("content-type", "application/json".to_string())];
    if let Some(n) = next {
        h.push(("link", format!("</v2/{repo}/tags/list?{n}>; rel=\"next\"")));
    }
    Ok(with_headers(
        StatusCode::OK,
        &h,
        Body::from(body.to_string()),
    ))
}

async fn catalog(
    reg: &Registry,
    q: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Response, RegistryError> {
    let all = reg.images.repositories().await?;
    let (page, next) = page(all, q)?;
    let body = serde_json::json!({"repositories": page});
    let mut h = vec![("content-type", "application/json".to_string())];
    if let Some(n) = next {
        h.push(("link", format!("</v2/_catalog?{n}>; rel=\"next\"")));
    }
    Ok(with_headers(
        StatusCode::OK,
        &h,
        Body::from(body.to_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_matched_from_the_end() {
        use Target::*;
        let d = format!("sha256:{}", "a".repeat(64));
        for (p, t) in [
            ("_catalog", Catalog),
            ("a/b/tags/list", Tags("a/b".into())),
            ("a/blobs/uploads/", UploadStart("a".into())),
            ("a/blobs/uploads", UploadStart("a".into())),
            ("a/b/blobs/uploads/xyz", Upload("a/b".into(), "xyz".into())),
            (
                &format!("x/blobs/y/blobs/{d}"),
                Blob("x/blobs/y".into(), d.clone()),
            ),
            ("m/manifests/latest", Manifest("m".into(), "latest".into())),
            (
                &format!("m/referrers/{d}"),
                Referrers("m".into(), d.clone()),
            ),
        ] {
            assert_eq!(target(p), Some(t), "{p}");
        }
        assert_eq!(target("tags/list"), None);
        assert_eq!(target("nothing"), None);
    }

    #[test]
    fn ranges_and_queries_parse() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-2", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(
            query_param(Some("digest=sha256%3Aab&x=1"), "digest").as_deref(),
            Some("sha256:ab")
        );
        assert_eq!(query_param(Some("a=1"), "digest"), None);
    }

    #[test]
    fn pages_carry_a_next_link_until_the_end() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let q = |n: &'static str, last: Option<&'static str>| {
            move |k: &str| match k {
                "n" => Some(n.to_string()),
                "last" => last.map(str::to_string),
                _ => None,
            }
        };
        let (p, next) = page(items.clone(), &q("2", None)).unwrap();
        assert_eq!(
            (p, next.as_deref()),
            (vec!["a".to_string(), "b".into()], Some("n=2&last=b"))
        );
        let (p, next) = page(items.clone(), &q("2", Some("b"))).unwrap();
        assert_eq!((p, next), (vec!["c".to_string(), "d".into()], None));
        let (p, _) = page(items, &q("0", None)).unwrap();
        assert!(p.is_empty());
    }
}
