//! `ironmesh-controller`: see `--help`.

use clap::Parser;
use ironmesh_controller::config::ControllerConfig;

/// jemalloc rather than glibc's malloc. Measured at 1,000 nodes and 10,000
/// instances (docs/scale.md): glibc kept ~90 MB more resident than was
/// live (arenas per worker thread, fragmentation that `malloc_trim` could
/// not return), 272 MB after the rollout against 226 MB with jemalloc
/// configured as below.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (`_RJEM_MALLOC_CONF` in the environment still
/// wins): a background thread returns freed pages after 1 s instead of
/// the default 10 s, so a rollout's burst of assignment buffers does not
/// stay resident, and freed pages go back at once (no "muzzy" stage).
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(run());
    // Blocking work still running (a store read, a git fetch) must not
    // hold the exit past the 5 s an operator is promised.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    r
}

async fn run() -> anyhow::Result<()> {
    let cfg = ControllerConfig::parse();
    ironmesh_process::init_logging(cfg.log_format, &cfg.log_level)?;
    let (shutdown, _tx) = ironmesh_process::Shutdown::on_signals()?;
    if let Err(e) = ironmesh_controller::server::run(cfg, shutdown).await {
        tracing::error!(error = %e, "controller failed");
        eprintln!("ironmesh-controller: {e}");
        std::process::exit(1);
    }
    Ok(())
}
