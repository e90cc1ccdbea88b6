//! Bounds on what an agent reports: nothing a node says is trusted for the
//! rest of the cluster without a check.
//!
//! Instance addresses feed every node's identity map and every Service's
//! backends, so an address must lie in the reporting node's own pod CIDR
//! (that the instance is bound to the node is checked where the report is
//! recorded). Counts, sizes and timestamps are bounded so that a lying or
//! broken agent cannot overflow a time addition or fill the store; a
//! report that breaks a bound is refused whole with `INVALID_ARGUMENT`,
//! naming the field. This module only judges; it writes nothing.

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironmesh_api::net::Ipv4Cidr;
use ironmesh_proto::v1::{InstanceEvent, InstanceState, Inventory, StorageReport};
use tonic::Status;

/// Largest memory, disk or pool size accepted (1 EiB).
pub const MAX_BYTES: u64 = 1 << 60;
/// Most logical CPUs accepted.
pub const MAX_CPUS: u32 = 65_536;
/// Most disks, NICs or pools in one report.
pub const MAX_ITEMS: usize = 4096;
/// Most addresses on one NIC.
pub const MAX_ADDRESSES: usize = 256;
/// Longest name-like string (hostname, model, kernel...).
pub const MAX_SHORT: usize = 256;
/// Longest free text (reasons, messages).
pub const MAX_TEXT: usize = 4096;
/// How far in the future a reported time may be (clock skew).
pub const MAX_SKEW: Duration = Duration::from_secs(24 * 3600);
/// Earliest reported time accepted: 2000-01-01.
const EARLIEST_UNIX: u64 = 946_684_800;

fn bad(field: &str, why: String) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn latest_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_add(MAX_SKEW.as_secs())
}

/// A wall-clock time in seconds: 0 (unknown) or between 2000 and a day
/// from now.
fn check_unix_secs(field: &str, t: u64) -> Result<(), Status> {
    if t == 0 || (EARLIEST_UNIX..=latest_unix()).contains(&t) {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{t} is not a plausible time (Unix seconds between 2000 and a day from now)"),
        ))
    }
}

/// A wall-clock time in milliseconds: 0 (unknown) or plausible as above.
fn check_unix_ms(field: &str, t: i64) -> Result<(), Status> {
    if t == 0 {
        return Ok(());
    }
    let secs = u64::try_from(t).map(|ms| ms / 1000).unwrap_or(u64::MAX);
    if secs != 0 && (EARLIEST_UNIX..=latest_unix()).contains(&secs) {
        Ok(())
    } else {
        Err(bad(
            field,
            format!(
                "{t} is not a plausible time (Unix milliseconds between 2000 and a day from now)"
            ),
        ))
    }
}

fn check_len(field: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.len() > max {
        Err(bad(field, format!("{} bytes, at most {max}", s.len())))
    } else {
        Ok(())
    }
}

fn check_bytes(field: &str, n: u64) -> Result<(), Status> {
    if n > MAX_BYTES {
        Err(bad(field, format!("{n} bytes is more than 1 EiB")))
    } else {
        Ok(())
    }
}

fn check_count(field: &str, n: usize) -> Result<(), Status> {
    if n > MAX_ITEMS {
        Err(bad(field, format!("{n} entries, at most {MAX_ITEMS}")))
    } else {
        Ok(())
    }
}

/// The node's inventory.
pub fn check_inventory(inv: &Inventory) -> Result<(), Status> {
    check_unix_secs("inventory.boot_time_unix", inv.boot_time_unix)?;
    for (f, s) in [
        ("inventory.hostname", &inv.hostname),
        ("inventory.os", &inv.os),
        ("inventory.kernel", &inv.kernel),
        ("inventory.arch", &inv.arch),
        ("inventory.agent_version", &inv.agent_version),
    ] {
        check_len(f, s, MAX_SHORT)?;
    }
    if let Some(cpu) = &inv.cpu {
        if cpu.logical > MAX_CPUS || cpu.physical > MAX_CPUS {
            return Err(bad(
                "inventory.cpu",
                format!(
                    "{} logical / {} physical CPUs, at most {MAX_CPUS}",
                    cpu.logical, cpu.physical
                ),
            ));
        }
        if cpu.frequency_mhz > 1_000_000 {
            return Err(bad(
                "inventory.cpu.frequency_mhz",
                format!("{} MHz is not plausible", cpu.frequency_mhz),
            ));
        }
        check_len("inventory.cpu.model", &cpu.model, MAX_SHORT)?;
        check_len("inventory.cpu.vendor", &cpu.vendor, MAX_SHORT)?;
    }
    if let Some(m) = &inv.memory {
        check_bytes("inventory.memory.total_bytes", m.total_bytes)?;
        check_bytes("inventory.memory.available_bytes", m.available_bytes)?;
        check_bytes("inventory.memory.swap_total_bytes", m.swap_total_bytes)?;
    }
    check_count("inventory.disks", inv.disks.len())?;
    for (i, d) in inv.disks.iter().enumerate() {
        check_bytes(&format!("inventory.disks[{i}].size_bytes"), d.size_bytes)?;
        check_len(&format!("inventory.disks[{i}].name"), &d.name, MAX_SHORT)?;
        check_len(&format!("inventory.disks[{i}].model"), &d.model, MAX_SHORT)?;
    }
    check_count("inventory.nics", inv.nics.len())?;
    for (i, n) in inv.nics.iter().enumerate() {
        check_len(&format!("inventory.nics[{i}].name"), &n.name, MAX_SHORT)?;
        check_len(&format!("inventory.nics[{i}].mac"), &n.mac, MAX_SHORT)?;
        check_len(
            &format!("inventory.nics[{i}].oper_state"),
            &n.oper_state,
            MAX_SHORT,
        )?;
        if n.addresses.len() > MAX_ADDRESSES {
            return Err(bad(
                &format!("inventory.nics[{i}].addresses"),
                format!("{} addresses, at most {MAX_ADDRESSES}", n.addresses.len()),
            ));
        }
        for a in &n.addresses {
            check_len(&format!("inventory.nics[{i}].addresses"), a, 64)?;
        }
        if n.mtu > 65_536 || n.speed_mbps > 100_000_000 {
            return Err(bad(
                &format!("inventory.nics[{i}]"),
                format!(
                    "mtu {} / speed {} Mbit/s is not plausible",
                    n.mtu, n.speed_mbps
                ),
            ));
        }
    }
    Ok(())
}

/// Instance states from the node whose pod CIDR is `pod_cidr`.
pub fn check_instance_states(states: &[InstanceState], pod_cidr: Ipv4Cidr) -> Result<(), Status> {
    check_count("instances", states.len())?;
    for st in states {
        let field = |f: &str| format!("instance {}: {f}", st.name);
        if !st.ip.is_empty() {
            let ip: Ipv4Addr = st
                .ip
                .parse()
                .map_err(|_| bad(&field("ip"), format!("{:?} is not an IPv4 address", st.ip)))?;
            if !pod_cidr.contains(ip) {
                return Err(bad(
                    &field("ip"),
                    format!("{ip} is not in this node's pod CIDR {pod_cidr}"),
                ));
            }
        }
        check_unix_ms(&field("started_unix_ms"), st.started_unix_ms)?;
        check_len(&field("phase"), &st.phase, MAX_SHORT)?;
        check_len(&field("reason"), &st.reason, MAX_SHORT)?;
        check_len(&field("message"), &st.message, MAX_TEXT)?;
    }
    Ok(())
}

/// One instance event.
pub fn check_event(ev: &InstanceEvent) -> Result<(), Status> {
    let field = |f: &str| format!("event of {}: {f}", ev.instance);
    check_unix_ms(&field("unix_ms"), ev.unix_ms)?;
    check_len(&field("type"), &ev.r#type, MAX_SHORT)?;
    check_len(&field("reason"), &ev.reason, MAX_SHORT)?;
    check_len(&field("message"), &ev.message, MAX_TEXT)
}

/// The node's storage report.
pub fn check_storage(report: &StorageReport) -> Result<(), Status> {
    check_count("storage.pools", report.pools.len())?;
    check_count("storage.volumes", report.volumes.len())?;
    for p in &report.pools {
        let f = |x: &str| format!("storage pool {:?}: {x}", p.name);
        check_len(&f("name"), &p.name, MAX_SHORT)?;
        check_len(&f("path"), &p.path, MAX_TEXT)?;
        check_bytes(&f("capacity_bytes"), p.capacity_bytes)?;
        check_bytes(&f("allocated_bytes"), p.allocated_bytes)?;
        if p.free_bytes > p.capacity_bytes {
            return Err(bad(
                &f("free_bytes"),
                format!(
                    "{} is more than the pool's capacity {}",
                    p.free_bytes, p.capacity_bytes
                ),
            ));
        }
        if p.backends.len() > 16 {
            return Err(bad(&f("backends"), "more than 16".to_string()));
        }
    }
    if let Some(d) = &report.disk_use {
        check_bytes("storage.disk_use.image_bytes", d.image_bytes)?;
        check_bytes("storage.disk_use.log_bytes", d.log_bytes)?;
        check_bytes("storage.disk_use.volume_bytes", d.volume_bytes)?;
        check_bytes("storage.disk_use.state_bytes", d.state_bytes)?;
    }
    for v in &report.volumes {
        let f = |x: &str| format!("volume {:?}: {x}", v.name);
        check_len(&f("name"), &v.name, MAX_SHORT)?;
        check_bytes(&f("size_bytes"), v.size_bytes)?;
        check_bytes(&f("used_bytes"), v.used_bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_proto::v1::{Cpu, Disk, Memory, StoragePool};

    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[test]
    fn absurd_boot_time_is_refused_not_panicked_on() {
        let inv = Inventory {
            boot_time_unix: u64::MAX,
            ..Default::default()
        };
        let err = check_inventory(&inv).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("boot_time_unix"),
            "{}",
            err.message()
        );
        let ok = Inventory {
            boot_time_unix: 1_700_000_000,
            cpu: Some(Cpu {
                logical: 16,
                ..Default::default()
            }),
            memory: Some(Memory {
                total_bytes: 64 << 30,
                ..Default::default()
            }),
            ..Default::default()
        };
        check_inventory(&ok).unwrap();
        check_inventory(&Inventory::default()).unwrap();
    }

    #[test]
    fn capacity_and_sizes_are_bounded() {
        let inv = Inventory {
            cpu: Some(Cpu {
                logical: u32::MAX,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check_inventory(&inv).is_err());
        let inv = Inventory {
            memory: Some(Memory {
                total_bytes: u64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check_inventory(&inv).is_err());
        let inv = Inventory {
            disks: vec![Disk {
                name: "sda".into(),
                size_bytes: u64::MAX,
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = check_inventory(&inv).unwrap_err();
        assert!(
            err.message().contains("disks[0].size_bytes"),
            "{}",
            err.message()
        );
        let storage = StorageReport {
            pools: vec![StoragePool {
                name: "p".into(),
                capacity_bytes: 10,
                free_bytes: 11,
                ..Default::default()
            }],
            volumes: Vec::new(),
            disk_use: None,
        };
        assert!(check_storage(&storage).is_err());
        let huge = StorageReport {
            disk_use: Some(ironmesh_proto::v1::DiskUse {
                log_bytes: u64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = check_storage(&huge).unwrap_err();
        assert!(
            err.message().contains("disk_use.log_bytes"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn instance_ip_must_be_in_the_nodes_pod_cidr() {
        let cidr: Ipv4Cidr = "10.244.1.0/24".parse().unwrap();
        let st = |ip: &str| InstanceState {
            name: "web-1".into(),
            ip: ip.into(),
            started_unix_ms: now_ms(),
            ..Default::default()
        };
        check_instance_states(&[st("10.244.1.7"), st("")], cidr).unwrap();
        let err = check_instance_states(&[st("10.244.2.7")], cidr).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .contains("10.244.2.7 is not in this node's pod CIDR 10.244.1.0/24"),
            "{}",
            err.message()
        );
        assert!(check_instance_states(&[st("not-an-ip")], cidr).is_err());
    }

    #[test]
    fn timestamps_are_bounded() {
        let cidr: Ipv4Cidr = "10.244.1.0/24".parse().unwrap();
        for t in [i64::MAX, -1, i64::MIN, now_ms() + 3 * 24 * 3600 * 1000] {
            let st = InstanceState {
                name: "a".into(),
                started_unix_ms: t,
                ..Default::default()
            };
            assert!(check_instance_states(&[st], cidr).is_err(), "{t}");
            let ev = InstanceEvent {
                instance: "a".into(),
                unix_ms: t,
                ..Default::default()
            };
            assert!(check_event(&ev).is_err(), "{t}");
        }
        let ev = InstanceEvent {
            instance: "a".into(),
            unix_ms: now_ms(),
            ..Default::default()
        };
        check_event(&ev).unwrap();
    }
}
