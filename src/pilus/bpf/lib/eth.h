/* SPDX-License-Identifier: Apache-2.0 */
/* Ethernet and ARP helpers. */
#ifndef __PILUS_ETH_H
#define __PILUS_ETH_H

#include <stdbool.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"

/* from linux/if_arp.h (which drags in libc headers) */
#define ARPHRD_ETHER  1
#define ARPOP_REQUEST 1
#define ARPOP_REPLY   2

struct arp_eth {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8   ar_hln;
	__u8   ar_pln;
	__be16 ar_op;
	__u8   ar_sha[ETH_ALEN];
	__be32 ar_sip;
	__u8   ar_tha[ETH_ALEN];
	__be32 ar_tip;
} __attribute__((packed));

static __always_inline int eth_load_proto(struct __sk_buff *skb, __be16 *proto)
{
	return bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), proto, sizeof(*proto));
}

/* both MACs in one write (one helper call per packet, not two) */
static __always_inline int eth_store_addrs(struct __sk_buff *skb, const __u8 *dst,
					   const __u8 *src)
{
	__u8 addrs[2 * ETH_ALEN];

	__builtin_memcpy(addrs, dst, ETH_ALEN);
	__builtin_memcpy(addrs + ETH_ALEN, src, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, addrs, sizeof(addrs), 0) < 0)
		return -1;
	return 0;
}

/* load and validate an Ethernet/IPv4 ARP request */
static __always_inline bool arp_load_request(struct __sk_buff *skb, struct arp_eth *arp)
{
	if (bpf_skb_load_bytes(skb, ETH_HLEN, arp, sizeof(*arp)) < 0)
		return false;
	return arp->ar_hrd == bpf_htons(ARPHRD_ETHER) &&
	       arp->ar_pro == bpf_htons(ETH_P_IP) &&
	       arp->ar_hln == ETH_ALEN && arp->ar_pln == 4 &&
	       arp->ar_op == bpf_htons(ARPOP_REQUEST);
}

/* turn the request in place into a reply from `mac` for the target IP and
 * send it back out of `ifindex` (the host-side veth: the pod receives it) */
static __always_inline int arp_respond(struct __sk_buff *skb, const struct arp_eth *req,
				       const __u8 *mac, __u32 ifindex)
{
	struct arp_eth rep = {};

	rep.ar_hrd = req->ar_hrd;
	rep.ar_pro = req->ar_pro;
	rep.ar_hln = ETH_ALEN;
	rep.ar_pln = 4;
	rep.ar_op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(rep.ar_sha, mac, ETH_ALEN);
	rep.ar_sip = req->ar_tip;
	__builtin_memcpy(rep.ar_tha, req->ar_sha, ETH_ALEN);
	rep.ar_tip = req->ar_sip;

	if (eth_store_addrs(skb, req->ar_sha, mac) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &rep, sizeof(rep), 0) < 0)
		return -1;
	return bpf_redirect(ifindex, 0);
}

#endif
