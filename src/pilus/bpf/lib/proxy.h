/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The L7 proxy redirect (Cilium's bpf/lib/proxy.h, TPROXY by socket assign).
 *
 * A connection that an allow entry with a proxy port covers is handed to the
 * proxy (src/pilus/proxy, `python -m pilus.proxy`) in the node's netns: at tc
 * ingress, the packet's socket is looked up (an established one for its
 * 4-tuple, else the proxy's transparent listener on proxy_port), assigned with
 * bpf_sk_assign and the packet goes to the stack with MARK_MAGIC_TO_PROXY,
 * which the node's policy routing delivers locally whatever its destination
 * (`ip rule fwmark 0x200/0xf00 lookup 2004`, `local 0.0.0.0/0 dev lo table
 * 2004`, src/pilus/node/setup.py). TCP and UDP (the DNS proxy's unconnected
 * transparent socket: every datagram of a flow goes to it); ICMP and non-first
 * fragments (no ports) with a proxy port stay plain L4.
 *
 * Marks (Cilium's, mask 0x0F00):
 *   MARK_MAGIC_TO_PROXY       datapath -> stack: deliver locally (to a proxy
 *                             socket); a hairpin from to-container carries
 *                             the listener port in mark >> 16
 *   MARK_MAGIC_PROXY_INGRESS  the ingress / egress proxy's upstream sockets
 *   MARK_MAGIC_PROXY_EGRESS   (SO_MARK): already judged, never redirected again
 * Pods cannot forge marks: crossing the veth from the pod's netns scrubs them.
 */
#ifndef __PILUS_PROXY_H
#define __PILUS_PROXY_H

#include <linux/bpf.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "ipv4.h"
#include "conntrack.h"
#include "drop.h"
#include "trace.h"
#include "metrics.h"

#define MARK_MAGIC_TO_PROXY      0x0200
#define MARK_MAGIC_PROXY_INGRESS 0x0A00
#define MARK_MAGIC_PROXY_EGRESS  0x0B00
#define MARK_MAGIC_HOST_MASK     0x0F00

static __always_inline __u32 mark_magic(__u32 mark)
{
	return mark & MARK_MAGIC_HOST_MASK;
}

static __always_inline bool mark_from_proxy(__u32 mark)
{
	__u32 m = mark_magic(mark);

	return m == MARK_MAGIC_PROXY_INGRESS || m == MARK_MAGIC_PROXY_EGRESS;
}

/* TCP and UDP are redirected; anything else with a proxy port stays L4 */
static __always_inline __be16 proxy_port_l4(const struct pkt4 *p, __be16 proxy_port)
{
	if ((p->ip.protocol != IPPROTO_TCP && p->ip.protocol != IPPROTO_UDP) || p->is_fragment)
		return 0;
	return proxy_port;
}

/* the packet's own 4-tuple, as a socket lookup takes it */
static __always_inline void sock_tuple4(const struct pkt4 *p, struct bpf_sock_tuple *t)
{
	t->ipv4.saddr = p->ip.saddr;
	t->ipv4.daddr = p->ip.daddr;
	t->ipv4.sport = p->sport;
	t->ipv4.dport = p->dport;
}

/* assign the socket: returns 0 (assigned), 1 (nothing to assign) or a drop reason */
static __always_inline int proxy_assign(struct __sk_buff *skb, struct bpf_sock_tuple *t,
					bool established)
{
	struct bpf_sock *sk;
	__u32 state;
	long err;

	sk = bpf_skc_lookup_tcp(skb, t, sizeof(t->ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 1;
	state = sk->state;
	/* a listener on the original port is not the proxy, and a TIME_WAIT
	 * socket cannot take a packet (a SYN then finds the listener) */
	if (established && (state == BPF_TCP_LISTEN || state == BPF_TCP_TIME_WAIT)) {
		bpf_sk_release(sk);
		return 1;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? DROP_PROXY_SET_FAILED : 0;
}

/* UDP: the proxy's socket on proxy_port. The lookup with address and peer 0
 * only matches an unconnected socket bound to 0.0.0.0 (the DNS proxy's), so
 * its transparent answer sockets (bound to server:53) never take a query. */
static __always_inline int proxy_sk_assign_udp4(struct __sk_buff *skb, __be16 proxy_port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	long err;

	t.ipv4.dport = proxy_port;
	sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return DROP_PROXY_LOOKUP_FAILED;
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? DROP_PROXY_SET_FAILED : 0;
}

/* TCP: the established socket for the packet's 4-tuple (the proxy's accepted
 * one), else the proxy's listener on proxy_port (any address: a 0.0.0.0
 * listener matches whatever the destination); UDP: proxy_sk_assign_udp4.
 * Returns 0 or a drop reason. */
static __always_inline int proxy_sk_assign4(struct __sk_buff *skb, const struct pkt4 *p,
					    __be16 proxy_port)
{
	struct bpf_sock_tuple t = {};
	int ret;

	if (p->ip.protocol == IPPROTO_UDP)
		return proxy_sk_assign_udp4(skb, proxy_port);
	sock_tuple4(p, &t);
	ret = proxy_assign(skb, &t, true);
	if (ret != 1)
		return ret;
	__builtin_memset(&t, 0, sizeof(t));
	t.ipv4.dport = proxy_port;
	ret = proxy_assign(skb, &t, false);
	return ret == 1 ? DROP_PROXY_LOOKUP_FAILED : ret;
}

/* a packet for a socket of the node netns (a proxy's upstream connection):
 * to the stack with MARK_MAGIC_TO_PROXY so it is delivered locally */
static __always_inline int proxy_to_stack4(struct __sk_buff *skb, const struct ct_result *ct,
					   struct drop_ctx *d, __u8 metric_dir)
{
	__u32 ifindex = skb->ingress_ifindex;

	/* from the tunnel device the inner destination MAC is not ours: the
	 * stack must take the packet as for this host (harmless elsewhere) */
	if (bpf_skb_change_type(skb, PACKET_HOST) < 0)
		return send_drop(skb, d, DROP_WRITE_ERROR, metric_dir);
	skb->mark = MARK_MAGIC_TO_PROXY;
	send_trace(skb, ct, TRACE_TO_PROXY, d->source, d->src_label, d->dst_label, d->dst_id,
		   ifindex);
	update_metrics(skb->len, metric_dir, REASON_FORWARDED);
	return CTX_ACT_OK;
}

/*
 * Hand the packet to the proxy at proxy_port (tc ingress only): socket
 * assign, MARK_MAGIC_TO_PROXY, a TRACE_TO_PROXY, CTX_ACT_OK to the stack.
 * No proxy socket: dropped with DROP_PROXY_LOOKUP_FAILED, the connection is
 * never let past L7.
 */
static __always_inline int proxy_redirect4(struct __sk_buff *skb, const struct pkt4 *p,
					   __be16 proxy_port, const struct ct_result *ct,
					   struct drop_ctx *d, __u8 metric_dir)
{
	int ret = proxy_sk_assign4(skb, p, proxy_port);

	if (ret)
		return send_drop(skb, d, ret, metric_dir);
	return proxy_to_stack4(skb, ct, d, metric_dir);
}

/* UDP: the lookup also returns a socket that is bound to a wildcard address
 * or not connected (any node service on that port); only one connected to
 * exactly this tuple, with a proxy's mark, is a proxy's upstream socket */
static __always_inline bool proxy_reply_to_node_udp4(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	bool found;

	sock_tuple4(p, &t);
	sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return false;
	found = sk->src_ip4 == p->ip.daddr && sk->src_port == bpf_ntohs(p->dport) &&
		sk->dst_ip4 == p->ip.saddr && sk->dst_port == p->sport &&
		mark_from_proxy(sk->mark);
	bpf_sk_release(sk);
	return found;
}

/* a packet that conntrack does not know but whose 4-tuple is a socket of the
 * node netns: a reply to a proxy's upstream connection that left through the
 * stack (another node's pod, the world). TCP: not a pure SYN, a socket that
 * is no listener; UDP: proxy_reply_to_node_udp4. */
static __always_inline bool proxy_reply_to_node_socket4(struct __sk_buff *skb,
							const struct pkt4 *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	bool found;

	if (p->is_fragment)
		return false;
	if (p->ip.protocol == IPPROTO_UDP)
		return proxy_reply_to_node_udp4(skb, p);
	if (p->ip.protocol != IPPROTO_TCP ||
	    (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return false;
	sock_tuple4(p, &t);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return false;
	found = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return found;
}

#endif /* __PILUS_PROXY_H */
