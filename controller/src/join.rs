//! Admitting a node: a join token and a CSR in, a node certificate out.
//!
//! The rules, in order: the source address has refusals left
//! ([`JoinLimiter`]); the name is a DNS label; the token admits this node
//! ([`JoinTokens::admit`]: valid, not expired, not used up, bound to no
//! other node); and the name is free — no Node of that name exists and no
//! certificate is recorded for it — unless the token is bound to exactly
//! that name, which re-provisions the node and revokes its old
//! certificate. The use of the token, the node's new current certificate
//! and any revocation are written in one transaction, so two joins racing
//! for one name or one last use cannot both win.
//!
//! Renewal is the same signing for a node that proves itself with its
//! current certificate instead of a token: the new certificate becomes the
//! current one, the old one stays valid until it expires.

use std::net::SocketAddr;
use std::sync::Arc;

use ironmesh_api::Kind;
use ironmesh_proto::v1::{JoinRequest, JoinResponse};
use serde_json::Value;
use tonic::Status;

use crate::join_limit::JoinLimiter;
use crate::pki::{cert_info_from_pem, ClusterCa, Identity};
use crate::resources::Resources;
use crate::revocation::{
    decode_node_cert, encode_node_cert, node_key, CertCheckError, NodeCert, Revocations,
};
use crate::store::{Compare, Op, Txn, TxnOutcome};
use crate::tokens::{JoinTokens, TokenError};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("too many refused joins from {addr}; try again in {}s", .retry_after.as_secs().max(1))]
    Limited {
        addr: std::net::IpAddr,
        retry_after: std::time::Duration,
    },
    #[error("node_name {0:?} is not valid: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit")]
    InvalidName(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("node {0} already exists; a token never buys the name of an existing node. To re-provision it, delete it first (imctl delete node {0}) and join again, or join with a token bound to it (imctl token create --node {0})")]
    Exists(String),
    #[error("{0}")]
    BadCsr(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<JoinError> for Status {
    fn from(e: JoinError) -> Status {
        let msg = e.to_string();
        match e {
            JoinError::Limited { .. } => Status::resource_exhausted(msg),
            JoinError::InvalidName(_) | JoinError::BadCsr(_) => Status::invalid_argument(msg),
            JoinError::Exists(_) => Status::already_exists(msg),
            JoinError::Token(TokenError::NotValid) => Status::unauthenticated(msg),
            JoinError::Token(
                TokenError::Expired { .. }
                | TokenError::UsedUp { .. }
                | TokenError::WrongNode { .. },
            ) => Status::permission_denied(msg),
            JoinError::Token(TokenError::Store(_) | TokenError::Contended(_))
            | JoinError::Unavailable(_) => Status::unavailable(msg),
            JoinError::Token(_) => Status::internal(msg),
        }
    }
}

impl JoinError {
    /// Metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            JoinError::Limited { .. } => "limited",
            JoinError::InvalidName(_) | JoinError::BadCsr(_) => "invalid",
            JoinError::Exists(_) => "exists",
            JoinError::Token(TokenError::NotValid) => "bad_token",
            JoinError::Token(TokenError::Expired { .. }) => "expired_token",
            JoinError::Token(TokenError::UsedUp { .. }) => "used_up_token",
            JoinError::Token(TokenError::WrongNode { .. }) => "wrong_node_token",
            _ => "error",
        }
    }
}

/// What admitting a node needs.
pub struct Admission {
    pub ca: Arc<ClusterCa>,
    pub tokens: JoinTokens,
    pub limiter: JoinLimiter,
    pub resources: Resources,
    /// Lifetime of node certificates.
    pub node_cert_lifetime: time::Duration,
}

impl Admission {
    /// Decides a join; every refusal counts against the source address.
    pub async fn join(
        &self,
        req: &JoinRequest,
        remote: Option<SocketAddr>,
    ) -> Result<JoinResponse, JoinError> {
        if let Some(addr) = remote.map(|a| a.ip()) {
            self.limiter
                .check(addr)
                .map_err(|retry_after| JoinError::Limited { addr, retry_after })?;
        }
        let out = self.admit(req).await;
        if let (Err(e), Some(addr)) = (&out, remote) {
            if !matches!(e, JoinError::Unavailable(_)) {
                self.limiter.refused(addr.ip());
            }
        }
        out
    }

    /// Signs `csr_pem` for `node`, whose current certificate `cur` made the
    /// call (checked by the caller), and records it as current.
    pub async fn renew(
        &self,
        revocations: &Revocations,
        node: &str,
        cur: &crate::pki::CertInfo,
        csr_pem: &str,
    ) -> Result<JoinResponse, Status> {
        let pem = self
            .ca
            .sign_csr(
                csr_pem,
                &Identity::Node(node.to_string()),
                self.node_cert_lifetime,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let next = cert_info_from_pem(&pem).map_err(|e| Status::internal(e.to_string()))?;
        match revocations.renew(node, cur, &next).await {
            Ok(rec) => {
                tracing::info!(node, old = %cur.serial, serial = %rec.serial, expires = %crate::tokens::unix_rfc3339(rec.not_after), "node certificate renewed");
                Ok(JoinResponse {
                    certificate_pem: pem,
                    ca_certificate_pem: self.ca.cert_pem().to_string(),
                    node_name: node.to_string(),
                })
            }
            Err(CertCheckError::Store(e)) => Err(Status::unavailable(format!(
                "cannot record node {node}'s certificate: {e}"
            ))),
            Err(e) => Err(Status::permission_denied(e.to_string())),
        }
    }

    async fn admit(&self, req: &JoinRequest) -> Result<JoinResponse, JoinError> {
        let name = req.node_name.as_str();
        if !crate::node_api::valid_node_name(name) {
            return Err(JoinError::InvalidName(name.to_string()));
        }
        let mut admitted = self.tokens.admit(&req.bootstrap_token, name).await?;
        let store = self.resources.store().clone();
        let unavailable = |e: &dyn std::fmt::Display| JoinError::Unavailable(e.to_string());
        let mut signed: Option<(String, NodeCert)> = None;
        for _ in 0..crate::tokens::JOIN_RETRIES {
            let bound = admitted.record.node.as_deref() == Some(name);
            let node = self
                .resources
                .get(Kind::Node, name)
                .await
                .map_err(|e| unavailable(&e))?;
            let cred_key = node_key(name);
            let cred = store.get(&cred_key).await.map_err(|e| unavailable(&e))?;
            if (node.is_some() || cred.is_some()) && !bound {
                return Err(JoinError::Exists(name.to_string()));
            }
            let (cert_pem, cert) = match &signed {
                Some(s) => s.clone(),
                None => {
                    let pem = self
                        .ca
                        .sign_csr(
                            &req.csr_pem,
                            &Identity::Node(name.to_string()),
                            self.node_cert_lifetime,
                        )
                        .map_err(|e| JoinError::BadCsr(e.to_string()))?;
                    let info = cert_info_from_pem(&pem).map_err(|e| unavailable(&e))?;
                    let s = (pem, NodeCert::of(&info));
                    signed = Some(s.clone());
                    s
                }
            };
            let (mut compares, mut ops) = admitted.use_ops(name);
            let identity = format!("node:{name}");
            let reason = format!(
                "re-provisioned with join token {}",
                admitted.record.id.as_str()
            );
            match &cred {
                Some(kv) => {
                    compares.push(Compare::ModRevision(cred_key.clone(), kv.mod_revision));
                    if let Some(old) = decode_node_cert(kv) {
                        ops.extend(old.revoke_ops(&identity, &reason));
                    }
                }
                None => {
                    compares.push(Compare::Absent(cred_key.clone()));
                    // A node from before certificates were recorded: its
                    // last certificate is known by fingerprint only.
                    if let Some(fp) = node
                        .as_ref()
                        .and_then(|n| n.object.pointer("/status/certificateFingerprint"))
                        .and_then(Value::as_str)
                        .filter(|f| !f.is_empty())
                    {
                        ops.push(Op::Put {
                            key: format!("{}fp:{fp}", crate::revocation::REVOKED),
                            value: serde_json::to_vec(&crate::revocation::Revoked {
                                identity: identity.clone(),
                                not_after: crate::tokens::now_unix() + 366 * 24 * 3600,
                                revoked_unix: crate::tokens::now_unix(),
                                reason: reason.clone(),
                            })
                            .unwrap_or_default(),
                        });
                    }
                }
            }
            ops.push(Op::Put {
                key: cred_key,
                value: encode_node_cert(&cert),
            });
            match store
                .txn(Txn { compares, ops })
                .await
                .map_err(|e| unavailable(&e))?
            {
                TxnOutcome::Committed(_) => {
                    tracing::info!(
                        node = name,
                        token = %admitted.record.id,
                        serial = %cert.serial,
                        reprovisioned = bound && (node.is_some() || cred.is_some()),
                        "node certificate issued"
                    );
                    return Ok(JoinResponse {
                        certificate_pem: cert_pem,
                        ca_certificate_pem: self.ca.cert_pem().to_string(),
                        node_name: name.to_string(),
                    });
                }
                // The token or the name changed underneath: decide again,
                // after a short random pause so racing joins spread out.
                TxnOutcome::CompareFailed { .. } => {
                    let pause = rand::random_range(1..=20);
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    admitted = self.tokens.admit(&req.bootstrap_token, name).await?;
                }
            }
        }
        Err(JoinError::Unavailable(format!(
            "node {name}: join contended; try again"
        )))
    }
}
