//! `ironmesh-controller`: see `--help`.

use clap::Parser;
use ironmesh_controller::config::ControllerConfig;

// glibc's per-thread arenas fragment under tokio's worker and blocking
// threads: at 1,000 nodes the controller held about twice the memory it
// used. mimalloc returns freed pages to the OS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = ControllerConfig::parse();
    ironmesh_daemon::init_logging(cfg.log_format, &cfg.log_level)?;
    let (shutdown, _tx) = ironmesh_daemon::Shutdown::on_signals()?;
    if let Err(e) = ironmesh_controller::server::run(cfg, shutdown).await {
        tracing::error!(error = %e, "controller failed");
        eprintln!("ironmesh-controller: {e}");
        std::process::exit(1);
    }
    Ok(())
}
