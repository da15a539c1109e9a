/* SPDX-License-Identifier: Apache-2.0 */
/* All pilus maps. Pinned by name under <bpffs>/pilus/<node>/ by the loader. */
#ifndef __PILUS_MAPS_H
#define __PILUS_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "common.h"

/* endpoint IP -> endpoint (local delivery decision) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, PILUS_LXC_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lxc SEC(".maps");

/* host-side ifindex -> endpoint (who is sending) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	__uint(max_entries, PILUS_LXC_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lxc_if SEC(".maps");

/* prefix -> identity, tunnel endpoint */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct remote_endpoint_info);
	__uint(max_entries, PILUS_IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_ipcache SEC(".maps");

/* prefix -> local identity, for the prefixes (cidr and except alike) that
 * Kubernetes NetworkPolicy ipBlocks name and nothing else; only ipBlock
 * selectors select these identities. The second policy lookup of lib/policy.h,
 * so that an ipBlock matches pod addresses too (the ipcache gives pods their
 * own identity). Written by the agent (src/pilus/endpoint/policy_sync.py). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, __u32);
	__uint(max_entries, PILUS_IPBLOCK_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_ipblock SEC(".maps");

/* IPv4 conntrack */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, PILUS_CT4_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_ct4 SEC(".maps");

/* endpoint id -> that endpoint's policy map (LPM trie, created and pinned as
 * pilus_policy_<id> by the agent: src/pilus/datapath/policy.py). The inner
 * maps must have exactly this shape (type, key/value size, max_entries, flags). */
struct pilus_policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_entry);
	__uint(max_entries, PILUS_POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, __u32);
	__uint(max_entries, PILUS_POLICY_EPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct pilus_policy_inner);
} pilus_policy SEC(".maps");

/* (reason, direction) -> packets, bytes; per CPU, summed by the agent */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
	__uint(max_entries, PILUS_METRICS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_metrics SEC(".maps");

/* drop / trace notifications */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PILUS_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_events SEC(".maps");

/* per-CPU token bucket limiting event emission */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ev_bucket);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_ev_bucket SEC(".maps");

/* per-CPU count of events not emitted: [0] rate limited, [1] ring buffer full */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, EVENTS_LOST_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_ev_lost SEC(".maps");

#endif /* __PILUS_MAPS_H */
