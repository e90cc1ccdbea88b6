//! End-to-end tests of the mesh (mTLS between hosts) on two fake hosts:
//! what crosses the bridge is encrypted, strict instances refuse
//! plaintext, Policy is judged at the destination proxy by the
//! certificate's identity, and a deleted (revoked) node's proxy is refused.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ironmesh_tests::{capture, images_dir, succeeded, wait_for, Agent, Controller, ControllerOpts};
use serde_json::Value;

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn instances(ctl: &Controller, workload: &str) -> Vec<Value> {
    let v = ctl.imctl_json(&[
        "get",
        "instances",
        "-l",
        &format!("ironmesh.dev/workload={workload}"),
    ]);
    v.get("items")
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

/// curl run as an instance's process would be: in its network namespace
/// and in the agent's cgroup subtree (where the socket programs are).
/// Returns the body, or None when the request failed.
fn curl_from(agent: &Agent, netns: &Path, url: &str) -> Option<String> {
    let cg = agent.containerd.datapath_cgroup().join("mesh-e2e-client");
    std::fs::create_dir_all(&cg).expect("client cgroup");
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec curl -s -m 3 {url}",
        cg.display()
    );
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("nsenter");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

fn workload_yaml(name: &str, node: &str, mode: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
  labels:
    app: {name}
spec:
  image: ironmesh/records-server:dev
  replicas: 1
  env:
    - name: LISTEN_ADDR
      value: 0.0.0.0:8080
  readinessProbe:
    tcpSocket:
      port: 8080
    periodSeconds: 1
  placement:
    nodeSelector:
      ironmesh.dev/hostname: {node}
  mesh:
    mode: {mode}
"
    )
}

struct Cluster {
    ctl: Controller,
    agents: Vec<Agent>,
}

impl Cluster {
    fn start() -> Cluster {
        let ctl = Controller::start(ControllerOpts {
            mesh_default_mode: "strict",
            ..ControllerOpts::default()
        });
        let agents: Vec<Agent> = ["m1", "m2"].iter().map(|n| Agent::start(&ctl, n)).collect();
        for a in &agents {
            a.wait_ready(&ctl, Duration::from_secs(90));
        }
        succeeded(
            ctl.imctl(&[
                "image",
                "push",
                images_dir().join("records-server").to_str().unwrap(),
            ]),
            "image push",
        );
        Cluster { ctl, agents }
    }

    fn ready(&self, workload: &str) -> Value {
        wait_for(
            &format!("{workload} ready"),
            Duration::from_secs(60),
            || {
                instances(&self.ctl, workload)
                    .into_iter()
                    .find(|i| i.pointer("/status/ready") == Some(&Value::Bool(true)))
            },
        )
    }

    fn agent(&self, inst: &Value) -> &Agent {
        let node = s(inst, "/spec/node");
        self.agents.iter().find(|a| a.name == node).expect("agent")
    }

    fn agent_metric(&self, agent: &Agent, sample: &str) -> f64 {
        let text = agent
            .host
            .http_get(agent.metrics, "/metrics")
            .unwrap_or_default();
        ironmesh_tests::metric(&text, sample).unwrap_or(0.0)
    }

    fn flows(&self, args: &[&str]) -> Vec<Value> {
        let mut a = vec!["flows", "-o", "json"];
        a.extend_from_slice(args);
        let out = self.ctl.imctl(&a);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn ip_of(inst: &Value) -> Ipv4Addr {
    s(inst, "/status/ip").parse().expect("instance address")
}

#[test]
fn cross_host_traffic_is_mtls_and_strict_instances_refuse_plaintext() {
    let c = Cluster::start();
    c.ctl.apply_yaml(&workload_yaml("server", "m2", "strict"));
    c.ctl.apply_yaml(&workload_yaml("client", "m1", "strict"));
    let server = c.ready("server");
    let client = c.ready("client");
    let (sa, ca) = (c.agent(&server), c.agent(&client));
    assert_ne!(sa.name, ca.name, "one per host");
    let server_ip = ip_of(&server);
    let client_ip = ip_of(&client);
    let client_ns = instance_netns(ca, s(&client, "/metadata/name"));

    // The client's connection goes through both proxies; the capture on
    // the bridge sees the tunnel port but never the payload.
    let secret = "mesh-secret-payload-4f1c9a";
    let url = format!("http://{server_ip}:8080/records/{secret}");
    let labels = "src=\"spiffe://ironmesh.local/workload/client\",dst=\"spiffe://ironmesh.local/workload/server\"";
    let outbound_ok = format!(
        "ironmesh_agent_mesh_connections_total{{direction=\"outbound\",result=\"ok\",{labels}}}"
    );
    // Until both ends have their certificates and listeners, strict
    // refuses (the client's first attempts may be plaintext SYNs).
    wait_for(
        "a request through the mesh",
        Duration::from_secs(30),
        || {
            curl_from(ca, &client_ns, &url)?;
            (c.agent_metric(ca, &outbound_ok) >= 1.0).then_some(())
        },
    );
    let cap = capture::Capture::start(&c.ctl.net.bridge).expect("capture on the bridge");
    let body = curl_from(ca, &client_ns, &url).expect("request through the mesh");
    for _ in 0..5 {
        assert!(
            curl_from(ca, &client_ns, &url).is_some(),
            "request through the mesh"
        );
    }
    let frames = cap.stop();
    assert!(
        body.contains("not found") || body.contains(secret) || !body.is_empty(),
        "{body}"
    );
    assert!(
        capture::tcp_port_frames(&frames, 15008) > 0,
        "the capture saw the HBONE tunnel ({} frames)",
        frames.len()
    );
    assert!(
        !capture::contains(&frames, secret.as_bytes()),
        "the payload crossed the bridge in plaintext"
    );
    assert!(
        capture::tcp_port_frames(&frames, 8080) == 0,
        "no plaintext connection to the service port crossed the bridge"
    );

    // Both proxies counted the connections, with both SPIFFE IDs.
    let out = c.agent_metric(ca, &outbound_ok);
    assert!(
        out >= 6.0,
        "outbound connections counted: {out}\n{}",
        ca.host
            .http_get(ca.metrics, "/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("agent_mesh"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let inb = c.agent_metric(
        sa,
        &format!(
            "ironmesh_agent_mesh_connections_total{{direction=\"inbound\",result=\"ok\",{labels}}}"
        ),
    );
    assert!(inb >= 6.0, "inbound connections counted: {inb}");

    // The server saw the client's own address, not the proxy's.
    let logs =
        String::from_utf8_lossy(&c.ctl.imctl(&["logs", s(&server, "/metadata/name")]).stdout)
            .to_string();
    assert!(
        logs.lines()
            .any(|l| l.contains(secret) && l.contains(&client_ip.to_string())),
        "server log names the client {client_ip}: {logs}"
    );

    // Flows through the proxies show mtls and both identities.
    let mtls = wait_for("mtls flows", Duration::from_secs(10), || {
        let f = c.flows(&[]);
        f.iter()
            .find(|r| r["mtls"] == Value::Bool(true) && r["hook"] == "proxy-inbound")
            .cloned()
    });
    assert_eq!(
        mtls["sourceSpiffeId"],
        "spiffe://ironmesh.local/workload/client"
    );
    assert_eq!(
        mtls["destinationSpiffeId"],
        "spiffe://ironmesh.local/workload/server"
    );
    assert_eq!(mtls["source"]["ip"], client_ip.to_string());

    // Plaintext from the other host itself is dropped in the datapath.
    let target = SocketAddr::new(IpAddr::V4(server_ip), 8080);
    let from_host = ca.host.within(move || {
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
    });
    assert!(
        !from_host,
        "a process on another host reached a strict instance in plaintext"
    );
    // And from a process on the server's own host.
    let on_host = sa.host.within(move || {
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
    });
    assert!(
        !on_host,
        "a process on the instance's own host reached it in plaintext"
    );
    // A forged source: the client instance's address sent from its host.
    let forged = ca.host.within(move || forged_connect(client_ip, target));
    assert!(!forged, "a forged source reached a strict instance");
    let dropped = wait_for("plaintext drops in flows", Duration::from_secs(10), || {
        let f = c.flows(&["--verdict", "plaintext"]);
        let from = |ip: Ipv4Addr| {
            f.iter().any(|r| {
                r["source"]["ip"] == ip.to_string()
                    && r["destination"]["ip"] == server_ip.to_string()
                    && r["destination"]["port"] == 8080
            })
        };
        (from(ca.host.addr) && from(sa.host.addr)).then_some(f.clone())
    });
    assert!(!dropped.is_empty());
    // The agent's own probes still reach it (the instance stays ready).
    assert_eq!(
        c.ready("server").pointer("/status/ready"),
        Some(&Value::Bool(true))
    );
}

/// A TCP connect from `src` (not an address of this host: IP_FREEBIND).
fn forged_connect(src: Ipv4Addr, dst: SocketAddr) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: plain socket(2); owned by the TcpStream below on success.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    let sin = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    };
    let local = sin(src, 0);
    // SAFETY: bind with a sockaddr_in.
    let r = unsafe {
        libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    // SAFETY: fd is ours.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    if r != 0 {
        return false;
    }
    let SocketAddr::V4(d) = dst else { return false };
    let _ = stream.set_nonblocking(true);
    let remote = sin(*d.ip(), d.port());
    // SAFETY: connect with a sockaddr_in (non-blocking: EINPROGRESS).
    unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    std::thread::sleep(Duration::from_millis(1500));
    stream.peer_addr().is_ok()
}

#[test]
fn policy_is_judged_by_certificate_identity_at_the_destination_proxy() {
    let c = Cluster::start();
    c.ctl.apply_yaml(&workload_yaml("api", "m2", "strict"));
    c.ctl.apply_yaml(&workload_yaml("reader", "m1", "strict"));
    let api = c.ready("api");
    let reader = c.ready("reader");
    let ra = c.agent(&reader);
    let reader_ns = instance_netns(ra, s(&reader, "/metadata/name"));
    let url = format!("http://{}:8080/records", ip_of(&api));
    wait_for("reader reaches api", Duration::from_secs(30), || {
        curl_from(ra, &reader_ns, &url)
    });

    // Only app=writer may reach api: reader's connections are refused by
    // the proxy in front of api, and shown as such.
    c.ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: api-writers-only
spec:
  selector: {app: api}
  ingress:
    - from: [{selector: {app: writer}}]
      ports: [{port: 8080}]
",
    );
    wait_for("reader refused", Duration::from_secs(30), || {
        curl_from(ra, &reader_ns, &url).is_none().then_some(())
    });
    let denied = wait_for(
        "denied flow at the destination proxy",
        Duration::from_secs(10),
        || {
            c.flows(&["--verdict", "dropped"])
                .into_iter()
                .find(|r| r["hook"] == "proxy-inbound" && r["mtls"] == Value::Bool(true))
        },
    );
    assert_eq!(
        denied["sourceSpiffeId"],
        "spiffe://ironmesh.local/workload/reader"
    );
    assert_eq!(denied["destination"]["port"], 8080);

    // Deleting the node revokes it: the other proxies refuse its
    // certificate (the Policy is lifted first, so only that stops it).
    succeeded(
        c.ctl.imctl(&["delete", "policy", "api-writers-only"]),
        "delete policy",
    );
    wait_for("reader reaches api again", Duration::from_secs(30), || {
        curl_from(ra, &reader_ns, &url)
    });
    let sa = c.agent(&api);
    let before = c.agent_metric(
        sa,
        "ironmesh_agent_mesh_handshake_failures_total{direction=\"inbound\"}",
    );
    succeeded(c.ctl.imctl(&["delete", "node", &ra.name]), "delete node");
    wait_for(
        "the deleted node's proxy refused",
        Duration::from_secs(30),
        || {
            (curl_from(ra, &reader_ns, &url).is_none()
                && c.agent_metric(
                    sa,
                    "ironmesh_agent_mesh_handshake_failures_total{direction=\"inbound\"}",
                ) > before)
                .then_some(())
        },
    );
}
