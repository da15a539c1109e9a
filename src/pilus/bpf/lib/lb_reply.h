/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Answering for a service without backends: the packet itself is turned into
 * a TCP RST or an ICMP port unreachable from the frontend and sent back to
 * the sender, so clients fail at once instead of timing out.
 */
#ifndef __PILUS_LB_REPLY_H
#define __PILUS_LB_REPLY_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "ipv4.h"
#include "lb.h"
#include "nat.h"

static __always_inline void lb_ip4_hdr(struct iphdr *ip, __be32 saddr, __be32 daddr,
				       __u8 proto, __u16 tot_len)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = bpf_htons(tot_len);
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = 64;
	ip->protocol = proto;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = lb_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
}

static __always_inline int lb_swap_macs(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)) < 0)
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0);
}

struct lb_tcp_rst {
	/* pseudo header */
	__be32 saddr;
	__be32 daddr;
	__u8   zero;
	__u8   proto;
	__be16 len;
	/* TCP header */
	__be16 sport;
	__be16 dport;
	__be32 seq;
	__be32 ack_seq;
	__u8   doff;   /* data offset << 4 */
	__u8   flags;
	__be16 window;
	__be16 check;
	__be16 urg_ptr;
};

/* turn a TCP SYN to a frontend without backends into a RST from the frontend */
static __always_inline int lb4_reply_tcp_rst(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct lb_tcp_rst r = {};
	struct iphdr ip;
	__be32 seq;
	__u32 seg_len;
	__u8 doff;

	if (bpf_skb_load_bytes(skb, p->l4_off + 4, &seq, 4) < 0)
		return -1;
	if (bpf_skb_load_bytes(skb, p->l4_off + 12, &doff, 1) < 0)
		return -1;
	seg_len = bpf_ntohs(p->ip.tot_len);
	if (seg_len < p->ip.ihl * 4 + (doff >> 4) * 4)
		return -1;
	seg_len -= p->ip.ihl * 4 + (doff >> 4) * 4;
	seg_len += 1; /* the SYN */

	r.saddr = p->ip.daddr;
	r.daddr = p->ip.saddr;
	r.proto = IPPROTO_TCP;
	r.len = bpf_htons(20);
	r.sport = p->dport;
	r.dport = p->sport;
	r.seq = 0;
	r.ack_seq = bpf_htonl(bpf_ntohl(seq) + seg_len);
	r.doff = 5 << 4;
	r.flags = TCP_FLAG_RST | TCP_FLAG_ACK;
	r.check = lb_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&r, sizeof(r), 0));
	lb_ip4_hdr(&ip, p->ip.daddr, p->ip.saddr, IPPROTO_TCP, 40);

	if (bpf_skb_change_tail(skb, ETH_HLEN + 40, 0) < 0)
		return -1;
	if (lb_swap_macs(skb) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + 20, &r.sport, 20, 0) < 0)
		return -1;
	return 0;
}

struct lb_icmp_unreach {
	__u8   type;
	__u8   code;
	__be16 check;
	__be32 unused;
	__u8   quote[28];  /* the offending IP header (20) + 8 bytes of L4 */
};

/* turn a packet into an ICMP port unreachable from its destination */
static __always_inline int lb4_reply_icmp_unreach(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct lb_icmp_unreach ic = {};
	struct iphdr ip;

	if (p->ip.ihl != 5)
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, ic.quote, sizeof(ic.quote)) < 0)
		return -1;
	ic.type = 3; /* ICMP_DEST_UNREACH */
	ic.code = 3; /* ICMP_PORT_UNREACH */
	ic.check = lb_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ic, sizeof(ic), 0));
	lb_ip4_hdr(&ip, p->ip.daddr, p->ip.saddr, IPPROTO_ICMP, 20 + sizeof(ic));

	if (bpf_skb_change_tail(skb, ETH_HLEN + 20 + sizeof(ic), 0) < 0)
		return -1;
	if (lb_swap_macs(skb) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + 20, &ic, sizeof(ic), 0) < 0)
		return -1;
	return 0;
}

/*
 * No usable backend: answer a TCP SYN with a RST and UDP with an ICMP port
 * unreachable, sent back out of `ifindex` (the sender's lxc: the pod gets it
 * at once). Returns the tc verdict, or -1 when no answer was made (drop).
 * The caller has already counted and reported the drop (DROP_NO_SERVICE).
 */
static __always_inline int lb4_no_service_reply(struct __sk_buff *skb, const struct pkt4 *p,
						__u32 ifindex)
{
	int ret = -1;

	if (!(LB_CFG(flags) & LB_CFG_F_NO_SERVICE_REPLY))
		return -1;
	if (p->ip.protocol == IPPROTO_TCP) {
		if ((p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) != TCP_FLAG_SYN)
			return -1;
		ret = lb4_reply_tcp_rst(skb, p);
	} else if (p->ip.protocol == IPPROTO_UDP) {
		ret = lb4_reply_icmp_unreach(skb, p);
	}
	if (ret < 0)
		return -1;
	return bpf_redirect(ifindex, 0);
}

#endif /* __PILUS_LB_REPLY_H */
