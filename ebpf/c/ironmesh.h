/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Ironmesh datapath: map keys, map values and ring-buffer records shared by
 * the BPF programs (datapath.bpf.c) and the agent. Every struct here has a
 * #[repr(C)] mirror in ebpf/src/lib.rs, checked by a test against the
 * offsets the C compiler gives (c/layout.c).
 *
 * Conventions: addresses and ports are in network byte order, as the kernel
 * stores them; everything else is host order. Padding is explicit so that
 * no field is left uninitialised in keys.
 *
 * IM_LAYOUT_VERSION names the layout: the agent pins maps under a directory
 * that carries it, so a layout change never reuses an old map.
 */
#ifndef IRONMESH_H
#define IRONMESH_H

#include <linux/types.h>

#define IM_LAYOUT_VERSION 1

/* Identity of an address no entry names (outside the mesh, or not yet
 * known). Rules may name it as a source. */
#define IM_IDENTITY_UNKNOWN 0
/* In a policy key's peer side (src_identity of an ingress rule,
 * dst_identity of an egress rule): any peer, including addresses outside
 * the mesh. */
#define IM_IDENTITY_ANY 0xffffffffu

/* Verdicts (im_flow_event.verdict, im_ct_val.verdict). */
#define IM_VERDICT_ALLOWED 1
#define IM_VERDICT_DENIED 2
#define IM_VERDICT_RATE_LIMITED 3
#define IM_VERDICT_SPOOFED 4      /* source address not the one leased to the veth */
#define IM_VERDICT_PLAINTEXT 5    /* plaintext from off the node to a strict mesh instance */

/* Kinds of flow event. */
#define IM_EVENT_NEW 1            /* first packet of a flow */
#define IM_EVENT_VERDICT 2        /* the verdict of a known flow changed */
#define IM_EVENT_REPORT 3         /* periodic counters of a live flow */
#define IM_EVENT_CLOSE 4          /* FIN or RST seen; final counters */

/* Which hook saw the packet (im_flow_event.hook). */
#define IM_HOOK_FROM_INSTANCE 1   /* TC ingress of the host veth */
#define IM_HOOK_TO_INSTANCE 2     /* TC egress of the host veth */

/* im_policy_val.flags */
#define IM_POLICY_ALLOW 1

/* im_policy_key.dir: which side's policy a rule belongs to. Ingress is 0 so
 * that entries written before egress existed keep their meaning. */
#define IM_DIR_INGRESS 0          /* lets src into the enforced dst */
#define IM_DIR_EGRESS 1           /* lets the enforced src out to dst */

/* im_enforced_val.enforced: bit flags. 1 was the only value before egress
 * existed and still means ingress. */
#define IM_ENFORCE_INGRESS 1      /* default deny for incoming connections */
#define IM_ENFORCE_EGRESS 2       /* default deny for outgoing connections */

/* im_ct_val.flags */
#define IM_CT_DST_EVALUATED 1     /* destination policy was evaluated */
#define IM_CT_CLOSED 2            /* FIN or RST seen, close reported */

/* Indices of the per-CPU counters array. */
#define IM_CNT_ALLOWED 0          /* packets passed by the TC programs */
#define IM_CNT_DENIED 1           /* packets dropped by policy */
#define IM_CNT_RATE_LIMITED 2     /* new connections dropped by a rate limit */
#define IM_CNT_NEW_FLOWS 3        /* conntrack entries created */
#define IM_CNT_EVENTS_LOST 4      /* flow events the ring buffer had no room for */
#define IM_CNT_LB_REWRITES 5      /* socket addresses rewritten VIP -> backend */
#define IM_CNT_LB_NO_BACKEND 6    /* connects to a VIP with no backend (refused) */
#define IM_CNT_PEER_REDIRECTS 7   /* packets between local instances handed straight to the peer */
#define IM_CNT_MESH_CAPTURED 8    /* connects of meshed instances sent to their node proxy */
#define IM_CNT_PLAINTEXT 9        /* packets to strict mesh instances dropped as plaintext */
#define IM_CNT_MAX 10

/* Indices of the per-CPU im_guard_cnt array (a map of its own, so that
 * im_counters keeps its layout). */
#define IM_GUARD_SPOOFED 0        /* IPv4 from an instance whose source is not its lease */
#define IM_GUARD_ARP_SPOOFED 1    /* ARP from an instance whose sender is not its lease */
#define IM_GUARD_NOT_IPV4 2       /* frames from an instance neither IPv4 nor ARP (IPv6, ...) */
#define IM_GUARD_NO_ADDR 3        /* frames from a veth with no im_inst_addr entry */
#define IM_GUARD_CT_FULL 4        /* new flows of enforced identities denied: conntrack write failed */
#define IM_GUARD_MAX 8

/* ip_identity: address -> identity (hash on /32). */
struct im_identity_val {
	__u32 identity;
	__u32 flags;      /* IM_ID_* (was reserved: zero before the mesh) */
};

/* im_identity_val.flags */
#define IM_ID_MESH 1              /* a mesh instance (permissive or strict) */
#define IM_ID_STRICT 2            /* accepts off-node connections only through the proxy */
#define IM_ID_REMOTE 4            /* on another node: its connections go via the proxies */

/* The node proxy's ports: HBONE (mTLS) inbound in every mesh instance's
 * namespace, and the outbound listener on its loopback. */
#define IM_MESH_HBONE_PORT 15008
#define IM_MESH_OUTBOUND_PORT 15001
/* Sockets of the agent itself (probes) carry this SO_MARK; a strict
 * instance accepts them from the host. Setting a mark takes CAP_NET_ADMIN. */
#define IM_MARK_AGENT 0x1e3e0001

/* mesh_ns: network namespace cookie of a mesh instance -> flags. */
struct im_mesh_ns_val {
	__u32 flags;      /* IM_ID_* of the instance */
	__u32 pad;
};

/* mesh_orig (LRU): socket cookie -> the destination connect() asked for,
 * before it was sent to the outbound listener; copied to mesh_pending once
 * the socket has its local port, and kept for getpeername. */
struct im_mesh_addr {
	__u32 addr;       /* network order */
	__u16 port;       /* network order */
	__u16 pad;
};

/* mesh_pending (LRU) and mesh_peer (LRU): (netns cookie, address, port)
 * -> address. mesh_pending: the outbound listener's client (127.0.0.1,
 * its port) -> original destination. mesh_peer: the proxy's delivery
 * socket in the destination namespace -> the original client, which
 * getpeername/accept show the instance. */
struct im_mesh_sock_key {
	__u64 netns;
	__u32 addr;       /* network order */
	__u16 port;       /* network order */
	__u16 pad;
};

/* policy: (direction, src identity, dst identity, dst port, proto) ->
 * verdict. dport 0 means every port of proto; IM_IDENTITY_ANY on the peer
 * side means every peer. Lookups, most specific first: (peer, port), (peer,
 * any port), (any peer, port), (any peer, any port); the peer is the source
 * for ingress rules and the destination for egress rules. */
struct im_policy_key {
	__u32 src_identity;
	__u32 dst_identity;
	__u16 dport;      /* network order */
	__u8 proto;       /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP */
	__u8 dir;         /* IM_DIR_INGRESS, IM_DIR_EGRESS */
};

struct im_policy_val {
	__u32 flags;        /* IM_POLICY_ALLOW */
	__u32 rule_id;      /* names the rule in flow events and rate buckets */
	__u32 rate_per_sec; /* new connections per second per source identity; 0: no limit */
	__u32 burst;        /* bucket size; 0: same as rate_per_sec */
};

/* enforced: identity -> IM_ENFORCE_* flags of the directions a policy
 * selects it for (default deny in those directions). */
struct im_enforced_val {
	__u32 enforced;
};

/* conntrack (LRU hash), keyed in the direction of the first packet. */
struct im_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct im_ct_val {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 last_report_ns;
	__u64 packets_fwd;
	__u64 bytes_fwd;
	__u64 packets_rev;
	__u64 bytes_rev;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 policy_gen;   /* im_config.policy_gen when last evaluated */
	__u32 rule_id;      /* rule that allowed it, 0 if none */
	__u8 verdict;
	__u8 flags;         /* IM_CT_* */
	/* Host veth each direction was last seen leaving an instance from,
	 * after its source passed the anti-spoofing check (0: none yet, or an
	 * ifindex above 65535). A packet of the flow from that same veth
	 * carries the same source, so it skips the check's map lookup. */
	__u16 if_fwd;
	__u16 if_rev;
	__u8 pad[2];
};

/* inst_addr: ifindex of an instance's host veth -> the address leased to
 * that instance. Written before the TC programs attach, removed after they
 * detach: a packet from an instance whose source is not this address is
 * dropped (anti-spoofing), and a veth with no entry passes nothing. */
struct im_inst_addr_val {
	__u32 addr;       /* network order */
	__u32 flags;      /* IM_INST_* */
};

/* im_inst_addr_val.flags */
#define IM_INST_HOST_ROUTED 1     /* packets to this instance from local instances take the
				   * host's forwarding path, not bpf_redirect_peer */

/* rate_buckets: (src identity, rule) -> token bucket. */
struct im_rl_key {
	__u32 src_identity;
	__u32 rule_id;
};

struct im_rl_val {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 tokens_nano;  /* tokens * 1e9 */
	__u64 last_ns;
};

/* config (array, one entry). */
struct im_config {
	__u32 policy_gen;        /* bumped by the agent on every policy change */
	__u32 report_interval_s; /* periodic flow reports; 0: only on close */
	__u32 ct_timeout_s;      /* idle timeout of established flows */
	__u32 ct_short_timeout_s;/* idle timeout of closed, denied and UDP/ICMP flows */
};

/* services: (VIP, port, proto) -> service id and backend count. */
struct im_svc_key {
	__u32 vip;        /* network order */
	__u16 port;       /* network order */
	__u8 proto;
	__u8 pad;
};

struct im_svc_val {
	__u32 service_id;
	__u32 backend_count;
};

/* backends: (service id, slot < backend_count) -> backend address. */
struct im_backend_key {
	__u32 service_id;
	__u32 slot;
};

struct im_backend_val {
	__u32 addr;       /* network order */
	__u16 port;       /* network order */
	__u16 pad;
};

/* rev_nat (LRU hash): (socket cookie, backend) -> the VIP the socket asked
 * for; recvmsg4 and getpeername4 rewrite the backend back to it. */
struct im_revnat_key {
	__u64 cookie;
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct im_revnat_val {
	__u32 vip;
	__u16 port;
	__u16 pad;
};

/* Ring-buffer record. */
struct im_flow_event {
	__u64 ts_ns;
	__u64 packets_fwd;
	__u64 bytes_fwd;
	__u64 packets_rev;
	__u64 bytes_rev;
	__u32 saddr;
	__u32 daddr;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u32 rule_id;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 verdict;
	__u8 kind;
	__u8 hook;
};

#endif
