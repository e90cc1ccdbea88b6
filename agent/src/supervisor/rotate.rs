//! Size-capped container logs: `stdout.log` and `stderr.log` of an
//! instance are rotated when one passes its size, keeping at most
//! `max_files` files per stream (the live one plus `.1` … `.N-1`).
//!
//! The shim holds the live file open with `O_APPEND`, so the file is
//! copied and then truncated in place (logrotate's `copytruncate`): the
//! shim's next write lands at the new end, 0. What the container writes
//! between the copy and the truncate is lost, and a file can pass the size
//! by what is written in one check interval ([`CHECK_INTERVAL`]).

use std::path::Path;
use std::time::Duration;

/// How often a running instance's logs are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Default size of one log file before it is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;
/// Default number of files kept per stream, the live one included.
pub const DEFAULT_MAX_FILES: u32 = 3;

/// Where a task's output goes and how much of it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Rotate a file once it is larger than this (at least 1).
    pub max_bytes: u64,
    /// Files kept per stream, the live one included (at least 1; 1 means
    /// the live file is only truncated).
    pub max_files: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// Rotates `stdout.log` and `stderr.log` in `dir` that are over the size;
/// returns how many were rotated.
pub fn rotate_dir(dir: &Path, limits: LogLimits) -> std::io::Result<u32> {
    let mut n = 0;
    for stream in ["stdout.log", "stderr.log"] {
        if rotate_file(&dir.join(stream), limits)? {
            n += 1;
        }
    }
    Ok(n)
}

/// Rotates `live` when it is over `limits.max_bytes`: `.N-2` → `.N-1`, …,
/// `.1` → `.2`, a copy of `live` → `.1`, then `live` is truncated.
pub fn rotate_file(live: &Path, limits: LogLimits) -> std::io::Result<bool> {
    let len = match std::fs::metadata(live) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= limits.max_bytes.max(1) {
        return Ok(false);
    }
    let numbered = |i: u32| {
        let mut name = live.as_os_str().to_os_string();
        name.push(format!(".{i}"));
        std::path::PathBuf::from(name)
    };
    let keep = limits.max_files.max(1) - 1;
    if keep > 0 {
        // The oldest falls off; the others move up by one.
        for i in (1..keep).rev() {
            match std::fs::rename(numbered(i), numbered(i + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::copy(live, numbered(1))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(live)?
        .set_len(0)?;
    Ok(true)
}

/// Bytes of every log file (live and rotated) in `dir`.
pub fn dir_log_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("stdout.log") || name.starts_with("stderr.log")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotates_keeping_max_files_and_appends_continue_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("stdout.log");
        let limits = LogLimits {
            max_bytes: 10,
            max_files: 3,
        };
        // The shim's own handle: O_APPEND, kept open across rotations.
        let mut shim = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&live)
            .unwrap();
        for round in 0..5u8 {
            shim.write_all(&[b'a' + round; 12]).unwrap();
            assert!(rotate_file(&live, limits).unwrap());
            assert_eq!(std::fs::metadata(&live).unwrap().len(), 0);
        }
        shim.write_all(b"tail").unwrap();
        assert_eq!(std::fs::read(&live).unwrap(), b"tail");
        assert_eq!(
            std::fs::read(dir.path().join("stdout.log.1")).unwrap(),
            [b'e'; 12]
        );
        assert_eq!(
            std::fs::read(dir.path().join("stdout.log.2")).unwrap(),
            [b'd'; 12]
        );
        assert!(!dir.path().join("stdout.log.3").exists());
        assert_eq!(dir_log_bytes(dir.path()), 4 + 24);
        // Under the size: nothing happens.
        assert!(!rotate_file(&live, limits).unwrap());
        assert_eq!(rotate_dir(dir.path(), limits).unwrap(), 0);
    }

    #[test]
    fn one_file_means_truncate_only() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("stderr.log");
        std::fs::write(&live, [b'x'; 100]).unwrap();
        let limits = LogLimits {
            max_bytes: 50,
            max_files: 1,
        };
        assert_eq!(rotate_dir(dir.path(), limits).unwrap(), 1);
        assert_eq!(std::fs::metadata(&live).unwrap().len(), 0);
        assert!(!dir.path().join("stderr.log.1").exists());
    }
}
