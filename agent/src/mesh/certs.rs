//! Workload certificates: keys made here, signed by the controller, kept
//! under `<state-dir>/mesh/`, renewed at half-life, and the TLS settings
//! built from them.
//!
//! A certificate's one URI SAN is the workload's SPIFFE ID; its subject's
//! organization names the node holding the key (`node:<name>`). Peers check
//! the chain against the cluster CA, the SPIFFE ID and that the node is
//! still in the cluster (a revoked node's proxy is refused).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironmesh_proto::v1::IssueWorkloadCertificateRequest;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::node_clients::NodeClients;

/// The only ALPN the proxies speak.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making the key or CSR: {0}")]
    Key(String),
    #[error("the controller refused a certificate for workload {workload}: {message}")]
    Refused { workload: String, message: String },
    #[error("no controller connection to ask for a certificate")]
    NoController,
    #[error("certificate for workload {workload} is unusable: {message}")]
    Bad { workload: String, message: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One workload's certificate and key.
pub struct WorkloadCert {
    pub workload: String,
    pub spiffe_id: String,
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Bumped by every renewal: pooled connections made with an older one
    /// are retired (they finish their streams first).
    pub generation: u64,
}

impl WorkloadCert {
    /// Half-life: when a fresh one is asked for.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// What a peer's certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe_id: String,
    /// The node holding the key (`O=node:<name>`).
    pub node: String,
}

/// Reads the SPIFFE ID (the one URI SAN) and the node from a certificate.
pub fn peer_identity(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                uris.push(u.to_string());
            }
        }
    }
    let spiffe_id = match uris.as_slice() {
        [one] if one.starts_with("spiffe://") => one.clone(),
        _ => return Err(format!("expected one spiffe:// URI SAN, found {uris:?}")),
    };
    let node = cert
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .find_map(|o| o.strip_prefix("node:"))
        .ok_or("no node:<name> organization in the subject")?
        .to_string();
    Ok(PeerIdentity { spiffe_id, node })
}

/// The TLS provider: ring with AES-GCM suites only, TLS 1.3.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// Certificates of the workloads this node runs in the mesh.
pub struct Certs {
    dir: PathBuf,
    clients: NodeClients,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    by_workload: RwLock<HashMap<String, Arc<WorkloadCert>>>,
    generation: std::sync::atomic::AtomicU64,
}

impl Certs {
    /// `ca_pem`: the cluster CA (the agent's `ca.crt`).
    pub fn new(dir: &Path, ca_pem: &str, clients: NodeClients) -> Result<Certs, CertError> {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            action: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(ca_pem) {
            roots.add(c).map_err(|e| CertError::Bad {
                workload: "(cluster CA)".into(),
                message: e.to_string(),
            })?;
        }
        Ok(Certs {
            dir: dir.to_path_buf(),
            clients,
            roots: Arc::new(roots),
            provider: provider(),
            by_workload: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Where certificates (and the proxy's own state) are kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        self.roots.clone()
    }

    pub fn provider(&self) -> Arc<rustls::crypto::CryptoProvider> {
        self.provider.clone()
    }

    /// The current certificate of `workload`, if any.
    pub fn current(&self, workload: &str) -> Option<Arc<WorkloadCert>> {
        self.by_workload
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(workload)
            .cloned()
    }

    /// Every workload with a certificate.
    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        self.by_workload
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Forgets `workload`'s certificate and removes its files.
    pub fn forget(&self, workload: &str) {
        self.by_workload
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(workload);
        for ext in ["key", "crt"] {
            let _ = std::fs::remove_file(self.dir.join(format!("{workload}.{ext}")));
        }
    }

    /// A usable certificate of `workload`: the one held, the one kept on
    /// disk by a previous agent (so listeners reopen at once after a
    /// restart), or a new one asked for as `instance`.
    pub async fn ensure(
        &self,
        workload: &str,
        instance: &str,
    ) -> Result<Arc<WorkloadCert>, CertError> {
        let now = SystemTime::now();
        if let Some(c) = self.current(workload) {
            if c.renew_at() > now {
                return Ok(c);
            }
        } else if let Some(c) = self.load(workload) {
            let c = Arc::new(c);
            self.install(c.clone());
            if c.renew_at() > now {
                return Ok(c);
            }
        }
        self.issue(workload, instance).await
    }

    fn install(&self, c: Arc<WorkloadCert>) {
        self.by_workload
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c.workload.clone(), c);
    }

    fn load(&self, workload: &str) -> Option<WorkloadCert> {
        let crt = std::fs::read_to_string(self.dir.join(format!("{workload}.crt"))).ok()?;
        let key = std::fs::read_to_string(self.dir.join(format!("{workload}.key"))).ok()?;
        match self.build(workload, &crt, &key) {
            Ok(c) if c.not_after > SystemTime::now() => Some(c),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(workload, error = %e, "kept workload certificate unusable; asking for a new one");
                None
            }
        }
    }

    fn build(
        &self,
        workload: &str,
        crt_pem: &str,
        key_pem: &str,
    ) -> Result<WorkloadCert, CertError> {
        let bad = |message: String| CertError::Bad {
            workload: workload.to_string(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> = pem_certs(crt_pem);
        let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
        let id = peer_identity(leaf).map_err(bad)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
        let validity = parsed.validity();
        let to_time = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        let not_before = to_time(validity.not_before.timestamp());
        let not_after = to_time(validity.not_after.timestamp());
        let key_der = pem_key(key_pem).ok_or_else(|| bad("no private key".into()))?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| bad(e.to_string()))?;
        Ok(WorkloadCert {
            workload: workload.to_string(),
            spiffe_id: id.spiffe_id,
            key: Arc::new(CertifiedKey::new(chain, signing)),
            not_before,
            not_after,
            generation: self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    async fn issue(&self, workload: &str, instance: &str) -> Result<Arc<WorkloadCert>, CertError> {
        let key = rcgen::KeyPair::generate().map_err(|e| CertError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("workload:{workload}"));
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| CertError::Key(e.to_string()))?;
        let clients = self.clients.current();
        let mut last = CertError::NoController;
        for c in clients.iter() {
            let mut c = c.clone();
            match c
                .issue_workload_certificate(IssueWorkloadCertificateRequest {
                    instance: instance.to_string(),
                    csr_pem: csr.clone(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    let key_pem = key.serialize_pem();
                    let cert = Arc::new(self.build(workload, &r.certificate_pem, &key_pem)?);
                    self.save(workload, &r.certificate_pem, &key_pem)?;
                    tracing::info!(
                        workload,
                        spiffe_id = %cert.spiffe_id,
                        not_after = r.not_after_unix,
                        "workload certificate issued"
                    );
                    self.install(cert.clone());
                    return Ok(cert);
                }
                Err(s) => {
                    last = CertError::Refused {
                        workload: workload.to_string(),
                        message: s.message().to_string(),
                    }
                }
            }
        }
        Err(last)
    }

    fn save(&self, workload: &str, crt: &str, key: &str) -> Result<(), CertError> {
        for (ext, data, private) in [("key", key, true), ("crt", crt, false)] {
            let path = self.dir.join(format!("{workload}.{ext}"));
            let r = if private {
                ironmesh_process::write_file_atomic(&path, data.as_bytes(), 0o600)
            } else {
                ironmesh_process::write_file_atomic(&path, data.as_bytes(), 0o644)
            };
            r.map_err(|source| CertError::Io {
                action: "writing",
                path,
                source,
            })?;
        }
        Ok(())
    }

    /// TLS settings of the inbound (HBONE) listener of `workload`: client
    /// certificates required and chained to the cluster CA; the serving
    /// certificate follows renewals.
    pub fn server_config(
        self: &Arc<Self>,
        workload: &str,
    ) -> Result<Arc<rustls::ServerConfig>, CertError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| CertError::Bad {
            workload: workload.to_string(),
            message: e.to_string(),
        })?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CertError::Bad {
                workload: workload.to_string(),
                message: e.to_string(),
            })?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver {
                certs: self.clone(),
                workload: workload.to_string(),
            }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// TLS settings for a connection from `cert`'s workload to a proxy that
    /// must present `expect` (a SPIFFE ID).
    pub fn client_config(
        &self,
        cert: &WorkloadCert,
        expect: &str,
    ) -> Result<Arc<rustls::ClientConfig>, CertError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CertError::Bad {
                workload: cert.workload.clone(),
                message: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
                roots: self.roots.clone(),
                provider: self.provider.clone(),
                expect: expect.to_string(),
            }))
            .with_client_cert_resolver(Arc::new(Fixed(cert.key.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// The server name a client sends (unused for verification: the SPIFFE ID is).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("mesh.ironmesh")
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

#[derive(Debug)]
struct Resolver {
    certs: Arc<Certs>,
    workload: String,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs").field("dir", &self.dir).finish()
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.current(&self.workload).map(|c| c.key.clone())
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks the destination proxy's chain against the cluster CA and its
/// SPIFFE ID against the one the destination instance's workload has.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    expect: String,
}

impl rustls::client::danger::ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = peer_identity(end_entity).map_err(rustls::Error::General)?;
        if id.spiffe_id != self.expect {
            return Err(rustls::Error::General(format!(
                "destination proxy is {}, expected {}",
                id.spiffe_id, self.expect
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

fn pem_key(pem: &str) -> Option<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).ok()
}
