/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service load balancing (kube-proxy replacement): the ABI (constants,
 * structs, the .rodata.lb settings), Cilium's bpf/lib/lb.h in miniature.
 * Python mirrors of every struct here live in src/pilus/datapath/lb.py;
 * tests/unit/test_lb_abi.py compares both through the BTF of the compiled
 * object. Change both sides together. The maps are declared in maps.h; the
 * code lives in lb_select.h (service lookup, backend selection), lb_packet.h
 * (per-packet DNAT / reverse NAT), nat.h (rewrites), lb_reply.h (answers for
 * services without backends).
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
 * Service ids are 32 bits (Cilium's are 16), so more than 65535 frontends fit.
 */
#ifndef __PILUS_LB_H
#define __PILUS_LB_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"

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
#define LB_CT_F_SNAT         8  /* NodePort to another node's backend: source is the node IP */

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
	__be16 nat_port;       /* revnat: frontend port; a SNATed frontend tuple: its source port */
	__u8   flags;          /* LB_CT_F_* */
	__u8   pad;
	__be16 client_port;    /* revnat of a SNATed connection: the client's port */
	__u8   pad2[2];
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

#endif /* __PILUS_LB_H */
