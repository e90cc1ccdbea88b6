//! Ironmesh resource kinds and their validation.
//!
//! Declarative objects in the Kubernetes habit (`apiVersion:
//! ironmesh.dev/v1`, `kind`, `metadata`, `spec`; the system writes
//! `status`): [`Kind::Node`], Workload, Service, Policy, Volume, Pipeline,
//! PipelineRun and Source. [`validate`] checks one document and returns it
//! normalised with defaults filled in, or a [`ValidationError`] naming the
//! field path. Both the controller (authoritative) and `imctl` use it. This
//! crate does no I/O.

pub mod client_config;
mod kind;
pub mod manifest;
pub mod meta;
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
pub use meta::ObjectMeta;
pub use validate::{checks, validate, Errors, Spec, Validated, ValidationError};

/// The API version of every kind.
pub const API_VERSION: &str = "ironmesh.dev/v1";

#[cfg(test)]
mod tests;
