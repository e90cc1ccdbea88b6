//! A packet capture on one interface of the test machine (AF_PACKET), for
//! tests that must show what crosses a wire: every frame's bytes are kept
//! until [`Capture::stop`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing every frame on `interface` (in the caller's
    /// network namespace).
    pub fn start(interface: &str) -> std::io::Result<Capture> {
        let name = std::ffi::CString::new(interface).map_err(std::io::Error::other)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: bind with a sockaddr_ll of the stated size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Promiscuous: a bridge passes frames it forwards between its ports
        // up to its own taps only then.
        // SAFETY: packet_mreq is plain data; zeroed is a valid value.
        let mut mr: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mr.mr_ifindex = index as i32;
        mr.mr_type = libc::PACKET_MR_PROMISC as u16;
        // SAFETY: PACKET_ADD_MEMBERSHIP with a packet_mreq of the stated size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&mr as *const libc::packet_mreq).cast(),
                std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO with a timeval of the stated size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (s, f) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::SeqCst) {
                // SAFETY: recv into a buffer of the stated length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    f.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(buf[..n as usize].to_vec());
                }
            }
        });
        Ok(Capture {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// Stops and returns every frame seen.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.frames.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `needle` occurs in any frame.
pub fn contains(frames: &[Vec<u8>], needle: &[u8]) -> bool {
    frames
        .iter()
        .any(|f| f.windows(needle.len()).any(|w| w == needle))
}

/// Frames of TCP segments to or from `port` (IPv4 over Ethernet).
pub fn tcp_port_frames(frames: &[Vec<u8>], port: u16) -> usize {
    frames
        .iter()
        .filter(|f| {
            if f.len() < 14 + 20 + 4 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
                return false;
            }
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let t = 14 + ihl;
            if f.len() < t + 4 {
                return false;
            }
            let sport = u16::from_be_bytes([f[t], f[t + 1]]);
            let dport = u16::from_be_bytes([f[t + 2], f[t + 3]]);
            sport == port || dport == port
        })
        .count()
}
