/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service lookup and backend selection (random slot, Maglev, session
 * affinity): shared by the per-packet LB (lb_packet.h) and the socket LB
 * (bpf_sock.c), so both pick a backend the same way.
 */
#ifndef __PILUS_LB_SELECT_H
#define __PILUS_LB_SELECT_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "maps.h"
#include "lb.h"
#include "jhash.h"

static __always_inline struct lb4_service *lb4_lookup_service(struct lb4_key *key, bool internal)
{
	struct lb4_service *svc;

	key->backend_slot = 0;
	key->scope = LB_SCOPE_EXT;
	svc = bpf_map_lookup_elem(&pilus_lb4_svc, key);
	/* from outside the node only NodePort / ExternalIP / LoadBalancer
	 * frontends exist; a ClusterIP is not routable */
	if (svc && !internal && !(svc->flags & SVC_FLAG_ROUTABLE))
		return NULL;
	if (svc && internal && (svc->flags2 & SVC_FLAG2_TWO_SCOPES)) {
		struct lb4_service *isvc;

		key->scope = LB_SCOPE_INT;
		isvc = bpf_map_lookup_elem(&pilus_lb4_svc, key);
		if (isvc)
			return isvc;
		key->scope = LB_SCOPE_EXT;
	}
	return svc;
}

static __always_inline __u32 lb4_select_random(struct lb4_key *key, const struct lb4_service *svc)
{
	struct lb4_service *slot;
	__u16 count = svc->count;

	if (count == 0)
		return 0;
	key->backend_slot = (bpf_get_prandom_u32() % count) + 1;
	slot = bpf_map_lookup_elem(&pilus_lb4_svc, key);
	key->backend_slot = 0;
	return slot ? slot->backend_id : 0;
}

/* Maglev: the backend of table[hash % M]; `ports` is (sport << 16 | dport) of
 * the flow, or 0 with affinity (the client's address alone picks the backend).
 * The socket LB (bpf_sock.c) passes a per-socket value for sport. */
static __always_inline __u32 lb4_select_maglev(struct lb4_key *key, const struct lb4_service *svc,
					       __be32 saddr, __be32 daddr, __u32 ports, __u8 proto)
{
	__u32 mkey = svc->rev_nat_index | ((__u32)key->scope << LB_MAGLEV_SCOPE_BIT);
	__u32 m = LB_CFG(maglev_size);
	__u32 *tbl, hash, idx;

	tbl = bpf_map_lookup_elem(&pilus_lb4_maglev, &mkey);
	if (!tbl)
		return lb4_select_random(key, svc);
	if (svc->flags & SVC_FLAG_AFFINITY)
		ports = 0;
	hash = lb_jhash_3words(bpf_ntohl(saddr), bpf_ntohl(daddr), ports,
			       LB_CFG(maglev_seed) ^ proto);
	if (m == 0)
		return 0;
	idx = hash % m;
	/* hide "idx < m" from the compiler so the check stays for the verifier
	 * (m is a known constant to it: .rodata.lb is frozen) */
	asm volatile("" : "+r"(idx));
	if (idx >= m)
		return 0;
	return tbl[idx];
}

static __always_inline __u32 lb4_affinity_backend(const struct lb4_service *svc, __be32 client,
						  __u32 now)
{
	struct lb4_affinity_key ak = { .client_ip = client, .rev_nat_index = svc->rev_nat_index };
	struct lb4_affinity_match mk = {};
	struct lb4_affinity_val *av;

	av = bpf_map_lookup_elem(&pilus_lb4_affinity, &ak);
	if (!av || av->last_used + svc->affinity_timeout < now)
		return 0;
	mk.backend_id = av->backend_id;
	mk.rev_nat_index = svc->rev_nat_index;
	if (!bpf_map_lookup_elem(&pilus_lb4_affinity_match, &mk))
		return 0;
	return av->backend_id;
}

static __always_inline void lb4_affinity_update(const struct lb4_service *svc, __be32 client,
						__u32 backend_id, __u32 now)
{
	struct lb4_affinity_key ak = { .client_ip = client, .rev_nat_index = svc->rev_nat_index };
	struct lb4_affinity_val av = { .last_used = now, .backend_id = backend_id };

	bpf_map_update_elem(&pilus_lb4_affinity, &ak, &av, BPF_ANY);
}

/* a new connection of `client` to a frontend with backends (svc->count > 0):
 * a still valid affinity backend, else the service's algorithm. Shared by the
 * per-packet LB (lb4_local) and the socket LB (bpf_sock.c). Returns a backend
 * id, 0 when none could be picked. */
static __always_inline __u32 lb4_select_backend(struct lb4_key *key, const struct lb4_service *svc,
						__be32 client, __be32 vip, __u32 ports, __u8 proto,
						__u32 now)
{
	__u32 backend_id = 0;

	if (svc->flags & SVC_FLAG_AFFINITY)
		backend_id = lb4_affinity_backend(svc, client, now);
	if (!backend_id) {
		if (svc->algorithm == LB_SELECTION_MAGLEV)
			backend_id = lb4_select_maglev(key, svc, client, vip, ports, proto);
		else
			backend_id = lb4_select_random(key, svc);
	}
	return backend_id;
}

#endif /* __PILUS_LB_SELECT_H */
