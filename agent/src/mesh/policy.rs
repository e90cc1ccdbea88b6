//! The cluster as the proxies see it: who each address and workload is,
//! which are in the mesh, and the Policy rules judged by identity.
//!
//! The rules are the same compiled `PolicyRule`s the kernel holds, judged
//! the same way (an ingress-enforced destination needs an ingress rule, an
//! egress-enforced source an egress rule; the peer side may be "any"), but
//! the source identity is the one of the certificate's workload, never the
//! packet's address.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use crate::datapath::{Direction, PolicyRule, Protocol};

/// How an address takes part in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    pub workload: String,
    pub identity: u32,
    pub strict: bool,
}

/// One assignment's view, swapped whole on every apply.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// Mesh instances (permissive or strict), by address.
    pub peers: HashMap<Ipv4Addr, MeshPeer>,
    /// Identity of each workload with a mesh instance.
    pub workload_identity: HashMap<String, u32>,
    /// Nodes of the cluster (this one included): certificates of any other
    /// node are refused.
    pub nodes: HashSet<String>,
    pub rules: Vec<PolicyRule>,
    pub ingress_enforced: HashSet<u32>,
    pub egress_enforced: HashSet<u32>,
}

impl View {
    /// Whether `src` may open a TCP connection to `dst` on `port`: both
    /// sides' rules (the destination proxy's judgement).
    pub fn allows(&self, src: u32, dst: u32, port: u16) -> bool {
        self.allows_ingress(src, dst, port) && self.allows_egress(src, dst, port)
    }

    /// Only the destination's ingress rules.
    pub fn allows_ingress(&self, src: u32, dst: u32, port: u16) -> bool {
        !self.ingress_enforced.contains(&dst) || self.rule(Direction::Ingress, src, dst, port)
    }

    /// Only the source's egress rules (the source proxy's judgement: what
    /// may leave; the destination judges what may enter).
    pub fn allows_egress(&self, src: u32, dst: u32, port: u16) -> bool {
        !self.egress_enforced.contains(&src) || self.rule(Direction::Egress, src, dst, port)
    }

    fn rule(&self, dir: Direction, src: u32, dst: u32, port: u16) -> bool {
        self.rules.iter().any(|r| {
            r.direction == dir
                && r.proto == Protocol::Tcp
                && (r.port == 0 || r.port == port)
                && r.src_identity.is_none_or(|s| s == src)
                && r.dst_identity.is_none_or(|d| d == dst)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_judged_by_identity_like_the_kernel() {
        let mut v = View::default();
        assert!(v.allows(1, 2, 80), "nothing enforced: allowed");
        v.ingress_enforced.insert(2);
        assert!(!v.allows(1, 2, 80), "enforced without a rule: denied");
        v.rules
            .push(PolicyRule::ingress(Some(1), 2, 80, Protocol::Tcp));
        assert!(v.allows(1, 2, 80));
        assert!(!v.allows(1, 2, 81), "other port");
        assert!(!v.allows(3, 2, 80), "other source");
        v.rules.push(PolicyRule::ingress(None, 2, 0, Protocol::Udp));
        assert!(!v.allows(3, 2, 80), "a UDP rule does not open TCP");
        v.egress_enforced.insert(1);
        assert!(
            !v.allows(1, 2, 80),
            "source enforced for egress without a rule"
        );
        v.rules.push(PolicyRule::egress(1, None, 0, Protocol::Tcp));
        assert!(v.allows(1, 2, 80));
    }
}
