//! `imctl`, the Ironmesh operator's tool: apply manifests, read and delete
//! objects through the controller's operator API over mutual TLS.
//!
//! Modules: `client` (the client config and the mTLS connection),
//! `manifests` (files and directories into documents for `Apply`), `output`
//! (tables, YAML, JSON, `describe`), `node` (cordon, uncordon, drain),
//! `pipeline` (run, runs, status, logs, cancel), `image` (push, ls, rm, gc),
//! `flows` (`imctl flows`), `access` (join tokens and operators),
//! `registry` (`imctl registry login`) and `ui` (`imctl ui`).

mod access;
mod client;
mod flows;
mod image;
mod manifests;
mod node;
mod output;
mod pipeline;
mod registry;
mod registry_client;
mod secret;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{
    watch_event, ApplyRequest, DeleteRequest, GetRequest, ListRequest, LogsRequest, WatchRequest,
};
use serde_json::Value;

/// Operate an Ironmesh cluster.
#[derive(Parser)]
#[command(name = "imctl", version)]
struct Cli {
    /// Client config (server, CA, operator certificate). Default:
    /// ~/.ironmesh/config.yaml, then /var/lib/ironmesh/controller/admin.yaml.
    #[arg(long, global = true, env = "IMCTL_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Wide,
    Yaml,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update objects from YAML/JSON manifests, all or nothing.
    Apply {
        /// A file or a directory of *.yaml, *.yml, *.json files (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Walk directories recursively.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Validate on the controller, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List objects of a kind, or show one.
    Get {
        /// nodes, workloads, instances, services, policies, volumes,
        /// pipelines, pipelineruns, sources, gateways, httproutes, secrets
        /// (short names: no, wl, inst, svc, pol, vol, pl, plr, src, gw,
        /// route).
        kind: String,
        name: Option<String>,
        #[arg(short, long, value_enum)]
        output: Option<Output>,
        /// Label selector, e.g. app=web,tier!=db.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// After listing, keep printing changes.
        #[arg(short, long)]
        watch: bool,
        /// One Secret: show its values in spec.data (role admin; audited).
        #[arg(long, requires = "name")]
        reveal: bool,
    },
    /// Show one object in detail (workloads and instances with their
    /// instances and recent events).
    Describe { kind: String, name: String },
    /// Print an instance's stdout and stderr, as recorded on its node.
    Logs {
        instance: String,
        /// Keep printing new output until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u32>,
    },
    /// Recent flows the datapath reported (oldest first), like `hubble
    /// observe`: TIME SOURCE → DESTINATION PORT/PROTO VERDICT BYTES.
    Flows {
        /// Keep printing new flows until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only flows from or to this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Only flows with this verdict.
        #[arg(long, value_enum)]
        verdict: Option<flows::VerdictArg>,
        /// At most the last N recent flows (0: all the controller keeps).
        #[arg(long, default_value_t = 0)]
        last: u32,
        /// `json`: one JSON object per flow and line.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Delete objects by kind and name, or those named in manifests.
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
    },
    /// Cordon, uncordon or drain a node.
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// Make a Secret from files or literals and apply it (role admin).
    Secret {
        #[command(subcommand)]
        command: secret::SecretCommand,
    },
    /// Run pipelines and look at their runs.
    Pipeline {
        #[command(subcommand)]
        command: pipeline::PipelineCommand,
    },
    /// Push images to the controller's image store, and list them.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// The controller's OCI registry (--registry-listen): log in for
    /// skopeo, podman and buildah.
    Registry {
        #[command(subcommand)]
        command: registry::RegistryCommand,
    },
    /// Join tokens for agents: create, list, delete (admin).
    Token {
        #[command(subcommand)]
        command: access::TokenCommand,
    },
    /// Operators and their roles: create (writes their imctl config),
    /// list, revoke (admin).
    Operator {
        #[command(subcommand)]
        command: access::OperatorCommand,
    },
    /// Print a one-time sign-in URL for the controller's web UI (its
    /// --ui-listen); the page gets this operator's role.
    Ui {
        /// Print only the URL.
        #[arg(long)]
        url_only: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            anyhow::anyhow!("not allowed: {}", s.message())
        }
        tonic::Code::Unavailable if s.message().contains("transport") => {
            anyhow::anyhow!("controller unavailable: {}", s.message())
        }
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

fn kind(s: &str) -> anyhow::Result<Kind> {
    Kind::parse(s).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (cfg, _) = client::load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Apply {
            files,
            recursive,
            dry_run,
        } => {
            // Everything is read and parsed before anything is sent.
            let manifests = manifests::load(&files, recursive)?;
            let total: usize = manifests
                .iter()
                .map(|m| m.json.len() + m.origin.len())
                .sum();
            if let Some(msg) = ironmesh_api::limits::apply_too_large(total) {
                anyhow::bail!("{msg} (nothing was sent)");
            }
            let mut api = client::connect(&cfg).await?;
            let resp = api
                .apply(ApplyRequest { manifests, dry_run })
                .await
                .map_err(status_err)?
                .into_inner();
            let suffix = if dry_run { " (dry run)" } else { "" };
            for r in resp.results {
                println!(
                    "{}/{} {}{suffix}",
                    Kind::parse(&r.kind)
                        .map(|k| k.plural().to_string())
                        .unwrap_or(r.kind),
                    r.name,
                    r.action
                );
            }
        }
        Command::Get {
            kind: k,
            name,
            output,
            selector,
            watch,
            reveal,
        } => {
            let k = kind(&k)?;
            let mut api = client::connect(&cfg).await?;
            let mut warnings = Vec::new();
            let (objects, revision) = match &name {
                Some(n) => {
                    let r = api
                        .get(GetRequest {
                            kind: k.as_str().into(),
                            name: n.clone(),
                            reveal,
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    (vec![parse_obj(&r.json)?], r.revision)
                }
                None => {
                    let r = api
                        .list(ListRequest {
                            kind: k.as_str().into(),
                            label_selector: selector.clone().unwrap_or_default(),
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    let objs = r
                        .items
                        .iter()
                        .map(|i| parse_obj(&i.json))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    warnings = r.warnings;
                    (objs, r.revision)
                }
            };
            print_objects(k, &objects, output, name.is_some())?;
            // After the table (stderr for machine-readable output).
            for w in &warnings {
                if matches!(output, None | Some(Output::Wide)) {
                    println!("\nWarning: {w}");
                } else {
                    eprintln!("warning: {w}");
                }
            }
            if watch {
                let mut stream = api
                    .watch(WatchRequest {
                        kind: k.as_str().into(),
                        from_revision: revision,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                while let Some(ev) = stream.next().await {
                    let ev = ev.map_err(status_err)?;
                    let Some(res) = ev.resource else { continue };
                    if name.as_deref().is_some_and(|n| n != res.name) {
                        continue;
                    }
                    let obj = parse_obj(&res.json)?;
                    match output {
                        Some(Output::Json) | Some(Output::Yaml) => {
                            print_objects(k, &[obj], output, true)?
                        }
                        _ => {
                            let ty = watch_event::Type::try_from(ev.r#type)
                                .map(|t| t.as_str_name())
                                .unwrap_or("UNKNOWN");
                            let t = output::table(k, &[obj], output == Some(Output::Wide));
                            if let Some(line) = t.lines().nth(1) {
                                println!("{line}   {ty}");
                            }
                        }
                    }
                }
            }
        }
        Command::Describe { kind: k, name } => {
            let k = kind(&k)?;
            let mut api = client::connect(&cfg).await?;
            let r = api
                .get(GetRequest {
                    kind: k.as_str().into(),
                    name,
                    reveal: false,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let obj = parse_obj(&r.json)?;
            print!("{}", output::describe(k, &obj));
            match k {
                Kind::Workload => {
                    let r = api
                        .list(ListRequest {
                            kind: Kind::Instance.as_str().into(),
                            label_selector: format!(
                                "{}={}",
                                ironmesh_api::instance::WORKLOAD_LABEL,
                                s_of(&obj, "/metadata/name")
                            ),
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    let instances = r
                        .items
                        .iter()
                        .map(|i| parse_obj(&i.json))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    print!("{}", output::instances_and_events(&instances));
                }
                Kind::Instance => print!("{}", output::instances_and_events(&[obj])),
                Kind::Node => print!("{}", output::object_events(&obj)),
                Kind::PipelineRun => print!("{}", pipeline::status_text(&obj)),
                _ => {}
            }
        }
        Command::Logs {
            instance,
            follow,
            tail,
        } => {
            use std::io::Write;
            let mut api = client::connect(&cfg).await?;
            let mut stream = api
                .logs(LogsRequest {
                    instance,
                    follow,
                    tail_lines: tail.unwrap_or(0),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(status_err)?;
                stdout.write_all(&chunk.data)?;
                stdout.flush()?;
            }
        }
        Command::Flows {
            follow,
            workload,
            verdict,
            last,
            output,
        } => {
            flows::run(
                &cfg,
                flows::FlowsArgs {
                    follow,
                    workload,
                    verdict,
                    limit: last,
                    json: output == Some(Output::Json),
                },
            )
            .await?;
        }
        Command::Delete {
            kind: k,
            names,
            files,
        } => {
            let mut targets: Vec<(Kind, String)> = Vec::new();
            if !files.is_empty() {
                if k.is_some() {
                    bail!("give either KIND NAME... or -f FILE, not both");
                }
                for m in manifests::load(&files, false)? {
                    let v: Value = serde_json::from_str(&m.json)?;
                    let kk = kind(v.get("kind").and_then(Value::as_str).unwrap_or_default())
                        .with_context(|| m.origin.clone())?;
                    let n = v
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .with_context(|| format!("{}: metadata.name is missing", m.origin))?;
                    targets.push((kk, n.to_string()));
                }
            } else {
                let Some(k) = k else {
                    bail!("give KIND NAME... or -f FILE");
                };
                if names.is_empty() {
                    bail!("give at least one name to delete");
                }
                let k = kind(&k)?;
                targets.extend(names.into_iter().map(|n| (k, n)));
            }
            let mut api = client::connect(&cfg).await?;
            let mut failed = false;
            for (k, n) in targets {
                match api
                    .delete(DeleteRequest {
                        kind: k.as_str().into(),
                        name: n.clone(),
                    })
                    .await
                {
                    Ok(_) => println!("{}/{n} deleted", k.plural()),
                    Err(s) => {
                        eprintln!("error: {}", status_err(s));
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some objects were not deleted");
            }
        }
        Command::Image { command } => image::run(&cfg, command, status_err).await?,
        Command::Node { command } => node::run(&cfg, command, status_err).await?,
        Command::Pipeline { command } => pipeline::run(&cfg, command, status_err).await?,
        Command::Secret { command } => secret::run(&cfg, command, status_err).await?,
        Command::Registry { command } => registry::run(&cfg, command, status_err).await?,
        Command::Token { command } => access::tokens(&cfg, command).await?,
        Command::Operator { command } => access::operators(&cfg, command).await?,
        Command::Ui { url_only } => ui::run(&cfg, url_only, status_err).await?,
    }
    Ok(())
}

fn s_of<'a>(o: &'a Value, ptr: &str) -> &'a str {
    o.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn parse_obj(json: &str) -> anyhow::Result<Value> {
    serde_json::from_str(json).context("controller sent an object that is not JSON")
}

fn print_objects(
    k: Kind,
    objects: &[Value],
    output: Option<Output>,
    single: bool,
) -> anyhow::Result<()> {
    match output {
        Some(Output::Json) => {
            let v = if single && objects.len() == 1 {
                objects[0].clone()
            } else {
                serde_json::json!({"apiVersion": ironmesh_api::API_VERSION, "kind": "List", "items": objects})
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Some(Output::Yaml) => {
            let v = if single && objects.len() == 1 {
                objects[0].clone()
            } else {
                serde_json::json!({"apiVersion": ironmesh_api::API_VERSION, "kind": "List", "items": objects})
            };
            print!("{}", serde_norway::to_string(&v)?);
        }
        wide => {
            if objects.is_empty() {
                eprintln!("No {} found.", k.plural());
            } else {
                print!("{}", output::table(k, objects, wide == Some(Output::Wide)));
            }
        }
    }
    Ok(())
}
