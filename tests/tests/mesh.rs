//! End-to-end tests of the mesh (mTLS between hosts) on two fake hosts:
//! what crosses the bridge is encrypted, strict instances refuse
//! plaintext, Policy is judged at the destination proxy by the
//! certificate's identity, and a deleted (revoked) node's proxy is refused.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ironmesh_tests::{
    capture, curl_in, images_dir, instance_netns, instances, str_at, succeeded, wait_for, Agent,
    Controller, ControllerOpts,
};
use serde_json::Value;

/// curl run as an instance's process would be: in its network namespace
/// and in the agent's cgroup subtree (where the socket programs are).
/// Returns the body, or None when the request failed.
fn curl_from(agent: &Agent, netns: &Path, url: &str) -> Option<String> {
    let cg = agent.containerd.datapath_cgroup().join("mesh-e2e-client");
    std::fs::create_dir_all(&cg).expect("client cgroup");
    curl_in(&cg, netns, url)
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
        Self::start_with(&[])
    }

    fn start_with(controller_args: &[&str]) -> Cluster {
        let ctl = Controller::start(ControllerOpts {
            mesh_default_mode: "strict",
            extra_args: controller_args.iter().map(|a| a.to_string()).collect(),
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
        let node = str_at(inst, "/spec/node");
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
    str_at(inst, "/status/ip")
        .parse()
        .expect("instance address")
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
    let client_ns = instance_netns(ca, str_at(&client, "/metadata/name"));

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
    let logs = String::from_utf8_lossy(
        &c.ctl
            .imctl(&["logs", str_at(&server, "/metadata/name")])
            .stdout,
    )
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

    // describe shows the workload's certificate and when it expires.
    let d = succeeded(c.ctl.imctl(&["describe", "workload", "server"]), "describe");
    assert!(
        d.contains("spiffe://ironmesh.local/workload/server on node m2, expires 20"),
        "{d}"
    );

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
    let reader_ns = instance_netns(ra, str_at(&reader, "/metadata/name"));
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

#[test]
fn certificates_rotate_under_a_connection_pool_without_failed_requests() {
    let c = Cluster::start_with(&["--workload-cert-lifetime", "30s"]);
    c.ctl.apply_yaml(&workload_yaml("server", "m2", "strict"));
    c.ctl.apply_yaml(&workload_yaml("client", "m1", "strict"));
    let server = c.ready("server");
    let client = c.ready("client");
    let ca = c.agent(&client);
    let client_ns = instance_netns(ca, str_at(&client, "/metadata/name"));
    let url = format!("http://{}:8080/records", ip_of(&server));
    wait_for(
        "a request through the mesh",
        Duration::from_secs(30),
        || curl_from(ca, &client_ns, &url),
    );
    let expiry = |w: &str| {
        let d = succeeded(c.ctl.imctl(&["describe", "workload", w]), "describe");
        d.lines()
            .filter(|l| l.starts_with("Certificate:"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (client_first, server_first) = (expiry("client"), expiry("server"));
    assert_eq!(client_first.len(), 1, "{client_first:?}");
    // Requests all through both renewals (at half of 30 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    let (mut ok, mut failed) = (0, 0);
    while std::time::Instant::now() < deadline
        && (expiry("client") == client_first || expiry("server") == server_first)
    {
        match curl_from(ca, &client_ns, &url) {
            Some(_) => ok += 1,
            None => failed += 1,
        }
    }
    assert_ne!(
        expiry("client"),
        client_first,
        "the client's certificate was renewed"
    );
    assert_ne!(
        expiry("server"),
        server_first,
        "the server's certificate was renewed"
    );
    for _ in 0..10 {
        match curl_from(ca, &client_ns, &url) {
            Some(_) => ok += 1,
            None => failed += 1,
        }
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across renewals",
        ok + failed
    );
}

// ---- Benchmark (scripts/bench-mesh.sh) ---------------------------------

mod bench {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    const BODY: usize = 1024;

    /// A keep-alive HTTP/1.1 server answering every request with 1 KB, and
    /// a sink on port+1 that counts what it gets, in `netns`.
    pub fn servers(netns: PathBuf, port: u16) {
        let (l, sink) = ironmesh_tests::netns::within(&netns, move || {
            (
                TcpListener::bind(("0.0.0.0", port)).expect("bench server"),
                TcpListener::bind(("0.0.0.0", port + 1)).expect("bench sink"),
            )
        });
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || serve(s));
            }
        });
        std::thread::spawn(move || {
            for mut s in sink.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    let mut n = 0u64;
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    let _ = s.write_all(&n.to_be_bytes());
                });
            }
        });
    }

    fn serve(mut s: TcpStream) {
        let _ = s.set_nodelay(true);
        let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
        resp.extend(std::iter::repeat_n(b'x', BODY));
        let mut buf = [0u8; 4096];
        let mut have = Vec::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => have.extend_from_slice(&buf[..n]),
            }
            while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                have.drain(..end + 4);
                if s.write_all(&resp).is_err() {
                    return;
                }
            }
        }
    }

    fn request(s: &mut TcpStream) -> bool {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if s.write_all(b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let want = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").len() + BODY;
        let mut got = 0;
        let mut buf = [0u8; 4096];
        while got < want {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got += n,
            }
        }
        true
    }

    /// Latencies (µs) of requests at `rate`/s for `secs` on one keep-alive
    /// connection, from `netns`.
    pub fn fixed_rate(netns: PathBuf, to: SocketAddr, rate: u32, secs: u64) -> Vec<f64> {
        ironmesh_tests::netns::within(&netns, move || {
            let mut s = TcpStream::connect(to).expect("bench connect");
            let _ = s.set_nodelay(true);
            assert!(request(&mut s), "warm-up request");
            let every = Duration::from_secs(1) / rate;
            let start = Instant::now();
            let n = rate as u64 * secs;
            let mut out = Vec::with_capacity(n as usize);
            for i in 0..n {
                let due = start + every * i as u32;
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let t = Instant::now();
                assert!(request(&mut s), "request {i}");
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
            out
        })
    }

    /// Times (µs) of connect + first request, `n` times.
    pub fn first_requests(netns: PathBuf, to: SocketAddr, n: usize) -> Vec<f64> {
        ironmesh_tests::netns::within(&netns, move || {
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    let mut s = TcpStream::connect(to).expect("bench connect");
                    let _ = s.set_nodelay(true);
                    assert!(request(&mut s), "first request");
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect()
        })
    }

    /// MB/s of one stream of `mb` MB to the sink.
    pub fn throughput(netns: PathBuf, to: SocketAddr, mb: usize) -> f64 {
        ironmesh_tests::netns::within(&netns, move || {
            let mut s = TcpStream::connect(to).expect("bench connect");
            let chunk = vec![7u8; 1 << 20];
            let t = Instant::now();
            for _ in 0..mb {
                s.write_all(&chunk).expect("send");
            }
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut n = [0u8; 8];
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            s.read_exact(&mut n).expect("count");
            assert_eq!(
                u64::from_be_bytes(n),
                (mb as u64) << 20,
                "sink got every byte"
            );
            mb as f64 / t.elapsed().as_secs_f64()
        })
    }

    /// `n` open keep-alive connections, each after one request.
    pub fn open_connections(netns: PathBuf, to: SocketAddr, n: usize) -> Vec<TcpStream> {
        ironmesh_tests::netns::within(&netns, move || {
            (0..n)
                .map(|_| {
                    let mut s = TcpStream::connect(to).expect("bench connect");
                    assert!(request(&mut s));
                    s
                })
                .collect()
        })
    }

    pub fn pct(v: &[f64], p: f64) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }

    /// CPU seconds (user + system) a process used so far.
    pub fn cpu_seconds(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat; after the ")" they are the 12th and 13th.
        let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

#[test]
#[ignore = "benchmark: scripts/bench-mesh.sh"]
fn bench_mesh_vs_plain_routed_path() {
    let c = Cluster::start();
    for (name, node, mode) in [
        ("srv-mesh", "m2", "strict"),
        ("cli-mesh", "m1", "strict"),
        ("srv-plain", "m2", "off"),
        ("cli-plain", "m1", "off"),
    ] {
        c.ctl.apply_yaml(&workload_yaml(name, node, mode));
    }
    let srv_m = c.ready("srv-mesh");
    let cli_m = c.ready("cli-mesh");
    let srv_p = c.ready("srv-plain");
    let cli_p = c.ready("cli-plain");
    let (a1, a2) = (c.agent(&cli_m), c.agent(&srv_m));
    let ns = |a: &Agent, i: &Value| instance_netns(a, str_at(i, "/metadata/name"));
    let (cm, cp) = (ns(a1, &cli_m), ns(c.agent(&cli_p), &cli_p));
    bench::servers(ns(a2, &srv_m), 9000);
    bench::servers(ns(c.agent(&srv_p), &srv_p), 9000);
    let to_m = SocketAddr::new(IpAddr::V4(ip_of(&srv_m)), 9000);
    let to_p = SocketAddr::new(IpAddr::V4(ip_of(&srv_p)), 9000);
    let sink = |a: SocketAddr| SocketAddr::new(a.ip(), 9001);

    // This process joins the agent's cgroup subtree, where an instance's
    // process lives, so its connects meet the capture program.
    let cg = a1.containerd.datapath_cgroup().join("mesh-bench");
    std::fs::create_dir_all(&cg).expect("bench cgroup");
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).expect("join cgroup");
    // Until the mesh carries the client's connections.
    let outbound_ok = "ironmesh_agent_mesh_connections_total{direction=\"outbound\",result=\"ok\",src=\"spiffe://ironmesh.local/workload/cli-mesh\",dst=\"spiffe://ironmesh.local/workload/srv-mesh\"}";
    wait_for("mesh path up", Duration::from_secs(30), || {
        let cm = cm.clone();
        let ok = ironmesh_tests::netns::within(&cm, move || {
            std::net::TcpStream::connect_timeout(&to_m, Duration::from_secs(1)).is_ok()
        });
        (ok && c.agent_metric(a1, outbound_ok) >= 1.0).then_some(())
    });

    let secs: u64 = std::env::var("MESH_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!("mesh bench: HTTP/1.1 keep-alive, 1 KB answers, 1000 req/s, {secs} s per round; plain = same hosts, mesh off");
    let (mut lm, mut lp) = (Vec::new(), Vec::new());
    let (p1, p2) = (a1.proc.pid(), a2.proc.pid());
    let mut cpu = 0.0;
    let mut wall = 0.0;
    for round in 1..=3 {
        let before = bench::cpu_seconds(p1) + bench::cpu_seconds(p2);
        let t = std::time::Instant::now();
        let m = bench::fixed_rate(cm.clone(), to_m, 1000, secs);
        wall += t.elapsed().as_secs_f64();
        cpu += bench::cpu_seconds(p1) + bench::cpu_seconds(p2) - before;
        let p = bench::fixed_rate(cp.clone(), to_p, 1000, secs);
        println!(
            "round {round}: p50/p90/p99 µs mesh {:.0}/{:.0}/{:.0} plain {:.0}/{:.0}/{:.0}",
            bench::pct(&m, 0.5),
            bench::pct(&m, 0.9),
            bench::pct(&m, 0.99),
            bench::pct(&p, 0.5),
            bench::pct(&p, 0.9),
            bench::pct(&p, 0.99)
        );
        lm.extend(m);
        lp.extend(p);
    }
    for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        println!(
            "added latency {name}: {:.3} ms (mesh {:.3} ms, plain {:.3} ms)",
            (bench::pct(&lm, q) - bench::pct(&lp, q)) / 1000.0,
            bench::pct(&lm, q) / 1000.0,
            bench::pct(&lp, q) / 1000.0
        );
    }
    // Idle CPU of both agents over the same time, to subtract.
    let before = bench::cpu_seconds(p1) + bench::cpu_seconds(p2);
    std::thread::sleep(Duration::from_secs(secs));
    let idle = (bench::cpu_seconds(p1) + bench::cpu_seconds(p2) - before) / secs as f64;
    println!(
        "proxy CPU at 1000 req/s (both agents, idle {:.3} cores subtracted): {:.3} cores",
        idle,
        cpu / wall - idle
    );

    let fm = bench::first_requests(cm.clone(), to_m, 200);
    let fp = bench::first_requests(cp.clone(), to_p, 200);
    println!(
        "first request on a new connection: p50 mesh {:.3} ms, plain {:.3} ms, added {:.3} ms",
        bench::pct(&fm, 0.5) / 1000.0,
        bench::pct(&fp, 0.5) / 1000.0,
        (bench::pct(&fm, 0.5) - bench::pct(&fp, 0.5)) / 1000.0
    );

    let mb: usize = std::env::var("MESH_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    for round in 1..=2 {
        let m = bench::throughput(cm.clone(), sink(to_m), mb);
        let p = bench::throughput(cp.clone(), sink(to_p), mb);
        println!(
            "round {round}: single-stream throughput mesh {m:.0} MB/s, plain {p:.0} MB/s, ratio {:.2}",
            m / p
        );
    }

    let r1 = ironmesh_tests::rss_bytes(p1).unwrap_or(0);
    let r2 = ironmesh_tests::rss_bytes(p2).unwrap_or(0);
    let open = bench::open_connections(cm.clone(), to_m, 100);
    let r1b = ironmesh_tests::rss_bytes(p1).unwrap_or(0);
    let r2b = ironmesh_tests::rss_bytes(p2).unwrap_or(0);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "agent RSS with 100 open mesh connections: source {:.1} MiB (+{:.1}), destination {:.1} MiB (+{:.1})",
        mib(r1b),
        mib(r1b.saturating_sub(r1)),
        mib(r2b),
        mib(r2b.saturating_sub(r2))
    );
    drop(open);

    // The source agent is killed (-9) and started again while a client
    // opens a connection every 20 ms: the longest stretch without a
    // successful request; a capture on the bridge meanwhile must see no
    // plaintext to the service port.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (stop, cm) = (stop.clone(), cm.clone());
        std::thread::spawn(move || {
            ironmesh_tests::netns::within(&cm, move || {
                use std::io::{Read, Write};
                let mut log = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let t = std::time::Instant::now();
                    let ok =
                        std::net::TcpStream::connect_timeout(&to_m, Duration::from_millis(500))
                            .map(|mut s| {
                                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                                s.write_all(b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n").is_ok()
                                    && s.read(&mut [0u8; 64]).is_ok_and(|n| n > 0)
                            })
                            .unwrap_or(false);
                    log.push((t, ok));
                    std::thread::sleep(Duration::from_millis(20));
                }
                log
            })
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let cap = capture::Capture::start(&c.ctl.net.bridge).expect("capture");
    let idx = c
        .agents
        .iter()
        .position(|a| a.name == a1.name)
        .expect("agent");
    let mut c = c;
    let restarted = std::time::Instant::now();
    c.agents[idx].restart_without_token(&c.ctl);
    wait_for(
        "requests through the restarted agent",
        Duration::from_secs(30),
        || {
            let cm = cm.clone();
            ironmesh_tests::netns::within(&cm, move || {
                std::net::TcpStream::connect_timeout(&to_m, Duration::from_millis(500)).is_ok()
            })
            .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let log = prober.join().expect("prober");
    let frames = cap.stop();
    let mut gap = Duration::ZERO;
    let mut last_ok = restarted;
    for (t, ok) in &log {
        if *t >= restarted && *ok {
            gap = gap.max(t.duration_since(last_ok));
            last_ok = *t;
        }
    }
    println!(
        "agent restart (kill -9, start): longest stretch without a new connection {} ms ({} attempts); plaintext frames to the service port meanwhile: {}",
        gap.as_millis(),
        log.len(),
        capture::tcp_port_frames(&frames, 9000)
    );
    let _ = std::fs::write(
        "/sys/fs/cgroup/unified/cgroup.procs",
        std::process::id().to_string(),
    );
    let _ = std::fs::remove_dir(&cg);
}
