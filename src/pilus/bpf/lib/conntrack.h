/* SPDX-License-Identifier: Apache-2.0 */
/*
 * IPv4 connection tracking. One entry per connection, keyed by the tuple of
 * the original direction (the packet that created it). A packet matching the
 * key is CT_ESTABLISHED (tx side), one matching the reversed key is CT_REPLY
 * (rx side), anything else creates an entry (CT_NEW). Monitor aggregation
 * ("medium"): a trace is reported for the first packet of a connection, the
 * first reply, whenever a TCP SYN/FIN/RST is first seen in a direction, and
 * again for a direction not reported for trace_report_interval seconds. Entries are refreshed
 * by the datapath and expire by lifetime; deletion is left to LRU eviction and
 * the agent (flush/GC).
 *
 * Policy plugs in between lookup and creation: ct_lookup4() classifies the
 * packet (and refreshes an existing entry), the caller consults policy for
 * CT_NEW only, and ct_create4() records the connection after the allow, so a
 * denied packet never leaves an entry that later packets could ride on.
 * ICMP errors (unreachable, time exceeded, ...) whose embedded header belongs
 * to a tracked connection are CT_RELATED; ICMP messages other than echo
 * requests are never recorded (each one is checked on its own).
 * One entry serves both ends of a connection on this node: a pod-to-pod
 * packet is checked for the sender's egress and the receiver's ingress
 * before the single entry is created; replies match the reversed key.
 */
#ifndef __PILUS_CONNTRACK_H
#define __PILUS_CONNTRACK_H

#include "maps.h"
#include "config.h"
#include "ipv4.h"

struct ct_result {
	__u8 state;     /* CT_NEW / CT_ESTABLISHED / CT_REPLY / CT_RELATED */
	bool report;    /* monitor aggregation: emit a trace for this packet */
	__u32 src_sec_id;
	__u16 flags;       /* the entry's CT_F_* (0 for CT_NEW / CT_RELATED) */
	__be16 proxy_port; /* the entry's proxy port (CT_F_PROXY_REDIRECT) */
};

/* seconds of CLOCK_MONOTONIC: the clock of every lifetime in the CT and LB
 * maps (the agent reads it too, datapath/maps.py). The coarse clock (the
 * last tick's time: no clock source read per packet) is the same clock at
 * tick resolution, far below a second. */
static __always_inline __u32 bpf_now_sec(void)
{
	return (__u32)(bpf_ktime_get_coarse_ns() / 1000000000ULL);
}

static __always_inline void ct_tuple4(const struct pkt4 *p, struct ipv4_ct_tuple *t, bool reverse)
{
	__builtin_memset(t, 0, sizeof(*t));
	t->nexthdr = p->ip.protocol;
	if (!reverse) {
		t->saddr = p->ip.saddr;
		t->daddr = p->ip.daddr;
		t->sport = p->sport;
		t->dport = p->dport;
	} else {
		t->saddr = p->ip.daddr;
		t->daddr = p->ip.saddr;
		t->sport = p->dport;
		t->dport = p->sport;
	}
}

static __always_inline __u32 ct_lifetime(const struct ct_entry *e, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return CFG(ct_lifetime_nontcp);
	if (e->flags & (CT_F_RX_CLOSING | CT_F_TX_CLOSING))
		return CFG(ct_close_timeout);
	if (e->flags & CT_F_SEEN_NON_SYN)
		return CFG(ct_lifetime_tcp);
	return CFG(ct_syn_timeout);
}

static __always_inline void ct_tcp_update(struct ct_entry *e, __u8 tcp_flags, bool is_reply)
{
	if (tcp_flags & TCP_FLAG_RST) {
		e->flags |= CT_F_RX_CLOSING | CT_F_TX_CLOSING;
	} else if (tcp_flags & TCP_FLAG_FIN) {
		e->flags |= is_reply ? CT_F_RX_CLOSING : CT_F_TX_CLOSING;
	}
	if (!(tcp_flags & TCP_FLAG_SYN))
		e->flags |= CT_F_SEEN_NON_SYN;
}

#define ICMP_DEST_UNREACH   3
#define ICMP_SOURCE_QUENCH  4
#define ICMP_TIME_EXCEEDED  11
#define ICMP_PARAMETERPROB  12

static __always_inline bool icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH ||
	       type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* monitor aggregation: a direction last reported at `last` is due again */
static __always_inline bool ct_report_due(__u32 last, __u32 now)
{
	__u32 interval = CFG(trace_report_interval);

	return interval && now - last >= interval;
}

static __always_inline struct ct_entry *ct_lookup_live(struct ipv4_ct_tuple *t, __u32 now)
{
	struct ct_entry *e = bpf_map_lookup_elem(&pilus_ct4, t);

	if (e && e->lifetime < now)
		return NULL;
	return e;
}

/* an ICMP error about a tracked connection: the embedded header (the packet
 * that caused the error) matches an entry in either direction */
static __always_inline struct ct_entry *ct_lookup_related4(struct __sk_buff *skb,
							   const struct pkt4 *p, __u32 now)
{
	struct ipv4_ct_tuple t = {};
	struct ct_entry *e;
	struct iphdr in;
	__u32 off = p->l4_off + sizeof(struct icmp_echo_hdr);
	__u8 l4[8];
	__be16 tmp;

	if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)) < 0)
		return NULL;
	if (in.version != 4 || in.ihl < 5)
		return NULL;
	if (bpf_skb_load_bytes(skb, off + in.ihl * 4, l4, sizeof(l4)) < 0)
		return NULL;
	t.saddr = in.saddr;
	t.daddr = in.daddr;
	t.nexthdr = in.protocol;
	switch (in.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		__builtin_memcpy(&t.sport, &l4[0], 2);
		__builtin_memcpy(&t.dport, &l4[2], 2);
		break;
	case IPPROTO_ICMP:
		/* as pkt4_parse: echo id in sport (request) or dport (reply) */
		if (l4[0] == ICMP_ECHO)
			__builtin_memcpy(&t.sport, &l4[4], 2);
		else if (l4[0] == ICMP_ECHOREPLY)
			__builtin_memcpy(&t.dport, &l4[4], 2);
		else
			return NULL;
		break;
	default:
		return NULL;
	}
	e = ct_lookup_live(&t, now);
	if (e)
		return e;
	tmp = t.saddr;
	t.saddr = t.daddr;
	t.daddr = tmp;
	tmp = t.sport;
	t.sport = t.dport;
	t.dport = tmp;
	return ct_lookup_live(&t, now);
}

/*
 * Classify a packet: CT_ESTABLISHED / CT_REPLY (the entry is refreshed and
 * counted), CT_RELATED (ICMP error of a tracked connection; nothing changes)
 * or CT_NEW (nothing recorded yet: call ct_create4() once the packet is
 * allowed). Returns 0 (no drop reasons today; kept for symmetry).
 */
static __always_inline int ct_lookup4(struct __sk_buff *skb, const struct pkt4 *p,
				      struct ct_result *res)
{
	struct ipv4_ct_tuple tuple;
	struct ct_entry *e;
	__u32 now = bpf_now_sec();
	__u8 proto = p->ip.protocol;
	__u8 tcp_flags = proto == IPPROTO_TCP ? p->tcp_flags : 0;
	bool is_reply = false;
	__u8 seen;
	__u16 fresh;

	res->report = false;
	res->src_sec_id = 0;
	res->flags = 0;
	res->proxy_port = 0;
	ct_tuple4(p, &tuple, false);
	e = ct_lookup_live(&tuple, now);
	if (!e) {
		struct ipv4_ct_tuple rev;

		ct_tuple4(p, &rev, true);
		e = ct_lookup_live(&rev, now);
		if (e)
			is_reply = true;
	}

	/* a SYN (without ACK) on a closing connection: the 4-tuple is reused */
	if (e && proto == IPPROTO_TCP && !is_reply &&
	    (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
	    (e->flags & (CT_F_RX_CLOSING | CT_F_TX_CLOSING)))
		e = NULL;

	if (!e) {
		res->report = true;
		if (proto == IPPROTO_ICMP && !p->is_fragment && icmp_is_error(p->icmp_type)) {
			e = ct_lookup_related4(skb, p, now);
			if (e) {
				res->state = CT_RELATED;
				res->src_sec_id = e->src_sec_id;
				return 0;
			}
		}
		res->state = CT_NEW;
		return 0;
	}

	if (is_reply) {
		/* the first reply is reported too (Cilium: last_rx_report == 0) */
		bool first = e->rx_packets == 0;

		__sync_fetch_and_add(&e->rx_packets, 1);
		__sync_fetch_and_add(&e->rx_bytes, skb->len);
		seen = e->rx_flags_seen;
		fresh = tcp_flags & CT_REPORT_FLAGS & ~seen;
		if (first)
			fresh |= 0x100;
		else if (ct_report_due(e->last_rx_report, now))
			fresh |= 0x200;
		if (tcp_flags & ~seen)
			e->rx_flags_seen = seen | tcp_flags;
		if (fresh)
			e->last_rx_report = now;
	} else {
		__sync_fetch_and_add(&e->tx_packets, 1);
		__sync_fetch_and_add(&e->tx_bytes, skb->len);
		seen = e->tx_flags_seen;
		fresh = tcp_flags & CT_REPORT_FLAGS & ~seen;
		if (ct_report_due(e->last_tx_report, now))
			fresh |= 0x200;
		if (tcp_flags & ~seen)
			e->tx_flags_seen = seen | tcp_flags;
		if (fresh)
			e->last_tx_report = now;
	}
	if (proto == IPPROTO_TCP)
		ct_tcp_update(e, tcp_flags, is_reply);
	e->lifetime = now + ct_lifetime(e, proto);

	res->state = is_reply ? CT_REPLY : CT_ESTABLISHED;
	res->report = fresh != 0;
	res->src_sec_id = e->src_sec_id;
	res->flags = e->flags;
	res->proxy_port = e->proxy_port;
	return 0;
}

/* record a CT_NEW packet's connection (after policy allowed it) with extra
 * CT_F_PROXY_* `flags` and the proxy port; returns 0 or a drop reason. ICMP
 * other than echo requests is not recorded. */
static __always_inline int ct_create4_proxy(struct __sk_buff *skb, const struct pkt4 *p,
					    __u8 dir, __u32 src_sec_id, __u16 flags,
					    __be16 proxy_port, struct ct_result *res)
{
	struct ipv4_ct_tuple tuple;
	struct ct_entry ne = {};
	__u32 now = bpf_now_sec();
	__u8 proto = p->ip.protocol;
	__u8 tcp_flags = proto == IPPROTO_TCP ? p->tcp_flags : 0;

	res->state = CT_NEW;
	res->report = true;
	res->src_sec_id = src_sec_id;
	res->flags = flags;
	res->proxy_port = proxy_port;
	if (proto == IPPROTO_ICMP && (p->is_fragment || p->icmp_type != ICMP_ECHO))
		return 0;

	ct_tuple4(p, &tuple, false);
	ne.tx_packets = 1;
	ne.tx_bytes = skb->len;
	ne.tx_flags_seen = tcp_flags;
	ne.src_sec_id = src_sec_id;
	ne.flags = (dir == CT_INGRESS ? CT_F_INGRESS : 0) | flags;
	ne.proxy_port = proxy_port;
	if (proto == IPPROTO_TCP)
		ct_tcp_update(&ne, tcp_flags, false);
	ne.lifetime = now + ct_lifetime(&ne, proto);
	ne.last_tx_report = now;
	if (bpf_map_update_elem(&pilus_ct4, &tuple, &ne, BPF_ANY) < 0)
		return DROP_CT_CREATE_FAILED;
	return 0;
}

static __always_inline int ct_create4(struct __sk_buff *skb, const struct pkt4 *p,
				      __u8 dir, __u32 src_sec_id, struct ct_result *res)
{
	return ct_create4_proxy(skb, p, dir, src_sec_id, 0, 0, res);
}

/* lookup and, for CT_NEW, create at once (no policy in between); returns 0
 * or a drop reason */
static __always_inline int ct_process4(struct __sk_buff *skb, const struct pkt4 *p,
				       __u8 dir, __u32 src_sec_id, struct ct_result *res)
{
	int ret = ct_lookup4(skb, p, res);

	if (ret || res->state != CT_NEW)
		return ret;
	return ct_create4(skb, p, dir, src_sec_id, res);
}

#endif
