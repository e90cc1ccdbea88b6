//! The cluster certificate authority and the identities it certifies.
//!
//! Owns the CA key pair (created on first start under `<data>/pki`), signing
//! node CSRs at join, and issuing the controller's server certificate and the
//! operator's client certificate. Identities are carried in the subject
//! common name: `node:<name>`, `operator:<name>`, `controller`. Nothing else
//! in the controller parses certificates; RPC handlers ask
//! [`identity_from_der`] who the caller is.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// How long node and operator certificates are valid.
pub const CLIENT_CERT_VALIDITY: Duration = Duration::days(365);
/// How long the cluster CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Node(String),
    Operator(String),
    Controller,
    /// A Gateway's listener certificate (`gateway:<name>`). Never accepted
    /// as a caller: [`identity_from_der`] does not parse it.
    Gateway(String),
}

impl Identity {
    /// The subject common name encoding this identity.
    pub fn common_name(&self) -> String {
        match self {
            Identity::Node(n) => format!("node:{n}"),
            Identity::Operator(n) => format!("operator:{n}"),
            Identity::Controller => "controller".to_string(),
            Identity::Gateway(n) => format!("gateway:{n}"),
        }
    }

    fn from_common_name(cn: &str) -> Option<Identity> {
        if let Some(n) = cn.strip_prefix("node:") {
            return (!n.is_empty()).then(|| Identity::Node(n.to_string()));
        }
        if let Some(n) = cn.strip_prefix("operator:") {
            return (!n.is_empty()).then(|| Identity::Operator(n.to_string()));
        }
        (cn == "controller").then_some(Identity::Controller)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.common_name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable {what}: {message}")]
    BadFile {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("certificate is invalid: {0}")]
    BadCertificate(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The cluster CA: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl ClusterCa {
    /// Loads `<dir>/ca.crt` and `<dir>/ca.key`, or creates them (key mode
    /// 0600). Returns whether they were created.
    pub fn load_or_create(dir: &Path) -> Result<(ClusterCa, bool), PkiError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            let ca = ClusterCa::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
                PkiError::BadFile { what, message, .. } => PkiError::BadFile {
                    path: if what == "private key" {
                        key_path.clone()
                    } else {
                        cert_path.clone()
                    },
                    what,
                    message,
                },
                other => other,
            })?;
            return Ok((ca, false));
        }
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        let (ca, key_pem) = ClusterCa::generate()?;
        write_private(&key_path, key_pem.as_bytes())?;
        write_public(&cert_path, ca.cert_pem.as_bytes())?;
        Ok((ca, true))
    }

    /// A CA from its certificate and private key, both PEM (for a CA kept
    /// somewhere other than the data directory, such as a shared store).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadFile {
            path: PathBuf::from("<ca key>"),
            what: "private key",
            message: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| PkiError::BadFile {
            path: PathBuf::from("<ca certificate>"),
            what: "CA certificate",
            message: e.to_string(),
        })?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// A new self-signed CA; also returns its private key, PEM.
    pub fn generate() -> Result<(ClusterCa, String), PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ironmesh cluster CA");
        dn.push(DnType::OrganizationName, "ironmesh");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + CA_VALIDITY;
        let cert = params
            .self_signed(&key)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        let key_pem = key.serialize_pem();
        Ok((
            ClusterCa {
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a node's CSR. The certificate's subject is set here from
    /// `node_name` (the CSR's own subject must already agree); only the
    /// public key is taken from the CSR.
    pub fn sign_node_csr(&self, csr_pem: &str, node_name: &str) -> Result<String, PkiError> {
        self.sign_csr(
            csr_pem,
            &Identity::Node(node_name.to_string()),
            CLIENT_CERT_VALIDITY,
        )
    }

    /// Signs a CSR for `identity`, valid for `lifetime`. The subject is set
    /// here (the CSR's own common name must already be `identity`'s); only
    /// the public key is taken from the CSR.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let expected = identity.common_name();
        let requested_cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(dn_value_str);
        if requested_cn.as_deref() != Some(expected.as_str()) {
            return Err(PkiError::BadCsr(format!(
                "subject common name is {:?}, expected {expected:?}",
                requested_cn.unwrap_or_default()
            )));
        }
        let mut params = client_params(identity, Vec::new())?;
        // Back-dated for clock skew, but never by much of a short lifetime
        // (agents renew two thirds into the whole validity period).
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5).min(lifetime / 12);
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok(cert.pem())
    }

    /// Signs a workload certificate for the mesh: the URI SAN is
    /// `spiffe_id` (the one name peers check), the subject names the node
    /// that holds the key (`O=node:<name>`, so a revoked node's
    /// certificates are refused by the others), usable as client and
    /// server. Only the CSR's public key is used. Returns the PEM and the
    /// expiry (Unix seconds).
    pub fn sign_workload_csr(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        node: &str,
        lifetime: Duration,
    ) -> Result<(String, i64), PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = client_params(&Identity::Node(node.to_string()), Vec::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spiffe_id);
        dn.push(DnType::OrganizationName, format!("node:{node}"));
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(spiffe_id.to_string().try_into().map_err(
                |e| PkiError::Sign(format!("bad SPIFFE ID {spiffe_id:?}: {e}")),
            )?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5).min(lifetime / 12);
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok((cert.pem(), params.not_after.unix_timestamp()))
    }

    /// Issues a fresh key and certificate for `identity`, valid for a year.
    /// Server certificates carry `sans` (DNS names or IP addresses) and the
    /// server-auth usage.
    pub fn issue(
        &self,
        identity: &Identity,
        sans: &[String],
        server: bool,
    ) -> Result<(String, String), PkiError> {
        self.issue_for(identity, sans, server, CLIENT_CERT_VALIDITY)
    }

    /// [`ClusterCa::issue`], valid for `lifetime`.
    pub fn issue_for(
        &self,
        identity: &Identity,
        sans: &[String],
        server: bool,
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Sign(e.to_string()))?;
        let mut san_types = Vec::new();
        for s in sans {
            let san = match s.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    s.clone()
                        .try_into()
                        .map_err(|e| PkiError::Sign(format!("bad SAN {s:?}: {e}")))?,
                ),
            };
            san_types.push(san);
        }
        let mut params = client_params(identity, san_types)?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5).min(lifetime / 12);
        params.not_after = now + lifetime;
        if server {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn client_params(identity: &Identity, sans: Vec<SanType>) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.common_name());
    dn.push(DnType::OrganizationName, "ironmesh");
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + CLIENT_CERT_VALIDITY;
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
    serial[0] &= 0x7f; // positive
    params.serial_number = Some(serial.to_vec().into());
    Ok(params)
}

fn dn_value_str(v: &rcgen::DnValue) -> Option<String> {
    match v {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Who a (chain-verified) certificate speaks for. TLS has already checked the
/// chain to the cluster CA; this only reads the subject.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::BadCertificate("no subject common name".into()))?;
    Identity::from_common_name(cn)
        .ok_or_else(|| PkiError::BadCertificate(format!("unknown identity {cn:?}")))
}

/// What the controller needs to know of a (chain-verified) certificate:
/// who it speaks for, its serial (hex, for the revocation list) and when it
/// expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// Serial number, lowercase hex without leading zero bytes.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
}

/// [`CertInfo`] of a DER certificate.
pub fn cert_info_from_der(der: &[u8]) -> Result<CertInfo, PkiError> {
    use sha2::Digest;
    let identity = identity_from_der(der)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(CertInfo {
        identity,
        serial: serial_hex(cert.tbs_certificate.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
        fingerprint: hex::encode(sha2::Sha256::digest(der)),
    })
}

/// [`CertInfo`] of a PEM certificate.
pub fn cert_info_from_pem(pem: &str) -> Result<CertInfo, PkiError> {
    cert_info_from_der(&pem_to_der(pem)?)
}

/// A serial number as the revocation list keys it: hex, no leading zeros
/// (DER may pad a positive serial with one).
pub fn serial_hex(raw: &[u8]) -> String {
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let s = hex::encode(&raw[first..]);
    if s.is_empty() {
        "0".to_string()
    } else {
        s
    }
}

/// SHA-256 fingerprint of a PEM certificate, hex, for status and logs.
pub fn fingerprint_pem(pem: &str) -> Result<String, PkiError> {
    use sha2::Digest;
    let der = pem_to_der(pem)?;
    Ok(hex::encode(sha2::Sha256::digest(der)))
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(parsed.contents)
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a secret with mode 0600, via a temp file and rename so a crash
/// never leaves a half-written key.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, data, 0o600)
}

/// Writes a public file with mode 0644, atomically.
pub fn write_public(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, data, 0o644)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    ironmesh_process::write_file_atomic(path, data, mode).map_err(|source| PkiError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(cn: &str) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.pem().unwrap())
    }

    #[test]
    fn ca_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (again, created) = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn node_csr_is_signed_with_node_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = ClusterCa::load_or_create(dir.path()).unwrap();
        let (_, csr) = csr_for("node:rack1-a");
        let pem = ca.sign_node_csr(&csr, "rack1-a").unwrap();
        let der = pem_to_der(&pem).unwrap();
        assert_eq!(
            identity_from_der(&der).unwrap(),
            Identity::Node("rack1-a".into())
        );
    }

    #[test]
    fn csr_for_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = ClusterCa::load_or_create(dir.path()).unwrap();
        let (_, csr) = csr_for("operator:admin");
        let err = ca.sign_node_csr(&csr, "rack1-a").unwrap_err();
        assert!(
            err.to_string().contains("expected \"node:rack1-a\""),
            "{err}"
        );
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(matches!(
            ca.sign_node_csr("not a csr", "a"),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn cert_info_reads_serial_expiry_and_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = ClusterCa::load_or_create(dir.path()).unwrap();
        let (_, csr) = csr_for("operator:alice");
        let pem = ca
            .sign_csr(
                &csr,
                &Identity::Operator("alice".into()),
                Duration::minutes(10),
            )
            .unwrap();
        let info = cert_info_from_pem(&pem).unwrap();
        assert_eq!(info.identity, Identity::Operator("alice".into()));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!((info.not_after - now - 600).abs() < 5, "{info:?}");
        assert!(!info.serial.is_empty() && !info.serial.starts_with("00"));
        // Two certificates never share a serial.
        let other =
            cert_info_from_pem(&ca.sign_node_csr(&csr_for("node:n").1, "n").unwrap()).unwrap();
        assert_ne!(info.serial, other.serial);
        assert_eq!(serial_hex(&[0, 0x7f, 1]), "7f01");
        assert_eq!(serial_hex(&[]), "0");
    }

    #[test]
    fn issued_server_cert_carries_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = ClusterCa::load_or_create(dir.path()).unwrap();
        let (cert, _key) = ca
            .issue(
                &Identity::Controller,
                &["localhost".into(), "127.0.0.1".into()],
                true,
            )
            .unwrap();
        let der = pem_to_der(&cert).unwrap();
        assert_eq!(identity_from_der(&der).unwrap(), Identity::Controller);
        assert_eq!(fingerprint_pem(&cert).unwrap().len(), 64);
    }
}
