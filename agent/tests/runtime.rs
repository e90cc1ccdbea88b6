//! The runtime layer against a real containerd (Debian's 1.6) and runc.
//!
//! Each test starts its own containerd (see `common`) and removes all of it
//! when it ends, also when it fails. containerd, runc and busybox-static
//! must be installed (`scripts/install-deps.sh`); without them the tests
//! fail, they do not skip.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{busybox, busybox_layout, tar_entry, within, Containerd, DEADLINE, IMAGE};
use ironmesh_agent::runtime::{
    ImageChange, InstanceSpec, Resources, Runtime, RuntimeConfig, StopOutcome, TaskIo, TaskStatus,
};

#[tokio::test]
async fn import_twice_then_run_to_exit_code_with_logs() {
    let cd = Containerd::start("exit");
    let rt = common::runtime(&cd).await;
    let layout = busybox_layout(&cd.path("layout"), IMAGE);

    let mut last = None;
    let t = Instant::now();
    let first = rt
        .import_layout_with_progress(&layout, |p| last = Some(p.clone()))
        .await
        .unwrap();
    let first_time = t.elapsed();
    assert_eq!(first.blobs_written, 3, "{first:?}");
    assert_eq!(first.layers_unpacked, 1, "{first:?}");
    assert_eq!(first.images.len(), 1);
    assert_eq!(first.images[0].name, IMAGE);
    assert_eq!(first.images[0].change, ImageChange::Created);
    let last = last.expect("progress was reported");
    assert_eq!(last.written, first.bytes_written);
    assert_eq!(last.total, first.bytes_written);
    assert!(first.bytes_written > 1_000_000, "{first:?}");

    let t = Instant::now();
    let second = rt.import_layout(&layout).await.unwrap();
    let second_time = t.elapsed();
    assert!(second.is_noop(), "second import did something: {second:?}");
    assert_eq!(second.blobs_present, 3);
    assert_eq!(second.layers_present, 1);
    assert_eq!(second.images[0].chain_id, first.images[0].chain_id);
    println!(
        "FIGURE import of the busybox layout ({} bytes): first {first_time:?}, second (no-op) {second_time:?}",
        first.bytes_written
    );
    let resolved = rt.resolve_image(IMAGE).await.unwrap();
    assert_eq!(resolved.chain_id, first.images[0].chain_id);
    assert_eq!(resolved.defaults.env, ["PATH=/bin"]);

    let mut spec = InstanceSpec::new("hello", IMAGE);
    spec.args = busybox(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    let created = rt.create(&spec).await.unwrap();
    assert_eq!(created.chain_id, resolved.chain_id);
    let io = TaskIo::in_dir(cd.path("logs/hello"));
    let pid = rt.start("hello", &io).await.unwrap();
    assert!(pid > 0);
    let exit = within("wait", rt.wait("hello")).await.unwrap();
    assert_eq!(exit.code, 3);
    assert!(exit.exited_at.is_some());
    assert_eq!(fs::read_to_string(&io.stdout).unwrap(), "hello\n");
    assert_eq!(fs::read_to_string(&io.stderr).unwrap(), "oops\n");

    let task = rt.task("hello").await.unwrap().expect("stopped task kept");
    assert_eq!(task.status, TaskStatus::Stopped);
    assert_eq!(task.exit.map(|e| e.code), Some(3));
    assert_eq!(
        rt.stop("hello", Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyExited(task.exit.unwrap())
    );

    rt.delete("hello").await.unwrap();
    assert!(rt.list().await.unwrap().is_empty());
    assert!(!rt.snapshot_exists("hello").await.unwrap());
    // Deleting again is fine.
    rt.delete("hello").await.unwrap();

    // An unknown image is a clear NotFound, not a hang.
    let err = rt
        .create(&InstanceSpec::new("ghost", "ironmesh.test/none:1"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("Images.Get") && msg.contains("ironmesh.test/none:1"),
        "{msg}"
    );
    assert!(!rt.snapshot_exists("ghost").await.unwrap());
}

#[tokio::test]
async fn adopt_limits_exec_stop_delete() {
    let cd = Containerd::start("adopt");
    let rt = common::runtime(&cd).await;
    rt.import_layout(&busybox_layout(&cd.path("layout"), IMAGE))
        .await
        .unwrap();

    let mut spec = InstanceSpec::new("sleeper", IMAGE);
    spec.args = busybox(&["sleep", "1000"]);
    spec.resources = Resources {
        cpu_millis: Some(250),
        memory_bytes: Some(64 << 20),
    };
    spec.readonly_rootfs = true;
    spec.labels = HashMap::from([("ironmesh.dev/workload".to_string(), "sleepy".to_string())]);
    let created = rt.create(&spec).await.unwrap();
    assert_eq!(
        created.cgroups_path,
        format!("{}/sleeper", cd.cgroup_prefix())
    );
    let pid = rt
        .start("sleeper", &TaskIo::in_dir(cd.path("logs/sleeper")))
        .await
        .unwrap();

    // A new client (as after an agent restart) finds the same task.
    drop(rt);
    let rt = common::runtime(&cd).await;
    let listed = rt.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let c = &listed[0];
    assert_eq!(c.id, "sleeper");
    assert_eq!(c.image, IMAGE);
    assert_eq!(c.labels["ironmesh.dev/workload"], "sleepy");
    let task = c.task.as_ref().expect("task listed");
    assert_eq!(task.pid, pid);
    assert_eq!(task.status, TaskStatus::Running);
    // The runc options reached the shim: runc keeps its state in our root.
    assert!(
        cd.path("runc")
            .join(cd.namespace())
            .join("sleeper")
            .is_dir(),
        "runc state is not under the configured runc root"
    );
    // A task that has only just started may still be exec'ing (empty
    // cmdline for a moment): wait for it, with a deadline.
    let deadline = Instant::now() + DEADLINE;
    let cmdline = loop {
        let c = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        if !c.is_empty() || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(cmdline, b"/bin/busybox\x00sleep\x001000\x00");

    // Limits are in the cgroup (cgroup v1 host).
    let cg = |controller: &str, file: &str| {
        let path = format!("/sys/fs/cgroup/{controller}{}/{file}", created.cgroups_path);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "25000");
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert!(cg("memory", "cgroup.procs")
        .lines()
        .any(|l| l == pid.to_string()));

    // Exec: exit code and output; privileges as specified.
    let out = rt
        .exec(
            "sleeper",
            &busybox(&["sh", "-c", "echo probe; exit 7"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(out.stdout, b"probe\n");
    let status = rt
        .exec(
            "sleeper",
            &busybox(&["cat", "/proc/self/status"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let status = String::from_utf8(status.stdout).unwrap();
    // CHOWN DAC_OVERRIDE FOWNER KILL SETGID SETUID NET_BIND_SERVICE
    assert!(status.contains("CapEff:\t00000000000004eb"), "{status}");
    assert!(status.contains("CapBnd:\t00000000000004eb"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let write = rt
        .exec(
            "sleeper",
            &busybox(&["sh", "-c", "echo x > /x"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_ne!(write.exit_code, Some(0), "read-only rootfs was writable");
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Read-only file system"),
        "{write:?}"
    );
    let slow = rt
        .exec(
            "sleeper",
            &busybox(&["sleep", "100"]),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    assert_eq!(slow.exit_code, None, "timed-out exec reports no exit code");

    // busybox sleep as PID 1 ignores SIGTERM: stop must SIGKILL.
    let outcome = within("stop", rt.stop("sleeper", Duration::from_millis(300)))
        .await
        .unwrap();
    match outcome {
        StopOutcome::Killed(exit) => assert_eq!(exit.code, 137),
        other => panic!("expected a SIGKILL, got {other:?}"),
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            // A zombie is reaped by the shim; give it the deadline.
            let deadline = Instant::now() + DEADLINE;
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            !Path::new(&format!("/proc/{pid}")).exists()
        }
    );

    rt.delete("sleeper").await.unwrap();
    assert!(rt.list().await.unwrap().is_empty());
    assert!(rt.task("sleeper").await.unwrap().is_none());
    assert!(!rt.snapshot_exists("sleeper").await.unwrap());
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory{}", created.cgroups_path)).exists());
}

#[tokio::test]
async fn create_to_task_started_latency() {
    const RUNS: usize = 20;
    let cd = Containerd::start("bench");
    let rt = common::runtime(&cd).await;
    rt.import_layout(&busybox_layout(&cd.path("layout"), IMAGE))
        .await
        .unwrap();
    let mut started = Vec::with_capacity(RUNS);
    let mut cycle = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let id = format!("bench-{i}");
        let mut spec = InstanceSpec::new(&id, IMAGE);
        spec.args = busybox(&["true"]);
        spec.resources.memory_bytes = Some(32 << 20);
        let t = Instant::now();
        rt.create(&spec).await.unwrap();
        rt.start(&id, &TaskIo::in_dir(cd.path(&format!("logs/{id}"))))
            .await
            .unwrap();
        started.push(t.elapsed());
        assert_eq!(within("wait", rt.wait(&id)).await.unwrap().code, 0);
        rt.delete(&id).await.unwrap();
        cycle.push(t.elapsed());
    }
    assert!(rt.list().await.unwrap().is_empty());
    started.sort();
    cycle.sort();
    println!(
        "FIGURE create->task started over {RUNS} runs: median {:?}, min {:?}, p90 {:?}, max {:?}; \
         full cycle (create, start, wait, delete) median {:?}",
        started[RUNS / 2],
        started[0],
        started[RUNS * 9 / 10],
        started[RUNS - 1],
        cycle[RUNS / 2],
    );
}

#[tokio::test]
async fn missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let err = Runtime::connect(RuntimeConfig::new(&socket, "imtest"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot connect to containerd") && msg.contains("none.sock"),
        "{msg}"
    );
}

#[test]
fn layout_helper_writes_a_valid_tar() {
    // The tar helper's checksum and padding, checked against GNU tar.
    let dir = tempfile::tempdir().unwrap();
    let mut tar = Vec::new();
    tar_entry(&mut tar, "a/", b'5', 0o755, &[], "");
    tar_entry(&mut tar, "a/f", b'0', 0o644, b"data", "");
    tar_entry(&mut tar, "a/l", b'2', 0o777, &[], "f");
    tar.extend_from_slice(&[0u8; 1024]);
    let path = dir.path().join("t.tar");
    fs::File::create(&path).unwrap().write_all(&tar).unwrap();
    let out = Command::new("tar").arg("-tvf").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains("a/f") && listing.contains("a/l -> f"),
        "{listing}"
    );
}
