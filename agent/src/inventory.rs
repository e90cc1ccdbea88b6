//! Hardware discovery: CPUs, memory, block devices and NICs, read from
//! sysinfo, `/sys` and `getifaddrs`. It only reads; it never changes the
//! host.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ironmesh_proto::v1::{Cpu, Disk, Inventory, Memory, Nic};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list network addresses: {0}")]
    Addresses(std::io::Error),
}

/// Reads this host's hardware.
pub fn discover(agent_version: &str) -> Result<Inventory, InventoryError> {
    discover_with_sysfs(agent_version, Path::new("/sys"))
}

/// Same, reading block devices and NICs below `sysfs` (tests use a fake tree).
pub fn discover_with_sysfs(agent_version: &str, sysfs: &Path) -> Result<Inventory, InventoryError> {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_frequency())
            .with_memory(MemoryRefreshKind::everything()),
    );
    let addresses = interface_addresses()?;
    Ok(Inventory {
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        cpu: Some(cpu(&sys)),
        memory: Some(Memory {
            total_bytes: sys.total_memory(),
            available_bytes: sys.available_memory(),
            swap_total_bytes: sys.total_swap(),
        }),
        disks: disks(sysfs)?,
        nics: nics(sysfs, &addresses)?,
        agent_version: agent_version.to_string(),
        boot_time_unix: System::boot_time(),
    })
}

fn cpu(sys: &System) -> Cpu {
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let from_sysinfo = sys.cpus().len() as u32;
    // The kernel's count of online CPUs is authoritative.
    let logical = if online > 0 {
        online as u32
    } else {
        from_sysinfo
    };
    let first = sys.cpus().first();
    Cpu {
        logical,
        physical: System::physical_core_count().unwrap_or(0) as u32,
        model: first
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default(),
        vendor: first.map(|c| c.vendor_id().to_string()).unwrap_or_default(),
        frequency_mhz: first.map(|c| c.frequency()).unwrap_or(0),
    }
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p).and_then(|s| s.parse().ok())
}

fn list_dir(dir: &Path) -> Result<Vec<String>, InventoryError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(InventoryError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

fn disks(sysfs: &Path) -> Result<Vec<Disk>, InventoryError> {
    let mut out = Vec::new();
    for name in list_dir(&sysfs.join("block"))? {
        let dir = sysfs.join("block").join(&name);
        let size = read_u64(&dir.join("size")).unwrap_or(0) * 512;
        if name.starts_with("ram") || name.starts_with("zram") {
            tracing::debug!(disk = %name, "skipping RAM disk");
            continue;
        }
        if size == 0 {
            tracing::debug!(disk = %name, "skipping empty block device");
            continue;
        }
        out.push(Disk {
            size_bytes: size,
            rotational: read_trim(&dir.join("queue/rotational")).as_deref() == Some("1"),
            model: read_trim(&dir.join("device/model")).unwrap_or_default(),
            removable: read_trim(&dir.join("removable")).as_deref() == Some("1"),
            read_only: read_trim(&dir.join("ro")).as_deref() == Some("1"),
            name,
        });
    }
    Ok(out)
}

fn nics(sysfs: &Path, addrs: &[(String, String)]) -> Result<Vec<Nic>, InventoryError> {
    let mut out = Vec::new();
    let base = sysfs.join("class/net");
    for name in list_dir(&base)? {
        let dir = base.join(&name);
        if !dir.join("address").exists() {
            continue; // e.g. the bonding_masters file
        }
        let speed = read_trim(&dir.join("speed"))
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|s| *s > 0)
            .unwrap_or(0) as u64;
        out.push(Nic {
            mac: read_trim(&dir.join("address")).unwrap_or_default(),
            mtu: read_u64(&dir.join("mtu")).unwrap_or(0) as u32,
            addresses: addrs
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, a)| a.clone())
                .collect(),
            oper_state: read_trim(&dir.join("operstate")).unwrap_or_default(),
            speed_mbps: speed,
            // Physical NICs have a backing device; software ones do not.
            r#virtual: !dir.join("device").exists(),
            name,
        });
    }
    Ok(out)
}

/// (interface, "addr/prefix") for every IPv4 and IPv6 address.
fn interface_addresses() -> Result<Vec<(String, String)>, InventoryError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(InventoryError::Addresses(std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr and ifa_netmask point at sockaddrs of the family
        // in sa_family, owned by the list.
        let (addr, prefix) = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes());
                    let prefix = if ifa.ifa_netmask.is_null() {
                        32
                    } else {
                        let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                        u32::from_be(m.sin_addr.s_addr).count_ones()
                    };
                    (ip, prefix)
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = IpAddr::from(a.sin6_addr.s6_addr);
                    let prefix = if ifa.ifa_netmask.is_null() {
                        128
                    } else {
                        let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                        m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()
                    };
                    (ip, prefix)
                }
                _ => continue,
            }
        };
        out.push((name, format!("{addr}/{prefix}")));
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meminfo_total() -> u64 {
        let s = fs::read_to_string("/proc/meminfo").unwrap();
        let kb: u64 = s
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    #[test]
    fn real_host_readings() {
        let inv = discover("test").unwrap();
        let cpu = inv.cpu.unwrap();
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as u32;
        assert_eq!(cpu.logical, online);
        let mem = inv.memory.unwrap().total_bytes;
        let want = meminfo_total();
        assert!(mem.abs_diff(want) <= want / 100, "{mem} vs {want}");
        let lo = inv.nics.iter().find(|n| n.name == "lo").expect("lo");
        assert!(lo.mtu > 0);
        assert!(lo.r#virtual);
        assert!(
            lo.addresses.iter().any(|a| a == "127.0.0.1/8"),
            "{:?}",
            lo.addresses
        );
        for d in &inv.disks {
            assert!(Path::new("/sys/block").join(&d.name).exists());
            assert!(d.size_bytes > 0);
        }
        assert_eq!(inv.arch, std::env::consts::ARCH);
        assert!(!inv.kernel.is_empty());
    }

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn fake_sysfs_disks_and_nics() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path();
        write(&s.join("block/sda/size"), "2097152\n");
        write(&s.join("block/sda/queue/rotational"), "1\n");
        write(&s.join("block/sda/device/model"), "ST1000DM003     \n");
        write(&s.join("block/sda/removable"), "0\n");
        write(&s.join("block/nvme0n1/size"), "4194304\n");
        write(&s.join("block/nvme0n1/queue/rotational"), "0\n");
        write(&s.join("block/loop0/size"), "0\n");
        write(&s.join("block/ram0/size"), "8192\n");
        write(&s.join("class/net/eth9/address"), "52:54:00:12:34:56\n");
        write(&s.join("class/net/eth9/mtu"), "9000\n");
        write(&s.join("class/net/eth9/speed"), "-1\n");
        write(&s.join("class/net/eth9/operstate"), "up\n");
        write(&s.join("class/net/bonding_masters"), "\n");

        let disks = disks(s).unwrap();
        let names: Vec<_> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "sda"]);
        let sda = &disks[1];
        assert_eq!(sda.size_bytes, 1 << 30);
        assert!(sda.rotational);
        assert_eq!(sda.model, "ST1000DM003");
        assert!(!disks[0].rotational);
        assert_eq!(disks[0].size_bytes, 2 << 30);

        let nics = nics(s, &[("eth9".into(), "10.9.0.2/24".into())]).unwrap();
        assert_eq!(nics.len(), 1);
        let n = &nics[0];
        assert_eq!(
            (n.mac.as_str(), n.mtu, n.speed_mbps, n.r#virtual),
            ("52:54:00:12:34:56", 9000, 0, true)
        );
        assert_eq!(n.addresses, ["10.9.0.2/24"]);
        assert_eq!(n.oper_state, "up");
    }
}
