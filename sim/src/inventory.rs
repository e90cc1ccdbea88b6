//! What a simulated node says about itself: a node address that is never
//! routed (198.18.0.0/15, the benchmarking range), an inventory shaped like
//! the real agent's (`agent/src/inventory.rs`) with the CPU and memory the
//! fleet was given, and the instance addresses it hands out of the pod CIDR
//! the controller allocated to it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use ironmesh_proto::v1::{Cpu, Disk, Inventory, Memory, Nic};

/// First address of the range node addresses come from (RFC 2544
/// benchmarking, 198.18.0.0/15: never routed on the internet).
const NODE_IP_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Addresses in 198.18.0.0/15 minus network and broadcast.
pub const MAX_NODES: usize = (1 << 17) - 2;

/// The address of the `index`th simulated node (0-based): 198.18.0.1,
/// 198.18.0.2, ... Distinct for every index below [`MAX_NODES`].
pub fn node_ip(index: usize) -> Option<Ipv4Addr> {
    (index < MAX_NODES).then(|| Ipv4Addr::from(u32::from(NODE_IP_BASE) + 1 + index as u32))
}

/// The inventory a simulated node reports: `cpus` logical CPUs, `memory`
/// bytes, one disk and one NIC holding `node_ip`.
pub fn inventory(
    hostname: &str,
    node_ip: Ipv4Addr,
    cpus: u32,
    memory: u64,
    agent_version: &str,
) -> Inventory {
    let o = node_ip.octets();
    Inventory {
        hostname: hostname.to_string(),
        os: "Ironmesh simulated node".into(),
        kernel: "sim".into(),
        arch: std::env::consts::ARCH.to_string(),
        cpu: Some(Cpu {
            logical: cpus,
            physical: cpus / 2,
            model: "Simulated CPU".into(),
            vendor: "ironmesh-sim".into(),
            frequency_mhz: 2000,
        }),
        memory: Some(Memory {
            total_bytes: memory,
            available_bytes: memory - memory / 8,
            swap_total_bytes: 0,
        }),
        disks: vec![Disk {
            name: "vda".into(),
            size_bytes: 256 << 30,
            rotational: false,
            model: "Simulated disk".into(),
            removable: false,
            read_only: false,
        }],
        nics: vec![Nic {
            name: "eth0".into(),
            // Locally administered, derived from the address: distinct.
            mac: format!("02:53:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]),
            mtu: 1500,
            addresses: vec![format!("{node_ip}/15")],
            oper_state: "up".into(),
            speed_mbps: 25_000,
            r#virtual: false,
        }],
        agent_version: agent_version.to_string(),
        boot_time_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    }
}

/// Instance addresses of one node's pod CIDR, handed out like the real
/// agent's IPAM (`agent/src/network/ipam.rs`): never the network, the
/// broadcast or the reserved first host address (`.1`); the lowest free
/// one first.
#[derive(Debug, Clone)]
pub struct AddressPool {
    cidr: Ipv4Net,
    used: BTreeSet<u32>,
}

impl AddressPool {
    pub fn new(cidr: Ipv4Net) -> AddressPool {
        AddressPool {
            cidr: cidr.trunc(),
            used: BTreeSet::new(),
        }
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// Marks `ip` as taken (an instance kept across a reconnect).
    pub fn reserve(&mut self, ip: Ipv4Addr) -> bool {
        if !self.cidr.contains(&ip) {
            return false;
        }
        self.used
            .insert(u32::from(ip) - u32::from(self.cidr.network()))
    }

    /// The lowest free instance address, or `None` when the CIDR is full.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let size: u64 = 1u64 << (32 - u32::from(self.cidr.prefix_len()));
        // Offset 0 is the network, 1 reserved, size-1 the broadcast.
        let last = u32::try_from(size.checked_sub(2)?).ok()?;
        let mut want = 2u32;
        for &u in self.used.range(2..) {
            if u != want {
                break;
            }
            want += 1;
        }
        if want > last {
            return None;
        }
        self.used.insert(want);
        Some(Ipv4Addr::from(u32::from(self.cidr.network()) + want))
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        if self.cidr.contains(&ip) {
            self.used
                .remove(&(u32::from(ip) - u32::from(self.cidr.network())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_distinct_and_in_the_benchmark_range() {
        let range: Ipv4Net = "198.18.0.0/15".parse().unwrap();
        let a = node_ip(0).unwrap();
        let b = node_ip(999).unwrap();
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(b, Ipv4Addr::new(198, 18, 3, 232));
        assert!(range.contains(&node_ip(MAX_NODES - 1).unwrap()));
        assert!(node_ip(MAX_NODES).is_none());
    }

    #[test]
    fn pool_hands_out_the_lowest_free_address_and_stops_when_full() {
        let mut p = AddressPool::new("10.0.4.0/30".parse().unwrap());
        assert_eq!(p.allocate(), Some(Ipv4Addr::new(10, 0, 4, 2)));
        assert_eq!(p.allocate(), None, "a /30 holds one instance");
        p.release(Ipv4Addr::new(10, 0, 4, 2));
        assert_eq!(p.allocate(), Some(Ipv4Addr::new(10, 0, 4, 2)));

        let mut p = AddressPool::new("10.0.4.0/24".parse().unwrap());
        assert!(p.reserve(Ipv4Addr::new(10, 0, 4, 3)));
        assert_eq!(p.allocate(), Some(Ipv4Addr::new(10, 0, 4, 2)));
        assert_eq!(p.allocate(), Some(Ipv4Addr::new(10, 0, 4, 4)));
        assert!(!p.reserve(Ipv4Addr::new(10, 0, 5, 1)));
    }
}
