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
    Datapath, FlowEvent, FlowEventKind, PolicyRule, Protocol, RateLimit, ServiceEntry, Verdict,
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

fn setns(path: &Path) {
    let f = std::fs::File::open(path).expect("open netns");
    // SAFETY: changes only the calling thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {}", path.display());
}

/// Runs `f` on a fresh thread inside the namespace `ns`. Sockets made there
/// stay in that namespace wherever they are used later.
fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        setns(&ns);
        f()
    })
    .join()
    .expect("thread in netns")
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
        let (pin, cg) = (self.pin_dir.clone(), self.cgroup.clone());
        let dp = in_ns(&self.host, move || Datapath::load(&pin, &cg)).expect("load datapath");
        self.dp = Some(dp);
    }

    fn dp(&self) -> &Datapath {
        self.dp.as_ref().expect("datapath loaded")
    }

    fn attach_both(&self) {
        let dp = self.dp.take_ref();
        for i in [&self.a, &self.b] {
            let host_if = i.host_if.clone();
            in_ns(&self.host, move || dp.get().attach_instance(&host_if)).expect("attach");
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
        4,
        "connect4, sendmsg4, recvmsg4, getpeername4 once each"
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
    std::thread::sleep(Duration::from_millis(300));
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
fn rtt(f: &Fixture, port: u16) -> (f64, f64) {
    let addr = SocketAddrV4::new(f.b.ip, port);
    let listener = in_ns(&f.b.ns, move || TcpListener::bind(addr).expect("bind"));
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        c.set_nodelay(true).expect("nodelay");
        let mut b = [0u8; 1];
        while c.read_exact(&mut b).is_ok() {
            if c.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut c = in_ns(&f.a.ns, move || TcpStream::connect(addr).expect("connect"));
    c.set_nodelay(true).expect("nodelay");
    let mut samples = Vec::with_capacity(5000);
    let mut b = [7u8; 1];
    for i in 0..5200 {
        let t = std::time::Instant::now();
        c.write_all(&b).expect("write");
        c.read_exact(&mut b).expect("read");
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

/// Side by side: programs attached (B under policy, an allow rule, 10,000
/// other rules loaded) vs none. Run with
/// `cargo test -p ironmesh-agent --test datapath -- --ignored --nocapture bench`.
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_datapath_overhead() {
    let f = Fixture::new();
    let mut rules: Vec<PolicyRule> = (0..10_000u32)
        .map(|i| tcp_rule(1000 + i, ID_B, 10_000 + (i % 50_000) as u16))
        .collect();
    rules.push(tcp_rule(ID_A, ID_B, 5201));
    for p in 6000..6010 {
        rules.push(tcp_rule(ID_A, ID_B, p));
    }
    let t = std::time::Instant::now();
    f.dp().set_policy(&rules).expect("policy");
    let load_10k = t.elapsed();
    // One rule changed at 10,000 rules (replace-set of the whole table).
    rules[0].port = 9;
    let t = std::time::Instant::now();
    f.dp().set_policy(&rules).expect("policy");
    let change_one = t.elapsed();

    let mut none = (0.0f64, f64::MAX, f64::MAX);
    let mut with = (0.0f64, f64::MAX, f64::MAX);
    for round in 0..2u16 {
        let g = iperf(&f);
        let (m, p) = rtt(&f, 6000 + round * 2);
        none = (none.0.max(g), none.1.min(m), none.2.min(p));
        f.attach_both();
        f.identities();
        f.dp().set_enforced(&[ID_B]).expect("enforce");
        let g = iperf(&f);
        let (m, p) = rtt(&f, 6001 + round * 2);
        with = (with.0.max(g), with.1.min(m), with.2.min(p));
        for i in [&f.a, &f.b] {
            let host_if = i.host_if.clone();
            let dp = f.dp.take_ref();
            in_ns(&f.host, move || dp.get().detach_instance(&host_if)).expect("detach");
        }
        f.dp().set_enforced(&[]).expect("enforce");
    }
    let c = f.dp().counters().expect("counters");
    println!("datapath benchmark (best of 2 rounds; B under policy, 10,011 rules loaded)");
    println!("                     none       attached   ratio");
    println!(
        "throughput Gbit/s    {:<10.2} {:<10.2} {:.3}",
        none.0,
        with.0,
        with.0 / none.0
    );
    println!(
        "rtt median us        {:<10.1} {:<10.1} {:.3} (none/attached)",
        none.1,
        with.1,
        none.1 / with.1
    );
    println!(
        "rtt p99 us           {:<10.1} {:<10.1} {:.3} (none/attached)",
        none.2,
        with.2,
        none.2 / with.2
    );
    println!(
        "policy: write 10,011 rules {:.1} ms; change one rule at 10,011 (replace-set) {:.1} ms",
        load_10k.as_secs_f64() * 1e3,
        change_one.as_secs_f64() * 1e3
    );
    println!("counters {c:?}");
    assert!(c.denied == 0, "benchmark traffic must be allowed: {c:?}");
}
