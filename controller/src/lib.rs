//! The Ironmesh controller: desired state in a durable, revisioned store,
//! the cluster CA, the node and operator gRPC surfaces over mutual TLS, the
//! reconcilers and each node's assignment. [`server::run`] wires it
//! together; `ARCHITECTURE.md` at the repository root walks through the
//! flows and says which module owns each step.
//!
//! State:
//! - [`store`]: the revisioned key-value store (atomic, compare-guarded
//!   transactions, ordered watch) with its embedded (redb) and etcd backends.
//! - [`resources`]: resource objects on the store: the `/registry/` key
//!   layout, system-managed metadata, the atomic multi-object apply, and
//!   the edge between stored JSON and the typed `ironmesh_api::object`
//!   forms (`StoredObject::typed`, `Resources::update_typed`).
//! - [`cache`]: a watch-fed view of the store that reconcilers and the node
//!   API read instead of listing the store.
//! - [`ha`]: several controllers on one etcd: the lease, the leader
//!   election, presence records, the shared CA and bootstrap token.
//!
//! Identity and trust:
//! - [`pki`]: the cluster CA, the certificates it signs and who a
//!   certificate names (`node:`, `operator:`, `controller`).
//! - [`bootstrap`]: preparing the data directory at every start (CA,
//!   bootstrap token, server certificate, the first operator's `admin.yaml`).
//! - [`tokens`]: join tokens as managed objects and whether one admits a join.
//! - [`join`]: admitting a node (token + CSR → node certificate) and renewals.
//! - [`join_limit`]: a per-source-address limit on refused joins.
//! - [`revocation`]: each node's current certificate and the revoked serials.
//! - [`authz`]: operators, their roles, and the check every operator RPC makes.
//! - [`serving_tls`]: the TLS listener, with a serving certificate that
//!   renews itself.
//!
//! Surfaces:
//! - [`node_api`]: `NodeService`: join, renewal, the per-agent sync stream,
//!   blob fetches and work-queue calls.
//! - [`operator_api`]: `OperatorService`: apply, get, list, delete, watch,
//!   images, logs, flows, join tokens and operators.
//! - [`ui`]: the web UI on its own HTTPS listener: pages, sign-in with a
//!   one-time code, live updates over Server-Sent Events.
//! - [`report_checks`]: bounds on what an agent's reports may say.
//! - [`blob_access`]: which image blobs a node may fetch.
//! - [`stopping`]: ending open streams when the controller stops.
//!
//! Reconcilers (the leader runs them) and what they use:
//! - [`pass_loop`]: run a pass, then wait for the next change or the asked
//!   time; the loop of the workload and pipeline controllers.
//! - [`workloads`]: keeps `replicas` Instances per Workload, binds new ones,
//!   replaces old generations, summarises status, evicts from lost nodes.
//! - [`scheduler`]: pure placement of instances onto nodes (filter, score,
//!   book).
//! - [`eviction`]: which instances leave a NotReady or `NoExecute`-tainted
//!   node, with the unhealthy-share and rate brakes.
//! - [`workload_identities`]: workload identities, small integers from label sets.
//! - [`mesh`]: the cluster's default mesh mode and the workload
//!   certificates it issues to agents.
//! - [`gateways`]: which nodes serve which Gateway, its routes and
//!   listener certificates in their assignments; HTTPRoute status.
//! - [`services`]: a virtual IP from the service CIDR per Service, and its
//!   endpoints.
//! - [`volumes`]: binds Volumes to nodes' pools; what placement and
//!   assignments need to know about volumes.
//! - [`pipelines`]: runs PipelineRuns and fires Pipeline schedules.
//! - [`queue`]: the durable work queues of pipeline runs, kept in the store.
//! - [`sources`]: GitOps: keeps the manifests of a git branch applied.
//! - [`liveness`]: heartbeat bookkeeping (every controller) and the
//!   reconciler that turns nodes NotReady and Ready again.
//!
//! Per node (every controller):
//! - [`assignments`]: turns the cache's view into what each node is sent on
//!   its sync stream, whole or as deltas.
//! - [`policy`]: compiles Policies and workload identities into datapath rules.
//! - [`ipam`]: one pod CIDR block of the cluster CIDR per node.
//! - [`images`]: the content-addressed image store (blobs on disk, names in
//!   the store), its manifests per repository and its garbage collection.
//! - [`registry`]: the image store as an OCI Distribution v1.1 registry on
//!   its own HTTPS listener, with certificate and bearer-token auth.
//! - [`logs`]: relays instance logs from agents to operators over the sync
//!   stream.
//! - [`flow_log`]: the in-memory ring of the flow records agents stream up.
//!
//! Process:
//! - [`config`]: command-line flags and environment variables.
//! - [`metrics`]: controller metrics, served at `/metrics`.
//! - [`server`]: wires everything together and runs it until shutdown.

pub mod assignments;
pub mod authz;
pub mod blob_access;
pub mod bootstrap;
pub mod cache;
pub mod config;
pub mod eviction;
pub mod flow_log;
pub mod gateways;
pub mod ha;
pub mod images;
pub mod ipam;
pub mod join;
pub mod join_limit;
pub mod liveness;
pub mod logs;
pub mod mesh;
pub mod metrics;
pub mod node_api;
pub mod operator_api;
pub mod pass_loop;
pub mod pipelines;
pub mod pki;
pub mod policy;
pub mod queue;
pub mod registry;
pub mod report_checks;
pub mod resources;
pub mod revocation;
pub mod scheduler;
pub mod secret_seal;
pub mod server;
pub mod services;
pub mod serving_tls;
pub mod sources;
pub mod stopping;
pub mod store;
pub mod tokens;
pub mod ui;
pub mod volumes;
pub mod workload_identities;
pub mod workloads;
