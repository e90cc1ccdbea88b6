//! Hardware discovery: what this host is made of — CPUs, memory, block
//! devices, NICs and their addresses, OS and kernel — read from sysinfo,
//! sysfs and `getifaddrs`. It owns reading the host's hardware and nothing
//! else: it only reads, it never changes the host.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ironmesh_proto::v1::{Cpu, Disk, Inventory, Memory, Nic};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Why the host's hardware could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// A sysfs directory that must exist could not be listed.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// `getifaddrs` failed.
    #[error("cannot list network addresses (getifaddrs): {0}")]
    Addresses(io::Error),
}

/// Reads this host's hardware.
pub fn discover(agent_version: &str) -> Result<Inventory, InventoryError> {
    discover_with_sysfs(agent_version, Path::new("/sys"))
}

/// Same as [`discover`], reading block devices and NICs from the given sysfs
/// root instead of `/sys` (for tests with a fake tree). CPU, memory, OS and
/// addresses still come from the running host.
pub fn discover_with_sysfs(agent_version: &str, sysfs: &Path) -> Result<Inventory, InventoryError> {
    let disks = disks(sysfs)?;
    let addresses = interface_addresses()?;
    let nics = nics(sysfs, &addresses)?;
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_frequency())
            .with_memory(MemoryRefreshKind::everything()),
    );
    Ok(Inventory {
        hostname: System::host_name().unwrap_or_default(),
        os: os_name(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        cpu: Some(cpu(&sys)),
        memory: Some(Memory {
            total_bytes: sys.total_memory(),
            available_bytes: sys.available_memory(),
            swap_total_bytes: sys.total_swap(),
        }),
        disks,
        nics,
        agent_version: agent_version.to_string(),
        boot_time_unix: System::boot_time(),
    })
}

/// "Debian GNU/Linux 12": the distribution's name and version from
/// os-release, falling back to the bare OS family.
fn os_name() -> String {
    match (System::name(), System::os_version()) {
        (Some(name), Some(version)) => format!("{name} {version}"),
        (Some(name), None) => name,
        (None, _) => System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_string()),
    }
}

fn cpu(sys: &System) -> Cpu {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let from_sysinfo = u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX);
    // The kernel's count of online CPUs is authoritative.
    let logical = match u32::try_from(online) {
        Ok(n) if n > 0 => {
            if n != from_sysinfo {
                tracing::debug!(
                    sysconf = n,
                    sysinfo = from_sysinfo,
                    "sysinfo disagrees with sysconf on online CPUs; using sysconf"
                );
            }
            n
        }
        _ => from_sysinfo,
    };
    let first = sys.cpus().first();
    Cpu {
        logical,
        physical: System::physical_core_count()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        model: first
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default(),
        vendor: first
            .map(|c| c.vendor_id().trim().to_string())
            .unwrap_or_default(),
        // Cores may run at different speeds; report the fastest.
        frequency_mhz: sys.cpus().iter().map(|c| c.frequency()).max().unwrap_or(0),
    }
}

/// The file's contents without surrounding whitespace, or None if it cannot
/// be read (missing attribute, or one the driver refuses, like `speed` on a
/// link that is down).
fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_flag(p: &Path) -> bool {
    read_trim(p).as_deref() == Some("1")
}

/// Sorted entry names of a sysfs directory that must exist.
fn list_dir(dir: &Path) -> Result<Vec<String>, InventoryError> {
    let err = |source| InventoryError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(err)? {
        let name = entry.map_err(err)?.file_name();
        match name.into_string() {
            Ok(name) => names.push(name),
            Err(name) => tracing::debug!(dir = %dir.display(), ?name, "skipping non-UTF-8 entry"),
        }
    }
    names.sort();
    Ok(names)
}

/// Whole block devices from `<sysfs>/block`, sorted by name, without RAM
/// disks and unattached loop devices.
fn disks(sysfs: &Path) -> Result<Vec<Disk>, InventoryError> {
    let base = sysfs.join("block");
    let mut out = Vec::new();
    for name in list_dir(&base)? {
        if name.starts_with("ram") || name.starts_with("zram") {
            tracing::debug!(device = %name, reason = "ram disk", "skipping block device");
            continue;
        }
        let dir = base.join(&name);
        let size_path = dir.join("size");
        let sectors = match fs::read_to_string(&size_path).map(|s| s.trim().parse::<u64>()) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(device = %name, path = %size_path.display(), error = %e, reason = "unparsable size", "skipping block device");
                continue;
            }
            Err(e) => {
                tracing::debug!(device = %name, path = %size_path.display(), error = %e, reason = "unreadable size", "skipping block device");
                continue;
            }
        };
        if sectors == 0 && name.starts_with("loop") {
            tracing::debug!(device = %name, reason = "unattached loop device", "skipping block device");
            continue;
        }
        out.push(Disk {
            // sysfs counts 512-byte sectors whatever the logical block size.
            size_bytes: sectors.saturating_mul(512),
            rotational: read_flag(&dir.join("queue/rotational")),
            model: read_trim(&dir.join("device/model")).unwrap_or_default(),
            removable: read_flag(&dir.join("removable")),
            read_only: read_flag(&dir.join("ro")),
            name,
        });
    }
    Ok(out)
}

/// Network interfaces from `<sysfs>/class/net`, sorted by name, with the
/// addresses from `addrs` ((interface or label, CIDR) pairs).
fn nics(sysfs: &Path, addrs: &[(String, String)]) -> Result<Vec<Nic>, InventoryError> {
    let base = sysfs.join("class/net");
    let virtual_root = fs::canonicalize(sysfs)
        .ok()
        .map(|root| root.join("devices/virtual"));
    let mut out = Vec::new();
    for name in list_dir(&base)? {
        let dir = base.join(&name);
        if !dir.is_dir() {
            // e.g. the bonding driver's `bonding_masters` file.
            tracing::debug!(entry = %name, reason = "not an interface directory", "skipping net entry");
            continue;
        }
        // Software interfaces live under /sys/devices/virtual and have no
        // backing `device`; physical ones resolve into the bus they sit on.
        let under_virtual = match (&virtual_root, fs::canonicalize(&dir)) {
            (Some(root), Ok(resolved)) => resolved.starts_with(root),
            _ => false,
        };
        let has_device = fs::symlink_metadata(dir.join("device")).is_ok();
        let speed_mbps = read_trim(&dir.join("speed"))
            .and_then(|s| s.parse::<i64>().ok())
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0);
        out.push(Nic {
            mac: read_trim(&dir.join("address")).unwrap_or_default(),
            mtu: read_trim(&dir.join("mtu"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            addresses: addrs
                .iter()
                .filter(|(label, _)| interface_of(label) == name)
                .map(|(_, cidr)| cidr.clone())
                .collect(),
            oper_state: read_trim(&dir.join("operstate")).unwrap_or_default(),
            speed_mbps,
            r#virtual: under_virtual || !has_device,
            name,
        });
    }
    Ok(out)
}

/// The interface an address label belongs to: IPv4 aliases are reported by
/// getifaddrs under their label ("eth0:1"), which is not a sysfs name.
fn interface_of(label: &str) -> &str {
    label.split_once(':').map_or(label, |(name, _)| name)
}

/// Owns the list getifaddrs returned and frees it on every path out.
struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from a successful getifaddrs and is
            // freed exactly once, here.
            unsafe { libc::freeifaddrs(self.0) };
        }
    }
}

/// (interface or label, "addr/prefix") for every IPv4 and IPv6 address.
pub fn interface_addresses() -> Result<Vec<(String, String)>, InventoryError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; it is freed by the
    // guard below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(InventoryError::Addresses(io::Error::last_os_error()));
    }
    let list = IfAddrs(head);
    let mut out = Vec::new();
    let mut cur = list.0;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list, which lives as long as `list`.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr and ifa_netmask, when not null, point at sockaddrs
        // of the family in sa_family (the netmask shares the address's
        // family), owned by the list.
        let parsed = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = IpAddr::from(a.sin_addr.s_addr.to_ne_bytes());
                    let prefix = if ifa.ifa_netmask.is_null() {
                        32
                    } else {
                        let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                        m.sin_addr.s_addr.count_ones()
                    };
                    Some((ip, prefix))
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
                    Some((ip, prefix))
                }
                // AF_PACKET and friends carry link-layer data, not addresses.
                _ => None,
            }
        };
        let Some((ip, prefix)) = parsed else {
            continue;
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.push((name, format!("{ip}/{prefix}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meminfo_total() -> u64 {
        let s = fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
        let kib: u64 = s
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("MemTotal in /proc/meminfo");
        kib * 1024
    }

    fn is_sorted<T: AsRef<str>>(names: &[T]) -> bool {
        names.windows(2).all(|w| w[0].as_ref() < w[1].as_ref())
    }

    #[test]
    fn real_host_readings() {
        let inv = discover("test-1.2.3").expect("discover");
        assert_eq!(inv.agent_version, "test-1.2.3");
        assert_eq!(inv.arch, std::env::consts::ARCH);
        assert!(!inv.kernel.is_empty());
        assert!(!inv.os.is_empty());
        assert!(inv.boot_time_unix > 0);

        let cpu = inv.cpu.expect("cpu");
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        assert_eq!(Some(cpu.logical), u32::try_from(online).ok());
        assert!(cpu.physical <= cpu.logical);

        let mem = inv.memory.expect("memory");
        let want = meminfo_total();
        assert!(mem.total_bytes > 0);
        assert!(
            mem.total_bytes.abs_diff(want) <= want / 100,
            "{} vs {want}",
            mem.total_bytes
        );
        assert!(mem.available_bytes <= mem.total_bytes);

        let lo = inv.nics.iter().find(|n| n.name == "lo").expect("lo");
        assert!(lo.mtu > 0);
        assert!(lo.r#virtual);
        assert!(
            lo.addresses.iter().any(|a| a == "127.0.0.1/8"),
            "{:?}",
            lo.addresses
        );
        let nic_names: Vec<_> = inv.nics.iter().map(|n| &n.name).collect();
        assert!(is_sorted(&nic_names), "{nic_names:?}");

        for d in &inv.disks {
            assert!(Path::new("/sys/block").join(&d.name).exists(), "{}", d.name);
            assert!(!d.name.starts_with("ram") && !d.name.starts_with("zram"));
            assert!(!(d.name.starts_with("loop") && d.size_bytes == 0));
        }
        let disk_names: Vec<_> = inv.disks.iter().map(|d| &d.name).collect();
        assert!(is_sorted(&disk_names), "{disk_names:?}");
    }

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, s).expect("write");
    }

    fn symlink(target: &Path, link: &Path) {
        fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(target, link).expect("symlink");
    }

    /// A sysfs tree with the devices the tests expect, in a tempdir.
    fn fake_sysfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let s = t.path();
        // Disks.
        write(&s.join("block/sda/size"), "2097152\n");
        write(&s.join("block/sda/queue/rotational"), "1\n");
        write(&s.join("block/sda/device/model"), "ST1000DM003-1CH1   \n");
        write(&s.join("block/sda/removable"), "0\n");
        write(&s.join("block/sda/ro"), "0\n");
        write(&s.join("block/nvme0n1/size"), "4194304\n");
        write(&s.join("block/nvme0n1/queue/rotational"), "0\n");
        write(
            &s.join("block/nvme0n1/device/model"),
            "Samsung SSD 980 PRO 1TB\n",
        );
        write(&s.join("block/nvme0n1/removable"), "0\n");
        write(&s.join("block/nvme0n1/ro"), "1\n");
        write(&s.join("block/sdb/size"), "2048\n");
        write(&s.join("block/sdb/removable"), "1\n");
        write(&s.join("block/dm-0/size"), "1024\n");
        write(&s.join("block/loop0/size"), "0\n");
        write(&s.join("block/loop1/size"), "8\n");
        write(&s.join("block/ram0/size"), "8192\n");
        write(&s.join("block/zram0/size"), "8192\n");
        // A software NIC: a plain directory with no `device` link.
        let v = s.join("class/net/imfake9");
        write(&v.join("address"), "52:54:00:12:34:56\n");
        write(&v.join("mtu"), "9000\n");
        write(&v.join("speed"), "-1\n");
        write(&v.join("operstate"), "up\n");
        // A physical NIC, linked into its PCI device like the real sysfs.
        let p = s.join("devices/pci0000:00/0000:00:03.0/net/imfake0");
        write(&p.join("address"), "0c:42:a1:00:00:01\n");
        write(&p.join("mtu"), "1500\n");
        write(&p.join("speed"), "25000\n");
        write(&p.join("operstate"), "down\n");
        symlink(Path::new("../../../0000:00:03.0"), &p.join("device"));
        symlink(&p, &s.join("class/net/imfake0"));
        // A bridge under devices/virtual (no speed file at all).
        let b = s.join("devices/virtual/net/imfakebr");
        write(&b.join("address"), "aa:bb:cc:dd:ee:ff\n");
        write(&b.join("mtu"), "1500\n");
        symlink(&b, &s.join("class/net/imfakebr"));
        write(&s.join("class/net/bonding_masters"), "\n");
        t
    }

    #[test]
    fn fake_sysfs_disks_and_nics() {
        let t = fake_sysfs();
        let inv = discover_with_sysfs("t", t.path()).expect("discover");

        let names: Vec<_> = inv.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["dm-0", "loop1", "nvme0n1", "sda", "sdb"]);
        let disk = |n: &str| inv.disks.iter().find(|d| d.name == n).expect(n);
        let sda = disk("sda");
        assert_eq!(sda.size_bytes, 1 << 30);
        assert!(sda.rotational);
        assert_eq!(sda.model, "ST1000DM003-1CH1");
        assert!(!sda.removable && !sda.read_only);
        let nvme = disk("nvme0n1");
        assert_eq!(nvme.size_bytes, 2 << 30);
        assert!(!nvme.rotational);
        assert_eq!(nvme.model, "Samsung SSD 980 PRO 1TB");
        assert!(nvme.read_only);
        let sdb = disk("sdb");
        assert!(sdb.removable);
        assert_eq!(sdb.model, "");
        assert_eq!(disk("loop1").size_bytes, 4096);

        let names: Vec<_> = inv.nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["imfake0", "imfake9", "imfakebr"]);
        let v = &inv.nics[1];
        assert_eq!(v.mac, "52:54:00:12:34:56");
        assert_eq!(v.mtu, 9000);
        assert_eq!(v.speed_mbps, 0);
        assert_eq!(v.oper_state, "up");
        assert!(v.r#virtual);
        // These names are not on the host, so getifaddrs has nothing for them.
        assert!(v.addresses.is_empty(), "{:?}", v.addresses);
        let p = &inv.nics[0];
        assert_eq!(
            (p.mac.as_str(), p.mtu, p.speed_mbps, p.r#virtual),
            ("0c:42:a1:00:00:01", 1500, 25000, false)
        );
        assert_eq!(p.oper_state, "down");
        let br = &inv.nics[2];
        assert!(br.r#virtual);
        assert_eq!(br.speed_mbps, 0);
        assert_eq!(br.oper_state, "");
    }

    #[test]
    fn addresses_are_matched_by_interface_and_alias_label() {
        let t = fake_sysfs();
        let addrs = [
            ("imfake9".to_string(), "10.9.0.2/24".to_string()),
            ("imfake9:1".to_string(), "10.9.1.2/24".to_string()),
            ("imfake9".to_string(), "fe80::1/64".to_string()),
            ("imfake0".to_string(), "192.0.2.7/28".to_string()),
            ("elsewhere".to_string(), "10.0.0.1/8".to_string()),
        ];
        let nics = nics(t.path(), &addrs).expect("nics");
        let v = nics.iter().find(|n| n.name == "imfake9").expect("imfake9");
        assert_eq!(v.addresses, ["10.9.0.2/24", "10.9.1.2/24", "fe80::1/64"]);
        let p = nics.iter().find(|n| n.name == "imfake0").expect("imfake0");
        assert_eq!(p.addresses, ["192.0.2.7/28"]);
    }

    #[test]
    fn missing_sysfs_names_the_path() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("no-such-sysfs");
        let err = discover_with_sysfs("t", &root).expect_err("must fail");
        let msg = err.to_string();
        assert!(
            msg.contains(&root.join("block").display().to_string()),
            "{msg}"
        );
        assert!(matches!(err, InventoryError::Read { .. }));
    }
}

/// The address other nodes should use for this node: the first IPv4
/// address of the interface the default route leaves through, else of the
/// first physical NIC. `None` when neither has one.
pub fn detect_node_ip(inv: &Inventory) -> Option<std::net::Ipv4Addr> {
    let first_v4 = |nic: &Nic| {
        nic.addresses
            .iter()
            .filter_map(|a| a.split('/').next()?.parse::<std::net::Ipv4Addr>().ok())
            .find(|ip| !ip.is_loopback() && !ip.is_link_local())
    };
    let default_if = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_route_interface(&t));
    if let Some(dev) = default_if {
        if let Some(ip) = inv.nics.iter().filter(|n| n.name == dev).find_map(first_v4) {
            return Some(ip);
        }
    }
    inv.nics.iter().filter(|n| !n.r#virtual).find_map(first_v4)
}

/// The interface of the IPv4 default route in `/proc/net/route` text.
fn default_route_interface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod node_ip_tests {
    use super::*;

    #[test]
    fn default_route_interface_is_read() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth1\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(t).as_deref(), Some("eth1"));
        assert_eq!(default_route_interface("Iface\n"), None);
    }
}
