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
 *
 * DSR mode (pilus_config.lb_dsr, Cilium's --bpf-lb-mode dsr with
 * --bpf-lb-dsr-dispatch opt; native routing only): the client's address and
 * port stay; the entry node adds an IPv4 option carrying the frontend to every
 * packet of the connection and routes it to the backend's node
 * (nodeport_dsr_set_opt4). The backend's node records, from that option, the
 * reply tuple (backend -> client) with nat_addr/nat_port = the frontend
 * (nodeport_dsr_ingress), so the pod's reply gets the frontend as its source in
 * its from-container (lb4_rev_nat, as for a local backend) and goes straight
 * to the client, never through the entry node.
 *   option (8 bytes, after the 20-byte header): type 0x9a (IPOPT_COPY | 26),
 *   length 8, port (2), address (4) -- written as Cilium writes them: bpf_htons
 *   and bpf_htonl applied to the network-order values, so on a little-endian
 *   machine both are byte-reversed on the wire (30480 -> bytes 10 77;
 *   172.31.236.11 -> bytes 0b ec 1f ac); the same reversal on the receiving
 *   side gives them back, and a Cilium node reads ours.
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
#include "lb_reply.h"

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

/* ---- DSR (Direct Server Return) with the IPv4 option dispatch ---- */

#define DROP_FRAG_NEEDED     136  /* Cilium's: the packet plus the option exceeds the MTU */
#define IPOPT_COPY           0x80
#define DSR_IPV4_OPT_TYPE    (IPOPT_COPY | 0x1a)  /* 0x9a */
#define DSR_IPV4_OPT_LEN     8
#define IPV4_MAX_IHL         15   /* 60-byte header: 40 bytes of options */

/* Cilium's struct dsr_opt_v4 */
struct dsr_opt_v4 {
	__u8  type;
	__u8  len;
	__u16 port;  /* bpf_htons(frontend port in network order), see above */
	__u32 addr;  /* bpf_htonl(frontend address in network order) */
};

/* add the DSR option right after the fixed IPv4 header (earlier options move
 * behind it), fixing ihl, tot_len and the header checksum; the L4 checksum
 * does not cover the IP header length. Returns 0 or a drop reason; p follows. */
static __always_inline int nodeport_dsr_set_opt4(struct __sk_buff *skb, struct pkt4 *p,
						 __be32 vip, __be16 vport)
{
	struct dsr_opt_v4 opt = {
		.type = DSR_IPV4_OPT_TYPE,
		.len = DSR_IPV4_OPT_LEN,
		.port = bpf_htons(vport),
		.addr = bpf_htonl(vip),
	};
	__be32 old_word, new_word;
	__s64 sum;

	if (p->ip.ihl + DSR_IPV4_OPT_LEN / 4 > IPV4_MAX_IHL)
		return DROP_CT_INVALID_HDR;  /* Cilium's: no room for the option */
	/* version/ihl, tos, tot_len: the first 32-bit word of the header */
	__builtin_memcpy(&old_word, &p->ip, 4);
	p->ip.ihl += DSR_IPV4_OPT_LEN / 4;
	p->ip.tot_len = bpf_htons(bpf_ntohs(p->ip.tot_len) + DSR_IPV4_OPT_LEN);
	__builtin_memcpy(&new_word, &p->ip, 4);
	sum = bpf_csum_diff(&old_word, 4, &new_word, 4, 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&opt, sizeof(opt), (__wsum)sum);
	if (sum < 0)
		return DROP_CSUM_L3;
	if (bpf_skb_adjust_room(skb, DSR_IPV4_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
		return DROP_INVALID;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &new_word, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt), 0) < 0)
		return DROP_WRITE_ERROR;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), 0, (__u32)sum, 0) < 0)
		return DROP_CSUM_L3;
	p->l4_off += DSR_IPV4_OPT_LEN;
	return 0;
}

struct dsr_icmp_frag_needed {
	__u8   type;
	__u8   code;
	__be16 check;
	__be16 unused;
	__be16 mtu;         /* next-hop MTU (RFC 1191) */
	__u8   quote[28];   /* the offending IP header (20) + 8 bytes of L4 */
};

/*
 * The packet and the option do not fit the device: the DNAT is undone and the
 * client gets an ICMP "fragmentation needed" (next-hop MTU = the device's less
 * the option) from this node, sent back out of ``ifindex``, so its path MTU
 * discovery shrinks the next segments. Returns the tc verdict, or -1 when no
 * answer was made (drop). The caller has counted the drop (DROP_FRAG_NEEDED).
 */
static __always_inline int nodeport_dsr_frag_needed(struct __sk_buff *skb, struct pkt4 *p,
						    const struct lb4_result *svc, __u32 mtu,
						    __u32 ifindex)
{
	struct dsr_icmp_frag_needed ic = {};
	struct iphdr ip;

	if (p->ip.ihl != 5 || mtu <= DSR_IPV4_OPT_LEN || !CFG(node_ip))
		return -1;
	/* the quote must show what the client sent */
	if (lb4_rewrite(skb, p, false, svc->vip, svc->vport))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, ic.quote, sizeof(ic.quote)) < 0)
		return -1;
	ic.type = 3;  /* ICMP_DEST_UNREACH */
	ic.code = 4;  /* ICMP_FRAG_NEEDED */
	ic.mtu = bpf_htons(mtu - DSR_IPV4_OPT_LEN);
	ic.check = lb_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ic, sizeof(ic), 0));
	lb_ip4_hdr(&ip, CFG(node_ip), p->ip.saddr, IPPROTO_ICMP, 20 + sizeof(ic));
	if (bpf_skb_change_tail(skb, ETH_HLEN + 20 + sizeof(ic), 0) < 0)
		return -1;
	if (lb_swap_macs(skb) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + 20, &ic, sizeof(ic), 0) < 0)
		return -1;
	return bpf_redirect(ifindex, 0);
}

/*
 * The backend's node: a TCP/UDP packet for a local endpoint that carries the
 * DSR option records the reverse entry of its reply tuple (backend -> client,
 * LB_TUPLE_F_REVNAT) with the frontend as nat_addr/nat_port, so lb4_rev_nat in
 * the pod's from-container turns the reply's source into the frontend. Every
 * packet of the connection carries the option; the entry is rewritten only when
 * its frontend, flags or (second-granular) lifetime change. Returns 0 (also
 * for packets without the option) or a drop reason.
 */
static __always_inline int nodeport_dsr_ingress(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct ipv4_ct_tuple rt = {
		.saddr = p->ip.daddr,
		.daddr = p->ip.saddr,
		.sport = p->dport,
		.dport = p->sport,
		.nexthdr = p->ip.protocol,
		.flags = LB_TUPLE_F_REVNAT,
	};
	struct dsr_opt_v4 opt;
	struct lb4_ct_entry *rn;
	__u32 now, lifetime;
	__be32 vip;
	__be16 vport;
	__u8 flags = 0;

	if (p->ip.ihl < 5 + DSR_IPV4_OPT_LEN / 4 || p->is_fragment ||
	    (p->ip.protocol != IPPROTO_TCP && p->ip.protocol != IPPROTO_UDP))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt)) < 0)
		return DROP_INVALID;
	if (opt.type != DSR_IPV4_OPT_TYPE || opt.len != DSR_IPV4_OPT_LEN)
		return 0;
	vip = bpf_ntohl(opt.addr);
	vport = bpf_ntohs(opt.port);
	if (!vip || !vport)
		return DROP_INVALID;
	now = bpf_now_sec();
	rn = bpf_map_lookup_elem(&pilus_lb4_ct, &rt);
	if (rn && (rn->nat_addr != vip || rn->nat_port != vport ||
		   (rn->flags & (LB_CT_F_LOOPBACK | LB_CT_F_SNAT))))
		rn = NULL;  /* another connection's entry on this tuple: replaced */
	if (p->ip.protocol == IPPROTO_TCP) {
		bool syn_only = (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;

		/* a new connection on the tuple starts over, else flags accumulate */
		if (rn && rn->lifetime >= now && !syn_only)
			flags = rn->flags;
		if (!(p->tcp_flags & TCP_FLAG_SYN))
			flags |= LB_CT_F_SEEN_NON_SYN;
		if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
			flags |= LB_CT_F_CLOSING;
	}
	lifetime = now + lb4_ct_lifetime(p->ip.protocol, flags);
	if (rn) {
		if (rn->lifetime != lifetime || rn->flags != flags) {
			rn->lifetime = lifetime;
			rn->flags = flags;
		}
		return 0;
	}
	{
		struct lb4_ct_entry ne = {
			.nat_addr = vip,
			.nat_port = vport,
			.flags = flags,
			.lifetime = lifetime,
		};

		if (bpf_map_update_elem(&pilus_lb4_ct, &rt, &ne, BPF_ANY) < 0)
			return DROP_CT_CREATE_FAILED;
	}
	return 0;
}

#endif /* __PILUS_NODEPORT_H */
