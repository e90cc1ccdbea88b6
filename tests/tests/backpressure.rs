//! End-to-end test of back-pressure: a log reader that stops reading
//! (`imctl logs -f` suspended with SIGSTOP) is dropped by the controller,
//! and the node it reads from keeps its heartbeats and stays Ready.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use ironmesh_tests::{bin, images_dir, metric, ready_status, wait_for, Agent, Controller};

/// A child process this test started, killed and reaped on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: signals to a child this test spawned and has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_suspended_log_follower_does_not_stop_the_nodes_heartbeats() {
    let ctl = Controller::start(Default::default());
    let agent = Agent::start(&ctl, "chatty-host");
    agent.wait_ready(&ctl, Duration::from_secs(30));
    let push = ctl.imctl(&[
        "image",
        "push",
        images_dir().join("batch-step").to_str().unwrap(),
    ]);
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: chatty
spec:
  image: ironmesh/batch-step:dev
  env:
    - name: SLEEP_MS
      value: \"600000\"
    - name: CHATTY_LINES_PER_SECOND
      value: \"20000\"
  resources:
    cpu: 10m
    memory: 16Mi
",
    );
    let instance = wait_for(
        "the chatty instance running",
        Duration::from_secs(60),
        || {
            let list = ctl.imctl_json(&["get", "instances"]);
            let i = list["items"].as_array()?.first()?.clone();
            (i.pointer("/status/phase")?.as_str()? == "Running")
                .then(|| i.pointer("/metadata/name")?.as_str().map(str::to_string))
                .flatten()
        },
    );

    // Follow its logs into a pipe nobody reads, then suspend the reader.
    let follower = Child(
        Command::new(bin("imctl"))
            .arg("--config")
            .arg(ctl.admin_config())
            .args(["logs", "-f", &instance])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start imctl logs -f"),
    );
    // The first bytes prove the relay is open; then nobody reads.
    let mut follower = follower;
    let mut out = follower.0.stdout.take().expect("piped stdout");
    let mut first = [0u8; 64];
    out.read_exact(&mut first).expect("the first log bytes");
    // SAFETY: a child this test spawned and has not reaped.
    unsafe {
        libc::kill(follower.0.id() as libc::pid_t, libc::SIGSTOP);
    }
    let heartbeats = |ctl: &Controller| {
        metric(
            &ctl.scrape_metrics().unwrap_or_default(),
            "ironmesh_controller_heartbeats_total",
        )
        .unwrap_or(0.0)
    };
    wait_for(
        "the controller to drop the reader that fell behind",
        Duration::from_secs(60),
        || {
            ctl.proc
                .log_text()
                .contains("log reader fell behind; request ended")
                .then_some(())
        },
    );
    // The node's heartbeats keep arriving, and it is Ready throughout.
    let before = heartbeats(&ctl);
    wait_for("five more heartbeats", Duration::from_secs(20), || {
        assert_eq!(
            ctl.node("chatty-host").and_then(|n| ready_status(&n)),
            Some("True".to_string()),
            "the node stays Ready"
        );
        (heartbeats(&ctl) >= before + 5.0).then_some(())
    });
    // A new reader is served: the relay is not stuck either.
    let out = ctl.imctl(&["logs", &instance, "--tail", "3"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("chatter"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(follower);
    drop(out);
}
