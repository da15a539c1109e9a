/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-level service load balancing (Cilium's bpf_sock.c, IPv4), an option
 * next to the per-packet LB of bpf_lxc.c (agent --socket-lb). Attached to the
 * cgroup v2 root with multi-attach; gated on the socket's network namespace
 * cookie (pilus_sock_netns), so only this node's pods are translated.
 *
 *   cil_sock4_connect      cgroup/connect4: TCP and connected UDP. A frontend
 *                          destination becomes a backend chosen exactly as the
 *                          per-packet LB would (lb.h: lb4_lookup_service,
 *                          lb4_select_backend, affinity); the kernel socket is
 *                          then connected straight to the backend, so the
 *                          per-packet LB sees no frontend and no reverse NAT
 *                          is needed on the wire.
 *   cil_sock4_sendmsg      cgroup/sendmsg4: unconnected UDP, per datagram.
 *   cil_sock4_recvmsg      cgroup/recvmsg4: a datagram from a backend this
 *                          socket was translated to shows the frontend as source.
 *   cil_sock4_getpeername  cgroup/getpeername4: the peer shows as the frontend.
 *
 * A frontend without a usable backend refuses at once: connect()/sendmsg()
 * fail with ECONNREFUSED (what a per-packet RST / ICMP unreachable gives),
 * counted as DROP_NO_SERVICE in pilus_metrics.
 * Backend choice: random services pick a random slot; Maglev hashes the pod
 * address, the frontend and a per-connection value in place of the source
 * port (random for TCP, the socket cookie for UDP: one backend per socket).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* this object owns the socket LB maps (lib/maps.h) */
#define PILUS_SOCK_MAPS
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/config.h"
#include "lib/metrics.h"
#include "lib/lb.h"
#include "lib/conntrack.h"  /* bpf_now_sec: the clock of the LB maps */
#include "lib/lb_select.h"
#include "lib/sock.h"

#define SYS_REJECT  0
#define SYS_PROCEED 1

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif
#ifndef ENOMEM
#define ENOMEM 12
#endif

static __always_inline void sock_stat_inc(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&pilus_sock_stats, &slot);

	if (v)
		*v += 1;  /* per CPU */
}


static __always_inline struct sock_netns_info *sock_pod(void *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);

	return bpf_map_lookup_elem(&pilus_sock_netns, &cookie);
}

static __always_inline __be16 sock_dport(const struct bpf_sock_addr *ctx)
{
	volatile __u32 port = ctx->user_port;

	return (__be16)port;
}

/* forward translation; returns 0 (translated or not a service) or -errno */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx, bool udp_only, __u32 stat)
{
	struct sock_netns_info *pod;
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be = NULL;
	struct sock_rev_key rk = {};
	struct sock_rev_val rv = {};
	__u32 backend_id, now, entropy;
	__be32 client;
	__u8 proto;

	if (ctx->protocol == IPPROTO_TCP && !udp_only)
		proto = IPPROTO_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		proto = IPPROTO_UDP;
	else
		return 0;
	pod = sock_pod(ctx);
	if (!pod)
		return 0;
	client = pod->ipv4;

	key.address = ctx->user_ip4;
	key.dport = sock_dport(ctx);
	key.proto = proto;
	svc = lb4_lookup_service(&key, true);
	if (!svc)
		return 0;
	if (svc->count == 0)
		goto no_backend;

	now = bpf_now_sec();
	/* stands in for the source port, not known yet at connect() */
	entropy = proto == IPPROTO_TCP ? bpf_get_prandom_u32() : (__u32)bpf_get_socket_cookie(ctx);
	backend_id = lb4_select_backend(&key, svc, client, key.address,
					((entropy & 0xffff) << 16) | bpf_ntohs(key.dport), proto, now);
	if (backend_id)
		be = bpf_map_lookup_elem(&pilus_lb4_be, &backend_id);
	if (!be)
		goto no_backend;
	if (svc->flags & SVC_FLAG_AFFINITY)
		lb4_affinity_update(svc, client, backend_id, now);

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.address = be->address;
	rk.port = be->port;
	rv.address = key.address;
	rv.port = key.dport;
	rv.rev_nat_index = svc->rev_nat_index;
	if (bpf_map_update_elem(&pilus_lb4_reverse_sk, &rk, &rv, BPF_ANY) < 0)
		return -ENOMEM;

	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	sock_stat_inc(stat);
	return 0;

no_backend:
	sock_stat_inc(SOCK_STAT_NO_BACKEND);
	update_metrics(0, METRIC_EGRESS, DROP_NO_SERVICE);
	return -ECONNREFUSED;
}

/* reverse translation: a backend this socket was translated to shows as the
 * frontend (while the frontend still exists) */
static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx, __u32 stat)
{
	struct sock_rev_key rk = {};
	struct sock_rev_val *rv;
	struct lb4_reverse_nat *fe;
	__u32 rev_nat_index;

	if (!sock_pod(ctx))
		return;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.address = ctx->user_ip4;
	rk.port = sock_dport(ctx);
	rv = bpf_map_lookup_elem(&pilus_lb4_reverse_sk, &rk);
	if (!rv)
		return;
	rev_nat_index = rv->rev_nat_index;
	fe = bpf_map_lookup_elem(&pilus_lb4_revnat, &rev_nat_index);
	if (!fe || fe->address != rv->address || fe->port != rv->port) {
		bpf_map_delete_elem(&pilus_lb4_reverse_sk, &rk);  /* service gone */
		return;
	}
	ctx->user_ip4 = rv->address;
	ctx->user_port = (__u32)rv->port;
	sock_stat_inc(stat);
}

SEC("cgroup/connect4")
int cil_sock4_connect(struct bpf_sock_addr *ctx)
{
	int ret = sock4_xlate_fwd(ctx, false, SOCK_STAT_CONNECT);

	if (ret) {
		bpf_set_retval(ret);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

SEC("cgroup/sendmsg4")
int cil_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	int ret = sock4_xlate_fwd(ctx, true, SOCK_STAT_SENDMSG);

	if (ret) {
		bpf_set_retval(ret);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg4")
int cil_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx, SOCK_STAT_RECVMSG);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int cil_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx, SOCK_STAT_GETPEERNAME);
	return SYS_PROCEED;
}

char __license[] SEC("license") = "GPL";

/* BTF anchor for the socket structs that only appear as map keys/values (the
 * policy structs have theirs in maps.h) */
struct pilus_sock_abi {
	struct sock_netns_info netns;
	struct sock_rev_key key;
	struct sock_rev_val val;
};

__attribute__((noinline)) int pilus_abi_anchor_sock(struct pilus_sock_abi *p)
{
	return p != 0;
}
