/* SPDX-License-Identifier: Apache-2.0 */
/* Trace notifications with monitor aggregation ("medium": CT-driven). */
#ifndef __PILUS_TRACE_H
#define __PILUS_TRACE_H

#include "events.h"
#include "conntrack.h"

static __always_inline void send_trace(struct __sk_buff *skb, const struct ct_result *ct,
				       __u8 obs_point, __u16 source, __u32 src_label,
				       __u32 dst_label, __u32 dst_id, __u32 ifindex)
{
	if (CFG(trace_aggregate) && !ct->report)
		return;
	send_trace_notify(skb, obs_point, source, src_label, dst_label, dst_id,
			  ifindex, ct->state);
}

#endif
