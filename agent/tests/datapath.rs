//! The eBPF datapath against the real kernel (root, bpffs, cgroup v2).
//!
//! Every test builds its own fake host: a "host" network namespace with two
//! "instances" (namespaces A and B) joined to it by veth pairs in the
//! routed model of `agent::network` (/32 routes, gateway 169.254.1.1 named
//! by the host veth's MAC). No namespace has a link to the machine's, so no
//! packet leaves. Each test has its own pin directory and its own cgroup v2
//! subtree for the socket programs (never the root). Dropping the fixture
//! unpins everything (detaching the programs), deletes the namespaces and
//! removes the cgroup, also on panic.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use ironmesh_agent::datapath::{
    Datapath, DatapathConfig, FlowEvent, FlowEventKind, PolicyRule, Protocol, RateLimit,
    ServiceEntry, Verdict,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

const ID_A: u32 = 100;
const ID_B: u32 = 200;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a fresh thread inside the namespace `ns`. Sockets made there
/// stay in that namespace wherever they are used later.
fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    ironmesh_tests::netns::within(ns, f)
}

/// A TCP server that answers every connection with `reply` and closes.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Path, addr: SocketAddrV4, reply: &'static str) -> Server {
        let listener = in_ns(ns, move || TcpListener::bind(addr).expect("bind"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.write_all(reply.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from namespace `ns` and reads the server's reply; None if the
/// connection failed (dropped SYN: timeout).
fn fetch(ns: &Path, to: SocketAddrV4, timeout: Duration) -> Option<String> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), timeout).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        Some(buf)
    })
}

struct Instance {
    ns: PathBuf,
    name: String,
    ip: Ipv4Addr,
    host_if: String,
}

struct Fixture {
    host: PathBuf,
    host_name: String,
    a: Instance,
    b: Instance,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    rt: tokio::runtime::Runtime,
    dp: Option<Datapath>,
}

impl Fixture {
    fn new() -> Fixture {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 10000;
        let tag = format!("{pid}-{n}");
        // 10.250.<pid-derived>.<n-derived>: fully inside the fixture's namespaces.
        let third = ((pid * 7 + n) % 250) as u8;
        let host_name = format!("imdp{tag}-h");
        sh(&["ip", "netns", "add", &host_name]);
        let host = PathBuf::from("/var/run/netns").join(&host_name);
        sh(&["ip", "-n", &host_name, "link", "set", "lo", "up"]);
        // The host's own address (source of the host's client sockets).
        sh(&[
            "ip",
            "-n",
            &host_name,
            "addr",
            "add",
            &format!("10.250.{third}.1/32"),
            "dev",
            "lo",
        ]);
        sh(&[
            "nsenter",
            &format!("--net={}", host.display()),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let mk = |which: &str, last: u8| -> Instance {
            let name = format!("imdp{tag}-{which}");
            sh(&["ip", "netns", "add", &name]);
            let ns = PathBuf::from("/var/run/netns").join(&name);
            let host_if = format!("dp{pid}x{n}{which}");
            let ip = Ipv4Addr::new(10, 250, third, last);
            sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "-n",
                &host_name,
                "link",
                "add",
                &host_if,
                "address",
                "ee:ee:ee:ee:ee:ee",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &name,
            ]);
            sh(&["ip", "-n", &host_name, "link", "set", &host_if, "up"]);
            sh(&["ip", "-n", &name, "link", "set", "eth0", "up"]);
            sh(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ]);
            sh(&[
                "ip",
                "-n",
                &name,
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                "ee:ee:ee:ee:ee:ee",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            sh(&[
                "ip",
                "-n",
                &name,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            sh(&[
                "ip",
                "-n",
                &name,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
            sh(&[
                "ip",
                "-n",
                &host_name,
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &host_if,
            ]);
            Instance {
                ns,
                name,
                ip,
                host_if,
            }
        };
        let a = mk("a", 2);
        let b = mk("b", 3);
        ensure_bpffs();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/ironmesh-test/dp-{tag}"));
        let cgroup = PathBuf::from(format!("/sys/fs/cgroup/unified/ironmesh-test-dp-{tag}"));
        std::fs::create_dir_all(&cgroup).expect("create test cgroup");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut f = Fixture {
            host,
            host_name,
            a,
            b,
            pin_dir,
            cgroup,
            rt,
            dp: None,
        };
        f.load();
        f
    }

    /// (Re)loads the datapath from the pins, inside the host namespace.
    fn load(&mut self) {
        self.load_with(DatapathConfig::default());
    }

    fn load_with(&mut self, cfg: DatapathConfig) {
        self.dp = None;
        let (pin, cg) = (self.pin_dir.clone(), self.cgroup.clone());
        let dp =
            in_ns(&self.host, move || Datapath::load_with(&pin, &cg, cfg)).expect("load datapath");
        self.dp = Some(dp);
    }

    /// Marks A and B host-routed (or not) in the pinned address map, as an
    /// agent started with `--datapath-peer-redirect=false` does.
    fn set_host_routed(&self, on: bool) {
        let pin = self.dp().pin_root().join("maps").join("im_inst_addr");
        let data = aya::maps::MapData::from_pin(&pin).expect("open pinned im_inst_addr");
        let mut map: aya::maps::HashMap<_, u32, ironmesh_ebpf::InstAddrVal> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("hash map");
        for i in [&self.a, &self.b] {
            let idx = self.ifindex(&i.host_if);
            let mut v = map.get(&idx, 0).expect("address entry");
            v.flags = if on {
                ironmesh_ebpf::INST_HOST_ROUTED
            } else {
                0
            };
            map.insert(idx, v, 0).expect("write address entry");
        }
    }

    fn ifindex(&self, host_if: &str) -> u32 {
        let out = Command::new("ip")
            .args(["-n", &self.host_name, "-j", "link", "show", "dev", host_if])
            .output()
            .expect("ip link");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
        v[0]["ifindex"].as_u64().expect("ifindex") as u32
    }

    /// Packets the host sent out of `host_if` (its kernel counter).
    fn tx_packets(&self, host_if: &str) -> u64 {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.host_name,
                "-s",
                "-j",
                "link",
                "show",
                "dev",
                host_if,
            ])
            .output()
            .expect("ip link");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .expect("tx packets")
    }

    fn dp(&self) -> &Datapath {
        self.dp.as_ref().expect("datapath loaded")
    }

    fn attach_both(&self) {
        let dp = self.dp.take_ref();
        for i in [&self.a, &self.b] {
            let (host_if, ip) = (i.host_if.clone(), i.ip);
            in_ns(&self.host, move || dp.get().attach_instance(&host_if, ip)).expect("attach");
        }
    }

    fn identities(&self) {
        self.dp()
            .set_identities(&[(self.a.ip, ID_A), (self.b.ip, ID_B)])
            .expect("identities");
    }

    fn tcx_count(&self, host_if: &str, t: TcAttachType) -> usize {
        let host_if = host_if.to_string();
        in_ns(&self.host, move || {
            SchedClassifier::query_tcx(&host_if, t)
                .expect("query tcx")
                .1
                .len()
        })
    }

    fn cgroup_prog_count(&self) -> usize {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.cgroup)
            .arg("-j")
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().map(|a| a.len()).unwrap_or(0)
    }
}

/// A `&Datapath` that may cross into the namespace threads of one test.
#[derive(Clone, Copy)]
struct DpRef(*const Datapath);
// SAFETY: Datapath is Sync; the fixture outlives every thread given a DpRef
// (in_ns joins before returning).
unsafe impl Send for DpRef {}
impl DpRef {
    fn get(&self) -> &Datapath {
        // SAFETY: see above.
        unsafe { &*self.0 }
    }
}
trait TakeRef {
    fn take_ref(&self) -> DpRef;
}
impl TakeRef for Option<Datapath> {
    fn take_ref(&self) -> DpRef {
        DpRef(self.as_ref().expect("datapath loaded") as *const Datapath)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.dp = None;
        let _ = Datapath::purge(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir("/sys/fs/bpf/ironmesh-test");
        for n in [&self.a.name, &self.b.name, &self.host_name] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn drain(rx: &mut tokio::sync::mpsc::Receiver<FlowEvent>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

fn tcp_rule(src: u32, dst: u32, port: u16) -> PolicyRule {
    PolicyRule::ingress(Some(src), dst, port, Protocol::Tcp)
}

fn egress_rule(src: u32, dst: u32, port: u16) -> PolicyRule {
    PolicyRule::egress(src, Some(dst), port, Protocol::Tcp)
}

const SHORT: Duration = Duration::from_millis(400);

/// Polls `cond` until it holds; panics naming `what` after 5 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn policy_default_allow_default_deny_replies_and_rule_flips_without_reload() {
    let f = Fixture::new();
    f.attach_both();
    f.identities();
    let mut flows = {
        let _g = f.rt.enter();
        f.dp().flows().expect("flows")
    };
    let to_b = SocketAddrV4::new(f.b.ip, 8080);
    let to_a = SocketAddrV4::new(f.a.ip, 9090);
    let _sb = Server::start(&f.b.ns, to_b, "from-b");
    let _sa = Server::start(&f.a.ns, to_a, "from-a");

    // No policy selects anyone: default allow, both ways.
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));
    assert_eq!(fetch(&f.b.ns, to_a, SHORT).as_deref(), Some("from-a"));
    let ids = f.dp().program_ids().expect("ids");

    // Both selected, no rule: denied, counted, reported with identities.
    f.dp().set_enforced(&[ID_A, ID_B]).expect("enforce");
    let before = f.dp().counters().expect("counters");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None, "A -> B must be denied");
    let after = f.dp().counters().expect("counters");
    assert!(after.denied > before.denied, "{before:?} -> {after:?}");
    std::thread::sleep(Duration::from_millis(100));
    let events = drain(&mut flows);
    assert!(
        events.iter().any(|e| e.verdict == Verdict::Denied
            && e.src_identity == ID_A
            && e.dst_identity == ID_B
            && *e.dst.ip() == f.b.ip
            && e.dst.port() == 8080
            && matches!(e.kind, FlowEventKind::New | FlowEventKind::VerdictChanged)),
        "no dropped A->B flow event in {events:#?}"
    );

    // Allow A -> B:8080 (map write): connects, the reply passes; B -> A
    // stays denied.
    f.dp()
        .set_policy(&[tcp_rule(ID_A, ID_B, 8080)])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));
    assert_eq!(fetch(&f.b.ns, to_a, SHORT), None, "B -> A must stay denied");
    // A wrong port is still denied.
    let _sb2 = Server::start(&f.b.ns, SocketAddrV4::new(f.b.ip, 8081), "x");
    assert_eq!(fetch(&f.a.ns, SocketAddrV4::new(f.b.ip, 8081), SHORT), None);

    // Remove the rule: denied again; no program was reloaded.
    f.dp().set_policy(&[]).expect("policy");
    assert_eq!(
        fetch(&f.a.ns, to_b, SHORT),
        None,
        "denied after rule removal"
    );
    assert_eq!(f.dp().program_ids().expect("ids"), ids, "programs reloaded");

    // Nothing enforced any more: allowed both ways.
    f.dp().set_enforced(&[]).expect("enforce");
    assert_eq!(fetch(&f.b.ns, to_a, SHORT).as_deref(), Some("from-a"));
}

/// The reserved identity of the local host's own addresses (as the agent
/// writes it).
const ID_HOST: u32 = 1;

impl Fixture {
    /// The host namespace's own address (on its loopback).
    fn host_ip(&self) -> Ipv4Addr {
        let o = self.a.ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    }

    /// Identities of A, B and the host, as the agent writes them.
    fn identities_with_host(&self) {
        self.dp()
            .set_identities(&[
                (self.a.ip, ID_A),
                (self.b.ip, ID_B),
                (self.host_ip(), ID_HOST),
            ])
            .expect("identities");
    }
}

/// The host-always-allowed rules the agent adds for an ingress-enforced
/// identity.
fn host_rules(dst: u32) -> Vec<PolicyRule> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Icmp]
        .into_iter()
        .map(|p| PolicyRule::ingress(Some(ID_HOST), dst, 0, p))
        .collect()
}

#[test]
fn egress_default_deny_allows_listed_destinations_and_flips_without_reload() {
    let f = Fixture::new();
    f.attach_both();
    f.identities_with_host();
    let to_b = SocketAddrV4::new(f.b.ip, 8080);
    let to_b_other = SocketAddrV4::new(f.b.ip, 8081);
    let to_a = SocketAddrV4::new(f.a.ip, 9090);
    let _sb = Server::start(&f.b.ns, to_b, "from-b");
    let _sb2 = Server::start(&f.b.ns, to_b_other, "from-b-8081");
    let _sa = Server::start(&f.a.ns, to_a, "from-a");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));
    let ids = f.dp().program_ids().expect("ids");

    // A selected for egress, no rule: A may open nothing; B (not
    // egress-enforced) still reaches A, and so does the host.
    f.dp().set_enforcement(&[], &[ID_A]).expect("enforce");
    let before = f.dp().counters().expect("counters");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None, "A -> B must be denied");
    assert!(f.dp().counters().expect("counters").denied > before.denied);
    assert_eq!(fetch(&f.b.ns, to_a, SHORT).as_deref(), Some("from-a"));
    assert_eq!(fetch(&f.host, to_a, SHORT).as_deref(), Some("from-a"));

    // Allow A -> B:8080 (a map write): that port only.
    f.dp()
        .set_policy(&[egress_rule(ID_A, ID_B, 8080)])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));
    assert_eq!(fetch(&f.a.ns, to_b_other, SHORT), None, "8081 not listed");

    // An egress rule to anyone on 8081 (empty `to`) opens 8081 too.
    f.dp()
        .set_policy(&[
            egress_rule(ID_A, ID_B, 8080),
            PolicyRule::egress(ID_A, None, 8081, Protocol::Tcp),
        ])
        .expect("policy");
    assert_eq!(
        fetch(&f.a.ns, to_b_other, SHORT).as_deref(),
        Some("from-b-8081")
    );

    // An ingress rule of the same tuple is not an egress rule.
    f.dp()
        .set_policy(&[tcp_rule(ID_A, ID_B, 8080)])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None, "ingress rule let A out");

    // Both sides enforced: the flow needs A's egress rule and B's ingress
    // rule.
    f.dp().set_enforcement(&[ID_B], &[ID_A]).expect("enforce");
    f.dp()
        .set_policy(&[egress_rule(ID_A, ID_B, 8080)])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None, "B's ingress not allowed");
    f.dp()
        .set_policy(&[egress_rule(ID_A, ID_B, 8080), tcp_rule(ID_A, ID_B, 8080)])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));

    // Rules gone: denied again; A no longer enforced: allowed. No program
    // was reloaded on the way.
    f.dp().set_policy(&[]).expect("policy");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None, "denied after removal");
    f.dp().set_enforcement(&[], &[]).expect("enforce");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));
    assert_eq!(f.dp().program_ids().expect("ids"), ids, "programs reloaded");
}

#[test]
fn replies_of_allowed_inbound_connections_pass_under_egress_default_deny() {
    let f = Fixture::new();
    f.attach_both();
    f.identities_with_host();
    // A is default-deny both ways; B may reach A:9090; the host may reach
    // A (probes); A may open nothing.
    f.dp().set_enforcement(&[ID_A], &[ID_A]).expect("enforce");
    let mut rules = host_rules(ID_A);
    rules.push(tcp_rule(ID_B, ID_A, 9090));
    f.dp().set_policy(&rules).expect("policy");
    let to_a = SocketAddrV4::new(f.a.ip, 9090);
    let to_b = SocketAddrV4::new(f.b.ip, 8080);
    let _sa = Server::start(&f.a.ns, to_a, "from-a");
    let _sb = Server::start(&f.b.ns, to_b, "from-b");

    // The replies of B's and the host's connections reach them.
    assert_eq!(fetch(&f.b.ns, to_a, SHORT).as_deref(), Some("from-a"));
    assert_eq!(fetch(&f.host, to_a, SHORT).as_deref(), Some("from-a"));
    // A's own connections are new outbound flows: denied.
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None, "A -> B must be denied");

    // A live connection from B keeps getting replies across policy
    // changes (each bumps the generation and re-judges flows).
    let echo = SocketAddrV4::new(f.a.ip, 9091);
    let listener = in_ns(&f.a.ns, move || TcpListener::bind(echo).expect("bind"));
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut b = [0u8; 1];
        while c.read_exact(&mut b).is_ok() {
            if c.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut rules9091 = rules.clone();
    rules9091.push(tcp_rule(ID_B, ID_A, 9091));
    f.dp().set_policy(&rules9091).expect("policy");
    let mut c = in_ns(&f.b.ns, move || {
        TcpStream::connect_timeout(&SocketAddr::V4(echo), SHORT).expect("connect to A:9091")
    });
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    for round in 0..3u8 {
        c.write_all(&[round]).expect("write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .expect("echo reply under egress default deny");
        assert_eq!(b[0], round);
        let mut more = rules9091.clone();
        more.push(tcp_rule(ID_B, ID_A, 7000 + u16::from(round)));
        f.dp().set_policy(&more).expect("policy");
    }
    drop(c);
    let _ = server.join();
}

/// Entries in one of the fixture's pinned maps (bpftool, so it is the
/// kernel's view, not the agent's memory).
fn pinned_len(f: &Fixture, map: &str) -> usize {
    let path = f.dp().pin_root().join("maps").join(map);
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&path)
        .arg("-j")
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array().map(|a| a.len()).unwrap_or(0)
}

#[test]
fn policy_updates_write_only_what_changed_and_a_restart_removes_stale_rules() {
    let mut f = Fixture::new();
    f.attach_both();
    f.identities();
    let b_ip = f.b.ip;
    let to = move |port| SocketAddrV4::new(b_ip, port);
    let _s1 = Server::start(&f.b.ns, to(8080), "8080");
    let _s2 = Server::start(&f.b.ns, to(8081), "8081");
    let _s3 = Server::start(&f.b.ns, to(8082), "8082");
    let filler: Vec<PolicyRule> = (0..2_000u32)
        .map(|i| tcp_rule(1000 + i, ID_B, 10_000 + i as u16))
        .collect();
    let with = |extra: &[PolicyRule]| {
        let mut r = filler.clone();
        r.extend_from_slice(extra);
        r
    };
    f.dp()
        .apply_policy(&with(&[tcp_rule(ID_A, ID_B, 8080)]), &[ID_B], &[])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to(8080), SHORT).as_deref(), Some("8080"));

    // The same desired state again writes nothing: flows are not even
    // judged again (the generation stays).
    let gen = f.dp().policy_generation().expect("gen");
    f.dp()
        .apply_policy(&with(&[tcp_rule(ID_A, ID_B, 8080)]), &[ID_B], &[])
        .expect("policy");
    assert_eq!(f.dp().policy_generation().expect("gen"), gen);

    // One rule swapped: the old port is closed, the new one open, and the
    // map holds exactly the new set.
    f.dp()
        .apply_policy(&with(&[tcp_rule(ID_A, ID_B, 8081)]), &[ID_B], &[])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to(8080), SHORT), None, "8080 left open");
    assert_eq!(fetch(&f.a.ns, to(8081), SHORT).as_deref(), Some("8081"));
    assert_eq!(pinned_len(&f, "im_policy"), filler.len() + 1);

    // A restarted agent knows only the pins: its first write still
    // removes what the previous one wrote and no longer wants.
    f.dp = None;
    f.load();
    f.dp()
        .apply_policy(&[tcp_rule(ID_A, ID_B, 8082)], &[ID_B], &[])
        .expect("policy");
    assert_eq!(pinned_len(&f, "im_policy"), 1);
    assert_eq!(fetch(&f.a.ns, to(8081), SHORT), None, "stale rule kept");
    assert_eq!(fetch(&f.a.ns, to(8082), SHORT).as_deref(), Some("8082"));

    // Enforcement and rules lifted together: open again.
    f.dp().apply_policy(&[], &[], &[]).expect("policy");
    assert_eq!(pinned_len(&f, "im_policy"), 0);
    assert_eq!(pinned_len(&f, "im_enforced"), 0);
    assert_eq!(fetch(&f.a.ns, to(8080), SHORT).as_deref(), Some("8080"));
}

#[test]
fn rate_limit_drops_excess_new_connections() {
    let f = Fixture::new();
    f.attach_both();
    f.identities();
    let to_b = SocketAddrV4::new(f.b.ip, 8080);
    let _sb = Server::start(&f.b.ns, to_b, "ok");
    f.dp().set_enforced(&[ID_B]).expect("enforce");
    let n = 5u32;
    f.dp()
        .set_policy(&[PolicyRule {
            rate: Some(RateLimit {
                per_second: n,
                burst: n,
            }),
            ..tcp_rule(ID_A, ID_B, 8080)
        }])
        .expect("policy");

    // 3N connection attempts at once, each given less than the SYN
    // retransmission time.
    let a_ns = f.a.ns.clone();
    let handles: Vec<_> = (0..3 * n)
        .map(|_| {
            let ns = a_ns.clone();
            std::thread::spawn(move || fetch(&ns, to_b, Duration::from_millis(700)).is_some())
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().expect("join"))
        .filter(|ok| *ok)
        .count() as u32;
    let c = f.dp().counters().expect("counters");
    eprintln!(
        "rate limit {n}/s: {ok} of {} connected; counters {c:?}",
        3 * n
    );
    assert!(ok >= n - 1 && ok <= n + 3, "{ok} connected of {}", 3 * n);
    assert!(c.rate_limited >= u64::from(3 * n - ok) / 2, "{c:?}");
    assert!(c.rate_limited > 0);
}

#[test]
fn service_vip_lands_on_ready_backends_and_spreads() {
    let f = Fixture::new();
    f.attach_both();
    f.identities();
    let _sa = Server::start(&f.a.ns, SocketAddrV4::new(f.a.ip, 8080), "A");
    let _sb = Server::start(&f.b.ns, SocketAddrV4::new(f.b.ip, 8080), "B");
    let _sx = Server::start(&f.b.ns, SocketAddrV4::new(f.b.ip, 8081), "X");
    let vip = Ipv4Addr::new(10, 251, 0, 10);
    let svc = |backends: Vec<(Ipv4Addr, u16)>| ServiceEntry {
        vip,
        port: 80,
        proto: Protocol::Tcp,
        backends,
    };
    f.dp()
        .set_services(&[svc(vec![(f.a.ip, 8080), (f.b.ip, 8080)])])
        .expect("services");

    // A client process in the test's cgroup, in the host namespace.
    let run_clients = |count: usize| -> Vec<String> {
        let script = format!(
            "for i in $(seq {count}); do timeout 2 bash -c 'exec 3<>/dev/tcp/{vip}/80 && cat <&3' || echo FAIL; echo; done"
        );
        let procs = f.cgroup.join("cgroup.procs");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", f.host.display()))
            .args(["bash", "-c", &script]);
        // SAFETY: pre_exec runs in the forked child before exec; it only
        // writes to a file.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        let out = cmd.output().expect("client");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let got = run_clients(30);
    let a = got.iter().filter(|s| *s == "A").count();
    let b = got.iter().filter(|s| *s == "B").count();
    eprintln!("VIP spread over 30 connects: A={a} B={b} all={got:?}");
    assert_eq!(
        a + b,
        30,
        "every connect lands on a listed backend: {got:?}"
    );
    assert!(a >= 3 && b >= 3, "spread: A={a} B={b}");
    let c = f.dp().counters().expect("counters");
    assert!(c.lb_rewrites >= 30, "{c:?}");

    // A no longer ready: only B is chosen; X (never listed) never.
    f.dp()
        .set_services(&[svc(vec![(f.b.ip, 8080)])])
        .expect("services");
    let got = run_clients(10);
    assert!(got.iter().all(|s| s == "B"), "{got:?}");

    // No ready backend: refused at connect.
    f.dp().set_services(&[svc(vec![])]).expect("services");
    let got = run_clients(2);
    assert!(got.iter().all(|s| s == "FAIL"), "{got:?}");
}

#[test]
fn pinned_enforcement_survives_agent_death_and_reload_attaches_once() {
    let mut f = Fixture::new();
    f.attach_both();
    f.identities();
    let to_b = SocketAddrV4::new(f.b.ip, 8080);
    let to_b_allowed = SocketAddrV4::new(f.b.ip, 8443);
    let _sb = Server::start(&f.b.ns, to_b, "denied-port");
    let _sb2 = Server::start(&f.b.ns, to_b_allowed, "allowed-port");
    f.dp().set_enforced(&[ID_B]).expect("enforce");
    f.dp()
        .set_policy(&[tcp_rule(ID_A, ID_B, 8443)])
        .expect("policy");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None);
    assert_eq!(
        fetch(&f.a.ns, to_b_allowed, SHORT).as_deref(),
        Some("allowed-port")
    );

    // The agent dies: nothing of the process remains, the pins do.
    f.dp = None;
    assert_eq!(
        fetch(&f.a.ns, to_b, SHORT),
        None,
        "denied flow stays denied"
    );
    assert_eq!(
        fetch(&f.a.ns, to_b_allowed, SHORT).as_deref(),
        Some("allowed-port")
    );

    // Restart: same pins, fresh programs swapped in, nothing doubled.
    f.load();
    f.attach_both(); // the agent re-attaches every instance it adopts
    for i in [&f.a, &f.b] {
        assert_eq!(
            f.tcx_count(&i.host_if, TcAttachType::Ingress),
            1,
            "{}",
            i.host_if
        );
        assert_eq!(
            f.tcx_count(&i.host_if, TcAttachType::Egress),
            1,
            "{}",
            i.host_if
        );
    }
    assert_eq!(
        f.cgroup_prog_count(),
        5,
        "connect4, sendmsg4, recvmsg4, getpeername4, sockops once each"
    );
    assert_eq!(f.dp().attached_instances().expect("attached"), {
        let mut v = vec![f.a.host_if.clone(), f.b.host_if.clone()];
        v.sort();
        v
    });
    assert_eq!(
        fetch(&f.a.ns, to_b, SHORT),
        None,
        "still denied after reload"
    );
    assert_eq!(
        fetch(&f.a.ns, to_b_allowed, SHORT).as_deref(),
        Some("allowed-port")
    );

    // Detach one instance: its hooks are gone, so B is reachable on 8080.
    let host_if = f.b.host_if.clone();
    let dp = f.dp.take_ref();
    in_ns(&f.host, move || dp.get().detach_instance(&host_if)).expect("detach");
    // The kernel releases an unpinned link asynchronously.
    wait_until("B's egress hook detached", || {
        f.tcx_count(&f.b.host_if, TcAttachType::Egress) == 0
    });
    // A's own hook still judges A's outgoing flow against B's policy.
    f.dp().set_enforced(&[]).expect("enforce");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("denied-port"));
}

/// TCP throughput (iperf3, 3 s) from A to B, in Gbit/s.
fn iperf(f: &Fixture) -> f64 {
    let mut server = Command::new("nsenter")
        .arg(format!("--net={}", f.b.ns.display()))
        .args(["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    wait_listening(&f.b.ns, 5201);
    let out = Command::new("nsenter")
        .arg(format!("--net={}", f.a.ns.display()))
        .args([
            "iperf3",
            "-c",
            &f.b.ip.to_string(),
            "-p",
            "5201",
            "-t",
            "3",
            "-J",
        ])
        .output()
        .expect("iperf3 client");
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 json");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

/// Median and p99 round trip of a 1-byte request/response on one TCP
/// connection from A to B, in microseconds.
/// Reads one byte from a non-blocking socket, spinning until it comes;
/// false at end of stream or on an error.
fn spin_read(c: &mut TcpStream, b: &mut [u8; 1]) -> bool {
    loop {
        match c.read(b) {
            Ok(1) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn rtt(f: &Fixture, port: u16) -> (f64, f64) {
    let addr = SocketAddrV4::new(f.b.ip, port);
    let listener = in_ns(&f.b.ns, move || TcpListener::bind(addr).expect("bind"));
    // Both ends spin on non-blocking sockets: with blocking reads an idle
    // machine's vCPU wake-up latency (tens of µs) swamps what the datapath
    // adds and makes the figures bimodal.
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        c.set_nodelay(true).expect("nodelay");
        c.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        while spin_read(&mut c, &mut b) {
            if c.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut c = in_ns(&f.a.ns, move || TcpStream::connect(addr).expect("connect"));
    c.set_nodelay(true).expect("nodelay");
    c.set_nonblocking(true).expect("nonblocking");
    let mut samples = Vec::with_capacity(5000);
    let mut b = [7u8; 1];
    for i in 0..5200 {
        let t = std::time::Instant::now();
        c.write_all(&b).expect("write");
        assert!(spin_read(&mut c, &mut b), "echo server went away");
        if i >= 200 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(c);
    let _ = server.join();
    samples.sort_by(|a, b| a.total_cmp(b));
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

// ---- benchmarks ---------------------------------------------------------

/// Runs `program args` inside the fixture's host namespace (never the
/// machine's), feeding `stdin`; panics with its stderr on failure. Returns
/// how long it took, process start included.
fn in_host(f: &Fixture, program: &str, args: &[&str], stdin: &str) -> Duration {
    let t = std::time::Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", f.host.display()))
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn in host namespace");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Address of the i-th of the 10,000 bench identities (never routed).
fn bench_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 252, (i / 250) as u8, (i % 250 + 1) as u8)
}

const BENCH_RULES: u32 = 10_000;

/// The bench rule set for B: 10,000 rules that do not match A's traffic,
/// then A's (iperf3 on 5201, request/response on 6000..=6015). `changed`
/// moves the first rule to another port.
fn bench_rules(changed: bool) -> Vec<PolicyRule> {
    let mut rules: Vec<PolicyRule> = (0..BENCH_RULES)
        .map(|i| tcp_rule(1000 + i, ID_B, 10_000 + i as u16))
        .collect();
    if changed {
        rules[0].port = 9;
    }
    rules.push(tcp_rule(ID_A, ID_B, 5201));
    for p in 6000..=6015 {
        rules.push(tcp_rule(ID_A, ID_B, p));
    }
    rules
}

/// The same rules as an iptables-restore input: traffic routed out of the
/// host towards B walks chain IMBENCH, 10,000 non-matching rules first,
/// A's last, then DROP. `stateful` puts an ESTABLISHED accept in front (the
/// usual iptables setup: only a connection's first packet walks the list).
fn iptables_rules(f: &Fixture, changed: bool, stateful: bool) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IMBENCH - [0:0]\n",
    );
    if stateful {
        s.push_str("-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    }
    let _ = writeln!(s, "-A FORWARD -o {} -j IMBENCH", f.b.host_if);
    for i in 0..BENCH_RULES {
        let port = if changed && i == 0 { 9 } else { 10_000 + i };
        let _ = writeln!(
            s,
            "-A IMBENCH -s {}/32 -p tcp -m tcp --dport {port} -j ACCEPT",
            bench_ip(i)
        );
    }
    let a = f.a.ip;
    let _ = writeln!(
        s,
        "-A IMBENCH -s {a}/32 -p tcp -m tcp --dport 5201 -j ACCEPT"
    );
    let _ = writeln!(
        s,
        "-A IMBENCH -s {a}/32 -p tcp -m tcp --dport 6000:6015 -j ACCEPT"
    );
    s.push_str("-A IMBENCH -j DROP\nCOMMIT\n");
    s
}

/// The same 10,000 rules as an nft transaction replacing a regular chain
/// (no hook: it judges no traffic, only the update is timed).
fn nft_rules(changed: bool) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "add table ip imbench\nadd chain ip imbench rules\nflush chain ip imbench rules\n",
    );
    for i in 0..BENCH_RULES {
        let port = if changed && i == 0 { 9 } else { 10_000 + i };
        let _ = writeln!(
            s,
            "add rule ip imbench rules ip saddr {} tcp dport {port} accept",
            bench_ip(i)
        );
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Best throughput and lowest median/p99 RTT over rounds.
#[derive(Clone, Copy)]
struct Best {
    gbit: f64,
    rtt_med: f64,
    rtt_p99: f64,
}

impl Best {
    fn new() -> Best {
        Best {
            gbit: 0.0,
            rtt_med: f64::MAX,
            rtt_p99: f64::MAX,
        }
    }

    fn add(&mut self, gbit: f64, (med, p99): (f64, f64)) {
        self.gbit = self.gbit.max(gbit);
        self.rtt_med = self.rtt_med.min(med);
        self.rtt_p99 = self.rtt_p99.min(p99);
    }
}

/// Waits until something listens on TCP `port` in namespace `ns`.
fn wait_listening(ns: &Path, port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["ss", "-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss");
        if !out.stdout.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` with this whole process in the cgroup `cg` (so the socket
/// programs attached there steer its sockets), moving it back after, also
/// on panic.
struct InCgroup {
    back: PathBuf,
}

impl InCgroup {
    fn enter(cg: &Path) -> InCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 entry");
        let back = Path::new("/sys/fs/cgroup/unified").join(rel.trim_start_matches('/'));
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .expect("move into the test cgroup");
        InCgroup { back }
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.back.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

/// A server answering each connection's 1-byte request with 1 byte, then
/// waiting for the client to reset it (no TIME_WAIT on either side, so
/// thousands of connections per second never collide with an old one).
struct RrServer {
    addr: SocketAddrV4,
    ns: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RrServer {
    fn start(ns: &Path, addr: SocketAddrV4) -> RrServer {
        let listener = in_ns(ns, move || TcpListener::bind(addr).expect("bind"));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            for c in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = c else { continue };
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {
                    let _ = c.read(&mut b);
                }
            }
        });
        RrServer {
            addr,
            ns: ns.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RrServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept from the server's own namespace.
        let addr = self.addr;
        in_ns(&self.ns, move || {
            let _ = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(1));
        });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connections per second from namespace `ns` to `to` over `dur`: each
/// connects, sends 1 byte, reads the 1-byte answer and closes with a reset
/// (SO_LINGER 0).
fn conn_rate(ns: &Path, to: SocketAddrV4, dur: Duration) -> f64 {
    in_ns(ns, move || {
        let start = std::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            let mut s = TcpStream::connect(SocketAddr::V4(to)).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s.write_all(&[1]).expect("request");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("response");
            assert_eq!(b, [1], "answer from the backend");
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on an open socket with a valid linger.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const libc::linger as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_LINGER");
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

/// Service VIP (cgroup connect4 rewriting) vs the backend address itself vs
/// an iptables DNAT rule, side by side. TC programs are not attached: this
/// measures the balancing alone. Run with `scripts/bench-datapath.sh`.
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_service_vip_connection_rate() {
    let f = Fixture::new();
    f.identities();
    let backend = SocketAddrV4::new(f.b.ip, 7070);
    let _server = RrServer::start(&f.b.ns, backend);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 251, 0, 10), 80);
    let nat_vip = SocketAddrV4::new(Ipv4Addr::new(10, 251, 0, 20), 80);
    f.dp()
        .set_services(&[ServiceEntry {
            vip: *vip.ip(),
            port: vip.port(),
            proto: Protocol::Tcp,
            backends: vec![(f.b.ip, backend.port())],
        }])
        .expect("services");
    // The DNAT VIP needs a route for the connect's first lookup.
    sh(&[
        "ip",
        "-n",
        &f.host_name,
        "route",
        "add",
        &format!("{}/32", nat_vip.ip()),
        "dev",
        &f.b.host_if,
    ]);
    let dnat = format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A OUTPUT -d {}/32 -p tcp -m tcp --dport {} -j DNAT --to-destination {backend}\nCOMMIT\n",
        nat_vip.ip(),
        nat_vip.port()
    );
    let _cg = InCgroup::enter(&f.cgroup);
    // Many short rounds, VIP and direct back to back in each: the machine's
    // speed drifts by tens of percent between seconds, so the ratio of
    // neighbouring measurements (its median over the rounds) is steadier
    // than the ratio of two bests.
    let dur = Duration::from_millis(500);
    let rounds = 15;
    let (mut via_vip, mut direct, mut via_dnat) = (Vec::new(), Vec::new(), Vec::new());
    // Warm-up (first connects pay for ARP and route caches).
    conn_rate(&f.host, backend, Duration::from_millis(200));
    for r in 0..rounds {
        // Alternate which goes first, so neither always gets the warmer CPU.
        if r % 2 == 0 {
            via_vip.push(conn_rate(&f.host, vip, dur));
            direct.push(conn_rate(&f.host, backend, dur));
        } else {
            direct.push(conn_rate(&f.host, backend, dur));
            via_vip.push(conn_rate(&f.host, vip, dur));
        }
        // DNAT last and removed again: nat rules turn on netfilter
        // conntrack for the namespace, which the others must not pay.
        in_host(&f, "iptables-restore", &[], &dnat);
        via_dnat.push(conn_rate(&f.host, nat_vip, dur));
        in_host(&f, "nft", &["flush", "ruleset"], "");
    }
    let c = f.dp().counters().expect("counters");
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let ratios = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>();
    let (v, d, n) = (
        median(via_vip.clone()),
        median(direct.clone()),
        median(via_dnat.clone()),
    );
    println!(
        "service connection rate (connect, 1-byte request/response, reset; median of {rounds} x 0.5 s)"
    );
    println!(
        "  via VIP (connect4)     {v:>10.0} conn/s   {:.3} of direct (median of per-round ratios)",
        median(ratios(&via_vip, &direct))
    );
    println!("  direct to backend      {d:>10.0} conn/s");
    println!(
        "  via iptables DNAT      {n:>10.0} conn/s   VIP/DNAT {:.3} (median of per-round ratios)",
        median(ratios(&via_vip, &via_dnat))
    );
    println!("  rounds: vip {via_vip:.0?} direct {direct:.0?} dnat {via_dnat:.0?}");
    println!("  counters {c:?}");
    assert!(c.lb_rewrites > 0, "connect4 never rewrote: {c:?}");
}

/// Side by side, in one run: (a) no programs vs the eBPF datapath (B under
/// policy, 10,016 rules loaded); (b) the same rules as a linear iptables
/// chain on the same path (every packet walks it; and the usual stateful
/// form where only a connection's first packet does); (c) the time to
/// change one rule at 10,000 rules: our map update vs iptables-restore,
/// iptables -R and nft -f. iptables runs only inside the fixture's host
/// namespace. Run with `scripts/bench-datapath.sh` (release build).
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_datapath_overhead() {
    let f = Fixture::new();
    f.identities();
    let rules = bench_rules(false);
    let t = std::time::Instant::now();
    f.dp().set_policy(&rules).expect("policy");
    let load_all = t.elapsed();
    // (c) ours: the agent's path (the whole desired set in, the diff out).
    let mut ebpf_change = Vec::new();
    for i in 0..41 {
        let r = bench_rules(i % 2 == 0);
        let t = std::time::Instant::now();
        f.dp().set_policy(&r).expect("policy");
        ebpf_change.push(t.elapsed().as_secs_f64() * 1e6);
    }

    // The kernel part alone: one key written and deleted again in the
    // pinned map (behind the Datapath's back, so it leaves no trace).
    let raw_write = {
        let pin = f.dp().pin_root().join("maps").join("im_policy");
        let data = aya::maps::MapData::from_pin(&pin).expect("open pinned im_policy");
        let mut map: aya::maps::HashMap<_, ironmesh_ebpf::PolicyKey, ironmesh_ebpf::PolicyVal> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("hash map");
        let key = ironmesh_ebpf::PolicyKey {
            src_identity: 999,
            dst_identity: ID_B,
            dport: ironmesh_ebpf::port_be(9),
            proto: 6,
            dir: ironmesh_ebpf::DIR_INGRESS,
        };
        let val = ironmesh_ebpf::PolicyVal {
            flags: ironmesh_ebpf::POLICY_ALLOW,
            rule_id: 1,
            rate_per_sec: 0,
            burst: 0,
        };
        let mut t_ins = Vec::new();
        for _ in 0..1000 {
            let t = std::time::Instant::now();
            map.insert(key, val, 0).expect("insert");
            t_ins.push(t.elapsed().as_secs_f64() * 1e6);
            map.remove(&key).expect("remove");
        }
        t_ins
    };

    let (mut none, mut ebpf, mut ipt, mut ipt_ct) =
        (Best::new(), Best::new(), Best::new(), Best::new());
    for round in 0..3u16 {
        let port = |variant: u16| 6000 + variant * 3 + round;
        none.add(iperf(&f), rtt(&f, port(0)));

        f.attach_both();
        f.dp().set_enforced(&[ID_B]).expect("enforce");
        ebpf.add(iperf(&f), rtt(&f, port(1)));
        for i in [&f.a, &f.b] {
            let host_if = i.host_if.clone();
            let dp = f.dp.take_ref();
            in_ns(&f.host, move || dp.get().detach_instance(&host_if)).expect("detach");
        }
        f.dp().set_enforced(&[]).expect("enforce");

        in_host(
            &f,
            "iptables-restore",
            &[],
            &iptables_rules(&f, false, false),
        );
        ipt.add(iperf(&f), rtt(&f, port(2)));
        // Stateful last, then everything flushed: conntrack must not stay
        // on for the next round's baseline.
        in_host(
            &f,
            "iptables-restore",
            &[],
            &iptables_rules(&f, false, true),
        );
        ipt_ct.add(iperf(&f), rtt(&f, port(3)));
        in_host(&f, "nft", &["flush", "ruleset"], "");
    }

    // Round trips paired: the machine's speed drifts between seconds, so
    // each round measures none and eBPF back to back (alternating which
    // goes first) and the figure is the median of the per-round ratios.
    let detach = |f: &Fixture| {
        for i in [&f.a, &f.b] {
            let host_if = i.host_if.clone();
            let dp = f.dp.take_ref();
            in_ns(&f.host, move || dp.get().detach_instance(&host_if)).expect("detach");
        }
        f.dp().set_enforced(&[]).expect("enforce");
    };
    // Three variants per round, in rotating order: no programs, eBPF
    // (local instances delivered by bpf_redirect_peer, the default) and
    // eBPF with both instances host-routed (the packet crosses the host's
    // forward path and B's veth, as without programs).
    let mut paired = Vec::new();
    let mut paired_routed = Vec::new();
    for round in 0..12u16 {
        // eBPF rounds reuse the four allowed ports the rounds above leave
        // free (listeners rebind: std sets SO_REUSEADDR).
        let port = |variant: u16| match variant {
            0 => 6100 + round,
            _ => 6012 + round % 4,
        };
        let ebpf_rtt = |f: &Fixture, host_routed: bool| {
            f.attach_both();
            f.set_host_routed(host_routed);
            f.dp().set_enforced(&[ID_B]).expect("enforce");
            let r = rtt(f, port(1));
            detach(f);
            r.0
        };
        let (mut n, mut e, mut h) = (0.0, 0.0, 0.0);
        for step in 0..3u16 {
            match (round + step) % 3 {
                0 => n = rtt(&f, port(0)).0,
                1 => e = ebpf_rtt(&f, false),
                _ => h = ebpf_rtt(&f, true),
            }
        }
        paired.push(n / e);
        paired_routed.push(n / h);
    }
    let paired_median = median(paired.clone());
    let paired_routed_median = median(paired_routed.clone());

    // (c) theirs, with the 10,000-rule chain loaded.
    in_host(
        &f,
        "iptables-restore",
        &[],
        &iptables_rules(&f, false, false),
    );
    let mut restore = Vec::new();
    let mut replace = Vec::new();
    for i in 0..7 {
        let changed = i % 2 == 0;
        restore.push(
            in_host(
                &f,
                "iptables-restore",
                &[],
                &iptables_rules(&f, changed, false),
            )
            .as_secs_f64()
                * 1e3,
        );
        let port = if changed { "10000" } else { "9" };
        let src = format!("{}/32", bench_ip(0));
        replace.push(
            in_host(
                &f,
                "iptables",
                &[
                    "-R", "IMBENCH", "1", "-s", &src, "-p", "tcp", "--dport", port, "-j", "ACCEPT",
                ],
                "",
            )
            .as_secs_f64()
                * 1e3,
        );
    }
    let mut nft = Vec::new();
    for i in 0..8 {
        let t = in_host(&f, "nft", &["-f", "-"], &nft_rules(i % 2 == 0)).as_secs_f64() * 1e3;
        if i > 0 {
            nft.push(t); // the first one also creates the table
        }
    }
    in_host(&f, "nft", &["flush", "ruleset"], "");
    let backend = Command::new("iptables")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let c = f.dp().counters().expect("counters");
    println!(
        "datapath benchmark (best of 3 rounds; {} rules for B; {backend})",
        rules.len()
    );
    println!("                     none       eBPF       iptables   ipt+ct     eBPF/none  eBPF/ipt   eBPF/ipt+ct");
    println!(
        "throughput Gbit/s    {:<10.2} {:<10.2} {:<10.3} {:<10.2} {:<10.3} {:<10.1} {:.3}",
        none.gbit,
        ebpf.gbit,
        ipt.gbit,
        ipt_ct.gbit,
        ebpf.gbit / none.gbit,
        ebpf.gbit / ipt.gbit,
        ebpf.gbit / ipt_ct.gbit
    );
    for (what, get) in [
        ("rtt median us ", (|b: &Best| b.rtt_med) as fn(&Best) -> f64),
        ("rtt p99 us    ", |b: &Best| b.rtt_p99),
    ] {
        println!(
            "{what}       {:<10.1} {:<10.1} {:<10.1} {:<10.1} {:<10.3} {:<10.2} {:.3}",
            get(&none),
            get(&ebpf),
            get(&ipt),
            get(&ipt_ct),
            get(&none) / get(&ebpf),
            get(&ipt) / get(&ebpf),
            get(&ipt_ct) / get(&ebpf),
        );
    }
    println!("  (rtt ratios are the other over eBPF: above 1 means eBPF is faster)");
    println!(
        "rtt median none/eBPF, paired: {paired_median:.3} (median of {} back-to-back rounds: {:.3?})",
        paired.len(),
        paired
    );
    println!(
        "rtt median none/eBPF host-routed (--datapath-peer-redirect=false), paired: {paired_routed_median:.3} (rounds: {:.3?})",
        paired_routed
    );
    let (em, ep) = (median(ebpf_change.clone()), p99(ebpf_change));
    let (rm, xm, nm) = (median(restore), median(replace), median(nft));
    println!("change one rule at {} rules:", rules.len());
    println!("  eBPF set_policy (whole set in, diff written)  median {em:.1} us  p99 {ep:.1} us");
    println!(
        "  one pinned-map write (the kernel part alone)  median {:.2} us  p99 {:.2} us",
        median(raw_write.clone()),
        p99(raw_write)
    );
    println!(
        "  iptables-restore of the 10k set              median {rm:.1} ms  ({:.0}x eBPF)",
        rm * 1e3 / em
    );
    println!(
        "  iptables -R of the one rule                  median {xm:.1} ms  ({:.0}x eBPF)",
        xm * 1e3 / em
    );
    println!(
        "  nft -f of the 10k set                        median {nm:.1} ms  ({:.0}x eBPF)",
        nm * 1e3 / em
    );
    println!(
        "  eBPF first load of {} rules: {:.1} ms",
        rules.len(),
        load_all.as_secs_f64() * 1e3
    );
    println!("counters {c:?}");
    assert!(c.denied == 0, "benchmark traffic must be allowed: {c:?}");
}

// ---- Containment: anti-spoofing and conntrack that cannot be poisoned ----

/// Sends one Ethernet frame out of `ifname` in namespace `ns` through a
/// packet socket (what an instance with NET_RAW can do).
fn send_frame(ns: &Path, ifname: &str, frame: Vec<u8>) {
    let ifname = ifname.to_string();
    in_ns(ns, move || {
        let name = std::ffi::CString::new(ifname.clone()).expect("name");
        // SAFETY: plain syscalls on a socket this closure owns.
        unsafe {
            let idx = libc::if_nametoindex(name.as_ptr());
            assert_ne!(idx, 0, "no interface {ifname}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
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
            assert_eq!(n, frame.len() as isize, "sendto on {ifname}: {err}");
        }
    })
}

const HOST_MAC: [u8; 6] = [0xee; 6];
const SOME_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (no options) around `l4`, with a correct header
/// checksum; the L4 checksum over the pseudo-header is filled in at
/// `csum_at` (TCP) when given.
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = csum_at {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&l4);
        let c = checksum(&pseudo);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&l4);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
    u.extend_from_slice(payload);
    u
}

/// A bare 20-byte TCP header with `flags` (checksum filled by [`ipv4`]).
fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&0x1000_0000u32.to_be_bytes()); // seq
    t.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // ack
    t.extend_from_slice(&[0x50, flags]);
    t.extend_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t
}

fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], sender_mac, 0x0806, &a)
}

/// The MAC of `eth0` inside an instance namespace.
fn eth0_mac(ns_name: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", ns_name, "-j", "link", "show", "eth0"])
        .output()
        .expect("ip link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let s = v[0]["address"].as_str().expect("address").to_string();
    let mut mac = [0u8; 6];
    for (i, b) in s.split(':').enumerate() {
        mac[i] = u8::from_str_radix(b, 16).expect("hex");
    }
    mac
}

/// Whether the UDP socket receives `want` before the deadline.
fn receives(sock: &std::net::UdpSocket, want: &[u8], within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 256];
    while std::time::Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if &buf[..n] == want {
                return true;
            }
        }
    }
    false
}

#[test]
fn a_spoofed_source_is_dropped_counted_and_reported_and_only_ipv4_and_own_arp_leave() {
    let f = Fixture::new();
    f.attach_both();
    // V: another mesh identity that B lets in; A is not allowed into B.
    let o = f.a.ip.octets();
    let v = Ipv4Addr::new(o[0], o[1], o[2], 9);
    const ID_V: u32 = 300;
    f.dp()
        .set_identities(&[(f.a.ip, ID_A), (f.b.ip, ID_B), (v, ID_V)])
        .expect("identities");
    f.dp().set_enforced(&[ID_B]).expect("enforce");
    f.dp()
        .set_policy(&[PolicyRule::ingress(Some(ID_V), ID_B, 7777, Protocol::Udp)])
        .expect("policy");
    rp_filter_off(&f.host);
    let mut flows = {
        let _g = f.rt.enter();
        f.dp().flows().expect("flows")
    };
    let b_ip = f.b.ip;
    let sock = in_ns(&f.b.ns, move || {
        std::net::UdpSocket::bind(SocketAddrV4::new(b_ip, 7777)).expect("bind")
    });
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");

    // A claims to be V: the host veth drops it; B never sees it.
    let before = f.dp().counters().expect("counters");
    let spoofed = eth(
        HOST_MAC,
        SOME_MAC,
        0x0800,
        &ipv4(v, f.b.ip, 17, udp(5000, 7777, b"as-v"), None),
    );
    send_frame(&f.a.ns, "eth0", spoofed);
    assert!(
        !receives(&sock, b"as-v", SHORT),
        "B received a datagram A sent as V"
    );
    let after = f.dp().counters().expect("counters");
    assert_eq!(after.spoofed, before.spoofed + 1, "{before:?} -> {after:?}");
    wait_until("the spoofed flow event", || {
        drain(&mut flows).iter().any(|e| {
            e.verdict == Verdict::Spoofed
                && *e.src.ip() == f.a.ip
                && e.src_identity == ID_A
                && e.claimed_src == Some(v)
                && *e.dst.ip() == f.b.ip
                && e.dst.port() == 7777
        })
    });

    // The same datagram with A's own source reaches the checks of policy
    // (A is not let into B), and with the policy lifted it arrives: the
    // frame itself was fine.
    let honest = || {
        eth(
            HOST_MAC,
            SOME_MAC,
            0x0800,
            &ipv4(f.a.ip, f.b.ip, 17, udp(5000, 7777, b"as-a"), None),
        )
    };
    send_frame(&f.a.ns, "eth0", honest());
    assert!(!receives(&sock, b"as-a", SHORT), "policy still applies");
    f.dp().set_enforced(&[]).expect("enforce");
    send_frame(&f.a.ns, "eth0", honest());
    assert!(
        receives(&sock, b"as-a", Duration::from_secs(2)),
        "A's own datagram"
    );
    assert_eq!(
        f.dp().counters().expect("counters").spoofed,
        after.spoofed,
        "A's own source counted as spoofed"
    );

    // IPv6 (or any non-IPv4, non-ARP frame) never leaves an instance.
    let c = f.dp().counters().expect("counters");
    send_frame(
        &f.a.ns,
        "eth0",
        eth(HOST_MAC, SOME_MAC, 0x86dd, &[0x60; 48]),
    );
    assert_eq!(
        f.dp().counters().expect("counters").not_ipv4,
        c.not_ipv4 + 1
    );

    // ARP is let out only with A's own sender address: a claim to be V is
    // dropped (the host never learns V at A), A's own request passes.
    let c = f.dp().counters().expect("counters");
    send_frame(
        &f.a.ns,
        "eth0",
        arp_request(SOME_MAC, v, Ipv4Addr::new(169, 254, 1, 1)),
    );
    assert_eq!(
        f.dp().counters().expect("counters").arp_spoofed,
        c.arp_spoofed + 1
    );
    send_frame(
        &f.a.ns,
        "eth0",
        arp_request(SOME_MAC, f.a.ip, Ipv4Addr::new(169, 254, 1, 1)),
    );
    assert_eq!(
        f.dp().counters().expect("counters").arp_spoofed,
        c.arp_spoofed + 1,
        "A's own ARP counted as spoofed"
    );
    let neigh = Command::new("ip")
        .args(["-n", &f.host_name, "neigh", "show", "dev", &f.a.host_if])
        .output()
        .expect("ip neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        !neigh.contains(&format!("{v} ")),
        "the host learnt V behind A's veth: {neigh}"
    );
}

/// Connects from `local` (a fixed source port) inside `ns` to `to`; true if
/// the connection opens within `timeout`.
fn connect_from(ns: &Path, local: SocketAddrV4, to: SocketAddrV4, timeout: Duration) -> bool {
    in_ns(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_reuse_address(true).expect("reuse");
        s.bind(&SocketAddr::V4(local).into())
            .expect("bind local port");
        s.connect_timeout(&SocketAddr::V4(to).into(), timeout)
            .is_ok()
    })
}

#[test]
fn a_packet_of_anothers_established_flow_is_still_checked_for_spoofing() {
    // A flow's conntrack entry remembers the veth each direction left from,
    // so later packets from that veth skip the source lookup; the same
    // 5-tuple sent from any other veth must still be checked and dropped.
    let f = Fixture::new();
    f.attach_both();
    f.identities();
    rp_filter_off(&f.host);
    let (a_ip, b_ip) = (f.a.ip, f.b.ip);
    let at_b = in_ns(&f.b.ns, move || {
        std::net::UdpSocket::bind(SocketAddrV4::new(b_ip, 7777)).expect("bind")
    });
    at_b.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let at_a = in_ns(&f.a.ns, move || {
        std::net::UdpSocket::bind(SocketAddrV4::new(a_ip, 5000)).expect("bind")
    });
    at_a.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let a_to_b = |payload: &[u8]| {
        eth(
            HOST_MAC,
            SOME_MAC,
            0x0800,
            &ipv4(a_ip, b_ip, 17, udp(5000, 7777, payload), None),
        )
    };
    let b_to_a = |payload: &[u8]| {
        eth(
            HOST_MAC,
            SOME_MAC,
            0x0800,
            &ipv4(b_ip, a_ip, 17, udp(7777, 5000, payload), None),
        )
    };

    // The flow A:5000 <-> B:7777 in both directions, each from its own veth.
    send_frame(&f.a.ns, "eth0", a_to_b(b"a-1"));
    assert!(
        receives(&at_b, b"a-1", Duration::from_secs(2)),
        "A's first datagram"
    );
    send_frame(&f.b.ns, "eth0", b_to_a(b"b-1"));
    assert!(receives(&at_a, b"b-1", Duration::from_secs(2)), "B's reply");
    let before = f.dp().counters().expect("counters");

    // B sends A's direction of it, claiming A's address: dropped as spoofed.
    send_frame(&f.b.ns, "eth0", a_to_b(b"forged-by-b"));
    assert!(
        !receives(&at_b, b"forged-by-b", SHORT),
        "a datagram B forged as A's flow got through"
    );
    // A sends B's direction of it, claiming B's address: dropped as well.
    send_frame(&f.a.ns, "eth0", b_to_a(b"forged-by-a"));
    assert!(
        !receives(&at_a, b"forged-by-a", SHORT),
        "a datagram A forged as B's reply got through"
    );
    let after = f.dp().counters().expect("counters");
    assert_eq!(after.spoofed, before.spoofed + 2, "{before:?} -> {after:?}");

    // The flow's own packets still pass, from their own veths.
    send_frame(&f.a.ns, "eth0", a_to_b(b"a-2"));
    assert!(
        receives(&at_b, b"a-2", Duration::from_secs(2)),
        "A's next datagram"
    );
    send_frame(&f.b.ns, "eth0", b_to_a(b"b-2"));
    assert!(
        receives(&at_a, b"b-2", Duration::from_secs(2)),
        "B's next reply"
    );
    assert_eq!(f.dp().counters().expect("counters").spoofed, after.spoofed);
}

#[test]
fn a_spoofed_reply_does_not_open_a_connection_through_default_deny() {
    let f = Fixture::new();
    f.attach_both();
    f.identities();
    // V (= B here) is default-deny for ingress with no rule: nobody gets in.
    f.dp().set_enforced(&[ID_B]).expect("enforce");
    let to_v = SocketAddrV4::new(f.b.ip, 5432);
    let _sv = Server::start(&f.b.ns, to_v, "from-v");
    let from_a = SocketAddrV4::new(f.a.ip, 40000);
    // (Another source port: a refused attempt must not stand in for the
    // spoofed entry below.)
    assert!(
        !connect_from(&f.a.ns, SocketAddrV4::new(f.a.ip, 40001), to_v, SHORT),
        "A -> V:5432 must be denied to begin with"
    );

    // A frame that claims V:5432 -> A:40000, arriving from outside the
    // instance (injected on A's host veth, as from another host or the
    // world), is let into A (A is not enforced)...
    let frame = eth(
        eth0_mac(&f.a.name),
        HOST_MAC,
        0x0800,
        &ipv4(f.b.ip, f.a.ip, 6, tcp(5432, 40000, 0x12), Some(16)),
    );
    let before = f.dp().counters().expect("counters");
    send_frame(&f.host, &f.a.host_if, frame);
    assert!(f.dp().counters().expect("counters").allowed > before.allowed);

    // ...but the SYN that follows, A:40000 -> V:5432, is a new connection,
    // not its reply: V's default-deny still refuses it.
    let before = f.dp().counters().expect("counters");
    let entries = f.dp().conntrack_len().expect("conntrack");
    assert!(
        !connect_from(&f.a.ns, from_a, to_v, SHORT),
        "the spoofed entry carried A's SYN through V's default-deny"
    );
    assert!(f.dp().counters().expect("counters").denied > before.denied);
    assert_eq!(
        f.dp().conntrack_len().expect("conntrack"),
        entries,
        "a denied SYN wrote a conntrack entry"
    );

    // A refused flow leaves no entry in the way: allowing it later lets the
    // next attempt through.
    f.dp()
        .set_policy(&[tcp_rule(ID_A, ID_B, 5432)])
        .expect("policy");
    assert!(connect_from(&f.a.ns, from_a, to_v, Duration::from_secs(2)));
}

#[test]
fn a_full_policy_map_still_enforces_and_denies_what_its_missing_rules_allow() {
    let f = Fixture::new();
    f.attach_both();
    f.identities();
    let to_b = SocketAddrV4::new(f.b.ip, 8080);
    let _sb = Server::start(&f.b.ns, to_b, "from-b");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));

    // im_policy holds 65,536 rules: fill it with rules for someone else.
    let mut rules: Vec<PolicyRule> = (0..65_536u32)
        .map(|i| tcp_rule(1_000_000 + i, 999, 80))
        .collect();
    f.dp()
        .set_policy(&rules)
        .expect("a full map's worth of rules");
    // Selecting B with a rule for A that no longer fits: the write fails,
    // says so, and B is enforced all the same: A is denied, not let in by
    // default.
    rules.push(tcp_rule(ID_A, ID_B, 8080));
    let e = f
        .dp()
        .apply_policy(&rules, &[ID_B], &[])
        .expect_err("the rule cannot fit");
    assert!(
        e.to_string()
            .contains("1 policy rules could not be written"),
        "{e}"
    );
    let before = f.dp().counters().expect("counters");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT), None, "A let into B unenforced");
    assert!(f.dp().counters().expect("counters").denied > before.denied);

    // Room again (fewer rules): the same apply succeeds and A gets in.
    rules.drain(..10);
    f.dp().apply_policy(&rules, &[ID_B], &[]).expect("fits now");
    assert_eq!(fetch(&f.a.ns, to_b, SHORT).as_deref(), Some("from-b"));
}

/// Mounts bpffs at /sys/fs/bpf unless something is mounted there (a fresh
/// host has none; the agent binary does the same at start). Once per test
/// binary: two mounts racing would stack one bpffs over the other.
fn ensure_bpffs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read mounts");
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
        {
            return;
        }
        sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
    });
}

/// Lets the host namespace route frames whose source a veth does not own
/// (the tests forge them to see the datapath drop them).
fn rp_filter_off(host: &Path) {
    sh(&[
        "nsenter",
        &format!("--net={}", host.display()),
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.rp_filter=0",
    ]);
}

// ---- Delivery between local instances -----------------------------------

/// Receives one datagram on `sock` (IP_RECVTTL set) within `within`: its
/// payload and the TTL it arrived with.
fn recv_with_ttl(sock: &std::net::UdpSocket, within: Duration) -> Option<(Vec<u8>, u8)> {
    let deadline = std::time::Instant::now() + within;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    while std::time::Instant::now() < deadline {
        let mut buf = [0u8; 256];
        let mut cmsg = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr points at live buffers of the stated sizes.
        let (n, ttl) = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg);
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, 0);
            let mut ttl = None;
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                    ttl = Some(*(libc::CMSG_DATA(c) as *const libc::c_int) as u8);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            (n, ttl)
        };
        if n > 0 {
            return Some((
                buf[..n as usize].to_vec(),
                ttl.expect("IP_TTL control message"),
            ));
        }
    }
    None
}

/// A UDP socket of B's on `port` that reports each datagram's TTL.
fn ttl_socket(f: &Fixture, port: u16) -> std::net::UdpSocket {
    let b_ip = f.b.ip;
    let sock = in_ns(&f.b.ns, move || {
        std::net::UdpSocket::bind(SocketAddrV4::new(b_ip, port)).expect("bind")
    });
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with an int option.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVTTL,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_RECVTTL");
    sock
}

/// Sends `n` datagrams A -> B:port and checks each arrives once with the
/// TTL a router leaves (64 - 1). Returns (peer redirects, packets the host
/// sent out of B's veth) counted meanwhile.
fn send_and_count(
    f: &Fixture,
    from_a: &std::net::UdpSocket,
    at_b: &std::net::UdpSocket,
    port: u16,
    n: usize,
) -> (u64, u64) {
    let to = SocketAddrV4::new(f.b.ip, port);
    let (c0, tx0) = (
        f.dp().counters().expect("counters").peer_redirects,
        f.tx_packets(&f.b.host_if),
    );
    for i in 0..n {
        let payload = format!("d{i}");
        from_a.send_to(payload.as_bytes(), to).expect("send");
        let (got, ttl) = recv_with_ttl(at_b, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("datagram {i} did not reach B"));
        assert_eq!(got, payload.as_bytes(), "datagram {i}");
        assert_eq!(ttl, 63, "datagram {i}: TTL as after one router hop");
    }
    (
        f.dp().counters().expect("counters").peer_redirects - c0,
        f.tx_packets(&f.b.host_if) - tx0,
    )
}

#[test]
fn packets_between_local_instances_go_straight_to_the_peer_as_routed() {
    let mut f = Fixture::new();
    f.identities();
    f.attach_both();
    let a_ip = f.a.ip;
    let from_a = in_ns(&f.a.ns, move || {
        std::net::UdpSocket::bind(SocketAddrV4::new(a_ip, 0)).expect("bind")
    });
    from_a.set_ttl(64).expect("ttl");
    let at_b = ttl_socket(&f, 7100);
    let to = SocketAddrV4::new(f.b.ip, 7100);

    // A flow's first packets are routed by the host (which learns B's MAC
    // by ARP); once B has answered from its own veth, the conntrack entry
    // knows both ends are local and later packets go straight across.
    wait_until("a first datagram reaches B", || {
        from_a.send_to(b"warm", to).expect("send");
        recv_with_ttl(&at_b, Duration::from_millis(100)).is_some()
    });
    while recv_with_ttl(&at_b, Duration::from_millis(50)).is_some() {}
    let a_addr = from_a.local_addr().expect("local addr");
    at_b.send_to(b"back", a_addr).expect("answer");
    from_a
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let (n, _) = from_a.recv_from(&mut buf).expect("B's answer reaches A");
    assert_eq!(&buf[..n], b"back");

    let (redirects, tx) = send_and_count(&f, &from_a, &at_b, 7100, 50);
    assert!(
        redirects >= 50,
        "{redirects} peer redirects for 50 datagrams"
    );
    assert!(
        tx < 10,
        "the host sent {tx} packets out of B's veth: they did not skip it"
    );

    // A datagram with TTL 1 would expire at the host: not delivered.
    from_a.set_ttl(1).expect("ttl");
    from_a.send_to(b"expiring", to).expect("send");
    assert!(
        recv_with_ttl(&at_b, Duration::from_millis(300)).is_none(),
        "a TTL 1 datagram crossed the host"
    );
    from_a.set_ttl(64).expect("ttl");

    // With peer redirect off (an agent restarted with
    // --datapath-peer-redirect=false), attached instances are host-routed.
    f.load_with(DatapathConfig {
        peer_redirect: false,
        ..DatapathConfig::default()
    });
    let (redirects, tx) = send_and_count(&f, &from_a, &at_b, 7100, 50);
    assert_eq!(redirects, 0, "host-routed instances must not be redirected");
    assert!(tx >= 50, "only {tx} packets left B's veth for 50 datagrams");
}
