//! Fixtures of the agent's integration tests: the shared test kit
//! (`ironmesh-tests`: a private containerd removed on drop, the busybox
//! image layout, deadlines) and the agent's runtime client on that
//! containerd.
//!
//! containerd, runc and busybox-static must be installed
//! (`scripts/install-deps.sh`); without them the tests fail, they do not
//! skip.
#![allow(dead_code, unused_imports)] // each test binary uses its own part of the fixtures

use std::time::{Duration, Instant};

use ironmesh_agent::runtime::{Runtime, RuntimeConfig};
pub use ironmesh_tests::containerd::{kill, Containerd};
pub use ironmesh_tests::test_image::{busybox, busybox_layout, sha256, tar_entry, IMAGE};
pub use ironmesh_tests::{within, DEADLINE};

/// The agent's runtime settings for the fixture's containerd (runc state in
/// its private directory).
pub fn runtime_config(cd: &Containerd) -> RuntimeConfig {
    let mut config = RuntimeConfig::new(cd.socket(), cd.namespace());
    config.cgroup_prefix = cd.cgroup_prefix().to_string();
    config.runc_root = Some(cd.path("runc"));
    config
}

/// A new runtime client of `cd`; each call makes a new connection.
pub async fn runtime(cd: &Containerd) -> Runtime {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Runtime::connect(runtime_config(cd)).await {
            Ok(rt) => return rt,
            Err(e) if Instant::now() < deadline => {
                eprintln!("containerd not answering yet: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot connect to containerd: {e}\n{}", cd.log()),
        }
    }
}
