/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-level load balancing (bpf_sock.c): structs (the maps are in maps.h). Python mirrors
 * live in src/pilus/datapath/socklb.py (tests/unit/test_sock_abi.py compares
 * them through the BTF of bpf_sock.o). The service maps are the tc objects',
 * shared through their pins (or reused fds).
 *
 *   pilus_sock_netns      netns cookie -> the pod living in it. Only sockets
 *                         of these namespaces are translated: the node's own
 *                         namespace and anything else on the machine are not
 *                         (every node's program is attached to the cgroup
 *                         root, each touches only its own pods).
 *   pilus_lb4_reverse_sk  {socket cookie, backend addr, port} -> frontend, for
 *                         recvmsg4 / getpeername4 (Cilium's cilium_lb4_reverse_sk).
 *   pilus_sock_stats      per-CPU counters, SOCK_STAT_* slots.
 */
#ifndef __PILUS_SOCK_H
#define __PILUS_SOCK_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "common.h"

#define PILUS_SOCK_NETNS_MAX     PILUS_LXC_MAX
#define PILUS_SOCK_REVERSE_MAX   65536

/* pilus_sock_stats slots (mirrored in socklb.py) */
#define SOCK_STAT_CONNECT      0  /* connect4 translated to a backend */
#define SOCK_STAT_SENDMSG      1  /* sendmsg4 translated */
#define SOCK_STAT_RECVMSG      2  /* recvmsg4: source shown as the frontend */
#define SOCK_STAT_GETPEERNAME  3  /* getpeername4: peer shown as the frontend */
#define SOCK_STAT_NO_BACKEND   4  /* refused: frontend without a usable backend */
#define SOCK_STAT_SLOTS        5

struct sock_netns_info {
	__be32 ipv4;    /* the pod's address: client of session affinity */
	__u16  ep_id;
	__u16  flags;   /* reserved, 0 */
};

struct sock_rev_key {
	__u64  cookie;   /* bpf_get_socket_cookie() */
	__be32 address;  /* backend */
	__be16 port;
	__u16  pad;
};

struct sock_rev_val {
	__be32 address;  /* frontend */
	__be16 port;
	__u16  pad;
	__u32  rev_nat_index;
	__u32  pad2;
};

#endif /* __PILUS_SOCK_H */
