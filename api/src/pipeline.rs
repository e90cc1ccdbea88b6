//! Pipeline: a DAG of steps, each running N indexed replicas (the index in
//! `STEP_INDEX`) that share the run's volume (mounted at `STORAGE_PATH`),
//! optionally started on a cron schedule; and PipelineRun, one execution of
//! a Pipeline.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::validate::{checks, Errors, Spec};
use crate::workload::{check_container, EnvVar, Resources};

/// Environment variable holding a step replica's index (0-based).
pub const STEP_INDEX_ENV: &str = "STEP_INDEX";
/// Environment variable holding the mount path of the run volume.
pub const STORAGE_PATH_ENV: &str = "STORAGE_PATH";

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
}

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
    /// Long-lived workers; the step is done when its dependents are.
    Worker,
}

const RESERVED_ENV: [&str; 2] = [STEP_INDEX_ENV, STORAGE_PATH_ENV];

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
            check_container(errs, &at, &s.image, &s.env, &s.resources);
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
    if let Some(m) = expr.strip_prefix('@') {
        return match m {
            "yearly" | "annually" | "monthly" | "weekly" | "daily" | "midnight" | "hourly" => Ok(()),
            _ => Err(format!(
                "{expr:?} is not a known macro; expected @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineRunSpec {
    /// The Pipeline to run.
    pub pipeline: String,
    /// Values for the run, available to its steps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}

impl Spec for PipelineRunSpec {
    fn check(&self, errs: &mut Errors) {
        checks::dns_label(errs, "spec.pipeline", &self.pipeline);
        for k in self.parameters.keys() {
            if k.is_empty() {
                errs.add("spec.parameters[\"\"]", "parameter names must not be empty");
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
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub name: String,
    #[serde(default)]
    pub phase: RunPhase,
    /// Replicas that finished successfully.
    #[serde(default)]
    pub succeeded: u32,
    /// Replicas that failed for good (retries exhausted).
    #[serde(default)]
    pub failed: u32,
    /// Attempts started, retries included.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
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
        let n = 20_000;
        let list: Vec<Value> = (0..n)
            .map(|i| {
                let deps: Vec<String> = if i + 1 < n {
                    vec![format!("s{}", i + 1)]
                } else {
                    vec![]
                };
                json!({"name": format!("s{i}"), "image": "x", "dependsOn": deps})
            })
            .collect();
        assert!(validate(&pl(json!({"steps": list}))).is_ok());
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
            "must not be empty",
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
                message: String::new(),
            }],
            message: String::new(),
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
}
