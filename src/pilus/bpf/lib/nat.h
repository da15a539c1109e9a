/* SPDX-License-Identifier: Apache-2.0 */
/* Address and port rewriting of a parsed IPv4 TCP/UDP packet with its L3/L4
 * checksums, and the checksum folding of packets built from scratch. */
#ifndef __PILUS_NAT_H
#define __PILUS_NAT_H

#include <stdbool.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include "common.h"
#include "ipv4.h"

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

static __always_inline __u32 lb_l4_csum_off(const struct pkt4 *p)
{
	return p->l4_off + (p->ip.protocol == IPPROTO_TCP ? 16 : 6);
}

static __always_inline __u64 lb_l4_csum_flags(const struct pkt4 *p)
{
	/* UDP checksum 0 means "none": keep it so */
	return p->ip.protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* rewrite the source (is_src) or destination address and port of a TCP/UDP
 * packet, fixing the IP and L4 checksums; returns 0 or a drop reason */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, struct pkt4 *p, bool is_src,
				       __be32 addr, __be16 port)
{
	__be32 old_addr = is_src ? p->ip.saddr : p->ip.daddr;
	__be16 old_port = is_src ? p->sport : p->dport;
	__u32 csum_off = lb_l4_csum_off(p);
	__u64 mangled = lb_l4_csum_flags(p);

	if (addr != old_addr) {
		if (bpf_skb_store_bytes(skb, is_src ? IP_SADDR_OFF : IP_DADDR_OFF, &addr, 4, 0) < 0)
			return DROP_WRITE_ERROR;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, addr, 4) < 0)
			return DROP_CSUM_L3;
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, addr,
					BPF_F_PSEUDO_HDR | mangled | 4) < 0)
			return 154; /* DROP_CSUM_L4 */
		if (is_src)
			p->ip.saddr = addr;
		else
			p->ip.daddr = addr;
	}
	if (port && port != old_port) {
		if (bpf_skb_store_bytes(skb, p->l4_off + (is_src ? 0 : 2), &port, 2, 0) < 0)
			return DROP_WRITE_ERROR;
		if (bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | 2) < 0)
			return 154; /* DROP_CSUM_L4 */
		if (is_src)
			p->sport = port;
		else
			p->dport = port;
	}
	return 0;
}

static __always_inline __u16 lb_csum_fold(__s64 csum)
{
	__u32 sum = (__u32)csum;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

#endif /* __PILUS_NAT_H */
