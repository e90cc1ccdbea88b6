//! Pinned BPF links: opening one by path and swapping its program in place
//! (`BPF_LINK_UPDATE`), which aya 0.14 offers for TCX links but not for
//! cgroup links. Replacing the program of a pinned link is how an agent
//! restart re-attaches without a gap: the hook never runs without a program.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// bpf(2) with a zeroed 128-byte attribute whose first words are `words`.
fn bpf(cmd: libc::c_long, words: &[u64]) -> std::io::Result<libc::c_long> {
    let mut attr = [0u64; 16];
    attr[..words.len()].copy_from_slice(words);
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size we pass;
    // the kernel reads only the fields of `cmd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the BPF object pinned at `path` (`BPF_OBJ_GET`).
pub(crate) fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // union { pathname (u64), bpf_fd (u32) | file_flags (u32) }
    let fd = bpf(BPF_OBJ_GET, &[c.as_ptr() as u64, 0])?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes the link `link` run `prog` instead of its current program.
pub(crate) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    // { link_fd: u32, new_prog_fd: u32, flags: u32, old_prog_fd: u32 }
    let w0 = (link.as_raw_fd() as u32 as u64) | ((prog.as_raw_fd() as u32 as u64) << 32);
    bpf(BPF_LINK_UPDATE, &[w0, 0]).map(|_| ())
}

/// Opens the link pinned at `path` and points it at `prog`.
pub(crate) fn update_pinned(path: &Path, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let link = obj_get(path)?;
    link_update(link.as_fd(), prog)
}
