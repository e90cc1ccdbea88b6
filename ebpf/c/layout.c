/* Host program run by build.rs: prints the size of every struct in
 * ironmesh.h and the offset and size of each field, one line each:
 *   <struct> <field|-> <offset> <size>
 * and every IM_ constant of the header, one line each:
 *   const <NAME> <value>
 * ebpf/src/lib.rs compares them with its #[repr(C)] mirrors and consts. The BPF target
 * and x86_64 lay out these types alike (LP64, natural alignment). */
#include <stddef.h>
#include <stdio.h>
#include <linux/bpf.h>

#include "ironmesh.h"

#define S(t) printf("%s - 0 %zu\n", #t, sizeof(struct t))
#define K(n) printf("const %s %llu\n", #n, (unsigned long long)(n))
#define F(t, f) printf("%s %s %zu %zu\n", #t, #f, offsetof(struct t, f), sizeof(((struct t *)0)->f))

int main(void)
{
	S(im_identity_val); F(im_identity_val, identity); F(im_identity_val, flags);
	S(im_mesh_ns_val); F(im_mesh_ns_val, flags); F(im_mesh_ns_val, pad);
	S(im_mesh_addr); F(im_mesh_addr, addr); F(im_mesh_addr, port); F(im_mesh_addr, pad);
	S(im_mesh_sock_key); F(im_mesh_sock_key, netns); F(im_mesh_sock_key, addr);
	F(im_mesh_sock_key, port); F(im_mesh_sock_key, pad);
	S(im_policy_key); F(im_policy_key, src_identity); F(im_policy_key, dst_identity);
	F(im_policy_key, dport); F(im_policy_key, proto); F(im_policy_key, dir);
	S(im_policy_val); F(im_policy_val, flags); F(im_policy_val, rule_id);
	F(im_policy_val, rate_per_sec); F(im_policy_val, burst);
	S(im_enforced_val); F(im_enforced_val, enforced);
	S(im_ct_key); F(im_ct_key, saddr); F(im_ct_key, daddr); F(im_ct_key, sport);
	F(im_ct_key, dport); F(im_ct_key, proto); F(im_ct_key, pad);
	S(im_ct_val); F(im_ct_val, created_ns); F(im_ct_val, last_seen_ns);
	F(im_ct_val, last_report_ns); F(im_ct_val, packets_fwd); F(im_ct_val, bytes_fwd);
	F(im_ct_val, packets_rev); F(im_ct_val, bytes_rev); F(im_ct_val, src_identity);
	F(im_ct_val, dst_identity); F(im_ct_val, policy_gen); F(im_ct_val, rule_id);
	F(im_ct_val, verdict); F(im_ct_val, flags); F(im_ct_val, if_fwd);
	F(im_ct_val, if_rev); F(im_ct_val, pad);
	S(im_inst_addr_val); F(im_inst_addr_val, addr); F(im_inst_addr_val, flags);
	S(im_rl_key); F(im_rl_key, src_identity); F(im_rl_key, rule_id);
	S(im_rl_val); F(im_rl_val, lock); F(im_rl_val, pad); F(im_rl_val, tokens_nano);
	F(im_rl_val, last_ns);
	S(im_config); F(im_config, policy_gen); F(im_config, report_interval_s);
	F(im_config, ct_timeout_s); F(im_config, ct_short_timeout_s);
	S(im_svc_key); F(im_svc_key, vip); F(im_svc_key, port); F(im_svc_key, proto);
	F(im_svc_key, pad);
	S(im_svc_val); F(im_svc_val, service_id); F(im_svc_val, backend_count);
	S(im_backend_key); F(im_backend_key, service_id); F(im_backend_key, slot);
	S(im_backend_val); F(im_backend_val, addr); F(im_backend_val, port);
	F(im_backend_val, pad);
	S(im_revnat_key); F(im_revnat_key, cookie); F(im_revnat_key, addr);
	F(im_revnat_key, port); F(im_revnat_key, pad);
	S(im_revnat_val); F(im_revnat_val, vip); F(im_revnat_val, port); F(im_revnat_val, pad);
	S(im_flow_event); F(im_flow_event, ts_ns); F(im_flow_event, packets_fwd);
	F(im_flow_event, bytes_fwd); F(im_flow_event, packets_rev); F(im_flow_event, bytes_rev);
	F(im_flow_event, saddr); F(im_flow_event, daddr); F(im_flow_event, src_identity);
	F(im_flow_event, dst_identity); F(im_flow_event, ifindex); F(im_flow_event, rule_id);
	F(im_flow_event, sport); F(im_flow_event, dport); F(im_flow_event, proto);
	F(im_flow_event, verdict); F(im_flow_event, kind); F(im_flow_event, hook);
	printf("IM_LAYOUT_VERSION - %d 0\n", IM_LAYOUT_VERSION);
	K(IM_IDENTITY_UNKNOWN); K(IM_IDENTITY_ANY);
	K(IM_VERDICT_ALLOWED); K(IM_VERDICT_DENIED); K(IM_VERDICT_RATE_LIMITED);
	K(IM_VERDICT_SPOOFED); K(IM_VERDICT_PLAINTEXT);
	K(IM_ID_MESH); K(IM_ID_STRICT); K(IM_ID_REMOTE); K(IM_MESH_HBONE_PORT);
	K(IM_MESH_OUTBOUND_PORT); K(IM_MARK_AGENT);
	K(IM_EVENT_NEW); K(IM_EVENT_VERDICT); K(IM_EVENT_REPORT); K(IM_EVENT_CLOSE);
	K(IM_HOOK_FROM_INSTANCE); K(IM_HOOK_TO_INSTANCE);
	K(IM_POLICY_ALLOW); K(IM_DIR_INGRESS); K(IM_DIR_EGRESS);
	K(IM_ENFORCE_INGRESS); K(IM_ENFORCE_EGRESS);
	K(IM_CT_DST_EVALUATED); K(IM_CT_CLOSED);
	K(IM_CNT_ALLOWED); K(IM_CNT_DENIED); K(IM_CNT_RATE_LIMITED); K(IM_CNT_NEW_FLOWS);
	K(IM_CNT_EVENTS_LOST); K(IM_CNT_LB_REWRITES); K(IM_CNT_LB_NO_BACKEND);
	K(IM_CNT_PEER_REDIRECTS); K(IM_CNT_MESH_CAPTURED); K(IM_CNT_PLAINTEXT); K(IM_CNT_MAX); K(IM_INST_HOST_ROUTED);
	K(IM_GUARD_SPOOFED); K(IM_GUARD_ARP_SPOOFED); K(IM_GUARD_NOT_IPV4);
	K(IM_GUARD_NO_ADDR); K(IM_GUARD_CT_FULL); K(IM_GUARD_MAX);
	return 0;
}
