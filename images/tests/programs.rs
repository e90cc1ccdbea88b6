//! The programs that go into the images, run as ordinary processes:
//! `batch-step` (output file, EXIT_CODE, --check, SIGTERM) and
//! `records-server` (healthz, records, SIGTERM). Every wait has a
//! deadline; only processes started here are signalled or killed.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BATCH_STEP: &str = env!("CARGO_BIN_EXE_batch-step");
const RECORDS_SERVER: &str = env!("CARGO_BIN_EXE_records-server");
const DEADLINE: Duration = Duration::from_secs(20);

/// A child process killed (and reaped) on drop unless it already exited.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `cmd` with stdout piped into a line channel.
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc { child, lines }
    }

    /// The first line containing `needle`, or a panic at the deadline.
    fn wait_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line containing {needle:?} ({e})"),
            }
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: signals the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// The exit status, polling until the deadline.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn step(storage: &Path) -> Command {
    let mut cmd = Command::new(BATCH_STEP);
    for var in [
        "STEP_INDEX",
        "STEP_REPLICAS",
        "OUTPUT_NAME",
        "EXIT_CODE",
        "SLEEP_MS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("STORAGE_PATH", storage);
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().expect("exited by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn batch_step_writes_exits_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path();

    let (code, out, _) = run(step(storage)
        .env("STEP_INDEX", "1")
        .env("STEP_REPLICAS", "3"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read_to_string(storage.join("step-1.txt")).unwrap(),
        "index=1 replicas=3\n"
    );
    assert!(out.contains("step-1.txt"), "{out}");

    // EXIT_CODE is honoured, and the file is still written.
    let (code, _, _) = run(step(storage)
        .env("STEP_INDEX", "2")
        .env("STEP_REPLICAS", "3")
        .env("EXIT_CODE", "7"));
    assert_eq!(code, 7);
    assert!(storage.join("step-2.txt").is_file());

    // --check names what is missing.
    let (code, out, _) = run(step(storage).args(["--check", "3"]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("step-0.txt"), "{out}");
    assert!(
        !out.contains("step-1.txt") && !out.contains("step-2.txt"),
        "{out}"
    );

    let (code, _, _) = run(step(storage)
        .env("STEP_INDEX", "0")
        .env("STEP_REPLICAS", "3")
        .env("OUTPUT_NAME", "step-0.txt"));
    assert_eq!(code, 0);
    let (code, out, _) = run(step(storage).args(["--check", "3"]));
    assert_eq!(code, 0, "{out}");

    // No temporary files are left behind.
    let mut names: Vec<String> = std::fs::read_dir(storage)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["step-0.txt", "step-1.txt", "step-2.txt"]);
}

#[test]
fn batch_step_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value, needle) in [
        ("STEP_INDEX", "x", "STEP_INDEX"),
        ("STEP_INDEX", "5", "not below STEP_REPLICAS"),
        ("EXIT_CODE", "256", "EXIT_CODE"),
        ("OUTPUT_NAME", "../escape", "OUTPUT_NAME"),
    ] {
        let (code, _, err) = run(step(dir.path()).env(var, value));
        assert_eq!(code, 2, "{var}={value}");
        assert!(err.contains(needle), "{var}={value}: {err}");
    }
    let (code, _, err) = run(step(dir.path()).args(["--check", "many"]));
    assert_eq!(code, 2);
    assert!(err.contains("--check"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn batch_step_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(step(dir.path()).env("SLEEP_MS", "600000"));
    // Printed once the signals are blocked, so the SIGTERM is not lost.
    p.wait_line("sleeping 600000 ms");
    let started = Instant::now();
    p.signal(libc::SIGTERM);
    let status = p.wait_exit();
    assert_eq!(status.code(), Some(143));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!dir.path().join("step-0.txt").exists());
}

/// GET `path`; returns (status, body).
fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("no header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("no status");
    (status, head.to_string(), body.to_string())
}

fn start_server(records_file: Option<&Path>) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(RECORDS_SERVER);
    cmd.env("LISTEN_ADDR", "127.0.0.1:0");
    match records_file {
        Some(path) => cmd.env("RECORDS_FILE", path),
        None => cmd.env_remove("RECORDS_FILE"),
    };
    let p = Proc::spawn(&mut cmd);
    let line = p.wait_line("listening on ");
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (p, addr)
}

#[test]
fn records_server_serves_and_stops_on_sigterm() {
    let (mut p, addr) = start_server(None);

    let (status, head, body) = get(addr, "GET", "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(head.contains("Content-Length: 2"), "{head}");
    p.wait_line("\"GET /healthz HTTP/1.1\" 200");

    let (status, _, body) = get(addr, "GET", "/records");
    assert_eq!(status, 200);
    let records: serde_json::Value = serde_json::from_str(&body).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 3);
    let first_id = records[0]["id"].as_str().unwrap().to_string();

    let (status, _, body) = get(addr, "GET", &format!("/records/{first_id}"));
    assert_eq!(status, 200);
    let record: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(record, records[0]);

    let (status, _, body) = get(addr, "GET", "/records/nope");
    assert_eq!(status, 404);
    assert!(body.contains("nope"), "{body}");
    assert_eq!(get(addr, "GET", "/other").0, 404);
    let (status, head, _) = get(addr, "POST", "/records");
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    let (status, head, body) = get(addr, "HEAD", "/records");
    assert_eq!(status, 200);
    assert!(
        body.is_empty() && !head.contains("Content-Length: 0"),
        "{head}"
    );

    p.signal(libc::SIGTERM);
    p.wait_line("received SIGTERM");
    let status = p.wait_exit();
    assert!(status.success(), "{status}");
}

#[test]
fn records_server_reads_records_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("records.json");
    std::fs::write(
        &file,
        r#"[{"id": 7, "name": "seven"}, {"id": "x", "v": [1,2]}]"#,
    )
    .unwrap();
    let (mut p, addr) = start_server(Some(&file));
    let (status, _, body) = get(addr, "GET", "/records/7");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"id":7,"name":"seven"}"#);
    let (_, _, body) = get(addr, "GET", "/records");
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    p.signal(libc::SIGINT);
    assert!(p.wait_exit().success());

    // A bad file stops the server at start with a message naming it.
    std::fs::write(&file, r#"[{"name": "no id"}]"#).unwrap();
    let out = Command::new(RECORDS_SERVER)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("RECORDS_FILE", &file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("records.json") && err.contains("has no \"id\""),
        "{err}"
    );
}
