//! Pipeline (a DAG of steps, each N indexed replicas sharing a run volume,
//! optionally on a cron schedule) and PipelineRun (one execution).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::validate::{checks, Errors, Spec};
use crate::workload::{check_container, EnvVar, Resources};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    pub steps: Vec<Step>,
    /// Cron expression (5 fields: minute hour day-of-month month day-of-week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default = "one_gi")]
    pub run_volume_size: Quantity,
}

fn one_gi() -> Quantity {
    "1Gi".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    pub name: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default = "one")]
    pub replicas: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub retries: u32,
    #[serde(default = "ten")]
    pub backoff_seconds: u32,
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
    /// One container per index; done when all exit 0.
    #[default]
    Batch,
    /// Long-lived workers draining a queue.
    Worker,
}

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
                errs.add(format!("{at}.timeoutSeconds"), "must be greater than zero");
            }
            for (j, d) in s.depends_on.iter().enumerate() {
                if d == &s.name {
                    errs.add(
                        format!("{at}.dependsOn[{j}]"),
                        "a step cannot depend on itself",
                    );
                } else if !names.contains(d.as_str()) {
                    errs.add(
                        format!("{at}.dependsOn[{j}]"),
                        format!("no step named {d:?}"),
                    );
                }
            }
        }
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

/// A cycle in the dependsOn graph, as step names ending where it started.
fn find_cycle(steps: &[Step]) -> Option<Vec<String>> {
    let deps: BTreeMap<&str, &[String]> = steps
        .iter()
        .map(|s| (s.name.as_str(), s.depends_on.as_slice()))
        .collect();
    // 0 = unvisited, 1 = on the stack, 2 = done.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a str,
        deps: &BTreeMap<&'a str, &'a [String]>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut c: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                c.push(n.to_string());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n, 1);
        stack.push(n);
        for d in deps.get(n).copied().unwrap_or_default() {
            if let Some(c) = visit(d.as_str(), deps, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n, 2);
        None
    }
    for s in steps {
        let mut stack = Vec::new();
        if let Some(c) = visit(&s.name, &deps, &mut state, &mut stack) {
            return Some(c);
        }
    }
    None
}

/// Checks a 5-field cron expression.
pub fn check_cron(expr: &str) -> Result<(), String> {
    const FIELDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of month", 1, 31),
        ("month", 1, 12),
        ("day of week", 0, 7),
    ];
    let parts: Vec<&str> = expr.split_whitespace().collect();
    if parts.len() != 5 {
        return Err(format!(
            "{expr:?} must have 5 fields (minute hour day-of-month month day-of-week), got {}",
            parts.len()
        ));
    }
    for (part, (name, lo, hi)) in parts.iter().zip(FIELDS) {
        for item in part.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            if let Some(s) = step {
                if !s.parse::<u32>().is_ok_and(|s| s >= 1) {
                    return Err(format!(
                        "{name} field {part:?}: step {s:?} must be a positive number"
                    ));
                }
            }
            if range == "*" {
                continue;
            }
            let num = |v: &str| -> Result<u32, String> {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| (lo..=hi).contains(n))
                    .ok_or_else(|| {
                        format!("{name} field {part:?}: {v:?} must be a number from {lo} to {hi}")
                    })
            };
            match range.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("{name} field {part:?}: range {a}-{b} is backwards"));
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
    pub pipeline: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}

impl Spec for PipelineRunSpec {
    fn check(&self, errs: &mut Errors) {
        checks::dns_label(errs, "spec.pipeline", &self.pipeline);
    }
}
