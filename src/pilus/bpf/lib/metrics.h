/* SPDX-License-Identifier: Apache-2.0 */
#ifndef __PILUS_METRICS_H
#define __PILUS_METRICS_H

#include "maps.h"

static __always_inline void update_metrics(__u64 bytes, __u8 dir, __u8 reason)
{
	struct metrics_key key = { .reason = reason, .dir = dir };
	struct metrics_value *val;

	val = bpf_map_lookup_elem(&pilus_metrics, &key);
	if (val) {
		/* per-CPU value: no atomics needed */
		val->count += 1;
		val->bytes += bytes;
	} else {
		struct metrics_value init = { .count = 1, .bytes = bytes };

		bpf_map_update_elem(&pilus_metrics, &key, &init, BPF_ANY);
	}
}

#endif
