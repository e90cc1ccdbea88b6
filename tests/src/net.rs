//! Test hosts made of network namespaces on one machine.
//!
//! A [`TestNet`] is one bridge in the root namespace (`imtbN`, address
//! `10.212.N.1/24`, no uplink); each [`Host`] is a network namespace
//! (`im-<pid>-N-<name>`) with a veth into that bridge and the address
//! `10.212.N.(10+i)/24`. The controller listens on the bridge address; each
//! agent runs inside its host's namespace (`nsenter --net`), so everything
//! it configures — instance namespaces, veths, routes, sysctls — stays in
//! that namespace. Pod CIDRs come from `10.211.0.0/16`.
//!
//! Both test ranges get an `unreachable` route in the root namespace while
//! any TestNet exists, so no test packet can leave the machine. Everything
//! is removed on drop, also when a test panics.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The ranges no test packet may leave the machine in.
pub const SUPERNETS: [&str; 2] = ["10.211.0.0/16", "10.212.0.0/16"];
/// The cluster CIDR test controllers hand pod CIDRs out of.
pub const CLUSTER_CIDR: &str = "10.211.0.0/16";

static LIVE: Mutex<usize> = Mutex::new(0);

/// Where the per-index lock files live: a TestNet holds an exclusive flock
/// on `imtbN.lock` for its lifetime, so concurrent test processes (two
/// `cargo test` runs, a benchmark beside a test) never share a bridge, and
/// a crashed process's index frees itself when the kernel drops its lock.
const LOCK_DIR: &str = "/run/ironmesh-tests";

/// Takes the first free index in 0..200 and returns it with its held lock.
fn claim_index() -> (u8, std::fs::File) {
    std::fs::create_dir_all(LOCK_DIR).expect("create test lock dir");
    for index in 0..200u8 {
        let path = format!("{LOCK_DIR}/imtb{index}.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .expect("open test lock file");
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return (index, file);
        }
    }
    panic!("all 200 test bridge indexes are held by other processes");
}

/// Whether another process still holds some TestNet (its bridge exists).
fn other_testnets_exist() -> bool {
    let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(": imtb"))
}

/// Runs `ip` with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like [`ip`], but failures are ignored (cleanup of what may be gone).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// One bridge with no uplink.
pub struct TestNet {
    pub index: u8,
    pub bridge: String,
    hosts: Mutex<Vec<String>>,
    _lock: std::fs::File,
}

impl TestNet {
    pub fn new() -> TestNet {
        // 0..=199: 10.212.N.0/24, held by this TestNet alone across all
        // processes; a stale bridge of the same name (a killed run) is removed.
        let (index, lock) = claim_index();
        let bridge = format!("imtb{index}");
        {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            if *live == 0 {
                for net in SUPERNETS {
                    ip_quiet(&["route", "replace", "unreachable", net]);
                }
            }
            *live += 1;
        }
        ip_quiet(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("10.212.{index}.1/24"),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        TestNet {
            index,
            bridge,
            hosts: Mutex::new(Vec::new()),
            _lock: lock,
        }
    }

    /// The bridge's address: where the controller listens.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 212, self.index, 1)
    }

    /// A new host: a namespace with `lo` up and a veth into the bridge.
    pub fn add_host(&self, name: &str) -> Host {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let i = hosts.len() as u8;
        let netns = format!("im-{}-{}-{name}", std::process::id(), self.index);
        let outer = format!("imtv{}x{i}", self.index);
        let addr = Ipv4Addr::new(10, 212, self.index, 10 + i);
        ip_quiet(&["netns", "del", &netns]);
        ip_quiet(&["link", "del", &outer]);
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &outer, "master", &self.bridge, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        hosts.push(netns.clone());
        Host {
            name: name.to_string(),
            netns,
            addr,
            outer,
        }
    }
}

impl Default for TestNet {
    fn default() -> Self {
        TestNet::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        ip_quiet(&["link", "del", &self.bridge]);
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        *live = live.saturating_sub(1);
        // The unreachable routes are shared with other test processes: the
        // last TestNet on the machine removes them.
        if *live == 0 && !other_testnets_exist() {
            for net in SUPERNETS {
                ip_quiet(&["route", "del", "unreachable", net]);
            }
        }
    }
}

/// A fake host: a network namespace on a [`TestNet`].
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    outer: String,
}

impl Host {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// A command that runs `program` inside this host's network namespace
    /// (`nsenter --net`, which keeps /sys and the cgroup mounts as they are;
    /// `ip netns exec` would remount /sys).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a thread that has joined this host's network namespace
    /// (for test-side connections to instance addresses).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        crate::netns::within(&self.netns_path(), f)
    }

    /// A TCP connect + HTTP GET from inside this host.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
        let path = path.to_string();
        self.within(move || crate::http_get(addr, &path))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        ip_quiet(&["link", "del", &self.outer]);
        ip_quiet(&["netns", "del", &self.netns]);
    }
}
