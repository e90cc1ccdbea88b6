//! `batch-step`: one replica of a pipeline step.
//!
//! ```text
//! batch-step            write $STORAGE_PATH/$OUTPUT_NAME, exit with $EXIT_CODE
//! batch-step --check N  exit 0 if step-0.txt … step-(N-1).txt all exist
//!                       in $STORAGE_PATH, else exit 1 naming the missing ones
//! batch-step --push STEP N
//!                       queue items item-0 … item-(N-1) for worker step STEP
//! batch-step --work     lease items from this worker step's queue until it
//!                       is drained, writing $STORAGE_PATH/items/<item> for
//!                       each (`LEASE_MAX` per lease, default 8)
//! batch-step --check-items N
//!                       exit 0 if items/item-0 … item-(N-1) all exist
//! ```
//!
//! The queue modes talk HTTP/1.1 to the agent's work-queue socket at
//! `$IRONMESH_QUEUE` (see the agent's `work_queue` module).
//!
//! Environment: `STEP_INDEX` (default 0), `STEP_REPLICAS` (default 1;
//! the index must be below it), `STORAGE_PATH` (default `/tmp`),
//! `OUTPUT_NAME` (a file name, default `step-{index}.txt`), `EXIT_CODE`
//! (0–255, default 0) and `SLEEP_MS` (optional: wait that long first,
//! as if working; with `CHATTY_LINES_PER_SECOND`, printing that many
//! 100-byte lines a second meanwhile). The file holds `index=<i> replicas=<n>\n` and is
//! written under a temporary name then renamed, so a `--check` never sees
//! half a file. The file is written even when `EXIT_CODE` is not 0.
//!
//! A SIGTERM or SIGINT during `SLEEP_MS` ends the step at once with
//! status 143 (130 for SIGINT) and no file — also as PID 1 in a
//! container, where default signal actions do not apply. A bad variable
//! exits with 2 and says which.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: batch-step [--check N | --push STEP N | --work | --check-items N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => run_step(),
        [flag, n] if flag == "--check" => check(n),
        [flag, step, n] if flag == "--push" => push(step, n),
        [flag] if flag == "--work" => work(),
        [flag, n] if flag == "--check-items" => check_items(n),
        [flag] if flag == "--help" || flag == "-h" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("batch-step: {message}");
            ExitCode::from(2)
        }
    }
}

fn run_step() -> Result<u8, String> {
    let index = env_u64("STEP_INDEX")?.unwrap_or(0);
    let replicas = env_u64("STEP_REPLICAS")?.unwrap_or(1);
    if replicas == 0 {
        return Err("STEP_REPLICAS must be at least 1".to_string());
    }
    if index >= replicas {
        return Err(format!(
            "STEP_INDEX={index} is not below STEP_REPLICAS={replicas}"
        ));
    }
    let exit_code = match env_u64("EXIT_CODE")? {
        None => 0,
        Some(code) => {
            u8::try_from(code).map_err(|_| format!("EXIT_CODE={code}: must be from 0 to 255"))?
        }
    };
    let storage = storage_path()?;
    let output_name = env_string("OUTPUT_NAME")?.unwrap_or_else(|| format!("step-{index}.txt"));
    if output_name.contains('/') || output_name == "." || output_name == ".." {
        return Err(format!(
            "OUTPUT_NAME={output_name:?}: must be a file name, not a path"
        ));
    }

    if let Some(ms) = env_u64("SLEEP_MS")? {
        let chatty = env_u64("CHATTY_LINES_PER_SECOND")?.unwrap_or(0);
        if let Some(signal) = sleep_unless_stopped(Duration::from_millis(ms), chatty)? {
            println!(
                "batch-step: index={index} replicas={replicas}: stopped by {} while working; no output written",
                signal_name(signal)
            );
            return Ok(128 + signal as u8);
        }
    }

    let path = storage.join(&output_name);
    let content = format!("index={index} replicas={replicas}\n");
    write_atomically(&path, content.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!(
        "batch-step: index={index} replicas={replicas}: wrote {} ({} bytes); exiting with {exit_code}",
        path.display(),
        content.len()
    );
    Ok(exit_code)
}

fn check(n: &str) -> Result<u8, String> {
    let count: u64 = n
        .parse()
        .map_err(|_| format!("--check {n:?}: not a count of steps\n{USAGE}"))?;
    let storage = storage_path()?;
    let missing: Vec<String> = (0..count)
        .map(|i| format!("step-{i}.txt"))
        .filter(|name| !storage.join(name).is_file())
        .collect();
    if missing.is_empty() {
        println!(
            "batch-step: all {count} step outputs present in {}",
            storage.display()
        );
        Ok(0)
    } else {
        println!(
            "batch-step: {} of {count} step outputs missing in {}: {}",
            missing.len(),
            storage.display(),
            missing.join(", ")
        );
        Ok(1)
    }
}

fn push(step: &str, n: &str) -> Result<u8, String> {
    let count: u64 = n
        .parse()
        .map_err(|_| format!("--push {step} {n:?}: not a count of items\n{USAGE}"))?;
    let mut done = 0;
    while done < count {
        let end = (done + 500).min(count);
        let items: Vec<String> = (done..end).map(|i| format!("item-{i}")).collect();
        let body = serde_json::json!({"step": step, "items": items}).to_string();
        queue_call("/v1/push", &body)?;
        done = end;
    }
    println!("batch-step: queued {count} items for step {step}");
    Ok(0)
}

fn work() -> Result<u8, String> {
    let index = env_u64("STEP_INDEX")?.unwrap_or(0);
    let max = env_u64("LEASE_MAX")?.unwrap_or(8).max(1);
    let dir = storage_path()?.join("items");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut handled = 0u64;
    loop {
        let reply = queue_call(&format!("/v1/lease?max={max}"), "")?;
        let v: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| format!("lease reply {reply:?}: {e}"))?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            if v["drained"].as_bool() == Some(true) {
                break;
            }
            // Others hold leases that may come back.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let mut ids = Vec::with_capacity(items.len());
        for it in &items {
            let (Some(id), Some(item)) = (it["id"].as_str(), it["item"].as_str()) else {
                return Err(format!("lease reply has a malformed item: {it}"));
            };
            let name: String = item
                .chars()
                .map(|c| if c == '/' || c == '\0' { '_' } else { c })
                .collect();
            let path = dir.join(&name);
            write_atomically(&path, format!("item={item} worker={index}\n").as_bytes())
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            ids.push(id.to_string());
        }
        match queue_call("/v1/ack", &serde_json::json!({"ids": ids}).to_string()) {
            Ok(_) => handled += ids.len() as u64,
            // Held too long (leaseSeconds): another worker has them now.
            Err(e) if e.contains("HTTP 409") => {
                eprintln!("batch-step: worker {index}: {e}; carrying on")
            }
            Err(e) => return Err(e),
        }
    }
    println!("batch-step: worker {index} handled {handled} items; queue drained");
    Ok(0)
}

fn check_items(n: &str) -> Result<u8, String> {
    let count: u64 = n
        .parse()
        .map_err(|_| format!("--check-items {n:?}: not a count of items\n{USAGE}"))?;
    let dir = storage_path()?.join("items");
    let missing = (0..count)
        .filter(|i| !dir.join(format!("item-{i}")).is_file())
        .count();
    if missing == 0 {
        println!("batch-step: all {count} items present in {}", dir.display());
        Ok(0)
    } else {
        println!(
            "batch-step: {missing} of {count} items missing in {}",
            dir.display()
        );
        Ok(1)
    }
}

/// One HTTP/1.1 POST to the work-queue socket; the body of a 2xx reply.
fn queue_call(path: &str, body: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let socket = env_string("IRONMESH_QUEUE")?
        .ok_or_else(|| "IRONMESH_QUEUE is not set (not a pipeline step?)".to_string())?;
    let mut last = String::new();
    // The agent may be restarting; its socket comes back at the same path.
    for attempt in 0..50 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut s = match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => s,
            Err(e) => {
                last = format!("connecting to {socket}: {e}");
                continue;
            }
        };
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: queue\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut reply = String::new();
        if let Err(e) = s
            .write_all(req.as_bytes())
            .and_then(|_| s.read_to_string(&mut reply))
        {
            last = format!("talking to {socket}: {e}");
            continue;
        }
        let (head, payload) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        match status {
            200..=299 => return Ok(payload.to_string()),
            503 => last = format!("{path}: {payload}"),
            _ => return Err(format!("{path}: HTTP {status}: {payload}")),
        }
    }
    Err(last)
}

fn storage_path() -> Result<PathBuf, String> {
    Ok(PathBuf::from(
        env_string("STORAGE_PATH")?.unwrap_or_else(|| "/tmp".to_string()),
    ))
}

/// The variable's value; `None` when unset or empty.
fn env_string(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name}: not valid UTF-8")),
    }
}

fn env_u64(name: &str) -> Result<Option<u64>, String> {
    match env_string(name)? {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v:?}: not a non-negative whole number")),
    }
}

fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Waits `duration`, printing `chatty` lines a second meanwhile; returns
/// the signal if SIGTERM or SIGINT came first.
fn sleep_unless_stopped(duration: Duration, chatty: u64) -> Result<Option<libc::c_int>, String> {
    use std::io::Write;
    let started = Instant::now();
    let mut printed: u64 = 0;
    let mut out = std::io::stdout().lock();
    // SAFETY: the set is initialised by sigemptyset before any use;
    // pthread_sigmask and sigtimedwait only read it, and the timespec is
    // a valid pointer for the call. This program has one thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(format!(
                "blocking SIGTERM: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        println!("batch-step: sleeping {} ms", duration.as_millis());
        let deadline = Instant::now() + duration;
        loop {
            if chatty > 0 {
                let due = (started.elapsed().as_secs_f64() * chatty as f64) as u64;
                while printed < due {
                    // A write error (closed log pipe) is not this step's failure.
                    let _ = writeln!(out, "batch-step: chatter {printed:>12} {:.<62}", "");
                    printed += 1;
                }
                let _ = out.flush();
            }
            let mut left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if chatty > 0 {
                left = left.min(Duration::from_millis(10));
            }
            let timeout = libc::timespec {
                tv_sec: left.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
            };
            let signal = libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout);
            if signal > 0 {
                return Ok(Some(signal));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) if chatty > 0 => continue,
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::EINTR) => continue,
                _ => return Err(format!("waiting: {err}")),
            }
        }
    }
}

fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}
