//! The client side of the controller's OCI registry (`--registry-listen`)
//! that `imctl image push` uses: HTTP/1.1 over mutual TLS with the
//! operator's certificate from the imctl config, so the registry knows the
//! operator (and its role) with no token.
//!
//! Only what a push needs: blob `HEAD`, monolithic and chunked uploads, and
//! manifest `PUT`. Requests go one after another on one connection, which
//! is opened again if the registry closed it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ironmesh_api::client_config::ClientConfig;
use ironmesh_oci::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::image::Progress;

/// The registry port imctl assumes when only the controller's address is
/// known (the port the docs and examples give `--registry-listen`).
pub const DEFAULT_PORT: u16 = 5000;
/// Blobs up to this size go in one request (`POST ?digest=`); larger ones
/// in chunks of this size (`PATCH`, then `PUT ?digest=`).
pub const CHUNK: u64 = 32 << 20;
/// One read from a blob file into the request body.
const READ: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, std::io::Error>;

/// Where the registry is: `--registry` (or `IMCTL_REGISTRY`), else the
/// config's `registry`, else the host of the config's `server` with
/// [`DEFAULT_PORT`].
pub fn registry_address(flag: Option<&str>, cfg: &ClientConfig) -> anyhow::Result<String> {
    let addr = match flag.or(cfg.registry.as_deref()) {
        Some(a) => a.to_string(),
        None => {
            let host = server_host(&cfg.server)
                .with_context(|| format!("server {:?} has no host", cfg.server))?;
            format!("{host}:{DEFAULT_PORT}")
        }
    };
    if addr.is_empty() || addr.contains('/') || addr.chars().any(char::is_whitespace) {
        bail!("registry {addr:?} must be host:port, e.g. 10.0.0.1:5000 (no scheme or path)");
    }
    Ok(addr)
}

/// The host of `https://host:port/…` (IPv6 keeps its brackets).
fn server_host(server: &str) -> Option<&str> {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = if authority.starts_with('[') {
        &authority[..=authority.find(']')?]
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    Some(host).filter(|h| !h.is_empty())
}

/// One registry connection, as the config's operator.
pub struct RegistryClient {
    addr: String,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    sender: Option<SendRequest<Body>>,
}

impl RegistryClient {
    /// Connects to `addr` (`host:port`), trusting the cluster CA and
    /// presenting the operator's certificate.
    pub async fn connect(cfg: &ClientConfig, addr: &str) -> anyhow::Result<RegistryClient> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(cfg.certificate_authority_data.as_bytes()) {
            roots
                .add(c.context("the config's certificateAuthorityData is not PEM")?)
                .context("the config's cluster CA")?;
        }
        let certs = CertificateDer::pem_slice_iter(cfg.client_certificate_data.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("the config's clientCertificateData is not PEM")?;
        let key = PrivateKeyDer::from_pem_slice(cfg.client_key_data.as_bytes())
            .context("the config's clientKeyData is not a PEM key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS settings")?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .context("the config's client certificate and key")?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let host = match &cfg.tls_server_name {
            Some(n) => n.clone(),
            None => server_host(addr)
                .unwrap_or(addr)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        };
        let server_name = ServerName::try_from(host.clone())
            .with_context(|| format!("{host:?} is not a host name or address"))?;
        let mut client = RegistryClient {
            addr: addr.to_string(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            server_name,
            sender: None,
        };
        client.reconnect().await?;
        Ok(client)
    }

    async fn reconnect(&mut self) -> anyhow::Result<()> {
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot reach the registry at {}: {e}; the controller serves it only when \
                 started with --registry-listen (give its address with --registry, \
                 IMCTL_REGISTRY or `registry:` in the imctl config)",
                self.addr
            )
        };
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(unreachable(&e)),
                Err(_) => return Err(unreachable(&"connection timed out")),
            };
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| anyhow::anyhow!("TLS with the registry at {} failed: {e}", self.addr))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .with_context(|| format!("HTTP with the registry at {}", self.addr))?;
        // Its errors surface in the request that was using it.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Body,
    ) -> anyhow::Result<Response<hyper::body::Incoming>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.reconnect().await?;
        }
        let Some(sender) = self.sender.as_mut() else {
            bail!("no connection to the registry at {}", self.addr);
        };
        sender
            .ready()
            .await
            .with_context(|| format!("the registry at {} closed the connection", self.addr))?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, &self.addr);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(body).context("building a registry request")?;
        sender
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path} on the registry at {}", self.addr))
    }

    /// Whether the registry holds the blob.
    pub async fn blob_exists(&mut self, repository: &str, digest: &Digest) -> anyhow::Result<bool> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        let resp = self.send(Method::HEAD, &path, &[], empty()).await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(refusal("HEAD", &path, resp).await),
        }
    }

    /// Uploads one blob file: after `POST` opens the upload, in one `PUT`
    /// up to [`CHUNK`], else in `PATCH`es of that size and an empty `PUT`.
    pub async fn upload_blob(
        &mut self,
        repository: &str,
        digest: &Digest,
        file: &std::path::Path,
        size: u64,
        progress: &Arc<Mutex<Progress>>,
    ) -> anyhow::Result<()> {
        // The session first, with no body: a refusal (role, name) comes
        // before any bytes are in flight, which the registry would not read.
        let start = format!("/v2/{repository}/blobs/uploads/");
        let resp = self.send(Method::POST, &start, &[], empty()).await?;
        let mut location = match resp.status() {
            StatusCode::ACCEPTED => location(&resp)?,
            _ => return Err(refusal("POST", &start, resp).await),
        };
        let with_digest = |location: &str| {
            let sep = if location.contains('?') { '&' } else { '?' };
            format!("{location}{sep}digest={digest}")
        };
        if size <= CHUNK {
            let path = with_digest(&location);
            let body = file_body(file, 0, size, progress.clone()).await?;
            let resp = self.send(Method::PUT, &path, &octets(size), body).await?;
            return expect(resp, StatusCode::CREATED, "PUT", &path).await;
        }
        let mut offset = 0;
        while offset < size {
            let len = CHUNK.min(size - offset);
            let body = file_body(file, offset, len, progress.clone()).await?;
            let mut headers = octets(len);
            headers.push(("content-range", format!("{offset}-{}", offset + len - 1)));
            let resp = self.send(Method::PATCH, &location, &headers, body).await?;
            location = match resp.status() {
                StatusCode::ACCEPTED => location_or(&resp, location),
                _ => return Err(refusal("PATCH", &location, resp).await),
            };
            offset += len;
        }
        let path = with_digest(&location);
        let resp = self.send(Method::PUT, &path, &octets(0), empty()).await?;
        expect(resp, StatusCode::CREATED, "PUT", &path).await
    }

    /// Stores a manifest or index under `reference` (a tag, or its digest).
    pub async fn put_manifest(
        &mut self,
        repository: &str,
        reference: &str,
        media_type: &str,
        data: Vec<u8>,
    ) -> anyhow::Result<()> {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let headers = [
            ("content-type", media_type.to_string()),
            ("content-length", data.len().to_string()),
        ];
        let body = Full::new(Bytes::from(data))
            .map_err(|never| match never {})
            .boxed();
        let resp = self.send(Method::PUT, &path, &headers, body).await?;
        expect(resp, StatusCode::CREATED, "PUT", &path).await
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn octets(len: u64) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/octet-stream".to_string()),
        ("content-length", len.to_string()),
    ]
}

/// `len` bytes of `path` from `offset`, read as the request is sent. A read
/// error aborts the request, so the registry never stores a short blob.
async fn file_body(
    path: &std::path::Path,
    offset: u64,
    len: u64,
    progress: Arc<Mutex<Progress>>,
) -> anyhow::Result<Body> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let stream = futures::stream::unfold((file, len), move |(mut file, left)| {
        let progress = progress.clone();
        async move {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0u8; READ.min(left as usize)];
            match file.read(&mut buf).await {
                Ok(0) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the blob file is shorter than its descriptor",
                    )),
                    (file, 0),
                )),
                Ok(n) => {
                    buf.truncate(n);
                    if let Ok(mut p) = progress.lock() {
                        p.advance(n as u64);
                    }
                    Some((Ok(Frame::data(Bytes::from(buf))), (file, left - n as u64)))
                }
                Err(e) => Some((Err(e), (file, 0))),
            }
        }
    });
    Ok(BodyExt::boxed(StreamBody::new(stream)))
}

fn location(resp: &Response<hyper::body::Incoming>) -> anyhow::Result<String> {
    resp.headers()
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(relative)
        .context("the registry started an upload without a Location")
}

fn location_or(resp: &Response<hyper::body::Incoming>, old: String) -> String {
    location(resp).unwrap_or(old)
}

/// A Location as a path: registries may answer with an absolute URL.
fn relative(loc: &str) -> String {
    match loc.split_once("://") {
        Some((_, rest)) => match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => "/".to_string(),
        },
        None => loc.to_string(),
    }
}

async fn expect(
    resp: Response<hyper::body::Incoming>,
    want: StatusCode,
    method: &str,
    path: &str,
) -> anyhow::Result<()> {
    if resp.status() == want {
        // Drain the body so the connection can carry the next request.
        let _ = resp.into_body().collect().await;
        return Ok(());
    }
    Err(refusal(method, path, resp).await)
}

/// The registry's answer as an error: the spec's code and message if the
/// body has them.
async fn refusal(method: &str, path: &str, resp: Response<hyper::body::Incoming>) -> anyhow::Error {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    anyhow::anyhow!(
        "registry refused {method} {path}: {}",
        describe(status, &body)
    )
}

fn describe(status: StatusCode, body: &[u8]) -> String {
    let errors: Vec<String> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("errors").and_then(|e| e.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.get("code").and_then(|c| c.as_str()).unwrap_or("?"),
                e.get("message").and_then(|m| m.as_str()).unwrap_or("")
            )
        })
        .collect();
    if errors.is_empty() {
        format!("{status}")
    } else {
        format!("{status}: {}", errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_registry_address_comes_from_the_flag_the_config_or_the_server() {
        let mut cfg = ClientConfig::new(
            "https://10.0.0.1:7443".into(),
            String::new(),
            "admin".into(),
            String::new(),
            String::new(),
        );
        assert_eq!(registry_address(None, &cfg).unwrap(), "10.0.0.1:5000");
        cfg.server = "https://[fd00::1]:7443".into();
        assert_eq!(registry_address(None, &cfg).unwrap(), "[fd00::1]:5000");
        cfg.registry = Some("10.0.0.2:5001".into());
        assert_eq!(registry_address(None, &cfg).unwrap(), "10.0.0.2:5001");
        assert_eq!(registry_address(Some("h:1"), &cfg).unwrap(), "h:1");
        assert!(registry_address(Some("https://h:1"), &cfg).is_err());
        assert_eq!(
            relative("https://h:1/v2/a/blobs/uploads/x"),
            "/v2/a/blobs/uploads/x"
        );
        assert_eq!(relative("/v2/a"), "/v2/a");
        let body = br#"{"errors":[{"code":"DENIED","message":"operator vera has role view"}]}"#;
        assert_eq!(
            describe(StatusCode::FORBIDDEN, body),
            "403 Forbidden: DENIED: operator vera has role view"
        );
    }
}
