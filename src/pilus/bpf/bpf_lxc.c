/* SPDX-License-Identifier: Apache-2.0 */
/*
 * pilus endpoint datapath, attached to the host-side veth (lxc...) of every
 * local endpoint:
 *   cil_from_container  tc ingress: packets leaving the pod
 *   cil_to_container    tc egress:  packets the node stack sends into the pod
 * The endpoint is found by ifindex (pilus_lxc_if), so one loaded object serves
 * all endpoints of a node. The native device's program is in bpf_host.c, the
 * tunnel device's in bpf_overlay.c.
 * L7 (lib/proxy.h): a connection an allow entry with a proxy port covers goes
 * to the node's proxy by socket assign; one that arrives through the stack is
 * hairpinned from to-container into this veth's ingress, where from-container
 * does the assign. Replies to a proxy's upstream socket go to the stack.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
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
#include "lib/lb_reply.h"
#include "lib/fib.h"
#include "lib/deliver.h"
#include "lib/tunnel.h"
#include "lib/proxy.h"

static __always_inline int handle_arp(struct __sk_buff *skb, const struct endpoint_info *ep,
				      struct drop_ctx *d)
{
	struct arp_eth req;
	__u8 mac[ETH_ALEN];
	int ret;

	if (!ep)
		return send_drop(skb, d, DROP_UNKNOWN_SENDER, METRIC_EGRESS);
	/* pass anything but a well-formed request to the stack, as Cilium does */
	if (!arp_load_request(skb, &req))
		return CTX_ACT_OK;
	/* the pod probing its own address (DAD / gratuitous): not ours to answer */
	if (req.ar_tip == ep->ipv4)
		return CTX_ACT_OK;
	__builtin_memcpy(mac, ep->host_mac, ETH_ALEN);
	ret = arp_respond(skb, &req, mac, ep->ifindex);
	if (ret < 0)
		return send_drop(skb, d, DROP_WRITE_ERROR, METRIC_EGRESS);
	return ret;
}

static __always_inline int handle_ipv4_from_lxc(struct __sk_buff *skb,
						const struct endpoint_info *src_ep,
						struct drop_ctx *d)
{
	const struct remote_endpoint_info *dst_info;
	struct endpoint_info *dst_ep;
	struct lb4_result svc = {};
	struct ct_result ct = {};
	struct pkt4 p;
	__u32 src_id = src_ep->identity;
	__u32 dst_id_label;
	int ret;

	ret = pkt4_parse(skb, &p);
	if (ret)
		return send_drop(skb, d, ret, METRIC_EGRESS);

	/* anti-spoofing: the pod may only send from its own address */
	if (p.ip.saddr != src_ep->ipv4)
		return send_drop(skb, d, DROP_INVALID_SIP, METRIC_EGRESS);

	/* services: DNAT to a backend before the destination's identity,
	 * conntrack and policy are looked at, so they all see the backend */
	ret = lb4_local(skb, &p, true, &svc);
	if (ret) {
		if (svc.no_backend) {
			/* counted and reported as a drop; a SYN gets a RST and
			 * UDP an ICMP port unreachable, so clients fail at once */
			send_drop(skb, d, DROP_NO_SERVICE, METRIC_EGRESS);
			ret = lb4_no_service_reply(skb, &p, skb->ingress_ifindex);
			return ret < 0 ? CTX_ACT_SHOT : ret;
		}
		return send_drop(skb, d, ret, METRIC_EGRESS);
	}

	dst_ep = lookup_ip4_endpoint(p.ip.daddr);
	/* the destination's ipcache entry: its identity, and its node for the
	 * tunnel and native routing below (one lookup for all three) */
	dst_id_label = resolve_identity4_info(p.ip.daddr, &dst_info);
	if (dst_ep && dst_id_label == IDENTITY_WORLD && dst_ep->identity)
		dst_id_label = dst_ep->identity;
	d->dst_label = dst_id_label;

	ret = ct_lookup4(skb, &p, &ct);
	if (ret)
		return send_drop(skb, d, ret, METRIC_EGRESS);

	/* a backend's reply to a service connection: the source becomes the
	 * frontend again (a hairpin reply also goes back to the pod itself) */
	if (ct.state == CT_REPLY) {
		bool redo = false;

		ret = lb4_rev_nat(skb, &p, &redo);
		if (ret)
			return send_drop(skb, d, ret, METRIC_EGRESS);
		if (redo) {
			dst_ep = lookup_ip4_endpoint(p.ip.daddr);
			dst_id_label = resolve_identity4_info(p.ip.daddr, &dst_info);
			if (dst_ep)
				dst_id_label = dst_ep->identity;
			d->dst_label = dst_id_label;
		}
		/* a reply to a proxy's upstream connection: its socket is in the
		 * node netns, so the stack, not the client pod, gets it */
		if (ct.flags & CT_F_FROM_PROXY)
			return proxy_to_stack4(skb, &ct, d, METRIC_EGRESS);
	}

	/* policy for the first packet of a connection only: the sender's egress,
	 * then, for local delivery, the receiver's ingress (redirect_peer skips
	 * its to-container); the connection is recorded once both allowed */
	if (ct.state == CT_NEW) {
		/* the allowing entries' proxy ports: the egress proxy first (its
		 * upstream connection passes the destination's ingress policy
		 * again in to-container), else the destination's ingress proxy */
		__be16 egress_port = 0, ingress_port = 0, proxy_port;

		if (src_ep->flags & ENDPOINT_F_POLICY_EGRESS) {
			ret = policy_check4(skb, &p, src_ep, dst_id_label, POLICY_EGRESS,
					    skb->ingress_ifindex, &egress_port);
			if (ret)
				return send_drop(skb, d, ret, METRIC_EGRESS);
		}
		if (dst_ep && !(dst_ep->flags & ENDPOINT_F_HOST) &&
		    (dst_ep->flags & ENDPOINT_F_POLICY_INGRESS)) {
			ret = policy_check4(skb, &p, dst_ep, src_id, POLICY_INGRESS,
					    dst_ep->ifindex, &ingress_port);
			if (ret) {
				/* reported by the receiving endpoint, as its own drop */
				struct drop_ctx di = *d;

				di.source = dst_ep->ep_id;
				di.dst_id = dst_ep->ep_id;
				di.ifindex = dst_ep->ifindex;
				return send_drop(skb, &di, ret, METRIC_INGRESS);
			}
		}
		proxy_port = proxy_port_l4(&p, egress_port ? egress_port : ingress_port);
		ret = ct_create4_proxy(skb, &p, CT_EGRESS, src_id,
				       proxy_port ? CT_F_PROXY_REDIRECT : 0, proxy_port, &ct);
		if (ret)
			return send_drop(skb, d, ret, METRIC_EGRESS);
		/* a direct connection reusing the tuple of an earlier service one */
		if (!svc.rev_nat_index)
			lb4_forget_rev_nat(&p);
		if (proxy_port)
			return proxy_redirect4(skb, &p, proxy_port, &ct, d, METRIC_EGRESS);
	} else if (!svc.rev_nat_index && p.ip.protocol == IPPROTO_TCP &&
		   (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		/* a new direct connection (e.g. translated at the socket by
		 * bpf_sock.c) on a tuple conntrack still remembers from an earlier
		 * per-packet service connection: its replies keep their source */
		lb4_forget_rev_nat(&p);
	}
	/* the rest of a redirected connection (retransmitted SYNs too) */
	if (ct.state == CT_ESTABLISHED && (ct.flags & CT_F_PROXY_REDIRECT) && ct.proxy_port)
		return proxy_redirect4(skb, &p, ct.proxy_port, &ct, d, METRIC_EGRESS);

	if (dst_ep && !(dst_ep->flags & ENDPOINT_F_HOST))
		return ipv4_local_delivery(skb, &p, dst_ep, &ct, d, METRIC_EGRESS);

	/* tunnel mode: a destination behind another node goes into the tunnel
	 * with this endpoint's identity in the VNI (bpf_overlay.c decapsulates) */
	if (CFG(tunnel_ifindex)) {
		__be32 endpoint = tunnel_endpoint4(p.ip.daddr, dst_info);

		if (endpoint) {
			if (tunnel_set_key4(skb, endpoint, src_id) < 0)
				return send_drop(skb, d, DROP_WRITE_ERROR, METRIC_EGRESS);
			send_trace(skb, &ct, TRACE_TO_OVERLAY, d->source, src_id, dst_id_label, 0,
				   CFG(tunnel_ifindex));
			update_metrics(skb->len, METRIC_EGRESS, REASON_FORWARDED);
			return bpf_redirect(CFG(tunnel_ifindex), 0);
		}
	}

	/* native routing: a pod on another node (an ipcache entry with its node)
	 * is routed by us, FIB lookup and redirect to the native device; the
	 * stack's routing and netfilter are skipped (Cilium's BPF host routing) */
	if (!CFG(tunnel_ifindex)) {
		if (dst_info && (dst_info->flags & IPCACHE_F_HAS_TUNNEL_EP)) {
			ret = lb4_fib_redirect(skb, &p);
			if (ret >= 0) {
				send_trace(skb, &ct, TRACE_TO_STACK, d->source, src_id, dst_id_label, 0,
					   skb->ingress_ifindex);
				update_metrics(skb->len, METRIC_EGRESS, REASON_FORWARDED);
				return ret;
			}
		}
	}

	/* a NodePort reply (its source is now a node address): routed by us,
	 * the stack would drop it as a martian */
	if (lb4_is_host_addr(p.ip.saddr)) {
		ret = lb4_fib_redirect(skb, &p);
		if (ret >= 0) {
			send_trace(skb, &ct, TRACE_TO_STACK, d->source, src_id, dst_id_label, 0,
				   skb->ingress_ifindex);
			update_metrics(skb->len, METRIC_EGRESS, REASON_FORWARDED);
			return ret;
		}
	}

	send_trace(skb, &ct, TRACE_TO_STACK, d->source, src_id, dst_id_label, 0,
		   skb->ingress_ifindex);
	update_metrics(skb->len, METRIC_EGRESS, REASON_FORWARDED);
	return CTX_ACT_OK;
}

/* a packet to-container hairpinned into this veth's ingress (mark set there;
 * a pod's own packets arrive with mark 0, the veth scrubs it): to the proxy
 * listener in mark >> 16, or (no port) to a proxy's upstream socket */
static __always_inline int handle_hairpin(struct __sk_buff *skb, __u32 mark, struct drop_ctx *d)
{
	/* to-container reported the packet (aggregated by its entry) */
	struct ct_result ct = { .state = CT_ESTABLISHED, .report = false };
	__be16 proxy_port = bpf_htons((__u16)(mark >> 16));
	struct pkt4 p;
	int ret;

	if (!proxy_port)
		return proxy_to_stack4(skb, &ct, d, METRIC_EGRESS);
	ret = pkt4_parse(skb, &p);
	if (ret)
		return send_drop(skb, d, ret, METRIC_EGRESS);
	d->src_label = resolve_identity4(p.ip.saddr);
	d->dst_label = resolve_identity4(p.ip.daddr);
	return proxy_redirect4(skb, &p, proxy_port, &ct, d, METRIC_EGRESS);
}

SEC("tc")
int cil_from_container(struct __sk_buff *skb)
{
	/* read once: a context pointer kept across calls is refused by the verifier */
	__u32 ifindex = skb->ingress_ifindex;
	__u32 mark = skb->mark;
	struct drop_ctx d = {};
	struct endpoint_info *ep;
	__be16 proto;

	d.ifindex = ifindex;
	ep = lookup_ifindex_endpoint(ifindex);
	if (ep) {
		d.source = ep->ep_id;
		d.src_label = ep->identity;
	}
	if (eth_load_proto(skb, &proto) < 0)
		return send_drop(skb, &d, DROP_INVALID, METRIC_EGRESS);

	if (proto == bpf_htons(ETH_P_ARP))
		return handle_arp(skb, ep, &d);
	if (proto != bpf_htons(ETH_P_IP))
		return send_drop(skb, &d, DROP_UNKNOWN_L3, METRIC_EGRESS);
	if (!ep)
		return send_drop(skb, &d, DROP_UNKNOWN_SENDER, METRIC_EGRESS);
	if (mark_magic(mark) == MARK_MAGIC_TO_PROXY)
		return handle_hairpin(skb, mark, &d);
	return handle_ipv4_from_lxc(skb, ep, &d);
}

/* send a packet from the stack back into this veth's ingress, marked for
 * from-container's socket assign (port in mark >> 16; 0: to the stack) */
static __always_inline int proxy_hairpin(struct __sk_buff *skb, __u32 ifindex, __be16 proxy_port,
					 const struct ct_result *ct, const struct drop_ctx *d)
{
	skb->mark = MARK_MAGIC_TO_PROXY | ((__u32)bpf_ntohs(proxy_port) << 16);
	send_trace(skb, ct, TRACE_TO_PROXY, d->source, d->src_label, d->dst_label, d->dst_id,
		   ifindex);
	update_metrics(skb->len, METRIC_INGRESS, REASON_FORWARDED);
	return bpf_redirect(ifindex, BPF_F_INGRESS);
}

SEC("tc")
int cil_to_container(struct __sk_buff *skb)
{
	/* read once: a context pointer kept across calls is refused by the verifier */
	__u32 ifindex = skb->ifindex;
	__u32 mark = skb->mark;
	struct ct_result ct = {};
	struct drop_ctx d = {};
	struct endpoint_info *ep;
	__u32 src_id;
	struct pkt4 p;
	__be16 proto;
	int ret;

	d.ifindex = ifindex;
	ep = lookup_ifindex_endpoint(ifindex);
	if (ep) {
		d.source = ep->ep_id;
		d.dst_id = ep->ep_id;
		d.dst_label = ep->identity;
	}
	if (eth_load_proto(skb, &proto) < 0)
		return send_drop(skb, &d, DROP_INVALID, METRIC_INGRESS);
	if (proto == bpf_htons(ETH_P_ARP))
		return CTX_ACT_OK;
	if (proto != bpf_htons(ETH_P_IP))
		return send_drop(skb, &d, DROP_UNKNOWN_L3, METRIC_INGRESS);

	ret = pkt4_parse(skb, &p);
	if (ret)
		return send_drop(skb, &d, ret, METRIC_INGRESS);

	src_id = resolve_identity4(p.ip.saddr);
	d.src_label = src_id;

	ret = ct_lookup4(skb, &p, &ct);
	if (ret)
		return send_drop(skb, &d, ret, METRIC_INGRESS);

	/* a service backend's reply coming through the stack: source -> frontend */
	if (ct.state == CT_REPLY) {
		bool redo = false;

		ret = lb4_rev_nat(skb, &p, &redo);
		if (ret)
			return send_drop(skb, &d, ret, METRIC_INGRESS);
		/* the ingress proxy answering the egress proxy's upstream
		 * connection (whose socket has this pod's address): back into
		 * the stack through this veth's ingress, not into the pod */
		if (ct.flags & CT_F_FROM_PROXY)
			return proxy_hairpin(skb, ifindex, 0, &ct, &d);
	}

	/* ingress policy for the first packet of a connection from the stack
	 * (node, other nodes, outside); replies of the pod's own connections
	 * (masqueraded ones come back de-NATed: the reversed original tuple)
	 * are CT_REPLY and pass. The ingress proxy's upstream connections
	 * (MARK_MAGIC_PROXY_INGRESS) were judged by the proxy: no policy; the
	 * egress proxy's pass this endpoint's ingress policy, and one with a
	 * proxy port goes to the ingress proxy (hairpin) as unmarked ones do. */
	if (ct.state == CT_NEW) {
		__be16 proxy_port = 0;
		__u16 flags = mark_from_proxy(mark) ? CT_F_FROM_PROXY : 0;

		if (mark_magic(mark) != MARK_MAGIC_PROXY_INGRESS && ep &&
		    (ep->flags & ENDPOINT_F_POLICY_INGRESS)) {
			ret = policy_check4(skb, &p, ep, src_id, POLICY_INGRESS, ifindex,
					    &proxy_port);
			if (ret)
				return send_drop(skb, &d, ret, METRIC_INGRESS);
			proxy_port = proxy_port_l4(&p, proxy_port);
			if (proxy_port)
				flags |= CT_F_PROXY_REDIRECT;
		}
		ret = ct_create4_proxy(skb, &p, CT_INGRESS, src_id, flags, proxy_port, &ct);
		if (ret)
			return send_drop(skb, &d, ret, METRIC_INGRESS);
		if (proxy_port)
			return proxy_hairpin(skb, ifindex, proxy_port, &ct, &d);
	} else if (ct.state == CT_ESTABLISHED && (ct.flags & CT_F_PROXY_REDIRECT) && ct.proxy_port) {
		return proxy_hairpin(skb, ifindex, ct.proxy_port, &ct, &d);
	}

	send_trace(skb, &ct, TRACE_TO_LXC, d.source, src_id, d.dst_label, d.dst_id,
		   ifindex);
	update_metrics(skb->len, METRIC_INGRESS, REASON_FORWARDED);
	return CTX_ACT_OK;
}

char __license[] SEC("license") = "GPL";

/*
 * BTF anchor, never called: a global function keeps its signature, so every
 * ABI struct that only lives on the stack or in the ring buffer still appears
 * in the object's BTF (tests/unit/test_abi.py compares it with abi.py).
 */
__attribute__((noinline)) int pilus_abi_anchor(struct drop_notify *d, struct trace_notify *t,
					       struct notify_capture_hdr *h,
					       struct notify_common_hdr *c, struct ev_bucket *b)
{
	return (d != 0) + (t != 0) + (h != 0) + (c != 0) + (b != 0);
}
