//! The Ironmesh node agent: makes one host match what the controller
//! assigned to it. `main.rs` wires the modules together; `ARCHITECTURE.md`
//! at the repository root walks through the flows and says which module
//! owns each step.
//!
//! The sync stream's session (connect, hello, heartbeats, back-off) is
//! apart from the pure step from an assignment to the node's desired state
//! ([`sync::desired`]) and from applying that state, which runs in a task of
//! its own so that it never holds up heartbeats.
//!
//! Control plane:
//! - [`node_identity`]: the node's key, certificate and cluster CA in the state
//!   directory; the join and renewal requests.
//! - [`renewal`]: renews the node certificate two thirds into its lifetime.
//! - [`node_clients`]: gRPC clients to every controller, following the
//!   current identity.
//! - [`sync`]: the sync stream: session, outbound priority lanes, desired
//!   state and the apply task.
//! - [`inventory`]: reads the host's hardware (CPUs, memory, disks, NICs,
//!   OS and kernel); never changes the host.
//!
//! Instances:
//! - [`supervisor`]: makes the node's containers match the desired instances
//!   and keeps them running (adoption, probes, restarts, logs).
//! - [`runtime`]: drives containerd over its gRPC API: image import, the OCI
//!   runtime spec, container and task lifecycle.
//! - [`image_source`]: how the supervisor makes an image present in containerd.
//! - [`image_fetch`]: the production image source: blobs from the
//!   controller's image store over the node's mTLS channel.
//! - [`storage`]: the node's storage pools and the volumes provisioned from
//!   them (ext4 image files on loop devices, btrfs subvolumes).
//! - [`work_queue`]: the work-queue socket of pipeline step containers,
//!   relayed to the controller's queues.
//!
//! Network and datapath:
//! - [`network`]: instance addresses, network namespaces, veths, routes and
//!   the VXLAN device, all over netlink.
//! - [`datapath`]: the eBPF datapath: loading and pinning the programs and
//!   maps, attaching them, map writes, flow events.
//! - [`host_networking`]: one instance's network and datapath attachment,
//!   set up and torn down together for the supervisor.
//! - [`flow_export`]: datapath flow events into Prometheus counters and
//!   batches for the sync stream.
//! - [`mesh`]: the node proxy: mTLS (HBONE) between hosts for mesh
//!   instances, their workload certificates and listeners.
//! - [`gateway`]: the ingress gateway: the HTTP(S) listeners of the
//!   Gateways this node serves, routes, JWT checks, proxying to Services.
//!
//! Process:
//! - [`config`]: command-line flags and environment variables.
//! - [`metrics`]: agent metrics, served at `/metrics`.

pub mod config;
pub mod datapath;
pub mod flow_export;
pub mod gateway;
pub mod host_networking;
pub mod image_fetch;
pub mod image_source;
pub mod inventory;
pub mod mesh;
pub mod metrics;
pub mod network;
pub mod node_clients;
pub mod node_identity;
pub mod renewal;
pub mod runtime;
pub mod storage;
pub mod supervisor;
pub mod sync;
pub mod work_queue;
