// SPDX-License-Identifier: GPL-2.0
/*
 * Ironmesh datapath programs (see docs/datapath.md):
 *
 * - im_from_inst (TC ingress of an instance's host veth: packets FROM the
 *   instance) and im_to_inst (TC egress of the host veth: packets INTO the
 *   instance): identity policy (ingress and egress) with conntrack,
 *   per-source rate limits on new connections, counters and flow events.
 * - im_connect4 / im_sendmsg4 (cgroup sock_addr): Service VIP:port ->
 *   backend, chosen in the kernel; im_recvmsg4 / im_getpeername4 map the
 *   backend back to the VIP for the application.
 *
 * Policy is data: the agent writes maps and bumps im_config.policy_gen;
 * programs are never reloaded for a policy change.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ironmesh.h"

#define NS_PER_SEC 1000000000ull
#define DEFAULT_CT_TIMEOUT_S 3600
#define DEFAULT_CT_SHORT_TIMEOUT_S 60
#define CT_CLOSED_TIMEOUT_S 10
#define MAX_RATE 1000000ull

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* The fixed part of an ARP header (linux/if_arp.h pulls in libc). */
struct im_arphdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
};

#ifndef AF_INET
#define AF_INET 2
#endif

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct im_identity_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_ip_identity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct im_policy_key);
	__type(value, struct im_policy_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct im_enforced_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_enforced SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct im_ct_key);
	__type(value, struct im_ct_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct im_rl_key);
	__type(value, struct im_rl_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_rate_bucket SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, IM_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct im_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_config SEC(".maps");

/* ifindex -> 1 for every host veth the agent attached (bytes of a flow
 * between two local instances are counted once, where they leave). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_local_ifs SEC(".maps");

/* ifindex of an instance's host veth -> its leased address: written before
 * the programs attach, removed after they detach (anti-spoofing). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct im_inst_addr_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_inst_addr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, IM_GUARD_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_guard_cnt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct im_svc_key);
	__type(value, struct im_svc_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct im_backend_key);
	__type(value, struct im_backend_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct im_revnat_key);
	__type(value, struct im_revnat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct im_mesh_ns_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_mesh_ns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct im_mesh_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_mesh_orig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct im_mesh_sock_key);
	__type(value, struct im_mesh_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_mesh_pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct im_mesh_sock_key);
	__type(value, struct im_mesh_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} im_mesh_peer SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&im_counters, &idx);

	if (c)
		*c += 1;
}

static __always_inline void count_guard(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&im_guard_cnt, &idx);

	if (c)
		*c += 1;
}

/* ---- packet parsing ---------------------------------------------------- */

struct pkt {
	struct im_ct_key key; /* as seen in this packet */
	__u32 len;
	__u8 tcp_flags;
	__u8 l4_ok;           /* ports were read */
};

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u8 *l4;

	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return -1;
	if (ip->ihl < 5)
		return -1;

	__builtin_memset(p, 0, sizeof(*p));
	p->key.saddr = ip->saddr;
	p->key.daddr = ip->daddr;
	p->key.proto = ip->protocol;
	p->len = skb->len;
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0; /* later fragment: no ports; tracked by addresses */

	l4 = (__u8 *)ip + ip->ihl * 4;
	switch (ip->protocol) {
	case IPPROTO_TCP:
		if ((void *)(l4 + 14) > end)
			return 0;
		p->key.sport = *(__u16 *)l4;
		p->key.dport = *(__u16 *)(l4 + 2);
		p->tcp_flags = l4[13];
		p->l4_ok = 1;
		break;
	case IPPROTO_UDP:
		if ((void *)(l4 + 4) > end)
			return 0;
		p->key.sport = *(__u16 *)l4;
		p->key.dport = *(__u16 *)(l4 + 2);
		p->l4_ok = 1;
		break;
	case IPPROTO_ICMP:
		/* echo request (8) and reply (0): the identifier names the
		 * flow in both directions */
		if ((void *)(l4 + 6) > end)
			return 0;
		if (l4[0] == 8 || l4[0] == 0) {
			p->key.sport = *(__u16 *)(l4 + 4);
			p->key.dport = p->key.sport;
		}
		p->l4_ok = 1;
		break;
	default:
		break;
	}
	return 0;
}

/* ---- policy ------------------------------------------------------------ */

static __always_inline __u32 identity_of(__u32 addr)
{
	struct im_identity_val *v = bpf_map_lookup_elem(&im_ip_identity, &addr);

	return v ? v->identity : IM_IDENTITY_UNKNOWN;
}

static __always_inline __u32 mesh_flags_of(__u32 addr)
{
	struct im_identity_val *v = bpf_map_lookup_elem(&im_ip_identity, &addr);

	return v ? v->flags : 0;
}

/* The mesh's say on a flow, before policy: the HBONE port of a mesh
 * instance is the proxies' (the destination proxy judges the flow by the
 * certificate's identity, so the address policy does not); plaintext into
 * a strict instance from off the node or from the host is dropped (local
 * instances never get here: their packets returned early). 0: no say. */
static __always_inline __u8 mesh_verdict(struct __sk_buff *skb, const struct pkt *p, __u8 hook)
{
	__u32 f = mesh_flags_of(p->key.daddr);

	if (!(f & IM_ID_MESH))
		return 0;
	if (p->key.proto == IPPROTO_TCP && p->key.dport == bpf_htons(IM_MESH_HBONE_PORT))
		return IM_VERDICT_ALLOWED;
	if (hook == IM_HOOK_TO_INSTANCE && (f & IM_ID_STRICT) && skb->mark != IM_MARK_AGENT)
		return IM_VERDICT_PLAINTEXT;
	return 0;
}

/* The rule of direction dir for (src, dst, dport, proto), most specific
 * first; the peer (source of an ingress rule, destination of an egress
 * rule) may be IM_IDENTITY_ANY, the port 0. */
static __always_inline struct im_policy_val *policy_lookup(__u8 dir, __u32 src, __u32 dst,
							   __u16 dport, __u8 proto)
{
	struct im_policy_key k;
	struct im_policy_val *v;

	__builtin_memset(&k, 0, sizeof(k));
	k.src_identity = src;
	k.dst_identity = dst;
	k.dport = dport;
	k.proto = proto;
	k.dir = dir;
	v = bpf_map_lookup_elem(&im_policy, &k);
	if (v)
		return v;
	k.dport = 0;
	v = bpf_map_lookup_elem(&im_policy, &k);
	if (v)
		return v;
	if (dir == IM_DIR_EGRESS)
		k.dst_identity = IM_IDENTITY_ANY;
	else
		k.src_identity = IM_IDENTITY_ANY;
	k.dport = dport;
	v = bpf_map_lookup_elem(&im_policy, &k);
	if (v)
		return v;
	k.dport = 0;
	return bpf_map_lookup_elem(&im_policy, &k);
}

static __always_inline __u32 enforced_flags(__u32 identity)
{
	struct im_enforced_val *e = bpf_map_lookup_elem(&im_enforced, &identity);

	return e ? e->enforced : 0;
}

/* Takes one token from the bucket of (src, rule); 1 if there was one. */
static __always_inline int take_token(__u32 src, struct im_policy_val *pv, __u64 now)
{
	struct im_rl_key k = { .src_identity = src, .rule_id = pv->rule_id };
	__u64 rate = pv->rate_per_sec;
	__u64 burst = pv->burst ? pv->burst : pv->rate_per_sec;
	struct im_rl_val *b;
	__u64 cap, tokens;
	int ok = 0;

	if (rate > MAX_RATE)
		rate = MAX_RATE;
	if (burst > MAX_RATE)
		burst = MAX_RATE;
	cap = burst * NS_PER_SEC;

	b = bpf_map_lookup_elem(&im_rate_bucket, &k);
	if (!b) {
		struct im_rl_val init;

		__builtin_memset(&init, 0, sizeof(init));
		init.tokens_nano = cap - NS_PER_SEC;
		init.last_ns = now;
		bpf_map_update_elem(&im_rate_bucket, &k, &init, BPF_NOEXIST);
		return 1;
	}

	bpf_spin_lock(&b->lock);
	tokens = b->tokens_nano;
	if (now > b->last_ns) {
		__u64 elapsed = now - b->last_ns;

		if (elapsed > 60 * NS_PER_SEC)
			elapsed = 60 * NS_PER_SEC;
		tokens += elapsed * rate;
		if (tokens > cap)
			tokens = cap;
		b->last_ns = now;
	}
	if (tokens >= NS_PER_SEC) {
		tokens -= NS_PER_SEC;
		ok = 1;
	}
	b->tokens_nano = tokens;
	bpf_spin_unlock(&b->lock);
	return ok;
}

/* The verdict for a packet of a flow from src to dst: it must be allowed
 * by dst's ingress rules if dst is enforced for ingress, and by src's
 * egress rules if src is enforced for egress. Every hook computes the same
 * answer from the same maps, so it does not matter which one judges a flow
 * first. new_conn: the packet opens a connection (TCP SYN; first packet
 * otherwise), so rate limits apply. */
static __always_inline __u8 evaluate(__u32 src, __u32 dst, struct pkt *p, int new_conn,
				     __u64 now, __u32 *rule_id)
{
	struct im_policy_val *in = 0, *out = 0;
	__u16 dport;

	*rule_id = 0;
	dport = p->key.proto == IPPROTO_ICMP ? 0 : p->key.dport;
	if (enforced_flags(dst) & IM_ENFORCE_INGRESS) {
		in = policy_lookup(IM_DIR_INGRESS, src, dst, dport, p->key.proto);
		if (!in || !(in->flags & IM_POLICY_ALLOW))
			return IM_VERDICT_DENIED;
	}
	if (enforced_flags(src) & IM_ENFORCE_EGRESS) {
		out = policy_lookup(IM_DIR_EGRESS, src, dst, dport, p->key.proto);
		if (!out || !(out->flags & IM_POLICY_ALLOW))
			return IM_VERDICT_DENIED;
	}
	/* The destination's rule names the flow when both sides allow it. */
	if (out)
		*rule_id = out->rule_id;
	if (in)
		*rule_id = in->rule_id;
	if (new_conn && in && in->rate_per_sec && !take_token(src, in, now))
		return IM_VERDICT_RATE_LIMITED;
	if (new_conn && out && out->rate_per_sec && !take_token(src, out, now))
		return IM_VERDICT_RATE_LIMITED;
	return IM_VERDICT_ALLOWED;
}

/* ---- conntrack and events ---------------------------------------------- */

static __always_inline void emit(const struct im_ct_key *k, const struct im_ct_val *ct, __u8 kind,
				 __u8 hook, __u32 ifindex, __u64 now)
{
	struct im_flow_event *e = bpf_ringbuf_reserve(&im_flows, sizeof(*e), 0);

	if (!e) {
		count(IM_CNT_EVENTS_LOST);
		return;
	}
	e->ts_ns = now;
	e->packets_fwd = ct->packets_fwd;
	e->bytes_fwd = ct->bytes_fwd;
	e->packets_rev = ct->packets_rev;
	e->bytes_rev = ct->bytes_rev;
	e->saddr = k->saddr;
	e->daddr = k->daddr;
	e->src_identity = ct->src_identity;
	e->dst_identity = ct->dst_identity;
	e->ifindex = ifindex;
	e->rule_id = ct->rule_id;
	e->sport = k->sport;
	e->dport = k->dport;
	e->proto = k->proto;
	e->verdict = ct->verdict;
	e->kind = kind;
	e->hook = hook;
	bpf_ringbuf_submit(e, 0);
}

/* With the coarse clock most packets of a busy flow see the same time:
 * skip the store (and the cache-line dirtying) then. */
static __always_inline void touch(struct im_ct_val *ct, __u64 now)
{
	if (ct->last_seen_ns != now)
		ct->last_seen_ns = now;
}

static __always_inline int expired(const struct im_ct_val *ct, __u8 proto,
				   const struct im_config *cfg, __u64 now)
{
	__u64 timeout;

	if (ct->flags & IM_CT_CLOSED)
		timeout = CT_CLOSED_TIMEOUT_S;
	else if (ct->verdict == IM_VERDICT_ALLOWED && proto == IPPROTO_TCP)
		timeout = cfg && cfg->ct_timeout_s ? cfg->ct_timeout_s : DEFAULT_CT_TIMEOUT_S;
	else
		timeout = cfg && cfg->ct_short_timeout_s ? cfg->ct_short_timeout_s
							 : DEFAULT_CT_SHORT_TIMEOUT_S;
	return now > ct->last_seen_ns && now - ct->last_seen_ns > timeout * NS_PER_SEC;
}

/* Plain adds, not atomics: a flow's packets are almost always handled on
 * one CPU at a time, and a rarely lost increment in a telemetry counter is
 * cheaper than a locked instruction on every packet. */
static __always_inline void account(struct im_ct_val *ct, int rev, __u32 len, __u64 now)
{
	if (rev) {
		ct->packets_rev += 1;
		ct->bytes_rev += len;
	} else {
		ct->packets_fwd += 1;
		ct->bytes_fwd += len;
	}
	touch(ct, now);
}

/* A packet from an instance that claims a source other than its lease. The
 * event names the real sender (its leased address) as the source; rule_id
 * carries the address the packet claimed. */
static __always_inline void emit_spoofed(struct __sk_buff *skb, struct pkt *p, __u32 leased,
					 __u64 now)
{
	struct im_ct_key k = p->key;
	struct im_ct_val v;

	__builtin_memset(&v, 0, sizeof(v));
	k.saddr = leased;
	v.src_identity = identity_of(leased);
	v.dst_identity = identity_of(p->key.daddr);
	v.verdict = IM_VERDICT_SPOOFED;
	v.rule_id = p->key.saddr;
	v.packets_fwd = 1;
	v.bytes_fwd = p->len;
	emit(&k, &v, IM_EVENT_NEW, IM_HOOK_FROM_INSTANCE, skb->ifindex, now);
}

/* Anti-spoofing on a frame leaving an instance: IPv4 must carry the
 * instance's leased source, ARP its leased sender (or 0.0.0.0, a probe);
 * anything else (IPv6, other ethertypes) is dropped, as is everything
 * from a veth the agent did not record an address for. Returns -1 to
 * drop, 1 for ARP that may pass, 0 for IPv4 to judge on. */
static __always_inline int guard(struct __sk_buff *skb, struct pkt *p, __u32 *leased)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 idx = skb->ifindex;
	struct im_inst_addr_val *a = bpf_map_lookup_elem(&im_inst_addr, &idx);

	if (!a) {
		count_guard(IM_GUARD_NO_ADDR);
		return -1;
	}
	*leased = a->addr;
	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct im_arphdr *arp = (void *)(eth + 1);
		__u8 *sip = (__u8 *)(arp + 1) + ETH_ALEN;
		__u32 sender;

		if ((void *)(sip + 4) > end || arp->ar_pro != bpf_htons(ETH_P_IP) ||
		    arp->ar_hln != ETH_ALEN || arp->ar_pln != 4) {
			count_guard(IM_GUARD_ARP_SPOOFED);
			return -1;
		}
		__builtin_memcpy(&sender, sip, 4);
		if (sender != a->addr && sender != 0) {
			count_guard(IM_GUARD_ARP_SPOOFED);
			return -1;
		}
		return 1;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		count_guard(IM_GUARD_NOT_IPV4);
		return -1;
	}
	if (parse(skb, p) < 0) {
		count_guard(IM_GUARD_NOT_IPV4);
		return -1;
	}
	if (p->key.saddr != a->addr) {
		count_guard(IM_GUARD_SPOOFED);
		emit_spoofed(skb, p, a->addr, bpf_ktime_get_coarse_ns());
		return -1;
	}
	return 0;
}

/* The veth a conntrack entry remembers as a direction's sender, if this
 * packet came from it; see struct im_ct_val. */
static __always_inline int same_sender(const struct im_ct_val *ct, int rev, __u32 ifindex)
{
	__u16 known = rev ? ct->if_rev : ct->if_fwd;

	return known != 0 && ifindex <= 0xffff && known == ifindex;
}

static __always_inline void remember_sender(struct im_ct_val *ct, int rev, __u32 ifindex)
{
	__u16 v = ifindex <= 0xffff ? (__u16)ifindex : 0;

	if (rev) {
		if (ct->if_rev != v)
			ct->if_rev = v;
	} else if (ct->if_fwd != v) {
		ct->if_fwd = v;
	}
}

/* ---- delivery between local instances ---------------------------------- */

/* An IPv4 packet of an established flow allowed out of an instance: when
 * the flow's other direction came out of another local instance's veth
 * (peer_if, from the conntrack entry) and the host's routing agrees, hand
 * it to that instance's eth0 at once (bpf_redirect_peer), doing what the
 * host's forwarding would (TTL, MAC addresses from the host's neighbour
 * table) but skipping the forward path, the second veth's egress and its
 * backlog queue. Anything else (a flow's first packets, remote, the host
 * itself, no neighbour entry, TTL about to expire, an instance marked
 * IM_INST_HOST_ROUTED) continues as before. The destination's policy was
 * judged with the source's, by this program. */
static __always_inline int deliver(struct __sk_buff *skb, const struct pkt *p, __u16 peer_if)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct bpf_fib_lookup fib;
	struct im_inst_addr_val *to;
	__u8 macs[2 * ETH_ALEN];
	__u16 old_word, new_word;
	__u32 idx;

	/* Only a flow whose other direction left a local instance's veth
	 * (and passed its source check there) can be local: everything
	 * else, traffic to other nodes above all, pays nothing more. */
	if (peer_if == 0)
		return TC_ACT_OK;
	idx = peer_if;
	to = bpf_map_lookup_elem(&im_inst_addr, &idx);
	if (!to || to->addr != p->key.daddr || (to->flags & IM_INST_HOST_ROUTED))
		return TC_ACT_OK;
	if ((void *)(ip + 1) > end || ip->ttl <= 1)
		return TC_ACT_OK; /* the kernel sends time exceeded */
	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.sport = p->key.sport;
	fib.dport = p->key.dport;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ifindex;
	/* TTL and protocol share a 16-bit word of the header checksum. */
	__builtin_memcpy(&old_word, &ip->ttl, sizeof(old_word));
	/* tot_len 0: the helper checks this skb (GSO included) against the
	 * egress MTU itself. */
	/* The host's routes must agree (and its neighbour table gives the
	 * MAC addresses). */
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS ||
	    fib.ifindex != idx)
		return TC_ACT_OK;

	new_word = bpf_htons(bpf_ntohs(old_word) - 0x0100);
	if (bpf_l3_csum_replace(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, check), old_word, new_word,
				sizeof(new_word)) < 0)
		return TC_ACT_OK; /* nothing written */
	__builtin_memcpy(macs, fib.dmac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, fib.smac, ETH_ALEN);
	/* From here a failure leaves a half-rewritten packet: drop it. */
	if (bpf_skb_store_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, ttl), &new_word,
				sizeof(new_word), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
		return TC_ACT_SHOT;
	count(IM_CNT_PEER_REDIRECTS);
	return bpf_redirect_peer(idx, 0);
}

static __always_inline int handle(struct __sk_buff *skb, __u8 hook)
{
	__u32 zero = 0;
	struct im_config *cfg = bpf_map_lookup_elem(&im_config, &zero);
	__u32 gen = cfg ? cfg->policy_gen : 0;
	struct im_ct_key rk;
	struct im_ct_val *ct;
	struct pkt p;
	int rev = 0, syn;
	__u64 now;

	/* Into an instance from another local instance: the program on that
	 * instance's veth already judged this packet against both ends'
	 * policy (the conntrack map is shared) and counted it; judging it
	 * again would only cost time. The agent lists a veth here only while
	 * its programs are attached. */
	if (hook == IM_HOOK_TO_INSTANCE) {
		__u32 iif = skb->ingress_ifindex;

		if (bpf_map_lookup_elem(&im_local_ifs, &iif))
			return TC_ACT_OK;
	}

	/* Out of an instance, IPv4 is parsed here and its source checked
	 * after the conntrack lookup (an entry may vouch for it); ARP and
	 * everything else go through the whole guard now. */
	int source_checked = 0;

	if (hook == IM_HOOK_FROM_INSTANCE) {
		if (parse(skb, &p) < 0) {
			__u32 leased = 0;
			int g = guard(skb, &p, &leased);

			if (g < 0)
				return TC_ACT_SHOT;
			if (g > 0)
				return TC_ACT_OK; /* ARP with the instance's own sender */
			source_checked = 1;
		}
	} else if (parse(skb, &p) < 0) {
		return TC_ACT_OK; /* into the instance, not IPv4: the host sent it */
	}
	/* The coarse clock (tick resolution) is plenty for idle timeouts,
	 * token buckets and report intervals, and cheaper per packet. */
	now = bpf_ktime_get_coarse_ns();

	__builtin_memset(&rk, 0, sizeof(rk));
	rk.saddr = p.key.daddr;
	rk.daddr = p.key.saddr;
	rk.sport = p.key.dport;
	rk.dport = p.key.sport;
	rk.proto = p.key.proto;

	/* A packet from the lower port is most likely a server's reply
	 * (services listen on low ports, clients use ephemeral ones): look for
	 * the reverse entry first then, saving a miss on most replies. Either
	 * order finds the same entry. */
	/* A TCP SYN without ACK opens a connection: it is never a reply,
	 * whatever entry its reverse matches (a spoofed or stale entry must
	 * not carry a new connection past the destination's policy). */
	syn = p.key.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	if (p.key.sport < p.key.dport && !(p.tcp_flags & TCP_SYN)) {
		ct = bpf_map_lookup_elem(&im_conntrack, &rk);
		if (ct)
			rev = 1;
		else
			ct = bpf_map_lookup_elem(&im_conntrack, &p.key);
	} else {
		ct = bpf_map_lookup_elem(&im_conntrack, &p.key);
		if (!ct && !syn) {
			ct = bpf_map_lookup_elem(&im_conntrack, &rk);
			if (ct)
				rev = 1;
		}
	}
	/* The anti-spoofing check, before anything this packet could change:
	 * skipped only when the entry saw this direction leave this very veth
	 * after a check (same veth, same 5-tuple: the same source). */
	if (hook == IM_HOOK_FROM_INSTANCE && !source_checked) {
		if (!ct || !same_sender(ct, rev, skb->ifindex)) {
			__u32 leased = 0;

			if (guard(skb, &p, &leased) != 0)
				return TC_ACT_SHOT;
			if (ct)
				remember_sender(ct, rev, skb->ifindex);
		}
	}

	if (ct) {
		int reopen = !rev && p.key.proto == IPPROTO_TCP &&
			     (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN &&
			     (ct->flags & IM_CT_CLOSED);

		if (reopen || expired(ct, p.key.proto, cfg, now)) {
			bpf_map_delete_elem(&im_conntrack, rev ? &rk : &p.key);
			ct = NULL;
			rev = 0;
		}
	}

	if (!ct) {
		/* A new flow: judge it, report it, and remember it only if it
		 * was allowed (what is refused leaves no entry a later packet
		 * could pass as the reply of). */
		struct im_ct_val nv;
		__u32 rule_id;

		__builtin_memset(&nv, 0, sizeof(nv));
		nv.src_identity = identity_of(p.key.saddr);
		nv.dst_identity = identity_of(p.key.daddr);
		nv.verdict = mesh_verdict(skb, &p, hook);
		rule_id = 0;
		if (!nv.verdict)
			nv.verdict = evaluate(nv.src_identity, nv.dst_identity, &p, 1, now, &rule_id);
		nv.rule_id = rule_id;
		nv.policy_gen = gen;
		nv.flags = IM_CT_DST_EVALUATED;
		nv.created_ns = now;
		nv.last_seen_ns = now;
		nv.last_report_ns = now;
		nv.packets_fwd = 1;
		nv.bytes_fwd = p.len;
		if (hook == IM_HOOK_FROM_INSTANCE)
			remember_sender(&nv, 0, skb->ifindex);
		if (nv.verdict == IM_VERDICT_ALLOWED &&
		    bpf_map_update_elem(&im_conntrack, &p.key, &nv, BPF_ANY) != 0 &&
		    (enforced_flags(nv.src_identity) | enforced_flags(nv.dst_identity))) {
			/* No room to track it: an enforced identity's flow is
			 * refused rather than let through unjudged later. */
			nv.verdict = IM_VERDICT_DENIED;
			count_guard(IM_GUARD_CT_FULL);
		} else if (nv.verdict == IM_VERDICT_ALLOWED) {
			count(IM_CNT_NEW_FLOWS);
		}
		emit(&p.key, &nv, IM_EVENT_NEW, hook, skb->ifindex, now);
		if (nv.verdict == IM_VERDICT_ALLOWED) {
			count(IM_CNT_ALLOWED);
			return TC_ACT_OK; /* a new flow's first packet: the host routes it */
		}
		count(nv.verdict == IM_VERDICT_RATE_LIMITED ? IM_CNT_RATE_LIMITED
			  : nv.verdict == IM_VERDICT_PLAINTEXT  ? IM_CNT_PLAINTEXT
								: IM_CNT_DENIED);
		return TC_ACT_SHOT;
	}

	if (rev) {
		/* A reply: passes if the connection it answers was allowed. */
		if (ct->verdict != IM_VERDICT_ALLOWED) {
			count(IM_CNT_DENIED);
			return TC_ACT_SHOT;
		}
	} else if (ct->policy_gen != gen || ct->verdict != IM_VERDICT_ALLOWED) {
		/* Policy changed since this flow was judged, or it was refused:
		 * judge it again. */
		__u32 rule_id;
		__u32 src = identity_of(p.key.saddr);
		__u32 dst = identity_of(p.key.daddr);
		int new_conn = p.key.proto == IPPROTO_TCP
				       ? (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN
				       : ct->verdict != IM_VERDICT_ALLOWED;
		__u8 v = mesh_verdict(skb, &p, hook);

		rule_id = 0;
		if (!v)
			v = evaluate(src, dst, &p, new_conn, now, &rule_id);

		ct->src_identity = src;
		ct->dst_identity = dst;
		ct->rule_id = rule_id;
		ct->policy_gen = gen;
		if (v != ct->verdict) {
			ct->verdict = v;
			emit(&p.key, ct, IM_EVENT_VERDICT, hook, skb->ifindex, now);
		}
		if (v != IM_VERDICT_ALLOWED) {
			ct->last_seen_ns = now;
			count(v == IM_VERDICT_RATE_LIMITED ? IM_CNT_RATE_LIMITED
			      : v == IM_VERDICT_PLAINTEXT  ? IM_CNT_PLAINTEXT
							   : IM_CNT_DENIED);
			return TC_ACT_SHOT;
		}
	}

	account(ct, rev, p.len, now);

	{
		const struct im_ct_key *k = rev ? &rk : &p.key;

		if (p.key.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FIN | TCP_RST)) &&
		    !(ct->flags & IM_CT_CLOSED)) {
			ct->flags |= IM_CT_CLOSED;
			emit(k, ct, IM_EVENT_CLOSE, hook, skb->ifindex, now);
		} else if (cfg && cfg->report_interval_s &&
			   now - ct->last_report_ns > (__u64)cfg->report_interval_s * NS_PER_SEC) {
			ct->last_report_ns = now;
			emit(k, ct, IM_EVENT_REPORT, hook, skb->ifindex, now);
		}
	}
	count(IM_CNT_ALLOWED);
	return hook == IM_HOOK_FROM_INSTANCE ? deliver(skb, &p, rev ? ct->if_fwd : ct->if_rev)
					     : TC_ACT_OK;
}

SEC("classifier")
int im_from_inst(struct __sk_buff *skb)
{
	return handle(skb, IM_HOOK_FROM_INSTANCE);
}

SEC("classifier")
int im_to_inst(struct __sk_buff *skb)
{
	return handle(skb, IM_HOOK_TO_INSTANCE);
}

/* ---- Service load balancing at the socket ------------------------------ */

/* Rewrites ctx's VIP:port to a backend. sticky: choose by socket cookie
 * (unconnected UDP: every datagram of a socket to the same backend);
 * otherwise at random. Returns 0 to refuse (VIP without backend). */
static __always_inline int lb4(struct bpf_sock_addr *ctx, int sticky)
{
	struct im_svc_key k;
	struct im_svc_val *s;
	struct im_backend_key bk;
	struct im_backend_val *b;
	struct im_revnat_key rk;
	struct im_revnat_val rv;
	__u64 cookie;
	__u32 n;

	if (ctx->type != SOCK_STREAM && ctx->type != SOCK_DGRAM)
		return 1;
	__builtin_memset(&k, 0, sizeof(k));
	k.vip = ctx->user_ip4;
	k.port = (__u16)ctx->user_port;
	k.proto = ctx->type == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP;
	s = bpf_map_lookup_elem(&im_services, &k);
	if (!s)
		return 1;
	n = s->backend_count;
	if (n == 0) {
		count(IM_CNT_LB_NO_BACKEND);
		return 0;
	}
	cookie = bpf_get_socket_cookie(ctx);
	__builtin_memset(&bk, 0, sizeof(bk));
	bk.service_id = s->service_id;
	bk.slot = (sticky ? (__u32)cookie : bpf_get_prandom_u32()) % n;
	b = bpf_map_lookup_elem(&im_backends, &bk);
	if (!b) {
		count(IM_CNT_LB_NO_BACKEND);
		return 0;
	}

	__builtin_memset(&rk, 0, sizeof(rk));
	rk.cookie = cookie;
	rk.addr = b->addr;
	rk.port = b->port;
	__builtin_memset(&rv, 0, sizeof(rv));
	rv.vip = k.vip;
	rv.port = k.port;
	bpf_map_update_elem(&im_revnat, &rk, &rv, BPF_ANY);

	ctx->user_ip4 = b->addr;
	ctx->user_port = b->port;
	count(IM_CNT_LB_REWRITES);
	return 1;
}

/* Backend address -> the VIP this socket asked for. */
static __always_inline void revnat4(struct bpf_sock_addr *ctx)
{
	struct im_revnat_key rk;
	struct im_revnat_val *rv;

	__builtin_memset(&rk, 0, sizeof(rk));
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = (__u16)ctx->user_port;
	rv = bpf_map_lookup_elem(&im_revnat, &rk);
	if (rv) {
		ctx->user_ip4 = rv->vip;
		ctx->user_port = rv->port;
	}
}

/* ---- Mesh capture at the socket --------------------------------------- */

/* A TCP connect from a mesh instance's namespace to a mesh instance on
 * another node goes to the outbound listener the agent's proxy holds in
 * that same namespace (so the source's identity is the namespace's, never
 * an address); the original destination waits under the socket's cookie
 * until sockops sees its local port. The proxy's own connections go to the
 * HBONE port and are left alone. */
static __always_inline void mesh_capture4(struct bpf_sock_addr *ctx)
{
	struct im_mesh_ns_val *ns;
	struct im_mesh_addr orig;
	__u64 netns, cookie;

	if (ctx->type != SOCK_STREAM)
		return;
	if (ctx->user_port == bpf_htons(IM_MESH_HBONE_PORT))
		return;
	netns = bpf_get_netns_cookie(ctx);
	ns = bpf_map_lookup_elem(&im_mesh_ns, &netns);
	if (!ns)
		return;
	if ((mesh_flags_of(ctx->user_ip4) & (IM_ID_MESH | IM_ID_REMOTE)) !=
	    (IM_ID_MESH | IM_ID_REMOTE))
		return;
	cookie = bpf_get_socket_cookie(ctx);
	__builtin_memset(&orig, 0, sizeof(orig));
	orig.addr = ctx->user_ip4;
	orig.port = (__u16)ctx->user_port;
	if (bpf_map_update_elem(&im_mesh_orig, &cookie, &orig, BPF_ANY) != 0)
		return; /* not captured: strict peers drop it, never a silent bypass of policy */
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(IM_MESH_OUTBOUND_PORT);
	count(IM_CNT_MESH_CAPTURED);
}

SEC("cgroup/connect4")
int im_connect4(struct bpf_sock_addr *ctx)
{
	if (!lb4(ctx, 0))
		return 0;
	mesh_capture4(ctx);
	return 1;
}

/* The local port of a captured socket is known once TCP connects: file
 * the original destination under (namespace, 127.0.0.1, port), where the
 * outbound listener finds it as its client's address. */
SEC("sockops")
int im_sockops(struct bpf_sock_ops *skops)
{
	struct im_mesh_sock_key k;
	struct im_mesh_addr *orig;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	orig = bpf_map_lookup_elem(&im_mesh_orig, &cookie);
	if (!orig)
		return 1;
	__builtin_memset(&k, 0, sizeof(k));
	k.netns = bpf_get_netns_cookie(skops);
	k.addr = skops->local_ip4;
	k.port = bpf_htons((__u16)skops->local_port);
	bpf_map_update_elem(&im_mesh_pending, &k, orig, BPF_ANY);
	/* The cookie's entry stays (LRU): getpeername answers from it. */
	return 1;
}

SEC("cgroup/sendmsg4")
int im_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb4(ctx, 1);
}

SEC("cgroup/recvmsg4")
int im_recvmsg4(struct bpf_sock_addr *ctx)
{
	revnat4(ctx);
	return 1;
}

/* accept() and getpeername() of an instance's socket whose peer is the
 * proxy delivering a mesh connection: the original client instead. */
static __always_inline void mesh_peer4(struct bpf_sock_addr *ctx)
{
	struct im_mesh_sock_key k;
	struct im_mesh_addr *orig;

	__builtin_memset(&k, 0, sizeof(k));
	k.netns = bpf_get_netns_cookie(ctx);
	k.addr = ctx->user_ip4;
	k.port = (__u16)ctx->user_port;
	orig = bpf_map_lookup_elem(&im_mesh_peer, &k);
	if (orig) {
		ctx->user_ip4 = orig->addr;
		ctx->user_port = orig->port;
	}
}

/* A captured socket's peer is the outbound listener: show the address it
 * connected to instead (then the VIP, if it asked for one). */
static __always_inline void mesh_captured_peer4(struct bpf_sock_addr *ctx)
{
	struct im_mesh_addr *orig;
	__u64 cookie;

	if (ctx->user_ip4 != bpf_htonl(0x7f000001) ||
	    ctx->user_port != bpf_htons(IM_MESH_OUTBOUND_PORT))
		return;
	cookie = bpf_get_socket_cookie(ctx);
	orig = bpf_map_lookup_elem(&im_mesh_orig, &cookie);
	if (orig) {
		ctx->user_ip4 = orig->addr;
		ctx->user_port = orig->port;
	}
}

SEC("cgroup/getpeername4")
int im_getpeername4(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM)
		mesh_captured_peer4(ctx);
	revnat4(ctx);
	if (ctx->type == SOCK_STREAM)
		mesh_peer4(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
