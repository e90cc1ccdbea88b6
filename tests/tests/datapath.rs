//! End-to-end tests of the eBPF datapath on two fake hosts: identity policy
//! applied and removed as map writes (no restarts), and a Service VIP
//! balanced in the kernel across ready backends.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ironmesh_tests::{
    curl_in, images_dir, instance_netns, instances, str_at, wait_for, Agent, Controller,
    ControllerOpts,
};
use serde_json::Value;

/// How a TCP connect from inside the namespace at `from` ends: `Ok` when it
/// opens, else the error kind (`ConnectionRefused`: the packet got through;
/// `TimedOut`: it was dropped).
fn connect_result(
    from: PathBuf,
    to: SocketAddr,
    timeout: Duration,
) -> Result<(), std::io::ErrorKind> {
    ironmesh_tests::netns::within(&from, move || {
        std::net::TcpStream::connect_timeout(&to, timeout)
            .map(|_| ())
            .map_err(|e| e.kind())
    })
}

/// True if a TCP connection from inside the namespace at `from` opens.
fn connects(from: PathBuf, to: SocketAddr) -> bool {
    ironmesh_tests::netns::within(&from, move || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok()
    })
}

#[test]
fn policy_flips_without_restarts_and_a_service_vip_reaches_ready_backends() {
    let ctl = Controller::start(ControllerOpts::default());
    let agents: Vec<Agent> = ["h1", "h2"].iter().map(|n| Agent::start(&ctl, n)).collect();
    for a in &agents {
        a.wait_ready(&ctl, Duration::from_secs(90));
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
    ctl.apply_yaml(
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
        instances(&ctl, "client").into_iter().find(|i| {
            str_at(i, "/status/phase") == "Running" && !str_at(i, "/status/ip").is_empty()
        })
    });
    let client_agent = agents
        .iter()
        .find(|a| a.name == str_at(&client, "/spec/node"))
        .expect("client's agent");
    let from = instance_netns(client_agent, str_at(&client, "/metadata/name"));
    // The api instance on the other host: the flow crosses hosts.
    let remote = api
        .iter()
        .find(|i| str_at(i, "/spec/node") != client_agent.name)
        .expect("an api instance on the other host");
    let target = SocketAddr::new(
        str_at(remote, "/status/ip").parse::<IpAddr>().unwrap(),
        8080,
    );

    assert!(connects(from.clone(), target), "no policy: allowed");

    // Selecting api with a rule for another team: default-deny for client.
    ctl.apply_yaml(
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
    ctl.apply_yaml(
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
    ctl.apply_yaml(
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
        let ip = str_at(&v, "/status/clusterIP").to_string();
        (!ip.is_empty()).then_some(ip)
    });
    assert!(vip.starts_with("10.96."), "{vip}");

    // Egress: a Policy selecting the client makes its outgoing
    // connections default-deny; only the listed destinations pass.
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: client-out
spec:
  selector: {team: analytics}
  egress:
    - to: [{selector: {app: other}}]
      ports: [{port: 8080}]
",
    );
    wait_for("client's egress denied", Duration::from_secs(20), || {
        (!connects(from.clone(), target)).then_some(())
    });
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: client-out
spec:
  selector: {team: analytics}
  egress:
    - to: [{selector: {app: api}}]
      ports: [{port: 8080}]
",
    );
    wait_for("client's egress allowed", Duration::from_secs(20), || {
        connects(from.clone(), target).then_some(())
    });

    // Deleting the policies returns to default-allow; nothing restarted.
    assert!(ctl
        .imctl(&["delete", "policy", "api-readers", "client-out"])
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

fn start_hosts(ctl: &Controller) -> Vec<Agent> {
    let agents: Vec<Agent> = ["h1", "h2"].iter().map(|n| Agent::start(ctl, n)).collect();
    for a in &agents {
        wait_ready(ctl, a);
    }
    for image in ["records-server", "batch-step"] {
        let out = ctl.imctl(&["image", "push", images_dir().join(image).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    agents
}

fn wait_ready(ctl: &Controller, a: &Agent) {
    a.wait_ready(ctl, Duration::from_secs(90));
    wait_for(&format!("{} Ready", a.name), Duration::from_secs(5), || {
        ctl.node(&a.name)
            .filter(|n| ironmesh_tests::ready_status(n).as_deref() == Some("True"))
    });
}

fn log_lines(ctl: &Controller, instance: &str, needle: &str) -> usize {
    let out = ctl.imctl(&["logs", instance]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// (ingress, egress) TCX programs on a host veth, as the kernel lists them.
fn tcx_programs(agent: &Agent, host_if: &str) -> (usize, usize) {
    use aya::programs::tc::{SchedClassifier, TcAttachType};
    let host_if = host_if.to_string();
    agent.host.within(move || {
        let count = |t| {
            SchedClassifier::query_tcx(&host_if, t)
                .map(|(_, p)| p.len())
                .unwrap_or_else(|e| panic!("query tcx on {host_if}: {e}"))
        };
        (count(TcAttachType::Ingress), count(TcAttachType::Egress))
    })
}

/// The host veths the agent pinned TC links for.
fn pinned_host_ifs(agent: &Agent) -> Vec<String> {
    let root = PathBuf::from("/sys/fs/bpf/ironmesh").join(agent.containerd.namespace());
    let mut out = Vec::new();
    for v in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for l in std::fs::read_dir(v.path().join("links"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = l.file_name().to_string_lossy().to_string();
            if let Some(i) = name
                .strip_prefix("tc-")
                .and_then(|n| n.strip_suffix("-ingress"))
            {
                out.push(i.to_string());
            }
        }
    }
    out.sort();
    out
}

/// Lines of `bpftool cgroup show` per attach type.
fn cgroup_programs(cgroup: &std::path::Path) -> std::collections::BTreeMap<String, usize> {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut m = std::collections::BTreeMap::new();
    for l in text.lines().skip(1) {
        if let Some(t) = l.split_whitespace().nth(1) {
            *m.entry(t.to_string()).or_default() += 1;
        }
    }
    m
}

#[test]
fn replies_rate_limits_flows_vips_and_pinned_state_across_agent_restarts() {
    let ctl = Controller::start(ControllerOpts::default());
    let mut agents = start_hosts(&ctl);
    ctl.apply_yaml(
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
  name: api-unready
  labels: {app: api, variant: unready}
spec:
  image: ironmesh/records-server:dev
  env: [{name: LISTEN_ADDR, value: \"0.0.0.0:8080\"}]
  readinessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1}
---
apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: client
  labels: {team: analytics}
spec:
  image: ironmesh/batch-step:dev
  env: [{name: SLEEP_MS, value: \"600000\"}]
---
apiVersion: ironmesh.dev/v1
kind: Service
metadata:
  name: api
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}]
",
    );
    let api = wait_for("2 api instances ready", Duration::from_secs(60), || {
        let l = instances(&ctl, "api");
        (l.len() == 2
            && l.iter()
                .all(|i| i.pointer("/status/ready") == Some(&Value::Bool(true))))
        .then_some(l)
    });
    let unready = wait_for("api-unready running", Duration::from_secs(60), || {
        instances(&ctl, "api-unready").into_iter().find(|i| {
            str_at(i, "/status/phase") == "Running" && !str_at(i, "/status/ip").is_empty()
        })
    });
    let client = wait_for("client running", Duration::from_secs(60), || {
        instances(&ctl, "client").into_iter().find(|i| {
            str_at(i, "/status/phase") == "Running" && !str_at(i, "/status/ip").is_empty()
        })
    });
    let ci = agents
        .iter()
        .position(|a| a.name == str_at(&client, "/spec/node"))
        .expect("client's agent");
    let from = instance_netns(&agents[ci], str_at(&client, "/metadata/name"));
    let remote = api
        .iter()
        .find(|i| str_at(i, "/spec/node") != agents[ci].name)
        .expect("an api instance on the other host")
        .clone();
    let ri = agents
        .iter()
        .position(|a| a.name == str_at(&remote, "/spec/node"))
        .expect("remote agent");
    let remote_ns = instance_netns(&agents[ri], str_at(&remote, "/metadata/name"));
    let target = SocketAddr::new(
        str_at(&remote, "/status/ip").parse::<IpAddr>().unwrap(),
        8080,
    );
    let back = SocketAddr::new(str_at(&client, "/status/ip").parse::<IpAddr>().unwrap(), 9);

    // --- Service VIP from a process in the agent's datapath cgroup subtree.
    let vip = wait_for("service VIP", Duration::from_secs(20), || {
        let v = ctl.imctl_json(&["get", "services", "api"]);
        let ip = str_at(&v, "/status/clusterIP").to_string();
        (!ip.is_empty()).then_some(ip)
    });
    let cg = agents[ci]
        .containerd
        .datapath_cgroup()
        .join("e2e-vip-client");
    std::fs::create_dir_all(&cg).expect("child cgroup");
    let url = format!("http://{vip}:80/healthz?via=vip");
    wait_for("VIP answers", Duration::from_secs(20), || {
        curl_in(&cg, &from, &url).filter(|b| b == "ok")
    });
    let mut ok = 0;
    for _ in 0..24 {
        if curl_in(&cg, &from, &url).as_deref() == Some("ok") {
            ok += 1;
        }
    }
    let _ = std::fs::remove_dir(&cg);
    assert!(ok >= 22, "{ok}/24 requests through the VIP answered");
    let per_backend: Vec<usize> = api
        .iter()
        .map(|i| log_lines(&ctl, str_at(i, "/metadata/name"), "/healthz?via=vip"))
        .collect();
    assert!(
        per_backend.iter().all(|&n| n >= 2),
        "requests spread across both ready backends: {per_backend:?}"
    );
    assert_eq!(
        log_lines(&ctl, str_at(&unready, "/metadata/name"), "via=vip"),
        0,
        "the not-ready backend was chosen"
    );

    // --- Replies pass while a new connection the other way is denied.
    assert_eq!(
        connect_result(remote_ns.clone(), back, Duration::from_millis(700)),
        Err(std::io::ErrorKind::ConnectionRefused),
        "no policy on client: api reaches it (nothing listens: refused)"
    );
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: client-lockdown
spec:
  selector: {team: analytics}
  ingress:
    - from: [{selector: {app: nobody}}]
      ports: [{port: 9}]
",
    );
    wait_for("api -> client denied", Duration::from_secs(20), || {
        (connect_result(remote_ns.clone(), back, Duration::from_millis(700))
            == Err(std::io::ErrorKind::TimedOut))
        .then_some(())
    });
    assert!(
        connects(from.clone(), target),
        "client -> api opens: its replies pass into the default-deny client"
    );
    let body =
        ironmesh_tests::netns::within(&from, move || ironmesh_tests::http_get(target, "/records"))
            .expect("a whole response comes back");
    assert!(!body.is_empty());

    // --- The rate limit drops the excess.
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: api-rate
spec:
  selector: {app: api}
  ingress:
    - from: [{selector: {team: analytics}}]
      ports: [{port: 8080}]
      rateLimit: {connectionsPerSecond: 5}
",
    );
    // The assignment reaches both agents within a moment; the bucket is
    // full again after a second.
    std::thread::sleep(Duration::from_millis(2500));
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let from = from.clone();
            std::thread::spawn(move || connect_result(from, target, Duration::from_millis(800)))
        })
        .collect();
    let results: Vec<_> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    let passed = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        (1..=15).contains(&passed),
        "5/s with a burst of 5: {passed}/40 passed"
    );

    // --- imctl flows shows the dropped flow with its identities.
    let client_id = client.pointer("/spec/identity").and_then(Value::as_u64);
    let api_id = remote.pointer("/spec/identity").and_then(Value::as_u64);
    let dropped = wait_for(
        "the dropped flow in imctl flows",
        Duration::from_secs(10),
        || {
            let out = ctl.imctl(&["flows", "--verdict", "dropped", "-o", "json"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|f| {
                    str_at(f, "/destination/ip") == back.ip().to_string()
                        && f.pointer("/destination/port").and_then(Value::as_u64) == Some(9)
                })
        },
    );
    assert_eq!(str_at(&dropped, "/verdict"), "dropped");
    assert_eq!(str_at(&dropped, "/source/workload"), "api");
    assert_eq!(str_at(&dropped, "/destination/workload"), "client");
    assert_eq!(
        str_at(&dropped, "/destination/instance"),
        str_at(&client, "/metadata/name")
    );
    assert_eq!(
        dropped.pointer("/source/identity").and_then(Value::as_u64),
        api_id
    );
    assert_eq!(
        dropped
            .pointer("/destination/identity")
            .and_then(Value::as_u64),
        client_id
    );
    let limited = ctl.imctl(&[
        "flows",
        "--verdict",
        "rate-limited",
        "--workload",
        "client",
        "-o",
        "json",
    ]);
    assert!(
        String::from_utf8_lossy(&limited.stdout).lines().count() >= 1,
        "rate-limited flows are listed"
    );
    let table = ctl.imctl(&["flows", "--verdict", "dropped"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.starts_with("TIME") && table.contains("DROPPED"),
        "{table}"
    );

    // --- Killed agents: pinned state keeps enforcing.
    std::thread::sleep(Duration::from_millis(1100));
    for a in agents.iter_mut() {
        a.proc.kill9();
    }
    assert_eq!(
        connect_result(remote_ns.clone(), back, Duration::from_millis(700)),
        Err(std::io::ErrorKind::TimedOut),
        "denied stays denied without agents"
    );
    assert!(
        connects(from.clone(), target),
        "allowed stays allowed without agents"
    );

    // --- Restarted agents attach nothing twice.
    for a in agents.iter_mut() {
        a.restart_without_token(&ctl);
    }
    for a in &agents {
        wait_ready(&ctl, a);
    }
    std::thread::sleep(Duration::from_secs(2));
    for a in &agents {
        let ifs = pinned_host_ifs(a);
        assert!(!ifs.is_empty(), "{} pinned TC links", a.name);
        for i in &ifs {
            assert_eq!(tcx_programs(a, i), (1, 1), "{}: programs on {i}", a.name);
        }
        let cg = cgroup_programs(&a.containerd.datapath_cgroup());
        for t in [
            "cgroup_inet4_connect",
            "cgroup_udp4_sendmsg",
            "cgroup_udp4_recvmsg",
            "cgroup_inet4_getpeername",
        ] {
            assert_eq!(
                cg.get(t).copied(),
                Some(1),
                "{}: {t} on its cgroup: {cg:?}",
                a.name
            );
        }
    }
    assert_eq!(
        connect_result(remote_ns, back, Duration::from_millis(700)),
        Err(std::io::ErrorKind::TimedOut),
        "still denied after restart"
    );
    assert!(connects(from, target), "still allowed after restart");
}

// ---- Containment: anti-spoofing and failing closed ----

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame to the host veth (the gateway's MAC) carrying a UDP
/// datagram from `src` (whatever the sender claims) to `dst`.
fn udp_frame(src: std::net::Ipv4Addr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let IpAddr::V4(dip) = dst.ip() else {
        panic!("IPv4 only")
    };
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dip.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&udp);
    let mut f = vec![0xee; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00]);
    f.extend_from_slice(&ip);
    f
}

/// Sends `frame` out of `eth0` of the namespace at `netns` through a packet
/// socket, as a process with NET_RAW inside the instance can.
fn send_raw(netns: PathBuf, frame: Vec<u8>) {
    let shown = netns.display().to_string();
    ironmesh_tests::netns::within(&netns, move || {
        // SAFETY: the socket calls use buffers that outlive them.
        unsafe {
            let idx = libc::if_nametoindex(c"eth0".as_ptr());
            assert_ne!(idx, 0, "eth0 in {shown}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = idx as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, frame.len() as isize, "sendto: {err}");
        }
    });
}

#[test]
fn an_instance_sending_as_the_host_is_dropped_and_shown_as_spoofed() {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "h1");
    wait_ready(&ctl, &agent);
    for image in ["records-server", "batch-step"] {
        let out = ctl.imctl(&["image", "push", images_dir().join(image).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: api
  labels: {app: api}
spec:
  image: ironmesh/records-server:dev
  env: [{name: LISTEN_ADDR, value: \"0.0.0.0:8080\"}]
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
    let running = |w: &str| {
        let w = w.to_string();
        wait_for(&format!("{w} running"), Duration::from_secs(60), || {
            instances(&ctl, &w).into_iter().find(|i| {
                str_at(i, "/status/phase") == "Running" && !str_at(i, "/status/ip").is_empty()
            })
        })
    };
    let api = running("api");
    let client = running("client");
    let client_name = str_at(&client, "/metadata/name").to_string();
    let client_ip = str_at(&client, "/status/ip").to_string();
    let api_ip: IpAddr = str_at(&api, "/status/ip").parse().expect("api ip");
    let from = instance_netns(&agent, &client_name);

    // The client claims the node's own address (always let in).
    let host_ip = agent.host.addr;
    send_raw(
        from,
        udp_frame(host_ip, SocketAddr::new(api_ip, 8080), b"as-the-host"),
    );
    let spoofed = wait_for(
        "the spoofed flow in imctl flows",
        Duration::from_secs(10),
        || {
            let out = ctl.imctl(&["flows", "--verdict", "spoofed", "-o", "json"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|f| str_at(f, "/destination/ip") == api_ip.to_string())
        },
    );
    assert_eq!(str_at(&spoofed, "/verdict"), "spoofed");
    assert_eq!(
        str_at(&spoofed, "/source/instance"),
        client_name,
        "{spoofed}"
    );
    assert_eq!(str_at(&spoofed, "/source/ip"), client_ip, "{spoofed}");
    assert_eq!(
        str_at(&spoofed, "/claimedSource"),
        host_ip.to_string(),
        "{spoofed}"
    );
    assert_eq!(
        str_at(&spoofed, "/destination/instance"),
        str_at(&api, "/metadata/name")
    );
    let table = ctl.imctl(&["flows", "--verdict", "spoofed"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("SPOOFED"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    // Counted on the agent's /metrics.
    wait_for("spoofed packets counted", Duration::from_secs(10), || {
        let m = ironmesh_tests::http_get(agent.metrics, "/metrics").ok()?;
        m.lines()
            .find(|l| l.starts_with("ironmesh_agent_datapath_packets{verdict=\"spoofed\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .filter(|n| *n >= 1)
    });

    // IPv6 is off inside the instance's namespace.
    let netns = instance_netns(&agent, &client_name);
    let v6 = ironmesh_tests::netns::within(&netns, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").expect("sysctl")
    });
    assert_eq!(v6.trim(), "1", "IPv6 on inside the instance");
}

fn condition<'a>(node: &'a Value, type_: &str) -> Option<&'a Value> {
    node.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

fn has_datapath_taint(node: &Value) -> bool {
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .is_some_and(|t| {
            t.iter().any(|t| {
                str_at(t, "/key") == "ironmesh.dev/datapath-unavailable"
                    && str_at(t, "/effect") == "NoSchedule"
            })
        })
}

#[test]
fn a_node_whose_datapath_cannot_load_is_tainted_and_starts_nothing_unprotected() {
    let ctl = Controller::start(ControllerOpts::default());
    // A pin directory that is not on bpffs: the datapath cannot load.
    let not_bpffs = tempfile::tempdir().expect("tempdir");
    let pins = not_bpffs.path().join("pins");
    let mut agent = Agent::start_with_env(
        &ctl,
        "nodp",
        &[("IRONMESH_BPF_PIN_DIR", pins.to_str().expect("utf-8"))],
    );
    wait_ready(&ctl, &agent);
    let node = wait_for("DatapathReady=False", Duration::from_secs(10), || {
        ctl.node("nodp").filter(|n| {
            condition(n, "DatapathReady").is_some_and(|c| str_at(c, "/status") == "False")
        })
    });
    let cond = condition(&node, "DatapathReady").expect("condition");
    assert_eq!(str_at(cond, "/reason"), "DatapathNotLoaded", "{cond}");
    assert!(
        str_at(cond, "/message").contains("not on a bpf filesystem"),
        "the reason names the failure: {cond}"
    );
    assert!(has_datapath_taint(&node), "no NoSchedule taint: {node}");
    let out = ctl.imctl(&[
        "image",
        "push",
        images_dir().join("batch-step").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing is placed there...
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: plain
spec:
  image: ironmesh/batch-step:dev
  env: [{name: SLEEP_MS, value: \"600000\"}]
---
apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: tolerant
spec:
  image: ironmesh/batch-step:dev
  env: [{name: SLEEP_MS, value: \"600000\"}]
  placement:
    tolerations: [{key: ironmesh.dev/datapath-unavailable, operator: Exists, effect: NoSchedule}]
",
    );
    let plain = wait_for("plain unschedulable", Duration::from_secs(20), || {
        instances(&ctl, "plain")
            .into_iter()
            .find(|i| str_at(i, "/status/reason") == "Unschedulable")
    });
    assert_eq!(
        str_at(&plain, "/status/message"),
        "0/1 nodes available: 1 tainted",
        "{plain}"
    );
    // ...and what tolerates the taint does not start unprotected: it is
    // held with the reason.
    let tolerant = wait_for("tolerant held", Duration::from_secs(30), || {
        instances(&ctl, "tolerant").into_iter().find(|i| {
            str_at(i, "/spec/node") == "nodp"
                && str_at(i, "/status/message").contains("datapath is not ready")
        })
    });
    assert_eq!(str_at(&tolerant, "/status/phase"), "Pending", "{tolerant}");
    assert_eq!(
        str_at(&tolerant, "/status/reason"),
        "NetworkSetupError",
        "{tolerant}"
    );

    // With a datapath that loads, the condition clears, the taint goes and
    // both run.
    agent.restart_without_token(&ctl);
    wait_for("DatapathReady=True", Duration::from_secs(60), || {
        ctl.node("nodp").filter(|n| {
            condition(n, "DatapathReady").is_some_and(|c| str_at(c, "/status") == "True")
                && !has_datapath_taint(n)
        })
    });
    for w in ["plain", "tolerant"] {
        wait_for(&format!("{w} running"), Duration::from_secs(60), || {
            instances(&ctl, w)
                .into_iter()
                .find(|i| str_at(i, "/status/phase") == "Running")
        });
    }
}
