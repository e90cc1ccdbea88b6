//! `imctl pipeline run|runs|status|logs|cancel`.
//!
//! A run is a PipelineRun object: `run` applies a new one (named
//! `<pipeline>-<5 random characters>`), `cancel` applies it back with
//! `spec.cancel: true`, and `logs` reads the logs of the instances the run's
//! status names for each step index.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use futures::StreamExt;
use ironmesh_api::client_config::ClientConfig;
use ironmesh_api::pipeline::{PipelineRunStatus, RunPhase, PIPELINE_LABEL};
use ironmesh_api::Kind;
use ironmesh_proto::v1::operator_service_client::OperatorServiceClient;
use ironmesh_proto::v1::{ListRequest, LogsRequest};
use rand::Rng;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::client;

#[derive(Subcommand)]
pub enum PipelineCommand {
    /// Start a run of a Pipeline; prints the run's name.
    Run {
        pipeline: String,
        /// A parameter for every step, as an environment variable
        /// (repeatable): --param DAY=2026-11-23.
        #[arg(short, long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Wait for the run to finish, printing each step as it changes;
        /// exit non-zero unless it succeeded.
        #[arg(short, long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// List runs (of one Pipeline, if named), newest last.
    Runs { pipeline: Option<String> },
    /// Show a run's steps and indexes.
    Status { run: String },
    /// Print the logs of a run's steps: all, one step, or one index.
    Logs {
        run: String,
        step: Option<String>,
        index: Option<u32>,
    },
    /// Stop a run: running steps are killed and nothing new starts.
    Cancel { run: String },
}

type Api = OperatorServiceClient<Channel>;

pub async fn run(
    cfg: &ClientConfig,
    command: PipelineCommand,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let mut api = client::connect(cfg).await?;
    match command {
        PipelineCommand::Run {
            pipeline,
            params,
            wait,
            timeout,
        } => {
            let mut parameters = BTreeMap::new();
            for p in &params {
                let (k, v) = p
                    .split_once('=')
                    .with_context(|| format!("--param {p:?}: expected NAME=VALUE"))?;
                parameters.insert(k.to_string(), v.to_string());
            }
            // The Pipeline must exist; say so here rather than in a Failed run.
            client::get_object(&mut api, Kind::Pipeline, &pipeline, status_err).await?;
            let name = run_name(&pipeline);
            let doc = json!({
                "apiVersion": ironmesh_api::API_VERSION,
                "kind": "PipelineRun",
                "metadata": {"name": name, "labels": {PIPELINE_LABEL: pipeline}},
                "spec": {"pipeline": pipeline, "parameters": parameters},
            });
            client::apply_object(&mut api, &doc, "imctl pipeline run", status_err).await?;
            println!("pipelineruns/{name} created");
            if wait {
                let st = wait_for(&mut api, &name, timeout, status_err).await?;
                if st.phase != RunPhase::Succeeded {
                    bail!(
                        "run {name} {}: {}",
                        st.phase.as_str().to_lowercase(),
                        st.message
                    );
                }
            }
        }
        PipelineCommand::Runs { pipeline } => {
            let r = api
                .list(ListRequest {
                    kind: Kind::PipelineRun.as_str().into(),
                    label_selector: String::new(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut runs: Vec<Value> = r
                .items
                .iter()
                .filter_map(|i| serde_json::from_str(&i.json).ok())
                .filter(|v: &Value| {
                    pipeline.as_deref().is_none_or(|p| {
                        v.pointer("/spec/pipeline").and_then(Value::as_str) == Some(p)
                    })
                })
                .collect();
            runs.sort_by_key(|v| str_at(v, "/metadata/creationTimestamp").to_string());
            print!("{}", runs_table(&runs));
        }
        PipelineCommand::Status { run } => {
            let v = client::get_object(&mut api, Kind::PipelineRun, &run, status_err).await?;
            print!("{}", status_text(&v));
        }
        PipelineCommand::Logs { run, step, index } => {
            let v = client::get_object(&mut api, Kind::PipelineRun, &run, status_err).await?;
            let st = status_of(&v);
            let mut targets = Vec::new();
            for s in &st.steps {
                if step.as_deref().is_some_and(|want| want != s.name) {
                    continue;
                }
                for ix in &s.indexes {
                    if index.is_some_and(|want| want != ix.index) || ix.instance.is_empty() {
                        continue;
                    }
                    targets.push((s.name.clone(), ix.index, ix.instance.clone()));
                }
            }
            if targets.is_empty() {
                match (&step, index) {
                    (Some(s), _) if !st.steps.iter().any(|x| &x.name == s) => bail!(
                        "run {run} has no step {s:?}; its steps are {}",
                        st.steps
                            .iter()
                            .map(|x| x.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ => bail!("nothing has run yet for that selection of run {run}"),
                }
            }
            let many = targets.len() > 1;
            for (s, i, instance) in targets {
                if many {
                    println!("==> {s}[{i}] ({instance}) <==");
                }
                print_logs(&mut api, &instance, status_err).await?;
            }
        }
        PipelineCommand::Cancel { run } => {
            let v = client::get_object(&mut api, Kind::PipelineRun, &run, status_err).await?;
            if status_of(&v).phase.is_finished() {
                println!(
                    "pipelineruns/{run} already {}",
                    status_of(&v).phase.as_str().to_lowercase()
                );
                return Ok(());
            }
            let mut spec = v.get("spec").cloned().unwrap_or_else(|| json!({}));
            spec["cancel"] = json!(true);
            client::apply_spec(&mut api, Kind::PipelineRun, &v, spec, status_err).await?;
            println!("pipelineruns/{run} cancelling");
        }
    }
    Ok(())
}

/// `<pipeline>-<5 random characters>`, at most 63 characters.
fn run_name(pipeline: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let base: String = pipeline.chars().take(57).collect();
    format!("{}-{suffix}", base.trim_end_matches('-'))
}

async fn print_logs(
    api: &mut Api,
    instance: &str,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stream = api
        .logs(LogsRequest {
            instance: instance.to_string(),
            follow: false,
            tail_lines: 0,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_err)?;
        stdout.write_all(&chunk.data)?;
    }
    stdout.flush()?;
    Ok(())
}

/// Polls the run until it finishes, printing each change of a step.
async fn wait_for(
    api: &mut Api,
    run: &str,
    timeout: Duration,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<PipelineRunStatus> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let v = client::get_object(api, Kind::PipelineRun, run, status_err).await?;
        let st = status_of(&v);
        for s in st.steps.iter().filter(|s| s.phase != RunPhase::Pending) {
            let line = step_line(s);
            if seen.get(&s.name) != Some(&line) {
                println!("{line}");
                seen.insert(s.name.clone(), line);
            }
        }
        if st.phase.is_finished() {
            println!("run {run} {}", st.phase.as_str().to_lowercase());
            return Ok(st);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "run {run} still {} after {}",
                st.phase.as_str().to_lowercase(),
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn step_line(s: &ironmesh_api::pipeline::StepStatus) -> String {
    let mut line = format!(
        "  {:<16} {:<10} {}/{} done",
        s.name,
        s.phase.as_str(),
        s.succeeded,
        s.indexes.len()
    );
    if s.attempts as usize > s.indexes.len() {
        line.push_str(&format!(", {} attempts", s.attempts));
    }
    if let Some(q) = s.queue {
        line.push_str(&format!(
            ", items {} done / {} leased / {} pending",
            q.done, q.leased, q.pending
        ));
    }
    if !s.message.is_empty() {
        line.push_str(&format!(" ({})", s.message));
    }
    line
}

fn status_of(v: &Value) -> PipelineRunStatus {
    v.get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default()
}

fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn duration_of(st: &PipelineRunStatus) -> String {
    let parse = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
    };
    let Some(start) = st.start_time.as_deref().and_then(parse) else {
        return "-".into();
    };
    let end = st
        .completion_time
        .as_deref()
        .and_then(parse)
        .unwrap_or_else(time::OffsetDateTime::now_utc);
    let secs = (end - start).whole_milliseconds().max(0) as f64 / 1000.0;
    if secs < 120.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{}s", secs as u64 / 60, secs as u64 % 60)
    }
}

fn runs_table(runs: &[Value]) -> String {
    let mut rows = vec![vec![
        "NAME".to_string(),
        "PIPELINE".into(),
        "PHASE".into(),
        "STEPS".into(),
        "DURATION".into(),
        "AGE".into(),
    ]];
    for v in runs {
        let st = status_of(v);
        let done = st
            .steps
            .iter()
            .filter(|s| s.phase == RunPhase::Succeeded)
            .count();
        rows.push(vec![
            str_at(v, "/metadata/name").to_string(),
            str_at(v, "/spec/pipeline").to_string(),
            st.phase.as_str().to_string(),
            format!("{done}/{}", st.steps.len()),
            duration_of(&st),
            crate::output::age(str_at(v, "/metadata/creationTimestamp")),
        ]);
    }
    columns(&rows)
}

fn columns(rows: &[Vec<String>]) -> String {
    crate::output::align(rows.to_vec())
}

/// A run's steps and indexes, as `imctl pipeline status` prints them.
pub fn status_text(v: &Value) -> String {
    let st = status_of(v);
    let mut out = format!(
        "Run:       {}\nPipeline:  {}\nPhase:     {}\nDuration:  {}\n",
        str_at(v, "/metadata/name"),
        str_at(v, "/spec/pipeline"),
        st.phase.as_str(),
        duration_of(&st)
    );
    if !st.message.is_empty() {
        out.push_str(&format!("Message:   {}\n", st.message));
    }
    out.push_str("Steps:\n");
    for s in &st.steps {
        out.push_str(&step_line(s));
        out.push('\n');
        for ix in &s.indexes {
            let mut line = format!(
                "    [{}] {:<10} attempt {}",
                ix.index,
                ix.phase.as_str(),
                ix.attempt
            );
            if let Some(c) = ix.exit_code {
                line.push_str(&format!(", exit code {c}"));
            }
            if !ix.instance.is_empty() {
                line.push_str(&format!(", instance {}", ix.instance));
            }
            if let Some(n) = &ix.node {
                line.push_str(&format!(" on {n}"));
            }
            if !ix.reason.is_empty() && ix.phase != RunPhase::Succeeded {
                line.push_str(&format!(" ({}", ix.reason));
                if !ix.message.is_empty() {
                    line.push_str(&format!(": {}", ix.message));
                }
                line.push(')');
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_are_dns_labels() {
        let n = run_name("etl");
        assert!(n.starts_with("etl-") && n.len() == 9, "{n}");
        let n = run_name(&"p".repeat(63));
        assert!(n.len() <= 63, "{n}");
    }

    #[test]
    fn status_shows_steps_indexes_and_queue() {
        let v = json!({
            "metadata": {"name": "etl-x"},
            "spec": {"pipeline": "etl"},
            "status": {"phase": "Failed", "message": "step b failed", "steps": [
                {"name": "a", "phase": "Succeeded", "succeeded": 1, "attempts": 1,
                 "indexes": [{"index": 0, "phase": "Succeeded", "attempt": 1, "exitCode": 0, "instance": "etl-x-a-0-1"}]},
                {"name": "b", "phase": "Failed", "failed": 1, "attempts": 3, "message": "index 0 failed after 3 attempts: exit code 3",
                 "queue": {"pending": 0, "leased": 0, "done": 5},
                 "indexes": [{"index": 0, "phase": "Failed", "attempt": 3, "exitCode": 3, "reason": "Error"}]},
            ]},
        });
        let text = status_text(&v);
        assert!(text.contains("Phase:     Failed"), "{text}");
        assert!(
            text.contains("[0] Failed     attempt 3, exit code 3"),
            "{text}"
        );
        assert!(
            text.contains("items 5 done / 0 leased / 0 pending"),
            "{text}"
        );
        assert!(text.contains("3 attempts"), "{text}");
    }
}
