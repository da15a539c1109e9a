/* SPDX-License-Identifier: Apache-2.0 */
/* Tunnel mode: where a destination's node is, and the VXLAN tunnel key that
 * carries the source's security identity in the VNI (Cilium's encoding). */
#ifndef __PILUS_TUNNEL_H
#define __PILUS_TUNNEL_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "maps.h"
#include "config.h"

#define TUNNEL_VNI_MAX 0xffffff  /* the VNI has 24 bits */
#define TUNNEL_TTL     64

/* the node IP to encapsulate to: the ipcache entry's tunnel endpoint, else the
 * node whose pod CIDR holds the address (pilus_tunnel_map); 0: not behind the
 * tunnel, and never this node itself */
static __always_inline __be32 tunnel_endpoint4(__be32 daddr, const struct remote_endpoint_info *info)
{
	struct ipcache_key key = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 32,
		.family = ENDPOINT_KEY_IPV4,
	};
	struct tunnel_value *tv;
	__be32 endpoint = 0;

	if (info && (info->flags & IPCACHE_F_HAS_TUNNEL_EP)) {
		endpoint = info->tunnel_endpoint;
	} else {
		key.addr.ip4 = daddr;
		tv = bpf_map_lookup_elem(&pilus_tunnel_map, &key);
		if (tv)
			endpoint = tv->endpoint;
	}
	return endpoint == CFG(node_ip) ? 0 : endpoint;
}

/* the VNI for a source identity: the host is presented as remote-node (a
 * receiver drops a VNI of host: no node may claim to be another's host), and
 * node-local identities (CIDR identities, beyond 24 bits) as world */
static __always_inline __u32 tunnel_vni(__u32 identity)
{
	if (identity == IDENTITY_HOST)
		return IDENTITY_REMOTE_NODE;
	if (identity > TUNNEL_VNI_MAX)
		return IDENTITY_WORLD;
	return identity;
}

static __always_inline int tunnel_set_key4(struct __sk_buff *skb, __be32 endpoint, __u32 identity)
{
	struct bpf_tunnel_key key = {};

	key.remote_ipv4 = bpf_ntohl(endpoint);
	key.tunnel_id = tunnel_vni(identity);
	key.tunnel_ttl = TUNNEL_TTL;
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX);
}

#endif
