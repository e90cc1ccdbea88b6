//! Named network namespaces: files under the agent's netns directory with
//! the namespace bind-mounted on them (what `ip netns add` does, without
//! `ip`), and netlink connections opened *inside* such a namespace.
//!
//! Namespace switches happen only on short-lived dedicated OS threads that
//! exit afterwards, so no tokio worker ever changes namespace.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;

use super::NetworkError;

/// `NSFS_MAGIC` from `linux/magic.h`: the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Runs `f` on a new OS thread and awaits its result without blocking the
/// runtime. The thread may switch namespaces: it exits when `f` returns.
pub(crate) async fn on_thread<T, F>(name: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other("namespace helper thread panicked"))?
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// True if `path` is a mounted network namespace file.
pub(crate) fn is_mounted(path: &Path) -> io::Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: statfs is plain data; fstatfs fills it for a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == NSFS_MAGIC)
}

/// Creates a new network namespace and bind-mounts it on `path`, which
/// must not exist. On failure nothing is left behind.
pub(crate) async fn create(path: &Path) -> Result<(), NetworkError> {
    let target = path.to_owned();
    on_thread("im-netns-new", move || create_on_this_thread(&target))
        .await
        .map_err(|e| NetworkError::io("creating network namespace", path, e))
}

fn create_on_this_thread(path: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)?;
    let result = (|| {
        // SAFETY: unshare only affects this thread, which exits afterwards.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let src = cstring(Path::new("/proc/thread-self/ns/net"))?;
        let dst = cstring(path)?;
        // SAFETY: valid NUL-terminated strings; no fstype or data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Unmounts and unlinks a namespace file; absent is fine. The namespace
/// (and the veth end inside it) goes away once nothing else holds it.
pub(crate) fn remove(path: &Path) -> Result<(), NetworkError> {
    let c = cstring(path).map_err(|e| NetworkError::io("unmounting network namespace", path, e))?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point; ENOENT: no file.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(NetworkError::io("unmounting network namespace", path, e));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetworkError::io("removing network namespace file", path, e)),
    }
}

/// Turns IPv6 off inside the namespace at `path` (`disable_ipv6=1` for
/// `all` and `default`): the datapath judges IPv4 only, and drops any other
/// frame an instance sends, so an instance gets no IPv6 address to use. A
/// kernel without IPv6 has nothing to turn off.
pub(crate) async fn disable_ipv6(path: &Path) -> Result<(), NetworkError> {
    let file = open(path)?;
    on_thread("im-netns-ipv6", move || {
        // SAFETY: setns only affects this thread, which exits afterwards.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // /proc/sys/net resolves against the opening thread's namespace.
        for conf in ["all", "default"] {
            let p = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            match std::fs::read_to_string(&p) {
                Ok(v) if v.trim() == "1" => {}
                Ok(_) => match std::fs::write(&p, "1") {
                    Ok(()) => {}
                    // /proc/sys mounted read-only (a container host such
                    // as systemd-nspawn): the TC program still drops
                    // every non-IPv4 frame the instance sends.
                    Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                        tracing::warn!(path = %p, "cannot disable IPv6 in an instance namespace: /proc/sys is read-only; the datapath drops its non-IPv4 frames");
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| NetworkError::io("disabling IPv6 in network namespace", path, e))
}

/// Opens the namespace file (for `setns_by_fd` when moving a link into it).
pub(crate) fn open(path: &Path) -> Result<File, NetworkError> {
    File::open(path).map_err(|e| NetworkError::io("opening network namespace", path, e))
}

/// A netlink connection in the agent's own namespace (the calling thread's).
pub(crate) fn host_connection() -> Result<Handle, NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
        NetworkError::io("opening netlink socket", PathBuf::from("<host netns>"), e)
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink connection whose socket lives in the namespace at `path`: the
/// socket is created on a thread that entered it, and keeps that namespace
/// after the thread exits. The connection task ends when the handle drops.
pub(crate) async fn connection_in(path: &Path) -> Result<Handle, NetworkError> {
    let file = open(path)?;
    let runtime = tokio::runtime::Handle::current();
    let (conn, handle, _) = on_thread("im-netns-nl", move || {
        // SAFETY: setns only affects this thread, which exits afterwards.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let _guard = runtime.enter();
        rtnetlink::new_connection()
    })
    .await
    .map_err(|e| NetworkError::io("opening netlink socket in network namespace", path, e))?;
    tokio::spawn(conn);
    Ok(handle)
}
