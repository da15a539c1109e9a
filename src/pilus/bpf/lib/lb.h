/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service load balancing (kube-proxy replacement), Cilium's bpf/lib/lb.h in
 * miniature. Python mirrors of every struct here live in
 * src/pilus/datapath/lb.py; tests/unit/test_lb_abi.py compares both through
 * the BTF of the compiled object. Change both sides together.
 *
 * Maps
 *   pilus_lb4_svc      {vip, dport, slot, proto, scope} -> lb4_service
 *                      slot 0 = master (count, rev_nat_index, flags,
 *                      algorithm, affinity timeout), slots 1..count hold the
 *                      backend ids of the *selectable* (active) backends.
 *   pilus_lb4_be       backend id -> {addr, port, proto, state}; backends
 *                      that are terminating / quarantined / in maintenance
 *                      stay here (existing connections keep them) but are
 *                      not in any slot or Maglev table.
 *   pilus_lb4_revnat   rev_nat_index (service id) -> frontend {addr, port}
 *   pilus_lb4_maglev   rev_nat_index | scope << 31 -> u32[M] backend ids
 *                      (M = lb_config.maglev_size; the loader sets the value
 *                      size to 4 * M before load; no prealloc: only Maglev
 *                      services cost memory)
 *   pilus_lb4_ct       frontend tuple (client -> vip, TUPLE_F_SERVICE) ->
 *                      chosen backend: established connections stick; and the
 *                      reply tuple (backend -> client, LB_TUPLE_F_REVNAT) ->
 *                      the frontend to restore as the source of replies.
 *   pilus_lb4_affinity {client ip, rev_nat_index} -> {backend id, last used}
 *   pilus_lb4_affinity_match {backend id, rev_nat_index} -> 1 (the backend
 *                      still belongs to the service)
 *
 * Per packet (from-container, before conntrack/policy so that both see the
 * backend): a TCP/UDP packet to a frontend finds or picks a backend and is
 * DNATed to it (L3 + L4 checksums; with hairpin the source becomes
 * lb_config.loopback_ip). Replies (the CT_REPLY packets: from-container of a
 * local backend, to-container for replies coming through the node's stack)
 * match their reverse entry in pilus_lb4_ct and get their source rewritten
 * to the frontend. Service ids are 32 bits (Cilium's are 16), so more than
 * 65535 frontends fit; the main conntrack entry is not involved.
 */
#ifndef __PILUS_LB_H
#define __PILUS_LB_H

#include <stdbool.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "ipv4.h"
#include "conntrack.h"

/* ---- constants (mirrored in src/pilus/datapath/lb.py) ---- */
#define DROP_NO_SERVICE 158

#define LB_SELECTION_RANDOM 1
#define LB_SELECTION_MAGLEV 2

#define LB_SCOPE_EXT 0
#define LB_SCOPE_INT 1

/* lb4_service.flags (Cilium's SVC_FLAG_*) */
#define SVC_FLAG_EXTERNAL_IP     0x01
#define SVC_FLAG_NODEPORT        0x02
#define SVC_FLAG_EXT_LOCAL_SCOPE 0x04
#define SVC_FLAG_HOSTPORT        0x08
#define SVC_FLAG_AFFINITY        0x10
#define SVC_FLAG_LOADBALANCER    0x20
#define SVC_FLAG_ROUTABLE        0x40
#define SVC_FLAG_SOURCE_RANGE    0x80
/* lb4_service.flags2 */
#define SVC_FLAG2_INT_LOCAL_SCOPE 0x10
#define SVC_FLAG2_TWO_SCOPES      0x20

/* lb4_backend.flags: backend state */
#define BE_STATE_ACTIVE      0
#define BE_STATE_TERMINATING 1
#define BE_STATE_QUARANTINED 2
#define BE_STATE_MAINTENANCE 3

#define TUPLE_F_SERVICE   4     /* pilus_lb4_ct: client -> frontend */
#define LB_TUPLE_F_REVNAT 0x10  /* pilus_lb4_ct: backend -> client (replies) */
#define LB_MAGLEV_SCOPE_BIT 31

/* lb4_ct_entry.flags */
#define LB_CT_F_SEEN_NON_SYN 1
#define LB_CT_F_CLOSING      2
#define LB_CT_F_LOOPBACK     4

/* lb_config.flags */
#define LB_CFG_F_NO_SERVICE_REPLY 1  /* answer TCP SYN with RST, UDP with ICMP */

#define PILUS_LB_SVC_MAX      262144  /* masters + slots */
#define PILUS_LB_BE_MAX       131072
#define PILUS_LB_REVNAT_MAX   131072  /* frontends */
#define PILUS_LB_MAGLEV_MAX   65536   /* Maglev frontends (each 4 * M bytes) */
#define PILUS_LB_CT_MAX       524288  /* two entries per connection */
#define PILUS_LB_AFFINITY_MAX 65536
#define LB_MAGLEV_DEFAULT_M   16381

/* ---- structs ---- */
struct lb4_key {
	__be32 address;       /* frontend IP */
	__be16 dport;         /* frontend port */
	__u16  backend_slot;  /* 0 = master entry, 1..count = backend slots */
	__u8   proto;         /* IPPROTO_TCP / IPPROTO_UDP */
	__u8   scope;         /* LB_SCOPE_EXT / LB_SCOPE_INT */
	__u16  pad;
};

struct lb4_service {
	__u32 backend_id;        /* slot entries */
	__u32 affinity_timeout;  /* master: seconds (SVC_FLAG_AFFINITY) */
	__u32 rev_nat_index;     /* service (frontend) id */
	__u16 count;             /* master: number of backend slots */
	__u8  flags;             /* SVC_FLAG_* */
	__u8  flags2;            /* SVC_FLAG2_* */
	__u8  algorithm;         /* LB_SELECTION_* */
	__u8  pad1;
	__u16 pad2;
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8   proto;
	__u8   flags;  /* BE_STATE_* */
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16  pad;
};

/* pilus_lb4_ct value: a frontend tuple's backend (TUPLE_F_SERVICE), or a
 * reply tuple's frontend (LB_TUPLE_F_REVNAT: nat_addr/nat_port, and the
 * original client for hairpin replies) */
struct lb4_ct_entry {
	__u32  backend_id;
	__u32  lifetime;       /* expiry, bpf_ktime_get_ns() seconds */
	__u32  rev_nat_index;
	__be32 nat_addr;       /* revnat: frontend address */
	__be32 client_addr;    /* revnat of a hairpin: the pod itself */
	__be16 nat_port;       /* revnat: frontend port */
	__u8   flags;          /* LB_CT_F_* */
	__u8   pad;
};

struct lb4_affinity_key {
	__be32 client_ip;
	__u32  rev_nat_index;
};

struct lb4_affinity_val {
	__u64 last_used;   /* bpf_ktime_get_ns() seconds */
	__u32 backend_id;
	__u32 pad;
};

struct lb4_affinity_match {
	__u32 backend_id;
	__u32 rev_nat_index;
};

/* node-wide LB settings: .rodata.lb, set by the loader before load */
struct lb_config {
	__u32  maglev_size;  /* M, a prime; the Maglev map's value is u32[M] */
	__u32  maglev_seed;
	__be32 loopback_ip;  /* hairpin source (Cilium's 169.254.42.1) */
	__u32  flags;        /* LB_CFG_F_* */
};

const volatile struct lb_config pilus_lb_cfg SEC(".rodata.lb") = {
	.maglev_size = LB_MAGLEV_DEFAULT_M,
	.maglev_seed = 0x4a4c6676,
	.loopback_ip = __bpf_constant_htonl(0xa9fe2a01),  /* 169.254.42.1 */
	.flags = LB_CFG_F_NO_SERVICE_REPLY,
};

#define LB_CFG(field) (pilus_lb_cfg.field)

/* ---- maps ---- */
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

/* ---- hashing (linux/jhash.h) ---- */
static __always_inline __u32 lb_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

static __always_inline __u32 lb_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += 0xdeadbeef + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= lb_rol32(b, 14);
	a ^= c; a -= lb_rol32(c, 11);
	b ^= a; b -= lb_rol32(a, 25);
	c ^= b; c -= lb_rol32(b, 16);
	a ^= c; a -= lb_rol32(c, 4);
	b ^= a; b -= lb_rol32(a, 14);
	c ^= b; c -= lb_rol32(b, 24);
	return c;
}

/* ---- packet rewriting ---- */
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

static __always_inline __u32 lb_l4_csum_off(const struct pkt4 *p)
{
	return p->l4_off + (p->ip.protocol == IPPROTO_TCP ? 16 : 6);
}

static __always_inline __u64 lb_l4_csum_flags(const struct pkt4 *p)
{
	/* UDP checksum 0 means "none": keep it so */
	return p->ip.protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* rewrite the source (is_src) or destination address and port of a TCP/UDP
 * packet, fixing the IP and L4 checksums; returns 0 or a drop reason */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, struct pkt4 *p, bool is_src,
				       __be32 addr, __be16 port)
{
	__be32 old_addr = is_src ? p->ip.saddr : p->ip.daddr;
	__be16 old_port = is_src ? p->sport : p->dport;
	__u32 csum_off = lb_l4_csum_off(p);
	__u64 mangled = lb_l4_csum_flags(p);

	if (addr != old_addr) {
		if (bpf_skb_store_bytes(skb, is_src ? IP_SADDR_OFF : IP_DADDR_OFF, &addr, 4, 0) < 0)
			return DROP_WRITE_ERROR;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, addr, 4) < 0)
			return DROP_CSUM_L3;
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, addr,
					BPF_F_PSEUDO_HDR | mangled | 4) < 0)
			return 154; /* DROP_CSUM_L4 */
		if (is_src)
			p->ip.saddr = addr;
		else
			p->ip.daddr = addr;
	}
	if (port && port != old_port) {
		if (bpf_skb_store_bytes(skb, p->l4_off + (is_src ? 0 : 2), &port, 2, 0) < 0)
			return DROP_WRITE_ERROR;
		if (bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | 2) < 0)
			return 154; /* DROP_CSUM_L4 */
		if (is_src)
			p->sport = port;
		else
			p->dport = port;
	}
	return 0;
}

/* ---- service lookup and backend selection ---- */
struct lb4_result {
	__u32  backend_id;
	__u32  rev_nat_index;   /* 0: not a service packet */
	bool   loopback;        /* hairpin: source rewritten to loopback_ip */
	bool   no_backend;      /* frontend without a usable backend */
	__be32 vip;             /* frontend, for replies to the client */
	__be16 vport;
};

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

static __always_inline __u32 lb4_ct_lifetime(__u8 proto, __u8 flags)
{
	if (proto != IPPROTO_TCP)
		return CFG(ct_lifetime_nontcp);
	if (flags & LB_CT_F_CLOSING)
		return CFG(ct_close_timeout);
	if (flags & LB_CT_F_SEEN_NON_SYN)
		return CFG(ct_lifetime_tcp);
	return CFG(ct_syn_timeout);
}

/*
 * A packet leaving a pod: if it goes to a frontend, pick (or find) its
 * backend and DNAT it; `client_is_backend_ok`: hairpin allowed (the sender
 * may be its own backend; the source then becomes loopback_ip).
 * Returns 0 (res->rev_nat_index tells whether it was a service packet) or a
 * drop reason; res->no_backend is set with DROP_NO_SERVICE.
 */
static __always_inline int lb4_local(struct __sk_buff *skb, struct pkt4 *p, bool internal,
				     struct lb4_result *res)
{
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be = NULL;
	struct ipv4_ct_tuple tuple = {};
	struct lb4_ct_entry *ce;
	__u8 proto = p->ip.protocol;
	__u8 tcp_flags = proto == IPPROTO_TCP ? p->tcp_flags : 0;
	bool syn_only = (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	__u32 now, lifetime, backend_id = 0;
	bool write_rev = false;
	__u8 ct_flags = 0;
	int ret;

	if (p->is_fragment || (proto != IPPROTO_TCP && proto != IPPROTO_UDP))
		return 0;
	key.address = p->ip.daddr;
	key.dport = p->dport;
	key.proto = proto;
	svc = lb4_lookup_service(&key, internal);
	if (!svc)
		return 0;

	res->rev_nat_index = svc->rev_nat_index;
	res->vip = p->ip.daddr;
	res->vport = p->dport;
	now = bpf_now_sec();

	tuple.saddr = p->ip.saddr;
	tuple.daddr = p->ip.daddr;
	tuple.sport = p->sport;
	tuple.dport = p->dport;
	tuple.nexthdr = proto;
	tuple.flags = TUPLE_F_SERVICE;
	ce = bpf_map_lookup_elem(&pilus_lb4_ct, &tuple);
	if (ce && ce->lifetime >= now && ce->rev_nat_index == svc->rev_nat_index) {
		backend_id = ce->backend_id;
		ct_flags = ce->flags;
		be = bpf_map_lookup_elem(&pilus_lb4_be, &backend_id);
		/* a new connection (pure SYN) on a reused tuple: only an active
		 * backend may take it, and a closed connection starts over */
		if (be && syn_only &&
		    (be->flags != BE_STATE_ACTIVE || (ct_flags & LB_CT_F_CLOSING)))
			be = NULL;
	}

	if (!be) {
		/* a new connection (or its backend went away): select */
		ct_flags = 0;
		backend_id = 0;
		if (svc->count == 0) {
			res->no_backend = true;
			return DROP_NO_SERVICE;
		}
		backend_id = lb4_select_backend(&key, svc, p->ip.saddr, p->ip.daddr,
						((__u32)bpf_ntohs(p->sport) << 16) | bpf_ntohs(p->dport),
						proto, now);
		if (backend_id)
			be = bpf_map_lookup_elem(&pilus_lb4_be, &backend_id);
		if (!be) {
			res->no_backend = true;
			return DROP_NO_SERVICE;
		}
		if (svc->flags & SVC_FLAG_AFFINITY)
			lb4_affinity_update(svc, p->ip.saddr, backend_id, now);
	}

	/* record / refresh the frontend tuple -> backend */
	if (proto == IPPROTO_TCP) {
		if (!(tcp_flags & TCP_FLAG_SYN))
			ct_flags |= LB_CT_F_SEEN_NON_SYN;
		if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
			ct_flags |= LB_CT_F_CLOSING;
	}
	res->backend_id = backend_id;
	res->loopback = be->address == p->ip.saddr;
	if (res->loopback)
		ct_flags |= LB_CT_F_LOOPBACK;
	lifetime = now + lb4_ct_lifetime(proto, ct_flags);
	if (ce && ce->backend_id == backend_id && ce->rev_nat_index == svc->rev_nat_index) {
		/* lifetimes are in seconds: the reverse entry is rewritten at
		 * most once a second per connection */
		write_rev = ce->lifetime != lifetime || ce->flags != ct_flags;
		ce->flags = ct_flags;
		ce->lifetime = lifetime;
	} else {
		struct lb4_ct_entry ne = {
			.backend_id = backend_id,
			.rev_nat_index = svc->rev_nat_index,
			.flags = ct_flags,
			.lifetime = lifetime,
		};

		if (bpf_map_update_elem(&pilus_lb4_ct, &tuple, &ne, BPF_ANY) < 0)
			return DROP_CT_CREATE_FAILED;
		write_rev = true;
	}
	if (write_rev) {
		struct lb4_ct_entry rn = {
			.backend_id = backend_id,
			.rev_nat_index = svc->rev_nat_index,
			.nat_addr = res->vip,
			.nat_port = res->vport,
			.client_addr = p->ip.saddr,
			.flags = ct_flags,
			.lifetime = lifetime,
		};
		struct ipv4_ct_tuple rt = {
			.saddr = be->address,
			.daddr = res->loopback ? LB_CFG(loopback_ip) : p->ip.saddr,
			.sport = be->port,
			.dport = p->sport,
			.nexthdr = proto,
			.flags = LB_TUPLE_F_REVNAT,
		};

		if (bpf_map_update_elem(&pilus_lb4_ct, &rt, &rn, BPF_ANY) < 0)
			return DROP_CT_CREATE_FAILED;
	}

	/* DNAT to the backend; hairpin: SNAT to the loopback address so the pod
	 * accepts a packet "from itself" and answers through us */
	ret = lb4_rewrite(skb, p, false, be->address, be->port);
	if (ret)
		return ret;
	if (res->loopback)
		ret = lb4_rewrite(skb, p, true, LB_CFG(loopback_ip), 0);
	return ret;
}

/* reverse NAT of a reply (CT_REPLY): the source becomes the frontend, and a
 * hairpin reply goes back to the pod itself. Returns 0 or a drop reason;
 * *daddr_changed tells the caller to redo its destination lookup. */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct pkt4 *p, bool *daddr_changed)
{
	struct ipv4_ct_tuple t = {};
	struct lb4_ct_entry *rn;
	__be32 nat_addr, client;
	__be16 nat_port;
	__u32 now, lifetime;
	__u8 flags;
	int ret;

	*daddr_changed = false;
	if (p->is_fragment || (p->ip.protocol != IPPROTO_TCP && p->ip.protocol != IPPROTO_UDP))
		return 0;
	t.saddr = p->ip.saddr;
	t.daddr = p->ip.daddr;
	t.sport = p->sport;
	t.dport = p->dport;
	t.nexthdr = p->ip.protocol;
	t.flags = LB_TUPLE_F_REVNAT;
	rn = bpf_map_lookup_elem(&pilus_lb4_ct, &t);
	if (!rn)
		return 0;
	now = bpf_now_sec();
	if (rn->lifetime < now)
		return 0;
	flags = rn->flags;
	if (p->ip.protocol == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		flags |= LB_CT_F_CLOSING;
	lifetime = now + lb4_ct_lifetime(p->ip.protocol, flags | LB_CT_F_SEEN_NON_SYN);
	if (rn->lifetime < lifetime || flags != rn->flags) {
		rn->lifetime = lifetime;
		rn->flags = flags;
	}
	nat_addr = rn->nat_addr;
	nat_port = rn->nat_port;
	client = rn->client_addr;
	ret = lb4_rewrite(skb, p, true, nat_addr, nat_port);
	if (ret)
		return ret;
	if (flags & LB_CT_F_LOOPBACK) {
		ret = lb4_rewrite(skb, p, false, client, 0);
		*daddr_changed = true;
	}
	return ret;
}

/* a new connection that is not a service one: a reverse entry left by an
 * earlier service connection on the same tuple must not rewrite its replies */
static __always_inline void lb4_forget_rev_nat(const struct pkt4 *p)
{
	struct ipv4_ct_tuple t = {};

	if (p->ip.protocol != IPPROTO_TCP && p->ip.protocol != IPPROTO_UDP)
		return;
	t.saddr = p->ip.daddr;
	t.daddr = p->ip.saddr;
	t.sport = p->dport;
	t.dport = p->sport;
	t.nexthdr = p->ip.protocol;
	t.flags = LB_TUPLE_F_REVNAT;
	/* a lookup is lock-free, a delete locks the bucket even for a missing key:
	 * most new connections have nothing to forget */
	if (bpf_map_lookup_elem(&pilus_lb4_ct, &t))
		bpf_map_delete_elem(&pilus_lb4_ct, &t);
}

/*
 * A reply whose source became a node address (NodePort) must not go through
 * the stack: arriving from an lxc with a local source it would be dropped as
 * a martian. Route it ourselves (FIB lookup, then redirect to the egress
 * device; the kernel resolves the neighbour if needed). Returns the tc
 * verdict, or -1 to leave the packet to the stack.
 */
static __always_inline bool lb4_is_host_addr(__be32 addr)
{
	return addr && (addr == CFG(node_ip) || addr == CFG(router_ip));
}

static __always_inline int lb4_fib_redirect(struct __sk_buff *skb, struct pkt4 *p)
{
	struct bpf_fib_lookup fib = {};
	int ret;

	fib.family = 2; /* AF_INET */
	fib.tos = p->ip.tos;
	fib.l4_protocol = p->ip.protocol;
	fib.tot_len = bpf_ntohs(p->ip.tot_len);
	fib.ipv4_src = p->ip.saddr;
	fib.ipv4_dst = p->ip.daddr;
	fib.ifindex = skb->ingress_ifindex;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	if (ipv4_dec_ttl(skb, p))
		return -1;
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
		return -1;
	return bpf_redirect(fib.ifindex, 0);
}

/* ---- answering for a service without backends ---- */
static __always_inline __u16 lb_csum_fold(__s64 csum)
{
	__u32 sum = (__u32)csum;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline void lb_ip4_hdr(struct iphdr *ip, __be32 saddr, __be32 daddr,
				       __u8 proto, __u16 tot_len)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = bpf_htons(tot_len);
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = 64;
	ip->protocol = proto;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = lb_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
}

static __always_inline int lb_swap_macs(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)) < 0)
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0);
}

struct lb_tcp_rst {
	/* pseudo header */
	__be32 saddr;
	__be32 daddr;
	__u8   zero;
	__u8   proto;
	__be16 len;
	/* TCP header */
	__be16 sport;
	__be16 dport;
	__be32 seq;
	__be32 ack_seq;
	__u8   doff;   /* data offset << 4 */
	__u8   flags;
	__be16 window;
	__be16 check;
	__be16 urg_ptr;
};

/* turn a TCP SYN to a frontend without backends into a RST from the frontend */
static __always_inline int lb4_reply_tcp_rst(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct lb_tcp_rst r = {};
	struct iphdr ip;
	__be32 seq;
	__u32 seg_len;
	__u8 doff;

	if (bpf_skb_load_bytes(skb, p->l4_off + 4, &seq, 4) < 0)
		return -1;
	if (bpf_skb_load_bytes(skb, p->l4_off + 12, &doff, 1) < 0)
		return -1;
	seg_len = bpf_ntohs(p->ip.tot_len);
	if (seg_len < p->ip.ihl * 4 + (doff >> 4) * 4)
		return -1;
	seg_len -= p->ip.ihl * 4 + (doff >> 4) * 4;
	seg_len += 1; /* the SYN */

	r.saddr = p->ip.daddr;
	r.daddr = p->ip.saddr;
	r.proto = IPPROTO_TCP;
	r.len = bpf_htons(20);
	r.sport = p->dport;
	r.dport = p->sport;
	r.seq = 0;
	r.ack_seq = bpf_htonl(bpf_ntohl(seq) + seg_len);
	r.doff = 5 << 4;
	r.flags = TCP_FLAG_RST | TCP_FLAG_ACK;
	r.check = lb_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&r, sizeof(r), 0));
	lb_ip4_hdr(&ip, p->ip.daddr, p->ip.saddr, IPPROTO_TCP, 40);

	if (bpf_skb_change_tail(skb, ETH_HLEN + 40, 0) < 0)
		return -1;
	if (lb_swap_macs(skb) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + 20, &r.sport, 20, 0) < 0)
		return -1;
	return 0;
}

struct lb_icmp_unreach {
	__u8   type;
	__u8   code;
	__be16 check;
	__be32 unused;
	__u8   quote[28];  /* the offending IP header (20) + 8 bytes of L4 */
};

/* turn a packet into an ICMP port unreachable from its destination */
static __always_inline int lb4_reply_icmp_unreach(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct lb_icmp_unreach ic = {};
	struct iphdr ip;

	if (p->ip.ihl != 5)
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, ic.quote, sizeof(ic.quote)) < 0)
		return -1;
	ic.type = 3; /* ICMP_DEST_UNREACH */
	ic.code = 3; /* ICMP_PORT_UNREACH */
	ic.check = lb_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ic, sizeof(ic), 0));
	lb_ip4_hdr(&ip, p->ip.daddr, p->ip.saddr, IPPROTO_ICMP, 20 + sizeof(ic));

	if (bpf_skb_change_tail(skb, ETH_HLEN + 20 + sizeof(ic), 0) < 0)
		return -1;
	if (lb_swap_macs(skb) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + 20, &ic, sizeof(ic), 0) < 0)
		return -1;
	return 0;
}

/*
 * No usable backend: answer a TCP SYN with a RST and UDP with an ICMP port
 * unreachable, sent back out of `ifindex` (the sender's lxc: the pod gets it
 * at once). Returns the tc verdict, or -1 when no answer was made (drop).
 * The caller has already counted and reported the drop (DROP_NO_SERVICE).
 */
static __always_inline int lb4_no_service_reply(struct __sk_buff *skb, const struct pkt4 *p,
						__u32 ifindex)
{
	int ret = -1;

	if (!(LB_CFG(flags) & LB_CFG_F_NO_SERVICE_REPLY))
		return -1;
	if (p->ip.protocol == IPPROTO_TCP) {
		if ((p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) != TCP_FLAG_SYN)
			return -1;
		ret = lb4_reply_tcp_rst(skb, p);
	} else if (p->ip.protocol == IPPROTO_UDP) {
		ret = lb4_reply_icmp_unreach(skb, p);
	}
	if (ret < 0)
		return -1;
	return bpf_redirect(ifindex, 0);
}

#endif /* __PILUS_LB_H */
