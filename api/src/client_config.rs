//! The operator's client configuration file (`imctl` reads it; the
//! controller writes one for the first operator at first start), in the
//! kubeconfig habit: server address, the cluster CA, and the operator's
//! client certificate and key, all inline.

use serde::{Deserialize, Serialize};

/// `kind: Config` for `imctl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    pub api_version: String,
    pub kind: String,
    /// Controller address, `https://host:port`.
    pub server: String,
    /// Name the controller's certificate must carry, if it differs from the
    /// host in `server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// The controller's OCI registry (`--registry-listen`) as `host:port`,
    /// for `imctl image push`. Default: the host of `server`, port 5000
    /// (the controller writes this field when that would miss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Cluster CA certificate, PEM.
    pub certificate_authority_data: String,
    /// Operator name (the certificate's `operator:<user>` identity).
    pub user: String,
    /// Operator client certificate, PEM.
    pub client_certificate_data: String,
    /// Operator client key, PEM.
    pub client_key_data: String,
}

impl ClientConfig {
    pub const KIND: &'static str = "Config";

    pub fn new(
        server: String,
        ca_pem: String,
        user: String,
        cert_pem: String,
        key_pem: String,
    ) -> ClientConfig {
        ClientConfig {
            api_version: crate::API_VERSION.to_string(),
            kind: Self::KIND.to_string(),
            server,
            tls_server_name: None,
            registry: None,
            certificate_authority_data: ca_pem,
            user,
            client_certificate_data: cert_pem,
            client_key_data: key_pem,
        }
    }
}
