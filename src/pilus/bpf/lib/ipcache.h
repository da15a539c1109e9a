/* SPDX-License-Identifier: Apache-2.0 */
#ifndef __PILUS_IPCACHE_H
#define __PILUS_IPCACHE_H

#include <stdbool.h>
#include "maps.h"
#include "config.h"

static __always_inline struct remote_endpoint_info *ipcache_lookup4(__be32 addr)
{
	struct ipcache_key key = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 32,
		.family = ENDPOINT_KEY_IPV4,
	};

	key.addr.ip4 = addr;
	return bpf_map_lookup_elem(&pilus_ipcache, &key);
}

/* identity of an ipcache entry; no match -> world */
static __always_inline __u32 ipcache_info_identity(const struct remote_endpoint_info *info)
{
	if (info && info->sec_identity)
		return info->sec_identity;
	return IDENTITY_WORLD;
}

/* identity of an address; no match -> world */
static __always_inline __u32 ipcache_identity4(__be32 addr)
{
	return ipcache_info_identity(ipcache_lookup4(addr));
}

static __always_inline bool is_host_addr4(__be32 addr)
{
	return addr && (addr == CFG(router_ip) || addr == CFG(node_ip));
}

/* identity of a peer address as policy sees it: the node's own addresses are
 * host; then the ipcache (longest prefix: endpoints, nodes, CIDR identities);
 * world for the rest */
static __always_inline __u32 resolve_identity4(__be32 addr)
{
	if (is_host_addr4(addr))
		return IDENTITY_HOST;
	return ipcache_identity4(addr);
}

/* resolve_identity4() for a caller that keeps the address's ipcache entry
 * (*info, NULL when none) for more than its identity: one lookup for both */
static __always_inline __u32 resolve_identity4_info(__be32 addr,
						    const struct remote_endpoint_info **info)
{
	*info = ipcache_lookup4(addr);
	if (is_host_addr4(addr))
		return IDENTITY_HOST;
	return ipcache_info_identity(*info);
}

static __always_inline struct endpoint_info *lookup_ip4_endpoint(__be32 addr)
{
	struct endpoint_key key = { .family = ENDPOINT_KEY_IPV4 };

	key.addr.ip4 = addr;
	return bpf_map_lookup_elem(&pilus_lxc, &key);
}

static __always_inline struct endpoint_info *lookup_ifindex_endpoint(__u32 ifindex)
{
	return bpf_map_lookup_elem(&pilus_lxc_if, &ifindex);
}

#endif
