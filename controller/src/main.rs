//! `ironmesh-controller`: see `--help`.

use clap::Parser;
use ironmesh_controller::config::ControllerConfig;

fn main() -> anyhow::Result<()> {
    // glibc gives each thread that allocates its own arena; with tokio's
    // workers and blocking threads the controller held ~15 % more memory
    // than it used at 1,000 nodes (docs/scale.md). Two arenas keep that
    // fragmentation down; MALLOC_ARENA_MAX in the environment still wins.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; this runs
        // before the runtime starts any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
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
    ironmesh_daemon::init_logging(cfg.log_format, &cfg.log_level)?;
    let (shutdown, _tx) = ironmesh_daemon::Shutdown::on_signals()?;
    if let Err(e) = ironmesh_controller::server::run(cfg, shutdown).await {
        tracing::error!(error = %e, "controller failed");
        eprintln!("ironmesh-controller: {e}");
        std::process::exit(1);
    }
    Ok(())
}
