/* SPDX-License-Identifier: Apache-2.0 */
/*
 * pilus overlay datapath (Cilium's bpf_overlay.c), attached to the node's VXLAN
 * device (pilus_vxlan, collect-metadata mode, UDP 8472):
 *   cil_from_overlay  tc ingress: decapsulated packets from other nodes. The
 *                     VNI is the sender's security identity: no ipcache
 *                     lookup, the receiver enforces its endpoints' ingress
 *                     policy with it and delivers by redirect.
 *   cil_to_overlay    tc egress: packets the node's stack routes into the
 *                     tunnel (the host talking to remote pods, forwarded
 *                     NodePort traffic) get their tunnel key here; packets
 *                     bpf_lxc.c redirected already carry one.
 * Its maps are bpf_lxc.o's (lib/maps.h: shared through their pins).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/config.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/ipcache.h"
#include "lib/conntrack.h"
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/trace.h"
#include "lib/drop.h"
#include "lib/policy.h"
#include "lib/lb_packet.h"
#include "lib/deliver.h"
#include "lib/tunnel.h"

/* the sender's identity from the VNI; 0 with *reason set when it is invalid */
static __always_inline __u32 overlay_source_identity(struct __sk_buff *skb, int *reason)
{
	struct bpf_tunnel_key key = {};

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0) {
		*reason = DROP_NO_TUNNEL_KEY;
		return 0;
	}
	if (key.tunnel_id == IDENTITY_UNKNOWN || key.tunnel_id > TUNNEL_VNI_MAX) {
		*reason = DROP_INVALID_VNI;
		return 0;
	}
	/* senders present their host as remote-node (lib/tunnel.h) */
	if (key.tunnel_id == IDENTITY_HOST) {
		*reason = DROP_INVALID_IDENTITY;
		return 0;
	}
	return key.tunnel_id;
}

static __always_inline int handle_ipv4_from_overlay(struct __sk_buff *skb, __u32 src_id,
						    struct drop_ctx *d)
{
	struct endpoint_info *dst_ep;
	struct ct_result ct = {};
	struct pkt4 p;
	int ret;

	ret = pkt4_parse(skb, &p);
	if (ret)
		return send_drop(skb, d, ret, METRIC_INGRESS);

	dst_ep = lookup_ip4_endpoint(p.ip.daddr);
	d->dst_label = dst_ep ? dst_ep->identity : resolve_identity4(p.ip.daddr);

	ret = ct_lookup4(skb, &p, &ct);
	if (ret)
		return send_drop(skb, d, ret, METRIC_INGRESS);

	/* a remote backend's reply to a service connection of a local pod: the
	 * source becomes the frontend again (the client's from-container made
	 * the translation; the reply bypasses it) */
	if (ct.state == CT_REPLY) {
		bool redo = false;

		ret = lb4_rev_nat(skb, &p, &redo);
		if (ret)
			return send_drop(skb, d, ret, METRIC_INGRESS);
	}

	if (dst_ep && !(dst_ep->flags & ENDPOINT_F_HOST))
		return ipv4_ingress_delivery(skb, &p, dst_ep, src_id, &ct, d);

	/* for the node itself (router IP, node IP): the inner destination MAC is
	 * not this device's, so tell the stack the packet is for this host */
	if (bpf_skb_change_type(skb, PACKET_HOST) < 0)
		return send_drop(skb, d, DROP_WRITE_ERROR, METRIC_INGRESS);
	send_trace(skb, &ct, TRACE_TO_STACK, 0, src_id, d->dst_label, 0, skb->ingress_ifindex);
	update_metrics(skb->len, METRIC_INGRESS, REASON_FORWARDED);
	return CTX_ACT_OK;
}

SEC("tc")
int cil_from_overlay(struct __sk_buff *skb)
{
	struct drop_ctx d = {};
	__u32 src_id;
	__be16 proto;
	int reason = 0;

	d.ifindex = skb->ingress_ifindex;
	src_id = overlay_source_identity(skb, &reason);
	if (!src_id)
		return send_drop(skb, &d, reason, METRIC_INGRESS);
	d.src_label = src_id;
	if (eth_load_proto(skb, &proto) < 0)
		return send_drop(skb, &d, DROP_INVALID, METRIC_INGRESS);
	if (proto != bpf_htons(ETH_P_IP))
		return send_drop(skb, &d, DROP_UNKNOWN_L3, METRIC_INGRESS);
	return handle_ipv4_from_overlay(skb, src_id, &d);
}

SEC("tc")
int cil_to_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct drop_ctx d = {};
	__be32 endpoint;
	struct pkt4 p;
	__be16 proto;
	int ret;

	/* redirected by bpf_lxc.c with its key already set */
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		return CTX_ACT_OK;

	d.ifindex = skb->ifindex;
	if (eth_load_proto(skb, &proto) < 0 || proto != bpf_htons(ETH_P_IP))
		return send_drop(skb, &d, DROP_UNKNOWN_L3, METRIC_EGRESS);
	ret = pkt4_parse(skb, &p);
	if (ret)
		return send_drop(skb, &d, ret, METRIC_EGRESS);
	d.src_label = resolve_identity4(p.ip.saddr);
	d.dst_label = resolve_identity4(p.ip.daddr);
	endpoint = tunnel_endpoint4(p.ip.daddr, ipcache_lookup4(p.ip.daddr));
	if (!endpoint)
		return send_drop(skb, &d, DROP_NO_TUNNEL_ENDPOINT, METRIC_EGRESS);
	if (tunnel_set_key4(skb, endpoint, d.src_label) < 0)
		return send_drop(skb, &d, DROP_WRITE_ERROR, METRIC_EGRESS);
	update_metrics(skb->len, METRIC_EGRESS, REASON_FORWARDED);
	return CTX_ACT_OK;
}

char __license[] SEC("license") = "GPL";
