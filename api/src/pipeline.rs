//! Pipeline: a DAG of steps, each running N indexed replicas (the index in
//! `STEP_INDEX`) that share the run's volume (mounted at `STORAGE_PATH`),
//! optionally started on a cron schedule; and PipelineRun, one execution of
//! a Pipeline.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::validate::{checks, Errors, Spec};
use crate::workload::{check_container, Container, EnvVar, Resources};

/// Environment variable holding a step replica's index (0-based).
pub const STEP_INDEX_ENV: &str = "STEP_INDEX";
/// Environment variable holding the step's replica count.
pub const STEP_REPLICAS_ENV: &str = "STEP_REPLICAS";
/// Environment variable holding the mount path of the run volume.
pub const STORAGE_PATH_ENV: &str = "STORAGE_PATH";
/// Environment variable holding the PipelineRun's name.
pub const PIPELINE_RUN_ENV: &str = "PIPELINE_RUN";
/// Environment variable holding the path of the work-queue socket (every
/// step gets one: workers lease from it, any step may push to a worker
/// step's queue).
pub const QUEUE_SOCKET_ENV: &str = "IRONMESH_QUEUE";
/// Where the run volume is mounted in every step container.
pub const STORAGE_PATH: &str = "/ironmesh/run";
/// Directory holding the work-queue socket in every step container.
pub const QUEUE_DIR: &str = "/run/ironmesh";
/// The socket's path inside step containers.
pub const QUEUE_SOCKET: &str = "/run/ironmesh/queue.sock";
/// Label on runs (and their volumes) naming the Pipeline.
pub const PIPELINE_LABEL: &str = "ironmesh.dev/pipeline";
/// Label on the instances and volume of a run naming the PipelineRun.
pub const RUN_LABEL: &str = "ironmesh.dev/pipelinerun";
/// Most items a worker step may list inline.
pub const MAX_INLINE_ITEMS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    /// At least one; names unique; `dependsOn` acyclic.
    pub steps: Vec<Step>,
    /// Cron expression, 5 fields: minute hour day-of-month month
    /// day-of-week (`*`, `*/n`, `a-b`, `a-b/n`, lists, month and weekday
    /// names), or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    /// Each firing creates a PipelineRun.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Size of the volume each run's steps share; default `1Gi`.
    #[serde(default = "one_gi")]
    pub run_volume_size: Quantity,
}

fn one_gi() -> Quantity {
    "1Gi".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// A DNS label, unique in the pipeline.
    pub name: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// `STEP_INDEX` and `STORAGE_PATH` are set by the system.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub resources: Resources,
    /// Indexed replicas, 1 to 1000; default 1.
    #[serde(default = "one")]
    pub replicas: i64,
    /// Steps that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Retries of a failed replica, at most 100; default 0.
    #[serde(default)]
    pub retries: u32,
    /// Wait before a retry, doubling each time; default 10.
    #[serde(default = "ten")]
    pub backoff_seconds: u32,
    /// Kill a replica running longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    #[serde(default)]
    pub mode: StepMode,
    /// Worker steps only: items queued when the step starts (earlier steps
    /// may push more through the queue socket).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<String>,
    /// Worker steps: how long a leased item is held before another worker
    /// may take it (a worker that died mid-item does not keep it); default
    /// 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u32>,
}

/// How long workers hold leased items when `leaseSeconds` is not given.
pub const DEFAULT_LEASE_SECONDS: u32 = 60;

fn one() -> i64 {
    1
}
fn ten() -> u32 {
    10
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepMode {
    /// One container per index; the step is done when all exit 0.
    #[default]
    Batch,
    /// `replicas` long-lived workers lease items from the step's queue
    /// until it is empty, then exit; the step is done when the queue is
    /// drained and every worker exited 0.
    Worker,
}

const RESERVED_ENV: [&str; 5] = [
    STEP_INDEX_ENV,
    STEP_REPLICAS_ENV,
    STORAGE_PATH_ENV,
    PIPELINE_RUN_ENV,
    QUEUE_SOCKET_ENV,
];

impl Spec for PipelineSpec {
    fn check(&self, errs: &mut Errors) {
        if self.steps.is_empty() {
            errs.add("spec.steps", "must have at least one step");
        }
        let names: BTreeSet<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
        let mut seen = BTreeSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = format!("spec.steps[{i}]");
            checks::dns_label(errs, &format!("{at}.name"), &s.name);
            if !seen.insert(&s.name) {
                errs.add(
                    format!("{at}.name"),
                    format!("step {:?} is defined twice", s.name),
                );
            }
            check_container(
                errs,
                &at,
                Container {
                    image: &s.image,
                    command: &s.command,
                    args: &s.args,
                    env: &s.env,
                    resources: &s.resources,
                },
            );
            for (j, e) in s.env.iter().enumerate() {
                if RESERVED_ENV.contains(&e.name.as_str()) {
                    errs.add(
                        format!("{at}.env[{j}].name"),
                        format!("{:?} is set by the system and cannot be overridden", e.name),
                    );
                }
            }
            if !(1..=1000).contains(&s.replicas) {
                errs.add(
                    format!("{at}.replicas"),
                    format!("must be between 1 and 1000, got {}", s.replicas),
                );
            }
            if !s.items.is_empty() && s.mode != StepMode::Worker {
                errs.add(
                    format!("{at}.items"),
                    "only worker steps take items (set mode: worker)",
                );
            }
            if s.items.len() > MAX_INLINE_ITEMS {
                errs.add(
                    format!("{at}.items"),
                    format!(
                        "at most {MAX_INLINE_ITEMS} inline items, got {}",
                        s.items.len()
                    ),
                );
            }
            if let Some(j) = s.items.iter().position(|i| i.is_empty() || i.len() > 4096) {
                errs.add(
                    format!("{at}.items[{j}]"),
                    "an item must be 1 to 4096 bytes",
                );
            }
            if s.lease_seconds.is_some() && s.mode != StepMode::Worker {
                errs.add(
                    format!("{at}.leaseSeconds"),
                    "only worker steps lease items (set mode: worker)",
                );
            }
            if s.lease_seconds == Some(0) {
                errs.add(format!("{at}.leaseSeconds"), "must be at least 1, got 0");
            }
            if s.retries > 100 {
                errs.add(
                    format!("{at}.retries"),
                    format!("must be at most 100, got {}", s.retries),
                );
            }
            if s.timeout_seconds == Some(0) {
                errs.add(
                    format!("{at}.timeoutSeconds"),
                    "must be greater than zero, got 0 (leave it out for no timeout)",
                );
            }
            let mut deps = BTreeSet::new();
            for (j, d) in s.depends_on.iter().enumerate() {
                let p = format!("{at}.dependsOn[{j}]");
                if d == &s.name {
                    errs.add(p, format!("step {d:?} cannot depend on itself"));
                } else if !names.contains(d.as_str()) {
                    errs.add(
                        p,
                        format!(
                            "no step named {d:?}; steps are {}",
                            names.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    );
                } else if !deps.insert(d) {
                    errs.add(p, format!("{d:?} is listed twice"));
                }
            }
        }
        // Only a graph whose edges all resolve can be searched for cycles.
        if errs.is_empty() {
            if let Some(cycle) = find_cycle(&self.steps) {
                errs.add(
                    "spec.steps",
                    format!("dependency cycle {}", cycle.join(" -> ")),
                );
            }
        }
        if let Some(c) = &self.schedule {
            if let Err(e) = check_cron(c) {
                errs.add("spec.schedule", e);
            }
        }
        checks::positive_bytes(errs, "spec.runVolumeSize", &self.run_volume_size);
    }
}

impl PipelineSpec {
    /// Step names in an order where every step comes after the steps it
    /// depends on (ties in declaration order). `None` if there is a cycle.
    pub fn topological_order(&self) -> Option<Vec<&str>> {
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut order = Vec::with_capacity(self.steps.len());
        while order.len() < self.steps.len() {
            let next = self.steps.iter().find(|s| {
                !done.contains(s.name.as_str())
                    && s.depends_on.iter().all(|d| done.contains(d.as_str()))
            })?;
            done.insert(&next.name);
            order.push(next.name.as_str());
        }
        Some(order)
    }
}

/// A cycle in the dependsOn graph, as step names ending where it started
/// (`a -> b -> a`: a depends on b, which depends on a). Iterative, so deep
/// graphs cannot overflow the stack.
fn find_cycle(steps: &[Step]) -> Option<Vec<String>> {
    let deps: BTreeMap<&str, &[String]> = steps
        .iter()
        .map(|s| (s.name.as_str(), s.depends_on.as_slice()))
        .collect();
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        OnStack,
        Done,
    }
    let mut state: BTreeMap<&str, State> = BTreeMap::new();
    for s in steps {
        if state.contains_key(s.name.as_str()) {
            continue;
        }
        // (step, index of the next dependency to visit)
        let mut stack: Vec<(&str, usize)> = vec![(s.name.as_str(), 0)];
        state.insert(s.name.as_str(), State::OnStack);
        while let Some((node, i)) = stack.last().copied() {
            let node_deps = deps.get(node).copied().unwrap_or_default();
            match node_deps.get(i) {
                None => {
                    state.insert(node, State::Done);
                    stack.pop();
                }
                Some(d) => {
                    if let Some(top) = stack.last_mut() {
                        top.1 += 1;
                    }
                    let d = d.as_str();
                    match state.get(d) {
                        Some(State::Done) => {}
                        Some(State::OnStack) => {
                            let start = stack.iter().position(|(n, _)| *n == d).unwrap_or(0);
                            let mut cycle: Vec<String> =
                                stack[start..].iter().map(|(n, _)| n.to_string()).collect();
                            cycle.push(d.to_string());
                            return Some(cycle);
                        }
                        None => {
                            state.insert(d, State::OnStack);
                            stack.push((d, 0));
                        }
                    }
                }
            }
        }
    }
    None
}

/// Checks a cron expression: 5 fields (minute hour day-of-month month
/// day-of-week), each `*`, `*/n`, `a`, `a-b`, `a-b/n`, `a/n`, or a comma
/// list of those; months and weekdays also by name (`JAN`, `MON`); or one
/// of `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`,
/// `@hourly`. The error names the bad field.
pub fn check_cron(expr: &str) -> Result<(), String> {
    const MONTHS: [&str; 12] = [
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ];
    const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    const FIELDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day-of-month", 1, 31),
        ("month", 1, 12),
        ("day-of-week", 0, 7),
    ];
    let expr = expr.trim();
    if let Some(d) = expr.strip_prefix("@every ") {
        return every(d).map(|_| ());
    }
    if let Some(m) = expr.strip_prefix('@') {
        return match m {
            "yearly" | "annually" | "monthly" | "weekly" | "daily" | "midnight" | "hourly" => Ok(()),
            _ => Err(format!(
                "{expr:?} is not a known macro; expected @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or @every <duration>"
            )),
        };
    }
    let parts: Vec<&str> = expr.split_whitespace().collect();
    if parts.len() != 5 {
        return Err(format!(
            "{expr:?} must have 5 fields (minute hour day-of-month month day-of-week), got {}",
            parts.len()
        ));
    }
    for (fi, (part, (name, lo, hi))) in parts.iter().zip(FIELDS).enumerate() {
        let bad = |what: String| format!("{name} field {part:?}: {what}");
        let num = |v: &str| -> Result<u32, String> {
            let by_name = match fi {
                3 => MONTHS
                    .iter()
                    .position(|m| m.eq_ignore_ascii_case(v))
                    .map(|i| i as u32 + 1),
                4 => DAYS
                    .iter()
                    .position(|d| d.eq_ignore_ascii_case(v))
                    .map(|i| i as u32),
                _ => None,
            };
            by_name
                .or_else(|| v.parse::<u32>().ok())
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| bad(format!("{v:?} must be a number from {lo} to {hi}")))
        };
        for item in part.split(',') {
            if item.is_empty() {
                return Err(bad("empty list item".into()));
            }
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            if let Some(s) = step {
                if !s.parse::<u32>().is_ok_and(|s| s >= 1) {
                    return Err(bad(format!("step {s:?} must be a positive number")));
                }
            }
            if range == "*" {
                continue;
            }
            match range.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(bad(format!("range {a}-{b} is backwards")));
                    }
                }
                None => {
                    num(range)?;
                }
            }
        }
    }
    Ok(())
}

/// A parsed `schedule`: when a Pipeline fires, in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every(std::time::Duration),
    /// Allowed values per field as bit sets: minute, hour, day-of-month,
    /// month, day-of-week (0 = Sunday); and whether day-of-month /
    /// day-of-week were `*` (cron matches either when both are restricted).
    Cron {
        fields: [u64; 5],
        dom_star: bool,
        dow_star: bool,
    },
}

impl Schedule {
    pub fn parse(expr: &str) -> Result<Schedule, String> {
        check_cron(expr)?;
        let expr = expr.trim();
        if let Some(d) = expr.strip_prefix("@every ") {
            return Ok(Schedule::Every(every(d)?));
        }
        let expanded = match expr {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            e => e,
        };
        const MONTHS: [&str; 12] = [
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ];
        const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
        const RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
        let mut fields = [0u64; 5];
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        for (fi, part) in parts.iter().enumerate() {
            let (lo, hi) = RANGES[fi];
            let num = |v: &str| -> u32 {
                let named = match fi {
                    3 => MONTHS
                        .iter()
                        .position(|m| m.eq_ignore_ascii_case(v))
                        .map(|i| i as u32 + 1),
                    4 => DAYS
                        .iter()
                        .position(|d| d.eq_ignore_ascii_case(v))
                        .map(|i| i as u32),
                    _ => None,
                };
                // check_cron accepted it, so it parses.
                named.or_else(|| v.parse().ok()).unwrap_or(lo)
            };
            for item in part.split(',') {
                let (range, step) = match item.split_once('/') {
                    Some((r, s)) => (r, s.parse::<u32>().unwrap_or(1).max(1)),
                    None => (item, 1),
                };
                let (a, b) = if range == "*" {
                    (lo, hi)
                } else if let Some((a, b)) = range.split_once('-') {
                    (num(a), num(b))
                } else if step > 1 {
                    (num(range), hi)
                } else {
                    (num(range), num(range))
                };
                let mut v = a;
                while v <= b {
                    // Day-of-week 7 is Sunday too.
                    let bit = if fi == 4 && v == 7 { 0 } else { v };
                    fields[fi] |= 1 << bit;
                    v += step;
                }
            }
        }
        Ok(Schedule::Cron {
            fields,
            dom_star: parts[2] == "*",
            dow_star: parts[4] == "*",
        })
    }

    /// The first firing strictly after `after` (Unix seconds), within the
    /// next five years.
    pub fn next_after(&self, after: u64) -> Option<u64> {
        match self {
            // Checked: a far `after` or a huge `@every` has no next time.
            Schedule::Every(d) => after.checked_add(d.as_secs().max(1)),
            Schedule::Cron {
                fields,
                dom_star,
                dow_star,
            } => {
                let has = |f: usize, v: u64| fields[f] & (1 << v) != 0;
                let start = (after / 60).checked_add(1)?.checked_mul(60)?;
                // Five years on from `start` must fit in a u64.
                if start > u64::MAX - 6 * 366 * 86_400 {
                    return None;
                }
                let first_day = start / 86_400;
                for day in first_day..first_day + 5 * 366 {
                    let (month, dom) = month_day(day as i64);
                    let dow = (day + 4) % 7; // 1970-01-01 was a Thursday.
                    let (dom_ok, dow_ok) = (has(2, dom), has(4, dow));
                    let day_ok = if !dom_star && !dow_star {
                        dom_ok || dow_ok
                    } else {
                        dom_ok && dow_ok
                    };
                    if !has(3, month) || !day_ok {
                        continue;
                    }
                    for hour in (0..24).filter(|h| has(1, *h)) {
                        for minute in (0..60).filter(|m| has(0, *m)) {
                            let t = day * 86_400 + hour * 3600 + minute * 60;
                            if t >= start {
                                return Some(t);
                            }
                        }
                    }
                }
                None
            }
        }
    }
}

/// (month 1-12, day 1-31) of a day count since 1970-01-01 (Howard
/// Hinnant's civil-from-days).
fn month_day(z: i64) -> (u64, u64) {
    let z = z + 719_468;
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (m, d)
}

/// The interval of `@every <duration>` (humantime, e.g. `30s`, `5m`;
/// at least one second).
pub fn every(d: &str) -> Result<std::time::Duration, String> {
    let v =
        humantime::parse_duration(d.trim()).map_err(|e| format!("@every {:?}: {e}", d.trim()))?;
    if v < std::time::Duration::from_secs(1) {
        return Err(format!("@every {:?}: must be at least 1s", d.trim()));
    }
    Ok(v)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineRunSpec {
    /// The Pipeline to run.
    pub pipeline: String,
    /// Values for the run, passed to every step as environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// Set to stop the run: running steps are killed, nothing new starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

impl Spec for PipelineRunSpec {
    fn check(&self, errs: &mut Errors) {
        checks::dns_label(errs, "spec.pipeline", &self.pipeline);
        for k in self.parameters.keys() {
            let at = format!("spec.parameters[{k:?}]");
            checks::env_name(errs, &at, k);
            if RESERVED_ENV.contains(&k.as_str()) {
                errs.add(at, format!("{k:?} is set by the system"));
            }
        }
    }
}

/// What the controller reports about a Pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// RFC 3339; when the schedule last fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// Name of the most recent PipelineRun.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<String>,
}

/// What the controller reports about a PipelineRun.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRunStatus {
    #[serde(default)]
    pub phase: RunPhase,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepStatus>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The Pipeline's spec when the run started; the run follows it even if
    /// the Pipeline changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_spec: Option<PipelineSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub name: String,
    #[serde(default)]
    pub phase: RunPhase,
    /// Indexes (workers, for a worker step) that exited 0.
    #[serde(default)]
    pub succeeded: u32,
    /// Indexes that failed for good (retries exhausted).
    #[serde(default)]
    pub failed: u32,
    /// Containers started so far, retries included.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Worker steps: the queue's counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<IndexStatus>,
}

/// One index of a step (one worker, for a worker step).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexStatus {
    pub index: u32,
    #[serde(default)]
    pub phase: RunPhase,
    /// 1 for the first container, +1 per retry.
    #[serde(default)]
    pub attempt: u32,
    /// The Instance running the current attempt.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the current attempt failed (the retry back-off counts from
    /// here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<String>,
}

/// Items through a worker step's queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    pub pending: u64,
    pub leased: u64,
    pub done: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Not run: a step it depends on failed or was skipped.
    Skipped,
    /// Stopped by `imctl pipeline cancel`.
    Cancelled,
}

impl RunPhase {
    /// Nothing more will happen.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunPhase::Succeeded | RunPhase::Failed | RunPhase::Skipped | RunPhase::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Pending => "Pending",
            RunPhase::Running => "Running",
            RunPhase::Succeeded => "Succeeded",
            RunPhase::Failed => "Failed",
            RunPhase::Skipped => "Skipped",
            RunPhase::Cancelled => "Cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn pl(spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Pipeline", "metadata": {"name": "etl"}, "spec": spec})
    }

    fn step(name: &str, deps: &[&str]) -> Value {
        json!({"name": name, "image": "step:1", "dependsOn": deps})
    }

    fn steps(list: &[(&str, &[&str])]) -> Value {
        pl(json!({"steps": list.iter().map(|(n, d)| step(n, d)).collect::<Vec<_>>()}))
    }

    #[track_caller]
    fn rejects(doc: Value, path: &str, fragment: &str) {
        let e = validate(&doc).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    /// A one-step pipeline with extra step fields.
    fn one_step(extra: Value) -> Value {
        let mut s = step("a", &[]);
        for (k, v) in extra.as_object().into_iter().flatten() {
            s[k] = v.clone();
        }
        pl(json!({"steps": [s]}))
    }

    #[track_caller]
    fn cron_err(expr: &str) -> String {
        check_cron(expr).expect_err(expr)
    }

    #[test]
    fn defaults_are_filled() {
        let v = validate(&pl(json!({"steps": [{"name": "a", "image": "step:1"}]}))).unwrap();
        assert_eq!(
            v.object["spec"],
            json!({
                "steps": [{
                    "name": "a", "image": "step:1",
                    "resources": {"cpu": "100m", "memory": "64Mi"},
                    "replicas": 1, "retries": 0, "backoffSeconds": 10, "mode": "batch",
                }],
                "runVolumeSize": "1Gi",
            })
        );
        assert_eq!(validate(&v.object).unwrap(), v);
    }

    #[test]
    fn steps_rules() {
        rejects(pl(json!({"steps": []})), "spec.steps", "at least one step");
        rejects(pl(json!({})), "spec.steps", "is required");
        rejects(
            steps(&[("a", &[]), ("a", &[])]),
            "spec.steps[1].name",
            "step \"a\" is defined twice",
        );
        rejects(steps(&[("A", &[])]), "spec.steps[0].name", "lowercase");
        rejects(
            one_step(json!({"image": ""})),
            "spec.steps[0].image",
            "is required",
        );
        rejects(
            one_step(json!({"replicas": 0})),
            "spec.steps[0].replicas",
            "must be between 1 and 1000, got 0",
        );
        rejects(
            one_step(json!({"replicas": 1001})),
            "spec.steps[0].replicas",
            "got 1001",
        );
        rejects(
            one_step(json!({"retries": 101})),
            "spec.steps[0].retries",
            "must be at most 100, got 101",
        );
        rejects(
            one_step(json!({"timeoutSeconds": 0})),
            "spec.steps[0].timeoutSeconds",
            "must be greater than zero",
        );
        rejects(
            one_step(json!({"mode": "daemon"})),
            "spec.steps[0].mode",
            "must be one of batch, worker, got \"daemon\"",
        );
        rejects(
            one_step(json!({"env": [{"name": "STEP_INDEX", "value": "3"}]})),
            "spec.steps[0].env[0].name",
            "set by the system",
        );
        rejects(
            one_step(json!({"resources": {"memory": "0"}})),
            "spec.steps[0].resources.memory",
            "greater than zero",
        );
        rejects(
            pl(json!({"steps": [step("a", &[])], "runVolumeSize": "0"})),
            "spec.runVolumeSize",
            "greater than zero",
        );
        let v = validate(&one_step(
            json!({"replicas": 8, "mode": "worker", "timeoutSeconds": 60, "retries": 3}),
        ))
        .unwrap();
        assert_eq!(v.object["spec"]["steps"][0]["mode"], "worker");
    }

    #[test]
    fn depends_on() {
        assert!(validate(&steps(&[("a", &[]), ("b", &["a"]), ("c", &["a", "b"])])).is_ok());
        rejects(
            steps(&[("a", &[]), ("b", &["a", "zz"])]),
            "spec.steps[1].dependsOn[1]",
            "no step named \"zz\"; steps are a, b",
        );
        rejects(
            steps(&[("a", &["a"])]),
            "spec.steps[0].dependsOn[0]",
            "cannot depend on itself",
        );
        rejects(
            steps(&[("a", &[]), ("b", &["a", "a"])]),
            "spec.steps[1].dependsOn[1]",
            "\"a\" is listed twice",
        );
    }

    #[test]
    fn cycles_are_reported_with_their_path() {
        rejects(
            steps(&[("a", &["b"]), ("b", &["a"])]),
            "spec.steps",
            "dependency cycle a -> b -> a",
        );
        rejects(
            steps(&[
                ("start", &[]),
                ("x", &["start", "z"]),
                ("y", &["x"]),
                ("z", &["y"]),
            ]),
            "spec.steps",
            "dependency cycle x -> z -> y -> x",
        );
        let e = validate(&steps(&[("a", &["b"]), ("b", &["a"])])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Pipeline \"etl\": spec.steps: dependency cycle a -> b -> a"
        );
    }

    #[test]
    fn deep_chains_do_not_overflow() {
        let chain = |n: usize| -> Vec<Value> {
            (0..n)
                .map(|i| {
                    let deps: Vec<String> = if i + 1 < n {
                        vec![format!("s{}", i + 1)]
                    } else {
                        vec![]
                    };
                    json!({"name": format!("s{i}"), "image": "x", "dependsOn": deps})
                })
                .collect()
        };
        let v = validate(&pl(json!({"steps": chain(5_000)})));
        assert!(v.is_ok(), "{v:?}");
        // Past the object size limit the answer is that limit, not a crash.
        let e = validate(&pl(json!({"steps": chain(20_000)}))).unwrap_err();
        assert!(e.message.contains("the limit is 1.5 MiB"), "{}", e.message);
    }

    #[test]
    fn topological_order() {
        let v = validate(&steps(&[
            ("c", &["b"]),
            ("b", &["a"]),
            ("a", &[]),
            ("d", &[]),
        ]))
        .unwrap();
        let spec: PipelineSpec = v.spec().unwrap();
        assert_eq!(spec.topological_order(), Some(vec!["a", "b", "c", "d"]));
    }

    #[test]
    fn schedule() {
        let with = |s: &str| pl(json!({"steps": [step("a", &[])], "schedule": s}));
        for ok in [
            "* * * * *",
            "*/15 0-6,22 1 * 1-5",
            "0 3 * JAN,jul sun",
            "30 2 1-31/2 1-12 0-7",
            "5/10 * * * *",
            "@daily",
            "  0 0 * * *  ",
        ] {
            assert!(validate(&with(ok)).is_ok(), "{ok}");
        }
        rejects(
            with("*/5 * * *"),
            "spec.schedule",
            "must have 5 fields (minute hour day-of-month month day-of-week), got 4",
        );
        rejects(
            with("0 25 * * *"),
            "spec.schedule",
            "hour field \"25\": \"25\" must be a number from 0 to 23",
        );
        assert!(cron_err("60 * * * *").starts_with("minute field \"60\""));
        assert!(cron_err("* * 0 * *").starts_with("day-of-month field \"0\""));
        assert!(cron_err("* * * 13 * ").starts_with("month field \"13\""));
        assert!(cron_err("* * * FOO *").contains("\"FOO\" must be a number from 1 to 12"));
        assert!(cron_err("* * * * 8").starts_with("day-of-week field \"8\""));
        assert!(cron_err("*/0 * * * *").contains("step \"0\" must be a positive number"));
        assert!(cron_err("5-1 * * * *").contains("range 5-1 is backwards"));
        assert!(cron_err("1,,2 * * * *").contains("empty list item"));
        assert!(cron_err("@often").contains("not a known macro"));
        assert!(cron_err("").contains("got 0"));
    }

    #[test]
    fn pipeline_run() {
        let run = |spec: Value| json!({"apiVersion": "ironmesh.dev/v1", "kind": "PipelineRun", "metadata": {"name": "etl-1"}, "spec": spec});
        rejects(run(json!({})), "spec.pipeline", "is required");
        rejects(
            run(json!({"pipeline": "ETL"})),
            "spec.pipeline",
            "lowercase",
        );
        rejects(
            run(json!({"pipeline": "etl", "parameters": {"": "x"}})),
            "spec.parameters[\"\"]",
            "not a valid environment variable name",
        );
        rejects(
            run(json!({"pipeline": "etl", "parameters": {"STEP_INDEX": "1"}})),
            "spec.parameters[\"STEP_INDEX\"]",
            "set by the system",
        );
        rejects(
            run(json!({"pipeline": "etl", "parameters": {"date": 20260101}})),
            "spec.parameters[\"date\"]",
            "quote it",
        );
        let v = validate(&run(
            json!({"pipeline": "etl", "parameters": {"date": "2026-01-01"}}),
        ))
        .unwrap();
        assert_eq!(
            v.object["spec"],
            json!({"pipeline": "etl", "parameters": {"date": "2026-01-01"}})
        );
        let typed: PipelineRunSpec = v.spec().unwrap();
        assert_eq!(typed.pipeline, "etl");
    }

    #[test]
    fn status_round_trip() {
        let s = PipelineRunStatus {
            phase: RunPhase::Running,
            start_time: Some("2026-01-01T00:00:00Z".into()),
            completion_time: None,
            steps: vec![StepStatus {
                name: "a".into(),
                phase: RunPhase::Succeeded,
                succeeded: 4,
                failed: 0,
                attempts: 5,
                ..StepStatus::default()
            }],
            ..PipelineRunStatus::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["steps"][0]["phase"], "Succeeded");
        assert_eq!(serde_json::from_value::<PipelineRunStatus>(v).unwrap(), s);
        let p = PipelineStatus {
            last_schedule_time: Some("t".into()),
            last_run: Some("etl-1".into()),
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v, json!({"lastScheduleTime": "t", "lastRun": "etl-1"}));
    }

    #[test]
    fn schedules_fire_when_expected() {
        // 2026-11-23 15:26:00 UTC is a Monday.
        let t = 1_795_447_560;
        let every = Schedule::parse("@every 10s").unwrap();
        assert_eq!(every.next_after(t), Some(t + 10));
        let hourly = Schedule::parse("@hourly").unwrap();
        assert_eq!(hourly.next_after(t), Some(1_795_449_600));
        let five = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(five.next_after(t), Some(t + 240));
        let daily = Schedule::parse("30 2 * * *").unwrap();
        assert_eq!(daily.next_after(t), Some(1_795_487_400)); // 2026-11-24 02:30
        let sunday = Schedule::parse("0 0 * * SUN").unwrap();
        assert_eq!(sunday.next_after(t), Some(1_795_910_400)); // 2026-11-29
        let sunday7 = Schedule::parse("0 0 * * 7").unwrap();
        assert_eq!(sunday7.next_after(t), Some(1_795_910_400));
        let leap = Schedule::parse("0 0 29 FEB *").unwrap();
        assert_eq!(leap.next_after(t), Some(1_835_395_200)); // 2028-02-29
        assert!(check_cron("@every 0s").is_err());
        assert!(check_cron("@every soon").is_err());
    }
}
