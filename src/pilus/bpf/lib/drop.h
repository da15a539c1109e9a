/* SPDX-License-Identifier: Apache-2.0 */
/* The drop funnel: every drop goes through here (metrics + rate-limited event). */
#ifndef __PILUS_DROP_H
#define __PILUS_DROP_H

#include "common.h"
#include "metrics.h"
#include "events.h"

struct drop_ctx {
	__u16 source;      /* endpoint id */
	__u32 src_label;
	__u32 dst_label;
	__u32 dst_id;
	__u32 ifindex;
};

static __always_inline int __send_drop(struct __sk_buff *skb, const struct drop_ctx *d,
				       __u8 reason, __u8 dir, __u16 line)
{
	update_metrics(skb->len, dir, reason);
	send_drop_notify(skb, d->source, d->src_label, d->dst_label, d->dst_id,
			 d->ifindex, reason, line);
	return CTX_ACT_SHOT;
}

#define send_drop(skb, d, reason, dir) __send_drop(skb, d, reason, dir, __LINE__)

#endif
