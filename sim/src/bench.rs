//! `ironmesh-sim bench`: the control-plane scale scenario, end to end.
//!
//! For each node count it starts a fresh controller (and etcd, with
//! `--store etcd`) on loopback, starts a [`Fleet`] of simulated nodes
//! against it, and measures, in order:
//!
//! 1. join → every Node Ready in the controller (with its inventory);
//! 2. one Workload of R replicas applied → the controller shows R/R ready;
//! 3. the controller's resident memory then;
//! 4. its CPU use over a quiet window with every node heartbeating;
//! 5. one Policy change → acknowledged by every node (the first ack of an
//!    assignment that holds the new rule);
//! 6. one instance added → assignment bytes each other node received;
//! 7. kill -9 of the controller and a restart on the same data → every
//!    node Ready and acknowledged again on a new stream, and whether any
//!    instance was recreated (names and uids before and after).
//!
//! Each figure is printed with its target; several node counts also print
//! the curve (cost per node).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ironmesh_sim::manifests::{self, has_ingress_port};
use ironmesh_sim::operator::ready_status;
use ironmesh_sim::{median, percentile, Fleet, FleetConfig, Operator, Phase, Received};
use serde_json::Value;

use crate::procs::{self, Child, ControllerSpec};

const MAIN: &str = "sim";
const EXTRA: &str = "sim-extra";
const POLICY: &str = "sim-ingress";
const PORT_BEFORE: u32 = 8000;
const PORT_AFTER: u32 = 8001;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    Embedded,
    Etcd,
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Embedded => "embedded",
            Store::Etcd => "etcd",
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The controller binary (a release build).
    #[arg(long, default_value = "target/release/ironmesh-controller")]
    pub controller_bin: PathBuf,
    /// Simulated nodes. A list (`100,300,1000`) runs the scenario once per
    /// count, each on a fresh controller, and prints the cost per node.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub nodes: Vec<usize>,
    /// Replicas of the workload (default: 10 per node; at most 10000).
    #[arg(long)]
    pub replicas: Option<u64>,
    /// The controller's store.
    #[arg(long, value_enum, default_value_t = Store::Embedded)]
    pub store: Store,
    /// etcd binary for `--store etcd`.
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// `--cluster-cidr` of the controller: big enough for every node's pod
    /// CIDR (a /12 holds 1,024 nodes of /22) and clear of the service CIDR
    /// (10.96.0.0/16).
    #[arg(long, default_value = "10.240.0.0/12")]
    pub cluster_cidr: String,
    /// `--node-cidr-prefix` of the controller.
    #[arg(long, default_value_t = 22)]
    pub node_cidr_prefix: u8,
    /// `--heartbeat-interval` of the controller (its default when absent).
    #[arg(long)]
    pub heartbeat_interval: Option<String>,
    /// `--node-grace` of the controller (its default when absent).
    #[arg(long)]
    pub node_grace: Option<String>,
    /// `--eviction-delay` of the controller (its default when absent).
    #[arg(long)]
    pub eviction_delay: Option<String>,
    /// Length of the idle CPU measurement, seconds.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Joins in flight at once (0: all at once).
    #[arg(long, default_value_t = 64)]
    pub join_concurrency: usize,
    /// Longest wait for any one phase, seconds.
    #[arg(long, default_value_t = 300)]
    pub phase_timeout: u64,
    /// After the restart, how long to keep watching for evictions before
    /// comparing instances, seconds.
    #[arg(long, default_value_t = 12)]
    pub observe_seconds: u64,
    /// Where controller data and logs go (default: a temporary directory,
    /// removed at the end unless --keep).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the work directory (logs, data).
    #[arg(long)]
    pub keep: bool,
    /// Nodes do not announce incremental assignments: they get whole
    /// ones, as agents without deltas do.
    #[arg(long)]
    pub whole_assignments: bool,
    /// RUST_LOG of the controller.
    #[arg(long, default_value = "info")]
    pub controller_log: String,
}

/// What one run measured. `None`: the phase did not complete in time.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub nodes: usize,
    pub replicas: u64,
    pub store: String,
    pub ready: Option<Duration>,
    pub running: Option<Duration>,
    /// When the fleet had reported every instance (sim side).
    pub reported: Option<Duration>,
    pub rss_empty: u64,
    /// After the join, before the workload: what the connections cost.
    pub rss_joined: u64,
    pub rss: u64,
    /// At the end of the idle window, once the rollout's bursts are over.
    pub rss_idle: u64,
    pub rss_peak: u64,
    pub idle_cpu_pct: Option<f64>,
    pub idle_window: Duration,
    pub idle_assignment_msgs: u64,
    pub policy_acked: Option<Duration>,
    pub policy_acked_rev: Option<Duration>,
    pub policy_bytes_median: Option<u64>,
    pub add_bytes_median: Option<u64>,
    pub add_bytes_p90: Option<u64>,
    pub add_bytes_max: Option<u64>,
    pub add_msgs: Received,
    pub restart_recovered: Option<Duration>,
    pub restart_controller_up: Option<Duration>,
    pub recreated: Option<usize>,
    pub instances_after: Option<usize>,
    pub restart_new_starts: u64,
    pub readiness_transitions: Option<f64>,
    pub rollout_received: Received,
    pub mismatched_nodes: Option<usize>,
    pub controller_sent: Vec<(String, f64)>,
    /// CPU time of the controller, of this process and of other processes
    /// during the rollout and the idle window.
    pub rollout_cpu: Option<CpuUse>,
    pub idle_cpu: Option<CpuUse>,
    /// Why streams ended before the restart, and because of it.
    pub disconnects_before_restart: BTreeMap<String, u64>,
    pub disconnects_restart: BTreeMap<String, u64>,
    pub notes: Vec<String>,
    pub work_dir: String,
}

/// CPU time of the controller, of this process and of the whole machine.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    controller: Duration,
    sim: Duration,
    machine: procs::MachineCpu,
}

/// Where CPU time went during a phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub controller: Duration,
    pub sim: Duration,
    /// Every other process.
    pub others: Duration,
    pub interrupts: Duration,
    pub steal: Duration,
}

impl CpuSample {
    fn take(controller_pid: u32) -> Option<CpuSample> {
        Some(CpuSample {
            controller: procs::cpu_time(controller_pid)?,
            sim: procs::cpu_time(std::process::id())?,
            machine: procs::machine_cpu()?,
        })
    }

    fn until(&self, later: &CpuSample) -> CpuUse {
        let controller = later.controller.saturating_sub(self.controller);
        let sim = later.sim.saturating_sub(self.sim);
        let tasks = later.machine.tasks.saturating_sub(self.machine.tasks);
        CpuUse {
            controller,
            sim,
            others: tasks.saturating_sub(controller + sim),
            interrupts: later
                .machine
                .interrupts
                .saturating_sub(self.machine.interrupts),
            steal: later.machine.steal.saturating_sub(self.machine.steal),
        }
    }
}

/// Notes other processes' CPU use when it was more than a tenth of a core.
fn note_others(f: &mut Figures, phase: &str, u: &CpuUse, elapsed: Duration) {
    let share = u.others.as_secs_f64() / elapsed.as_secs_f64().max(1e-3);
    if share > 0.1 {
        f.notes.push(format!(
            "other processes used {:.0} % of a core during {phase}: figures are skewed",
            share * 100.0
        ));
    }
}

/// A deadline for one phase, with progress lines every few seconds.
struct Step {
    what: String,
    start: Instant,
    timeout: Duration,
    last_log: Instant,
}

impl Step {
    fn new(what: impl Into<String>, timeout: Duration) -> Step {
        let what = what.into();
        tracing::info!("{what}");
        let now = Instant::now();
        Step {
            what,
            start: now,
            timeout,
            last_log: now,
        }
    }

    fn expired(&self) -> bool {
        self.start.elapsed() > self.timeout
    }

    fn progress(&mut self, line: impl FnOnce() -> String) {
        if self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            tracing::info!(
                "  {}: {} ({:.0}s)",
                self.what,
                line(),
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Runs the bench for every node count; returns whether every figure met
/// its target.
pub async fn run(args: BenchArgs, command: String) -> anyhow::Result<bool> {
    if !args.controller_bin.exists() {
        bail!(
            "{} does not exist; build it: cargo build --release -p ironmesh-controller",
            args.controller_bin.display()
        );
    }
    let biggest = args.nodes.iter().copied().max().unwrap_or(0);
    let cidr: ipnet::Ipv4Net = args
        .cluster_cidr
        .parse()
        .with_context(|| format!("--cluster-cidr {:?}", args.cluster_cidr))?;
    let room = args
        .node_cidr_prefix
        .checked_sub(cidr.prefix_len())
        .map(|bits| 1u64 << bits.min(32))
        .unwrap_or(0);
    if (biggest as u64) > room {
        bail!(
            "--cluster-cidr {cidr} holds {room} pod CIDRs of /{}, fewer than {biggest} nodes: \
             widen it (e.g. 10.240.0.0/12 for 1,024 nodes of /22) or lengthen --node-cidr-prefix",
            args.node_cidr_prefix
        );
    }
    let nofile = procs::raise_nofile()?;
    if nofile < biggest as u64 * 2 + 256 {
        bail!("open-file limit {nofile} is too low for {biggest} nodes (each holds a connection; the controller inherits the limit): raise the hard limit (ulimit -Hn)");
    }
    let mut all = Vec::new();
    let mut ok = true;
    for &n in &args.nodes {
        let replicas = args.replicas.unwrap_or(n as u64 * 10);
        if replicas > 10_000 {
            bail!("{replicas} replicas: a Workload holds at most 10000");
        }
        let f = scenario(&args, n, replicas).await?;
        ok &= print_figures(&f, &command, &args);
        all.push(f);
    }
    if all.len() > 1 {
        print_curve(&all);
    }
    Ok(ok)
}

/// The controller's sample for `name`, if the metrics endpoint answers.
async fn scrape(spec: &ControllerSpec, name: &str) -> Option<f64> {
    let text = procs::http_get(spec.metrics, "/metrics").await.ok()?;
    procs::metric(&text, name)
}

async fn nodes_ready(op: &mut Operator) -> anyhow::Result<usize> {
    let (nodes, _) = op.list("Node").await?;
    Ok(nodes
        .iter()
        .filter(|n| {
            ready_status(n) == Some("True") && n.pointer("/status/allocatable/cpu").is_some()
        })
        .count())
}

/// Instance name → uid, and how many are Running and ready.
async fn instance_uids(op: &mut Operator) -> anyhow::Result<(BTreeMap<String, String>, usize)> {
    let (items, _) = op.list("Instance").await?;
    let mut uids = BTreeMap::new();
    let mut running = 0;
    for i in &items {
        let name = i
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let uid = i
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default();
        uids.insert(name.to_string(), uid.to_string());
        if i.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
            && i.pointer("/status/ready").and_then(Value::as_bool) == Some(true)
        {
            running += 1;
        }
    }
    Ok((uids, running))
}

/// Waits until the fleet received no assignment for `quiet` (at most `max`).
async fn quiesce(fleet: &Fleet, quiet: Duration, max: Duration) -> bool {
    let start = Instant::now();
    let mut last = fleet.received().msgs();
    let mut since = Instant::now();
    while start.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = fleet.received().msgs();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return true;
        }
    }
    false
}

async fn scenario(args: &BenchArgs, n: usize, replicas: u64) -> anyhow::Result<Figures> {
    let timeout = Duration::from_secs(args.phase_timeout);
    let (dir, tmp) = match &args.work_dir {
        Some(d) => {
            let dir = d.join(format!("{}-{n}", args.store));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            (dir, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("ironmesh-sim-bench-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // Removed when `tmp` drops at the end, unless kept.
    let _tmp = match tmp {
        Some(t) if args.keep => {
            let _ = t.keep();
            None
        }
        t => t,
    };
    let mut f = Figures {
        nodes: n,
        replicas,
        store: args.store.to_string(),
        work_dir: dir.display().to_string(),
        ..Default::default()
    };

    // Other work on the machine skews every figure: say so.
    if let Some(m0) = procs::machine_busy() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(m1) = procs::machine_busy() {
            let pct = m1.saturating_sub(m0).as_secs_f64() * 100.0;
            if pct > 20.0 {
                tracing::warn!(
                    "the machine is busy before the bench starts ({pct:.0} % of a core)"
                );
                f.notes.push(format!(
                    "the machine was busy before the bench started: {pct:.0} % of a core used by other processes"
                ));
            }
        }
    }
    let mut etcd: Option<Child> = None;
    let (store, ca_key_file) = match args.store {
        Store::Embedded => (None, None),
        Store::Etcd => {
            let (child, addr) = procs::start_etcd(&args.etcd_bin, &dir).await?;
            etcd = Some(child);
            let key = dir.join("ca-key.hex");
            let bytes: [u8; 32] = rand::random();
            std::fs::write(&key, hex::encode(bytes))?;
            (Some(format!("etcd://{addr}")), Some(key))
        }
    };
    let spec = ControllerSpec {
        bin: args.controller_bin.clone(),
        data_dir: dir.join("controller"),
        listen: procs::free_addr()?,
        metrics: procs::free_addr()?,
        cluster_cidr: args.cluster_cidr.clone(),
        node_cidr_prefix: args.node_cidr_prefix,
        store,
        ca_key_file,
        heartbeat_interval: args.heartbeat_interval.clone(),
        node_grace: args.node_grace.clone(),
        eviction_delay: args.eviction_delay.clone(),
        log_level: args.controller_log.clone(),
    };
    tracing::info!(
        nodes = n,
        replicas,
        store = %args.store,
        dir = %dir.display(),
        "starting the controller: {:?}",
        spec.command()
    );
    let mut ctl = spec.spawn(&dir.join("controller-1.log"))?;
    spec.wait_serving(&mut ctl, Duration::from_secs(60)).await?;
    f.rss_empty = procs::memory(ctl.pid()).map(|m| m.0).unwrap_or(0);
    let token = std::fs::read_to_string(spec.token_file()).context("bootstrap token")?;
    let ca = std::fs::read_to_string(spec.ca_cert()).context("cluster CA")?;
    let mut op = Operator::from_config_file(&spec.admin_config()).await?;

    // 1. Join → Ready.
    let mut cfg = FleetConfig::new(&spec.url(), &ca, &token, n);
    cfg.join_concurrency = args.join_concurrency;
    cfg.incremental = !args.whole_assignments;
    // A node whose join answer was lost is re-provisioned as an operator
    // would (a token bound to its name) rather than failing the bench.
    cfg.reprovision_with = Some(ironmesh_sim::operator::client_config(&spec.admin_config())?);
    let fleet = Fleet::start(cfg)?;
    let t0 = fleet.started();
    let mut ph = Step::new(format!("{n} nodes join"), timeout);
    f.ready = loop {
        ctl.check_alive()?;
        if let Some((node, why)) = fleet.failed().first() {
            bail!("node {node} could not join: {why}");
        }
        let ready = nodes_ready(&mut op).await?;
        if ready >= n {
            break Some(t0.elapsed());
        }
        if ph.expired() {
            f.notes.push(format!(
                "join: only {ready}/{n} nodes Ready after {timeout:?}"
            ));
            break None;
        }
        ph.progress(|| format!("{} connected, {ready} Ready", fleet.connected()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    f.rss_joined = procs::memory(ctl.pid()).map(|m| m.0).unwrap_or(0);

    // 2. Rollout.
    let recv0 = fleet.received();
    let cpu0 = CpuSample::take(ctl.pid());
    let t1 = Instant::now();
    op.apply(&[
        manifests::policy(POLICY, PORT_BEFORE),
        manifests::workload(MAIN, replicas),
        manifests::workload(EXTRA, 0),
    ])
    .await?;
    let mut ph = Step::new(format!("{replicas} replicas roll out"), timeout);
    let running_metric = "ironmesh_controller_instances{phase=\"Running\"}";
    f.running = loop {
        ctl.check_alive()?;
        let reported: usize = fleet.nodes().iter().map(|s| s.instances).sum();
        if f.reported.is_none() && reported as u64 >= replicas {
            f.reported = Some(t1.elapsed());
        }
        let metrics = procs::http_get(spec.metrics, "/metrics")
            .await
            .unwrap_or_default();
        let running = procs::metric(&metrics, running_metric).unwrap_or(0.0) as u64;
        let pending = procs::metric(&metrics, "ironmesh_controller_instances{phase=\"Pending\"}")
            .unwrap_or(0.0) as u64;
        if running >= replicas {
            let w = op.get("Workload", MAIN).await?;
            let ready = w
                .as_ref()
                .and_then(|w| w.pointer("/status/readyReplicas"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if ready >= replicas {
                break Some(t1.elapsed());
            }
        }
        if ph.expired() {
            f.notes.push(format!(
                "rollout: {running}/{replicas} Running in the controller after {timeout:?} ({reported} reported by the fleet)"
            ));
            break None;
        }
        ph.progress(|| {
            format!(
                "fleet runs {reported}, controller shows {running} Running, {pending} Pending; {} nodes connected",
                fleet.connected()
            )
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if f.reported.is_none() {
        f.reported = Some(t1.elapsed()).filter(|_| {
            fleet.nodes().iter().map(|s| s.instances).sum::<usize>() as u64 >= replicas
        });
    }
    f.rollout_received = fleet.received().since(&recv0);
    if let (Some(a), Some(b)) = (cpu0, CpuSample::take(ctl.pid())) {
        let u = a.until(&b);
        note_others(&mut f, "the rollout", &u, t1.elapsed());
        f.rollout_cpu = Some(u);
    }

    // 3. Memory after the rollout.
    let (rss, hwm) = procs::memory(ctl.pid()).unwrap_or((0, 0));
    f.rss = rss;
    f.rss_peak = hwm;

    // Every node runs exactly what the controller bound to it.
    {
        let (items, _) = op.list("Instance").await?;
        let mut bound: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in &items {
            if let (Some(node), Some(name)) = (
                i.pointer("/spec/node").and_then(Value::as_str),
                i.pointer("/metadata/name").and_then(Value::as_str),
            ) {
                bound.entry(node.into()).or_default().push(name.into());
            }
        }
        let runs = fleet.instances();
        let mismatched = runs
            .iter()
            .filter(|(node, insts)| {
                let mut want = bound.get(*node).cloned().unwrap_or_default();
                want.sort();
                insts.keys().cloned().collect::<Vec<_>>() != want
            })
            .count();
        f.mismatched_nodes = Some(mismatched);
    }

    // 4. Idle CPU.
    tracing::info!("waiting for the cluster to settle before the idle window");
    if !quiesce(&fleet, Duration::from_secs(3), Duration::from_secs(60)).await {
        f.notes
            .push("idle: assignments were still arriving after 60s; measured anyway".into());
    }
    let window = Duration::from_secs(args.idle_seconds);
    tracing::info!("measuring controller CPU for {window:?} with {n} nodes heartbeating");
    let cpu0 = CpuSample::take(ctl.pid());
    let msgs0 = fleet.received().msgs();
    let w0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu1 = CpuSample::take(ctl.pid());
    let elapsed = w0.elapsed();
    f.idle_window = elapsed;
    f.rss_idle = procs::memory(ctl.pid()).map(|m| m.0).unwrap_or(0);
    f.idle_assignment_msgs = fleet.received().msgs() - msgs0;
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let u = a.until(&b);
        f.idle_cpu_pct = Some(u.controller.as_secs_f64() / elapsed.as_secs_f64() * 100.0);
        note_others(&mut f, "the idle window", &u, elapsed);
        f.idle_cpu = Some(u);
    }

    // 5. One Policy change.
    let w = fleet.watch(|_, a| has_ingress_port(a, PORT_AFTER));
    let before = fleet.nodes();
    let tp = Instant::now();
    let rev = op.apply(&[manifests::policy(POLICY, PORT_AFTER)]).await?;
    let ph = Step::new("one Policy change reaches every node", timeout);
    f.policy_acked = loop {
        if let Some(t) = fleet.watch_all(w) {
            break Some(t.saturating_duration_since(tp));
        }
        if ph.expired() {
            let have = fleet.watch_hits(w).iter().flatten().count();
            f.notes.push(format!(
                "policy: only {have}/{n} nodes acknowledged the new rule after {timeout:?}"
            ));
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    f.policy_acked_rev = fleet
        .all_acked(rev)
        .map(|t| t.saturating_duration_since(tp));
    quiesce(&fleet, Duration::from_secs(1), Duration::from_secs(10)).await;
    let bytes: Vec<u64> = fleet
        .nodes()
        .iter()
        .zip(&before)
        .map(|(a, b)| a.received.since(&b.received).bytes())
        .collect();
    f.policy_bytes_median = median(&bytes);

    // 6. One instance added.
    let before = fleet.nodes();
    op.apply(&[manifests::workload(EXTRA, 1)]).await?;
    let mut ph = Step::new("one instance added", timeout);
    let placed = loop {
        let found = fleet.instances().into_iter().find_map(|(node, insts)| {
            insts
                .into_iter()
                .find(|(_, i)| i.workload == EXTRA)
                .map(|(_, i)| (node, i.ip))
        });
        if found.is_some() {
            break found;
        }
        if ph.expired() {
            f.notes.push(format!(
                "add: the new instance ran nowhere after {timeout:?}"
            ));
            break None;
        }
        ph.progress(|| "waiting for a node to run it".into());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some((host, ip)) = placed {
        let ip = ip.to_string();
        let w = fleet.watch(move |_, a| a.identities.iter().any(|e| e.ip == ip));
        let ph = Step::new("its identity reaches every node", timeout);
        let reached = loop {
            if fleet.watch_all(w).is_some() {
                break true;
            }
            if ph.expired() {
                f.notes.push(format!(
                    "add: the new instance's identity reached {}/{n} nodes after {timeout:?}",
                    fleet.watch_hits(w).iter().flatten().count()
                ));
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        quiesce(&fleet, Duration::from_secs(1), Duration::from_secs(10)).await;
        if reached {
            let after = fleet.nodes();
            let mut bytes = Vec::new();
            for (a, b) in after.iter().zip(&before) {
                let d = a.received.since(&b.received);
                f.add_msgs.add(&d);
                if a.name != host {
                    bytes.push(d.bytes());
                }
            }
            f.add_bytes_median = median(&bytes);
            f.add_bytes_p90 = percentile(&bytes, 90.0);
            f.add_bytes_max = bytes.iter().copied().max();
        }
    }
    for form in ["whole", "delta"] {
        for what in ["assignments_sent_total", "assignment_bytes_total"] {
            let name = format!("ironmesh_controller_{what}{{form=\"{form}\"}}");
            if let Some(v) = scrape(&spec, &name).await {
                f.controller_sent
                    .push((format!("{what}{{form={form}}}"), v));
            }
        }
    }

    // 7. kill -9 and restart.
    let (uids_before, _) = instance_uids(&mut op).await?;
    f.disconnects_before_restart = fleet.disconnect_reasons();
    let before = fleet.nodes();
    let starts_before: u64 = before.iter().map(|s| s.started_instances).sum();
    tracing::info!("kill -9 of the controller (pid {})", ctl.pid());
    let tk = Instant::now();
    ctl.kill9();
    let mut ctl = spec.spawn(&dir.join("controller-2.log"))?;
    spec.wait_serving(&mut ctl, Duration::from_secs(120))
        .await?;
    f.restart_controller_up = Some(tk.elapsed());
    let mut op = Operator::from_config_file(&spec.admin_config()).await?;
    let mut ph = Step::new(
        "every node back: Ready and acknowledged on a new stream",
        timeout,
    );
    f.restart_recovered = loop {
        ctl.check_alive()?;
        let now = fleet.nodes();
        let synced = now
            .iter()
            .zip(&before)
            .filter(|(a, b)| {
                a.phase == Phase::Connected && a.sessions > b.sessions && a.session_acks > 0
            })
            .count();
        if synced == n {
            // The controller may still be starting its API for operators.
            match nodes_ready(&mut op).await {
                Ok(r) if r >= n => break Some(tk.elapsed()),
                Ok(r) => ph.progress(|| format!("{synced} synced, {r} Ready")),
                Err(e) => ph.progress(|| format!("{synced} synced; listing nodes: {e}")),
            }
        } else {
            ph.progress(|| format!("{synced}/{n} synced on a new stream"));
        }
        if ph.expired() {
            f.notes.push(format!(
                "restart: only {synced}/{n} nodes back on a new stream after {timeout:?}"
            ));
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Watch for evictions (NotReady past the grace, then the eviction
    // delay) before comparing instances.
    let observe = Duration::from_secs(args.observe_seconds);
    tracing::info!("watching {observe:?} for evictions after the restart");
    tokio::time::sleep(observe).await;
    let (uids_after, running_after) = instance_uids(&mut op).await?;
    f.recreated = Some(
        uids_before
            .iter()
            .filter(|(name, uid)| uids_after.get(*name) != Some(uid))
            .count(),
    );
    f.instances_after = Some(running_after);
    f.restart_new_starts = fleet
        .nodes()
        .iter()
        .map(|s| s.started_instances)
        .sum::<u64>()
        - starts_before;
    f.readiness_transitions = scrape(
        &spec,
        "ironmesh_controller_node_readiness_transitions_total",
    )
    .await;
    for (why, count) in fleet.disconnect_reasons() {
        let before = f.disconnects_before_restart.get(&why).copied().unwrap_or(0);
        if count > before {
            f.disconnects_restart.insert(why, count - before);
        }
    }
    let delta_errors: u64 = fleet.nodes().iter().map(|s| s.delta_errors).sum();
    if delta_errors > 0 {
        f.notes.push(format!(
            "{delta_errors} deltas did not apply (each cost a reconnect)"
        ));
    }

    drop(fleet);
    ctl.terminate(Duration::from_secs(5));
    if let Some(mut e) = etcd {
        e.terminate(Duration::from_secs(5));
    }
    Ok(f)
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} s", d.as_secs_f64()))
        .unwrap_or_else(|| "not reached".into())
}

fn millis(d: Option<Duration>) -> String {
    d.map(|d| format!("{} ms", d.as_millis()))
        .unwrap_or_else(|| "not reached".into())
}

fn mb(b: u64) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

/// Bytes in B, kB or MB (decimal), whichever reads best.
fn size(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b} B"),
        10_000..=9_999_999 => format!("{:.1} kB", b as f64 / 1e3),
        _ => format!("{:.1} MB", b as f64 / 1e6),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "MISSED",
    }
}

/// Prints one run's figures; returns whether all met their targets.
fn print_figures(f: &Figures, command: &str, args: &BenchArgs) -> bool {
    let n = thousands(f.nodes as u64);
    let r = thousands(f.replicas);
    let rows: Vec<(String, String, &str, Option<bool>)> = vec![
        (
            format!("{n} nodes join → all Ready"),
            secs(f.ready),
            "≤ 30 s",
            f.ready.map(|d| d <= Duration::from_secs(30)),
        ),
        (
            format!("one Workload of {r} replicas → {r}/{r} Running"),
            secs(f.running),
            "≤ 20 s",
            f.running.map(|d| d <= Duration::from_secs(20)),
        ),
        (
            "controller RSS after the rollout".into(),
            mb(f.rss),
            "≤ 250 MB",
            Some(f.rss <= 250_000_000),
        ),
        (
            format!(
                "controller CPU, {n} nodes heartbeating, nothing changing ({} s)",
                f.idle_window.as_secs()
            ),
            f.idle_cpu_pct
                .map(|p| format!("{p:.1} % of one core"))
                .unwrap_or_else(|| "not measured".into()),
            "≤ 5 %",
            f.idle_cpu_pct.map(|p| p <= 5.0),
        ),
        (
            "one Policy change → acknowledged by all nodes".into(),
            millis(f.policy_acked),
            "≤ 2 s",
            f.policy_acked.map(|d| d <= Duration::from_secs(2)),
        ),
        (
            "one instance added → bytes to each other node, median".into(),
            f.add_bytes_median
                .map(|b| format!("{} B", thousands(b)))
                .unwrap_or_else(|| "not reached".into()),
            "≤ 1 KB",
            f.add_bytes_median.map(|b| b <= 1024),
        ),
        (
            "kill -9 of the controller → all Ready and acknowledged again".into(),
            secs(f.restart_recovered),
            "≤ 30 s",
            f.restart_recovered.map(|d| d <= Duration::from_secs(30)),
        ),
        (
            "instances recreated by the restart".into(),
            f.recreated
                .map(|c| c.to_string())
                .unwrap_or_else(|| "not measured".into()),
            "0",
            f.recreated.map(|c| c == 0),
        ),
    ];
    println!();
    println!("## {} nodes, {} replicas, store {}", n, r, f.store);
    println!();
    println!("command: {command}");
    println!(
        "controller: {} --cluster-cidr {} --node-cidr-prefix {}{}{}{}",
        args.controller_bin.display(),
        args.cluster_cidr,
        args.node_cidr_prefix,
        args.heartbeat_interval
            .as_ref()
            .map(|h| format!(" --heartbeat-interval {h}"))
            .unwrap_or_default(),
        args.node_grace
            .as_ref()
            .map(|g| format!(" --node-grace {g}"))
            .unwrap_or_default(),
        args.eviction_delay
            .as_ref()
            .map(|e| format!(" --eviction-delay {e}"))
            .unwrap_or_default(),
    );
    println!();
    println!("| figure | measured | target | |");
    println!("|---|---|---|---|");
    let mut all_ok = true;
    for (what, measured, target, ok) in &rows {
        all_ok &= *ok == Some(true);
        println!("| {what} | {measured} | {target} | {} |", verdict(*ok));
    }
    println!();
    println!("details:");
    println!(
        "  controller RSS empty {}, {} nodes joined {}, after rollout {}, after the idle window {}, peak {}",
        mb(f.rss_empty),
        f.nodes,
        mb(f.rss_joined),
        mb(f.rss),
        mb(f.rss_idle),
        mb(f.rss_peak)
    );
    println!(
        "  fleet reported all instances Running after {}",
        secs(f.reported)
    );
    let rr = &f.rollout_received;
    println!(
        "  rollout: the fleet received {} whole assignments ({}) and {} deltas ({}), {} per node",
        thousands(rr.whole_msgs),
        size(rr.whole_bytes),
        thousands(rr.delta_msgs),
        size(rr.delta_bytes),
        size(rr.bytes() / f.nodes.max(1) as u64)
    );
    if let Some(m) = f.mismatched_nodes {
        println!("  nodes whose instances differ from what the controller bound to them: {m}");
    }
    println!(
        "  assignments received during the idle window: {}",
        f.idle_assignment_msgs
    );
    println!(
        "  policy: every node acknowledged revision ≥ the apply's after {}; median bytes per node {}",
        millis(f.policy_acked_rev),
        f.policy_bytes_median
            .map(|b| format!("{} B", thousands(b)))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  instance added: p90 {} B, max {} B; fleet got {} whole / {} delta messages",
        f.add_bytes_p90.map(thousands).unwrap_or_else(|| "-".into()),
        f.add_bytes_max.map(thousands).unwrap_or_else(|| "-".into()),
        f.add_msgs.whole_msgs,
        f.add_msgs.delta_msgs
    );
    println!(
        "  restart: controller serving again after {}; {} instances Running after; {} instances started anew by the fleet; {} readiness transitions written by the new controller",
        secs(f.restart_controller_up),
        f.instances_after
            .map(|c| thousands(c as u64))
            .unwrap_or_else(|| "-".into()),
        f.restart_new_starts,
        f.readiness_transitions
            .map(|t| format!("{t}"))
            .unwrap_or_else(|| "-".into())
    );
    let cpu = |what: &str, v: Option<CpuUse>| {
        if let Some(u) = v {
            println!(
                "  {what} CPU time: controller {:.1} s, simulator {:.1} s, other processes {:.1} s, interrupts {:.1} s, stolen by the hypervisor {:.1} s",
                u.controller.as_secs_f64(),
                u.sim.as_secs_f64(),
                u.others.as_secs_f64(),
                u.interrupts.as_secs_f64(),
                u.steal.as_secs_f64()
            );
        }
    };
    cpu("rollout", f.rollout_cpu);
    cpu("idle window", f.idle_cpu);
    for (why, count) in &f.disconnects_before_restart {
        println!("  streams ended before the restart: {count} × {why}");
    }
    for (why, count) in &f.disconnects_restart {
        println!("  streams ended by the restart: {count} × {why}");
    }
    for (k, v) in &f.controller_sent {
        println!("  controller (first process) {k} = {v}");
    }
    for note in &f.notes {
        println!("  note: {note}");
    }
    if args.keep || args.work_dir.is_some() {
        println!("  logs and data: {}", f.work_dir);
    }
    all_ok
}

fn print_curve(all: &[Figures]) {
    println!();
    println!("## cost per node");
    println!();
    println!("| nodes | replicas | join → Ready | rollout | RSS | RSS per node (above empty) | idle CPU | idle CPU per 1,000 nodes | policy ack | add: bytes/node | restart | recreated |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in all {
        let per_node = f.rss.saturating_sub(f.rss_empty) / f.nodes.max(1) as u64;
        println!(
            "| {} | {} | {} | {} | {} | {} KB | {} | {} | {} | {} | {} | {} |",
            thousands(f.nodes as u64),
            thousands(f.replicas),
            secs(f.ready),
            secs(f.running),
            mb(f.rss),
            per_node / 1000,
            f.idle_cpu_pct
                .map(|p| format!("{p:.1} %"))
                .unwrap_or_else(|| "-".into()),
            f.idle_cpu_pct
                .map(|p| format!("{:.1} %", p * 1000.0 / f.nodes.max(1) as f64))
                .unwrap_or_else(|| "-".into()),
            millis(f.policy_acked),
            f.add_bytes_median
                .map(|b| format!("{} B", thousands(b)))
                .unwrap_or_else(|| "-".into()),
            secs(f.restart_recovered),
            f.recreated
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
