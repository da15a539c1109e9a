/* SPDX-License-Identifier: Apache-2.0 */
/*
 * pilus host datapath (Cilium's bpf_host.c), attached to the node's native
 * (underlay) device:
 *   cil_from_netdev  tc ingress: NodePort, ExternalIPs and LoadBalancer IPs
 *                    for clients outside the node
 * Its maps are bpf_lxc.o's (lib/maps.h: shared through their pins).
 *
 * A TCP/UDP packet to a routable frontend (SVC_FLAG_ROUTABLE: node address :
 * nodePort, external IP, LoadBalancer IP; never a ClusterIP) is DNATed to a
 * backend of the external scope (externalTrafficPolicy: Local lists only this
 * node's backends). A packet for a local endpoint (such a DNATed one, or
 * another node's pod in native routing) is delivered here: the endpoint's
 * ingress policy with the source's identity from the ipcache, its conntrack
 * entry, bpf_redirect_peer (BPF host routing; the stack and to-container are
 * skipped). Anything else is the stack's. A local backend's replies are
 * CT_REPLY in its from-container, where lb4_rev_nat() restores the frontend
 * as their source before they leave through the stack.
 * A backend on another node (externalTrafficPolicy: Cluster) is reached with
 * SNAT to the node IP (lib/nodeport.h), through the tunnel (VNI world) or
 * routed (native); its replies come back to the node IP, where the SNAT and
 * the DNAT are reversed and the reply is routed to the client here.
 * DSR mode (pilus_config.lb_dsr, native routing only): the client's address
 * and port stay, every packet gets an IPv4 option with the frontend and is
 * routed to the backend's node, whose from-netdev records the frontend for the
 * replies (lib/nodeport.h); the backend answers the client directly.
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
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/drop.h"
#include "lib/lb_packet.h"
#include "lib/lb_reply.h"
#include "lib/conntrack.h"
#include "lib/deliver.h"
#include "lib/fib.h"
#include "lib/nodeport.h"
#include "lib/tunnel.h"

/* a packet for a local endpoint (another node's pod in native routing, a
 * NodePort connection after its DNAT): the endpoint's ingress policy with the
 * source's identity from the ipcache, then straight into the pod (BPF host
 * routing: the stack and the pod's to-container are skipped); anything else
 * is the stack's */
static __always_inline int from_netdev_deliver(struct __sk_buff *skb, struct pkt4 *p,
					       struct endpoint_info *dst_ep, struct drop_ctx *d)
{
	struct ct_result ct = {};
	__u32 src_id;
	int ret;

	if (!dst_ep || (dst_ep->flags & ENDPOINT_F_HOST))
		return CTX_ACT_OK;
	src_id = resolve_identity4(p->ip.saddr);
	d->src_label = src_id;
	d->dst_label = dst_ep->identity;
	ret = ct_lookup4(skb, p, &ct);
	if (ret)
		return send_drop(skb, d, ret, METRIC_INGRESS);
	/* DSR: another node's NodePort connection to a local backend; the
	 * option stays in the packet (the pod's stack ignores it) */
	if (CFG(lb_dsr)) {
		ret = nodeport_dsr_ingress(skb, p);
		if (ret)
			return send_drop(skb, d, ret, METRIC_INGRESS);
	}
	/* a remote backend's reply to a service connection of a local pod */
	if (ct.state == CT_REPLY) {
		bool redo = false;

		ret = lb4_rev_nat(skb, p, &redo);
		if (ret)
			return send_drop(skb, d, ret, METRIC_INGRESS);
	}
	return ipv4_ingress_delivery(skb, p, dst_ep, src_id, &ct, d);
}

/* routed by us to the FIB's next hop (a packet with a node address as its
 * source would be dropped by the stack as a martian) */
static __always_inline int fib_forward(struct __sk_buff *skb, struct pkt4 *p, struct drop_ctx *d,
				       __u8 dir)
{
	int ret = lb4_fib_redirect(skb, p);

	if (ret < 0)
		return send_drop(skb, d, DROP_NO_FIB, dir);
	update_metrics(skb->len, dir, REASON_FORWARDED);
	return ret;
}

/* DSR: the client keeps its address; the frontend rides in an IPv4 option to
 * the backend's node (routed: DSR is native routing only), which answers the
 * client itself. Too big with the option: ICMP fragmentation needed. */
static __always_inline int nodeport_dsr_forward(struct __sk_buff *skb, struct pkt4 *p,
						const struct lb4_result *svc, struct drop_ctx *d)
{
	__u32 mtu = 0;
	int ret;

	if (bpf_check_mtu(skb, 0, &mtu, DSR_IPV4_OPT_LEN, 0) == BPF_MTU_CHK_RET_FRAG_NEEDED) {
		send_drop(skb, d, DROP_FRAG_NEEDED, METRIC_INGRESS);
		ret = nodeport_dsr_frag_needed(skb, p, svc, mtu, d->ifindex);
		return ret < 0 ? CTX_ACT_SHOT : ret;
	}
	ret = nodeport_dsr_set_opt4(skb, p, svc->vip, svc->vport);
	if (ret)
		return send_drop(skb, d, ret, METRIC_INGRESS);
	return fib_forward(skb, p, d, METRIC_INGRESS);
}

/* a frontend DNATed to another node's backend: SNAT, then into the tunnel
 * (the client is presented as world) or routed to the backend's node; DSR
 * instead in native routing with lb_dsr */
static __always_inline int nodeport_forward(struct __sk_buff *skb, struct pkt4 *p,
					    const struct lb4_result *svc, struct drop_ctx *d)
{
	int ret;

	if (CFG(lb_dsr) && !CFG(tunnel_ifindex))
		return nodeport_dsr_forward(skb, p, svc, d);
	ret = nodeport_snat_fwd(skb, p, svc);
	if (ret)
		return send_drop(skb, d, ret, METRIC_INGRESS);
	if (CFG(tunnel_ifindex)) {
		__be32 endpoint = tunnel_endpoint4(p->ip.daddr, ipcache_lookup4(p->ip.daddr));

		if (!endpoint)
			return send_drop(skb, d, DROP_NO_TUNNEL_ENDPOINT, METRIC_INGRESS);
		if (tunnel_set_key4(skb, endpoint, IDENTITY_WORLD) < 0)
			return send_drop(skb, d, DROP_WRITE_ERROR, METRIC_INGRESS);
		update_metrics(skb->len, METRIC_INGRESS, REASON_FORWARDED);
		return bpf_redirect(CFG(tunnel_ifindex), 0);
	}
	return fib_forward(skb, p, d, METRIC_INGRESS);
}

/* a remote backend's reply to a SNATed NodePort connection: both translations
 * reversed, routed to the client; -1: not such a reply */
static __always_inline int nodeport_reply(struct __sk_buff *skb, struct pkt4 *p, struct drop_ctx *d)
{
	bool snat = false;
	int ret = lb4_rev_nat(skb, p, &snat);

	if (ret)
		return send_drop(skb, d, ret, METRIC_INGRESS);
	if (!snat)
		return -1;
	return fib_forward(skb, p, d, METRIC_EGRESS);
}

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	/* read once: a context pointer kept across calls is refused by the verifier */
	__u32 ifindex = skb->ingress_ifindex;
	struct lb4_result svc = {};
	struct drop_ctx d = {};
	struct pkt4 p;
	__be16 proto;
	int ret;

	if (eth_load_proto(skb, &proto) < 0 || proto != bpf_htons(ETH_P_IP))
		return CTX_ACT_OK;
	if (pkt4_parse(skb, &p))
		return CTX_ACT_OK;  /* not ours to judge: the stack decides */
	d.ifindex = ifindex;
	/* tunnel mode: the tunnel's own packets (VXLAN to this node) are for the
	 * stack, which decapsulates them for from-overlay (bpf_overlay.c); no
	 * service or endpoint lookup for them */
	if (CFG(tunnel_port) && p.ip.protocol == IPPROTO_UDP && !p.is_fragment &&
	    p.ip.daddr == CFG(node_ip) && p.dport == bpf_htons((__u16)CFG(tunnel_port)))
		return CTX_ACT_OK;
	if (p.ip.daddr == CFG(node_ip) && bpf_ntohs(p.dport) >= NODEPORT_PORT_MIN) {
		ret = nodeport_reply(skb, &p, &d);
		if (ret >= 0)
			return ret;
	}
	ret = lb4_local(skb, &p, false, &svc);
	if (!ret) {
		/* the destination after any DNAT: looked up once, for both paths */
		struct endpoint_info *dst_ep = lookup_ip4_endpoint(p.ip.daddr);

		if (svc.rev_nat_index && (!dst_ep || (dst_ep->flags & ENDPOINT_F_HOST))) {
			d.src_label = IDENTITY_WORLD;
			d.dst_label = resolve_identity4(p.ip.daddr);
			return nodeport_forward(skb, &p, &svc, &d);
		}
		return from_netdev_deliver(skb, &p, dst_ep, &d);
	}
	d.src_label = resolve_identity4(p.ip.saddr);
	if (svc.no_backend) {
		/* counted and reported; a SYN gets a RST, UDP an ICMP unreachable */
		send_drop(skb, &d, DROP_NO_SERVICE, METRIC_INGRESS);
		ret = lb4_no_service_reply(skb, &p, ifindex);
		return ret < 0 ? CTX_ACT_SHOT : ret;
	}
	return send_drop(skb, &d, ret, METRIC_INGRESS);
}

char __license[] SEC("license") = "GPL";
