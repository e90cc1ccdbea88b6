//! The task that supervises one instance, from image to removal.
//!
//! Steps: adopt what containerd kept (same generation and a running task:
//! watch it; stopped: treat as an exit; another generation: remove it),
//! prepare (ensure the image, build the spec, create the container), start
//! the task, watch it (exit, probes), and on exit apply the restart policy
//! with back-off. Every step can be cut short by the supervisor's
//! [`Control`]: `Remove` stops and deletes everything, `Detach` leaves the
//! container running. Restarts reuse the container (its root filesystem
//! persists across restarts, like `docker restart`); a new spec generation
//! gets a new container.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironmesh_api::workload::RestartPolicy;
use ironmesh_proto::v1::{InstanceEvent, InstancePhase, InstanceState};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::image_source::ImageSourceError;
use crate::runtime::{ContainerState, RuntimeError, StopOutcome, TaskIo, TaskStatus};

use super::backoff::{human, Backoff};
use super::netup::{Bringup, Reached};
use super::probes::{ProbeSignal, ProbeTarget, ProbeTasks};
use super::state::Persisted;
use super::{
    instance_dir, instance_spec, remove_dir, Control, DesiredInstance, Shared, SupervisorError,
    SupervisorReport, LABEL_SPEC_GENERATION,
};

pub(crate) const PENDING: InstancePhase = InstancePhase::Pending;
pub(crate) const RUNNING: InstancePhase = InstancePhase::Running;
pub(crate) const SUCCEEDED: InstancePhase = InstancePhase::Succeeded;
pub(crate) const FAILED: InstancePhase = InstancePhase::Failed;

/// Exit code reported when a task could not be started (as Kubernetes'
/// StartError).
const START_FAILED_EXIT: i32 = 128;
/// Attempts at removing an instance before giving up until the next
/// agent start.
const REMOVE_ATTEMPTS: u32 = 5;

/// Why an instance task stopped working through its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Remove,
    Detach,
}

enum Step {
    Prepare,
    Start,
    Watch {
        pid: u32,
        started_ms: i64,
    },
    Exited {
        code: i32,
        ran_for: Duration,
    },
    /// Nothing more to do until removed (Succeeded, Failed, bad spec).
    Terminal,
}

pub(crate) fn initial_state(d: &DesiredInstance) -> InstanceState {
    InstanceState {
        name: d.name.clone(),
        phase: PENDING.into(),
        reason: "Scheduled".to_string(),
        spec_generation: d.spec_generation,
        ..Default::default()
    }
}

pub(crate) fn invalid_name_state(d: &DesiredInstance) -> InstanceState {
    InstanceState {
        phase: FAILED.into(),
        reason: "InvalidName".to_string(),
        message: format!(
            "instance name {:?} is not a valid container id (letters and digits joined by \
             single '.', '_' or '-', at most 76 characters)",
            d.name
        ),
        ..initial_state(d)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn since_ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(now_ms().saturating_sub(ms)).unwrap_or(0))
}

fn exit_code(code: u32) -> i32 {
    i32::try_from(code).unwrap_or(i32::MAX)
}

/// Resolves once the control says to stop; a dropped supervisor counts
/// as `Detach` (containers are left running).
async fn stopped(control: &mut watch::Receiver<Control>) -> Stop {
    loop {
        match *control.borrow_and_update() {
            Control::Run => {}
            Control::Remove => return Stop::Remove,
            Control::Detach => return Stop::Detach,
        }
        if control.changed().await.is_err() {
            return Stop::Detach;
        }
    }
}

/// Runs `fut` unless the control says to stop first.
async fn guard<F: Future>(control: &watch::Receiver<Control>, fut: F) -> Result<F::Output, Stop> {
    let mut control = control.clone();
    tokio::select! {
        biased;
        stop = stopped(&mut control) => Err(stop),
        out = fut => Ok(out),
    }
}

struct Instance {
    shared: Arc<Shared>,
    d: DesiredInstance,
    state: Arc<Mutex<InstanceState>>,
    control: watch::Receiver<Control>,
    dir: PathBuf,
    persisted: Persisted,
    /// Address and namespace of the instance's own network, once set up.
    net: Option<(std::net::Ipv4Addr, PathBuf)>,
    /// The network being brought up alongside the container.
    bringup: Option<Bringup>,
    /// The container was just created: it has no task to clear away.
    fresh: bool,
}

/// The instance task: works through the steps until told to stop, then
/// removes the instance or leaves it running.
pub(crate) async fn run(
    shared: Arc<Shared>,
    d: DesiredInstance,
    state: Arc<Mutex<InstanceState>>,
    control: watch::Receiver<Control>,
    adopt: Option<ContainerState>,
    predecessor: Option<JoinHandle<()>>,
) {
    let dir = instance_dir(&shared.cfg, &d.name);
    let mut inst = Instance {
        persisted: Persisted::default(),
        shared,
        d,
        state,
        control,
        dir,
        net: None,
        bringup: None,
        fresh: false,
    };
    // The previous holder of the name (an older generation, or a removal)
    // must be gone before this one creates its container and directory.
    if let Some(previous) = predecessor {
        if let Ok(Err(e)) = guard(&inst.control, previous).await {
            tracing::warn!(instance = %inst.d.name, error = %e, "previous instance task failed");
        }
    }
    inst.persisted = Persisted::load(&inst.dir, inst.d.spec_generation);
    let restarts = inst.persisted.restarts;
    inst.set(|s| s.restarts = restarts);
    let stop = match inst.steps(adopt).await {
        Ok(never) => match never {},
        Err(stop) => stop,
    };
    if let Some(bringup) = inst.bringup.take() {
        bringup.finish().await;
    }
    match stop {
        Stop::Detach => {
            tracing::info!(instance = %inst.d.name, "detached; the container keeps running");
        }
        Stop::Remove => {
            let name = inst.d.name.clone();
            remove_reporting(&inst.shared, &name).await;
        }
    }
}

/// Removes a container found at start that is not desired.
pub(crate) async fn remove_orphan(shared: Arc<Shared>, name: String) {
    remove_reporting(&shared, &name).await;
}

/// Removes everything of `name`, retrying a few times, and reports it.
async fn remove_reporting(shared: &Shared, name: &str) {
    let mut backoff = Backoff::new(shared.cfg.backoff_base, shared.cfg.backoff_max);
    let mut attempt = 1;
    loop {
        match remove_all(shared, name).await {
            Ok(outcome) => {
                let how = match outcome {
                    StopOutcome::NoTask => "it had no task".to_string(),
                    StopOutcome::AlreadyExited(e) => format!("its task had exited ({})", e.code),
                    StopOutcome::Terminated(e) => {
                        format!("its task stopped on SIGTERM ({})", e.code)
                    }
                    StopOutcome::Killed(e) => format!(
                        "its task was killed after the {} grace period ({})",
                        human(shared.cfg.stop_grace),
                        e.code
                    ),
                };
                tracing::info!(instance = %name, outcome = ?outcome, "instance removed");
                send_event(
                    shared,
                    name,
                    false,
                    "Deleted",
                    format!("Removed container, snapshot and logs; {how}"),
                )
                .await;
                return;
            }
            Err(e) if attempt < REMOVE_ATTEMPTS => {
                tracing::warn!(instance = %name, attempt, error = %e, "cannot remove instance yet; retrying");
                attempt += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                tracing::error!(instance = %name, error = %e, "giving up removing instance until the next agent start");
                send_event(
                    shared,
                    name,
                    true,
                    "Failed",
                    format!("Cannot remove instance: {e}"),
                )
                .await;
                return;
            }
        }
    }
}

/// Stops the task gracefully, deletes task, container and snapshot, and
/// the instance directory.
async fn remove_all(shared: &Shared, name: &str) -> Result<StopOutcome, SupervisorError> {
    let rt = &shared.runtime;
    let err = |action| {
        move |source| SupervisorError::Runtime {
            name: name.to_string(),
            action,
            source,
        }
    };
    let outcome = rt
        .stop(name, shared.cfg.stop_grace)
        .await
        .map_err(err("stopping the task"))?;
    rt.delete(name)
        .await
        .map_err(err("deleting the container"))?;
    if let Some(net) = &shared.network {
        net.teardown(name)
            .await
            .map_err(|reason| SupervisorError::Runtime {
                name: name.to_string(),
                action: "removing the instance network",
                source: RuntimeError::invalid(name, reason),
            })?;
    }
    let dir = instance_dir(&shared.cfg, name);
    remove_dir(&dir).map_err(|e| SupervisorError::Runtime {
        name: name.to_string(),
        action: "removing the instance directory",
        source: RuntimeError::io("remove", &dir, e),
    })?;
    Ok(outcome)
}

async fn send_event(shared: &Shared, name: &str, warning: bool, reason: &str, message: String) {
    let event = InstanceEvent {
        instance: name.to_string(),
        r#type: if warning { "Warning" } else { "Normal" }.to_string(),
        reason: reason.to_string(),
        message,
        unix_ms: now_ms(),
    };
    // A closed channel means nobody listens any more; nothing to do.
    let _ = shared.reports.send(SupervisorReport::Event(event)).await;
}

impl Instance {
    fn name(&self) -> &str {
        &self.d.name
    }

    /// Changes the shared state; returns a copy of the new state.
    fn set(&self, f: impl FnOnce(&mut InstanceState)) -> InstanceState {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        s.clone()
    }

    /// Changes the state and reports it.
    async fn publish(&self, f: impl FnOnce(&mut InstanceState)) {
        let s = self.set(f);
        let _ = self.shared.reports.send(SupervisorReport::State(s)).await;
    }

    async fn event(&self, warning: bool, reason: &str, message: String) {
        send_event(&self.shared, self.name(), warning, reason, message).await;
    }

    fn persist(&self) {
        if let Err(e) = self.persisted.save(&self.dir) {
            tracing::warn!(instance = %self.name(), dir = %self.dir.display(), error = %e, "cannot save instance state");
        }
    }

    /// Waits until the network brought up alongside has its namespace
    /// (enough to create the task); if the bring-up failed, sets the
    /// network up again with back-off, reporting why.
    async fn network_namespace(&mut self) -> Result<(), Stop> {
        let Some(bringup) = self.bringup.as_mut() else {
            return Ok(());
        };
        let result = match guard(&self.control, bringup.namespace()).await? {
            Reached::Namespace(ip, netns) => {
                if self.net.is_none() {
                    self.network_ready(ip, netns).await;
                }
                return Ok(());
            }
            Reached::Done(result) => result,
        };
        self.network_done(result).await.map(|_| ())
    }

    /// Waits until the network brought up alongside is complete (enough to
    /// start the task); if the bring-up failed, sets the network up again
    /// with back-off, reporting why. Returns false when it had to be set
    /// up again.
    async fn network_complete(&mut self) -> Result<bool, Stop> {
        let Some(bringup) = self.bringup.as_mut() else {
            return Ok(true);
        };
        let result = guard(&self.control, bringup.done()).await?;
        self.network_done(result).await
    }

    async fn network_done(
        &mut self,
        result: Result<(std::net::Ipv4Addr, PathBuf), String>,
    ) -> Result<bool, Stop> {
        self.bringup = None;
        match result {
            Ok((ip, netns)) => {
                if self.net.is_none() {
                    self.network_ready(ip, netns).await;
                }
                Ok(true)
            }
            Err(error) => {
                self.net = None;
                self.ensure_network(error).await?;
                Ok(false)
            }
        }
    }

    /// The address, if the network brought up alongside already has one
    /// (without waiting); the caller reports it.
    fn early_network(&mut self) -> Option<std::net::Ipv4Addr> {
        if self.net.is_none() {
            let (ip, netns) = self.bringup.as_ref()?.peek()?;
            tracing::debug!(instance = %self.name(), %ip, netns = %netns.display(), "instance network ready");
            self.net = Some((ip, netns));
        }
        self.net.as_ref().map(|(ip, _)| *ip)
    }

    async fn network_ready(&mut self, ip: std::net::Ipv4Addr, netns: PathBuf) {
        tracing::debug!(instance = %self.name(), %ip, netns = %netns.display(), "instance network ready");
        self.net = Some((ip, netns));
        self.publish(|s| s.ip = ip.to_string()).await;
    }

    /// Sets the instance's whole network up again after `error`, retrying
    /// with back-off and reporting every failure. Each attempt runs as a
    /// bring-up of its own, so a stop never cuts one short (see `run`).
    async fn ensure_network(&mut self, mut error: String) -> Result<(), Stop> {
        let Some(net) = self.shared.network.clone() else {
            return Ok(());
        };
        let cfg = &self.shared.cfg;
        let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
        loop {
            let delay = backoff.next_delay();
            tracing::warn!(instance = %self.name(), error = %error, retry_in = ?delay, "cannot set up the instance network");
            self.publish(|s| {
                s.phase = PENDING.into();
                s.reason = "NetworkSetupError".to_string();
                s.message = format!("{error}; retrying in {}", human(delay));
            })
            .await;
            self.event(true, "Failed", format!("Network setup failed: {error}"))
                .await;
            guard(&self.control, tokio::time::sleep(delay)).await?;
            let bringup = self
                .bringup
                .insert(Bringup::spawn(net.clone(), self.d.name.clone()));
            let result = guard(&self.control, bringup.done()).await?;
            self.bringup = None;
            match result {
                Ok((ip, netns)) => {
                    self.network_ready(ip, netns).await;
                    return Ok(());
                }
                Err(e) => error = e,
            }
        }
    }

    async fn steps(&mut self, adopt: Option<ContainerState>) -> Result<Infallible, Stop> {
        let cfg = &self.shared.cfg;
        let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
        // The network comes up while the image and container are prepared;
        // the task waits for it (see `start_task`).
        if let Some(net) = self.shared.network.clone() {
            self.bringup = Some(Bringup::spawn(net, self.name().to_string()));
        }
        if adopt.is_some() {
            // A container kept across an agent restart is reported again
            // with its address: its network is settled (and repaired) first.
            self.network_complete().await?;
        }
        let mut step = self.adopt(adopt).await?;
        loop {
            step = match step {
                Step::Prepare => self.prepare().await?,
                Step::Start => self.start_task().await?,
                Step::Watch { pid, started_ms } => self.watch(pid, started_ms).await?,
                Step::Exited { code, ran_for } => self.exited(code, ran_for, &mut backoff).await?,
                Step::Terminal => {
                    let mut control = self.control.clone();
                    return Err(stopped(&mut control).await);
                }
            };
        }
    }

    /// What to do with the container containerd kept for this name.
    async fn adopt(&mut self, found: Option<ContainerState>) -> Result<Step, Stop> {
        let Some(c) = found else {
            return Ok(Step::Prepare);
        };
        let generation = self.d.spec_generation.to_string();
        if c.labels.get(LABEL_SPEC_GENERATION) == Some(&generation) {
            match c.task {
                Some(t) if t.status == TaskStatus::Running => {
                    let started_ms = if self.persisted.started_unix_ms > 0 {
                        self.persisted.started_unix_ms
                    } else {
                        now_ms()
                    };
                    tracing::info!(instance = %self.name(), pid = t.pid, "adopting running task");
                    self.event(
                        false,
                        "Adopted",
                        format!(
                            "Adopted running task (pid {}) after an agent restart",
                            t.pid
                        ),
                    )
                    .await;
                    self.publish_running(t.pid, started_ms, "Adopted").await;
                    return Ok(Step::Watch {
                        pid: t.pid,
                        started_ms,
                    });
                }
                Some(t) => {
                    if let Some(exit) = t.exit {
                        // It ended while the agent was away: an ordinary exit.
                        let exited_ms = exit
                            .exited_at
                            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                            .unwrap_or_else(now_ms);
                        let ran_for = Duration::from_millis(
                            u64::try_from(exited_ms.saturating_sub(self.persisted.started_unix_ms))
                                .unwrap_or(0),
                        );
                        self.event(
                            false,
                            "Adopted",
                            format!(
                                "Found the task exited with code {} after an agent restart",
                                exit.code
                            ),
                        )
                        .await;
                        return Ok(Step::Exited {
                            code: exit_code(exit.code),
                            ran_for,
                        });
                    }
                    // Created but never started, or paused: start afresh.
                    return Ok(Step::Start);
                }
                // Finished for good before the agent went away: its task
                // was deleted to free the shim; report the kept exit.
                None if self.persisted.finished => {
                    let code = self.persisted.last_exit_code.unwrap_or(START_FAILED_EXIT);
                    self.publish_finished(code).await;
                    return Ok(Step::Terminal);
                }
                None => return Ok(Step::Start),
            }
        }
        // Another generation: replace it.
        tracing::info!(instance = %self.name(), found = ?c.labels.get(LABEL_SPEC_GENERATION), "replacing container of another spec generation");
        let name = self.name().to_string();
        let rt = &self.shared.runtime;
        let grace = self.shared.cfg.stop_grace;
        let removed = guard(&self.control, async {
            rt.stop(&name, grace).await?;
            rt.delete(&name).await
        })
        .await?;
        if let Err(e) = removed {
            // create() reports it again if it is still in the way.
            tracing::warn!(instance = %name, error = %e, "cannot remove the container of another generation");
        }
        Ok(Step::Prepare)
    }

    /// Ensures the image and creates the container.
    async fn prepare(&mut self) -> Result<Step, Stop> {
        let cfg = &self.shared.cfg;
        let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
        let image = self.d.spec.image.clone();
        let resolved = loop {
            self.publish(|s| {
                s.phase = PENDING.into();
                s.reason = "Pulling".to_string();
                s.message = format!("ensuring image {image:?}");
            })
            .await;
            self.event(false, "Pulling", format!("Pulling image {image:?}"))
                .await;
            let started = std::time::Instant::now();
            let ensured = guard(
                &self.control,
                self.shared.images.ensure(&image, &self.d.image_digest),
            )
            .await?;
            let failure = match ensured {
                Ok(e) => {
                    let message = if e.fetched {
                        format!(
                            "Successfully pulled image {image:?} ({} bytes) in {}",
                            e.bytes,
                            human(started.elapsed())
                        )
                    } else {
                        format!("Image {image:?} already present")
                    };
                    self.event(false, "Pulled", message).await;
                    match guard(&self.control, self.shared.runtime.resolve_image(&image)).await? {
                        Ok(resolved) => break resolved,
                        Err(e) if e.is_not_found() => (PENDING, "ImageNotFound", e.to_string()),
                        Err(e) => (PENDING, "ImageInspectError", e.to_string()),
                    }
                }
                Err(e @ ImageSourceError::NotFound { .. }) => {
                    (PENDING, "ImageNotFound", e.to_string())
                }
                Err(e @ ImageSourceError::Unavailable { .. }) => {
                    (PENDING, "ImageUnavailable", e.to_string())
                }
                Err(e @ ImageSourceError::Invalid { .. }) => {
                    (FAILED, "ImageInvalid", e.to_string())
                }
            };
            let (phase, reason, error) = failure;
            let delay = backoff.next_delay();
            tracing::warn!(instance = %self.name(), image = %image, reason, error = %error, retry_in = ?delay, "image not available");
            self.publish(|s| {
                s.phase = phase.into();
                s.reason = reason.to_string();
                s.message = format!("{error}; retrying in {}", human(delay));
            })
            .await;
            self.event(true, "Failed", format!("Failed to pull image: {error}"))
                .await;
            guard(&self.control, tokio::time::sleep(delay)).await?;
        };

        let mut spec = match instance_spec::instance_spec(&self.d, &resolved.defaults) {
            Ok(spec) => spec,
            Err(message) => return Ok(self.config_error(message).await),
        };
        // The namespace may still be in the making: its path is known.
        spec.netns = self
            .shared
            .network
            .as_ref()
            .map(|net| net.netns_path(self.name()));
        spec.mounts = match self.ensure_volumes().await? {
            Ok(mounts) => mounts,
            Err(message) => return Ok(self.config_error(message).await),
        };
        if let Some(dir) = &self.d.queue_dir {
            // Read-only: connect() to a socket needs no write access to its
            // mount, and the container gets no writable host directory. A
            // directory (not the socket file) so that a socket the agent
            // binds again after a restart is seen.
            spec.mounts.push(crate::runtime::BindMount {
                source: dir.clone(),
                destination: ironmesh_api::pipeline::QUEUE_DIR.to_string(),
                readonly: true,
            });
        }
        loop {
            // An address known by now goes up with this report.
            let ip = self.early_network();
            self.publish(|s| {
                s.phase = PENDING.into();
                s.reason = "ContainerCreating".to_string();
                s.message = String::new();
                if let Some(ip) = ip {
                    s.ip = ip.to_string();
                }
            })
            .await;
            let created = guard(
                &self.control,
                self.shared.runtime.create_from(&spec, resolved.clone()),
            )
            .await?;
            let error = match created {
                Ok(c) => {
                    self.fresh = true;
                    tracing::info!(instance = %self.name(), cgroup = %c.cgroups_path, "container created");
                    self.event(
                        false,
                        "Created",
                        format!("Created container (cgroup {})", c.cgroups_path),
                    )
                    .await;
                    return Ok(Step::Start);
                }
                Err(e @ (RuntimeError::Spec { .. } | RuntimeError::Invalid { .. })) => {
                    return Ok(self.config_error(e.to_string()).await);
                }
                Err(e) => {
                    if e.is_already_exists() {
                        // Left by a removal that did not finish.
                        let name = self.name().to_string();
                        if let Err(d) =
                            guard(&self.control, self.shared.runtime.delete(&name)).await?
                        {
                            tracing::warn!(instance = %name, error = %d, "cannot delete a leftover container");
                        }
                    }
                    e
                }
            };
            let delay = backoff.next_delay();
            tracing::warn!(instance = %self.name(), error = %error, retry_in = ?delay, "cannot create container");
            self.publish(|s| {
                s.phase = PENDING.into();
                s.reason = "CreateContainerError".to_string();
                s.message = format!("{error}; retrying in {}", human(delay));
            })
            .await;
            self.event(true, "Failed", format!("Error: {error}")).await;
            guard(&self.control, tokio::time::sleep(delay)).await?;
        }
    }

    /// Provisions (or finds again) every volume the instance mounts,
    /// retrying storage failures with back-off; returns the bind mounts,
    /// or a message the operator has to act on.
    async fn ensure_volumes(
        &mut self,
    ) -> Result<Result<Vec<crate::runtime::BindMount>, String>, Stop> {
        let needs = match instance_spec::volume_needs(&self.d) {
            Ok(n) if n.is_empty() => return Ok(Ok(Vec::new())),
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        let Some(storage) = self.shared.cfg.storage.clone() else {
            return Ok(Err(
                "this agent has no storage configured (--storage-pool); it cannot mount volumes"
                    .to_string(),
            ));
        };
        let cfg = &self.shared.cfg;
        let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
        loop {
            let needs2 = needs.clone();
            let storage2 = storage.clone();
            let provisioned = guard(
                &self.control,
                tokio::task::spawn_blocking(move || {
                    let mut paths = std::collections::HashMap::new();
                    for n in needs2 {
                        let backend = match n.backend.as_str() {
                            "" => None,
                            b => Some(
                                b.parse::<crate::storage::Backend>()
                                    .map_err(|e| format!("volume {}: {e}", n.volume))?,
                            ),
                        };
                        let pool = (!n.pool.is_empty()).then_some(n.pool.as_str());
                        let path = storage2
                            .provision(&n.volume, n.size_bytes, backend, pool)
                            .map_err(|e| e.to_string())?;
                        paths.insert(n.volume.clone(), path);
                    }
                    Ok::<_, String>(paths)
                }),
            )
            .await?;
            let error = match provisioned {
                Ok(Ok(paths)) => {
                    let names: Vec<&str> = needs.iter().map(|n| n.volume.as_str()).collect();
                    tracing::info!(instance = %self.name(), volumes = ?names, "volumes ready");
                    return Ok(instance_spec::bind_mounts(&self.d, &paths));
                }
                Ok(Err(e)) => e,
                Err(join) => format!("volume provisioning task failed: {join}"),
            };
            let delay = backoff.next_delay();
            tracing::warn!(instance = %self.name(), error = %error, retry_in = ?delay, "cannot provision volumes");
            self.publish(|s| {
                s.phase = PENDING.into();
                s.reason = "VolumeError".to_string();
                s.message = format!("{error}; retrying in {}", human(delay));
            })
            .await;
            self.event(true, "Failed", format!("Volume setup failed: {error}"))
                .await;
            guard(&self.control, tokio::time::sleep(delay)).await?;
        }
    }

    /// A spec the operator has to fix: Failed until a new generation.
    async fn config_error(&self, message: String) -> Step {
        tracing::warn!(instance = %self.name(), error = %message, "instance spec cannot run");
        self.publish(|s| {
            s.phase = FAILED.into();
            s.reason = "CreateContainerConfigError".to_string();
            s.message = message.clone();
        })
        .await;
        self.event(true, "Failed", format!("Error: {message}"))
            .await;
        Step::Terminal
    }

    async fn publish_running(&self, pid: u32, started_ms: i64, reason: &str) {
        let ready = self.d.spec.readiness_probe.is_none();
        let restarts = self.persisted.restarts;
        let last_exit = self.persisted.last_exit_code;
        self.publish(|s| {
            s.phase = RUNNING.into();
            s.reason = reason.to_string();
            s.message = String::new();
            s.pid = pid;
            s.started_unix_ms = started_ms;
            s.ready = ready;
            s.restarts = restarts;
            s.exit_code = last_exit;
        })
        .await;
    }

    /// Creates the task once the network namespace exists and starts it
    /// once the datapath is attached (the two overlap).
    async fn start_task(&mut self) -> Result<Step, Stop> {
        let name = self.name().to_string();
        let rt = self.shared.runtime.clone();
        self.network_namespace().await?;
        // The previous run's stopped task is in the way of a new one.
        if !std::mem::take(&mut self.fresh) {
            if let Err(e) = guard(&self.control, rt.delete_task(&name)).await? {
                tracing::warn!(instance = %name, error = %e, "cannot delete the previous task");
            }
        }
        let io = TaskIo::in_dir(&self.dir);
        if let Err(e) = guard(&self.control, rt.create_task(&name, &io)).await? {
            return Ok(self.start_failed(e).await);
        }
        // A stop from here leaves a created task that never ran: removal
        // deletes it, an adopting agent replaces it.
        if !self.network_complete().await? {
            // Set up again after a failure: start over with a task made
            // in the network as it is now.
            if let Err(e) = guard(&self.control, rt.delete_task(&name)).await? {
                tracing::warn!(instance = %name, error = %e, "cannot delete the unstarted task");
            }
            return Ok(Step::Start);
        }
        match guard(&self.control, rt.start_task(&name)).await? {
            Ok(pid) => {
                let started_ms = now_ms();
                self.persisted.started_unix_ms = started_ms;
                self.persist();
                tracing::info!(instance = %name, pid, restarts = self.persisted.restarts, "task started");
                self.publish_running(pid, started_ms, "Started").await;
                self.event(false, "Started", format!("Started container (pid {pid})"))
                    .await;
                Ok(Step::Watch { pid, started_ms })
            }
            Err(e) => Ok(self.start_failed(e).await),
        }
    }

    /// A start that fails is a failed run (Kubernetes' StartError): the
    /// restart policy and back-off apply.
    async fn start_failed(&self, e: RuntimeError) -> Step {
        tracing::warn!(instance = %self.name(), error = %e, "task did not start");
        self.event(true, "Failed", format!("Error: {e}")).await;
        Step::Exited {
            code: START_FAILED_EXIT,
            ran_for: Duration::ZERO,
        }
    }

    /// Waits for the task to exit while running its probes.
    async fn watch(&self, pid: u32, started_ms: i64) -> Result<Step, Stop> {
        let name = self.name().to_string();
        let (tx, mut signals) = mpsc::channel(16);
        let probes = ProbeTasks::spawn(
            self.d.spec.liveness_probe.as_ref(),
            self.d.spec.readiness_probe.as_ref(),
            ProbeTarget {
                runtime: self.shared.runtime.clone(),
                id: name.clone(),
                host: self
                    .net
                    .as_ref()
                    .map(|(ip, _)| std::net::IpAddr::V4(*ip))
                    .unwrap_or(self.shared.cfg.probe_host),
            },
            since_ms(started_ms),
            tx,
        );
        let mut control = self.control.clone();
        let exit = self.wait_exit();
        tokio::pin!(exit);
        let mut rotate = tokio::time::interval(super::rotate::CHECK_INTERVAL);
        rotate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let code = loop {
            tokio::select! {
                stop = stopped(&mut control) => return Err(stop),
                code = &mut exit => break code,
                _ = rotate.tick() => self.rotate_logs().await,
                Some(signal) = signals.recv() => match signal {
                    ProbeSignal::Ready(ready) => {
                        tracing::info!(instance = %name, ready, "readiness changed");
                        self.publish(|s| s.ready = ready).await;
                    }
                    ProbeSignal::Failed { kind, message } => {
                        self.event(true, "Unhealthy", format!("{kind} probe failed: {message}")).await;
                    }
                    ProbeSignal::LivenessExceeded { failures, message } => {
                        tracing::warn!(instance = %name, pid, failures, error = %message, "liveness probe failed; killing the task");
                        self.event(
                            true,
                            "Killing",
                            format!("Container failed liveness probe {failures} times in a row, will be restarted"),
                        )
                        .await;
                        let grace = self.shared.cfg.stop_grace;
                        match guard(&self.control, self.shared.runtime.stop(&name, grace)).await? {
                            Ok(outcome) => {
                                if let Some(exit) = outcome.exit() {
                                    break exit_code(exit.code);
                                }
                            }
                            // The exit wait above still ends the run.
                            Err(e) => tracing::warn!(instance = %name, error = %e, "cannot stop the unhealthy task"),
                        }
                    }
                },
            }
        };
        drop(probes);
        // What the task wrote last is capped too.
        self.rotate_logs().await;
        Ok(Step::Exited {
            code,
            ran_for: since_ms(started_ms),
        })
    }

    /// The exit code of the task; survives a broken wait call by asking
    /// containerd for the task again.
    async fn wait_exit(&self) -> i32 {
        let name = self.name();
        let rt = &self.shared.runtime;
        loop {
            let error = match rt.wait(name).await {
                Ok(exit) => return exit_code(exit.code),
                Err(e) => e,
            };
            tracing::warn!(instance = %name, error = %error, "waiting for the task failed; checking it again");
            tokio::time::sleep(Duration::from_secs(1)).await;
            match rt.task(name).await {
                Ok(Some(t)) => {
                    if let Some(exit) = t.exit {
                        return exit_code(exit.code);
                    }
                }
                Ok(None) => {
                    tracing::warn!(instance = %name, "the task disappeared");
                    return START_FAILED_EXIT;
                }
                Err(e) => tracing::warn!(instance = %name, error = %e, "cannot read the task"),
            }
        }
    }

    /// Rotates the instance's log files that passed their size.
    async fn rotate_logs(&self) {
        let dir = self.dir.clone();
        let limits = self.shared.cfg.logs;
        match tokio::task::spawn_blocking(move || super::rotate::rotate_dir(&dir, limits)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(instance = %self.name(), files = n, "logs rotated"),
            Ok(Err(e)) => tracing::warn!(instance = %self.name(), error = %e, "cannot rotate logs"),
            Err(e) => {
                tracing::warn!(instance = %self.name(), error = %e, "log rotation task failed")
            }
        }
    }

    /// Reports a run that ended for good: Succeeded or Failed.
    async fn publish_finished(&self, code: i32) {
        let policy = self.d.spec.restart_policy;
        let (phase, reason) = if code == 0 {
            (SUCCEEDED, "Completed")
        } else {
            (FAILED, "Error")
        };
        self.publish(|s| {
            s.phase = phase.into();
            s.reason = reason.to_string();
            s.message = format!("exited with code {code}; restartPolicy {policy:?}");
            s.exit_code = Some(code);
            s.pid = 0;
            s.ready = false;
        })
        .await;
    }

    /// Deletes the exited task (its shim exits with it), keeping the
    /// container, its snapshot and the instance directory.
    async fn release_task(&self) -> Result<(), Stop> {
        let name = self.name().to_string();
        match guard(&self.control, self.shared.runtime.delete_task(&name)).await? {
            Ok(_) => tracing::debug!(instance = %name, "exited task deleted; shim released"),
            // A later start or the removal deletes it again.
            Err(e) => tracing::warn!(instance = %name, error = %e, "cannot delete the exited task"),
        }
        Ok(())
    }

    /// Reports the exit and decides: restart after a back-off, or stay
    /// Succeeded/Failed.
    async fn exited(
        &mut self,
        code: i32,
        ran_for: Duration,
        backoff: &mut Backoff,
    ) -> Result<Step, Stop> {
        self.persisted.last_exit_code = Some(code);
        self.persist();
        tracing::info!(instance = %self.name(), code, ran_for = ?ran_for, "task exited");
        self.event(
            code != 0,
            "Exited",
            format!("Container exited with code {code} after {}", human(ran_for)),
        )
        .await;
        let policy = self.d.spec.restart_policy;
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        };
        if !restart {
            self.persisted.finished = true;
            self.persist();
            self.publish_finished(code).await;
            // The exit code is kept (state.json) and the logs are files of
            // the instance directory: the task, and with it its shim
            // (~13 MB), is no longer needed.
            self.release_task().await?;
            return Ok(Step::Terminal);
        }
        if ran_for >= self.shared.cfg.backoff_reset_after {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let message = if code == 0 {
            format!(
                "back-off {} restarting container (exited with code 0)",
                human(delay)
            )
        } else {
            format!(
                "back-off {} restarting failed container (exit code {code})",
                human(delay)
            )
        };
        self.publish(|s| {
            s.phase = PENDING.into();
            s.reason = "CrashLoopBackOff".to_string();
            s.message = message.clone();
            s.exit_code = Some(code);
            s.pid = 0;
            s.ready = false;
        })
        .await;
        self.event(true, "BackOff", message).await;
        // No shim waits through the back-off; start_task makes a new task.
        self.release_task().await?;
        guard(&self.control, tokio::time::sleep(delay)).await?;
        self.persisted.restarts = self.persisted.restarts.saturating_add(1);
        self.persist();
        Ok(Step::Start)
    }
}
