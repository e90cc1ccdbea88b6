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

/// Randomised runs over what a node sends (fuzzing on stable Rust): every
/// agent message decoded from mutated real encodings and from random
/// bytes, judged here and then fed to what records it. Nothing may panic.
/// `IRONMESH_FUZZ_CASES` cases (default 3,000); the long run is
/// `IRONMESH_FUZZ_CASES=1000000 CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
/// cargo test -p ironmesh-controller --release --lib fuzz -- --nocapture`.
#[cfg(test)]
mod fuzz {
    use super::*;
    use ironmesh_proto::v1::{
        agent_message::Msg, AgentMessage, Cpu, Disk, InstanceReport, Memory, Nic, StoragePool,
        VolumeUsage,
    };
    use prost::Message;
    use rand::rngs::StdRng;
    use rand::Rng;

    fn seeds() -> Vec<Vec<u8>> {
        let msgs = [
            Msg::Inventory(Inventory {
                hostname: "n1".into(),
                os: "Debian 12".into(),
                kernel: "6.18".into(),
                arch: "x86_64".into(),
                boot_time_unix: 1_700_000_000,
                cpu: Some(Cpu {
                    logical: 8,
                    physical: 4,
                    model: "x".into(),
                    ..Default::default()
                }),
                memory: Some(Memory {
                    total_bytes: 8 << 30,
                    available_bytes: 4 << 30,
                    ..Default::default()
                }),
                disks: vec![Disk {
                    name: "sda".into(),
                    size_bytes: 1 << 40,
                    ..Default::default()
                }],
                nics: vec![Nic {
                    name: "eth0".into(),
                    addresses: vec!["10.0.0.2/24".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            Msg::Instances(InstanceReport {
                full: true,
                instances: vec![InstanceState {
                    name: "web-0".into(),
                    phase: ironmesh_proto::v1::InstancePhase::Running.into(),
                    ready: true,
                    restarts: 2,
                    exit_code: Some(1),
                    reason: "Exited".into(),
                    message: "m".into(),
                    pid: 42,
                    started_unix_ms: 1_700_000_000_000,
                    spec_generation: 1,
                    ip: "10.244.1.5".into(),
                    ..Default::default()
                }],
            }),
            Msg::Event(InstanceEvent {
                instance: "web-0".into(),
                r#type: "Warning".into(),
                reason: "BackOff".into(),
                message: "restarting".into(),
                unix_ms: 1_700_000_000_000,
            }),
            Msg::Storage(StorageReport {
                pools: vec![StoragePool {
                    name: "fast".into(),
                    capacity_bytes: 1 << 40,
                    free_bytes: 1 << 39,
                    ..Default::default()
                }],
                volumes: vec![VolumeUsage {
                    name: "v".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        ];
        msgs.into_iter()
            .map(|m| AgentMessage { msg: Some(m) }.encode_to_vec())
            .collect()
    }

    fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
        let mut b = seed.to_vec();
        for _ in 0..rng.random_range(1..=3) {
            let len = b.len();
            let at = if len == 0 {
                0
            } else {
                rng.random_range(0..len)
            };
            match rng.random_range(0..8) {
                // Mostly edits that keep the framing: values change, the
                // message still decodes and reaches the checks.
                5..=7 if len > 0 => b[at] = rng.random_range(0x00..0x80),
                0 if len > 0 => b[at] ^= 1 << rng.random_range(0..8),
                1 => b.insert(at, rng.random()),
                2 if len > 0 => {
                    let end = (at + rng.random_range(1..8)).min(len);
                    b.drain(at..end);
                }
                // Extreme varints: lengths, times and counts at the edges.
                3 => {
                    b.splice(
                        at..at,
                        [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                    );
                }
                _ => b.push(rng.random()),
            }
        }
        b
    }

    fn text(rng: &mut StdRng) -> String {
        let n = match rng.random_range(0..10) {
            0 => rng.random_range(0..10_000),
            1 => 0,
            _ => rng.random_range(0..24),
        };
        (0..n).map(|_| rng.random::<char>()).collect()
    }

    fn edge_i64(rng: &mut StdRng) -> i64 {
        match rng.random_range(0..5) {
            0 => i64::MAX - rng.random_range(0..1000),
            1 => i64::MIN + rng.random_range(0..1000),
            2 => -rng.random_range(0..1_000_000),
            _ => rng.random_range(0..4_000_000_000_000),
        }
    }

    #[test]
    fn fuzz_agent_reports() {
        let seeds = seeds();
        let cidr: Ipv4Cidr = "10.244.1.0/24".parse().unwrap();
        let current: ironmesh_api::object::Instance = serde_json::from_value(serde_json::json!({
            "apiVersion": "ironmesh.dev/v1", "kind": "Instance",
            "metadata": {"name": "web-0"},
            "spec": {"workload": "web", "node": "n1", "workloadGeneration": 1,
                     "template": {"image": "busybox", "replicas": 1}},
            "status": {"events": []}}))
        .unwrap();
        ironmesh_api::fuzz::run_counted("agent-reports", |rng| {
            if rng.random_bool(0.5) {
                // Structured: well-framed messages with values at the edges.
                let st = InstanceState {
                    name: text(rng),
                    phase: rng.random_range(-1..6),
                    legacy_phase: text(rng),
                    legacy_has_exit_code: rng.random(),
                    reason: text(rng),
                    message: text(rng),
                    ip: if rng.random_bool(0.5) {
                        format!("10.244.1.{}", rng.random::<u8>())
                    } else {
                        text(rng)
                    },
                    started_unix_ms: edge_i64(rng),
                    restarts: rng.random(),
                    pid: rng.random(),
                    exit_code: rng.random_bool(0.5).then(|| rng.random()),
                    ready: rng.random(),
                    spec_generation: if rng.random_bool(0.5) {
                        1
                    } else {
                        rng.random()
                    },
                };
                let inv = Inventory {
                    hostname: text(rng),
                    boot_time_unix: edge_i64(rng) as u64,
                    cpu: Some(Cpu {
                        logical: rng.random(),
                        physical: rng.random(),
                        frequency_mhz: rng.random(),
                        ..Default::default()
                    }),
                    memory: Some(Memory {
                        total_bytes: rng.random(),
                        available_bytes: rng.random(),
                        ..Default::default()
                    }),
                    disks: vec![Disk {
                        name: text(rng),
                        size_bytes: rng.random(),
                        ..Default::default()
                    }],
                    nics: vec![Nic {
                        name: text(rng),
                        addresses: vec![text(rng)],
                        speed_mbps: rng.random(),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                let ev = InstanceEvent {
                    instance: text(rng),
                    r#type: text(rng),
                    reason: text(rng),
                    message: text(rng),
                    unix_ms: edge_i64(rng),
                };
                {
                    if check_instance_states(std::slice::from_ref(&st), cidr).is_ok() {
                        let _ = crate::node_api::instance_with_state(current.clone(), "n1", &st);
                    }
                    if check_inventory(&inv).is_ok() {
                        let _ = crate::node_api::inventory_status(&inv);
                    }
                    let _ = check_event(&ev);
                }
                return true;
            }
            let bytes = if rng.random_bool(0.9) {
                let s = &seeds[rng.random_range(0..seeds.len())];
                mutate(rng, s)
            } else {
                (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
            };
            {
                let Ok(m) = AgentMessage::decode(bytes.as_slice()) else {
                    return false;
                };
                match m.msg {
                    Some(Msg::Inventory(inv)) if check_inventory(&inv).is_ok() => {
                        let _ = crate::node_api::inventory_status(&inv);
                    }
                    Some(Msg::Instances(rep))
                        if check_instance_states(&rep.instances, cidr).is_ok() =>
                    {
                        for st in &rep.instances {
                            let _ = crate::node_api::instance_with_state(current.clone(), "n1", st);
                        }
                    }
                    Some(Msg::Event(ev)) => {
                        let _ = check_event(&ev);
                    }
                    Some(Msg::Storage(s)) => {
                        let _ = check_storage(&s);
                    }
                    _ => {}
                }
                true
            }
        });
    }
}
