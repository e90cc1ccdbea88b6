//! The instance supervisor: makes the node's containers match the desired
//! set of instances the controller assigned, and keeps them running.
//!
//! This module owns the lifecycle of every instance on the node: one tokio
//! task per instance (`instance`) ensures its image through the
//! [`ImageSource`], builds its container from the Workload spec
//! ([`instance_spec`]), starts its task with stdout and stderr appended to files in
//! `<state_dir>/instances/<name>/`, waits for it to exit, restarts it per
//! its restart policy with exponential back-off ([`backoff`]), runs its
//! liveness and readiness probes ([`probes`]), and removes everything it
//! created when the instance leaves the desired set. Observed state and
//! events go up as [`SupervisorReport`]s; logs are served by [`logs`].
//!
//! It does not own the connection to containerd (the caller hands in a
//! [`Runtime`]), image transfer (the [`ImageSource`]), networking or
//! volumes, and it never touches containers without the
//! `ironmesh.dev/instance` label.
//!
//! Agent restarts: [`Supervisor::start`] lists the labelled containers
//! containerd kept, and the first [`Supervisor::set_desired`] adopts those
//! still desired at the same spec generation (same task, same PID; the
//! restart count comes back from `state.json`) and removes the others.

pub mod backoff;
mod instance;
pub mod instance_spec;
pub mod logs;
mod netup;
pub mod probes;
pub mod rotate;
mod state;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ironmesh_proto::v1::{InstanceEvent, InstanceState};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::image_source::ImageSource;
use crate::runtime::{ContainerState, Runtime, RuntimeError};

/// containerd label naming the instance a container belongs to.
pub const LABEL_INSTANCE: &str = "ironmesh.dev/instance";
/// containerd label naming the instance's workload.
pub const LABEL_WORKLOAD: &str = "ironmesh.dev/workload";
/// containerd label holding the spec generation the container was built from.
pub const LABEL_SPEC_GENERATION: &str = "ironmesh.dev/spec-generation";

/// How long [`Supervisor::detach`] waits for an instance task to notice.
/// How long all instance tasks together get to stop watching their
/// containers at agent shutdown (the agent exits within 2 s of SIGTERM).
const DETACH_TIMEOUT: Duration = Duration::from_millis(800);

/// One instance the controller assigned to this node.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredInstance {
    /// Unique in the cluster; also the containerd container id.
    pub name: String,
    pub workload: String,
    /// Bumped whenever the spec changes; a new generation replaces the
    /// container.
    pub spec_generation: u64,
    pub spec: ironmesh_api::workload::WorkloadSpec,
    /// Manifest digest the controller resolved the image to; empty when
    /// the controller does not hold the image.
    pub image_digest: String,
    /// The volumes it mounts, as the controller bound them to this node.
    pub volumes: Vec<ironmesh_proto::v1::InstanceVolume>,
    /// For a pipeline step: the host directory holding its work-queue
    /// socket, mounted at `/run/ironmesh`.
    pub queue_dir: Option<PathBuf>,
}

/// Where the supervisor keeps its files and how it paces restarts.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Per instance: `<state_dir>/instances/<name>/{stdout.log,stderr.log,state.json}`.
    pub state_dir: PathBuf,
    /// First restart delay.
    pub backoff_base: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// A run at least this long resets the back-off to `backoff_base`.
    pub backoff_reset_after: Duration,
    /// Time between SIGTERM and SIGKILL when an instance is stopped.
    pub stop_grace: Duration,
    /// Address HTTP and TCP probes connect to: containers share the host's
    /// network until per-instance network namespaces land.
    pub probe_host: IpAddr,
    /// Provisions the volumes instances mount; `None`: an instance that
    /// mounts a volume fails with a clear message.
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Size and number of each instance's log files.
    pub logs: rotate::LogLimits,
}

impl SupervisorConfig {
    /// The defaults: back-off 1 s doubling to 60 s, reset after 60 s of
    /// running, 10 s stop grace, probes on 127.0.0.1.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        SupervisorConfig {
            state_dir: state_dir.into(),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_reset_after: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
            probe_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            storage: None,
            logs: rotate::LogLimits::default(),
        }
    }

    /// The directory of one instance's logs and state.
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("instances").join(name)
    }
}

/// What the supervisor tells the controller.
#[derive(Debug, Clone, PartialEq)]
pub enum SupervisorReport {
    /// The full current state of one instance (sent on every change).
    State(InstanceState),
    /// Something notable happened to an instance.
    Event(InstanceEvent),
}

/// What went wrong, naming the instance (or directory) and the step.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot create the supervisor state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the existing containers to adopt: {0}")]
    Discover(#[source] RuntimeError),
    #[error("instance {name} is not known on this node")]
    UnknownInstance { name: String },
    #[error("instance {name}: cannot read its logs in {}: {source}", dir.display())]
    Logs {
        name: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("instance {name}: {action} failed: {source}")]
    Runtime {
        name: String,
        action: &'static str,
        #[source]
        source: RuntimeError,
    },
}

/// What an instance task is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    /// Stop and remove everything of the instance.
    Remove,
    /// Stop supervising; leave the container running.
    Detach,
}

/// One supervised instance.
struct Handle {
    generation: u64,
    /// Names of the Volumes it mounts.
    volumes: Vec<String>,
    state: Arc<Mutex<InstanceState>>,
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

/// What the supervisor's tasks share.
pub(crate) struct Shared {
    pub(crate) cfg: SupervisorConfig,
    pub(crate) runtime: Runtime,
    pub(crate) images: Arc<dyn ImageSource>,
    pub(crate) network: Option<Arc<dyn InstanceNetworking>>,
    pub(crate) reports: mpsc::Sender<SupervisorReport>,
}

/// An instance's own network: a namespace the container joins and an
/// address probes reach it on. Without one, containers share containerd's
/// network namespace (tests of the supervisor alone).
///
/// The supervisor brings it up while it ensures the image and creates the
/// container: [`InstanceNetworking::setup`] must be done before the task is
/// created (runc joins the namespace then), [`InstanceNetworking::attach`]
/// before the task starts (policy applies from the first packet).
#[tonic::async_trait]
pub trait InstanceNetworking: Send + Sync + 'static {
    /// Where the namespace of `instance` is (or will be) mounted: the path
    /// [`InstanceNetworking::setup`] returns, known before it runs so the
    /// container can be created meanwhile.
    fn netns_path(&self, instance: &str) -> PathBuf;
    /// Namespace, interfaces, address and routes. Idempotent: the same
    /// address and namespace for the same instance.
    async fn setup(&self, instance: &str) -> Result<(std::net::Ipv4Addr, PathBuf), String>;
    /// What has to be in place before the instance sends or receives its
    /// first packet (the datapath on its interface, with `ip`, the address
    /// `setup` leased, as its only source); called after a successful
    /// `setup`. Idempotent. An error keeps the instance from starting.
    async fn attach(&self, instance: &str, ip: Ipv4Addr) -> Result<(), String>;
    /// Idempotent: removes namespace, interfaces, routes and address lease.
    async fn teardown(&self, instance: &str) -> Result<(), String>;
    /// Removes what belongs to instances not in `keep` (after a crash).
    async fn cleanup_orphans(&self, keep: std::collections::HashSet<String>);
}

struct Tables {
    instances: HashMap<String, Handle>,
    /// Tasks still removing an instance that left the desired set; a
    /// re-added instance of the same name waits for them.
    removing: HashMap<String, JoinHandle<()>>,
    /// Containers found at start, handed out by the first `set_desired`.
    discovered: Option<HashMap<String, ContainerState>>,
}

/// Supervises this node's instances. See the module docs.
pub struct Supervisor {
    shared: Arc<Shared>,
    tables: Mutex<Tables>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("state_dir", &self.shared.cfg.state_dir)
            .field("runtime", &self.shared.runtime)
            .finish()
    }
}

impl Supervisor {
    /// Prepares the state directory and lists the containers of this
    /// namespace that carry the instance label; does not touch them until
    /// the first [`Supervisor::set_desired`].
    pub async fn start(
        cfg: SupervisorConfig,
        runtime: Runtime,
        images: Arc<dyn ImageSource>,
        reports: mpsc::Sender<SupervisorReport>,
    ) -> Result<Supervisor, SupervisorError> {
        Self::start_with_network(cfg, runtime, images, None, reports).await
    }

    /// [`Supervisor::start`], with every instance in its own network.
    pub async fn start_with_network(
        cfg: SupervisorConfig,
        runtime: Runtime,
        images: Arc<dyn ImageSource>,
        network: Option<Arc<dyn InstanceNetworking>>,
        reports: mpsc::Sender<SupervisorReport>,
    ) -> Result<Supervisor, SupervisorError> {
        let dir = cfg.state_dir.join("instances");
        std::fs::create_dir_all(&dir).map_err(|source| SupervisorError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let discovered: HashMap<String, ContainerState> = runtime
            .list()
            .await
            .map_err(SupervisorError::Discover)?
            .into_iter()
            // Only what an agent created; the id is the instance name.
            .filter(|c| c.labels.get(LABEL_INSTANCE) == Some(&c.id))
            .map(|c| (c.id.clone(), c))
            .collect();
        tracing::info!(
            namespace = runtime.namespace(),
            found = discovered.len(),
            "supervisor started; existing instance containers wait for the desired set"
        );
        Ok(Supervisor {
            shared: Arc::new(Shared {
                cfg,
                runtime,
                images,
                network,
                reports,
            }),
            tables: Mutex::new(Tables {
                instances: HashMap::new(),
                removing: HashMap::new(),
                discovered: Some(discovered),
            }),
        })
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves plain maps behind; keep going.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The full desired set for this node (authoritative). New instances
    /// are started; missing ones are stopped and removed (task, container,
    /// snapshot, log directory, state); a different spec generation
    /// replaces the instance; the same generation with a running task
    /// found at start is adopted (same PID, no restart). Returns at once:
    /// the work happens in the instance tasks, which report as they go.
    pub async fn set_desired(&self, desired: Vec<DesiredInstance>) {
        let mut wanted: HashMap<String, DesiredInstance> = HashMap::new();
        for d in desired {
            if wanted.contains_key(&d.name) {
                tracing::warn!(instance = %d.name, "instance listed twice in the desired set; the last one wins");
            }
            wanted.insert(d.name.clone(), d);
        }

        // Networks of instances that are gone (namespaces, veths, leases),
        // before any instance task sets its own up: cleanup must not see a
        // half-made network of a new instance as an orphan.
        let first = self.tables().discovered.is_some();
        if first {
            if let Some(net) = self.shared.network.clone() {
                let keep: std::collections::HashSet<String> = wanted.keys().cloned().collect();
                net.cleanup_orphans(keep).await;
            }
        }

        let mut tables = self.tables();
        tables.removing.retain(|_, task| !task.is_finished());
        let first = tables.discovered.is_some();
        let mut discovered = tables.discovered.take().unwrap_or_default();

        // Gone from the desired set, or replaced by a new generation.
        let names: Vec<String> = tables.instances.keys().cloned().collect();
        for name in names {
            let keep = wanted
                .get(&name)
                .is_some_and(|d| tables.instances[&name].generation == d.spec_generation);
            if keep {
                continue;
            }
            if let Some(handle) = tables.instances.remove(&name) {
                tracing::info!(instance = %name, "instance leaves the desired set or changes generation; removing");
                let _ = handle.control.send(Control::Remove);
                tables.removing.insert(name, handle.task);
            }
        }

        // Found at start but no longer desired: remove.
        let leftover: Vec<String> = discovered
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in leftover {
            discovered.remove(&name);
            tracing::info!(instance = %name, "container found at start is not desired; removing");
            let task = tokio::spawn(instance::remove_orphan(self.shared.clone(), name.clone()));
            tables.removing.insert(name, task);
        }
        if first {
            // Instance directories nobody owns (a removal cut short by a crash).
            self.remove_stray_dirs(&tables, &wanted);
        }

        for (name, d) in wanted {
            if tables.instances.contains_key(&name) {
                continue;
            }
            if !crate::runtime::is_identifier(&name) {
                tracing::warn!(instance = %name, "instance name is not a valid container id; not started");
                let state = instance::invalid_name_state(&d);
                let _ = self.shared.reports.try_send(SupervisorReport::State(state));
                continue;
            }
            let predecessor = tables.removing.remove(&name);
            let adopt = discovered.remove(&name);
            let state = Arc::new(Mutex::new(instance::initial_state(&d)));
            let (control, control_rx) = watch::channel(Control::Run);
            let generation = d.spec_generation;
            let volumes = d.spec.volumes.iter().map(|m| m.volume.clone()).collect();
            let task = tokio::spawn(instance::run(
                self.shared.clone(),
                d,
                state.clone(),
                control_rx,
                adopt,
                predecessor,
            ));
            tables.instances.insert(
                name,
                Handle {
                    generation,
                    volumes,
                    state,
                    control,
                    task,
                },
            );
        }
    }

    fn remove_stray_dirs(&self, tables: &Tables, wanted: &HashMap<String, DesiredInstance>) {
        let root = self.shared.cfg.state_dir.join("instances");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if wanted.contains_key(&name)
                || tables.instances.contains_key(&name)
                || tables.removing.contains_key(&name)
            {
                continue;
            }
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(instance = %name, dir = %path.display(), "removed the directory of an instance no longer here")
                }
                Err(e) => {
                    tracing::warn!(instance = %name, dir = %path.display(), error = %e, "cannot remove a stray instance directory")
                }
            }
        }
    }

    /// The Volumes that supervised instances mount, and whether removals
    /// are still under way (their containers may still hold a volume: a
    /// volume must not be deleted until they are done).
    /// The runtime instances run on.
    pub fn runtime(&self) -> Runtime {
        self.shared.runtime.clone()
    }

    /// Where instance logs and state are kept.
    pub fn state_dir(&self) -> PathBuf {
        self.shared.cfg.state_dir.clone()
    }
}

/// Bytes under `root` (the state directory) as `(state, logs)`: container
/// logs (rotated ones included) apart, the rest without `skip` (volume
/// mount points) and without other file systems mounted below.
pub fn state_disk_use(root: &Path, skip: &[PathBuf]) -> (u64, u64) {
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(root) else {
            return (0, 0);
        };
        let dev = meta.dev();
        let (mut state, mut logs) = (0u64, 0u64);
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let Ok(m) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if m.is_dir() {
                    if m.dev() == dev && !skip.contains(&path) {
                        stack.push(path);
                    }
                } else if m.is_file() {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with("stdout.log") || name.starts_with("stderr.log") {
                        logs = logs.saturating_add(m.len());
                    } else {
                        state = state.saturating_add(m.len());
                    }
                }
            }
        }
        (state, logs)
    }
}

impl Supervisor {
    pub fn volumes_in_use(&self) -> (std::collections::HashSet<String>, bool) {
        let tables = self.tables();
        let used = tables
            .instances
            .values()
            .flat_map(|h| h.volumes.iter().cloned())
            .collect();
        let removing = tables.removing.values().any(|t| !t.is_finished());
        (used, removing)
    }

    /// Current state of every supervised instance, sorted by name (for a
    /// full report after the sync stream reconnects).
    pub fn snapshot(&self) -> Vec<InstanceState> {
        let tables = self.tables();
        let mut out: Vec<InstanceState> = tables
            .instances
            .values()
            .map(|h| h.state.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The instance's log: the last `tail_lines` lines (0 = all) of its
    /// stdout followed by its stderr — containerd writes the two streams to
    /// separate files, so their relative order is not kept; with `follow`,
    /// data appended to either file afterwards is sent as it is found
    /// (polled every 200 ms) until the receiver is dropped or the instance
    /// is removed. Without `follow` the channel closes after the backlog.
    pub async fn logs(
        &self,
        name: &str,
        tail_lines: u32,
        follow: bool,
    ) -> Result<mpsc::Receiver<Vec<u8>>, SupervisorError> {
        let known = self.tables().instances.contains_key(name);
        if !known || !crate::runtime::is_identifier(name) {
            return Err(SupervisorError::UnknownInstance {
                name: name.to_string(),
            });
        }
        let dir = self.shared.cfg.instance_dir(name);
        logs::open(&dir, tail_lines, follow)
            .await
            .map_err(|source| SupervisorError::Logs {
                name: name.to_string(),
                dir,
                source,
            })
    }

    /// Stops supervising and leaves containers running (for an agent
    /// restart): instance tasks end, probes stop, nothing is killed.
    /// Removals already under way get a few seconds to finish.
    pub async fn detach(self) {
        let (instances, removing) = {
            let mut tables = self.tables();
            (
                std::mem::take(&mut tables.instances),
                std::mem::take(&mut tables.removing),
            )
        };
        let mut tasks = Vec::new();
        for (name, handle) in instances {
            let _ = handle.control.send(Control::Detach);
            tasks.push((name, handle.task));
        }
        tasks.extend(removing);
        // One deadline for all: tasks stop in parallel, so waiting on each in
        // turn costs no more than the slowest.
        let deadline = tokio::time::Instant::now() + DETACH_TIMEOUT;
        for (name, mut task) in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(instance = %name, "instance task did not stop in time; aborting it");
                task.abort();
            }
        }
        tracing::info!("supervisor detached; containers keep running");
    }
}

/// `<state_dir>/instances/<name>`.
pub(crate) fn instance_dir(cfg: &SupervisorConfig, name: &str) -> PathBuf {
    cfg.instance_dir(name)
}

/// Removes an instance directory; a missing one is fine.
pub(crate) fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
