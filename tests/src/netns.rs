//! Network namespaces from test code: join one on the current thread, or run
//! a closure on a fresh thread inside one. Sockets made there stay in that
//! namespace wherever they are used afterwards.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Moves the calling thread into the network namespace at `path` (a file
/// under `/var/run/netns` or `/proc/<pid>/ns/net`).
pub fn enter(path: &Path) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a namespace fd we hold open changes only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Runs `f` on a fresh thread inside the namespace at `path` and returns
/// what it returns (a panic in `f` is this call's panic).
pub fn within<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path: PathBuf = path.to_path_buf();
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
