//! `ironmesh-api`: the Ironmesh resource schema and its validation.
//!
//! This crate owns the declarative objects operators write, in the
//! Kubernetes habit (`apiVersion: ironmesh.dev/v1`, `kind`, `metadata`,
//! `spec`; the system writes `status`), for every [`Kind`]: Node, Workload,
//! Service, Policy, Volume, Pipeline, PipelineRun, Source, Gateway and
//! HTTPRoute, plus
//! Instance, which only the controller creates. For each
//! there is a typed `XSpec` (serde, camelCase, unknown fields rejected) and,
//! where the system reports state, an `XStatus`.
//!
//! - [`validate`] checks one document — envelope, typed decoding with
//!   field paths, then each kind's semantic rules — and returns it
//!   normalised with defaults filled in, or a [`ValidationError`] that names
//!   the kind, the object, the field path and what is expected. The
//!   controller runs it on every `Apply` and every Source commit; `imctl`
//!   sends documents as they are and prints the controller's answer.
//! - [`parse_yaml_documents`] splits a multi-document YAML file, numbering
//!   documents as a reader counts them.
//!
//! Modules:
//! - [`workload`], [`instance`], [`node`], [`service`], [`policy`],
//!   [`volume`], [`pipeline`], [`source`], [`gateway`] (Gateway and
//!   HTTPRoute): each kind's spec, status and
//!   rules (a PipelineRun is in [`pipeline`]).
//! - [`meta`]: object metadata, status conditions and the naming rules.
//! - [`object`]: the typed object (`Object<Spec, Status>`) the controller
//!   reads and writes every kind as.
//! - [`manifest`]: splitting multi-document YAML into JSON documents.
//! - [`limits`]: size limits on what operators may store, and how sizes
//!   are shown in messages.
//! - [`quantity`]: CPU and byte quantities in the Kubernetes notation.
//! - [`selector`]: label selectors as operators type them (`-l`).
//! - [`net`]: IPv4 CIDR blocks (cluster CIDR, pod CIDRs and their subnets).
//! - [`client_config`]: `imctl`'s configuration file (the controller writes
//!   the first operator's).
//! - `fuzz` (tests and the `fuzz` feature only): the randomised-run driver
//!   other crates' tests share.
//!
//! The crate does no I/O and holds no state.

pub mod client_config;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod gateway;
pub mod instance;
mod kind;
pub mod limits;
pub mod manifest;
pub mod meta;
pub mod net;
pub mod node;
pub mod object;
pub mod pipeline;
pub mod policy;
pub mod quantity;
pub mod secret;
pub mod selector;
pub mod service;
pub mod source;
mod validate;
pub mod volume;
pub mod workload;

pub use kind::{Kind, UnknownKind};
pub use manifest::{parse_yaml_documents, parse_yaml_documents_numbered, ManifestError};
pub use meta::{Condition, ConditionStatus, ObjectMeta};
pub use object::Object;
pub use validate::{checks, validate, Errors, Spec, Validated, ValidationError};

/// The API version of every kind.
pub const API_VERSION: &str = "ironmesh.dev/v1";

#[cfg(test)]
mod tests;
