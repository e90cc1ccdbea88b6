//! Ironmesh's BPF programs and the Rust mirrors of their map layouts.
//!
//! Programs are C under `ebpf/c/*.bpf.c`, compiled by `build.rs` with clang
//! into objects that the agent embeds ([`DATAPATH_OBJ`]) and loads with aya.
//! This crate owns the shared map layouts (`#[repr(C)]` mirrors of
//! `c/ironmesh.h`, checked field by field against the C compiler's offsets
//! by the tests below) and nothing that touches the kernel. [`maps`] and
//! [`programs`] hold the names of the object's maps and programs.
//!
//! Byte order: fields named `addr`, `saddr`, `daddr`, `vip` and `*port` hold
//! network byte order (as the kernel stores them); use the constructors and
//! accessors here rather than filling them by hand.

use std::net::Ipv4Addr;

/// The datapath object: TC programs `im_from_inst` / `im_to_inst`, cgroup
/// programs `im_connect4`, `im_sendmsg4`, `im_recvmsg4`, `im_getpeername4`,
/// and every `im_*` map.
pub static DATAPATH_OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/datapath.bpf.o"));

/// `IM_LAYOUT_VERSION`: part of the pin directory, so a layout change never
/// reuses an old pinned map.
pub const LAYOUT_VERSION: u32 = 1;

/// Identity of an address no entry names.
pub const IDENTITY_UNKNOWN: u32 = 0;
/// On a policy key's peer side (`src_identity` of an ingress rule,
/// `dst_identity` of an egress rule): any peer.
pub const IDENTITY_ANY: u32 = u32::MAX;

/// Verdicts, as in flow events and conntrack.
pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_DENIED: u8 = 2;
pub const VERDICT_RATE_LIMITED: u8 = 3;
/// A packet from an instance whose source was not its leased address.
pub const VERDICT_SPOOFED: u8 = 4;
/// Plaintext from off the node (or the host) to a strict mesh instance.
pub const VERDICT_PLAINTEXT: u8 = 5;

/// Flow event kinds.
pub const EVENT_NEW: u8 = 1;
pub const EVENT_VERDICT: u8 = 2;
pub const EVENT_REPORT: u8 = 3;
pub const EVENT_CLOSE: u8 = 4;

/// Hooks.
pub const HOOK_FROM_INSTANCE: u8 = 1;
pub const HOOK_TO_INSTANCE: u8 = 2;

/// `im_policy_val.flags`.
pub const POLICY_ALLOW: u32 = 1;

/// `im_policy_key.dir`: a rule letting its source into an ingress-enforced
/// destination (0, the meaning of every key written before egress existed).
pub const DIR_INGRESS: u8 = 0;
/// `im_policy_key.dir`: a rule letting an egress-enforced source out to its
/// destination.
pub const DIR_EGRESS: u8 = 1;

/// `im_enforced_val.enforced` flags: default deny for incoming connections.
pub const ENFORCE_INGRESS: u32 = 1;
/// `im_enforced_val.enforced` flags: default deny for outgoing connections.
pub const ENFORCE_EGRESS: u32 = 2;

/// Indices of `im_counters`.
pub const CNT_ALLOWED: u32 = 0;
pub const CNT_DENIED: u32 = 1;
pub const CNT_RATE_LIMITED: u32 = 2;
pub const CNT_NEW_FLOWS: u32 = 3;
pub const CNT_EVENTS_LOST: u32 = 4;
pub const CNT_LB_REWRITES: u32 = 5;
pub const CNT_LB_NO_BACKEND: u32 = 6;
pub const CNT_PEER_REDIRECTS: u32 = 7;
pub const CNT_MESH_CAPTURED: u32 = 8;
pub const CNT_PLAINTEXT: u32 = 9;
pub const CNT_MAX: u32 = 10;

/// Indices of `im_guard_cnt` (anti-spoofing and fail-closed drops).
pub const GUARD_SPOOFED: u32 = 0;
pub const GUARD_ARP_SPOOFED: u32 = 1;
pub const GUARD_NOT_IPV4: u32 = 2;
pub const GUARD_NO_ADDR: u32 = 3;
pub const GUARD_CT_FULL: u32 = 4;
pub const GUARD_MAX: u32 = 8;

/// Map names in the object (at most 15 bytes each).
pub mod maps {
    pub const IP_IDENTITY: &str = "im_ip_identity";
    pub const POLICY: &str = "im_policy";
    pub const ENFORCED: &str = "im_enforced";
    pub const CONNTRACK: &str = "im_conntrack";
    pub const RATE_BUCKET: &str = "im_rate_bucket";
    pub const COUNTERS: &str = "im_counters";
    pub const CONFIG: &str = "im_config";
    pub const LOCAL_IFS: &str = "im_local_ifs";
    pub const FLOWS: &str = "im_flows";
    pub const SERVICES: &str = "im_services";
    pub const BACKENDS: &str = "im_backends";
    pub const REVNAT: &str = "im_revnat";
    pub const INST_ADDR: &str = "im_inst_addr";
    pub const GUARD_CNT: &str = "im_guard_cnt";
    pub const MESH_NS: &str = "im_mesh_ns";
    pub const MESH_ORIG: &str = "im_mesh_orig";
    pub const MESH_PENDING: &str = "im_mesh_pending";
    pub const MESH_PEER: &str = "im_mesh_peer";
    /// Every map, for pinning and cleanup.
    pub const ALL: &[&str] = &[
        IP_IDENTITY,
        POLICY,
        ENFORCED,
        CONNTRACK,
        RATE_BUCKET,
        COUNTERS,
        CONFIG,
        LOCAL_IFS,
        FLOWS,
        SERVICES,
        BACKENDS,
        REVNAT,
        INST_ADDR,
        GUARD_CNT,
        MESH_NS,
        MESH_ORIG,
        MESH_PENDING,
        MESH_PEER,
    ];
}

/// Program names in the object.
pub mod programs {
    pub const FROM_INSTANCE: &str = "im_from_inst";
    pub const TO_INSTANCE: &str = "im_to_inst";
    pub const CONNECT4: &str = "im_connect4";
    pub const SENDMSG4: &str = "im_sendmsg4";
    pub const RECVMSG4: &str = "im_recvmsg4";
    pub const GETPEERNAME4: &str = "im_getpeername4";
    /// `sockops`: files a captured connection's original destination under
    /// its local port.
    pub const SOCKOPS: &str = "im_sockops";
}

/// Network-order u32 of an address, as the kernel stores it.
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address in a network-order u32.
pub fn addr_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// Network-order u16 of a port.
pub fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// The port in a network-order u16.
pub fn port_from_be(v: u16) -> u16 {
    u16::from_be(v)
}

macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: #[repr(C)], only integer fields, no implicit padding
            // (checked against the C layout by the tests below).
            unsafe impl aya::Pod for $t {}
        )*
    };
}

/// `struct im_identity_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IdentityVal {
    pub identity: u32,
    /// `ID_*` flags (zero before the mesh).
    pub flags: u32,
}

/// `im_identity_val.flags`: a mesh instance (permissive or strict).
pub const ID_MESH: u32 = 1;
/// `im_identity_val.flags`: accepts off-node connections only through the proxy.
pub const ID_STRICT: u32 = 2;
/// `im_identity_val.flags`: on another node.
pub const ID_REMOTE: u32 = 4;
/// The HBONE (mTLS) port of the node proxy, in every mesh instance's namespace.
pub const MESH_HBONE_PORT: u16 = 15008;
/// The outbound listener on each mesh instance's loopback.
pub const MESH_OUTBOUND_PORT: u16 = 15001;
/// SO_MARK of the agent's own sockets (probes): a strict instance accepts them.
pub const MARK_AGENT: u32 = 0x1e3e_0001;

/// `struct im_mesh_ns_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshNsVal {
    pub flags: u32,
    pub pad: u32,
}

/// `struct im_mesh_addr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshAddr {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    pub pad: u16,
}

/// `struct im_mesh_sock_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshSockKey {
    pub netns: u64,
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    pub pad: u16,
}

/// `struct im_policy_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Network order; 0: any port.
    pub dport: u16,
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
}

/// `struct im_policy_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PolicyVal {
    pub flags: u32,
    pub rule_id: u32,
    pub rate_per_sec: u32,
    pub burst: u32,
}

/// `struct im_enforced_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EnforcedVal {
    pub enforced: u32,
}

/// `struct im_ct_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct im_ct_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CtVal {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub last_report_ns: u64,
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub policy_gen: u32,
    pub rule_id: u32,
    pub verdict: u8,
    pub flags: u8,
    /// Host veth each direction last left an instance from after a source
    /// check (0: none, or an ifindex above 65535); lets the programs skip
    /// the check's lookup on that flow's later packets.
    pub if_fwd: u16,
    pub if_rev: u16,
    pub pad: [u8; 2],
}

/// `struct im_inst_addr_val`: the address leased to an instance veth.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct InstAddrVal {
    /// Network order.
    pub addr: u32,
    /// `INST_*` bits.
    pub flags: u32,
}

/// `im_inst_addr_val.flags`: packets to this instance from other local
/// instances take the host's forwarding path instead of `bpf_redirect_peer`.
pub const INST_HOST_ROUTED: u32 = 1;

/// `struct im_rl_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RlKey {
    pub src_identity: u32,
    pub rule_id: u32,
}

/// `struct im_rl_val` (`lock` is a `struct bpf_spin_lock`, never copied to
/// user space).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RlVal {
    pub lock: u32,
    pub pad: u32,
    pub tokens_nano: u64,
    pub last_ns: u64,
}

/// `struct im_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Config {
    pub policy_gen: u32,
    pub report_interval_s: u32,
    pub ct_timeout_s: u32,
    pub ct_short_timeout_s: u32,
}

/// `struct im_svc_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// `struct im_svc_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SvcVal {
    pub service_id: u32,
    pub backend_count: u32,
}

/// `struct im_backend_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// `struct im_backend_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BackendVal {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct im_revnat_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RevnatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct im_revnat_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RevnatVal {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct im_flow_event`: one ring-buffer record.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowEventRaw {
    pub ts_ns: u64,
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub ifindex: u32,
    pub rule_id: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub verdict: u8,
    pub kind: u8,
    pub hook: u8,
}

impl FlowEventRaw {
    /// Reads a record from ring-buffer bytes; `None` if too short.
    pub fn from_bytes(b: &[u8]) -> Option<FlowEventRaw> {
        if b.len() < std::mem::size_of::<FlowEventRaw>() {
            return None;
        }
        // SAFETY: the length is checked; FlowEventRaw is plain integers, so
        // any bit pattern is valid; read_unaligned copes with alignment.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<FlowEventRaw>()) })
    }
}

pod!(
    IdentityVal,
    MeshNsVal,
    MeshAddr,
    MeshSockKey,
    PolicyKey,
    PolicyVal,
    EnforcedVal,
    CtKey,
    CtVal,
    InstAddrVal,
    RlKey,
    RlVal,
    Config,
    SvcKey,
    SvcVal,
    BackendKey,
    BackendVal,
    RevnatKey,
    RevnatVal,
    FlowEventRaw,
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::mem::{offset_of, size_of};

    /// What `c/layout.c` printed: (struct, field) -> (offset, size); field
    /// "-" is the struct itself.
    fn c_layout() -> BTreeMap<(String, String), (usize, usize)> {
        let text = include_str!(concat!(env!("OUT_DIR"), "/layout.txt"));
        text.lines()
            .filter(|l| !l.starts_with("const "))
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(w.len(), 4, "layout line {l:?}");
                (
                    (w[0].to_string(), w[1].to_string()),
                    (w[2].parse().expect("offset"), w[3].parse().expect("size")),
                )
            })
            .collect()
    }

    macro_rules! rust_layout {
        ($out:ident; $( $c:literal => $t:ty { $($f:ident),* } )*) => {
            $(
                $out.insert(($c.to_string(), "-".to_string()), (0, size_of::<$t>()));
                $(
                    let size = {
                        fn field_size<T>(_: impl Fn(&$t) -> &T) -> usize { size_of::<T>() }
                        field_size(|s: &$t| &s.$f)
                    };
                    $out.insert(($c.to_string(), stringify!($f).to_string()), (offset_of!($t, $f), size));
                )*
            )*
        };
    }

    #[test]
    fn rust_mirrors_match_the_c_header() {
        let mut r = BTreeMap::new();
        rust_layout!(r;
            "im_identity_val" => IdentityVal { identity, flags }
            "im_mesh_ns_val" => MeshNsVal { flags, pad }
            "im_mesh_addr" => MeshAddr { addr, port, pad }
            "im_mesh_sock_key" => MeshSockKey { netns, addr, port, pad }
            "im_policy_key" => PolicyKey { src_identity, dst_identity, dport, proto, dir }
            "im_policy_val" => PolicyVal { flags, rule_id, rate_per_sec, burst }
            "im_enforced_val" => EnforcedVal { enforced }
            "im_ct_key" => CtKey { saddr, daddr, sport, dport, proto, pad }
            "im_ct_val" => CtVal { created_ns, last_seen_ns, last_report_ns, packets_fwd,
                bytes_fwd, packets_rev, bytes_rev, src_identity, dst_identity, policy_gen,
                rule_id, verdict, flags, if_fwd, if_rev, pad }
            "im_inst_addr_val" => InstAddrVal { addr, flags }
            "im_rl_key" => RlKey { src_identity, rule_id }
            "im_rl_val" => RlVal { lock, pad, tokens_nano, last_ns }
            "im_config" => Config { policy_gen, report_interval_s, ct_timeout_s,
                ct_short_timeout_s }
            "im_svc_key" => SvcKey { vip, port, proto, pad }
            "im_svc_val" => SvcVal { service_id, backend_count }
            "im_backend_key" => BackendKey { service_id, slot }
            "im_backend_val" => BackendVal { addr, port, pad }
            "im_revnat_key" => RevnatKey { cookie, addr, port, pad }
            "im_revnat_val" => RevnatVal { vip, port, pad }
            "im_flow_event" => FlowEventRaw { ts_ns, packets_fwd, bytes_fwd, packets_rev,
                bytes_rev, saddr, daddr, src_identity, dst_identity, ifindex, rule_id, sport,
                dport, proto, verdict, kind, hook }
        );
        r.insert(
            ("IM_LAYOUT_VERSION".to_string(), "-".to_string()),
            (LAYOUT_VERSION as usize, 0),
        );
        let c = c_layout();
        for (k, v) in &c {
            assert_eq!(r.get(k), Some(v), "{k:?}: C says (offset, size) = {v:?}");
        }
        for k in r.keys() {
            assert!(c.contains_key(k), "{k:?} has no counterpart in c/layout.c");
        }
    }

    /// The `IM_` constants `c/layout.c` printed, by name.
    fn c_constants() -> BTreeMap<String, u64> {
        let text = include_str!(concat!(env!("OUT_DIR"), "/layout.txt"));
        text.lines()
            .filter_map(|l| l.strip_prefix("const "))
            .map(|l| {
                let (name, value) = l.split_once(' ').expect("const line");
                (name.to_string(), value.parse().expect("const value"))
            })
            .collect()
    }

    #[test]
    fn rust_constants_match_the_c_header() {
        // Conntrack flags are the programs' own: user space never sees them.
        const C_ONLY: &[&str] = &["IM_CT_DST_EVALUATED", "IM_CT_CLOSED"];
        let rust: BTreeMap<String, u64> = [
            ("IM_IDENTITY_UNKNOWN", IDENTITY_UNKNOWN as u64),
            ("IM_IDENTITY_ANY", IDENTITY_ANY as u64),
            ("IM_VERDICT_ALLOWED", VERDICT_ALLOWED as u64),
            ("IM_VERDICT_DENIED", VERDICT_DENIED as u64),
            ("IM_VERDICT_RATE_LIMITED", VERDICT_RATE_LIMITED as u64),
            ("IM_VERDICT_SPOOFED", VERDICT_SPOOFED as u64),
            ("IM_VERDICT_PLAINTEXT", VERDICT_PLAINTEXT as u64),
            ("IM_ID_MESH", ID_MESH as u64),
            ("IM_ID_STRICT", ID_STRICT as u64),
            ("IM_ID_REMOTE", ID_REMOTE as u64),
            ("IM_MESH_HBONE_PORT", MESH_HBONE_PORT as u64),
            ("IM_MESH_OUTBOUND_PORT", MESH_OUTBOUND_PORT as u64),
            ("IM_MARK_AGENT", MARK_AGENT as u64),
            ("IM_CNT_MESH_CAPTURED", CNT_MESH_CAPTURED as u64),
            ("IM_CNT_PLAINTEXT", CNT_PLAINTEXT as u64),
            ("IM_EVENT_NEW", EVENT_NEW as u64),
            ("IM_EVENT_VERDICT", EVENT_VERDICT as u64),
            ("IM_EVENT_REPORT", EVENT_REPORT as u64),
            ("IM_EVENT_CLOSE", EVENT_CLOSE as u64),
            ("IM_HOOK_FROM_INSTANCE", HOOK_FROM_INSTANCE as u64),
            ("IM_HOOK_TO_INSTANCE", HOOK_TO_INSTANCE as u64),
            ("IM_POLICY_ALLOW", POLICY_ALLOW as u64),
            ("IM_DIR_INGRESS", DIR_INGRESS as u64),
            ("IM_DIR_EGRESS", DIR_EGRESS as u64),
            ("IM_ENFORCE_INGRESS", ENFORCE_INGRESS as u64),
            ("IM_ENFORCE_EGRESS", ENFORCE_EGRESS as u64),
            ("IM_CNT_ALLOWED", CNT_ALLOWED as u64),
            ("IM_CNT_DENIED", CNT_DENIED as u64),
            ("IM_CNT_RATE_LIMITED", CNT_RATE_LIMITED as u64),
            ("IM_CNT_NEW_FLOWS", CNT_NEW_FLOWS as u64),
            ("IM_CNT_EVENTS_LOST", CNT_EVENTS_LOST as u64),
            ("IM_CNT_LB_REWRITES", CNT_LB_REWRITES as u64),
            ("IM_CNT_LB_NO_BACKEND", CNT_LB_NO_BACKEND as u64),
            ("IM_CNT_PEER_REDIRECTS", CNT_PEER_REDIRECTS as u64),
            ("IM_INST_HOST_ROUTED", INST_HOST_ROUTED as u64),
            ("IM_CNT_MAX", CNT_MAX as u64),
            ("IM_GUARD_SPOOFED", GUARD_SPOOFED as u64),
            ("IM_GUARD_ARP_SPOOFED", GUARD_ARP_SPOOFED as u64),
            ("IM_GUARD_NOT_IPV4", GUARD_NOT_IPV4 as u64),
            ("IM_GUARD_NO_ADDR", GUARD_NO_ADDR as u64),
            ("IM_GUARD_CT_FULL", GUARD_CT_FULL as u64),
            ("IM_GUARD_MAX", GUARD_MAX as u64),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        let mut c = c_constants();
        for n in C_ONLY {
            assert!(c.remove(*n).is_some(), "{n} missing from c/layout.c");
        }
        assert_eq!(rust, c, "Rust constants differ from ironmesh.h");
        // Every IM_ define of the header is printed by c/layout.c.
        let header = include_str!("../c/ironmesh.h");
        let defined = header
            .lines()
            .filter_map(|l| l.strip_prefix("#define IM_"))
            .filter(|l| !l.starts_with("LAYOUT_VERSION"))
            .count();
        assert_eq!(
            defined,
            rust.len() + C_ONLY.len(),
            "an IM_ define of ironmesh.h is not checked"
        );
    }

    #[test]
    fn every_struct_is_free_of_implicit_padding() {
        // Sum of field sizes equals struct size for every struct: keys are
        // hashed byte for byte by the kernel.
        let c = c_layout();
        let mut sums: BTreeMap<&str, usize> = BTreeMap::new();
        for ((s, f), (_, size)) in &c {
            if f != "-" {
                *sums.entry(s).or_default() += size;
            }
        }
        for ((s, f), (off, size)) in &c {
            if f == "-" && s != "IM_LAYOUT_VERSION" {
                assert_eq!(sums.get(s.as_str()), Some(size), "{s} has implicit padding");
                assert_eq!(*off, 0);
            }
        }
    }

    #[test]
    fn object_holds_every_program_and_map() {
        let obj = DATAPATH_OBJ;
        let has = |name: &str| obj.windows(name.len()).any(|w| w == name.as_bytes());
        for m in maps::ALL {
            assert!(has(m), "map {m} missing from the object");
        }
        for p in [
            programs::FROM_INSTANCE,
            programs::TO_INSTANCE,
            programs::CONNECT4,
            programs::SENDMSG4,
            programs::RECVMSG4,
            programs::GETPEERNAME4,
            programs::SOCKOPS,
        ] {
            assert!(has(p), "program {p} missing from the object");
        }
    }

    #[test]
    fn byte_order_helpers_round_trip() {
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(addr_from_be(addr_be(ip)), ip);
        assert_eq!(addr_be(ip).to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(port_from_be(port_be(8080)), 8080);
        assert_eq!(port_be(0x1234).to_ne_bytes(), [0x12, 0x34]);
    }
}
