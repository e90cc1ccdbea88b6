//! The Ironmesh node agent.
//!
//! Makes one host match what the controller assigned to it. This version
//! discovers the host's hardware ([`inventory`]), keeps the node's identity
//! in its state directory ([`identity`]), and holds the sync stream to the
//! controller ([`sync`]): inventory, heartbeats and instance reports up,
//! assignments down. The stream's session (connect, hello, heartbeats,
//! back-off) is apart from the pure step from an assignment to the node's
//! desired state ([`sync::desired`]) and from applying that state, which
//! runs in a task of its own so that it never holds up heartbeats.

pub mod config;
pub mod datapath;
pub mod flow_export;
pub mod host_networking;
pub mod identity;
pub mod image_fetch;
pub mod image_source;
pub mod inventory;
pub mod metrics;
pub mod network;
pub mod node_clients;
pub mod renewal;
pub mod runtime;
pub mod storage;
pub mod supervisor;
pub mod sync;
pub mod work_queue;
