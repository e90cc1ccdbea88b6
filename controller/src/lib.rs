//! The Ironmesh controller.
//!
//! Holds desired state in a durable, revisioned [`store`], signs node
//! identities ([`pki`]), serves the node surface ([`node_api`]: join and the
//! per-agent sync stream) and the operator surface ([`operator_api`]: apply,
//! get, list, delete, watch) over mutual TLS, and keeps node readiness from
//! heartbeats ([`liveness`]). Trust in the control plane: join tokens
//! ([`tokens`], [`join`], [`join_limit`]), current and revoked certificates
//! ([`revocation`]), operator roles ([`authz`]), what node reports may say
//! ([`report_checks`]) and which blobs a node may fetch ([`blob_access`]).
//! [`server::run`] wires it together.

pub mod assignments;
pub mod authz;
pub mod blob_access;
pub mod bootstrap;
pub mod cache;
pub mod config;
pub mod eviction;
pub mod flows;
pub mod ha;
pub mod identities;
pub mod images;
pub mod ipam;
pub mod join;
pub mod join_limit;
pub mod liveness;
pub mod logs;
pub mod metrics;
pub mod node_api;
pub mod operator_api;
pub mod pass_loop;
pub mod pipelines;
pub mod pki;
pub mod policy;
pub mod queue;
pub mod report_checks;
pub mod resources;
pub mod revocation;
pub mod scheduler;
pub mod server;
pub mod services;
pub mod serving_tls;
pub mod sources;
pub mod stopping;
pub mod store;
pub mod tokens;
pub mod volumes;
pub mod workloads;
