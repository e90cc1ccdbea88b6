//! The `ironmesh.v1` gRPC contract shared by controller, agent and `imctl`.
//!
//! - [`v1`]: the generated code, from `proto/ironmesh/v1/ironmesh.proto` at
//!   build time: the node surface (`NodeService`: join, certificate renewal,
//!   sync, blob fetch, work-queue lease/ack/push) and the operator surface
//!   (`OperatorService`: apply, get, list, delete, watch, images, logs,
//!   flows, join tokens, operators).
//! - [`assignment`]: the one rule both ends of the sync stream must agree
//!   on, how an incremental assignment applies.
//! - [`codec`]: the prost codec every service uses (smaller buffers).

/// Version 1 of the API.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ironmesh.v1");
}

pub mod assignment;
pub mod codec;

impl v1::InstancePhase {
    /// The phase as the API spells it (`Pending`, `Running`, ...).
    pub fn name(self) -> &'static str {
        match self {
            v1::InstancePhase::Pending => "Pending",
            v1::InstancePhase::Running => "Running",
            v1::InstancePhase::Succeeded => "Succeeded",
            v1::InstancePhase::Failed => "Failed",
        }
    }
}

/// The capability (in `Hello.capabilities`) of an agent that takes
/// `Settings` messages during a stream; others never get one.
pub const SETTINGS: &str = "settings";

/// The message of the `UNAVAILABLE` status that ends every stream when a
/// controller stops: agents move to another controller at once, clients
/// know to reconnect.
pub const SHUTTING_DOWN: &str = "controller shutting down";

/// Whether `s` is the status a stopping controller ends streams with.
pub fn is_shutting_down(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.message().starts_with(SHUTTING_DOWN)
}
