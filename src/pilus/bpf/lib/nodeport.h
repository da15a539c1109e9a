/* SPDX-License-Identifier: Apache-2.0 */
/*
 * NodePort (and ExternalIPs, LoadBalancer IPs) to a backend on another node,
 * Cilium's default "SNAT" mode: after the DNAT, the source becomes this
 * node's IP and a port of NODEPORT_PORT_MIN..MAX, so the backend answers to
 * this node, whose cil_from_netdev reverses both translations (lb4_rev_nat
 * with LB_CT_F_SNAT) and routes the reply to the client itself.
 *
 * State, all in pilus_lb4_ct:
 *   frontend tuple (client -> frontend)   nat_addr/nat_port = the SNAT source
 *   reply tuple (backend -> node IP:port) nat_addr/nat_port = the frontend,
 *                                         client_addr/client_port = the client
 * The port range lies above the kernel's ephemeral ports (32768-60999), so a
 * connection of the node's own never shares a reply tuple with a SNATed one.
 */
#ifndef __PILUS_NODEPORT_H
#define __PILUS_NODEPORT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "config.h"
#include "maps.h"
#include "ipv4.h"
#include "nat.h"
#include "jhash.h"
#include "lb.h"
#include "lb_packet.h"

#define NODEPORT_PORT_MIN   61000
#define NODEPORT_PORT_RANGE (65535 - NODEPORT_PORT_MIN + 1)
#define NODEPORT_PORT_TRIES 16

/* a free (or this connection's own) SNAT port for client -> backend; 0: none */
static __always_inline __be16 nodeport_snat_port(const struct pkt4 *p, __be32 client, __be16 cport,
						 __u32 now)
{
	struct ipv4_ct_tuple rt = {
		.saddr = p->ip.daddr,   /* the backend */
		.daddr = CFG(node_ip),
		.sport = p->dport,
		.nexthdr = p->ip.protocol,
		.flags = LB_TUPLE_F_REVNAT,
	};
	__u32 start = lb_jhash_3words(client, ((__u32)cport << 16) | p->dport, p->ip.daddr,
				      p->ip.protocol);
	struct lb4_ct_entry *used;

	for (int i = 0; i < NODEPORT_PORT_TRIES; i++) {
		rt.dport = bpf_htons(NODEPORT_PORT_MIN + (start + i) % NODEPORT_PORT_RANGE);
		used = bpf_map_lookup_elem(&pilus_lb4_ct, &rt);
		if (!used || used->lifetime < now ||
		    (used->client_addr == client && used->client_port == cport))
			return rt.dport;
	}
	return 0;
}

/* SNAT a packet lb4_local() DNATed to a remote backend; returns 0 or a drop
 * reason. ``svc``: lb4_local's result (the frontend and the backend id). */
static __always_inline int nodeport_snat_fwd(struct __sk_buff *skb, struct pkt4 *p,
					     const struct lb4_result *svc)
{
	struct ipv4_ct_tuple ft = {
		.saddr = p->ip.saddr,
		.daddr = svc->vip,
		.sport = p->sport,
		.dport = svc->vport,
		.nexthdr = p->ip.protocol,
		.flags = TUPLE_F_SERVICE,
	};
	__be32 client = p->ip.saddr;
	__be16 cport = p->sport, port;
	struct lb4_ct_entry *ce, *rn;
	__u32 now = bpf_now_sec();

	ce = bpf_map_lookup_elem(&pilus_lb4_ct, &ft);
	if (!ce)
		return DROP_CT_CREATE_FAILED;
	port = ce->nat_addr == CFG(node_ip) ? ce->nat_port : 0;
	if (!port) {
		port = nodeport_snat_port(p, client, cport, now);
		if (!port)
			return DROP_NAT_NO_MAPPING;
		ce->nat_addr = CFG(node_ip);
		ce->nat_port = port;
	}
	{
		struct ipv4_ct_tuple rt = {
			.saddr = p->ip.daddr,
			.daddr = CFG(node_ip),
			.sport = p->dport,
			.dport = port,
			.nexthdr = p->ip.protocol,
			.flags = LB_TUPLE_F_REVNAT,
		};

		rn = bpf_map_lookup_elem(&pilus_lb4_ct, &rt);
		if (rn && rn->client_addr == client && rn->client_port == cport) {
			/* lifetimes are in seconds: at most one write a second */
			if (rn->lifetime != ce->lifetime || rn->flags != (ce->flags | LB_CT_F_SNAT)) {
				rn->lifetime = ce->lifetime;
				rn->flags = ce->flags | LB_CT_F_SNAT;
			}
		} else {
			struct lb4_ct_entry ne = {
				.backend_id = svc->backend_id,
				.rev_nat_index = svc->rev_nat_index,
				.nat_addr = svc->vip,
				.nat_port = svc->vport,
				.client_addr = client,
				.client_port = cport,
				.flags = ce->flags | LB_CT_F_SNAT,
				.lifetime = ce->lifetime,
			};

			if (bpf_map_update_elem(&pilus_lb4_ct, &rt, &ne, BPF_ANY) < 0)
				return DROP_CT_CREATE_FAILED;
		}
	}
	return lb4_rewrite(skb, p, true, CFG(node_ip), port);
}

#endif /* __PILUS_NODEPORT_H */
