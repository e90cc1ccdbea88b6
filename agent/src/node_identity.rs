//! The node's identity: its private key, its certificate and the cluster CA,
//! kept in the state directory so a restart reuses them.
//!
//! On first start the agent makes a key pair, sends a CSR with a bootstrap
//! token to the controller's `Join`, and stores the signed certificate. It
//! never sends its name as proof of anything afterwards: the certificate is
//! the proof. Before it expires the certificate is renewed with a new key
//! and CSR over the node's own mTLS channel ([`renew`]); the new pair
//! replaces the old on disk so that a crash at any point leaves one
//! matching pair ([`NodeIdentity::save_renewed`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironmesh_proto::v1::{
    node_service_client::NodeServiceClient, JoinRequest, RenewCertificateRequest,
};
use rcgen::{CertificateParams, DnType, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A node's credentials as kept on disk.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_name: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state directory {dir} holds the identity of node {stored:?}, but this agent is configured as {configured:?}; use that name or another --state-dir")]
    NameMismatch {
        dir: PathBuf,
        stored: String,
        configured: String,
    },
    #[error("this node has not joined yet and {0}")]
    MissingForJoin(&'static str),
    #[error("cannot build the key or CSR: {0}")]
    Crypto(String),
    #[error("cannot reach the controller at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the controller refused to join this node: {0}")]
    Refused(String),
    /// `ALREADY_EXISTS`: a node of this name exists (or holds a
    /// certificate). After an attempt whose answer was lost it may be this
    /// node's own earlier join; only a token bound to the name gets it again.
    #[error("the controller refused to join this node: {0}")]
    NameTaken(String),
    #[error("invalid controller URL {0:?}: {1}")]
    BadUrl(String, String),
    #[error("the certificate of node {node} expired at {at} and can no longer be renewed; delete the node (imctl delete node {node}), remove the identity in {dir} and join again with a new token (imctl token create)")]
    Expired {
        node: String,
        at: String,
        dir: PathBuf,
    },
    #[error("the node certificate is unreadable: {0}")]
    BadCertificate(String),
}

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "ca.crt";
const NAME_FILE: &str = "node-name";
/// A renewed pair being put in place (see [`NodeIdentity::save_renewed`]).
const NEW_KEY_FILE: &str = "node.key.new";
const NEW_CERT_FILE: &str = "node.crt.new";

/// Finishes (or discards) a renewal that a crash interrupted. The new
/// certificate is written before the new key and the key is renamed into
/// place before the certificate, so: both new files → rename both; only
/// the certificate → the key is already in place, rename it; only the key
/// → its certificate was never complete, drop it.
fn finish_renewal(dir: &Path) -> Result<(), IdentityError> {
    let io = |action: &'static str, path: PathBuf| {
        move |source| IdentityError::Io {
            action,
            path,
            source,
        }
    };
    let (nk, nc) = (dir.join(NEW_KEY_FILE), dir.join(NEW_CERT_FILE));
    match (nk.exists(), nc.exists()) {
        (true, true) => {
            fs::rename(&nk, dir.join(KEY_FILE)).map_err(io("rename", nk.clone()))?;
            fs::rename(&nc, dir.join(CERT_FILE)).map_err(io("rename", nc.clone()))?;
        }
        (false, true) => fs::rename(&nc, dir.join(CERT_FILE)).map_err(io("rename", nc.clone()))?,
        (true, false) => fs::remove_file(&nk).map_err(io("remove", nk.clone()))?,
        (false, false) => return Ok(()),
    }
    tracing::info!(dir = %dir.display(), "finished a certificate renewal interrupted by a restart");
    Ok(())
}

impl NodeIdentity {
    /// Loads the identity from `dir` if one is there.
    pub fn load(dir: &Path, node_name: &str) -> Result<Option<NodeIdentity>, IdentityError> {
        if dir.exists() {
            finish_renewal(dir)?;
        }
        let paths = [KEY_FILE, CERT_FILE, CA_FILE, NAME_FILE].map(|f| dir.join(f));
        if !paths.iter().all(|p| p.exists()) {
            return Ok(None);
        }
        let [key, cert, ca, name] = paths.map(|p| read(&p));
        let stored = name?.trim().to_string();
        if stored != node_name {
            return Err(IdentityError::NameMismatch {
                dir: dir.to_path_buf(),
                stored,
                configured: node_name.to_string(),
            });
        }
        Ok(Some(NodeIdentity {
            node_name: stored,
            key_pem: key?,
            cert_pem: cert?,
            ca_pem: ca?,
        }))
    }

    fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&dir.join(KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(CA_FILE), self.ca_pem.as_bytes(), 0o644)?;
        // Written last: its presence marks a complete identity.
        write_atomic(
            &dir.join(NAME_FILE),
            format!("{}\n", self.node_name).as_bytes(),
            0o644,
        )
    }

    /// Puts a renewed key and certificate in place of the current ones
    /// (see `finish_renewal` for why the order makes a crash safe).
    pub fn save_renewed(&self, dir: &Path) -> Result<(), IdentityError> {
        write_atomic(&dir.join(NEW_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(NEW_KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(CA_FILE), self.ca_pem.as_bytes(), 0o644)?;
        finish_renewal(dir)
    }

    /// When the certificate became valid and when it expires.
    pub fn validity(&self) -> Result<(SystemTime, SystemTime), IdentityError> {
        let bad = |e: String| IdentityError::BadCertificate(e);
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&pem.contents).map_err(|e| bad(e.to_string()))?;
        let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Ok((
            at(cert.validity().not_before.timestamp()),
            at(cert.validity().not_after.timestamp()),
        ))
    }

    /// When to renew: two thirds into the certificate's lifetime.
    pub fn renewal_due(&self) -> Result<SystemTime, IdentityError> {
        let (from, until) = self.validity()?;
        let life = until.duration_since(from).unwrap_or_default();
        Ok(from + life * 2 / 3)
    }

    /// An error if the certificate has expired (it cannot be renewed then).
    pub fn check_not_expired(&self, dir: &Path) -> Result<(), IdentityError> {
        let (_, until) = self.validity()?;
        if SystemTime::now() >= until {
            return Err(IdentityError::Expired {
                node: self.node_name.clone(),
                at: humantime::format_rfc3339_seconds(until).to_string(),
                dir: dir.to_path_buf(),
            });
        }
        Ok(())
    }

    /// TLS settings for calls made with this identity.
    pub fn tls(&self, server_name: Option<&str>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(n) = server_name {
            tls = tls.domain_name(n);
        }
        tls
    }
}

/// What a first join needs.
pub struct JoinParams<'a> {
    pub controller: &'a str,
    pub server_name: Option<&'a str>,
    pub ca_pem: Option<String>,
    pub bootstrap_token: Option<String>,
}

/// Returns the stored identity, or joins the cluster to get one.
pub async fn load_or_join(
    dir: &Path,
    node_name: &str,
    params: JoinParams<'_>,
) -> Result<(NodeIdentity, bool), IdentityError> {
    if let Some(id) = NodeIdentity::load(dir, node_name)? {
        id.check_not_expired(dir)?;
        return Ok((id, false));
    }
    let ca_pem = params
        .ca_pem
        .ok_or(IdentityError::MissingForJoin("no --ca-cert was given"))?;
    let token = params.bootstrap_token.ok_or(IdentityError::MissingForJoin(
        "no --bootstrap-token or --bootstrap-token-file was given",
    ))?;

    let id = join(
        params.controller,
        params.server_name,
        &ca_pem,
        &token,
        node_name,
    )
    .await?;
    id.save(dir)?;
    Ok((id, true))
}

/// Makes a key and CSR for `node_name` and exchanges them, with the
/// bootstrap `token`, for a node certificate. Nothing is written; the
/// key never leaves this process.
pub async fn join(
    controller: &str,
    server_name: Option<&str>,
    ca_pem: &str,
    token: &str,
    node_name: &str,
) -> Result<NodeIdentity, IdentityError> {
    let key = KeyPair::generate().map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("node:{node_name}"));
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;

    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(n) = server_name {
        tls = tls.domain_name(n);
    }
    let connect_err = |message: String| IdentityError::Connect {
        url: controller.into(),
        message,
    };
    let channel = endpoint(controller)?
        .tls_config(tls)
        .map_err(|e| connect_err(e.to_string()))?
        .connect()
        .await
        .map_err(|e| connect_err(error_chain(&e)))?;
    let resp = NodeServiceClient::new(channel)
        .join(JoinRequest {
            bootstrap_token: token.to_string(),
            node_name: node_name.to_string(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| match s.code() {
            // The controller went away mid-call: worth trying again.
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                connect_err(s.message().to_string())
            }
            tonic::Code::AlreadyExists => IdentityError::NameTaken(s.message().to_string()),
            _ => IdentityError::Refused(s.message().to_string()),
        })?
        .into_inner();
    Ok(NodeIdentity {
        node_name: node_name.to_string(),
        key_pem: key.serialize_pem(),
        cert_pem: resp.certificate_pem,
        ca_pem: resp.ca_certificate_pem,
    })
}

/// Makes a new key and CSR and exchanges them for a new certificate,
/// authorised by `id`'s current certificate. Nothing is written.
pub async fn renew(
    controller: &str,
    server_name: Option<&str>,
    id: &NodeIdentity,
) -> Result<NodeIdentity, IdentityError> {
    let key = KeyPair::generate().map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("node:{}", id.node_name));
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let connect_err = |message: String| IdentityError::Connect {
        url: controller.into(),
        message,
    };
    let channel = endpoint(controller)?
        .tls_config(id.tls(server_name))
        .map_err(|e| connect_err(e.to_string()))?
        .connect()
        .await
        .map_err(|e| connect_err(error_chain(&e)))?;
    let resp = NodeServiceClient::new(channel)
        .renew_certificate(RenewCertificateRequest { csr_pem: csr })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                connect_err(s.message().to_string())
            }
            _ => IdentityError::Refused(s.message().to_string()),
        })?
        .into_inner();
    Ok(NodeIdentity {
        node_name: id.node_name.clone(),
        key_pem: key.serialize_pem(),
        cert_pem: resp.certificate_pem,
        ca_pem: resp.ca_certificate_pem,
    })
}

impl IdentityError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, IdentityError::Connect { .. })
    }
}

/// A gRPC endpoint for the controller URL with the agent's timeouts.
pub fn endpoint(url: &str) -> Result<Endpoint, IdentityError> {
    if !url.starts_with("https://") {
        return Err(IdentityError::BadUrl(
            url.into(),
            "must start with https://".into(),
        ));
    }
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| IdentityError::BadUrl(url.into(), e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        // A controller that vanished without closing the connection
        // (host down, partition) is noticed within 15 s. Pings cost the
        // controller as much as heartbeats: at 2 s, 1,000 agents sent it
        // 500 a second, five times the paced heartbeats.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

pub use ironmesh_process::error_chain;

fn read(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    ironmesh_process::write_file_atomic(path, data, mode).map_err(|source| IdentityError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_identity_loads_and_checks_name() {
        let dir = tempfile::tempdir().unwrap();
        let id = NodeIdentity {
            node_name: "n1".into(),
            key_pem: "k".into(),
            cert_pem: "c".into(),
            ca_pem: "a".into(),
        };
        id.save(dir.path()).unwrap();
        let back = NodeIdentity::load(dir.path(), "n1").unwrap().unwrap();
        assert_eq!(back.cert_pem, "c");
        let err = NodeIdentity::load(dir.path(), "n2").unwrap_err();
        assert!(err.to_string().contains("node \"n1\""), "{err}");
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn an_interrupted_renewal_is_finished_or_dropped_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let id = NodeIdentity {
            node_name: "n1".into(),
            key_pem: "old-key".into(),
            cert_pem: "old-cert".into(),
            ca_pem: "ca".into(),
        };
        id.save(dir.path()).unwrap();
        let d = dir.path();
        // Crash after both new files were written.
        fs::write(d.join(NEW_CERT_FILE), "new-cert").unwrap();
        fs::write(d.join(NEW_KEY_FILE), "new-key").unwrap();
        let back = NodeIdentity::load(d, "n1").unwrap().unwrap();
        assert_eq!(
            (back.key_pem.as_str(), back.cert_pem.as_str()),
            ("new-key", "new-cert")
        );
        // Crash after the key was renamed, before the certificate.
        fs::write(d.join(NEW_CERT_FILE), "newer-cert").unwrap();
        fs::write(d.join(KEY_FILE), "newer-key").unwrap();
        let back = NodeIdentity::load(d, "n1").unwrap().unwrap();
        assert_eq!(
            (back.key_pem.as_str(), back.cert_pem.as_str()),
            ("newer-key", "newer-cert")
        );
        // Crash while the new key was being written, its certificate not.
        fs::write(d.join(NEW_KEY_FILE), "half").unwrap();
        let back = NodeIdentity::load(d, "n1").unwrap().unwrap();
        assert_eq!(
            (back.key_pem.as_str(), back.cert_pem.as_str()),
            ("newer-key", "newer-cert")
        );
        assert!(!d.join(NEW_KEY_FILE).exists() && !d.join(NEW_CERT_FILE).exists());
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let (ca, ca_key) = {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let cert = p.self_signed(&key).unwrap();
            (cert, key)
        };
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::seconds(30);
        p.not_after = now + time::Duration::seconds(60);
        let cert = p.signed_by(&key, &issuer).unwrap();
        let id = NodeIdentity {
            node_name: "n1".into(),
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            ca_pem: ca.pem(),
        };
        let due = id.renewal_due().unwrap();
        let (from, until) = id.validity().unwrap();
        assert_eq!(until.duration_since(from).unwrap(), Duration::from_secs(90));
        assert_eq!(due.duration_since(from).unwrap(), Duration::from_secs(60));
        let dir = tempfile::tempdir().unwrap();
        id.check_not_expired(dir.path()).unwrap();
        let mut p = CertificateParams::default();
        p.not_before = now - time::Duration::seconds(120);
        p.not_after = now - time::Duration::seconds(60);
        let expired = NodeIdentity {
            cert_pem: p.signed_by(&key, &issuer).unwrap().pem(),
            ..id
        };
        let err = expired.check_not_expired(dir.path()).unwrap_err();
        assert!(err.to_string().contains("imctl delete node n1"), "{err}");
    }

    #[test]
    fn empty_state_dir_has_no_identity() {
        let dir = tempfile::tempdir().unwrap();
        assert!(NodeIdentity::load(dir.path(), "n1").unwrap().is_none());
    }

    #[test]
    fn non_https_url_is_refused() {
        assert!(matches!(
            endpoint("http://127.0.0.1:7443"),
            Err(IdentityError::BadUrl(..))
        ));
    }
}
