//! Finding and loading the client config, and connecting to the controller
//! with the operator's certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ironmesh_api::client_config::ClientConfig;
use ironmesh_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where imctl looks for its config when --config is not given, in order.
pub fn default_config_paths() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        v.push(Path::new(&home).join(".ironmesh/config.yaml"));
    }
    v.push(PathBuf::from("/var/lib/ironmesh/controller/admin.yaml"));
    v
}

pub fn load_config(explicit: Option<&Path>) -> anyhow::Result<(ClientConfig, PathBuf)> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match default_config_paths().into_iter().find(|p| p.exists()) {
            Some(p) => p,
            None => bail!(
                "no imctl config found; pass --config or set IMCTL_CONFIG (looked in {})",
                default_config_paths()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let cfg: ClientConfig = serde_norway::from_str(&text)
        .with_context(|| format!("config {} is not a valid imctl config", path.display()))?;
    if cfg.kind != ClientConfig::KIND {
        bail!(
            "config {}: kind is {:?}, expected {:?}",
            path.display(),
            cfg.kind,
            ClientConfig::KIND
        );
    }
    Ok((cfg, path))
}

pub async fn connect(cfg: &ClientConfig) -> anyhow::Result<OperatorServiceClient<Channel>> {
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
        .with_context(|| format!("server {:?} is not a valid URL", cfg.server))?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .context("TLS settings")?
        .connect()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the controller at {}: {}",
                cfg.server,
                ironmesh_process::error_chain(&e)
            )
        })?;
    Ok(OperatorServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

type Api = OperatorServiceClient<Channel>;

/// One object, as JSON.
pub async fn get_object(
    api: &mut Api,
    kind: ironmesh_api::Kind,
    name: &str,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<serde_json::Value> {
    let r = api
        .get(ironmesh_proto::v1::GetRequest {
            kind: kind.as_str().into(),
            name: name.into(),
            reveal: false,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    serde_json::from_str(&r.json).context("the controller sent an object that is not JSON")
}

/// Applies one object; `origin` names it in errors.
pub async fn apply_object(
    api: &mut Api,
    doc: &serde_json::Value,
    origin: &str,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    api.apply(ironmesh_proto::v1::ApplyRequest {
        manifests: vec![ironmesh_proto::v1::Manifest {
            origin: origin.into(),
            json: doc.to_string(),
        }],
        dry_run: false,
    })
    .await
    .map_err(status_err)?;
    Ok(())
}

/// Applies `object` back with `spec` in place of its spec. An object's
/// spec belongs to the operator and its status to the system, so this
/// keeps the name, labels and annotations and leaves the status to the
/// controller.
pub async fn apply_spec(
    api: &mut Api,
    kind: ironmesh_api::Kind,
    object: &serde_json::Value,
    spec: serde_json::Value,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let name = object
        .pointer("/metadata/name")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let mut metadata = serde_json::json!({"name": name});
    for field in ["labels", "annotations"] {
        if let Some(v) = object.pointer(&format!("/metadata/{field}")) {
            metadata[field] = v.clone();
        }
    }
    let doc = serde_json::json!({
        "apiVersion": ironmesh_api::API_VERSION,
        "kind": kind.as_str(),
        "metadata": metadata,
        "spec": spec,
    });
    apply_object(api, &doc, &format!("{} {name}", kind.plural()), status_err).await
}
