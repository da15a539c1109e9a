/* SPDX-License-Identifier: Apache-2.0 */
/* Trace notifications with monitor aggregation. pilus_config.trace_aggregate is
 * Cilium's level: none 0, lowest 1, low 2, medium 3, maximum 4. From medium on, a
 * trace is sent only when conntrack says so (ct->report: a new connection, its first
 * reply, a TCP SYN/FIN/RST first seen in a direction, or a live connection again
 * after trace_report_interval seconds). Below medium every packet is traced; the
 * levels lowest and low hide receive-side (from-*) traces in Cilium, and pilus emits
 * none of those, so they trace as none does. */
#ifndef __PILUS_TRACE_H
#define __PILUS_TRACE_H

#include "events.h"
#include "conntrack.h"

#define TRACE_AGGREGATE_ACTIVE_CT 3 /* medium */

static __always_inline void send_trace(struct __sk_buff *skb, const struct ct_result *ct,
				       __u8 obs_point, __u16 source, __u32 src_label,
				       __u32 dst_label, __u32 dst_id, __u32 ifindex)
{
	if (CFG(trace_aggregate) >= TRACE_AGGREGATE_ACTIVE_CT && !ct->report)
		return;
	send_trace_notify(skb, obs_point, source, src_label, dst_label, dst_id,
			  ifindex, ct->state);
}

#endif
