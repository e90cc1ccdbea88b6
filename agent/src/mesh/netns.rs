//! Sockets made inside an instance's network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread
//! uses it later; so the proxy makes each socket on a short-lived thread
//! that entered the namespace (the thread ends there, so no runtime thread
//! is ever left in a foreign namespace) and then drives it from tokio.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};

/// Runs `f` on a thread inside the network namespace at `netns`.
pub fn within<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path: PathBuf = netns.to_path_buf();
    std::thread::Builder::new()
        .name("im-mesh-netns".into())
        .spawn(move || {
            let ns = File::open(&path)?;
            // SAFETY: setns on a valid namespace fd; affects only this
            // thread, which ends after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// A new IPv4 TCP socket in `netns`, close-on-exec and non-blocking.
pub fn tcp_socket(netns: &Path) -> io::Result<tokio::net::TcpSocket> {
    let fd = within(netns, || {
        // SAFETY: plain socket(2); the fd is owned by the caller.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned here.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }.into_raw_fd())
    })?;
    // SAFETY: fd is a valid TCP socket whose ownership moves to the TcpSocket.
    Ok(unsafe { tokio::net::TcpSocket::from_raw_fd(fd) })
}

/// The cookie of the network namespace `sock` lives in (SO_NETNS_COOKIE):
/// what the BPF programs see as `bpf_get_netns_cookie`.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the stated length.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// A thread that stays in one namespace and makes sockets there on
/// request: a new connection's socket costs a channel round trip, not a
/// thread. The thread ends when the factory is dropped.
pub struct SocketFactory {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<io::Result<i32>>>>,
}

impl SocketFactory {
    pub fn new(netns: &Path) -> io::Result<SocketFactory> {
        let (tx, rx) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<io::Result<i32>>>();
        let ns = File::open(netns)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("im-mesh-sockets".into())
            .spawn(move || {
                // SAFETY: setns on a valid namespace fd; this thread only
                // makes sockets and ends with the factory.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let _ = ready_tx.send(Err(io::Error::last_os_error()));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                drop(ns);
                while let Ok(reply) = rx.recv() {
                    // SAFETY: plain socket(2); the fd's ownership goes to
                    // the requester (or is closed below if it is gone).
                    let fd = unsafe {
                        libc::socket(
                            libc::AF_INET,
                            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                            0,
                        )
                    };
                    let r = if fd < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(fd)
                    };
                    if let Err(Ok(fd)) = reply.send(r) {
                        // SAFETY: nobody else owns this fd.
                        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("namespace thread ended"))??;
        Ok(SocketFactory {
            tx: std::sync::Mutex::new(tx),
        })
    }

    /// A new IPv4 TCP socket in the factory's namespace.
    pub async fn tcp(&self) -> io::Result<tokio::net::TcpSocket> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(reply)
            .map_err(|_| io::Error::other("namespace thread ended"))?;
        let fd = rx
            .await
            .map_err(|_| io::Error::other("namespace thread ended"))??;
        // SAFETY: fd is a fresh TCP socket handed to us alone.
        Ok(unsafe { tokio::net::TcpSocket::from_raw_fd(fd) })
    }
}
