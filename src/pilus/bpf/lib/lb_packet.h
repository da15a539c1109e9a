/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The per-packet service LB (from-container and from-netdev, before conntrack
 * and policy so that both see the backend): a TCP/UDP packet to a frontend
 * finds its connection's backend in pilus_lb4_ct or picks one (lb_select.h)
 * and is DNATed to it (with hairpin the source becomes lb_config.loopback_ip);
 * a reply (CT_REPLY) finds its reverse entry and gets the frontend back as
 * its source. The main conntrack entry is not involved.
 */
#ifndef __PILUS_LB_PACKET_H
#define __PILUS_LB_PACKET_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "config.h"
#include "maps.h"
#include "ipv4.h"
#include "conntrack.h"
#include "lb.h"
#include "lb_select.h"
#include "nat.h"

struct lb4_result {
	__u32  backend_id;
	__u32  rev_nat_index;   /* 0: not a service packet */
	bool   loopback;        /* hairpin: source rewritten to loopback_ip */
	bool   no_backend;      /* frontend without a usable backend */
	__be32 vip;             /* frontend, for replies to the client */
	__be16 vport;
};

static __always_inline __u32 lb4_ct_lifetime(__u8 proto, __u8 flags)
{
	if (proto != IPPROTO_TCP)
		return CFG(ct_lifetime_nontcp);
	if (flags & LB_CT_F_CLOSING)
		return CFG(ct_close_timeout);
	if (flags & LB_CT_F_SEEN_NON_SYN)
		return CFG(ct_lifetime_tcp);
	return CFG(ct_syn_timeout);
}

/*
 * A packet leaving a pod: if it goes to a frontend, pick (or find) its
 * backend and DNAT it; `client_is_backend_ok`: hairpin allowed (the sender
 * may be its own backend; the source then becomes loopback_ip).
 * Returns 0 (res->rev_nat_index tells whether it was a service packet) or a
 * drop reason; res->no_backend is set with DROP_NO_SERVICE.
 */
static __always_inline int lb4_local(struct __sk_buff *skb, struct pkt4 *p, bool internal,
				     struct lb4_result *res)
{
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be = NULL;
	struct ipv4_ct_tuple tuple = {};
	struct lb4_ct_entry *ce;
	__u8 proto = p->ip.protocol;
	__u8 tcp_flags = proto == IPPROTO_TCP ? p->tcp_flags : 0;
	bool syn_only = (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	__u32 now, lifetime, backend_id = 0;
	bool write_rev = false;
	__u8 ct_flags = 0;
	int ret;

	if (p->is_fragment || (proto != IPPROTO_TCP && proto != IPPROTO_UDP))
		return 0;
	key.address = p->ip.daddr;
	key.dport = p->dport;
	key.proto = proto;
	svc = lb4_lookup_service(&key, internal);
	if (!svc)
		return 0;

	res->rev_nat_index = svc->rev_nat_index;
	res->vip = p->ip.daddr;
	res->vport = p->dport;
	now = bpf_now_sec();

	tuple.saddr = p->ip.saddr;
	tuple.daddr = p->ip.daddr;
	tuple.sport = p->sport;
	tuple.dport = p->dport;
	tuple.nexthdr = proto;
	tuple.flags = TUPLE_F_SERVICE;
	ce = bpf_map_lookup_elem(&pilus_lb4_ct, &tuple);
	if (ce && ce->lifetime >= now && ce->rev_nat_index == svc->rev_nat_index) {
		backend_id = ce->backend_id;
		ct_flags = ce->flags;
		be = bpf_map_lookup_elem(&pilus_lb4_be, &backend_id);
		/* a new connection (pure SYN) on a reused tuple: only an active
		 * backend may take it, and a closed connection starts over */
		if (be && syn_only &&
		    (be->flags != BE_STATE_ACTIVE || (ct_flags & LB_CT_F_CLOSING)))
			be = NULL;
	}

	if (!be) {
		/* a new connection (or its backend went away): select */
		ct_flags = 0;
		backend_id = 0;
		if (svc->count == 0) {
			res->no_backend = true;
			return DROP_NO_SERVICE;
		}
		backend_id = lb4_select_backend(&key, svc, p->ip.saddr, p->ip.daddr,
						((__u32)bpf_ntohs(p->sport) << 16) | bpf_ntohs(p->dport),
						proto, now);
		if (backend_id)
			be = bpf_map_lookup_elem(&pilus_lb4_be, &backend_id);
		if (!be) {
			res->no_backend = true;
			return DROP_NO_SERVICE;
		}
		if (svc->flags & SVC_FLAG_AFFINITY)
			lb4_affinity_update(svc, p->ip.saddr, backend_id, now);
	}

	/* record / refresh the frontend tuple -> backend */
	if (proto == IPPROTO_TCP) {
		if (!(tcp_flags & TCP_FLAG_SYN))
			ct_flags |= LB_CT_F_SEEN_NON_SYN;
		if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
			ct_flags |= LB_CT_F_CLOSING;
	}
	res->backend_id = backend_id;
	res->loopback = be->address == p->ip.saddr;
	if (res->loopback)
		ct_flags |= LB_CT_F_LOOPBACK;
	lifetime = now + lb4_ct_lifetime(proto, ct_flags);
	if (ce && ce->backend_id == backend_id && ce->rev_nat_index == svc->rev_nat_index) {
		/* lifetimes are in seconds: the reverse entry is rewritten at
		 * most once a second per connection */
		write_rev = ce->lifetime != lifetime || ce->flags != ct_flags;
		ce->flags = ct_flags;
		ce->lifetime = lifetime;
	} else {
		struct lb4_ct_entry ne = {
			.backend_id = backend_id,
			.rev_nat_index = svc->rev_nat_index,
			.flags = ct_flags,
			.lifetime = lifetime,
		};

		if (bpf_map_update_elem(&pilus_lb4_ct, &tuple, &ne, BPF_ANY) < 0)
			return DROP_CT_CREATE_FAILED;
		write_rev = true;
	}
	if (write_rev) {
		struct lb4_ct_entry rn = {
			.backend_id = backend_id,
			.rev_nat_index = svc->rev_nat_index,
			.nat_addr = res->vip,
			.nat_port = res->vport,
			.client_addr = p->ip.saddr,
			.flags = ct_flags,
			.lifetime = lifetime,
		};
		struct ipv4_ct_tuple rt = {
			.saddr = be->address,
			.daddr = res->loopback ? LB_CFG(loopback_ip) : p->ip.saddr,
			.sport = be->port,
			.dport = p->sport,
			.nexthdr = proto,
			.flags = LB_TUPLE_F_REVNAT,
		};

		if (bpf_map_update_elem(&pilus_lb4_ct, &rt, &rn, BPF_ANY) < 0)
			return DROP_CT_CREATE_FAILED;
	}

	/* DNAT to the backend; hairpin: SNAT to the loopback address so the pod
	 * accepts a packet "from itself" and answers through us */
	ret = lb4_rewrite(skb, p, false, be->address, be->port);
	if (ret)
		return ret;
	if (res->loopback)
		ret = lb4_rewrite(skb, p, true, LB_CFG(loopback_ip), 0);
	return ret;
}

/* reverse NAT of a reply (CT_REPLY): the source becomes the frontend, and a
 * hairpin reply goes back to the pod itself. Returns 0 or a drop reason;
 * *daddr_changed tells the caller to redo its destination lookup. */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct pkt4 *p, bool *daddr_changed)
{
	struct ipv4_ct_tuple t = {};
	struct lb4_ct_entry *rn;
	__be32 nat_addr, client;
	__be16 nat_port;
	__u32 now, lifetime;
	__u8 flags;
	int ret;

	*daddr_changed = false;
	if (p->is_fragment || (p->ip.protocol != IPPROTO_TCP && p->ip.protocol != IPPROTO_UDP))
		return 0;
	t.saddr = p->ip.saddr;
	t.daddr = p->ip.daddr;
	t.sport = p->sport;
	t.dport = p->dport;
	t.nexthdr = p->ip.protocol;
	t.flags = LB_TUPLE_F_REVNAT;
	rn = bpf_map_lookup_elem(&pilus_lb4_ct, &t);
	if (!rn)
		return 0;
	now = bpf_now_sec();
	if (rn->lifetime < now)
		return 0;
	flags = rn->flags;
	if (p->ip.protocol == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		flags |= LB_CT_F_CLOSING;
	lifetime = now + lb4_ct_lifetime(p->ip.protocol, flags | LB_CT_F_SEEN_NON_SYN);
	if (rn->lifetime < lifetime || flags != rn->flags) {
		rn->lifetime = lifetime;
		rn->flags = flags;
	}
	nat_addr = rn->nat_addr;
	nat_port = rn->nat_port;
	client = rn->client_addr;
	ret = lb4_rewrite(skb, p, true, nat_addr, nat_port);
	if (ret)
		return ret;
	if (flags & (LB_CT_F_LOOPBACK | LB_CT_F_SNAT)) {
		/* hairpin: back to the pod itself; SNAT: back to the client's address
		 * and port */
		ret = lb4_rewrite(skb, p, false, client, rn->client_port);
		*daddr_changed = true;
	}
	return ret;
}

/* a new connection that is not a service one: a reverse entry left by an
 * earlier service connection on the same tuple must not rewrite its replies */
static __always_inline void lb4_forget_rev_nat(const struct pkt4 *p)
{
	struct ipv4_ct_tuple t = {};

	if (p->ip.protocol != IPPROTO_TCP && p->ip.protocol != IPPROTO_UDP)
		return;
	t.saddr = p->ip.daddr;
	t.daddr = p->ip.saddr;
	t.sport = p->dport;
	t.dport = p->sport;
	t.nexthdr = p->ip.protocol;
	t.flags = LB_TUPLE_F_REVNAT;
	/* a lookup is lock-free, a delete locks the bucket even for a missing key:
	 * most new connections have nothing to forget */
	if (bpf_map_lookup_elem(&pilus_lb4_ct, &t))
		bpf_map_delete_elem(&pilus_lb4_ct, &t);
}

#endif /* __PILUS_LB_PACKET_H */
