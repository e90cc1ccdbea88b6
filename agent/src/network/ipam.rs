//! Instance addresses from the node's pod CIDR, persisted as leases.
//!
//! The network address, the broadcast address and the first host address
//! (`.1`, reserved: in VXLAN mode it is the node's tunnel address) are never
//! handed out. Allocation takes the lowest free address. The leases file is
//! written atomically *before* an address is used, so an address is never
//! handed out twice, also across agent restarts; it is reused only after
//! its lease was released. This module owns no kernel state.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::NetworkError;

const LEASES_VERSION: u32 = 1;

/// The on-disk form of the leases file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LeasesFile {
    version: u32,
    pod_cidr: Option<Ipv4Net>,
    leases: BTreeMap<String, Ipv4Addr>,
}

/// Leases of one node's pod CIDR, backed by `leases.json`.
#[derive(Debug)]
pub struct Ipam {
    path: PathBuf,
    pod_cidr: Option<Ipv4Net>,
    leases: BTreeMap<String, Ipv4Addr>,
}

/// Whether `cidr` can hold instances: at least one address besides the
/// network, broadcast and reserved first address.
pub fn check_pod_cidr(cidr: Ipv4Net) -> Result<(), NetworkError> {
    if cidr.prefix_len() > 29 {
        return Err(NetworkError::BadPodCidr {
            cidr,
            reason: "prefix longer than /29 leaves no room for instances",
        });
    }
    if cidr.network() != cidr.addr() {
        return Err(NetworkError::BadPodCidr {
            cidr,
            reason: "host bits are set",
        });
    }
    Ok(())
}

/// The reserved first address of a pod CIDR (`.1`), used as the node's
/// VXLAN tunnel address.
pub fn reserved_addr(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

impl Ipam {
    /// Loads `path`, or starts empty if it does not exist.
    pub fn load(path: &Path) -> Result<Ipam, NetworkError> {
        let corrupt = |reason: String| NetworkError::LeasesCorrupt {
            path: path.to_owned(),
            reason,
        };
        let file: LeasesFile = match std::fs::read(path) {
            Ok(data) => serde_json::from_slice(&data).map_err(|e| corrupt(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LeasesFile {
                version: LEASES_VERSION,
                ..LeasesFile::default()
            },
            Err(e) => return Err(NetworkError::io("reading leases file", path, e)),
        };
        if file.version != LEASES_VERSION {
            return Err(corrupt(format!(
                "version {} is not {LEASES_VERSION}",
                file.version
            )));
        }
        if !file.leases.is_empty() {
            let Some(cidr) = file.pod_cidr else {
                return Err(corrupt("leases without a pod CIDR".into()));
            };
            let mut seen = HashSet::new();
            for (instance, ip) in &file.leases {
                if !usable(cidr, *ip) {
                    return Err(corrupt(format!(
                        "lease of {instance} ({ip}) is not a usable address of {cidr}"
                    )));
                }
                if !seen.insert(*ip) {
                    return Err(corrupt(format!("{ip} is leased twice")));
                }
            }
        }
        Ok(Ipam {
            path: path.to_owned(),
            pod_cidr: file.pod_cidr,
            leases: file.leases,
        })
    }

    pub fn pod_cidr(&self) -> Option<Ipv4Net> {
        self.pod_cidr
    }

    pub fn leases(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.leases
    }

    pub fn get(&self, instance: &str) -> Option<Ipv4Addr> {
        self.leases.get(instance).copied()
    }

    /// Sets the pod CIDR; a different one than before drops every lease.
    /// Returns the instances whose leases were dropped. Persists.
    pub fn set_pod_cidr(&mut self, cidr: Ipv4Net) -> Result<Vec<String>, NetworkError> {
        check_pod_cidr(cidr)?;
        if self.pod_cidr == Some(cidr) {
            return Ok(Vec::new());
        }
        let old_cidr = self.pod_cidr.replace(cidr);
        let old_leases = std::mem::take(&mut self.leases);
        if let Err(e) = self.persist() {
            self.pod_cidr = old_cidr;
            self.leases = old_leases;
            return Err(e);
        }
        Ok(old_leases.into_keys().collect())
    }

    /// The instance's address: its existing lease, or the lowest free
    /// address, persisted before it is returned. The flag says whether the
    /// lease is new.
    pub fn lease(&mut self, instance: &str) -> Result<(Ipv4Addr, bool), NetworkError> {
        let cidr = self.pod_cidr.ok_or(NetworkError::NotConfigured)?;
        if let Some(ip) = self.get(instance) {
            return Ok((ip, false));
        }
        let used: HashSet<Ipv4Addr> = self.leases.values().copied().collect();
        let first = u32::from(cidr.network()) + 2;
        let last = u32::from(cidr.broadcast()) - 1;
        let ip = (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| NetworkError::Exhausted {
                instance: instance.to_owned(),
                cidr,
                leased: used.len(),
            })?;
        self.leases.insert(instance.to_owned(), ip);
        if let Err(e) = self.persist() {
            self.leases.remove(instance);
            return Err(e);
        }
        Ok((ip, true))
    }

    /// Drops the instance's lease, if any, and persists. Returns the
    /// released address.
    pub fn release(&mut self, instance: &str) -> Result<Option<Ipv4Addr>, NetworkError> {
        let Some(ip) = self.leases.remove(instance) else {
            return Ok(None);
        };
        if let Err(e) = self.persist() {
            self.leases.insert(instance.to_owned(), ip);
            return Err(e);
        }
        Ok(Some(ip))
    }

    fn persist(&self) -> Result<(), NetworkError> {
        let file = LeasesFile {
            version: LEASES_VERSION,
            pod_cidr: self.pod_cidr,
            leases: self.leases.clone(),
        };
        let data = serde_json::to_vec_pretty(&file).map_err(|e| NetworkError::LeasesCorrupt {
            path: self.path.clone(),
            reason: format!("encoding: {e}"),
        })?;
        ironmesh_process::write_file_atomic(&self.path, &data, 0o600)
            .map_err(|e| NetworkError::io("writing leases file", &self.path, e))
    }
}

/// An address that may be leased: inside `cidr`, not its network,
/// broadcast or reserved first address.
fn usable(cidr: Ipv4Net, ip: Ipv4Addr) -> bool {
    cidr.contains(&ip)
        && ip != cidr.network()
        && ip != cidr.broadcast()
        && ip != reserved_addr(cidr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_lowest_free_skipping_reserved_and_reuses_only_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let mut ipam = Ipam::load(&path).unwrap();
        assert!(matches!(ipam.lease("a"), Err(NetworkError::NotConfigured)));
        ipam.set_pod_cidr(cidr("10.1.0.0/29")).unwrap();
        let a = ipam.lease("a").unwrap();
        assert_eq!(a, ("10.1.0.2".parse().unwrap(), true));
        assert_eq!(
            ipam.lease("a").unwrap(),
            ("10.1.0.2".parse().unwrap(), false)
        );
        let ips: Vec<_> = ["b", "c", "d", "e"]
            .iter()
            .map(|n| ipam.lease(n).unwrap().0.to_string())
            .collect();
        assert_eq!(ips, ["10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]);
        assert!(matches!(
            ipam.lease("f"),
            Err(NetworkError::Exhausted { .. })
        ));
        assert_eq!(
            ipam.release("c").unwrap(),
            Some("10.1.0.4".parse().unwrap())
        );
        assert_eq!(ipam.release("c").unwrap(), None);
        // Reload (agent restart): the leases are still there.
        let mut ipam = Ipam::load(&path).unwrap();
        assert_eq!(ipam.get("d"), Some("10.1.0.5".parse().unwrap()));
        assert_eq!(
            ipam.lease("f").unwrap().0,
            "10.1.0.4".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn a_new_pod_cidr_drops_the_old_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let mut ipam = Ipam::load(&path).unwrap();
        ipam.set_pod_cidr(cidr("10.1.0.0/24")).unwrap();
        ipam.lease("a").unwrap();
        assert!(ipam.set_pod_cidr(cidr("10.1.0.0/24")).unwrap().is_empty());
        assert_eq!(ipam.set_pod_cidr(cidr("10.2.0.0/24")).unwrap(), ["a"]);
        let ipam = Ipam::load(&path).unwrap();
        assert!(ipam.leases().is_empty());
        assert_eq!(ipam.pod_cidr(), Some(cidr("10.2.0.0/24")));
    }

    #[test]
    fn rejects_unusable_cidrs_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let mut ipam = Ipam::load(&path).unwrap();
        assert!(ipam.set_pod_cidr(cidr("10.1.0.0/30")).is_err());
        assert!(ipam.set_pod_cidr(cidr("10.1.0.4/24")).is_err());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            Ipam::load(&path),
            Err(NetworkError::LeasesCorrupt { .. })
        ));
        std::fs::write(
            &path,
            br#"{"version":1,"pod_cidr":"10.1.0.0/24","leases":{"a":"10.1.0.2","b":"10.1.0.2"}}"#,
        )
        .unwrap();
        assert!(matches!(
            Ipam::load(&path),
            Err(NetworkError::LeasesCorrupt { .. })
        ));
        std::fs::write(
            &path,
            br#"{"version":1,"pod_cidr":"10.1.0.0/24","leases":{"a":"10.1.0.1"}}"#,
        )
        .unwrap();
        assert!(matches!(
            Ipam::load(&path),
            Err(NetworkError::LeasesCorrupt { .. })
        ));
    }
}
