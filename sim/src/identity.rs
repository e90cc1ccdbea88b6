//! The simulated node's identity: joined with the real agent's own code
//! ([`ironmesh_agent::node_identity::join`]: a fresh key and CSR per node,
//! exchanged with the bootstrap token for a node certificate), kept in
//! memory instead of a state directory.

pub use ironmesh_agent::node_identity::{endpoint, join, IdentityError, NodeIdentity};
pub use ironmesh_process::error_chain;
