/* SPDX-License-Identifier: Apache-2.0 */
#ifndef __PILUS_IPV4_H
#define __PILUS_IPV4_H

#include <stdbool.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"

/* (linux/icmp.h drags in libc headers) */
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO      8

struct icmp_echo_hdr {
	__u8   type;
	__u8   code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};

/* what the programs need to know about an IPv4 packet */
struct pkt4 {
	struct iphdr ip;
	__u32 l4_off;
	__be16 sport;      /* TCP/UDP ports, ICMP echo id (see ct tuple rules) */
	__be16 dport;
	__u8 tcp_flags;
	__u8 icmp_type;
	bool is_fragment;  /* non-first fragment: no L4 header */
};

#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

/* returns 0 or a positive drop reason */
static __always_inline int pkt4_parse(struct __sk_buff *skb, struct pkt4 *p)
{
	__u32 ihl;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &p->ip, sizeof(p->ip)) < 0)
		return DROP_INVALID;
	if (p->ip.version != 4 || p->ip.ihl < 5)
		return DROP_INVALID;
	ihl = p->ip.ihl * 4;
	p->l4_off = ETH_HLEN + ihl;
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;
	p->icmp_type = 0;
	p->is_fragment = (p->ip.frag_off & bpf_htons(IP_OFFSET)) != 0;
	if (p->is_fragment)
		return 0;

	switch (p->ip.protocol) {
	case IPPROTO_TCP: {
		__u8 hdr[14];

		if (bpf_skb_load_bytes(skb, p->l4_off, hdr, sizeof(hdr)) < 0)
			return DROP_CT_INVALID_HDR;
		__builtin_memcpy(&p->sport, &hdr[0], 2);
		__builtin_memcpy(&p->dport, &hdr[2], 2);
		p->tcp_flags = hdr[13];
		break;
	}
	case IPPROTO_UDP: {
		__be16 ports[2];

		if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
			return DROP_CT_INVALID_HDR;
		p->sport = ports[0];
		p->dport = ports[1];
		break;
	}
	case IPPROTO_ICMP: {
		struct icmp_echo_hdr ic;

		if (bpf_skb_load_bytes(skb, p->l4_off, &ic, sizeof(ic)) < 0)
			return DROP_CT_INVALID_HDR;
		p->icmp_type = ic.type;
		/* echo id in sport for requests, in dport for replies, so the
		 * reverse of a reply's tuple is the request's tuple */
		if (ic.type == ICMP_ECHO)
			p->sport = ic.id;
		else if (ic.type == ICMP_ECHOREPLY)
			p->dport = ic.id;
		break;
	}
	default:
		break;
	}
	return 0;
}

/* decrement the TTL and fix the header checksum; returns 0 or a drop reason */
static __always_inline int ipv4_dec_ttl(struct __sk_buff *skb, struct pkt4 *p)
{
	__u32 off = ETH_HLEN + offsetof(struct iphdr, ttl);
	__u16 old_word, new_word;
	__u8 ttl = p->ip.ttl;

	if (ttl <= 1)
		return DROP_TTL_EXCEEDED;
	/* the ttl/protocol 16-bit word, as the checksum sees it */
	__builtin_memcpy(&old_word, &p->ip.ttl, 2);
	ttl--;
	if (bpf_skb_store_bytes(skb, off, &ttl, 1, 0) < 0)
		return DROP_WRITE_ERROR;
	p->ip.ttl = ttl;
	__builtin_memcpy(&new_word, &p->ip.ttl, 2);
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check),
				old_word, new_word, 2) < 0)
		return DROP_CSUM_L3;
	return 0;
}

#endif
