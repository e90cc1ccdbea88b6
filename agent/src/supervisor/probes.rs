//! Liveness and readiness probes of one running instance.
//!
//! A probe is an exec in the container (success: exit 0), an HTTP GET to
//! `probe_host:port/path` (success: status 200–399) or a TCP connect to
//! `probe_host:port`, each within `timeoutSeconds`. Each probe of a running
//! task is one tokio task that waits `initialDelaySeconds`, then checks
//! every `periodSeconds` and sends [`ProbeSignal`]s to the instance task:
//! readiness flips `ready` (one success makes it ready, `failureThreshold`
//! consecutive failures unready), liveness asks for a kill after
//! `failureThreshold` consecutive failures. The tasks are aborted when the
//! [`ProbeTasks`] guard is dropped (the task exited or is being stopped).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ironmesh_api::workload::Probe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::runtime::Runtime;

/// Most of an HTTP response read to find its status line.
const HTTP_HEAD_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
}

impl std::fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
        })
    }
}

/// What a probe task tells its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSignal {
    /// Readiness changed.
    Ready(bool),
    /// One check failed (an `Unhealthy` event).
    Failed { kind: ProbeKind, message: String },
    /// Liveness failed `failureThreshold` times in a row: kill the task.
    LivenessExceeded { failures: u32, message: String },
}

/// Where probes of one instance go.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub runtime: Runtime,
    /// Container id, for exec probes.
    pub id: String,
    /// Host of HTTP and TCP probes.
    pub host: IpAddr,
}

/// The probe tasks of one running task; aborted on drop.
#[derive(Debug, Default)]
pub struct ProbeTasks(Vec<JoinHandle<()>>);

impl Drop for ProbeTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl ProbeTasks {
    /// Starts the probes that are set. `running_for` is how long the task
    /// has already run (an adopted task is past part of its initial delay).
    pub fn spawn(
        liveness: Option<&Probe>,
        readiness: Option<&Probe>,
        target: ProbeTarget,
        running_for: Duration,
        signals: mpsc::Sender<ProbeSignal>,
    ) -> ProbeTasks {
        let target = Arc::new(target);
        let mut tasks = Vec::new();
        for (kind, probe) in [
            (ProbeKind::Liveness, liveness),
            (ProbeKind::Readiness, readiness),
        ] {
            if let Some(probe) = probe {
                tasks.push(tokio::spawn(run(
                    kind,
                    probe.clone(),
                    target.clone(),
                    running_for,
                    signals.clone(),
                )));
            }
        }
        ProbeTasks(tasks)
    }
}

async fn run(
    kind: ProbeKind,
    probe: Probe,
    target: Arc<ProbeTarget>,
    running_for: Duration,
    signals: mpsc::Sender<ProbeSignal>,
) {
    let initial =
        Duration::from_secs(probe.initial_delay_seconds.into()).saturating_sub(running_for);
    let period = Duration::from_secs(probe.period_seconds.max(1).into());
    let threshold = probe.failure_threshold.max(1);
    let mut next = Instant::now() + initial;
    let mut failures = 0u32;
    let mut ready = false;
    loop {
        tokio::time::sleep_until(next).await;
        next = Instant::now() + period;
        let result = check(&probe, &target).await;
        tracing::debug!(instance = %target.id, probe = %kind, ok = result.is_ok(), "probe checked");
        let sent = match result {
            Ok(()) => {
                failures = 0;
                if kind == ProbeKind::Readiness && !ready {
                    ready = true;
                    signals.send(ProbeSignal::Ready(true)).await
                } else {
                    Ok(())
                }
            }
            Err(message) => {
                failures = failures.saturating_add(1);
                let mut sent = signals
                    .send(ProbeSignal::Failed {
                        kind,
                        message: message.clone(),
                    })
                    .await;
                if failures >= threshold {
                    match kind {
                        ProbeKind::Readiness if ready => {
                            ready = false;
                            sent = sent.and(signals.send(ProbeSignal::Ready(false)).await);
                        }
                        ProbeKind::Readiness => {}
                        ProbeKind::Liveness => {
                            let _ = signals
                                .send(ProbeSignal::LivenessExceeded { failures, message })
                                .await;
                            // The instance kills the task; this run is over.
                            return;
                        }
                    }
                }
                sent
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Runs one check of `probe`; the error says why it failed.
pub async fn check(probe: &Probe, target: &ProbeTarget) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.max(1).into());
    if let Some(exec) = &probe.exec {
        let out = target
            .runtime
            .exec(&target.id, &exec.command, timeout)
            .await
            .map_err(|e| format!("exec {:?}: {e}", exec.command))?;
        return match out.exit_code {
            Some(0) => Ok(()),
            Some(code) => {
                let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
                if text.is_empty() {
                    text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                }
                let text: String = text.chars().take(200).collect();
                Err(format!(
                    "exec {:?} exited with code {code}{}",
                    exec.command,
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!(": {text}")
                    }
                ))
            }
            None => Err(format!(
                "exec {:?} timed out after {timeout:?}",
                exec.command
            )),
        };
    }
    if let Some(http) = &probe.http_get {
        let addr = SocketAddr::new(target.host, port(http.port)?);
        return http_get(addr, &http.path, timeout).await;
    }
    if let Some(tcp) = &probe.tcp_socket {
        let addr = SocketAddr::new(target.host, port(tcp.port)?);
        return match tokio::time::timeout(timeout, connect_marked(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: timed out after {timeout:?}")),
        };
    }
    Err("probe has no exec, httpGet or tcpSocket action".to_string())
}

fn port(p: u32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {p} is out of range"))
}

/// A TCP connection from the agent, marked (SO_MARK) as the agent's: a
/// strict mesh instance takes it from the host like the kubelet's probes.
async fn connect_marked(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    let mark: u32 = ironmesh_ebpf::MARK_AGENT;
    // SAFETY: setsockopt with a u32 of the stated length on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot mark a probe socket");
    }
    sock.connect(addr).await
}

/// A plain HTTP/1.1 GET with `Connection: close`; only the status line is
/// read.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let url = format!("http://{addr}{path}");
    let exchange = async {
        let mut stream = connect_marked(addr)
            .await
            .map_err(|e| format!("dial tcp {addr}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ironmesh-probe/1\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send request: {e}"))?;
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 512];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < HTTP_HEAD_MAX {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read response: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        status_code(&head)
    };
    let code = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => return Err(format!("GET {url}: {e}")),
        Err(_) => return Err(format!("GET {url}: timed out after {timeout:?}")),
    };
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {url}: HTTP status {code}"))
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(head: &[u8]) -> Result<u16, String> {
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse()
            .map_err(|_| format!("malformed status line {line:?}")),
        _ if line.is_empty() => Err("connection closed without a response".to_string()),
        _ => Err(format!("malformed status line {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(status_code(b"HTTP/1.0 404 Not Found\r\nX: y"), Ok(404));
        assert!(status_code(b"").is_err());
        assert!(status_code(b"SSH-2.0-OpenSSH\r\n").is_err());
    }

    async fn serve_once(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(response.as_bytes()).await;
        });
        addr
    }

    #[tokio::test]
    async fn http_success_and_failure() {
        let ok = serve_once("HTTP/1.1 204 No Content\r\n\r\n").await;
        http_get(ok, "/healthz", Duration::from_secs(2))
            .await
            .unwrap();
        let bad = serve_once("HTTP/1.1 503 Unavailable\r\n\r\n").await;
        let err = http_get(bad, "/healthz", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.contains("503") && err.contains("/healthz"), "{err}");
    }

    #[tokio::test]
    async fn http_timeout_is_a_failure() {
        // Accepts (backlog) but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let err = http_get(addr, "/", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        drop(listener);
    }
}
