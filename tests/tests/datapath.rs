//! End-to-end tests of the eBPF datapath on two fake hosts: identity policy
//! applied and removed as map writes (no restarts), and a Service VIP
//! balanced in the kernel across ready backends.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ironmesh_tests::{images_dir, wait_for, Agent, Controller, ControllerOpts};
use serde_json::Value;

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn apply(ctl: &Controller, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = ctl.imctl(&["apply", "-f", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn instances(ctl: &Controller, workload: &str) -> Vec<Value> {
    ctl.imctl_json(&[
        "get",
        "instances",
        "-l",
        &format!("ironmesh.dev/workload={workload}"),
    ])
    .get("items")
    .and_then(Value::as_array)
    .cloned()
    .unwrap_or_default()
}

fn instance_netns(agent: &Agent, instance: &str) -> PathBuf {
    PathBuf::from("/run/ironmesh")
        .join(agent.containerd.namespace())
        .join("netns")
        .join(instance)
}

/// True if a TCP connection from inside the namespace at `from` opens.
fn connects(from: PathBuf, to: SocketAddr) -> bool {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&from).expect("netns");
        // SAFETY: setns on a valid namespace fd changes only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        std::net::TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok()
    })
    .join()
    .expect("connect thread")
}

#[test]
fn policy_flips_without_restarts_and_a_service_vip_reaches_ready_backends() {
    let ctl = Controller::start(ControllerOpts::default());
    let agents: Vec<Agent> = ["h1", "h2"].iter().map(|n| Agent::start(&ctl, n)).collect();
    for a in &agents {
        wait_for(
            &format!("{} Ready", a.name),
            Duration::from_secs(30),
            || {
                ctl.node(&a.name)
                    .filter(|n| ironmesh_tests::ready_status(n).as_deref() == Some("True"))
            },
        );
    }
    let pids: Vec<u32> = agents.iter().map(|a| a.proc.pid()).collect();
    for image in ["records-server", "batch-step"] {
        let out = ctl.imctl(&["image", "push", images_dir().join(image).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    apply(
        &ctl,
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: api
  labels: {app: api}
spec:
  image: ironmesh/records-server:dev
  replicas: 2
  env: [{name: LISTEN_ADDR, value: \"0.0.0.0:8080\"}]
  readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: client
  labels: {team: analytics}
spec:
  image: ironmesh/batch-step:dev
  env: [{name: SLEEP_MS, value: \"600000\"}]
",
    );
    let api = wait_for("2 api instances ready", Duration::from_secs(60), || {
        let l = instances(&ctl, "api");
        (l.len() == 2
            && l.iter()
                .all(|i| i.pointer("/status/ready") == Some(&Value::Bool(true))))
        .then_some(l)
    });
    let client = wait_for("client running", Duration::from_secs(60), || {
        instances(&ctl, "client")
            .into_iter()
            .find(|i| s(i, "/status/phase") == "Running" && !s(i, "/status/ip").is_empty())
    });
    let client_agent = agents
        .iter()
        .find(|a| a.name == s(&client, "/spec/node"))
        .expect("client's agent");
    let from = instance_netns(client_agent, s(&client, "/metadata/name"));
    // The api instance on the other host: the flow crosses hosts.
    let remote = api
        .iter()
        .find(|i| s(i, "/spec/node") != client_agent.name)
        .expect("an api instance on the other host");
    let target = SocketAddr::new(s(remote, "/status/ip").parse::<IpAddr>().unwrap(), 8080);

    assert!(connects(from.clone(), target), "no policy: allowed");

    // Selecting api with a rule for another team: default-deny for client.
    apply(
        &ctl,
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: api-readers
spec:
  selector: {app: api}
  ingress:
    - from: [{selector: {team: other}}]
      ports: [{port: 8080}]
",
    );
    wait_for("client denied", Duration::from_secs(20), || {
        (!connects(from.clone(), target)).then_some(())
    });

    // Allow analytics: a map write, and the flow passes.
    apply(
        &ctl,
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: api-readers
spec:
  selector: {app: api}
  ingress:
    - from: [{selector: {team: analytics}}]
      ports: [{port: 8080}]
",
    );
    wait_for("client allowed", Duration::from_secs(20), || {
        connects(from.clone(), target).then_some(())
    });

    // The Service VIP balances across the ready api instances.
    apply(
        &ctl,
        "apiVersion: ironmesh.dev/v1
kind: Service
metadata:
  name: api
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}]
",
    );
    let vip = wait_for("service VIP", Duration::from_secs(20), || {
        let v = ctl.imctl_json(&["get", "services", "api"]);
        let ip = s(&v, "/status/clusterIP").to_string();
        (!ip.is_empty()).then_some(ip)
    });
    assert!(vip.starts_with("10.96."), "{vip}");

    // Deleting the policy returns to default-allow; nothing restarted.
    assert!(ctl
        .imctl(&["delete", "policy", "api-readers"])
        .status
        .success());
    wait_for("allowed again", Duration::from_secs(20), || {
        connects(from.clone(), target).then_some(())
    });
    let now: Vec<u32> = agents.iter().map(|a| a.proc.pid()).collect();
    assert_eq!(now, pids, "agents were not restarted");
    for a in &agents {
        let pins = PathBuf::from("/sys/fs/bpf/ironmesh").join(a.containerd.namespace());
        assert!(pins.exists(), "{} pinned its datapath", a.name);
    }
}
