//! End-to-end tests of robustness: oversized input refused in words (not
//! the transport's), imctl tables that survive long values, and prompt,
//! clean exits on SIGTERM for the controller (with an agent connected) and
//! the agent (its containers keep running).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ironmesh_proto::v1::{ApplyRequest, Manifest};
use ironmesh_tests::{grpc, push_image, wait_for, Agent, Controller, ControllerOpts};
use serde_json::Value;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `imctl apply -f` of `yaml` written to a file; the output as it is.
fn apply_file(ctl: &Controller, name: &str, yaml: &str) -> std::process::Output {
    let path = ctl.dir.path().join(name);
    std::fs::write(&path, yaml).expect("write manifest");
    ctl.imctl(&["apply", "-f", path.to_str().expect("utf-8 path")])
}

fn workload_yaml(name: &str, image: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  replicas: 0\n"
    )
}

#[test]
fn oversized_input_is_refused_in_words_and_long_values_print() {
    let ctl = Controller::start(ControllerOpts::default());

    // A 2,000,000-character image: refused, naming the field and the limit,
    // in a message that does not quote all of it.
    let out = apply_file(
        &ctl,
        "huge-image.yaml",
        &workload_yaml("huge", &"i".repeat(2_000_000)),
    );
    assert!(!out.status.success(), "a 2 MB image must be refused");
    let err = stderr(&out);
    assert!(err.contains("spec.image"), "{err:.400}");
    assert!(
        err.contains("at most 255 characters, got 2000000"),
        "{err:.400}"
    );
    assert!(err.len() < 2_000, "the error is {} bytes", err.len());

    // A 10 MB apply: imctl says so before sending anything.
    let docs: String = (0..40)
        .map(|i| {
            format!(
                "---\napiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: w{i}\n  annotations:\n    big: {}\nspec:\n  image: web:1\n",
                "a".repeat(250_000)
            )
        })
        .collect();
    let out = apply_file(&ctl, "ten-mb.yaml", &docs);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("apply is 10.") && err.contains("the limit is 8 MiB: split it"),
        "{err:.400}"
    );

    // The server says the same to a client that does not check (not
    // tonic's "decoded message length too large").
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let status = rt.block_on(async {
        let creds = grpc::admin_creds(&ctl);
        let mut api = grpc::operator(&ctl, Some(&creds))
            .await
            .expect("connect")
            .max_encoding_message_size(64 << 20);
        let manifests = (0..10)
            .map(|i| Manifest {
                origin: format!("doc {i}"),
                json: serde_json::json!({
                    "apiVersion": "ironmesh.dev/v1", "kind": "Workload",
                    "metadata": {"name": format!("w{i}")},
                    "spec": {"image": "x".repeat(1_050_000)}
                })
                .to_string(),
            })
            .collect();
        api.apply(ApplyRequest {
            manifests,
            dry_run: false,
        })
        .await
        .expect_err("a 10 MB apply is refused")
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("apply is 10.") && status.message().contains("8 MiB"),
        "{}",
        status.message()
    );
    let listed = ctl.imctl_json(&["get", "workloads"]);
    assert!(
        listed["items"].as_array().is_none_or(Vec::is_empty),
        "nothing was applied: {listed}"
    );

    // The longest image the grammar allows prints cut with … in the table.
    let long_image = format!("r/{}:{}", "a".repeat(250), "t".repeat(128));
    ctl.apply_yaml(&workload_yaml("long", &long_image));
    for args in [
        &["get", "workloads"][..],
        &["get", "workloads", "-o", "wide"],
    ] {
        let out = ctl.imctl(args);
        assert!(out.status.success(), "imctl {args:?}: {}", stderr(&out));
        let table = String::from_utf8_lossy(&out.stdout);
        let row = table
            .lines()
            .find(|l| l.starts_with("long "))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(row.contains('…'), "{row}");
        assert!(row.chars().count() < 200, "{row}");
    }
    // The whole value is still there for -o json.
    let w = ctl.imctl_json(&["get", "workload", "long"]);
    assert_eq!(
        w.pointer("/spec/image").and_then(Value::as_str),
        Some(long_image.as_str())
    );
}

fn running_instance(ctl: &Controller, workload: &str, deadline: Duration) -> Value {
    wait_for(&format!("instance of {workload} running"), deadline, || {
        let v = ctl.imctl_json(&[
            "get",
            "instances",
            "-l",
            &format!("ironmesh.dev/workload={workload}"),
        ]);
        let items = v.get("items").and_then(Value::as_array).cloned()?;
        items.into_iter().find(|i| {
            i.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
                && i.pointer("/status/pid")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    > 0
        })
    })
}

fn alive(pid: u64) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[test]
fn sigterm_stops_controller_within_5s_and_agent_within_2s_leaving_containers() {
    let mut ctl = Controller::start(ControllerOpts::default());
    let mut agent = Agent::start(&ctl, "node-a");
    agent.wait_ready(&ctl, Duration::from_secs(90));
    push_image(&ctl, "records-server");
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: keep
spec:
  image: ironmesh/records-server:dev
  env:
    - name: LISTEN_ADDR
      value: 0.0.0.0:8080
  resources:
    cpu: 100m
    memory: 64Mi
",
    );
    let inst = running_instance(&ctl, "keep", Duration::from_secs(60));
    let pid = inst
        .pointer("/status/pid")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(alive(pid), "container process {pid} runs");

    // A watch open too: it must end with the reason, not hang.
    let (watch_out, watch_err) = (
        ctl.dir.path().join("watch.out"),
        ctl.dir.path().join("watch.err"),
    );
    let mut watch = std::process::Command::new(ironmesh_tests::bin("imctl"))
        .arg("--config")
        .arg(ctl.admin_config())
        .args(["get", "workloads", "-w"])
        .stdout(std::fs::File::create(&watch_out).expect("watch stdout"))
        .stderr(std::fs::File::create(&watch_err).expect("watch stderr"))
        .spawn()
        .expect("start imctl get -w");
    wait_for(
        "the watch to list the workload",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&watch_out)
                .ok()
                .filter(|o| o.contains("keep"))
        },
    );

    // The controller, with the agent's Sync stream open.
    let t = Instant::now();
    let st = ctl.proc.terminate(Duration::from_secs(5));
    let took = t.elapsed();
    let log = std::fs::read_to_string(ctl.dir.path().join("controller-1.log")).unwrap_or_default();
    let st =
        st.unwrap_or_else(|| panic!("controller still running 5 s after SIGTERM; log:\n{log}"));
    assert!(st.success(), "controller exit status {st:?}");
    assert!(log.contains("controller stopped"), "{log}");
    let watch_exit = wait_for("imctl get -w to end", Duration::from_secs(5), || {
        watch.try_wait().ok().flatten()
    });
    let said = std::fs::read_to_string(&watch_err).unwrap_or_default();
    assert!(!watch_exit.success(), "the watch ends with an error");
    assert!(
        said.contains("controller shutting down"),
        "imctl said: {said}"
    );
    println!("figures: controller exit after SIGTERM with a connected agent: {took:?}");

    // The agent heard why and reconnects at once; its container runs on.
    wait_for(
        "agent to see the controller leave",
        Duration::from_secs(5),
        || {
            agent
                .proc
                .log_text()
                .contains("controller is shutting down; reconnecting")
                .then_some(())
        },
    );
    assert!(alive(pid), "the container survives the controller");

    ctl.start_again("controller-2.log");
    agent.wait_ready(&ctl, Duration::from_secs(30));

    // The agent: exits within 2 s, the container keeps running.
    let t = Instant::now();
    let st = agent.proc.terminate(Duration::from_secs(2));
    let took = t.elapsed();
    let st = st.unwrap_or_else(|| {
        panic!(
            "agent still running 2 s after SIGTERM; log:\n{}",
            std::fs::read_to_string(&agent.proc.log).unwrap_or_default()
        )
    });
    assert!(st.success(), "agent exit status {st:?}");
    assert!(
        alive(pid),
        "the container keeps running after the agent left"
    );
    println!("figures: agent exit after SIGTERM: {took:?}");
}

/// Store file size in bytes.
fn store_bytes(ctl: &Controller) -> u64 {
    std::fs::metadata(ctl.data_dir().join("store.redb")).map_or(0, |m| m.len())
}

/// An hour of status churn compressed in time, on the node protocol: 20
/// instances of ~210 KB each (env near its limits), reported every
/// simulated second (3,600 reports), each changing every 10 s (restarts),
/// so 7,200 real writes and 64,800 repeats that change nothing. Without a
/// byte bound the history would hold ~1.5 GB. Run by hand:
/// `cargo test -p ironmesh-tests --test robustness status_churn -- --ignored --nocapture`
#[test]
#[ignore = "a benchmark (about 3 minutes); prints the figures for docs/scale.md"]
fn status_churn_keeps_store_and_rss_bounded() {
    use ironmesh_proto::v1::{agent_message::Msg, InstanceReport, InstanceState};
    // CHURN_HISTORY_BYTES=100Gi shows what a count-only bound does.
    let history = std::env::var("CHURN_HISTORY_BYTES").ok();
    let ctl = Controller::start(ControllerOpts {
        extra_args: history
            .iter()
            .flat_map(|h| ["--store-history-bytes".to_string(), h.clone()])
            .collect(),
        ..ControllerOpts::default()
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let node = rt
        .block_on(grpc::ProtocolNode::start(
            &ctl,
            "churn-1",
            &grpc::token(&ctl),
        ))
        .expect("protocol node joins");
    let env: String = (0..7)
        .map(|i| format!("    - name: E{i}\n      value: {}\n", "v".repeat(30_000)))
        .collect();
    ctl.apply_yaml(&format!(
        "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: churn\nspec:\n  image: web:1\n  replicas: 20\n  resources:\n    cpu: 10m\n    memory: 16Mi\n  env:\n{env}"
    ));
    let until = Instant::now() + Duration::from_secs(30);
    let assigned = loop {
        if let Some(a) = node.assignment().filter(|a| a.instances.len() == 20) {
            break a;
        }
        if Instant::now() > until {
            let out = ctl.imctl(&["get", "instances", "-o", "wide"]);
            panic!(
                "20 instances not assigned; assignment has {:?}; instances:\n{}",
                node.assignment().map(|a| a.instances.len()),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let base: std::net::Ipv4Addr = node
        .pod_cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("pod CIDR from Welcome");
    let ip = std::net::Ipv4Addr::from(u32::from(base) + 9).to_string();
    let state = |i: &ironmesh_proto::v1::InstanceAssignment, restarts: u32| InstanceState {
        name: i.name.clone(),
        phase: ironmesh_proto::v1::InstancePhase::Running.into(),
        ready: true,
        restarts,
        pid: 1000 + restarts,
        spec_generation: i.spec_generation,
        ip: ip.clone(),
        ..Default::default()
    };
    let report = |restarts: u32| {
        Msg::Instances(InstanceReport {
            full: true,
            instances: assigned
                .instances
                .iter()
                .map(|i| state(i, restarts))
                .collect(),
        })
    };
    let rev = |ctl: &Controller| {
        ctl.imctl_json(&["get", "workload", "churn"])
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Settle: the first report is a real change.
    rt.block_on(node.send(report(0)));
    let pid = ctl.proc.pid();
    let rss = || ironmesh_tests::rss_bytes(pid).unwrap_or(0);
    wait_for("first report recorded", Duration::from_secs(20), || {
        let v = ctl.imctl_json(&["get", "instances"]);
        v["items"]
            .as_array()
            .filter(|a| {
                a.iter()
                    .all(|i| i.pointer("/status/pid").and_then(Value::as_u64) == Some(1000))
            })
            .map(|_| ())
    });
    let (store0, rss0) = (store_bytes(&ctl), rss());
    println!(
        "figures: churn start: store {} KiB, controller RSS {} KiB",
        store0 / 1024,
        rss0 / 1024
    );
    let _ = rev(&ctl);
    let started = Instant::now();
    let mut peak_store = store0;
    let mut peak_rss = rss0;
    for second in 1..=3600u32 {
        rt.block_on(node.send(report(second / 10)));
        if second % 600 == 0 {
            // Let the controller catch up before reading figures.
            let want = 1000 + second / 10;
            let until =
                Instant::now() + Duration::from_secs(if history.is_some() { 300 } else { 60 });
            loop {
                let v = ctl.imctl_json(&["get", "instances"]);
                let pids: Vec<u64> = v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.pointer("/status/pid").and_then(Value::as_u64))
                    .collect();
                if pids.len() == 20 && pids.iter().all(|p| *p == u64::from(want)) {
                    break;
                }
                if Instant::now() > until {
                    let log = ctl.proc.log_text();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "reports up to second {second} not recorded: pids {pids:?}, stream ended {:?}; controller log:\n{}",
                        node.ended(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let (s, r) = (store_bytes(&ctl), rss());
            peak_store = peak_store.max(s);
            peak_rss = peak_rss.max(r);
            println!(
                "figures: after {} simulated min ({:?}): store {} KiB, controller RSS {} KiB",
                second / 60,
                started.elapsed(),
                s / 1024,
                r / 1024
            );
        }
    }
    assert!(
        node.ended().is_none(),
        "the stream stayed up: {:?}",
        node.ended()
    );
    println!(
        "figures: 1 h of churn in {:?}: store peak {} MiB (start {} MiB), controller RSS peak {} MiB (start {} MiB)",
        started.elapsed(),
        peak_store >> 20,
        store0 >> 20,
        peak_rss >> 20,
        rss0 >> 20
    );
    if history.is_some() {
        return;
    }
    // 64 MiB of history plus the live objects and redb's free pages.
    assert!(peak_store < 256 << 20, "store grew to {peak_store} bytes");
    assert!(
        peak_rss < rss0 + (256 << 20),
        "RSS grew from {rss0} to {peak_rss}"
    );
}
