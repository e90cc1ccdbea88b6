//! The pipeline controller: runs PipelineRuns and fires Pipeline schedules.
//!
//! A run snapshots its Pipeline's spec into its status when it starts, so
//! editing the Pipeline never changes a run under way. Each step index
//! (each worker, for a worker step) runs as an Instance owned by the run
//! (`spec.task`), named `<run>-<step>-<index>-<attempt>` so that a pass
//! repeated after a controller restart finds what an earlier pass created
//! instead of starting it again; the workload controller places these
//! instances like any other, on the node of the run's volume. All state is
//! in the store (the run's status, its instances, its queues), so a
//! restarted controller carries on where the last one stopped, without
//! rerunning finished steps.
//!
//! A failed index is retried after `backoffSeconds × 2^(attempt-1)` while
//! attempts remain; then the step fails once all its indexes have ended,
//! its dependants are skipped and the run fails. Finished instances are
//! kept (their logs stay readable) until the run is deleted; deleting a run
//! deletes its instances, then its volume and queues.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironmesh_api::instance::{InstanceSpec, InstanceStatus, TaskRef};
use ironmesh_api::object::{Instance, Pipeline, PipelineRun};
use ironmesh_api::pipeline::{
    IndexStatus, PipelineRunSpec, PipelineRunStatus, PipelineSpec, RunPhase, Schedule, Step,
    StepMode, StepStatus, PIPELINE_LABEL, PIPELINE_RUN_ENV, QUEUE_SOCKET, QUEUE_SOCKET_ENV,
    RUN_LABEL, STEP_INDEX_ENV, STEP_REPLICAS_ENV, STORAGE_PATH, STORAGE_PATH_ENV,
};
use ironmesh_api::selector::LabelSelector;
use ironmesh_api::workload::{EnvVar, InstancePhase, RestartPolicy, VolumeMount, WorkloadSpec};
use ironmesh_api::Kind;
use serde_json::json;

use crate::queue::Queue;
use crate::resources::{parse_rfc3339, rfc3339, ResourceError, Resources, StoredObject};

/// Longest wait between passes when nothing changes.
const RESYNC: Duration = Duration::from_secs(1);
/// Label on the instances of a run naming the step.
pub const STEP_LABEL: &str = "ironmesh.dev/step";
/// Label on runs a schedule created.
pub const SCHEDULED_LABEL: &str = "ironmesh.dev/scheduled";
/// Finished scheduled runs kept per Pipeline; older ones are deleted.
pub const SCHEDULED_HISTORY: usize = 10;

/// Runs passes until `shutdown`.
pub async fn run(
    resources: Resources,
    metrics: std::sync::Arc<crate::metrics::ControllerMetrics>,
    shutdown: ironmesh_process::Shutdown,
) {
    let (res, metrics) = (&resources, &metrics);
    crate::pass_loop::run(res, "pipelines", RESYNC, shutdown, || async move {
        match reconcile(res, SystemTime::now()).await {
            Ok((wait, phases)) => {
                for phase in ["Pending", "Running", "Succeeded", "Failed", "Cancelled"] {
                    metrics
                        .pipeline_runs
                        .get_or_create(&crate::metrics::PhaseLabel {
                            phase: phase.to_string(),
                        })
                        .set(phases.get(phase).copied().unwrap_or(0));
                }
                wait.min(RESYNC)
            }
            Err(e) => {
                tracing::warn!(error = %e, "pipeline pass failed");
                RESYNC
            }
        }
    })
    .await;
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

struct RunView {
    name: String,
    pipeline: String,
    spec: PipelineRunSpec,
    status: PipelineRunStatus,
    scheduled: bool,
    created: String,
}

#[derive(Clone)]
struct TaskInstance {
    name: String,
    task: TaskRef,
    node: Option<String>,
    status: InstanceStatus,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A DNS label from `parts` joined by `-`; a hash keeps long ones unique.
pub fn object_name(parts: &[&str]) -> String {
    let full = parts.join("-");
    if full.len() <= 63 {
        return full;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(full.as_bytes());
    let tag = hex::encode(&digest[..4]);
    let head: String = full.chars().take(54).collect();
    format!("{}-{tag}", head.trim_end_matches('-'))
}

/// The Volume every step of `run` mounts.
pub fn volume_name(run: &str) -> String {
    object_name(&[run, "data"])
}

pub fn instance_name(run: &str, step: &str, index: u32, attempt: u32) -> String {
    object_name(&[run, step, &index.to_string(), &attempt.to_string()])
}

/// One pass: schedules, then every run, then what deleted runs left.
/// Returns when the next pass is due at the latest, and the runs by phase.
pub async fn reconcile(
    resources: &Resources,
    now: SystemTime,
) -> Result<(Duration, BTreeMap<&'static str, i64>), PipelineError> {
    let all = LabelSelector::default();
    let (pipelines, _) = resources.list(Kind::Pipeline, &all).await?;
    let (runs, _) = resources.list(Kind::PipelineRun, &all).await?;
    // Only pipeline steps; a cluster's service instances are not ours.
    let instances = resources
        .list_matching(Kind::Instance, |o| {
            o.object.pointer("/spec/task").is_some_and(|t| !t.is_null())
        })
        .await?;

    let mut wake = Duration::from_secs(3600);
    let pipelines: Vec<Pipeline> = pipelines.iter().filter_map(|p| p.typed().ok()).collect();
    let pipeline_specs: HashMap<String, PipelineSpec> = pipelines
        .iter()
        .map(|p| (p.name().to_string(), p.spec.clone()))
        .collect();
    let runs: Vec<RunView> = runs.iter().filter_map(run_view).collect();
    let mut phases: BTreeMap<&'static str, i64> = BTreeMap::new();
    for r in &runs {
        *phases.entry(r.status.phase.as_str()).or_default() += 1;
    }

    for p in &pipelines {
        if let Some(due) = fire_schedule(resources, p, &runs, now).await? {
            wake = wake.min(due);
        }
    }

    let mut by_run: HashMap<String, Vec<TaskInstance>> = HashMap::new();
    for o in &instances {
        let Ok(i) = o.typed::<Instance>() else {
            continue;
        };
        let Some(task) = i.spec.task else { continue };
        by_run
            .entry(task.run.clone())
            .or_default()
            .push(TaskInstance {
                name: o.name.clone(),
                task,
                node: i.spec.node,
                status: i.status.unwrap_or_default(),
            });
    }

    for r in &runs {
        let owned = by_run.remove(&r.name).unwrap_or_default();
        match reconcile_run(resources, r, &pipeline_specs, &owned, now).await {
            Ok(Some(due)) => wake = wake.min(due),
            Ok(None) => {}
            Err(e) => tracing::warn!(run = %r.name, error = %e, "pipeline run pass failed"),
        }
    }

    // What runs that no longer exist left behind: instances first, then
    // (once nothing mounts it) the volume, then the queues.
    for (run, left) in &by_run {
        for i in left {
            crate::workloads::delete_instance(resources, &i.name, "its pipeline run was deleted")
                .await?;
        }
        tracing::debug!(run = %run, instances = left.len(), "removed instances of a deleted run");
    }
    let (volumes, _) = resources.list(Kind::Volume, &all).await?;
    for v in &volumes {
        let labels = crate::resources::labels_of(&v.object);
        let Some(run) = labels.get(RUN_LABEL) else {
            continue;
        };
        if runs.iter().any(|r| &r.name == run) || by_run.contains_key(run) {
            continue;
        }
        // Every run has a volume from its first pass on, and queues only
        // after that: the volume's turn is the queues' turn too (no scan of
        // every queue key on every pass).
        let n = crate::queue::delete_run(resources.store(), run).await?;
        if n > 0 {
            tracing::info!(run = %run, keys = n, "run queues removed");
        }
        match resources.delete(Kind::Volume, &v.name).await {
            Ok(_) | Err(ResourceError::NotFound { .. }) => {
                tracing::info!(volume = %v.name, run = %run, "run volume removed")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((wake, phases))
}

fn run_view(o: &StoredObject) -> Option<RunView> {
    let run: PipelineRun = o.typed().ok()?;
    Some(RunView {
        name: o.name.clone(),
        pipeline: run.spec.pipeline.clone(),
        scheduled: run.metadata.labels.get(SCHEDULED_LABEL).map(String::as_str) == Some("true"),
        spec: run.spec,
        status: run.status.unwrap_or_default(),
        created: run.metadata.creation_timestamp.unwrap_or_default(),
    })
}

/// Creates the run a Pipeline's schedule owes (at most one per pass: missed
/// firings while no controller led are not made up), prunes old scheduled
/// runs, and says when the next firing is due.
async fn fire_schedule(
    resources: &Resources,
    p: &Pipeline,
    runs: &[RunView],
    now: SystemTime,
) -> Result<Option<Duration>, PipelineError> {
    let Some(expr) = p.spec.schedule.as_deref() else {
        return Ok(None);
    };
    let name = p.name();
    let schedule = match Schedule::parse(expr) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(pipeline = %name, error = %e, "unusable schedule");
            return Ok(None);
        }
    };
    let since = p
        .status
        .as_ref()
        .and_then(|s| s.last_schedule_time.as_deref())
        .or(p.metadata.creation_timestamp.as_deref())
        .and_then(parse_rfc3339)
        .map(unix)
        .unwrap_or_else(|| unix(now));
    let now_s = unix(now);
    let Some(mut due) = schedule.next_after(since) else {
        return Ok(None);
    };
    if due > now_s {
        return Ok(Some(Duration::from_secs(due - now_s)));
    }
    // The latest firing not after now.
    while let Some(n) = schedule.next_after(due).filter(|n| *n <= now_s) {
        due = n;
    }
    let pipeline = name;
    let name = object_name(&[pipeline, &due.to_string()]);
    let mut object = PipelineRun::new(
        Kind::PipelineRun,
        name.clone(),
        PipelineRunSpec {
            pipeline: pipeline.to_string(),
            parameters: BTreeMap::new(),
            cancel: false,
        },
    );
    object.metadata.labels = BTreeMap::from([
        (PIPELINE_LABEL.to_string(), pipeline.to_string()),
        (SCHEDULED_LABEL.to_string(), "true".to_string()),
    ]);
    resources
        .update_typed(Kind::PipelineRun, &name, |cur: Option<PipelineRun>| {
            cur.is_none().then(|| object.clone())
        })
        .await?;
    let fired = rfc3339(UNIX_EPOCH + Duration::from_secs(due));
    resources
        .update_typed(Kind::Pipeline, pipeline, |cur: Option<Pipeline>| {
            let mut o = cur?;
            let status = o.status_mut();
            status.last_schedule_time = Some(fired.clone());
            status.last_run = Some(name.clone());
            Some(o)
        })
        .await?;
    tracing::info!(pipeline = %pipeline, run = %name, "schedule fired");

    let mut finished: Vec<&RunView> = runs
        .iter()
        .filter(|r| r.scheduled && r.pipeline == pipeline && r.status.phase.is_finished())
        .collect();
    if finished.len() > SCHEDULED_HISTORY {
        finished.sort_by(|a, b| a.created.cmp(&b.created));
        for r in &finished[..finished.len() - SCHEDULED_HISTORY] {
            match resources.delete(Kind::PipelineRun, &r.name).await {
                Ok(_) | Err(ResourceError::NotFound { .. }) => {
                    tracing::info!(run = %r.name, "old scheduled run removed")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(schedule
        .next_after(due)
        .map(|n| Duration::from_secs(n.saturating_sub(now_s))))
}

/// Advances one run; returns when it next needs a pass (a retry back-off
/// or a timeout coming due).
async fn reconcile_run(
    resources: &Resources,
    r: &RunView,
    pipelines: &HashMap<String, PipelineSpec>,
    owned: &[TaskInstance],
    now: SystemTime,
) -> Result<Option<Duration>, PipelineError> {
    if r.status.phase.is_finished() {
        return Ok(None);
    }
    let mut st = r.status.clone();
    let mut wake: Option<Duration> = None;
    let mut soon = |d: Duration| wake = Some(wake.map_or(d, |w: Duration| w.min(d)));

    let Some(spec) = st.pipeline_spec.clone().or_else(|| {
        let p = pipelines.get(&r.pipeline)?.clone();
        st.pipeline_spec = Some(p.clone());
        st.phase = RunPhase::Running;
        st.start_time = Some(rfc3339(now));
        st.steps = p
            .steps
            .iter()
            .map(|s| StepStatus {
                name: s.name.clone(),
                ..StepStatus::default()
            })
            .collect();
        Some(p)
    }) else {
        st.phase = RunPhase::Failed;
        st.message = format!("pipeline {:?} does not exist", r.pipeline);
        st.completion_time = Some(rfc3339(now));
        write_status(resources, &r.name, &st).await?;
        return Ok(None);
    };
    ensure_volume(resources, r, &spec).await?;

    if r.spec.cancel {
        for i in owned {
            if !matches!(
                i.status.phase,
                InstancePhase::Succeeded | InstancePhase::Failed
            ) {
                crate::workloads::delete_instance(resources, &i.name, "its run was cancelled")
                    .await?;
            }
        }
        for ss in &mut st.steps {
            if ss.phase.is_finished() {
                continue;
            }
            ss.phase = RunPhase::Cancelled;
            for ix in &mut ss.indexes {
                if !ix.phase.is_finished() {
                    ix.phase = RunPhase::Cancelled;
                }
            }
        }
        st.phase = RunPhase::Cancelled;
        st.message = "cancelled".to_string();
        st.completion_time = Some(rfc3339(now));
        write_status(resources, &r.name, &st).await?;
        tracing::info!(run = %r.name, "run cancelled");
        return Ok(None);
    }

    let order: Vec<String> = spec
        .topological_order()
        .unwrap_or_default()
        .into_iter()
        .map(str::to_string)
        .collect();
    for name in &order {
        let Some(step) = spec.steps.iter().find(|s| &s.name == name) else {
            continue;
        };
        let phases: BTreeMap<String, RunPhase> =
            st.steps.iter().map(|s| (s.name.clone(), s.phase)).collect();
        let Some(ss) = st.steps.iter_mut().find(|s| &s.name == name) else {
            continue;
        };
        if ss.phase.is_finished() {
            continue;
        }
        if ss.phase == RunPhase::Pending {
            if let Some((dep, phase)) = step
                .depends_on
                .iter()
                .filter_map(|d| Some((d, *phases.get(d)?)))
                .find(|(_, p)| {
                    matches!(
                        p,
                        RunPhase::Failed | RunPhase::Skipped | RunPhase::Cancelled
                    )
                })
            {
                ss.phase = RunPhase::Skipped;
                ss.message = format!("step {dep} {}", phase.as_str().to_lowercase());
                continue;
            }
            if !step
                .depends_on
                .iter()
                .all(|d| phases.get(d) == Some(&RunPhase::Succeeded))
            {
                continue;
            }
            if step.mode == StepMode::Worker {
                Queue::new(resources.store().clone(), &r.name, &step.name)
                    .seed(&step.items)
                    .await?;
            }
            ss.phase = RunPhase::Running;
            ss.start_time = Some(rfc3339(now));
            let replicas = u32::try_from(step.replicas).unwrap_or(1);
            ss.indexes = (0..replicas)
                .map(|index| IndexStatus {
                    index,
                    attempt: 1,
                    ..IndexStatus::default()
                })
                .collect();
            tracing::info!(run = %r.name, step = %step.name, replicas, "step started");
        }
        let queue = (step.mode == StepMode::Worker)
            .then(|| Queue::new(resources.store().clone(), &r.name, &step.name));
        for ix in &mut ss.indexes {
            if ix.phase.is_finished() {
                continue;
            }
            let current = owned.iter().find(|i| {
                i.task.step == step.name && i.task.index == ix.index && i.task.attempt == ix.attempt
            });
            let mut failed = false;
            match current {
                None if ix.failed_at.is_none() => {
                    ix.instance = create_instance(resources, r, &spec, step, ix).await?;
                    ix.phase = RunPhase::Pending;
                }
                None => failed = true,
                Some(i) => {
                    ix.instance = i.name.clone();
                    ix.node = i.node.clone();
                    match i.status.phase {
                        InstancePhase::Succeeded => {
                            ix.phase = RunPhase::Succeeded;
                            ix.exit_code = Some(0);
                            ix.reason.clear();
                            ix.message.clear();
                        }
                        InstancePhase::Failed => {
                            ix.exit_code = i.status.exit_code;
                            ix.reason = i.status.reason.clone();
                            ix.message = i.status.message.clone();
                            if let Some(q) = &queue {
                                q.release_all_of(&[i.name.as_str()]).await?;
                            }
                            failed = true;
                        }
                        phase => {
                            ix.phase = if phase == InstancePhase::Running {
                                RunPhase::Running
                            } else {
                                RunPhase::Pending
                            };
                            ix.reason = i.status.reason.clone();
                            ix.message = i.status.message.clone();
                            let started = i.status.started_at.as_deref().and_then(parse_rfc3339);
                            if let (Some(limit), Some(started)) = (step.timeout_seconds, started) {
                                let limit = Duration::from_secs(limit.into());
                                let ran = now.duration_since(started).unwrap_or_default();
                                if ran >= limit {
                                    crate::workloads::delete_instance(
                                        resources,
                                        &i.name,
                                        "it ran past its timeout",
                                    )
                                    .await?;
                                    if let Some(q) = &queue {
                                        q.release_all_of(&[i.name.as_str()]).await?;
                                    }
                                    ix.exit_code = None;
                                    ix.reason = "DeadlineExceeded".to_string();
                                    ix.message = format!(
                                        "killed after {}s (timeoutSeconds)",
                                        limit.as_secs()
                                    );
                                    failed = true;
                                } else {
                                    soon(limit - ran);
                                }
                            }
                        }
                    }
                }
            }
            if !failed {
                continue;
            }
            let failed_at = ix
                .failed_at
                .as_deref()
                .and_then(parse_rfc3339)
                .unwrap_or(now);
            ix.failed_at = Some(rfc3339(failed_at));
            if ix.attempt > step.retries {
                ix.phase = RunPhase::Failed;
                continue;
            }
            let backoff = Duration::from_secs(u64::from(step.backoff_seconds))
                .saturating_mul(1 << (ix.attempt - 1).min(16));
            let due = failed_at + backoff;
            if now < due {
                ix.phase = RunPhase::Running;
                soon(due.duration_since(now).unwrap_or_default());
                continue;
            }
            ix.attempt += 1;
            ix.failed_at = None;
            ix.exit_code = None;
            tracing::info!(run = %r.name, step = %step.name, index = ix.index, attempt = ix.attempt, "retrying");
            ix.instance = create_instance(resources, r, &spec, step, ix).await?;
            ix.phase = RunPhase::Pending;
        }
        ss.succeeded = count(ss, RunPhase::Succeeded);
        ss.failed = count(ss, RunPhase::Failed);
        ss.attempts = ss.indexes.iter().map(|i| i.attempt).sum();
        if let Some(q) = &queue {
            ss.queue = Some(q.status().await?);
        }
        if ss.phase == RunPhase::Running
            && ss.indexes.iter().any(|i| {
                matches!(i.phase, RunPhase::Running) && i.failed_at.is_none()
                    || i.phase == RunPhase::Pending
            })
        {
            ss.message.clear();
        }
        if ss.indexes.iter().all(|i| i.phase.is_finished()) {
            ss.completion_time = Some(rfc3339(now));
            let left = ss.queue.map(|q| q.pending + q.leased).unwrap_or(0);
            if let Some(bad) = ss.indexes.iter().find(|i| i.phase == RunPhase::Failed) {
                ss.phase = RunPhase::Failed;
                ss.message = format!(
                    "index {} failed after {} attempt{}: {}",
                    bad.index,
                    bad.attempt,
                    if bad.attempt == 1 { "" } else { "s" },
                    match (bad.exit_code, bad.reason.as_str()) {
                        (Some(c), _) => format!("exit code {c}"),
                        (None, "") => "no exit code".to_string(),
                        (None, r) => r.to_string(),
                    }
                );
            } else if left > 0 {
                ss.phase = RunPhase::Failed;
                ss.message = format!("every worker exited but {left} items are not done");
            } else {
                ss.phase = RunPhase::Succeeded;
                ss.message.clear();
            }
            tracing::info!(run = %r.name, step = %step.name, phase = ss.phase.as_str(), "step finished");
        }
    }

    if st.steps.iter().all(|s| s.phase.is_finished()) {
        let failed: Vec<&str> = st
            .steps
            .iter()
            .filter(|s| s.phase == RunPhase::Failed)
            .map(|s| s.name.as_str())
            .collect();
        st.completion_time = Some(rfc3339(now));
        if failed.is_empty() {
            st.phase = RunPhase::Succeeded;
            st.message.clear();
        } else {
            st.phase = RunPhase::Failed;
            st.message = format!("step {} failed", failed.join(", "));
        }
        tracing::info!(run = %r.name, phase = st.phase.as_str(), "run finished");
    }
    if st != r.status {
        write_status(resources, &r.name, &st).await?;
    }
    Ok(wake)
}

fn count(ss: &StepStatus, phase: RunPhase) -> u32 {
    ss.indexes.iter().filter(|i| i.phase == phase).count() as u32
}

async fn ensure_volume(
    resources: &Resources,
    r: &RunView,
    spec: &PipelineSpec,
) -> Result<(), PipelineError> {
    let name = volume_name(&r.name);
    let object = json!({
        "apiVersion": ironmesh_api::API_VERSION,
        "kind": "Volume",
        "metadata": {"name": name, "labels": {RUN_LABEL: r.name, PIPELINE_LABEL: r.pipeline}},
        "spec": {"size": spec.run_volume_size},
    });
    let created = resources
        .update(Kind::Volume, &name, |cur| {
            cur.is_none().then(|| object.clone())
        })
        .await?;
    if created.is_some() {
        tracing::info!(run = %r.name, volume = %name, size = %spec.run_volume_size, "run volume created");
    }
    Ok(())
}

/// The container of one attempt of one step index.
pub fn step_template(
    run: &str,
    params: &BTreeMap<String, String>,
    step: &Step,
    index: u32,
) -> WorkloadSpec {
    let mut env: Vec<EnvVar> = params
        .iter()
        .map(|(k, v)| EnvVar {
            name: k.clone(),
            value: v.clone(),
        })
        .filter(|p| !step.env.iter().any(|e| e.name == p.name))
        .collect();
    env.extend(step.env.iter().cloned());
    for (k, v) in [
        (STEP_INDEX_ENV, index.to_string()),
        (STEP_REPLICAS_ENV, step.replicas.to_string()),
        (STORAGE_PATH_ENV, STORAGE_PATH.to_string()),
        (PIPELINE_RUN_ENV, run.to_string()),
        (QUEUE_SOCKET_ENV, QUEUE_SOCKET.to_string()),
    ] {
        env.push(EnvVar {
            name: k.to_string(),
            value: v,
        });
    }
    WorkloadSpec {
        image: step.image.clone(),
        command: step.command.clone(),
        args: step.args.clone(),
        env,
        working_dir: None,
        replicas: 1,
        resources: step.resources.clone(),
        ports: Vec::new(),
        liveness_probe: None,
        readiness_probe: None,
        restart_policy: RestartPolicy::Never,
        volumes: vec![VolumeMount {
            name: "run".to_string(),
            volume: volume_name(run),
            mount_path: STORAGE_PATH.to_string(),
            read_only: false,
        }],
        read_only_root_filesystem: false,
        capabilities: None,
        // Steps run in the default sandbox (seccomp, pids limit).
        security_context: None,
        placement: None,
        mesh: None,
    }
}

async fn create_instance(
    resources: &Resources,
    r: &RunView,
    spec: &PipelineSpec,
    step: &Step,
    ix: &IndexStatus,
) -> Result<String, PipelineError> {
    let _ = spec;
    let name = instance_name(&r.name, &step.name, ix.index, ix.attempt);
    let instance = InstanceSpec {
        workload: r.name.clone(),
        workload_generation: 1,
        node: None,
        template: step_template(&r.name, &r.spec.parameters, step, ix.index),
        identity: None,
        task: Some(TaskRef {
            run: r.name.clone(),
            step: step.name.clone(),
            index: ix.index,
            attempt: ix.attempt,
            worker: step.mode == StepMode::Worker,
        }),
    };
    let mut object = Instance::new(Kind::Instance, name.clone(), instance);
    object.metadata.labels = BTreeMap::from([
        (RUN_LABEL.to_string(), r.name.clone()),
        (PIPELINE_LABEL.to_string(), r.pipeline.clone()),
        (STEP_LABEL.to_string(), step.name.clone()),
    ]);
    object.status = Some(InstanceStatus {
        phase: InstancePhase::Pending,
        reason: "Scheduling".into(),
        ..Default::default()
    });
    let created = resources
        .update_typed(Kind::Instance, &name, |cur: Option<Instance>| {
            cur.is_none().then(|| object.clone())
        })
        .await?;
    if created.is_some() {
        tracing::info!(run = %r.name, step = %step.name, index = ix.index, attempt = ix.attempt, instance = %name, "step instance created");
    }
    Ok(name)
}

async fn write_status(
    resources: &Resources,
    run: &str,
    st: &PipelineRunStatus,
) -> Result<(), PipelineError> {
    resources
        .update_typed(Kind::PipelineRun, run, |cur: Option<PipelineRun>| {
            let mut o = cur?;
            o.status = Some(st.clone());
            Some(o)
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn names_are_dns_labels_and_stay_unique_when_long() {
        assert_eq!(instance_name("etl-x1", "split", 3, 1), "etl-x1-split-3-1");
        let long = "r".repeat(60);
        let a = instance_name(&long, "step", 0, 1);
        let b = instance_name(&long, "step", 1, 1);
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(ironmesh_api::meta::dns_label_problem(&a).is_none(), "{a}");
        assert!(volume_name(&long).len() <= 63);
    }

    #[test]
    fn step_containers_get_the_system_env_and_the_run_volume() {
        let step: Step = serde_json::from_value(json!({
            "name": "work", "image": "ironmesh/batch-step:1", "replicas": 4,
            "env": [{"name": "MODE", "value": "step"}],
        }))
        .unwrap();
        let params = BTreeMap::from([("DAY".to_string(), "2026-11-23".to_string())]);
        let t = step_template("etl-1", &params, &step, 2);
        let env: BTreeMap<&str, &str> = t
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(env["STEP_INDEX"], "2");
        assert_eq!(env["STEP_REPLICAS"], "4");
        assert_eq!(env["STORAGE_PATH"], STORAGE_PATH);
        assert_eq!(env["DAY"], "2026-11-23");
        assert_eq!(env["MODE"], "step");
        assert_eq!(t.restart_policy, RestartPolicy::Never);
        assert_eq!(t.volumes[0].volume, "etl-1-data");
        assert_eq!(t.volumes[0].mount_path, STORAGE_PATH);
    }

    /// The run state machine against a real store with a controlled clock;
    /// the agent's part (instance phases) is written by hand.
    mod passes {
        use super::*;
        use crate::store::embedded::EmbeddedStore;

        struct Env {
            _dir: tempfile::TempDir,
            res: Resources,
            t0: SystemTime,
        }

        fn env() -> Env {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
            Env {
                _dir: dir,
                res: Resources::new(std::sync::Arc::new(store)),
                t0: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            }
        }

        impl Env {
            async fn put(&self, kind: Kind, v: Value) {
                let name = v["metadata"]["name"].as_str().unwrap().to_string();
                self.res
                    .update(kind, &name, |_| Some(v.clone()))
                    .await
                    .unwrap();
            }

            async fn pass(&self, secs: u64) {
                reconcile(&self.res, self.t0 + Duration::from_secs(secs))
                    .await
                    .unwrap();
            }

            async fn run(&self) -> PipelineRunStatus {
                let o = self.res.get(Kind::PipelineRun, "r").await.unwrap().unwrap();
                serde_json::from_value(o.object["status"].clone()).unwrap()
            }

            async fn instances(&self) -> Vec<String> {
                let (l, _) = self
                    .res
                    .list(Kind::Instance, &LabelSelector::default())
                    .await
                    .unwrap();
                l.into_iter().map(|o| o.name).collect()
            }

            /// What an agent would report.
            async fn finish(&self, instance: &str, exit: i32) {
                self.res
                    .update(Kind::Instance, instance, |cur| {
                        let mut o = cur?.clone();
                        o["spec"]["node"] = json!("n1");
                        o["status"] = json!({
                            "phase": if exit == 0 { "Succeeded" } else { "Failed" },
                            "exitCode": exit,
                        });
                        Some(o)
                    })
                    .await
                    .unwrap();
            }
        }

        fn step_of<'a>(st: &'a PipelineRunStatus, name: &str) -> &'a StepStatus {
            st.steps.iter().find(|s| s.name == name).unwrap()
        }

        #[tokio::test]
        async fn a_diamond_runs_in_order_retries_with_backoff_and_skips_after_failure() {
            let e = env();
            e.put(
                Kind::Pipeline,
                json!({"apiVersion": "ironmesh.dev/v1", "kind": "Pipeline",
                "metadata": {"name": "p"},
                "spec": {"runVolumeSize": "1Gi", "steps": [
                    {"name": "a", "image": "x:1"},
                    {"name": "b", "image": "x:1", "replicas": 2, "dependsOn": ["a"],
                     "retries": 1, "backoffSeconds": 10},
                    {"name": "c", "image": "x:1", "dependsOn": ["a"]},
                    {"name": "d", "image": "x:1", "dependsOn": ["b", "c"]},
                ]}}),
            )
            .await;
            e.put(
                Kind::PipelineRun,
                json!({"apiVersion": "ironmesh.dev/v1", "kind": "PipelineRun",
                    "metadata": {"name": "r"}, "spec": {"pipeline": "p"}}),
            )
            .await;

            e.pass(0).await;
            assert_eq!(e.instances().await, ["r-a-0-1"]);
            let st = e.run().await;
            assert_eq!(st.phase, RunPhase::Running);
            assert!(st.pipeline_spec.is_some(), "the run keeps its own copy");
            assert!(e.res.get(Kind::Volume, "r-data").await.unwrap().is_some());

            // a done: b (two indexes) and c start, d waits.
            e.finish("r-a-0-1", 0).await;
            e.pass(1).await;
            let mut names = e.instances().await;
            names.sort();
            assert_eq!(names, ["r-a-0-1", "r-b-0-1", "r-b-1-1", "r-c-0-1"]);

            // b[1] fails: retried only after its back-off.
            e.finish("r-b-0-1", 0).await;
            e.finish("r-b-1-1", 3).await;
            e.finish("r-c-0-1", 0).await;
            e.pass(2).await;
            e.pass(11).await;
            assert!(!e.instances().await.contains(&"r-b-1-2".to_string()));
            e.pass(13).await;
            assert!(e.instances().await.contains(&"r-b-1-2".to_string()));
            assert_eq!(step_of(&e.run().await, "b").attempts, 3);

            // The retry fails too: b fails, d is skipped, the run fails.
            e.finish("r-b-1-2", 4).await;
            e.pass(14).await;
            let st = e.run().await;
            let b = step_of(&st, "b");
            assert_eq!(b.phase, RunPhase::Failed);
            assert_eq!(b.indexes[1].exit_code, Some(4));
            assert!(
                b.message
                    .contains("index 1 failed after 2 attempts: exit code 4"),
                "{}",
                b.message
            );
            assert_eq!(step_of(&st, "c").phase, RunPhase::Succeeded);
            assert_eq!(step_of(&st, "d").phase, RunPhase::Skipped);
            assert_eq!(st.phase, RunPhase::Failed);
            assert_eq!(st.message, "step b failed");

            // A finished run is left alone; deleting it removes the rest,
            // queues included.
            Queue::new(e.res.store().clone(), "r", "b")
                .push(&["left".to_string()])
                .await
                .unwrap();
            e.res.delete(Kind::PipelineRun, "r").await.unwrap();
            e.pass(20).await;
            assert!(e.instances().await.is_empty());
            e.pass(21).await;
            assert!(e.res.get(Kind::Volume, "r-data").await.unwrap().is_none());
            let (left, _) = e.res.store().list("/queues/r/").await.unwrap();
            assert!(left.is_empty(), "queue keys left: {}", left.len());
        }

        #[tokio::test]
        async fn a_schedule_fires_once_per_due_time_and_survives_a_restart() {
            let e = env();
            e.put(
                Kind::Pipeline,
                json!({"apiVersion": "ironmesh.dev/v1", "kind": "Pipeline",
                    "metadata": {"name": "p"},
                    "spec": {"schedule": "@every 60s", "runVolumeSize": "1Gi",
                        "steps": [{"name": "a", "image": "x:1"}]},
                    "status": {"lastScheduleTime": "2027-01-15T08:00:00Z"}}),
            )
            .await;
            let runs = |e: &Env| {
                let res = e.res.clone();
                async move {
                    let (l, _) = res
                        .list(Kind::PipelineRun, &LabelSelector::default())
                        .await
                        .unwrap();
                    l.len()
                }
            };
            // t0 is 2027-01-15T08:00:00Z.
            e.pass(30).await;
            assert_eq!(runs(&e).await, 0);
            e.pass(60).await;
            e.pass(61).await; // the same firing again (e.g. a new leader): no second run
            assert_eq!(runs(&e).await, 1);
            // Ten minutes without a controller: one run, not ten.
            e.pass(700).await;
            assert_eq!(runs(&e).await, 2);
        }
    }
}
