//! Operators, their roles, and the check every operator RPC makes.
//!
//! An operator is `operator:<name>` in a certificate signed by the cluster
//! CA *and* a record under `/pki/operators/<name>` holding its role and the
//! serials of the certificates issued to it. A certificate whose serial is
//! not in the record (superseded, or from before roles) or is on the
//! revocation list gets nothing. Roles:
//!
//! | role  | may |
//! | ----- | --- |
//! | view  | get, list, watch, describe, logs, flows, list images |
//! | edit  | view, plus apply and delete of Workload, Service, Policy, Volume, Pipeline, PipelineRun, Source (so pipeline run and cancel), and image push |
//! | admin | everything: also Nodes (cordon, drain, delete), Instances, join tokens and operators, and deleting images (image rm, registry DELETE, garbage collection) |
//!
//! A refusal names the operator, its role and what the call needed. Every
//! mutating call, allowed or not, writes one audit line (target `audit`)
//! with the operator's name; see [`audit`].

use std::sync::Arc;

use ironmesh_api::Kind;
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

use crate::pki::{cert_info_from_der, cert_info_from_pem, ClusterCa, Identity};
use crate::revocation::{revoke_op, Revocations};
use crate::store::{Compare, KeyValue, Op, Store, StoreError, Txn, TxnOutcome};
use crate::tokens::now_unix;

pub const OPERATORS: &str = "/pki/operators/";
const CAS_RETRIES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    View,
    Edit,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "view" => Ok(Role::View),
            "edit" => Ok(Role::Edit),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role {other:?} is not one of view, edit, admin")),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::View => "view",
            Role::Edit => "edit",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call does, as far as roles are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// get, list, watch, logs, flows, list images.
    Read,
    /// apply or delete of objects of a kind.
    Write(Kind),
    /// push and tag images.
    PushImage,
    /// delete images (manifests and tags) and collect their blobs.
    DeleteImage,
    ManageTokens,
    ManageOperators,
    /// read the values of a Secret (`get --reveal`).
    RevealSecret,
}

/// Kinds an `edit` operator may apply and delete.
/// A Gateway opens ports on hosts, so it stays with admin; routes are
/// application traffic.
pub const EDIT_KINDS: [Kind; 8] = [
    Kind::Workload,
    Kind::Service,
    Kind::Policy,
    Kind::Volume,
    Kind::Pipeline,
    Kind::PipelineRun,
    Kind::Source,
    Kind::HTTPRoute,
];

impl Action {
    /// The least role that may do it.
    pub fn needs(&self) -> Role {
        match self {
            Action::Read => Role::View,
            Action::Write(k) if EDIT_KINDS.contains(k) => Role::Edit,
            Action::Write(_) => Role::Admin,
            Action::PushImage => Role::Edit,
            Action::DeleteImage => Role::Admin,
            Action::ManageTokens | Action::ManageOperators | Action::RevealSecret => Role::Admin,
        }
    }

    /// What it is, for messages: "change Node objects".
    pub fn describe(&self) -> String {
        match self {
            Action::Read => "read objects".to_string(),
            Action::Write(k) => format!("apply or delete {} objects", k.as_str()),
            Action::PushImage => "push images".to_string(),
            Action::DeleteImage => "delete images".to_string(),
            Action::ManageTokens => "manage join tokens".to_string(),
            Action::ManageOperators => "manage operators".to_string(),
            Action::RevealSecret => "read the values of Secret objects".to_string(),
        }
    }
}

/// What a validated document asks for beyond the default container
/// sandbox, as `(field path, what it is)`: a Workload's capabilities
/// outside Docker's default set or seccomp `Unconfined`, and a Source's
/// `allowPrivileged` (which lets git apply such Workloads). Applying any
/// needs role admin.
pub fn host_access(v: &ironmesh_api::Validated) -> Vec<(String, String)> {
    match v.kind {
        Kind::Workload => v
            .spec::<ironmesh_api::workload::WorkloadSpec>()
            .map(|s| s.host_access())
            .unwrap_or_default(),
        Kind::Source => match v.spec::<ironmesh_api::source::SourceSpec>() {
            Ok(s) if s.allow_privileged => vec![(
                "spec.allowPrivileged".to_string(),
                "true lets this Source apply privileged Workloads".to_string(),
            )],
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The verified operator behind a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Ok if the role allows `action`, else `PERMISSION_DENIED` naming the
    /// operator, its role and the role needed; `method` goes into the audit
    /// line of a refusal.
    pub fn may(&self, action: Action, method: &str) -> Result<(), Status> {
        let needs = action.needs();
        if self.role >= needs {
            return Ok(());
        }
        let msg = format!(
            "operator {} (role {}) may not {}: that needs role {needs}",
            self.name,
            self.role,
            action.describe()
        );
        audit(self, method, &action.describe(), "denied");
        Err(Status::permission_denied(msg))
    }
}

impl Caller {
    /// Ok for an admin, or when no document asks for more than the
    /// default sandbox ([`host_access`]); else `PERMISSION_DENIED` naming
    /// the object, the field and the role needed.
    pub fn may_apply_host_access(
        &self,
        docs: &[(String, ironmesh_api::Validated)],
        method: &str,
    ) -> Result<(), Status> {
        if self.role >= Role::Admin {
            return Ok(());
        }
        for (origin, v) in docs {
            if let Some((path, what)) = host_access(v).into_iter().next() {
                let target = format!("{} {:?}", v.kind, v.name);
                audit(self, method, &target, "denied");
                return Err(Status::permission_denied(format!(
                    "operator {} (role {}) may not apply {origin}: {target}: {path}: {what}: that needs role admin",
                    self.name, self.role
                )));
            }
        }
        Ok(())
    }
}

/// One audit line: who did (or tried) what, and how it ended.
pub fn audit(caller: &Caller, method: &str, target: &str, outcome: &str) {
    tracing::info!(
        target: "audit",
        operator = %caller.name,
        role = %caller.role,
        method,
        target_object = target,
        outcome,
        "operator call"
    );
}

/// A certificate issued to an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertRef {
    pub serial: String,
    pub not_after: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorRecord {
    pub name: String,
    pub role: Role,
    pub certs: Vec<CertRef>,
    pub created_unix: i64,
    #[serde(default)]
    pub created_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("operator name {0:?} is not valid: use 1-63 lowercase letters, digits, '-', '.' or '_', starting with a letter or digit")]
    InvalidName(String),
    #[error("{0}")]
    InvalidRole(String),
    #[error("operator {0} already exists; revoke it first (imctl operator revoke {0})")]
    Exists(String),
    #[error("operator {0} not found")]
    NotFound(String),
    #[error("operator {0} is the last admin; create another admin before revoking it")]
    LastAdmin(String),
    #[error("{0}")]
    BadCsr(String),
    #[error("operator {0} is being changed by others; try again")]
    Contended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<OperatorError> for Status {
    fn from(e: OperatorError) -> Status {
        let msg = e.to_string();
        match e {
            OperatorError::InvalidName(_)
            | OperatorError::InvalidRole(_)
            | OperatorError::BadCsr(_) => Status::invalid_argument(msg),
            OperatorError::Exists(_) => Status::already_exists(msg),
            OperatorError::NotFound(_) => Status::not_found(msg),
            OperatorError::LastAdmin(_) => Status::failed_precondition(msg),
            OperatorError::Contended(_) => Status::aborted(msg),
            OperatorError::Store(_) => Status::unavailable(msg),
        }
    }
}

pub fn valid_operator_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

fn key(name: &str) -> String {
    format!("{OPERATORS}{name}")
}

fn decode(kv: &KeyValue) -> Option<OperatorRecord> {
    serde_json::from_slice(&kv.value).ok()
}

fn encode(r: &OperatorRecord) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

/// The operators of one store.
#[derive(Clone)]
pub struct Operators {
    store: Arc<dyn Store>,
    revocations: Revocations,
    ca: Arc<ClusterCa>,
}

impl Operators {
    pub fn new(store: Arc<dyn Store>, revocations: Revocations, ca: Arc<ClusterCa>) -> Operators {
        Operators {
            store,
            revocations,
            ca,
        }
    }

    /// Who the caller is and what role it has, from its verified client
    /// certificate; refuses node certificates, revoked or superseded
    /// certificates and operators without a record.
    pub async fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let leaf = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        self.authenticate_der(&leaf).await
    }

    /// [`Self::authenticate`] for a verified client certificate (DER), as
    /// the registry's own TLS listener hands it over.
    pub async fn authenticate_der(&self, leaf: &[u8]) -> Result<Caller, Status> {
        let info = cert_info_from_der(leaf).map_err(|e| {
            Status::unauthenticated(format!("client certificate not accepted: {e}"))
        })?;
        let name = match &info.identity {
            Identity::Operator(n) => n.clone(),
            other => {
                return Err(Status::permission_denied(format!(
                    "the operator API requires an operator certificate; caller is {other}"
                )))
            }
        };
        let unavailable =
            |e: StoreError| Status::unavailable(format!("cannot check operator {name}: {e}"));
        if let Some(r) = self
            .revocations
            .revoked(&info.serial)
            .await
            .map_err(unavailable)?
        {
            return Err(Status::permission_denied(format!(
                "{}; ask an administrator for a new credential (imctl operator create)",
                r.describe()
            )));
        }
        let record = self
            .store
            .get(&key(&name))
            .await
            .map_err(unavailable)?
            .and_then(|kv| decode(&kv));
        let Some(record) = record else {
            return Err(Status::permission_denied(format!(
                "operator {name} is not registered with the controller (revoked, or never created with imctl operator create)"
            )));
        };
        if !record.certs.iter().any(|c| c.serial == info.serial) {
            return Err(Status::permission_denied(format!(
                "this certificate of operator {name} (serial {}) is not one the controller issued to it now; ask an administrator for a new credential",
                info.serial
            )));
        }
        Ok(Caller {
            name,
            role: record.role,
        })
    }

    /// Signs `csr_pem` for a new operator `name` with `role`.
    pub async fn create(
        &self,
        name: &str,
        role: &str,
        csr_pem: &str,
        created_by: &str,
    ) -> Result<String, OperatorError> {
        if !valid_operator_name(name) {
            return Err(OperatorError::InvalidName(name.to_string()));
        }
        let role = Role::parse(role).map_err(OperatorError::InvalidRole)?;
        if self.store.get(&key(name)).await?.is_some() {
            return Err(OperatorError::Exists(name.to_string()));
        }
        let pem = self
            .ca
            .sign_csr(
                csr_pem,
                &Identity::Operator(name.to_string()),
                crate::pki::CLIENT_CERT_VALIDITY,
            )
            .map_err(|e| OperatorError::BadCsr(e.to_string()))?;
        let info = cert_info_from_pem(&pem).map_err(|e| OperatorError::BadCsr(e.to_string()))?;
        let record = OperatorRecord {
            name: name.to_string(),
            role,
            certs: vec![CertRef {
                serial: info.serial,
                not_after: info.not_after,
            }],
            created_unix: now_unix(),
            created_by: created_by.to_string(),
        };
        match self
            .store
            .txn(Txn {
                compares: vec![Compare::Absent(key(name))],
                ops: vec![Op::Put {
                    key: key(name),
                    value: encode(&record),
                }],
            })
            .await?
        {
            TxnOutcome::Committed(_) => Ok(pem),
            TxnOutcome::CompareFailed { .. } => Err(OperatorError::Exists(name.to_string())),
        }
    }

    /// The record of operator `name`, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<OperatorRecord>, OperatorError> {
        Ok(self.store.get(&key(name)).await?.and_then(|kv| decode(&kv)))
    }

    /// Every operator, by name.
    pub async fn list(&self) -> Result<Vec<OperatorRecord>, OperatorError> {
        let (kvs, _) = self.store.list(OPERATORS).await?;
        Ok(kvs.iter().filter_map(decode).collect())
    }

    /// Removes `name` and revokes every certificate issued to it. The last
    /// admin cannot be revoked (nobody could manage the cluster after).
    pub async fn revoke(&self, name: &str, by: &str) -> Result<Vec<String>, OperatorError> {
        for _ in 0..CAS_RETRIES {
            let (kvs, _) = self.store.list(OPERATORS).await?;
            let Some(kv) = kvs.iter().find(|kv| kv.key == key(name)) else {
                return Err(OperatorError::NotFound(name.to_string()));
            };
            let record = decode(kv).ok_or_else(|| OperatorError::NotFound(name.to_string()))?;
            let admins: Vec<&KeyValue> = kvs
                .iter()
                .filter(|kv| decode(kv).is_some_and(|r| r.role == Role::Admin))
                .collect();
            if record.role == Role::Admin && admins.len() <= 1 {
                return Err(OperatorError::LastAdmin(name.to_string()));
            }
            let identity = format!("operator:{name}");
            let reason = format!("operator revoked by {by}");
            let mut ops: Vec<Op> = record
                .certs
                .iter()
                .map(|c| revoke_op(&c.serial, &identity, c.not_after, &reason))
                .collect();
            ops.push(Op::Delete { key: key(name) });
            // Every other admin must still be there: two admins revoking
            // each other at once cannot both win.
            let compares = admins
                .iter()
                .map(|kv| Compare::ModRevision(kv.key.clone(), kv.mod_revision))
                .chain(std::iter::once(Compare::ModRevision(
                    kv.key.clone(),
                    kv.mod_revision,
                )))
                .collect::<Vec<_>>();
            let mut seen = std::collections::HashSet::new();
            let compares = compares
                .into_iter()
                .filter(|c| match c {
                    Compare::ModRevision(k, _) | Compare::Absent(k) => seen.insert(k.clone()),
                })
                .collect();
            if let TxnOutcome::Committed(_) = self.store.txn(Txn { compares, ops }).await? {
                return Ok(record.certs.into_iter().map(|c| c.serial).collect());
            }
        }
        Err(OperatorError::Contended(name.to_string()))
    }

    /// Registers the certificate of a credential the controller wrote
    /// itself (`admin.yaml`) for operator `name` with role admin, unless it
    /// was revoked. Each controller of a cluster adds its own.
    pub async fn register_local(&self, name: &str, cert_pem: &str) -> Result<(), OperatorError> {
        let info =
            cert_info_from_pem(cert_pem).map_err(|e| OperatorError::BadCsr(e.to_string()))?;
        if let Some(r) = self.revocations.revoked(&info.serial).await? {
            tracing::warn!(operator = name, serial = %info.serial, revoked = %r.describe(), "the controller's own operator credential is revoked; not registering it");
            return Ok(());
        }
        for _ in 0..CAS_RETRIES {
            let cur = self.store.get(&key(name)).await?;
            let (compare, record) = match &cur {
                Some(kv) => {
                    let Some(mut r) = decode(kv) else {
                        return Err(OperatorError::Contended(name.to_string()));
                    };
                    if r.certs.iter().any(|c| c.serial == info.serial) {
                        return Ok(());
                    }
                    let now = now_unix();
                    r.certs.retain(|c| c.not_after > now);
                    r.certs.push(CertRef {
                        serial: info.serial.clone(),
                        not_after: info.not_after,
                    });
                    (Compare::ModRevision(kv.key.clone(), kv.mod_revision), r)
                }
                None => (
                    Compare::Absent(key(name)),
                    OperatorRecord {
                        name: name.to_string(),
                        role: Role::Admin,
                        certs: vec![CertRef {
                            serial: info.serial.clone(),
                            not_after: info.not_after,
                        }],
                        created_unix: now_unix(),
                        created_by: "controller".to_string(),
                    },
                ),
            };
            if let TxnOutcome::Committed(_) = self
                .store
                .txn(Txn {
                    compares: vec![compare],
                    ops: vec![Op::Put {
                        key: key(name),
                        value: encode(&record),
                    }],
                })
                .await?
            {
                tracing::info!(operator = name, role = %record.role, serial = %info.serial, "registered the controller's operator credential");
                return Ok(());
            }
        }
        Err(OperatorError::Contended(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[test]
    fn host_access_needs_an_admin() {
        let doc = |kind: &str, spec: serde_json::Value| {
            let v = ironmesh_api::validate(&serde_json::json!({
                "apiVersion": "ironmesh.dev/v1", "kind": kind,
                "metadata": {"name": "x"}, "spec": spec,
            }))
            .unwrap();
            vec![("manifest 1".to_string(), v)]
        };
        let editor = Caller {
            name: "ed".into(),
            role: Role::Edit,
        };
        let admin = Caller {
            name: "root".into(),
            role: Role::Admin,
        };
        let module = doc(
            "Workload",
            serde_json::json!({"image": "w:1", "capabilities": {"add": ["SYS_MODULE"]}}),
        );
        let err = editor.may_apply_host_access(&module, "Apply").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "operator ed (role edit) may not apply manifest 1: Workload \"x\": spec.capabilities.add[0]: capability SYS_MODULE is outside the default set: that needs role admin"
        );
        assert!(admin.may_apply_host_access(&module, "Apply").is_ok());
        let plain = doc(
            "Workload",
            serde_json::json!({"image": "w:1", "capabilities": {"add": ["NET_BIND_SERVICE", "NET_RAW"]}}),
        );
        assert!(editor.may_apply_host_access(&plain, "Apply").is_ok());
        let src = doc(
            "Source",
            serde_json::json!({"repo": "/r", "allowPrivileged": true}),
        );
        let err = editor.may_apply_host_access(&src, "Apply").unwrap_err();
        assert!(err.message().contains("spec.allowPrivileged"), "{err:?}");
    }

    #[test]
    fn roles_allow_what_the_table_says() {
        for k in EDIT_KINDS {
            assert_eq!(Action::Write(k).needs(), Role::Edit, "{k}");
        }
        assert_eq!(Action::Write(Kind::Node).needs(), Role::Admin);
        assert_eq!(Action::Write(Kind::Instance).needs(), Role::Admin);
        assert_eq!(Action::Read.needs(), Role::View);
        assert_eq!(Action::PushImage.needs(), Role::Edit);
        assert_eq!(Action::DeleteImage.needs(), Role::Admin);
        assert_eq!(Action::ManageTokens.needs(), Role::Admin);
        assert_eq!(Action::ManageOperators.needs(), Role::Admin);
        let viewer = Caller {
            name: "vera".into(),
            role: Role::View,
        };
        let err = viewer
            .may(Action::Write(Kind::Workload), "Apply")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "operator vera (role view) may not apply or delete Workload objects: that needs role edit"
        );
        assert!(viewer.may(Action::Read, "Get").is_ok());
        let editor = Caller {
            name: "ed".into(),
            role: Role::Edit,
        };
        assert!(editor
            .may(Action::Write(Kind::PipelineRun), "Apply")
            .is_ok());
        assert!(editor.may(Action::Write(Kind::Node), "Delete").is_err());
        assert!(Role::parse("root").is_err());
        assert!(valid_operator_name("alice.smith"));
        assert!(!valid_operator_name("-x"));
        assert!(!valid_operator_name("Alice"));
    }

    async fn operators() -> (tempfile::TempDir, Operators) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let (ca, _) = ClusterCa::generate().unwrap();
        let rev = Revocations::start(store.clone()).await.unwrap();
        (dir, Operators::new(store, rev, Arc::new(ca)))
    }

    fn csr(cn: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[tokio::test]
    async fn create_list_and_revoke_keep_one_admin() {
        let (_d, ops) = operators().await;
        let (cert, _) = ops
            .ca
            .issue(&Identity::Operator("admin".into()), &[], false)
            .unwrap();
        ops.register_local("admin", &cert).await.unwrap();
        ops.register_local("admin", &cert).await.unwrap();
        let pem = ops
            .create("vera", "view", &csr("operator:vera"), "admin")
            .await
            .unwrap();
        assert!(matches!(
            ops.create("vera", "edit", &csr("operator:vera"), "admin")
                .await,
            Err(OperatorError::Exists(_))
        ));
        assert!(matches!(
            ops.create("eve", "view", &csr("operator:admin"), "admin")
                .await,
            Err(OperatorError::BadCsr(_))
        ));
        assert!(matches!(
            ops.create("x", "root", &csr("operator:x"), "admin").await,
            Err(OperatorError::InvalidRole(_))
        ));
        let list = ops.list().await.unwrap();
        assert_eq!(
            list.iter()
                .map(|r| (r.name.as_str(), r.role))
                .collect::<Vec<_>>(),
            vec![("admin", Role::Admin), ("vera", Role::View)]
        );
        assert_eq!(list[0].certs.len(), 1);
        assert!(matches!(
            ops.revoke("admin", "admin").await,
            Err(OperatorError::LastAdmin(_))
        ));
        let serial = cert_info_from_pem(&pem).unwrap().serial;
        assert_eq!(
            ops.revoke("vera", "admin").await.unwrap(),
            vec![serial.clone()]
        );
        assert!(ops.revocations.revoked(&serial).await.unwrap().is_some());
        assert!(matches!(
            ops.revoke("vera", "admin").await,
            Err(OperatorError::NotFound(_))
        ));
        // A revoked local credential is not registered again at a restart.
        ops.create("boss", "admin", &csr("operator:boss"), "admin")
            .await
            .unwrap();
        ops.revoke("admin", "boss").await.unwrap();
        ops.register_local("admin", &cert).await.unwrap();
        assert!(ops.list().await.unwrap().iter().all(|r| r.name != "admin"));
    }
}
