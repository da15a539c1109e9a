/* SPDX-License-Identifier: Apache-2.0 */
#ifndef __PILUS_FIB_H
#define __PILUS_FIB_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "config.h"
#include "ipv4.h"
#include "eth.h"

/*
 * A reply whose source became a node address (NodePort) must not go through
 * the stack: arriving from an lxc with a local source it would be dropped as
 * a martian. Route it ourselves (FIB lookup, then redirect to the egress
 * device; the kernel resolves the neighbour if needed). Returns the tc
 * verdict, or -1 to leave the packet to the stack.
 */
static __always_inline bool lb4_is_host_addr(__be32 addr)
{
	return addr && (addr == CFG(node_ip) || addr == CFG(router_ip));
}

static __always_inline int lb4_fib_redirect(struct __sk_buff *skb, struct pkt4 *p)
{
	struct bpf_fib_lookup fib = {};
	int ret;

	fib.family = 2; /* AF_INET */
	fib.tos = p->ip.tos;
	fib.l4_protocol = p->ip.protocol;
	fib.tot_len = bpf_ntohs(p->ip.tot_len);
	fib.ipv4_src = p->ip.saddr;
	fib.ipv4_dst = p->ip.daddr;
	fib.ifindex = skb->ingress_ifindex;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	if (ipv4_dec_ttl(skb, p))
		return -1;
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	if (eth_store_addrs(skb, fib.dmac, fib.smac) < 0)
		return -1;
	return bpf_redirect(fib.ifindex, 0);
}

#endif /* __PILUS_FIB_H */
