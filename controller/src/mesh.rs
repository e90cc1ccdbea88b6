//! The mesh's control side: the cluster's default mesh mode and workload
//! certificates.
//!
//! A workload certificate carries `spiffe://<trust-domain>/workload/<name>`
//! as its URI SAN and the node holding its key in the subject. It is signed
//! only for a node that runs an instance of that workload (the node
//! authorizer habit) and only from a CSR: keys are made on the node and
//! never leave it. The latest expiry per workload and node is kept under
//! `/pki/workload-certs/<workload>/<node>` for `imctl describe workload`.

use std::sync::Arc;

use ironmesh_api::workload::MeshMode;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{IssueWorkloadCertificateRequest, WorkloadCertificate};
use tonic::Status;

use crate::pki::ClusterCa;
use crate::resources::Resources;
use crate::store::{Compare, Op, Store, StoreError, Txn};

/// Where the cluster's default mode is recorded at first start.
const DEFAULT_MODE_KEY: &str = "/cluster/mesh-default-mode";
const CERTS_PREFIX: &str = "/pki/workload-certs/";

/// What the mesh's control side needs, fixed at start.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    pub trust_domain: String,
    pub cert_lifetime: time::Duration,
    pub default_mode: MeshMode,
}

/// The SPIFFE ID of a workload.
pub fn spiffe_id(trust_domain: &str, workload: &str) -> String {
    format!("spiffe://{trust_domain}/workload/{workload}")
}

/// The default mode: the flag if given; else the one recorded in the store;
/// else recorded now: strict for a new cluster (no node ever registered),
/// permissive for one that ran before the mesh existed.
pub async fn default_mode(
    store: &Arc<dyn Store>,
    flag: Option<MeshMode>,
) -> Result<MeshMode, StoreError> {
    if let Some(m) = flag {
        return Ok(m);
    }
    if let Some(kv) = store.get(DEFAULT_MODE_KEY).await? {
        let text = String::from_utf8_lossy(&kv.value).to_string();
        return text.parse().map_err(StoreError::Corrupt);
    }
    let (nodes, _) = store
        .list(&format!("/registry/{}/", Kind::Node.plural()))
        .await?;
    let mode = if nodes.is_empty() {
        MeshMode::Strict
    } else {
        MeshMode::Permissive
    };
    store
        .txn(Txn {
            compares: vec![Compare::Absent(DEFAULT_MODE_KEY.into())],
            ops: vec![Op::Put {
                key: DEFAULT_MODE_KEY.into(),
                value: mode.as_str().as_bytes().to_vec(),
            }],
        })
        .await?;
    // Another controller may have recorded it first: read what won.
    match store.get(DEFAULT_MODE_KEY).await? {
        Some(kv) => String::from_utf8_lossy(&kv.value)
            .parse()
            .map_err(StoreError::Corrupt),
        None => Ok(mode),
    }
}

/// A certificate recorded for `imctl describe workload`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCert {
    pub node: String,
    pub spiffe_id: String,
    pub not_after_unix: i64,
}

/// Signs the workload certificate `node` asks for.
pub async fn issue(
    ca: &ClusterCa,
    resources: &Resources,
    settings: &MeshSettings,
    node: &str,
    req: IssueWorkloadCertificateRequest,
) -> Result<WorkloadCertificate, Status> {
    let o = resources
        .get(Kind::Instance, &req.instance)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .ok_or_else(|| {
            Status::permission_denied(format!("instance {:?} does not exist", req.instance))
        })?;
    let spec: ironmesh_api::instance::InstanceSpec = o
        .object
        .get("spec")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| Status::internal(format!("instance {:?} is unreadable", req.instance)))?;
    if spec.node.as_deref() != Some(node) {
        return Err(Status::permission_denied(format!(
            "instance {:?} is not bound to node {node}; a node gets certificates only for \
             workloads it runs",
            req.instance
        )));
    }
    let id = spiffe_id(&settings.trust_domain, &spec.workload);
    let (pem, not_after) = ca
        .sign_workload_csr(&req.csr_pem, &id, node, settings.cert_lifetime)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let rec = IssuedCert {
        node: node.to_string(),
        spiffe_id: id.clone(),
        not_after_unix: not_after,
    };
    let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
    resources
        .store()
        .txn(Txn {
            compares: Vec::new(),
            ops: vec![Op::Put {
                key: format!("{CERTS_PREFIX}{}/{node}", spec.workload),
                value,
            }],
        })
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    tracing::info!(node, workload = %spec.workload, spiffe_id = %id, not_after, "workload certificate issued");
    Ok(WorkloadCertificate {
        certificate_pem: pem,
        ca_certificate_pem: ca.cert_pem().to_string(),
        spiffe_id: id,
        not_after_unix: not_after,
    })
}

/// The certificates recorded for `workload`, one per node.
pub async fn issued(store: &Arc<dyn Store>, workload: &str) -> Result<Vec<IssuedCert>, StoreError> {
    let (kvs, _) = store.list(&format!("{CERTS_PREFIX}{workload}/")).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}
