//! End-to-end tests of the container sandbox and of the agent's bounded
//! use of its host, on a real containerd and kernel: the default seccomp
//! filter (`Seccomp: 2` in the container's `/proc/self/status`), the pids
//! limit holding a fork bomb while the node stays Ready, runAsUser and
//! runAsNonRoot, capabilities outside Docker's default set refused to a
//! non-admin, container logs rotated under their cap, and a finished
//! step's shim released.
//!
//! The container images are a busybox image built here (busybox-static's
//! `/bin/busybox`, so `grep` and `sh` exist) and the project's batch-step.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ironmesh_images::{ImageFile, ImageSpec, LayerCompression};
use ironmesh_tests::{
    images_dir, instances, ready_status, str_at, wait_for, wait_instance, Agent, Controller,
    ControllerOpts,
};
use serde_json::Value;

const BUSYBOX: &str = "ironmesh.test/busybox:1";

/// Builds the busybox image into `dir` and pushes it.
fn push_busybox(ctl: &Controller, dir: &Path) {
    let mut spec = ImageSpec::new("ironmesh.test/busybox", "1");
    spec.entrypoint = vec!["/bin/busybox".into()];
    spec.env = vec!["PATH=/bin".into()];
    spec.compression = LayerCompression::None;
    spec.files = vec![ImageFile {
        path_in_image: "/bin/busybox".into(),
        source: "/bin/busybox".into(),
        mode: 0o755,
    }];
    let out = dir.join("busybox");
    ironmesh_images::build_layout(&spec, &out).expect("build the busybox image");
    push_dir(ctl, &out);
}

fn push_dir(ctl: &Controller, dir: &Path) {
    let out = ctl.imctl(&["image", "push", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "imctl image push {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn phase_is(p: &'static str) -> impl Fn(&Value) -> bool {
    move |i| str_at(i, "/status/phase") == p
}

fn logs(ctl: &Controller, instance: &str) -> String {
    let out = ctl.imctl(&["logs", instance]);
    assert!(
        out.status.success(),
        "imctl logs {instance}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn busybox_workload(name: &str, command: &[&str], extra: &str) -> String {
    let command: Vec<String> = command.iter().map(|c| format!("{c:?}")).collect();
    // `extra` may bring its own resources.
    let resources = if extra.contains("resources:") {
        String::new()
    } else {
        "  resources: {cpu: 100m, memory: 32Mi}\n".to_string()
    };
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
spec:
  image: {BUSYBOX}
  command: [{}]
{resources}{extra}",
        command.join(", ")
    )
}

/// The file of `controller` (cgroup v1 hierarchy) or unified (v2) of
/// `instance`'s cgroup.
fn cgroup_file(agent: &Agent, controller: &str, instance: &str, file: &str) -> Option<String> {
    let prefix = agent.containerd.cgroup_prefix();
    let rel = prefix.trim_start_matches('/');
    [
        PathBuf::from("/sys/fs/cgroup")
            .join(controller)
            .join(rel)
            .join(instance)
            .join(file),
        PathBuf::from("/sys/fs/cgroup")
            .join(rel)
            .join(instance)
            .join(file),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .map(|t| t.trim().to_string())
}

fn start(name: &str, args: &[&str]) -> (Controller, Agent, tempfile::TempDir) {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start_with_args(&ctl, name, args);
    agent.wait_ready(&ctl, Duration::from_secs(90));
    let dir = tempfile::tempdir().unwrap();
    push_busybox(&ctl, dir.path());
    (ctl, agent, dir)
}

#[test]
fn containers_run_under_seccomp_as_their_user_and_run_as_non_root_refuses_root() {
    let (ctl, mut agent, _dir) = start("node-a", &[]);
    let status = [
        "/bin/busybox",
        "grep",
        "-E",
        "^(Seccomp|Uid|Gid):",
        "/proc/self/status",
    ];
    ctl.apply_yaml(&busybox_workload(
        "confined",
        &status,
        "  restartPolicy: Never
  securityContext: {runAsUser: 1000, runAsGroup: 2000, runAsNonRoot: true}
",
    ));
    // Unconfined needs an admin: the harness's imctl is one.
    ctl.apply_yaml(&busybox_workload(
        "unconfined",
        &status,
        "  restartPolicy: Never
  securityContext: {seccompProfile: Unconfined}
",
    ));
    ctl.apply_yaml(&busybox_workload(
        "rooted",
        &["/bin/busybox", "true"],
        "  restartPolicy: Never
  securityContext: {runAsNonRoot: true}
",
    ));

    let i = wait_instance(
        &ctl,
        "confined",
        "Succeeded",
        Duration::from_secs(60),
        phase_is("Succeeded"),
    );
    let out = logs(&ctl, str_at(&i, "/metadata/name"));
    // Mode 2: a seccomp filter is installed.
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("Uid:\t1000\t1000\t1000\t1000"), "{out}");
    assert!(out.contains("Gid:\t2000\t2000\t2000\t2000"), "{out}");

    let i = wait_instance(
        &ctl,
        "unconfined",
        "Succeeded",
        Duration::from_secs(60),
        phase_is("Succeeded"),
    );
    let out = logs(&ctl, str_at(&i, "/metadata/name"));
    assert!(out.contains("Seccomp:\t0"), "{out}");
    assert!(out.contains("Uid:\t0\t0\t0\t0"), "{out}");

    // A finished instance's task is gone (its shim released); an agent
    // restarted meanwhile reports it finished, and does not run it again.
    let confined = instances(&ctl, "confined").remove(0);
    let confined = str_at(&confined, "/metadata/name").to_string();
    agent.restart_without_token(&ctl);
    agent.wait_ready(&ctl, Duration::from_secs(60));
    let i = wait_instance(
        &ctl,
        "confined",
        "Succeeded after the agent restart",
        Duration::from_secs(30),
        |i| {
            str_at(i, "/status/phase") == "Succeeded"
                && i.pointer("/status/exitCode") == Some(&Value::from(0))
        },
    );
    assert_eq!(
        i.pointer("/status/restarts")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        0,
        "{i:#}"
    );
    // Logs are read on the node: once the new agent's stream is up.
    let out = wait_for(
        "logs through the restarted agent",
        Duration::from_secs(30),
        || {
            let out = ctl.imctl(&["logs", &confined]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    );
    assert_eq!(out.matches("Seccomp:").count(), 1, "ran again: {out}");

    let i = wait_instance(
        &ctl,
        "rooted",
        "Failed",
        Duration::from_secs(60),
        phase_is("Failed"),
    );
    let message = str_at(&i, "/status/message");
    assert!(
        message.contains("runAsNonRoot is set but the process would run as uid 0")
            && message.contains("the image names no USER"),
        "{i:#}"
    );
}

#[test]
fn a_fork_bomb_stops_at_the_pids_limit_and_the_node_stays_ready() {
    let (ctl, agent, _dir) = start("node-b", &[]);
    // A shell forks sleepers until the kernel refuses (and dies of it);
    // PID 1 then says so and stays.
    ctl.apply_yaml(&busybox_workload(
        "bomb",
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox sh -c 'while :; do /bin/busybox sleep 300 & done'; echo bomb-stopped; exec /bin/busybox sleep 300",
        ],
        "  resources: {cpu: 200m, memory: 64Mi, pids: 32}
",
    ));
    ctl.apply_yaml(&busybox_workload(
        "calm",
        &["/bin/busybox", "sleep", "300"],
        "",
    ));
    let bomb = wait_instance(
        &ctl,
        "bomb",
        "Running",
        Duration::from_secs(60),
        phase_is("Running"),
    );
    let name = str_at(&bomb, "/metadata/name").to_string();
    let out = wait_for("the bomb stops", Duration::from_secs(60), || {
        let l = logs(&ctl, &name);
        l.contains("bomb-stopped").then_some(l)
    });
    assert!(out.contains("can't fork"), "{out}");
    assert_eq!(
        cgroup_file(&agent, "pids", &name, "pids.max").as_deref(),
        Some("32")
    );
    let current: u32 = cgroup_file(&agent, "pids", &name, "pids.current")
        .and_then(|c| c.parse().ok())
        .expect("pids.current of the bomb");
    assert!((20..=32).contains(&current), "pids.current {current}");
    let events = cgroup_file(&agent, "pids", &name, "pids.events").expect("pids.events");
    let refused: u64 = events
        .strip_prefix("max ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "pids.events: {events}");
    // The instance keeps running; nothing restarted it.
    let bomb = instances(&ctl, "bomb").remove(0);
    assert_eq!(str_at(&bomb, "/status/phase"), "Running", "{bomb:#}");

    // The default limit of a Workload that sets none.
    let calm = wait_instance(
        &ctl,
        "calm",
        "Running",
        Duration::from_secs(60),
        phase_is("Running"),
    );
    assert_eq!(
        cgroup_file(&agent, "pids", str_at(&calm, "/metadata/name"), "pids.max").as_deref(),
        Some("4096")
    );
    // The node keeps heartbeating and stays Ready.
    let heartbeat = |n: &Value| -> String {
        n.pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .map(|c| str_at(c, "/lastHeartbeatTime").to_string())
            .unwrap_or_default()
    };
    let before = heartbeat(&ctl.node("node-b").expect("node-b exists"));
    let node = wait_for(
        "a heartbeat after the bomb",
        Duration::from_secs(30),
        || ctl.node("node-b").filter(|n| heartbeat(n) != before),
    );
    assert_eq!(ready_status(&node).as_deref(), Some("True"), "{node:#}");
}

#[test]
fn capabilities_outside_the_default_set_need_an_admin() {
    let ctl = Controller::start(ControllerOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let ed = dir.path().join("ed.yaml");
    let out = ctl.imctl(&[
        "operator",
        "create",
        "ed",
        "--role",
        "edit",
        "--out",
        ed.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let module = write(
        "module.yaml",
        &busybox_workload(
            "kmod",
            &["/bin/busybox", "true"],
            "  capabilities: {add: [NET_RAW, SYS_MODULE]}\n",
        ),
    );
    let unconfined = write(
        "unconfined.yaml",
        &busybox_workload(
            "loose",
            &["/bin/busybox", "true"],
            "  securityContext: {seccompProfile: Unconfined}\n",
        ),
    );
    let raw = write(
        "raw.yaml",
        &busybox_workload(
            "pinger",
            &["/bin/busybox", "true"],
            "  capabilities: {add: [NET_RAW, NET_BIND_SERVICE]}\n",
        ),
    );
    let apply = |c: &Path, f: &Path| ctl.imctl_as(c, &["apply", "-f", f.to_str().unwrap()]);

    let out = apply(&ed, &module);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("operator ed (role edit) may not apply")
            && err.contains("Workload \"kmod\": spec.capabilities.add[1]: capability SYS_MODULE is outside the default set: that needs role admin"),
        "{err}"
    );
    let out = apply(&ed, &unconfined);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.securityContext.seccompProfile") && err.contains("needs role admin"),
        "{err}"
    );
    // Refused means not written.
    assert!(!ctl.imctl(&["get", "workloads", "kmod"]).status.success());

    // Docker's default capabilities are the editor's to add.
    let out = apply(&ed, &raw);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = apply(&ctl.admin_config(), &module);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wl = ctl.imctl_json(&["get", "workloads", "kmod"]);
    assert_eq!(
        wl.pointer("/spec/capabilities/add/1"),
        Some(&Value::from("SYS_MODULE"))
    );

    // A Source that may apply such Workloads is an admin's to make.
    let src = write(
        "src.yaml",
        "apiVersion: ironmesh.dev/v1
kind: Source
metadata:
  name: privileged-git
spec:
  repo: /nonexistent/repo.git
  allowPrivileged: true
",
    );
    let out = apply(&ed, &src);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.allowPrivileged"), "{err}");
}

#[test]
fn a_chatty_containers_logs_stay_under_the_cap_and_go_with_the_instance() {
    const MAX: u64 = 256 << 10;
    let (ctl, agent, _dir) = start(
        "node-c",
        &["--log-max-size", "256Ki", "--log-max-files", "2"],
    );
    // About 300 KB/s: ten 100-byte lines, then a 3 ms pause.
    let line = "x".repeat(99);
    let script = format!(
        "while :; do for i in 0 1 2 3 4 5 6 7 8 9; do echo {line}; done; /bin/busybox usleep 3000; done"
    );
    ctl.apply_yaml(&busybox_workload(
        "chatty",
        &["/bin/busybox", "sh", "-c", &script],
        "",
    ));
    let i = wait_instance(
        &ctl,
        "chatty",
        "Running",
        Duration::from_secs(60),
        phase_is("Running"),
    );
    let name = str_at(&i, "/metadata/name").to_string();
    let dir = agent.state_dir().join("instances").join(&name);
    wait_for("the log was rotated", Duration::from_secs(30), || {
        dir.join("stdout.log.1").exists().then_some(())
    });
    // Over several rotations: never more than two files, each within the
    // size plus what one check interval (250 ms) lets through.
    let slack = 192 << 10;
    let mut rotations = 0;
    let mut last_rotated = None;
    wait_for("five more rotations", Duration::from_secs(60), || {
        let live = std::fs::metadata(dir.join("stdout.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        let old = std::fs::metadata(dir.join("stdout.log.1")).ok();
        assert!(live <= MAX + slack, "stdout.log holds {live} bytes");
        if let Some(m) = &old {
            assert!(
                m.len() <= MAX + slack,
                "stdout.log.1 holds {} bytes",
                m.len()
            );
            let at = m.modified().ok();
            if at != last_rotated {
                rotations += 1;
                last_rotated = at;
            }
        }
        assert!(!dir.join("stdout.log.2").exists(), "a third file was kept");
        std::thread::sleep(Duration::from_millis(50));
        (rotations >= 5).then_some(())
    });
    // Rotated or not, the log still reads.
    assert!(logs(&ctl, &name).contains(&line));

    // The node reports what Ironmesh uses of its disk, logs included.
    let node = wait_for(
        "the node reports its disk use",
        Duration::from_secs(30),
        || {
            ctl.node("node-c").filter(|n| {
                n.pointer("/status/storage/diskUse/logBytes")
                    .and_then(Value::as_u64)
                    .is_some_and(|b| b > MAX)
            })
        },
    );
    let use_ = |k: &str| {
        node.pointer(&format!("/status/storage/diskUse/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    // Two streams of at most two files each.
    assert!(use_("logBytes") <= 4 * (MAX + slack), "{node:#}");
    assert!(
        use_("imageBytes") > 1 << 20,
        "busybox is over 1 MiB: {node:#}"
    );
    assert!(use_("stateBytes") > 0, "{node:#}");
    let out = ctl.imctl(&["describe", "node", "node-c"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("Disk use:") && l.contains("images") && l.contains("logs")),
        "{text}"
    );

    let out = ctl.imctl(&["delete", "workload", "chatty"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the instance's logs are removed",
        Duration::from_secs(30),
        || (!dir.exists()).then_some(()),
    );
}

/// containerd-shim processes serving `socket` (the agent's own containerd).
fn shims_of(socket: &Path) -> Vec<u32> {
    let socket = socket.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first().is_some_and(|a| a.contains("containerd-shim")) && args.contains(&socket)
        })
        .collect()
}

#[test]
fn finished_steps_hold_no_shim() {
    // 60 in CI; `IRONMESH_TEST_STEPS=200` for the full run.
    let steps: usize = std::env::var("IRONMESH_TEST_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "node-d");
    let _unmount = ironmesh_tests::Unmounter(vec![agent.dir.path().to_path_buf()]);
    agent.wait_ready(&ctl, Duration::from_secs(90));
    push_dir(&ctl, &images_dir().join("batch-step"));
    wait_for("the node reports its pool", Duration::from_secs(30), || {
        ctl.node("node-d")
            .filter(|n| n.pointer("/status/storage/pools/0/capacityBytes").is_some())
    });
    // Four waves, one after the other.
    let mut yaml = "apiVersion: ironmesh.dev/v1
kind: Pipeline
metadata:
  name: many
spec:
  runVolumeSize: 16Mi
  steps:
"
    .to_string();
    let waves = [
        ("a", None),
        ("b", Some("a")),
        ("c", Some("b")),
        ("d", Some("c")),
    ];
    let steps = steps / waves.len() * waves.len();
    for (n, after) in waves {
        yaml.push_str(&format!(
            "    - name: {n}
      image: ironmesh/batch-step:dev
      replicas: {}
      resources: {{cpu: 10m, memory: 16Mi}}
",
            steps / waves.len()
        ));
        if let Some(a) = after {
            yaml.push_str(&format!("      dependsOn: [{a}]\n"));
        }
    }
    ctl.apply_yaml(&yaml);
    let out = ctl.imctl(&["pipeline", "run", "many"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("pipelineruns/")
        .and_then(|s| s.strip_suffix(" created"))
        .expect("run name")
        .to_string();
    let v = wait_for("the run finishes", Duration::from_secs(180), || {
        let v = ctl.imctl_json(&["get", "pipelinerun", &run]);
        matches!(str_at(&v, "/status/phase"), "Succeeded" | "Failed").then_some(v)
    });
    assert_eq!(str_at(&v, "/status/phase"), "Succeeded", "{v:#}");
    let list = ctl.imctl_json(&[
        "get",
        "instances",
        "-l",
        &format!("ironmesh.dev/pipelinerun={run}"),
    ]);
    let items = list["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), steps, "{list:#}");
    assert!(items
        .iter()
        .all(|i| str_at(i, "/status/phase") == "Succeeded"));
    // Every step instance still exists (exit code, logs), none holds a shim.
    let shims = wait_for(
        "no shim of a finished step",
        Duration::from_secs(30),
        || {
            let s = shims_of(agent.containerd.socket());
            s.is_empty().then_some(s)
        },
    );
    assert!(shims.is_empty());
    let first = str_at(&items[0], "/metadata/name").to_string();
    let exit = items[0].pointer("/status/exitCode").and_then(Value::as_i64);
    assert_eq!(exit, Some(0), "{:#}", items[0]);
    let out = ctl.imctl(&["logs", &first]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_step_reaches_its_work_queue_socket_through_a_read_only_directory() {
    let (ctl, agent, _dir) = start("node-e", &[]);
    let _unmount = ironmesh_tests::Unmounter(vec![agent.dir.path().to_path_buf()]);
    wait_for("the node reports its pool", Duration::from_secs(30), || {
        ctl.node("node-e")
            .filter(|n| n.pointer("/status/storage/pools/0/capacityBytes").is_some())
    });
    // Exit 3: no socket; 4: the host directory took a write.
    ctl.apply_yaml(&format!(
        "apiVersion: ironmesh.dev/v1
kind: Pipeline
metadata:
  name: probe-queue
spec:
  runVolumeSize: 16Mi
  steps:
    - name: probe
      image: {BUSYBOX}
      command: [/bin/busybox, sh, -c, '[ -S /run/ironmesh/queue.sock ] || exit 3; /bin/busybox touch /run/ironmesh/planted && exit 4; echo read-only; exit 0']
      resources: {{cpu: 100m, memory: 32Mi}}
"
    ));
    let out = ctl.imctl(&["pipeline", "run", "probe-queue"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("pipelineruns/")
        .and_then(|s| s.strip_suffix(" created"))
        .expect("run name")
        .to_string();
    let v = wait_for("the run finishes", Duration::from_secs(60), || {
        let v = ctl.imctl_json(&["get", "pipelinerun", &run]);
        matches!(str_at(&v, "/status/phase"), "Succeeded" | "Failed").then_some(v)
    });
    assert_eq!(str_at(&v, "/status/phase"), "Succeeded", "{v:#}");
    let planted = std::fs::read_dir(agent.state_dir().join("q"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| d.path().join("planted").exists());
    assert!(
        !planted,
        "the container wrote into the agent's queue directory"
    );
}
