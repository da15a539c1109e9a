/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-endpoint L3/L4 policy (Cilium's bpf/lib/policy.h + policy_log.h).
 *
 * Each endpoint has an LPM trie (struct policy_key -> struct policy_entry)
 * reached through pilus_policy[ep_id]. The identity and the direction are
 * always matched in full, the protocol and the destination port by prefix:
 * an L3-only entry has prefix 40, proto-only 48, a port 64, a port range a
 * shorter power-of-two prefix. Identity 0 stands for any identity.
 *
 * Lookup (__policy_can_access):
 *   A = longest match for {remote identity, dir, proto, dport}
 *   A is a deny                                  -> DROP_POLICY_DENY
 *   B = longest match for {0, dir, proto, dport}
 *   choose B if B is a deny, or A is missing, or B's proto/port prefix is
 *   longer than A's; otherwise A
 *   nothing                                      -> DROP_POLICY
 *   chosen is a deny                             -> DROP_POLICY_DENY
 * Within one identity the longest prefix decides: the control plane keeps
 * allow entries from being more specific than a deny that covers them
 * (src/pilus/policy/mapstate.py `normalize` writes them as denies).
 *
 * Kubernetes ipBlocks match addresses, pods included, which an identity
 * cannot say ("this pod's IP but not its identity-mates"). When the
 * endpoint's policy uses an ipBlock in this direction (ENDPOINT_F_IPBLOCK_*),
 * a second identity is looked up: C = the identity of the longest prefix in
 * pilus_ipblock covering the peer's address (only ipBlock selectors select
 * it), and then the longest match for {C, dir, proto, dport}:
 *   the first lookup denied                      -> DROP_POLICY_DENY
 *   C's entry is a deny                          -> DROP_POLICY_DENY
 *   the first lookup allowed                     -> allowed
 *   C's entry is an allow                        -> allowed
 *   otherwise the first lookup's DROP_POLICY stands.
 * An allow from either identity allows unless a deny matches either; without
 * an ipBlock rule the flag is clear and this costs nothing.
 *
 * Policy is consulted for CT_NEW packets only (the caller's job); ICMP puts
 * the ICMP type in the port field (protocol 1). Every decision emits a
 * rate-limited policy-verdict event; drops go through the drop funnel.
 */
#ifndef __PILUS_POLICY_H
#define __PILUS_POLICY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "maps.h"
#include "ipv4.h"
#include "events.h"

struct policy_result {
	__u8   match_type;  /* POLICY_MATCH_* */
	__be16 proxy_port;
};

static __always_inline __u8 policy_match_type(const struct policy_entry *e, bool any_identity)
{
	__u8 plen = e->lpm_prefix_length;

	if (plen > POLICY_PROTO_PREFIX)
		return any_identity ? POLICY_MATCH_L4_ONLY : POLICY_MATCH_L3_L4;
	if (plen == POLICY_PROTO_PREFIX)
		return any_identity ? POLICY_MATCH_PROTO_ONLY : POLICY_MATCH_L3_PROTO;
	return any_identity ? POLICY_MATCH_ALL : POLICY_MATCH_L3_ONLY;
}

static __always_inline void policy_account(struct policy_entry *e, __u64 bytes)
{
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, bytes);
}

/* returns 0 (allowed) or DROP_POLICY / DROP_POLICY_DENY */
static __always_inline int __policy_can_access(void *map, __u32 remote_id, __u8 egress,
					       __u8 proto, __be16 dport, __u64 bytes,
					       struct policy_result *res)
{
	struct policy_key key = {
		.lpm_prefixlen = POLICY_FULL_PREFIX,
		.sec_label = remote_id,
		.egress = egress,
		.protocol = proto,
		.dport = dport,
	};
	struct policy_entry *a, *b, *e;
	bool any_identity = false;

	res->match_type = POLICY_MATCH_NONE;
	res->proxy_port = 0;

	a = bpf_map_lookup_elem(map, &key);
	if (a && a->deny) {
		res->match_type = policy_match_type(a, false);
		policy_account(a, bytes);
		return DROP_POLICY_DENY;
	}

	key.sec_label = 0;
	b = bpf_map_lookup_elem(map, &key);
	if (b && (b->deny || !a || b->lpm_prefix_length > a->lpm_prefix_length)) {
		e = b;
		any_identity = true;
	} else {
		e = a;
	}
	if (!e)
		return DROP_POLICY;

	res->match_type = policy_match_type(e, any_identity);
	policy_account(e, bytes);
	if (e->deny)
		return DROP_POLICY_DENY;
	res->proxy_port = e->proxy_port;
	return 0;
}

/* identity of the longest ipBlock prefix covering addr, 0 if none */
static __always_inline __u32 ipblock_identity4(__be32 addr)
{
	struct ipcache_key key = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 32,
		.family = ENDPOINT_KEY_IPV4,
	};
	__u32 *id;

	key.addr.ip4 = addr;
	id = bpf_map_lookup_elem(&pilus_ipblock, &key);
	return id ? *id : 0;
}

/* the second lookup: combine the ipBlock identity's entry with the first
 * lookup's verdict `ret` (see the table at the top) */
static __always_inline int __policy_ipblock(void *map, __be32 peer, __u8 egress, __u8 proto,
					    __be16 dport, __u64 bytes, int ret,
					    struct policy_result *res)
{
	struct policy_key key = {
		.lpm_prefixlen = POLICY_FULL_PREFIX,
		.egress = egress,
		.protocol = proto,
		.dport = dport,
	};
	struct policy_entry *c;

	if (ret == DROP_POLICY_DENY)
		return ret;
	key.sec_label = ipblock_identity4(peer);
	if (!key.sec_label)
		return ret;
	c = bpf_map_lookup_elem(map, &key);
	if (!c || (!c->deny && ret == 0))
		return ret;
	res->match_type = policy_match_type(c, false);
	policy_account(c, bytes);
	if (c->deny) {
		res->proxy_port = 0;
		return DROP_POLICY_DENY;
	}
	res->proxy_port = c->proxy_port;
	return 0;
}

static __always_inline void send_policy_verdict(struct __sk_buff *skb, __u16 ep_id,
						__u32 local_id, __u32 remote_id, __u8 dir,
						__u8 proto, __u16 dst_port,
						const struct policy_result *res, int verdict,
						__u32 ifindex)
{
	struct policy_verdict_notify *n;

	n = event_reserve(NOTIFY_POLICY_VERDICT, sizeof(*n));
	if (!n)
		return;
	fill_capture_hdr(skb, &n->hdr, NOTIFY_POLICY_VERDICT, 0, ep_id);
	n->remote_label = remote_id;
	n->local_label = local_id;
	n->verdict = verdict;
	n->dst_port = dst_port;
	n->proto = proto;
	n->dir = dir;
	n->match_type = res->match_type;
	n->audited = 0;
	n->proxy_port = res->proxy_port;
	n->ifindex = ifindex;
	n->hdr.len_cap = capture_packet(skb, n->data);
	bpf_ringbuf_submit(n, 0);
}

/*
 * Check the first packet of a connection against the policy of `local_ep` in
 * direction `dir` (POLICY_INGRESS: remote_id sends to local_ep; POLICY_EGRESS:
 * local_ep sends to remote_id). The caller checks the endpoint's
 * ENDPOINT_F_POLICY_* flag first. An enforced endpoint without a policy map
 * has nothing allowed. Returns 0 or DROP_POLICY / DROP_POLICY_DENY; when
 * allowed, *proxy_port is the matched entry's proxy port (network order, 0:
 * no L7 proxy), else 0.
 */
static __always_inline int policy_check4(struct __sk_buff *skb, const struct pkt4 *p,
					 const struct endpoint_info *local_ep, __u32 remote_id,
					 __u8 dir, __u32 ifindex, __be16 *proxy_port)
{
	struct policy_result res = {};
	__u32 ep_id = local_ep->ep_id;
	__u32 local_id = local_ep->identity;
	__u8 proto = p->ip.protocol;
	__be16 dport = p->dport;
	void *map;
	int ret;

	if (proto == IPPROTO_ICMP)
		dport = bpf_htons((__u16)p->icmp_type);

	map = bpf_map_lookup_elem(&pilus_policy, &ep_id);
	if (map) {
		ret = __policy_can_access(map, remote_id, dir == POLICY_EGRESS, proto, dport,
					  skb->len, &res);
		if (local_ep->flags & (dir == POLICY_EGRESS ? ENDPOINT_F_IPBLOCK_EGRESS :
							      ENDPOINT_F_IPBLOCK_INGRESS))
			ret = __policy_ipblock(map, dir == POLICY_EGRESS ? p->ip.daddr : p->ip.saddr,
					       dir == POLICY_EGRESS, proto, dport, skb->len, ret,
					       &res);
	} else {
		ret = DROP_POLICY;
	}

	send_policy_verdict(skb, (__u16)ep_id, local_id, remote_id, dir, proto,
			    bpf_ntohs(dport), &res, ret ? -ret : 0, ifindex);
	*proxy_port = ret ? 0 : res.proxy_port;
	return ret;
}

#endif /* __PILUS_POLICY_H */
