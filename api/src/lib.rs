//! `ironmesh-api`: the Ironmesh resource schema and its validation.
//!
//! This crate owns the declarative objects operators write, in the
//! Kubernetes habit (`apiVersion: ironmesh.dev/v1`, `kind`, `metadata`,
//! `spec`; the system writes `status`), for every [`Kind`]: Node, Workload,
//! Service, Policy, Volume, Pipeline, PipelineRun and Source, plus
//! Instance, which only the controller creates. For each
//! there is a typed `XSpec` (serde, camelCase, unknown fields rejected) and,
//! where the system reports state, an `XStatus`.
//!
//! - [`validate`] checks one document — envelope, typed decoding with
//!   field paths, then each kind's semantic rules — and returns it
//!   normalised with defaults filled in, or a [`ValidationError`] that names
//!   the kind, the object, the field path and what is expected. The
//!   controller (authoritative) and `imctl` (early feedback) both use it.
//! - [`parse_yaml_documents`] splits a multi-document YAML file, numbering
//!   documents as a reader counts them.
//! - [`selector::LabelSelector`] parses and matches `-l` selectors;
//!   [`quantity`] parses and formats CPU and byte quantities.
//! - [`client_config`] is `imctl`'s configuration file.
//!
//! The crate does no I/O and holds no state.

pub mod client_config;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod instance;
mod kind;
pub mod limits;
pub mod manifest;
pub mod meta;
pub mod net;
pub mod node;
pub mod pipeline;
pub mod policy;
pub mod quantity;
pub mod selector;
pub mod service;
pub mod source;
mod validate;
pub mod volume;
pub mod workload;

pub use kind::{Kind, UnknownKind};
pub use manifest::{parse_yaml_documents, parse_yaml_documents_numbered, ManifestError};
pub use meta::{Condition, ConditionStatus, ObjectMeta};
pub use validate::{checks, validate, Errors, Spec, Validated, ValidationError};

/// The API version of every kind.
pub const API_VERSION: &str = "ironmesh.dev/v1";

#[cfg(test)]
mod tests;
