//! `batch-step`: one replica of a pipeline step.
//!
//! ```text
//! batch-step            write $STORAGE_PATH/$OUTPUT_NAME, exit with $EXIT_CODE
//! batch-step --check N  exit 0 if step-0.txt … step-(N-1).txt all exist
//!                       in $STORAGE_PATH, else exit 1 naming the missing ones
//! ```
//!
//! Environment: `STEP_INDEX` (default 0), `STEP_REPLICAS` (default 1;
//! the index must be below it), `STORAGE_PATH` (default `/tmp`),
//! `OUTPUT_NAME` (a file name, default `step-{index}.txt`), `EXIT_CODE`
//! (0–255, default 0) and `SLEEP_MS` (optional: wait that long first,
//! as if working). The file holds `index=<i> replicas=<n>\n` and is
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

const USAGE: &str = "usage: batch-step [--check N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => run_step(),
        [flag, n] if flag == "--check" => check(n),
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
        if let Some(signal) = sleep_unless_stopped(Duration::from_millis(ms))? {
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

/// Waits `duration`; returns the signal if SIGTERM or SIGINT came first.
fn sleep_unless_stopped(duration: Duration) -> Result<Option<libc::c_int>, String> {
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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
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
