/* SPDX-License-Identifier: Apache-2.0 */
/* Ring buffer notifications with a per-CPU token bucket. */
#ifndef __PILUS_EVENTS_H
#define __PILUS_EVENTS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "config.h"

#define NSEC_PER_SEC 1000000000ULL

/*
 * Event types somebody listens to, one bit per NOTIFY_* type. The agent
 * writes it whenever its monitor subscribers change (as Cilium, which reads
 * and decodes events only while a monitor listener exists): a type nobody
 * listens to is not rate limited, reserved or copied, and costs one load.
 * Drops are counted in metrics either way (drop.h). Writable data, not load
 * time config: it changes while the programs run. Every type by default, for
 * tests that read the ring buffer directly.
 */
volatile __u32 pilus_monitor_mask SEC(".data.monitor") = 0xffffffff;

static __always_inline bool events_wanted(__u8 type)
{
	return pilus_monitor_mask & (1U << type);
}

static __always_inline void events_lost_inc(__u32 slot)
{
	__u64 *cnt = bpf_map_lookup_elem(&pilus_ev_lost, &slot);

	if (cnt)
		*cnt += 1;
}

/* true if an event may be emitted now (consumes one token) */
static __always_inline bool events_allow(void)
{
	__u32 zero = 0;
	__u64 rate = CFG(events_rate);
	__u64 burst = CFG(events_burst);
	struct ev_bucket *b;
	__u64 now, elapsed, cap;

	if (rate == 0)
		return true;
	if (burst == 0)
		burst = 1;
	b = bpf_map_lookup_elem(&pilus_ev_bucket, &zero);
	if (!b)
		return false;
	cap = burst * NSEC_PER_SEC;
	now = bpf_ktime_get_ns();
	if (b->last_ns == 0) {
		b->tokens = cap;
	} else {
		elapsed = now - b->last_ns;
		/* bound the multiplication: a full bucket needs burst/rate seconds */
		if (elapsed > 100 * NSEC_PER_SEC)
			elapsed = 100 * NSEC_PER_SEC;
		b->tokens += elapsed * rate;
		if (b->tokens > cap)
			b->tokens = cap;
	}
	b->last_ns = now;
	if (b->tokens < NSEC_PER_SEC) {
		events_lost_inc(EVENTS_LOST_RATELIMIT);
		return false;
	}
	b->tokens -= NSEC_PER_SEC;
	return true;
}

/* copy up to TRACE_PAYLOAD_LEN bytes of the packet; returns bytes copied */
static __always_inline __u16 capture_packet(struct __sk_buff *skb, __u8 *dst)
{
	__u32 len = skb->len;

	if (len > TRACE_PAYLOAD_LEN)
		len = TRACE_PAYLOAD_LEN;
	if (len < 1)
		return 0;
	if (bpf_skb_load_bytes(skb, 0, dst, len) < 0)
		return 0;
	return (__u16)len;
}

static __always_inline void fill_capture_hdr(struct __sk_buff *skb,
					     struct notify_capture_hdr *hdr,
					     __u8 type, __u8 subtype, __u16 source)
{
	hdr->common.type = type;
	hdr->common.subtype = subtype;
	hdr->common.source = source;
	hdr->common.hash = bpf_get_hash_recalc(skb);
	hdr->len_orig = skb->len;
	hdr->version = NOTIFY_CAPTURE_VER;
}

/* Space for one event of `type` (NOTIFY_*) on the ring, or NULL when nobody
 * listens to the type (not counted), or the rate limit or a full ring says no
 * (both counted as lost). */
static __always_inline void *event_reserve(__u8 type, __u64 size)
{
	void *n;

	if (!events_wanted(type))
		return NULL;
	if (!events_allow())
		return NULL;
	n = bpf_ringbuf_reserve(&pilus_events, size, 0);
	if (!n)
		events_lost_inc(EVENTS_LOST_RINGBUF);
	return n;
}

static __always_inline void send_drop_notify(struct __sk_buff *skb, __u16 source,
					     __u32 src_label, __u32 dst_label,
					     __u32 dst_id, __u32 ifindex,
					     __u8 reason, __u16 line)
{
	struct drop_notify *n;

	n = event_reserve(NOTIFY_DROP, sizeof(*n));
	if (!n)
		return;
	fill_capture_hdr(skb, &n->hdr, NOTIFY_DROP, reason, source);
	n->src_label = src_label;
	n->dst_label = dst_label;
	n->dst_id = dst_id;
	n->ifindex = ifindex;
	n->line = line;
	n->file = 0;
	n->ext_error = 0;
	n->pad = 0;
	n->hdr.len_cap = capture_packet(skb, n->data);
	bpf_ringbuf_submit(n, 0);
}

static __always_inline void send_trace_notify(struct __sk_buff *skb, __u8 obs_point,
					      __u16 source, __u32 src_label,
					      __u32 dst_label, __u32 dst_id,
					      __u32 ifindex, __u8 ct_state)
{
	struct trace_notify *n;

	n = event_reserve(NOTIFY_TRACE, sizeof(*n));
	if (!n)
		return;
	fill_capture_hdr(skb, &n->hdr, NOTIFY_TRACE, obs_point, source);
	n->src_label = src_label;
	n->dst_label = dst_label;
	n->dst_id = dst_id;
	n->ifindex = ifindex;
	n->reason = ct_state;
	n->flags = 0;
	n->pad1 = 0;
	n->pad2 = 0;
	n->hdr.len_cap = capture_packet(skb, n->data);
	bpf_ringbuf_submit(n, 0);
}

#endif
