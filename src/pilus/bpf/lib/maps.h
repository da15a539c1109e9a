/* SPDX-License-Identifier: Apache-2.0 */
/*
 * All pilus maps. Pinned by name under <bpffs>/pilus/<node>/ by the loader:
 * every object (bpf_lxc.o, bpf_host.o, bpf_sock.o) declares the same maps and
 * libbpf reuses the pins, so the objects share one set of maps (without pins,
 * in tests, the loader hands the first object's map fds to the others). The
 * socket LB's own maps exist only in bpf_sock.o (PILUS_SOCK_MAPS), so a node
 * without --socket-lb does not allocate them.
 */
#ifndef __PILUS_MAPS_H
#define __PILUS_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "common.h"
#include "lb.h"
#include "sock.h"

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

/* remote node's pod CIDR -> its node IP (tunnel mode): where to encapsulate
 * what the ipcache has no tunnel endpoint for. Written by the agent from the
 * node registry (src/pilus/node/routes.py); `pilus bpf tunnel list`. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct tunnel_value);
	__uint(max_entries, PILUS_TUNNEL_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_tunnel_map SEC(".maps");

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

/* BTF anchor, never called: the inner map's key and value are only reached
 * through the map-in-map definition, where clang emits them as forward
 * declarations; libbpf needs them in full to open the map (so every object
 * needs this), and tests/unit/test_abi.py compares them with abi.py */
struct pilus_policy_abi {
	struct policy_key key;
	struct policy_entry entry;
	struct policy_verdict_notify verdict;
};

__attribute__((noinline)) int pilus_abi_anchor_policy(struct pilus_policy_abi *p)
{
	return p != 0;
}

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

/* ---- service load balancing (lb.h: layout and meaning) ---- */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, PILUS_LB_SVC_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, PILUS_LB_BE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, PILUS_LB_REVNAT_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_revnat SEC(".maps");

/* value size patched to 4 * maglev_size by the loader (no BTF value type, so
 * the size can differ from this default) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32) * LB_MAGLEV_DEFAULT_M);
	__uint(max_entries, PILUS_LB_MAGLEV_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_ct_tuple);
	__type(value, struct lb4_ct_entry);
	__uint(max_entries, PILUS_LB_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity_val);
	__uint(max_entries, PILUS_LB_AFFINITY_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_affinity_match);
	__type(value, __u8);
	__uint(max_entries, PILUS_LB_AFFINITY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_affinity_match SEC(".maps");

#ifdef PILUS_SOCK_MAPS
/* ---- socket LB (sock.h), bpf_sock.o only ---- */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct sock_netns_info);
	__uint(max_entries, PILUS_SOCK_NETNS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_sock_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock_rev_key);
	__type(value, struct sock_rev_val);
	__uint(max_entries, PILUS_SOCK_REVERSE_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_lb4_reverse_sk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SOCK_STAT_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pilus_sock_stats SEC(".maps");
#endif /* PILUS_SOCK_MAPS */

#endif /* __PILUS_MAPS_H */
