/* SPDX-License-Identifier: Apache-2.0 */
/*
 * IPv4 connection tracking. One entry per connection, keyed by the tuple of
 * the original direction (the packet that created it). A packet matching the
 * key is CT_ESTABLISHED (tx side), one matching the reversed key is CT_REPLY
 * (rx side), anything else creates an entry (CT_NEW). Monitor aggregation
 * ("medium"): a trace is reported for the first packet of a connection, the
 * first reply, and whenever a TCP SYN/FIN/RST is first seen in a direction. Entries are refreshed
 * by the datapath and expire by lifetime; deletion is left to LRU eviction and
 * the agent (flush/GC). The result is used for monitor aggregation now and is
 * where per-endpoint policy plugs in (policy only for CT_NEW).
 */
#ifndef __PILUS_CONNTRACK_H
#define __PILUS_CONNTRACK_H

#include "maps.h"
#include "config.h"
#include "ipv4.h"

struct ct_result {
	__u8 state;     /* CT_NEW / CT_ESTABLISHED / CT_REPLY */
	bool report;    /* monitor aggregation: emit a trace for this packet */
	__u32 src_sec_id;
};

static __always_inline __u32 bpf_now_sec(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000000ULL);
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

/* returns 0 or a drop reason */
static __always_inline int ct_process4(struct __sk_buff *skb, const struct pkt4 *p,
				       __u8 dir, __u32 src_sec_id, struct ct_result *res)
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
	ct_tuple4(p, &tuple, false);
	e = bpf_map_lookup_elem(&pilus_ct4, &tuple);
	if (e && e->lifetime < now)
		e = NULL;
	if (!e) {
		struct ipv4_ct_tuple rev;

		ct_tuple4(p, &rev, true);
		e = bpf_map_lookup_elem(&pilus_ct4, &rev);
		if (e && e->lifetime < now)
			e = NULL;
		if (e)
			is_reply = true;
	}

	/* a SYN (without ACK) on a closing connection: the 4-tuple is reused */
	if (e && proto == IPPROTO_TCP && !is_reply &&
	    (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
	    (e->flags & (CT_F_RX_CLOSING | CT_F_TX_CLOSING)))
		e = NULL;

	if (!e) {
		struct ct_entry ne = {};

		ne.tx_packets = 1;
		ne.tx_bytes = skb->len;
		ne.tx_flags_seen = tcp_flags;
		ne.src_sec_id = src_sec_id;
		ne.flags = dir == CT_INGRESS ? CT_F_INGRESS : 0;
		if (proto == IPPROTO_TCP)
			ct_tcp_update(&ne, tcp_flags, false);
		ne.lifetime = now + ct_lifetime(&ne, proto);
		ne.last_tx_report = now;
		if (bpf_map_update_elem(&pilus_ct4, &tuple, &ne, BPF_ANY) < 0)
			return DROP_CT_CREATE_FAILED;
		res->state = CT_NEW;
		res->report = true;
		res->src_sec_id = src_sec_id;
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
		if (tcp_flags & ~seen)
			e->rx_flags_seen = seen | tcp_flags;
		if (fresh)
			e->last_rx_report = now;
	} else {
		__sync_fetch_and_add(&e->tx_packets, 1);
		__sync_fetch_and_add(&e->tx_bytes, skb->len);
		seen = e->tx_flags_seen;
		fresh = tcp_flags & CT_REPORT_FLAGS & ~seen;
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
	return 0;
}

#endif
