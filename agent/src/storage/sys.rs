//! The kernel interfaces storage needs: loop devices (`/dev/loop-control`
//! and `LOOP_CONFIGURE`), mount(2)/umount2(2), `/proc/self/mountinfo`,
//! statvfs, filesystem signatures, and running the mkfs/btrfs tools.
//!
//! Loop devices are configured with `LO_FLAGS_AUTOCLEAR`: the kernel
//! detaches one as soon as its last user (the mount) goes away, so an
//! unmount (or a failed mount) never leaves a device behind.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::StorageError;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LOOP_MAJOR: u32 = 7;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. The kernel detaches it by itself once the
/// last user is gone (autoclear), so after mounting, dropping this handle
/// leaves the mount as its only user.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    _file: File,
}

/// Attaches `backing` to a free loop device (read-write, autoclear).
pub fn loop_attach(backing: &Path) -> io::Result<LoopDevice> {
    let backing_file = OpenOptions::new().read(true).write(true).open(backing)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process may take the free device between the two calls.
    let mut last = io::Error::other("no loop device could be configured");
    for _ in 0..8 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A static /dev without the node: make it.
                let c = CString::new(path.as_os_str().as_bytes())
                    .map_err(|_| io::Error::other("loop path has a NUL byte"))?;
                let devno = libc::makedev(LOOP_MAJOR, n as u32);
                // SAFETY: c is a valid C string; mknod does not keep it.
                if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, devno) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                OpenOptions::new().read(true).write(true).open(&path)?
            }
            Err(e) => return Err(e),
        };
        let mut name = [0u8; 64];
        let b = backing.as_os_str().as_bytes();
        let len = b.len().min(63);
        name[..len].copy_from_slice(&b[..len]);
        let cfg = LoopConfig {
            fd: backing_file.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: cfg is a properly laid out struct loop_config that lives
        // for the duration of the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok(LoopDevice { path, _file: dev });
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            return Err(last);
        }
    }
    Err(last)
}

/// Detaches a loop device by hand (for one left without autoclear).
pub fn loop_detach(dev: &Path) -> io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).open(dev)?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(e);
        }
    }
    Ok(())
}

/// Loop devices whose backing file is `backing`, from sysfs.
pub fn loops_backed_by(backing: &Path) -> Vec<PathBuf> {
    let want = backing
        .canonicalize()
        .unwrap_or_else(|_| backing.to_path_buf());
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(file) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let file = file.trim_end_matches('\n');
        let file = file.strip_suffix(" (deleted)").unwrap_or(file);
        if Path::new(file) == want {
            out.push(PathBuf::from(format!("/dev/{name}")));
        }
    }
    out.sort();
    out
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path has a NUL byte"))
}

/// mount(2) of a block device.
pub fn mount(source: &Path, target: &Path, fstype: &str, data: &str) -> io::Result<()> {
    let src = cstr(source)?;
    let tgt = cstr(target)?;
    let fs = CString::new(fstype).map_err(|_| io::Error::other("fstype has a NUL byte"))?;
    let data = CString::new(data).map_err(|_| io::Error::other("options have a NUL byte"))?;
    // SAFETY: all pointers are valid C strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            libc::MS_NOATIME | libc::MS_NODEV | libc::MS_NOSUID,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// umount2(2); a target that is not mounted is fine.
pub fn unmount(target: &Path) -> io::Result<()> {
    let tgt = cstr(target)?;
    // A short-lived holder (udev probing the loop device, a child process
    // forked while a file was open there) makes the kernel answer EBUSY
    // for a moment; try again for up to two seconds before giving up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        // SAFETY: tgt is a valid C string.
        let r = unsafe { libc::umount2(tgt.as_ptr(), libc::UMOUNT_NOFOLLOW) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) if mounted_source(target).is_none() => return Ok(()),
            Some(libc::EBUSY) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            _ => return Err(e),
        }
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount of this mount namespace.
pub fn mounts() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let target = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                target: PathBuf::from(unescape(target)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// The source of the topmost mount at `target`, if any.
pub fn mounted_source(target: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.target == target)
}

/// (total, free, available to unprivileged users) bytes of the
/// filesystem at `path`.
pub fn statvfs(path: &Path) -> io::Result<(u64, u64, u64)> {
    let c = cstr(path)?;
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string; st is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let free = st.f_bfree as u64 * frsize;
    let avail = st.f_bavail as u64 * frsize;
    Ok((total, free, avail))
}

pub const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// The filesystem type magic of the filesystem holding `path`.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = cstr(path)?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string; st is a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// The filesystem a file or block device carries, from its superblock
/// signature: `Some("ext4")`, `Some("btrfs")`, or `None` (blank/unknown).
pub fn detect_fs(path: &Path) -> io::Result<Option<&'static str>> {
    let mut f = File::open(path)?;
    let mut magic = [0u8; 8];
    // btrfs: "_BHRfS_M" at 64 KiB + 0x40.
    if f.seek(SeekFrom::Start(0x10040)).is_ok()
        && f.read_exact(&mut magic).is_ok()
        && &magic == b"_BHRfS_M"
    {
        return Ok(Some("btrfs"));
    }
    // ext2/3/4: 0xEF53 at 1024 + 56.
    let mut m2 = [0u8; 2];
    if f.seek(SeekFrom::Start(1080)).is_ok() && f.read_exact(&mut m2).is_ok() && m2 == [0x53, 0xEF]
    {
        return Ok(Some("ext4"));
    }
    Ok(None)
}

/// Runs a tool; its combined output is the error on failure. `what`
/// names the object for the message.
pub fn run(what: &str, program: &str, args: &[&str]) -> Result<String, StorageError> {
    let command = format!("{program} {}", args.join(" "));
    tracing::debug!(%command, "running");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| StorageError::Command {
            what: what.to_string(),
            command: command.clone(),
            output: format!("cannot run it: {e} (is it installed? apt e2fsprogs / btrfs-progs)"),
        })?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if output.is_empty() {
            output = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(StorageError::Command {
            what: what.to_string(),
            command,
            output: format!("{} ({})", output, out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates (or extends to) a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescapes_spaces() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }

    #[test]
    fn own_root_is_mounted() {
        assert!(mounts().iter().any(|m| m.target == Path::new("/")));
    }
}
