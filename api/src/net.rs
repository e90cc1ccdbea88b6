//! IPv4 CIDR blocks: the cluster CIDR, node pod CIDRs and their subnets.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network in CIDR notation whose address is the network address
/// (`10.244.3.0/24`, not `10.244.3.7/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not an IPv4 CIDR block: {reason}")]
pub struct CidrError {
    pub input: String,
    pub reason: String,
}

impl Ipv4Cidr {
    /// A block; `addr` must be its network address.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr, CidrError> {
        let err = |reason: String| CidrError {
            input: format!("{addr}/{prefix}"),
            reason,
        };
        if prefix > 32 {
            return Err(err("the prefix length must be 0 to 32".into()));
        }
        let c = Ipv4Cidr { addr, prefix };
        if u32::from(addr) & !c.mask() != 0 {
            return Err(err(format!(
                "host bits are set; the network address is {}",
                Ipv4Addr::from(u32::from(addr) & c.mask())
            )));
        }
        Ok(c)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// The `n`-th address of the block (0 is the network address).
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n as u32))
    }

    /// How many `/prefix` subnets the block holds.
    pub fn subnet_count(&self, prefix: u8) -> u64 {
        if prefix < self.prefix || prefix > 32 {
            0
        } else {
            1u64 << (prefix - self.prefix)
        }
    }

    /// The `n`-th `/prefix` subnet of the block.
    pub fn subnet(&self, prefix: u8, n: u64) -> Option<Ipv4Cidr> {
        if n >= self.subnet_count(prefix) {
            return None;
        }
        let step = 1u64 << (32 - u32::from(prefix));
        let addr = Ipv4Addr::from((u64::from(u32::from(self.addr)) + n * step) as u32);
        Some(Ipv4Cidr { addr, prefix })
    }

    /// True if the two blocks share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Ipv4Cidr, CidrError> {
        let err = |reason: &str| CidrError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| err("expected ADDRESS/PREFIX, e.g. 10.244.0.0/16"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| err("the address is not IPv4"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| err("the prefix length is not a number"))?;
        Ipv4Cidr::new(addr, prefix).map_err(|e| CidrError {
            input: s.to_string(),
            reason: e.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits() {
        let c: Ipv4Cidr = "10.244.0.0/16".parse().unwrap();
        assert_eq!(c.subnet_count(24), 256);
        assert_eq!(c.subnet(24, 3).unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(c.subnet(24, 256), None);
        let s = c.subnet(24, 3).unwrap();
        assert!(s.contains("10.244.3.200".parse().unwrap()));
        assert!(!s.contains("10.244.4.1".parse().unwrap()));
        assert_eq!(s.nth(1), Some("10.244.3.1".parse().unwrap()));
        assert!(c.overlaps(&s));
    }

    #[test]
    fn bad_blocks_say_why() {
        let e = "10.244.0.1/16".parse::<Ipv4Cidr>().unwrap_err();
        assert!(
            e.to_string().contains("network address is 10.244.0.0"),
            "{e}"
        );
        assert!("10.244.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("10.244.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("fd00::/8".parse::<Ipv4Cidr>().is_err());
    }
}
