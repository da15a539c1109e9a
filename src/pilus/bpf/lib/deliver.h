/* SPDX-License-Identifier: Apache-2.0 */
/* Delivery into a local endpoint (Cilium's ipv4_local_delivery), after policy:
 * one routed hop (TTL), the endpoint's MACs, a trace, and a redirect straight
 * into the pod's namespace (bypassing the node's stack and its to-container). */
#ifndef __PILUS_DELIVER_H
#define __PILUS_DELIVER_H

#include "common.h"
#include "ipv4.h"
#include "eth.h"
#include "drop.h"
#include "trace.h"
#include "policy.h"
#include "proxy.h"

static __always_inline int ipv4_local_delivery(struct __sk_buff *skb, struct pkt4 *p,
					       const struct endpoint_info *dst_ep,
					       const struct ct_result *ct, struct drop_ctx *d,
					       __u8 metric_dir)
{
	__u32 dst_ifindex = dst_ep->ifindex;
	__u16 dst_ep_id = dst_ep->ep_id;
	__u8 dmac[ETH_ALEN], smac[ETH_ALEN];
	int ret;

	__builtin_memcpy(dmac, dst_ep->mac, ETH_ALEN);
	__builtin_memcpy(smac, dst_ep->host_mac, ETH_ALEN);
	d->dst_id = dst_ep_id;

	ret = ipv4_dec_ttl(skb, p);
	if (ret)
		return send_drop(skb, d, ret, metric_dir);
	if (eth_store_addrs(skb, dmac, smac) < 0)
		return send_drop(skb, d, DROP_WRITE_ERROR, metric_dir);

	send_trace(skb, ct, TRACE_TO_LXC, d->source, d->src_label, d->dst_label, dst_ep_id,
		   dst_ifindex);
	update_metrics(skb->len, metric_dir, REASON_FORWARDED);
	return bpf_redirect_peer(dst_ifindex, 0);
}

/* a packet from another node (tunnel or native device) for a local endpoint:
 * the endpoint's ingress policy with the sender's identity for a new
 * connection, its conntrack entry, then delivery, or the ingress L7 proxy
 * when the allowing entry has a proxy port (lib/proxy.h) */
static __always_inline int ipv4_ingress_delivery(struct __sk_buff *skb, struct pkt4 *p,
						 const struct endpoint_info *dst_ep, __u32 src_id,
						 struct ct_result *ct, struct drop_ctx *d)
{
	int ret;

	d->source = dst_ep->ep_id;
	d->dst_id = dst_ep->ep_id;
	if (ct->state == CT_NEW) {
		__be16 proxy_port = 0;

		/* an answer to a proxy's upstream connection to another node or
		 * the world: it left through the stack, so no entry exists here,
		 * but its socket does (checked before policy: it is no new
		 * connection to the pod) */
		if (proxy_reply_to_node_socket4(skb, p))
			return proxy_to_stack4(skb, ct, d, METRIC_INGRESS);
		if (dst_ep->flags & ENDPOINT_F_POLICY_INGRESS) {
			ret = policy_check4(skb, p, dst_ep, src_id, POLICY_INGRESS, dst_ep->ifindex,
					    &proxy_port);
			if (ret)
				return send_drop(skb, d, ret, METRIC_INGRESS);
		}
		proxy_port = proxy_port_l4(p, proxy_port);
		ret = ct_create4_proxy(skb, p, CT_INGRESS, src_id,
				       proxy_port ? CT_F_PROXY_REDIRECT : 0, proxy_port, ct);
		if (ret)
			return send_drop(skb, d, ret, METRIC_INGRESS);
		if (proxy_port)
			return proxy_redirect4(skb, p, proxy_port, ct, d, METRIC_INGRESS);
	} else if (ct->state == CT_ESTABLISHED && (ct->flags & CT_F_PROXY_REDIRECT) &&
		   ct->proxy_port) {
		return proxy_redirect4(skb, p, ct->proxy_port, ct, d, METRIC_INGRESS);
	}
	return ipv4_local_delivery(skb, p, dst_ep, ct, d, METRIC_INGRESS);
}

#endif
