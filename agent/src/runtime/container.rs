//! The lifecycle of one instance's container and task in containerd.
//!
//! This module owns, for one instance id: the container's root filesystem
//! snapshot (key = id, prepared from the image's top chainID), the
//! containerd container (OCI spec as an `Any`, runtime
//! `io.containerd.runc.v2` with runc options), its task (created with the
//! snapshot's mounts and stdout/stderr as `file://` log URIs, started,
//! waited for, stopped with SIGTERM then SIGKILL after a grace period),
//! exec processes in it (for exec probes), and their removal. [`Runtime::list`]
//! reports what exists in the namespace, so a restarted agent can adopt the
//! tasks containerd kept running.
//!
//! Logs: stdout and stderr go to two separate, pre-created log files,
//! handed to containerd as plain absolute paths (containerd's documented
//! "log to a file" form: the shim opens each with `O_APPEND` and copies the
//! process's pipe into it). Not `file://` URIs: with a `file://` stdout the
//! containerd 1.6 shim sends stderr to the *same* file and closes that file
//! as soon as stdout reaches EOF, so whatever stderr still had in flight at
//! exit is lost (seen here: a crash message on stderr missing in about one
//! run in three). The same loss happens with two identical plain paths,
//! hence two files. The shim keeps appending while the agent is down;
//! deleting the files is the caller's business.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetContainerRequest, GetRequest,
    KillRequest, ListContainersRequest, ListTasksRequest, StartRequest, WaitRequest,
};
use containerd_client::types::v1::{Process, Status as ProcStatus};
use prost_types::Any;
use tonic::Code;

use super::oci_spec::{self, InstanceSpec};
use super::{
    call_err, is_identifier, system_time, unique_suffix, ResolvedImage, Runtime, RuntimeError,
};

/// `Any` type of an OCI runtime spec, as containerd registers it.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// `Any` type of an OCI process spec (exec).
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// `Any` type of the runc shim's options.
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

const SIGTERM: u32 = 15;
const SIGKILL: u32 = 9;
/// Most of an exec's stdout or stderr kept in memory.
const EXEC_OUTPUT_MAX: u64 = 64 << 10;
/// How long an unfinished create's lease outlives a crashed agent.
const CREATE_LEASE_TTL: Duration = Duration::from_secs(600);

/// The runc shim's options (`containerd.runc.v1.Options`); only the
/// fields the agent sets are declared.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuncOptions {
    #[prost(string, tag = "6")]
    pub binary_name: String,
    #[prost(string, tag = "7")]
    pub root: String,
}

/// Where a task's stdout and stderr are appended: two different absolute
/// paths (see the module docs for why not one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskIo {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl TaskIo {
    /// `<dir>/stdout.log` and `<dir>/stderr.log`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        TaskIo {
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
        }
    }

    /// Checks the paths and creates the files (and their directories) the
    /// shim will append to; returns the strings containerd is given.
    fn prepare(&self, object: &str) -> Result<(String, String), RuntimeError> {
        if self.stdout == self.stderr {
            return Err(RuntimeError::invalid(
                object,
                "stdout and stderr must be different files: containerd 1.6 loses \
                 stderr written just before exit when both share one file",
            ));
        }
        let out = log_path(&self.stdout)?;
        let err = log_path(&self.stderr)?;
        for path in [&self.stdout, &self.stderr] {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RuntimeError::io("create log directory", parent, e))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| RuntimeError::io("create log file", path, e))?;
        }
        Ok((out, err))
    }
}

/// A container created by [`Runtime::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedContainer {
    pub id: String,
    pub image: String,
    /// chainID the root filesystem snapshot was prepared from.
    pub chain_id: String,
    pub cgroups_path: String,
}

/// The state of a task as containerd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Created,
    Running,
    Stopped,
    Paused,
    Pausing,
    Unknown,
}

impl From<i32> for TaskStatus {
    fn from(status: i32) -> Self {
        match ProcStatus::try_from(status) {
            Ok(ProcStatus::Created) => TaskStatus::Created,
            Ok(ProcStatus::Running) => TaskStatus::Running,
            Ok(ProcStatus::Stopped) => TaskStatus::Stopped,
            Ok(ProcStatus::Paused) => TaskStatus::Paused,
            Ok(ProcStatus::Pausing) => TaskStatus::Pausing,
            _ => TaskStatus::Unknown,
        }
    }
}

/// A container's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    pub pid: u32,
    pub status: TaskStatus,
    /// Set once the task stopped.
    pub exit: Option<ExitStatus>,
}

/// A container in the namespace, with its task if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub id: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub created_at: Option<SystemTime>,
    pub task: Option<TaskState>,
}

/// How a process ended. A process killed by signal N reports 128 + N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: u32,
    pub exited_at: Option<SystemTime>,
}

/// What [`Runtime::stop`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The container had no task.
    NoTask,
    /// The task had already exited.
    AlreadyExited(ExitStatus),
    /// The task exited within the grace period after SIGTERM.
    Terminated(ExitStatus),
    /// The task ignored SIGTERM for the grace period and was SIGKILLed.
    Killed(ExitStatus),
}

impl StopOutcome {
    pub fn exit(&self) -> Option<ExitStatus> {
        match self {
            StopOutcome::NoTask => None,
            StopOutcome::AlreadyExited(e) | StopOutcome::Terminated(e) | StopOutcome::Killed(e) => {
                Some(*e)
            }
        }
    }
}

/// The result of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when the exec was killed for exceeding its timeout.
    pub exit_code: Option<u32>,
    /// At most 64 KiB of each stream.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn check_id(id: &str) -> Result<(), RuntimeError> {
    if is_identifier(id) {
        Ok(())
    } else {
        Err(RuntimeError::invalid(
            format!("container id {id:?}"),
            "must be letters and digits, optionally joined by single '.', '_' or '-' \
             (at most 76 characters)",
        ))
    }
}

/// A log path as containerd gets it: absolute, and nothing its URI parser
/// could read as a scheme or an escape.
fn log_path(path: &Path) -> Result<String, RuntimeError> {
    let object = || format!("log path {}", path.display());
    let text = path
        .to_str()
        .ok_or_else(|| RuntimeError::invalid(object(), "must be UTF-8"))?;
    if !path.is_absolute() {
        return Err(RuntimeError::invalid(object(), "must be absolute"));
    }
    if text.contains('%') || text.chars().any(|c| c.is_control()) {
        return Err(RuntimeError::invalid(
            object(),
            "must not contain '%' or control characters",
        ));
    }
    Ok(text.to_string())
}

fn exit_status(code: u32, at: Option<&prost_types::Timestamp>) -> ExitStatus {
    ExitStatus {
        code,
        exited_at: system_time(at),
    }
}

fn task_state(p: &Process) -> TaskState {
    let status = TaskStatus::from(p.status);
    TaskState {
        pid: p.pid,
        status,
        exit: (status == TaskStatus::Stopped)
            .then(|| exit_status(p.exit_status, p.exited_at.as_ref())),
    }
}

impl Runtime {
    fn runc_options(&self) -> Option<Any> {
        let config = self.config();
        if config.runc_binary.is_none() && config.runc_root.is_none() {
            return None;
        }
        let options = RuncOptions {
            binary_name: config.runc_binary.clone().unwrap_or_default(),
            root: config
                .runc_root
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        };
        Some(Any {
            type_url: RUNC_OPTIONS_TYPE_URL.to_string(),
            value: prost::Message::encode_to_vec(&options),
        })
    }

    /// Creates the instance's container: resolves its image, builds its
    /// spec, prepares its root filesystem snapshot (key = id) and creates
    /// the containerd container. Does not start anything.
    pub async fn create(&self, instance: &InstanceSpec) -> Result<CreatedContainer, RuntimeError> {
        check_id(&instance.id)?;
        let image = self.resolve_image(&instance.image).await?;
        self.create_from(instance, image).await
    }

    /// [`Runtime::create`] with the image already resolved (by
    /// [`Runtime::resolve_image`] of `instance.image`), which spares
    /// reading its manifest and config again.
    pub async fn create_from(
        &self,
        instance: &InstanceSpec,
        image: ResolvedImage,
    ) -> Result<CreatedContainer, RuntimeError> {
        let id = instance.id.as_str();
        check_id(id)?;
        let cgroups_path = self.cgroups_path(id);
        let spec = oci_spec::build(instance, &image.defaults, &cgroups_path).map_err(|source| {
            RuntimeError::Spec {
                id: id.to_string(),
                source,
            }
        })?;
        let spec =
            serde_json::to_vec(&spec).map_err(|e| RuntimeError::invalid(id, e.to_string()))?;

        // The lease keeps the new snapshot from garbage collection until
        // the container references it.
        let lease = self.create_lease("create", CREATE_LEASE_TTL).await?;
        let result = self
            .create_under_lease(instance, &image.chain_id, spec, &lease)
            .await;
        let dropped = self.delete_lease(&lease).await;
        result?;
        dropped?;
        Ok(CreatedContainer {
            id: id.to_string(),
            image: instance.image.clone(),
            chain_id: image.chain_id,
            cgroups_path,
        })
    }

    async fn create_under_lease(
        &self,
        instance: &InstanceSpec,
        chain_id: &str,
        spec: Vec<u8>,
        lease: &str,
    ) -> Result<(), RuntimeError> {
        let id = instance.id.as_str();
        let object = format!("container {id}");
        let snapshotter = self.config().snapshotter.clone();
        let prepare = || self.prepare_rootfs(id, chain_id, lease);
        match prepare().await {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                // A snapshot no container owns is what a crashed create
                // leaves; one a container owns is not ours to touch.
                if self.get_container(id).await?.is_some() {
                    return Err(call_err("Containers.Create", object)(
                        tonic::Status::already_exists(format!("container {id} already exists")),
                    ));
                }
                self.remove_snapshot(id).await?;
                prepare()
                    .await
                    .map_err(call_err("Snapshots.Prepare", format!("snapshot {id}")))?;
            }
            Err(s) => return Err(call_err("Snapshots.Prepare", format!("snapshot {id}"))(s)),
        }
        let container = Container {
            id: id.to_string(),
            labels: instance.labels.clone(),
            image: instance.image.clone(),
            runtime: Some(ContainerRuntime {
                name: self.config().runtime.clone(),
                options: self.runc_options(),
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE_URL.to_string(),
                value: spec,
            }),
            snapshotter,
            snapshot_key: id.to_string(),
            ..Default::default()
        };
        if let Err(s) = self
            .containers()
            .create(self.leased(
                CreateContainerRequest {
                    container: Some(container),
                },
                lease,
            ))
            .await
        {
            if s.code() != Code::AlreadyExists {
                let _ = self.remove_snapshot(id).await;
            }
            return Err(call_err("Containers.Create", object)(s));
        }
        Ok(())
    }

    async fn prepare_rootfs(
        &self,
        key: &str,
        parent: &str,
        lease: &str,
    ) -> Result<(), tonic::Status> {
        self.snapshots()
            .prepare(self.leased(
                PrepareSnapshotRequest {
                    snapshotter: self.config().snapshotter.clone(),
                    key: key.to_string(),
                    parent: parent.to_string(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map(|_| ())
    }

    async fn get_container(&self, id: &str) -> Result<Option<Container>, RuntimeError> {
        match self
            .containers()
            .get(self.request(GetContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(reply) => Ok(reply.into_inner().container),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call_err("Containers.Get", format!("container {id}"))(s)),
        }
    }

    /// Creates and starts the container's task with its root filesystem
    /// mounts and its stdout and stderr appended to the files of `io`
    /// (created, with their directories, if missing). Returns the PID.
    ///
    /// A stopped task left from an earlier run must be removed with
    /// [`Runtime::delete_task`] first (containerd answers `AlreadyExists`).
    pub async fn start(&self, id: &str, io: &TaskIo) -> Result<u32, RuntimeError> {
        self.create_task(id, io).await?;
        self.start_task(id).await
    }

    /// The first half of [`Runtime::start`]: creates the task (runc
    /// create: the process exists in its namespaces and cgroup but has not
    /// run a single instruction of the image) and returns its PID. Finish
    /// with [`Runtime::start_task`], or remove it with
    /// [`Runtime::delete_task`].
    pub async fn create_task(&self, id: &str, io: &TaskIo) -> Result<u32, RuntimeError> {
        check_id(id)?;
        let object = format!("container {id}");
        let (stdout, stderr) = io.prepare(&object)?;
        let mounts = self
            .snapshots()
            .mounts(self.request(MountsRequest {
                snapshotter: self.config().snapshotter.clone(),
                key: id.to_string(),
            }))
            .await
            .map_err(call_err("Snapshots.Mounts", format!("snapshot {id}")))?
            .into_inner()
            .mounts;
        let created = self
            .tasks()
            .create(self.request(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs: mounts,
                stdin: String::new(),
                stdout,
                stderr,
                terminal: false,
                checkpoint: None,
                options: self.runc_options(),
                runtime_path: String::new(),
            }))
            .await
            .map_err(call_err("Tasks.Create", object))?;
        Ok(created.into_inner().pid)
    }

    /// The second half of [`Runtime::start`]: lets a task made by
    /// [`Runtime::create_task`] run. Returns the PID. A task that cannot
    /// start is deleted.
    pub async fn start_task(&self, id: &str) -> Result<u32, RuntimeError> {
        check_id(id)?;
        let started = self
            .tasks()
            .start(self.request(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await;
        match started {
            Ok(reply) => Ok(reply.into_inner().pid),
            Err(s) => {
                // Leave no created-but-unstartable task behind.
                let _ = self.delete_task(id).await;
                Err(call_err("Tasks.Start", format!("container {id}"))(s))
            }
        }
    }

    /// Waits until the task exits; returns its exit status. No deadline:
    /// wrap it in a timeout if one is wanted.
    pub async fn wait(&self, id: &str) -> Result<ExitStatus, RuntimeError> {
        self.wait_process(id, "").await
    }

    async fn wait_process(&self, id: &str, exec_id: &str) -> Result<ExitStatus, RuntimeError> {
        let object = if exec_id.is_empty() {
            format!("container {id}")
        } else {
            format!("exec {exec_id} in container {id}")
        };
        let reply = self
            .tasks()
            .wait(tonic::Request::new(WaitRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(call_err("Tasks.Wait", object))?
            .into_inner();
        Ok(exit_status(reply.exit_status, reply.exited_at.as_ref()))
    }

    /// The container's task, if it has one.
    pub async fn task(&self, id: &str) -> Result<Option<TaskState>, RuntimeError> {
        match self
            .tasks()
            .get(self.request(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(reply) => Ok(reply.into_inner().process.as_ref().map(task_state)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call_err("Tasks.Get", format!("container {id}"))(s)),
        }
    }

    async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), RuntimeError> {
        match self
            .tasks()
            .kill(self.request(KillRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                signal,
                all,
            }))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: that is what the caller wanted.
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => Ok(()),
            Err(s) => Err(call_err("Tasks.Kill", format!("container {id}"))(s)),
        }
    }

    /// Stops the task: SIGTERM, then SIGKILL to every process of the
    /// container if it is still running after `grace`. The stopped task is
    /// kept (its exit status stays readable) until [`Runtime::delete_task`]
    /// or [`Runtime::delete`].
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<StopOutcome, RuntimeError> {
        let Some(task) = self.task(id).await? else {
            return Ok(StopOutcome::NoTask);
        };
        if let Some(exit) = task.exit {
            return Ok(StopOutcome::AlreadyExited(exit));
        }
        self.kill(id, "", SIGTERM, false).await?;
        if let Ok(exit) = tokio::time::timeout(grace, self.wait(id)).await {
            return Ok(StopOutcome::Terminated(exit?));
        }
        self.kill(id, "", SIGKILL, true).await?;
        let timeout = self.config().call_timeout;
        match tokio::time::timeout(timeout, self.wait(id)).await {
            Ok(exit) => Ok(StopOutcome::Killed(exit?)),
            Err(_) => Err(RuntimeError::Timeout {
                call: "Tasks.Wait after SIGKILL",
                object: format!("container {id}"),
                timeout,
            }),
        }
    }

    /// Deletes the container's task (SIGKILLing it first if it still
    /// runs), keeping the container and its snapshot, e.g. for a restart.
    /// Returns the exit status of the deleted task, if there was one.
    pub async fn delete_task(&self, id: &str) -> Result<Option<ExitStatus>, RuntimeError> {
        let Some(task) = self.task(id).await? else {
            return Ok(None);
        };
        if task.exit.is_none() {
            self.kill(id, "", SIGKILL, true).await?;
            let timeout = self.config().call_timeout;
            tokio::time::timeout(timeout, self.wait(id))
                .await
                .map_err(|_| RuntimeError::Timeout {
                    call: "Tasks.Wait after SIGKILL",
                    object: format!("container {id}"),
                    timeout,
                })??;
        }
        match self
            .tasks()
            .delete(self.request(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(reply) => {
                let r = reply.into_inner();
                Ok(Some(exit_status(r.exit_status, r.exited_at.as_ref())))
            }
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call_err("Tasks.Delete", format!("container {id}"))(s)),
        }
    }

    /// Removes everything containerd holds for the instance: its task
    /// (SIGKILLed if still running; call [`Runtime::stop`] first for a
    /// graceful stop), its container and its snapshot. Missing pieces are
    /// not an error, so a half-deleted instance can be deleted again.
    pub async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        check_id(id)?;
        self.delete_task(id).await?;
        match self
            .containers()
            .delete(self.request(DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(call_err("Containers.Delete", format!("container {id}"))(s)),
        }
        self.remove_snapshot(id).await
    }

    async fn remove_snapshot(&self, key: &str) -> Result<(), RuntimeError> {
        match self
            .snapshots()
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: self.config().snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call_err("Snapshots.Remove", format!("snapshot {key}"))(s)),
        }
    }

    /// Every container in the namespace with its task (PID, status, exit),
    /// sorted by id: what a restarted agent adopts.
    pub async fn list(&self) -> Result<Vec<ContainerState>, RuntimeError> {
        let object = format!("namespace {}", self.namespace());
        let containers = self
            .containers()
            .list(self.request(ListContainersRequest { filters: vec![] }))
            .await
            .map_err(call_err("Containers.List", object.clone()))?
            .into_inner()
            .containers;
        let tasks = self
            .tasks()
            .list(self.request(ListTasksRequest {
                filter: String::new(),
            }))
            .await
            .map_err(call_err("Tasks.List", object))?
            .into_inner()
            .tasks;
        // containerd 1.6 leaves container_id empty and puts the container
        // id in id; 2.x sets both.
        let mut tasks: HashMap<String, TaskState> = tasks
            .iter()
            .map(|p| {
                let id = if p.container_id.is_empty() {
                    p.id.clone()
                } else {
                    p.container_id.clone()
                };
                (id, task_state(p))
            })
            .collect();
        let mut out: Vec<ContainerState> = containers
            .into_iter()
            .map(|c| ContainerState {
                task: tasks.remove(&c.id),
                created_at: system_time(c.created_at.as_ref()),
                id: c.id,
                image: c.image,
                labels: c.labels,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Runs `args` in the running container (same user, env, cwd and
    /// capabilities as its main process) and returns its exit code and
    /// output. After `timeout` the process is killed and `exit_code` is
    /// `None`. Output goes through files in a private temporary directory.
    pub async fn exec(
        &self,
        id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        check_id(id)?;
        if args.is_empty() {
            return Err(RuntimeError::invalid(
                format!("exec in container {id}"),
                "no command",
            ));
        }
        let container = self.get_container(id).await?.ok_or_else(|| {
            call_err("Containers.Get", format!("container {id}"))(tonic::Status::not_found(
                format!("container {id} does not exist"),
            ))
        })?;
        let spec: serde_json::Value = container
            .spec
            .as_ref()
            .and_then(|s| serde_json::from_slice(&s.value).ok())
            .ok_or_else(|| {
                RuntimeError::invalid(format!("container {id}"), "has no readable OCI spec")
            })?;
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(args);
        process["terminal"] = serde_json::json!(false);
        let process = serde_json::to_vec(&process)
            .map_err(|e| RuntimeError::invalid(format!("container {id}"), e.to_string()))?;

        let exec_id = format!("exec-{}", unique_suffix());
        let object = format!("exec {exec_id} in container {id}");
        let dir = std::env::temp_dir().join(format!("ironmesh-{exec_id}"));
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("create", &dir, e))?;
        let io = TaskIo::in_dir(&dir);
        let result = async {
            let (stdout, stderr) = io.prepare(&object)?;
            self.tasks()
                .exec(self.request(ExecProcessRequest {
                    container_id: id.to_string(),
                    stdin: String::new(),
                    stdout,
                    stderr,
                    terminal: false,
                    spec: Some(Any {
                        type_url: PROCESS_TYPE_URL.to_string(),
                        value: process,
                    }),
                    exec_id: exec_id.clone(),
                }))
                .await
                .map_err(call_err("Tasks.Exec", object.clone()))?;
            let started = self
                .tasks()
                .start(self.request(StartRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.clone(),
                }))
                .await
                .map_err(call_err("Tasks.Start", object.clone()));
            let exit_code = match started {
                Err(e) => Err(e),
                Ok(_) => match tokio::time::timeout(timeout, self.wait_process(id, &exec_id)).await
                {
                    Ok(exit) => exit.map(|e| Some(e.code)),
                    Err(_) => {
                        self.kill(id, &exec_id, SIGKILL, false).await?;
                        let limit = self.config().call_timeout;
                        tokio::time::timeout(limit, self.wait_process(id, &exec_id))
                            .await
                            .map_err(|_| RuntimeError::Timeout {
                                call: "Tasks.Wait after SIGKILL",
                                object: object.clone(),
                                timeout: limit,
                            })??;
                        Ok(None)
                    }
                },
            };
            let deleted = self
                .tasks()
                .delete_process(self.request(DeleteProcessRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.clone(),
                }))
                .await;
            let exit_code = exit_code?;
            if let Err(s) = deleted {
                if s.code() != Code::NotFound {
                    return Err(call_err("Tasks.DeleteProcess", object.clone())(s));
                }
            }
            Ok(ExecOutput {
                exit_code,
                stdout: read_capped(&io.stdout),
                stderr: read_capped(&io.stderr),
            })
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

fn read_capped(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut data = Vec::new();
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.take(EXEC_OUTPUT_MAX).read_to_end(&mut data);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_are_checked() {
        assert_eq!(
            log_path(Path::new("/var/log/ironmesh/web-1/stdout.log")).unwrap(),
            "/var/log/ironmesh/web-1/stdout.log"
        );
        assert!(log_path(Path::new("relative.log")).is_err());
        assert!(log_path(Path::new("/tmp/a%20b")).is_err());
        let same = TaskIo {
            stdout: "/tmp/x.log".into(),
            stderr: "/tmp/x.log".into(),
        };
        assert!(same.prepare("container x").is_err());
    }

    #[test]
    fn runc_options_encode_tags_6_and_7() {
        let encoded = prost::Message::encode_to_vec(&RuncOptions {
            binary_name: "runc".into(),
            root: "/r".into(),
        });
        // tag 6, wire type 2 = 0x32; tag 7, wire type 2 = 0x3a
        assert_eq!(
            encoded,
            [0x32, 4, b'r', b'u', b'n', b'c', 0x3a, 2, b'/', b'r']
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("web-1").is_ok());
        assert!(check_id("../x").is_err());
    }
}
