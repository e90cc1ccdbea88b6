//! `ironmesh-agent`: see `--help`.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ironmesh_agent::config::{default_node_name, AgentConfig};
use ironmesh_agent::datapath::{Datapath, DatapathConfig};
use ironmesh_agent::host_networking::HostNetworking;
use ironmesh_agent::image_fetch::ControllerImages;
use ironmesh_agent::metrics::AgentMetrics;
use ironmesh_agent::network::{Network, NetworkConfig};
use ironmesh_agent::node_clients::NodeClients;
use ironmesh_agent::node_identity::{load_or_join, JoinParams};
use ironmesh_agent::renewal::Renewal;
use ironmesh_agent::runtime::{Runtime, RuntimeConfig};
use ironmesh_agent::supervisor::{InstanceNetworking, Supervisor, SupervisorConfig};
use ironmesh_agent::sync::{self, SyncConfig};

fn main() -> anyhow::Result<()> {
    let cfg = AgentConfig::parse();
    ironmesh_process::init_logging(cfg.log_format, &cfg.log_level)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(run(cfg));
    // Blocking work still running (an inventory read, a layer unpack) must
    // not hold the exit: containers keep running without the agent.
    rt.shutdown_timeout(std::time::Duration::from_millis(300));
    if let Err(e) = r {
        tracing::error!(error = %format!("{e:#}"), "agent failed");
        eprintln!("ironmesh-agent: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let (shutdown, _tx) = ironmesh_process::Shutdown::on_signals()?;
    let node_name = cfg.node_name.clone().unwrap_or_else(default_node_name);
    let ca_pem = match &cfg.ca_cert {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --ca-cert {}", p.display()))?,
        ),
        None => None,
    };
    // The token is read only for a first join: once the node has its
    // certificate the token is never read again (and the file may go).
    let joined_before =
        ironmesh_agent::node_identity::NodeIdentity::load(&cfg.state_dir, &node_name)?.is_some();
    let token = match (&cfg.bootstrap_token, &cfg.bootstrap_token_file) {
        _ if joined_before => None,
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(p)) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --bootstrap-token-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let started = std::time::Instant::now();
    let controllers: Vec<String> = cfg
        .controller
        .iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    anyhow::ensure!(!controllers.is_empty(), "--controller names no URL");
    // Join through the first controller that answers.
    let mut joined_with = None;
    for (i, url) in controllers.iter().enumerate() {
        match load_or_join(
            &cfg.state_dir,
            &node_name,
            JoinParams {
                controller: url,
                server_name: cfg.tls_server_name.as_deref(),
                ca_pem: ca_pem.clone(),
                bootstrap_token: token.clone(),
            },
        )
        .await
        {
            Ok(r) => {
                joined_with = Some(r);
                break;
            }
            Err(e) if i + 1 < controllers.len() => {
                tracing::warn!(controller = %url, error = %e, "cannot join through this controller; trying the next");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some((id, joined)) = joined_with else {
        anyhow::bail!("no controller answered");
    };
    if joined {
        tracing::info!(node = %node_name, elapsed_ms = started.elapsed().as_millis() as u64, "joined the cluster");
    } else {
        tracing::info!(node = %node_name, state_dir = %cfg.state_dir.display(), "reusing stored identity");
    }

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(AgentMetrics::new(&mut registry));
    let datapath = load_datapath(&cfg);
    let flow_metrics = datapath
        .as_ref()
        .ok()
        .map(|_| ironmesh_agent::datapath::FlowMetrics::register(&mut registry));
    let mesh_metrics = ironmesh_agent::mesh::MeshMetrics::register(&mut registry);
    let gateways = Arc::new(ironmesh_agent::gateway::Gateways::new(Arc::new(
        ironmesh_agent::gateway::metrics::GatewayMetrics::register(&mut registry),
    )));
    let (_addr, metrics_task) =
        ironmesh_process::serve_metrics(cfg.metrics_listen, Arc::new(registry), shutdown.clone())
            .await?;

    let runtime = Runtime::connect(RuntimeConfig::new(
        &cfg.containerd_socket,
        cfg.containerd_namespace.clone(),
    ))
    .await
    .context("containerd is required (start it, or point --containerd-socket at it)")?;
    tracing::info!(
        socket = %cfg.containerd_socket.display(),
        namespace = %cfg.containerd_namespace,
        version = %runtime.version().await.unwrap_or_default(),
        "connected to containerd"
    );
    // Image fetches use their own connection so that a large pull never
    // queues behind (or starves) the sync stream.
    // With several controllers a blob may be held by only the one it was
    // pushed to: a fetch the first cannot serve is asked of the others.
    // The clients follow the node certificate as it is renewed.
    let clients = NodeClients::new(controllers.clone(), cfg.tls_server_name.clone(), &id)?;
    let mut blob_clients = clients.current().to_vec();
    let work_queue = Arc::new(
        ironmesh_agent::work_queue::WorkQueueProxy::new(
            cfg.state_dir.join("q"),
            blob_clients.clone(),
        )
        .with_clients(clients.clone()),
    );
    let primary = blob_clients.remove(0);
    let images = Arc::new(
        ControllerImages::new(primary, runtime.clone(), cfg.state_dir.join("staging"))
            .with_fallbacks(blob_clients)
            .with_clients(clients.clone()),
    );
    let (identity_tx, identity_rx) = tokio::sync::watch::channel(id.clone());
    tokio::spawn(
        Renewal {
            state_dir: cfg.state_dir.clone(),
            controllers: controllers.clone(),
            server_name: cfg.tls_server_name.clone(),
            clients: clients.clone(),
        }
        .run(identity_tx, shutdown.clone()),
    );
    let mut net_cfg = NetworkConfig::new(&cfg.state_dir, &cfg.containerd_namespace);
    net_cfg.mtu = cfg.instance_mtu;
    let network = Arc::new(Network::new(net_cfg).context("cannot set up instance networking")?);
    let pools = cfg
        .storage_pools
        .iter()
        .map(|p| p.parse::<ironmesh_agent::storage::PoolConfig>())
        .collect::<Result<Vec<_>, _>>()?;
    let storage_cfg = ironmesh_agent::storage::StorageConfig {
        state_dir: cfg.state_dir.clone(),
        pools,
    };
    let storage = Arc::new(
        tokio::task::spawn_blocking(move || ironmesh_agent::storage::Storage::open(storage_cfg))
            .await
            .context("storage setup panicked")?
            .context("cannot set up storage pools")?,
    );
    let (mesh, proxied) = match (&datapath, cfg.mesh) {
        (Ok(dp), true) => {
            let certs = ironmesh_agent::mesh::certs::Certs::new(
                &cfg.state_dir.join("mesh"),
                &id.ca_pem,
                clients.clone(),
            )
            .context("cannot set up the node proxy's certificates")?;
            let (m, rx) =
                ironmesh_agent::mesh::Mesh::new(dp.clone(), certs, &id.node_name, mesh_metrics);
            (Some(m), Some(rx))
        }
        _ => (None, None),
    };
    let flows = match (&datapath, flow_metrics) {
        (Ok(dp), Some(m)) => ironmesh_agent::flow_export::spawn(dp.clone(), m, proxied),
        _ => None,
    };
    let host_net = Arc::new(HostNetworking {
        network: network.clone(),
        datapath: datapath.clone(),
        mesh: mesh.clone(),
    });
    let (reports_tx, reports_rx) = tokio::sync::mpsc::channel(1024);
    let supervisor = Arc::new(
        Supervisor::start_with_network(
            SupervisorConfig {
                backoff_base: cfg.restart_backoff,
                backoff_max: cfg.restart_backoff_max,
                stop_grace: cfg.stop_grace,
                storage: Some(storage.clone()),
                logs: ironmesh_agent::supervisor::rotate::LogLimits {
                    max_bytes: cfg.log_max_size,
                    max_files: cfg.log_max_files,
                },
                ..SupervisorConfig::new(&cfg.state_dir)
            },
            runtime,
            images,
            Some(host_net as Arc<dyn InstanceNetworking>),
            reports_tx,
        )
        .await?,
    );

    sync::run(
        SyncConfig {
            controllers,
            server_name: cfg.tls_server_name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            supervisor: supervisor.clone(),
            node_ip: cfg.node_ip,
            network,
            datapath_problem: datapath.as_ref().err().cloned(),
            datapath: datapath.ok(),
            cross_host: cfg.cross_host,
            vxlan_vni: cfg.vxlan_vni,
            storage: Some(storage),
            storage_report_interval: cfg.storage_report_interval,
            flows,
            work_queue: Some(work_queue),
            identity: Some(identity_rx),
            mesh,
            gateways: Some(gateways.clone()),
        },
        id,
        metrics,
        reports_rx,
        shutdown,
    )
    .await;
    gateways.stop().await;
    // Containers keep running: the next agent adopts them.
    match Arc::try_unwrap(supervisor) {
        Ok(s) => s.detach().await,
        Err(_) => tracing::warn!("supervisor still shared at shutdown; leaving it"),
    }
    // A scraper's keep-alive connection must not hold the exit.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(300), metrics_task).await;
    tracing::info!("agent stopped");
    Ok(())
}

/// Loads (or re-attaches to the pinned) datapath. Without it the node fails
/// closed: it reports `DatapathReady=False` with the reason (the controller
/// taints it NoSchedule) and starts no instance; the error says why.
fn load_datapath(cfg: &AgentConfig) -> Result<Arc<Datapath>, String> {
    let pin_dir = cfg.bpf_pin_dir.clone().unwrap_or_else(|| {
        std::path::Path::new("/sys/fs/bpf/ironmesh").join(&cfg.containerd_namespace)
    });
    if let Err(e) = ensure_bpffs() {
        tracing::error!(error = %e, "cannot mount bpffs at /sys/fs/bpf; the datapath is off and no instance starts here");
        return Err(format!("cannot mount bpffs at /sys/fs/bpf: {e}"));
    }
    let tunables = DatapathConfig {
        peer_redirect: cfg.datapath_peer_redirect,
        ..Default::default()
    };
    match Datapath::load_with(&pin_dir, &cfg.datapath_cgroup, tunables) {
        Ok(dp) => {
            tracing::info!(pin_dir = %pin_dir.display(), cgroup = %cfg.datapath_cgroup.display(), "datapath loaded");
            Ok(Arc::new(dp))
        }
        Err(e) => {
            tracing::error!(error = %e, pin_dir = %pin_dir.display(), "cannot load the datapath; the node reports DatapathReady=False and starts no instance");
            Err(e.to_string())
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf unless something is mounted there.
fn ensure_bpffs() -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    let target = std::ffi::CString::new("/sys/fs/bpf").map_err(std::io::Error::other)?;
    let fstype = std::ffi::CString::new("bpf").map_err(std::io::Error::other)?;
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
