//! The `ironmesh.v1` gRPC contract shared by controller, agent and `imctl`.
//!
//! The node surface (`NodeService`: join, sync) and the operator surface
//! (`OperatorService`: apply, get, list, delete, watch). Generated at build
//! time from `proto/ironmesh/v1/ironmesh.proto`; this crate holds no logic.

/// Version 1 of the API.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ironmesh.v1");
}
