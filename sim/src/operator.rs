//! The operator side the bench and the tests drive: a client of
//! `OperatorService` with the credential the controller writes at first
//! start (`<data-dir>/admin.yaml`, loaded like `imctl` loads its config),
//! and the few calls they need (apply, get, list).

use std::path::Path;
use std::time::Duration;

use ironmesh_api::client_config::ClientConfig;
use ironmesh_proto::v1::{
    operator_service_client::OperatorServiceClient, ApplyRequest, CreateJoinTokenRequest,
    GetRequest, ListRequest, Manifest,
};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("cannot read {path}: {message}")]
    Config { path: String, message: String },
    #[error("cannot reach the controller at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{call}: {code:?}: {message}")]
    Call {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("the controller sent an object that is not JSON: {0}")]
    NotJson(String),
}

/// A connected operator client.
#[derive(Clone)]
pub struct Operator {
    client: OperatorServiceClient<Channel>,
}

fn call_err(call: &'static str) -> impl Fn(tonic::Status) -> OperatorError {
    move |s| OperatorError::Call {
        call,
        code: s.code(),
        message: s.message().to_string(),
    }
}

impl Operator {
    /// Loads an imctl client config (`kind: Config`) and connects with it.
    pub async fn from_config_file(path: &Path) -> Result<Operator, OperatorError> {
        Self::connect(&client_config(path)?).await
    }

    pub async fn connect(cfg: &ClientConfig) -> Result<Operator, OperatorError> {
        let connect_err = |message: String| OperatorError::Connect {
            url: cfg.server.clone(),
            message,
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cfg.certificate_authority_data))
            .identity(Identity::from_pem(
                &cfg.client_certificate_data,
                &cfg.client_key_data,
            ));
        if let Some(n) = &cfg.tls_server_name {
            tls = tls.domain_name(n.clone());
        }
        let channel = Endpoint::from_shared(cfg.server.clone())
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tls_config(tls)
            .map_err(|e| connect_err(e.to_string()))?
            .connect()
            .await
            .map_err(|e| connect_err(error_chain(&e)))?;
        Ok(Operator {
            client: OperatorServiceClient::new(channel).max_decoding_message_size(256 << 20),
        })
    }

    /// Applies `docs` (JSON manifests) atomically; returns the store
    /// revision of the write.
    pub async fn apply(&mut self, docs: &[Value]) -> Result<u64, OperatorError> {
        let manifests = docs
            .iter()
            .enumerate()
            .map(|(i, d)| Manifest {
                origin: format!("ironmesh-sim, document {}", i + 1),
                json: d.to_string(),
            })
            .collect();
        let r = self
            .client
            .apply(ApplyRequest {
                manifests,
                dry_run: false,
            })
            .await
            .map_err(call_err("Apply"))?
            .into_inner();
        Ok(r.revision)
    }

    /// One object, or `None` if it does not exist.
    pub async fn get(&mut self, kind: &str, name: &str) -> Result<Option<Value>, OperatorError> {
        match self
            .client
            .get(GetRequest {
                kind: kind.into(),
                name: name.into(),
                reveal: false,
            })
            .await
        {
            Ok(r) => serde_json::from_str(&r.into_inner().json)
                .map(Some)
                .map_err(|e| OperatorError::NotJson(e.to_string())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(call_err("Get")(s)),
        }
    }

    /// A join token for `node` only, good for one join within `ttl`
    /// (`imctl token create --node NODE`): it re-provisions that node.
    pub async fn create_node_token(
        &mut self,
        node: &str,
        ttl: Duration,
        description: &str,
    ) -> Result<String, OperatorError> {
        let r = self
            .client
            .create_join_token(CreateJoinTokenRequest {
                ttl_seconds: ttl.as_secs().max(1),
                uses: 1,
                node: node.into(),
                description: description.into(),
            })
            .await
            .map_err(call_err("CreateJoinToken"))?
            .into_inner();
        Ok(r.token)
    }

    /// Every object of `kind`, with the list's store revision.
    pub async fn list(&mut self, kind: &str) -> Result<(Vec<Value>, u64), OperatorError> {
        let r = self
            .client
            .list(ListRequest {
                kind: kind.into(),
                label_selector: String::new(),
            })
            .await
            .map_err(call_err("List"))?
            .into_inner();
        let items = r
            .items
            .iter()
            .map(|i| {
                serde_json::from_str(&i.json).map_err(|e| OperatorError::NotJson(e.to_string()))
            })
            .collect::<Result<Vec<Value>, _>>()?;
        Ok((items, r.revision))
    }
}

/// Loads an imctl client config (`kind: Config`).
pub fn client_config(path: &Path) -> Result<ClientConfig, OperatorError> {
    let cfg_err = |message: String| OperatorError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| cfg_err(e.to_string()))?;
    let cfg: ClientConfig = serde_norway::from_str(&text).map_err(|e| cfg_err(e.to_string()))?;
    if cfg.kind != ClientConfig::KIND {
        return Err(cfg_err(format!(
            "kind is {:?}, expected {:?}",
            cfg.kind,
            ClientConfig::KIND
        )));
    }
    Ok(cfg)
}

/// The Ready condition status of a Node object ("True", "False", ...).
pub fn ready_status(node: &Value) -> Option<&str> {
    node.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))?
        .get("status")?
        .as_str()
}
