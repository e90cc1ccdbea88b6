//! The processes the bench starts (a controller, an etcd) and what it reads
//! about them: resident memory and CPU time from `/proc`, Prometheus text
//! from the controller's metrics port. Everything listens on loopback; every
//! child is killed by its own PID when its handle drops, and by the kernel
//! if this process dies first (`PR_SET_PDEATHSIG`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A child process, SIGKILLed and reaped on drop.
pub struct Child {
    child: Option<std::process::Child>,
    pub what: String,
    pub log: PathBuf,
}

impl Child {
    pub fn spawn(what: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Child> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("create log {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between
        // fork and exec. The child is killed if this process dies without
        // dropping the handle (SIGKILL, a panic that aborts).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {what}: {cmd:?}"))?;
        Ok(Child {
            child: Some(child),
            what: what.to_string(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails if the process has exited (with the end of its log).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                bail!(
                    "{} exited ({st}); last lines of {}:\n{}",
                    self.what,
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
        }
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, a short wait for a clean exit, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free loopback port (bound, then released).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a loopback port")?;
    Ok(l.local_addr()?)
}

/// Raises this process's open-file limit to its hard limit (children
/// inherit it). Returns the new soft limit.
pub fn raise_nofile() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
            lim = want;
        }
    }
    Ok(lim.rlim_cur)
}

/// `VmRSS` and `VmHWM` (peak) of a process, bytes.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) a process used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses;
    // utime and stime are fields 14 and 15, i.e. 12th and 13th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_millis((utime + stime) * 1000 / hz))
}

/// CPU time of the whole machine so far (all cores), from `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// User and system time of every process.
    pub tasks: Duration,
    /// Interrupt and softirq time (network processing of loopback traffic
    /// lands here, attributed to no process).
    pub interrupts: Duration,
    /// Time the hypervisor gave to someone else.
    pub steal: Duration,
}

pub fn machine_cpu() -> Option<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    let d = |ticks: u64| Duration::from_millis(ticks * 1000 / hz);
    // user nice system idle iowait irq softirq steal (guest is in user).
    Some(MachineCpu {
        tasks: d(at(0) + at(1) + at(2)),
        interrupts: d(at(5) + at(6)),
        steal: d(at(7)),
    })
}

/// CPU time every core spent busy (tasks and interrupts) so far.
pub fn machine_busy() -> Option<Duration> {
    machine_cpu().map(|m| m.tasks + m.interrupts)
}

/// Minimal HTTP/1.0 GET of a loopback endpoint.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("metrics request timed out")??;
    let Some((head, rest)) = body.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {addr}");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(rest.to_string())
}

/// The value of one sample in Prometheus text (`name` or `name{labels}`).
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// How the bench runs the controller.
#[derive(Debug, Clone)]
pub struct ControllerSpec {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub cluster_cidr: String,
    pub node_cidr_prefix: u8,
    /// `--store` (etcd://…); embedded when `None`.
    pub store: Option<String>,
    pub ca_key_file: Option<PathBuf>,
    pub heartbeat_interval: Option<String>,
    pub node_grace: Option<String>,
    pub eviction_delay: Option<String>,
    pub log_level: String,
}

impl ControllerSpec {
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    pub fn admin_config(&self) -> PathBuf {
        self.data_dir.join("admin.yaml")
    }

    pub fn token_file(&self) -> PathBuf {
        self.data_dir.join("bootstrap-token")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir.join("pki/ca.crt")
    }

    /// The command line, for the report.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(self.listen.to_string())
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--tls-san")
            .arg(self.listen.ip().to_string())
            .arg("--cluster-cidr")
            .arg(&self.cluster_cidr)
            .arg("--node-cidr-prefix")
            .arg(self.node_cidr_prefix.to_string())
            .env("RUST_LOG", &self.log_level);
        if let Some(s) = &self.store {
            cmd.arg("--store").arg(s);
        }
        if let Some(k) = &self.ca_key_file {
            cmd.arg("--ca-key-file").arg(k);
        }
        if let Some(h) = &self.heartbeat_interval {
            cmd.arg("--heartbeat-interval").arg(h);
        }
        if let Some(g) = &self.node_grace {
            cmd.arg("--node-grace").arg(g);
        }
        if let Some(e) = &self.eviction_delay {
            cmd.arg("--eviction-delay").arg(e);
        }
        cmd
    }

    pub fn spawn(&self, log: &Path) -> anyhow::Result<Child> {
        Child::spawn("ironmesh-controller", self.command(), log.to_path_buf())
    }

    /// Waits until the controller wrote its operator credential and
    /// accepts connections.
    pub async fn wait_serving(&self, child: &mut Child, deadline: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            child.check_alive()?;
            if self.admin_config().exists()
                && tokio::net::TcpStream::connect(self.listen).await.is_ok()
            {
                return Ok(());
            }
            if start.elapsed() > deadline {
                bail!(
                    "controller not serving on {} after {deadline:?}; last lines of {}:\n{}",
                    self.listen,
                    child.log.display(),
                    tail(&child.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts a private etcd (Debian's `etcd-server`) on loopback ports with
/// its data in `dir`, with the test harness's flags (`tests/src/etcd.rs`;
/// etcd's own limits otherwise, e.g. 1.5 MiB per request); waits until it
/// listens.
pub async fn start_etcd(bin: &Path, dir: &Path) -> anyhow::Result<(Child, SocketAddr)> {
    let (client, peer) = (free_addr()?, free_addr()?);
    let client_url = format!("http://{client}");
    let peer_url = format!("http://{peer}");
    let mut cmd = Command::new(bin);
    cmd.args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd-data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .args([
            "--max-txn-ops",
            "10000",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]);
    let mut child = Child::spawn("etcd", cmd, dir.join("etcd.log"))
        .context("start etcd (apt-get install etcd-server)")?;
    let start = Instant::now();
    loop {
        child.check_alive()?;
        if tokio::net::TcpStream::connect(client).await.is_ok() {
            return Ok((child, client));
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("etcd did not listen on {client} within 20s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_memory_and_cpu_time() {
        let pid = std::process::id();
        let (rss, hwm) = memory(pid).unwrap();
        assert!(rss > 0 && hwm >= rss);
        assert!(cpu_time(pid).is_some());
        assert!(machine_busy().is_some());
    }

    #[test]
    fn metric_samples_are_found_by_full_name() {
        let text = "# HELP x\nx_total 3\nx{a=\"b\"} 4.5\n";
        assert_eq!(metric(text, "x_total"), Some(3.0));
        assert_eq!(metric(text, "x{a=\"b\"}"), Some(4.5));
        assert_eq!(metric(text, "x"), None);
    }
}
