//! Where a route's verification keys come from: inline in the route, a
//! JWKS URL, or the `jwks_uri` that OpenID Connect discovery
//! (`<issuer>/.well-known/openid-configuration`) names, fetched over HTTPS
//! in the background, refreshed every
//! `refreshInterval` and on a token whose `kid` is not in the set (at most
//! once per [`MIN_REFRESH`], so random `kid`s cannot hammer the issuer).
//! A failed fetch keeps the last good set.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use tokio::sync::{watch, Notify};
use tokio_rustls::rustls;

use super::jwt::KeySet;

/// Least time between two fetches asked for by unknown `kid`s.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// Largest key set accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// One fetch, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Where Debian keeps the system roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("bad JWKS URL {0:?}")]
    Url(String),
    #[error("no usable CA certificate for the JWKS server: {0}")]
    Roots(String),
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} is not a usable key set: {message}")]
    Parse { url: String, message: String },
    #[error("{url} is not a usable discovery document: {message}")]
    Discovery { url: String, message: String },
}

/// Where the set is: a URL, or found through OIDC discovery.
#[derive(Debug, Clone)]
enum Locator {
    Url(Target),
    Discovery { document: Target, issuer: String },
}

impl Locator {
    fn url(&self) -> &str {
        match self {
            Locator::Url(t) => &t.url,
            Locator::Discovery { document, .. } => &document.url,
        }
    }
}

/// The discovery document of `issuer`.
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// One key set, current and shared by every route that names it.
pub struct JwksSource {
    /// Current set; `None` until the first fetch succeeded.
    set: watch::Receiver<Option<Arc<KeySet>>>,
    refresh: Arc<Notify>,
    last_asked: Mutex<Option<Instant>>,
    /// Inline sets and fetch tasks end with the source.
    _tx: Option<watch::Sender<Option<Arc<KeySet>>>>,
}

impl JwksSource {
    pub fn inline(set: KeySet) -> Arc<JwksSource> {
        let (tx, rx) = watch::channel(Some(Arc::new(set)));
        Arc::new(JwksSource {
            set: rx,
            refresh: Arc::new(Notify::new()),
            last_asked: Mutex::new(None),
            _tx: Some(tx),
        })
    }

    /// Starts fetching `url` in the background; the task ends when the
    /// source is dropped.
    pub fn remote(
        url: String,
        ca_pem: Option<String>,
        interval: Duration,
    ) -> Result<Arc<JwksSource>, JwksError> {
        Self::start(Locator::Url(Target::parse(&url)?), ca_pem, interval)
    }

    /// Like [`JwksSource::remote`], with the set's URL found through OIDC
    /// discovery from `issuer` (found again when a fetch of it fails).
    pub fn discovered(
        issuer: &str,
        ca_pem: Option<String>,
        interval: Duration,
    ) -> Result<Arc<JwksSource>, JwksError> {
        let document = Target::parse(&format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/')))?;
        let locator = Locator::Discovery {
            document,
            issuer: issuer.to_string(),
        };
        Self::start(locator, ca_pem, interval)
    }

    fn start(
        target: Locator,
        ca_pem: Option<String>,
        interval: Duration,
    ) -> Result<Arc<JwksSource>, JwksError> {
        let tls = Arc::new(client_config(ca_pem.as_deref())?);
        let (tx, rx) = watch::channel(None);
        let refresh = Arc::new(Notify::new());
        let source = Arc::new(JwksSource {
            set: rx,
            refresh: refresh.clone(),
            last_asked: Mutex::new(None),
            _tx: None,
        });
        let weak = Arc::downgrade(&source);
        tokio::spawn(fetch_loop(weak, tx, refresh, target, tls, interval));
        Ok(source)
    }

    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.set.borrow().clone()
    }

    /// Waits up to `wait` for the first set (the fetch is already under
    /// way; this asks for nothing, so it does not spend the refresh limit).
    pub async fn first(&self, wait: Duration) -> Option<Arc<KeySet>> {
        let mut rx = self.set.clone();
        let _ = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        self.current()
    }

    /// Asks for a fetch now (unless one was asked for less than
    /// [`MIN_REFRESH`] ago) and waits up to `wait` for a set other than
    /// the current one. Returns the set then current.
    pub async fn refreshed(&self, wait: Duration) -> Option<Arc<KeySet>> {
        let mut rx = self.set.clone();
        rx.borrow_and_update();
        {
            let mut last = self.last_asked.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < MIN_REFRESH) {
                return self.current();
            }
            *last = Some(Instant::now());
        }
        self.refresh.notify_one();
        let _ = tokio::time::timeout(wait, rx.changed()).await;
        self.current()
    }
}

async fn fetch_loop(
    source: Weak<JwksSource>,
    tx: watch::Sender<Option<Arc<KeySet>>>,
    refresh: Arc<Notify>,
    target: Locator,
    tls: Arc<rustls::ClientConfig>,
    interval: Duration,
) {
    let mut backoff = Duration::from_secs(1);
    // With discovery: the jwks_uri found last, until a fetch of it fails.
    let mut found: Option<Target> = None;
    loop {
        if source.strong_count() == 0 {
            return;
        }
        let wait = match locate_and_fetch(&target, &mut found, tls.clone()).await {
            Ok(set) => {
                tracing::debug!(url = %target.url(), keys = set.keys.len(), "fetched JWKS");
                tx.send_replace(Some(Arc::new(set)));
                backoff = Duration::from_secs(1);
                interval
            }
            Err(e) => {
                let kept = tx.borrow().is_some();
                tracing::warn!(url = %target.url(), error = %e, kept_last_good = kept, "JWKS fetch failed");
                backoff = (backoff * 2).min(Duration::from_secs(30));
                // Until there is a set, try again soon; after, on schedule.
                if kept {
                    interval.min(backoff * 4)
                } else {
                    backoff
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = refresh.notified() => {}
            _ = tx.closed() => return,
        }
    }
}

/// An `https://host[:port]/path` URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    url: String,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, JwksError> {
        let bad = || JwksError::Url(url.to_string());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse::<u16>().map_err(|_| bad())?),
                None if after.is_empty() => (h, 443),
                None => return Err(bad()),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
                None => (authority, 443),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        Ok(Target {
            url: url.to_string(),
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

fn client_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, JwksError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = match ca_pem {
        Some(p) => p.as_bytes().to_vec(),
        None => std::fs::read(SYSTEM_ROOTS)
            .map_err(|e| JwksError::Roots(format!("{SYSTEM_ROOTS}: {e}")))?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| JwksError::Roots(e.to_string()))?;
        // A bad certificate in the system bundle should not spoil the rest.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(JwksError::Roots("no certificate found".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JwksError::Roots(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

async fn locate_and_fetch(
    target: &Locator,
    found: &mut Option<Target>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<KeySet, JwksError> {
    let (document, issuer) = match target {
        Locator::Url(t) => return fetch(t, tls).await,
        Locator::Discovery { document, issuer } => (document, issuer),
    };
    let jwks = match found.take() {
        Some(t) => t,
        None => discover(document, issuer, tls.clone()).await?,
    };
    let set = fetch(&jwks, tls).await?;
    *found = Some(jwks);
    Ok(set)
}

/// The `jwks_uri` of the discovery document, which must name `issuer`.
async fn discover(
    document: &Target,
    issuer: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Target, JwksError> {
    let bad = |message: String| JwksError::Discovery {
        url: document.url.clone(),
        message,
    };
    let body = get(document, tls).await?;
    let doc: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let named = doc.get("issuer").and_then(serde_json::Value::as_str);
    // OpenID Connect Discovery 1.0, section 4.3: the document's issuer is
    // the one it was fetched for, or its keys are not that issuer's.
    if named.map(|n| n.trim_end_matches('/')) != Some(issuer.trim_end_matches('/')) {
        return Err(bad(format!(
            "names issuer {named:?}, not the route's {issuer:?}"
        )));
    }
    let uri = doc
        .get("jwks_uri")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| bad("has no jwks_uri".into()))?;
    Target::parse(uri).map_err(|_| bad(format!("jwks_uri {uri:?} is not an https:// URL")))
}

async fn fetch(t: &Target, tls: Arc<rustls::ClientConfig>) -> Result<KeySet, JwksError> {
    let body = get(t, tls).await?;
    KeySet::parse(&body).map_err(|message| JwksError::Parse {
        url: t.url.clone(),
        message,
    })
}

/// The body of a 200 answer to GET `t` (at most [`MAX_JWKS_BYTES`]).
async fn get(t: &Target, tls: Arc<rustls::ClientConfig>) -> Result<Bytes, JwksError> {
    let fail = |m: String| JwksError::Fetch {
        url: t.url.clone(),
        message: m,
    };
    let body = tokio::time::timeout(FETCH_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| fail(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        let host = if t.port == 443 {
            t.host.clone()
        } else {
            format!("{}:{}", t.host, t.port)
        };
        let req = http::Request::get(&t.path)
            .header(http::header::HOST, host)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if resp.status() != http::StatusCode::OK {
            return Err(JwksError::Status {
                url: t.url.clone(),
                status: resp.status().as_u16(),
            });
        }
        Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| fail(e.to_string()))
    })
    .await
    .map_err(|_| fail(format!("no answer within {FETCH_TIMEOUT:?}")))??;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("https://issuer.test:8443/keys.json").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("issuer.test", 8443, "/keys.json")
        );
        let t = Target::parse("https://10.0.0.1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("10.0.0.1", 443, "/")
        );
        assert!(Target::parse("http://issuer/keys").is_err());
        assert!(Target::parse("https://user@issuer/keys").is_err());
        assert!(Target::parse("https://issuer:x/keys").is_err());
    }
}
