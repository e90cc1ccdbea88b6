//! A simulated node's identity, made the way the real agent makes it
//! (`agent/src/identity.rs`): a fresh key pair, a CSR whose common name is
//! `node:<name>`, and `NodeService.Join` with the bootstrap token over TLS
//! that trusts only the cluster CA. The signed certificate is then the
//! node's only proof of who it is; nothing is kept on disk.

use std::time::Duration;

use ironmesh_proto::v1::{node_service_client::NodeServiceClient, JoinRequest};
use rcgen::{CertificateParams, DnType, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A joined node's credentials, in memory.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_name: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot build the key or CSR: {0}")]
    Crypto(String),
    #[error("invalid controller URL {0:?}: {1}")]
    BadUrl(String, String),
    /// The controller could not be reached (or went away): worth retrying.
    #[error("cannot reach the controller at {url}: {message}")]
    Connect { url: String, message: String },
    /// The controller answered and said no (wrong token, bad name...).
    #[error("the controller refused to join {node}: {message}")]
    Refused { node: String, message: String },
}

impl JoinError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, JoinError::Connect { .. })
    }
}

impl NodeIdentity {
    /// TLS settings for the node's own calls (mutual TLS with this
    /// certificate).
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

/// A gRPC endpoint with the real agent's timeouts and keep-alives.
pub fn endpoint(url: &str) -> Result<Endpoint, JoinError> {
    if !url.starts_with("https://") {
        return Err(JoinError::BadUrl(
            url.into(),
            "must start with https://".into(),
        ));
    }
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| JoinError::BadUrl(url.into(), e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true))
}

/// Makes a key and CSR for `node_name` and exchanges them, with `token`,
/// for a node certificate.
pub async fn join(
    url: &str,
    server_name: Option<&str>,
    ca_pem: &str,
    token: &str,
    node_name: &str,
) -> Result<NodeIdentity, JoinError> {
    let key = KeyPair::generate().map_err(|e| JoinError::Crypto(e.to_string()))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("node:{node_name}"));
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| JoinError::Crypto(e.to_string()))?;

    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(n) = server_name {
        tls = tls.domain_name(n);
    }
    let connect_err = |message: String| JoinError::Connect {
        url: url.into(),
        message,
    };
    let channel = endpoint(url)?
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
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                connect_err(s.message().to_string())
            }
            _ => JoinError::Refused {
                node: node_name.into(),
                message: s.message().to_string(),
            },
        })?
        .into_inner();
    Ok(NodeIdentity {
        node_name: node_name.to_string(),
        key_pem: key.serialize_pem(),
        cert_pem: resp.certificate_pem,
        ca_pem: resp.ca_certificate_pem,
    })
}

/// An error and its sources, `: `-separated (transport errors hide the
/// useful part in their sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_https_url_is_refused() {
        assert!(matches!(
            endpoint("http://127.0.0.1:7443"),
            Err(JoinError::BadUrl(..))
        ));
    }
}
