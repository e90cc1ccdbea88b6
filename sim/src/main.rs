//! `ironmesh-sim`: simulated Ironmesh nodes in one process.
//!
//! `ironmesh-sim bench` runs the control-plane scale scenario against a
//! controller it starts itself and prints every figure with its target
//! (see docs/scale.md); `ironmesh-sim run` points a fleet at a controller
//! that is already running and prints its state until interrupted.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ironmesh_sim::{Fleet, FleetConfig};

mod bench;
mod procs;

#[derive(Debug, Parser)]
#[command(name = "ironmesh-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log filter, RUST_LOG syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log_level: String,
    /// Worker threads of the simulator's runtime (default: one per CPU).
    /// All nodes share them.
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the scale scenario against a controller it starts (and etcd,
    /// with --store etcd) and prints each figure with its target.
    Bench(bench::BenchArgs),
    /// Runs a fleet against a running controller until interrupted.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Controller URL, https://host:port.
    #[arg(long)]
    controller: String,
    /// The cluster CA certificate (<data-dir>/pki/ca.crt).
    #[arg(long)]
    ca_cert: PathBuf,
    /// The bootstrap token file (<data-dir>/bootstrap-token).
    #[arg(long)]
    token_file: PathBuf,
    /// Name the controller's certificate carries, if not the URL's host.
    #[arg(long)]
    server_name: Option<String>,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Node names are <prefix>-00001, ...
    #[arg(long, default_value = "sim")]
    name_prefix: String,
    /// Logical CPUs per node.
    #[arg(long, default_value_t = 16)]
    cpus: u32,
    /// Memory per node, GiB.
    #[arg(long, default_value_t = 64)]
    memory_gib: u64,
    /// Joins in flight at once (0: all at once).
    #[arg(long, default_value_t = 64)]
    join_concurrency: usize,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 5)]
    every: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    rt.build().context("tokio runtime")?.block_on(run_cli(cli))
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .context("invalid --log-level")?,
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Bench(args) => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            // An interrupted bench drops its processes' handles: they are
            // killed by PID on the way out.
            let outcome = tokio::select! {
                r = bench::run(args, command) => Some(r?),
                s = interrupted() => {
                    tracing::warn!("{s}: stopping the bench");
                    None
                }
            };
            match outcome {
                Some(true) => Ok(()),
                // Some figure missed its target.
                Some(false) => std::process::exit(2),
                None => std::process::exit(130),
            }
        }
        Cmd::Run(args) => run(args).await,
    }
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let limit = procs::raise_nofile()?;
    tracing::info!(open_files = limit, "open-file limit");
    let ca = std::fs::read_to_string(&args.ca_cert)
        .with_context(|| format!("read {}", args.ca_cert.display()))?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("read {}", args.token_file.display()))?;
    let mut cfg = FleetConfig::new(&args.controller, &ca, &token, args.nodes);
    cfg.server_name = args.server_name;
    cfg.name_prefix = args.name_prefix;
    cfg.cpus = args.cpus;
    cfg.memory_bytes = args.memory_gib << 30;
    cfg.join_concurrency = args.join_concurrency;
    let fleet = Fleet::start(cfg)?;
    let mut tick = tokio::time::interval(Duration::from_secs(args.every.max(1)));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let nodes = fleet.nodes();
                let r = fleet.received();
                let instances: usize = nodes.iter().map(|s| s.instances).sum();
                let min_rev = nodes.iter().map(|s| s.acked_revision).min().unwrap_or(0);
                let max_rev = nodes.iter().map(|s| s.acked_revision).max().unwrap_or(0);
                tracing::info!(
                    connected = fleet.connected(),
                    nodes = nodes.len(),
                    instances,
                    acked_min = min_rev,
                    acked_max = max_rev,
                    whole = r.whole_msgs,
                    whole_bytes = r.whole_bytes,
                    deltas = r.delta_msgs,
                    delta_bytes = r.delta_bytes,
                    failed = fleet.failed().len(),
                    "fleet"
                );
            }
        }
    }
    Ok(())
}
