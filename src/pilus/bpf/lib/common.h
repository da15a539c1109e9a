/* SPDX-License-Identifier: Apache-2.0 */
/*
 * pilus datapath ABI: every struct and constant shared with the Python control
 * plane. Python mirrors live in src/pilus/datapath/abi.py (one ctypes class per
 * struct, same field names); tests/unit/test_abi.py compares both through the
 * BTF of the compiled object. Change both sides together.
 */
#ifndef __PILUS_COMMON_H
#define __PILUS_COMMON_H

#include <linux/types.h>

/* ---- tc return codes (linux/pkt_cls.h) ---- */
#define CTX_ACT_OK        0   /* TC_ACT_OK */
#define CTX_ACT_SHOT      2   /* TC_ACT_SHOT */
#define CTX_ACT_REDIRECT  7   /* TC_ACT_REDIRECT */

/* ---- address families in keys (Cilium's ENDPOINT_KEY_IPV4/IPV6) ---- */
#define ENDPOINT_KEY_IPV4 1
#define ENDPOINT_KEY_IPV6 2

/* ---- reserved identities ---- */
#define IDENTITY_UNKNOWN     0
#define IDENTITY_HOST        1
#define IDENTITY_WORLD       2
#define IDENTITY_UNMANAGED   3
#define IDENTITY_HEALTH      4
#define IDENTITY_INIT        5
#define IDENTITY_REMOTE_NODE 6

/* ---- endpoint flags ---- */
#define ENDPOINT_F_HOST 1  /* entry for a local host IP: deliver to the stack */
#define ENDPOINT_F_POLICY_INGRESS 2  /* enforce the endpoint's ingress policy */
#define ENDPOINT_F_POLICY_EGRESS  4  /* enforce the endpoint's egress policy */
/* the endpoint's ingress / egress policy uses a Kubernetes ipBlock: also look
 * up the identity of the peer address's pilus_ipblock prefix (lib/policy.h) */
#define ENDPOINT_F_IPBLOCK_INGRESS 8
#define ENDPOINT_F_IPBLOCK_EGRESS  16

/* ---- ipcache flags ---- */
#define IPCACHE_F_HAS_TUNNEL_EP 1

/* ---- metrics directions ---- */
#define METRIC_INGRESS 1
#define METRIC_EGRESS  2
#define METRIC_SERVICE 3

/* ---- forward reasons (metrics_key.reason < 130) ---- */
#define REASON_FORWARDED 0

/* ---- drop reasons (positive, as in events and metrics; Cilium's numbers) ---- */
#define DROP_INVALID_SIP      132
#define DROP_POLICY           133
#define DROP_INVALID          134
#define DROP_CT_INVALID_HDR   135
#define DROP_UNKNOWN_L3       139
#define DROP_WRITE_ERROR      141
#define DROP_UNKNOWN_L4       142
#define DROP_CSUM_L3          153
#define DROP_CT_CREATE_FAILED 155
#define DROP_NAT_NO_MAPPING   167
#define DROP_NO_FIB           169
#define DROP_NO_TUNNEL_KEY    147
#define DROP_NO_TUNNEL_ENDPOINT 160
#define DROP_INVALID_IDENTITY 171
#define DROP_PROXY_LOOKUP_FAILED 178  /* no L7 proxy socket for a redirect */
#define DROP_PROXY_SET_FAILED 179     /* bpf_sk_assign refused the proxy's socket */
#define DROP_UNKNOWN_SENDER   172
#define DROP_INVALID_VNI      183
#define DROP_POLICY_DENY      181
#define DROP_TTL_EXCEEDED     196

/* ---- monitor message types (Cilium's CILIUM_NOTIFY_*) ---- */
#define NOTIFY_DROP  1
#define NOTIFY_TRACE 4
#define NOTIFY_POLICY_VERDICT 5

#define NOTIFY_CAPTURE_VER 1
#define TRACE_PAYLOAD_LEN  128

/* ---- trace observation points (Cilium's TRACE_*) ---- */
#define TRACE_TO_LXC     0
#define TRACE_TO_PROXY   1
#define TRACE_TO_HOST    2
#define TRACE_TO_STACK   3
#define TRACE_TO_OVERLAY 4
#define TRACE_FROM_LXC   5
#define TRACE_FROM_PROXY 6
#define TRACE_FROM_HOST  7
#define TRACE_FROM_STACK 8
#define TRACE_FROM_OVERLAY 9

/* ---- conntrack ---- */
#define CT_NEW         0
#define CT_ESTABLISHED 1
#define CT_REPLY       2
#define CT_RELATED     3

#define CT_EGRESS  0  /* entry created by from-container (pod initiated) */
#define CT_INGRESS 1  /* entry created by to-container (stack initiated) */

/* ct_entry.flags bits */
#define CT_F_RX_CLOSING   (1 << 0)
#define CT_F_TX_CLOSING   (1 << 1)
#define CT_F_SEEN_NON_SYN (1 << 2)
#define CT_F_INGRESS      (1 << 3)  /* direction the entry was created in */
/* the original direction goes to the L7 proxy listening on ct_entry.proxy_port */
#define CT_F_PROXY_REDIRECT (1 << 4)
/* created from a proxy's upstream packet (MARK_MAGIC_PROXY_INGRESS/EGRESS):
 * replies go to the node stack (the proxy's socket), never into the pod */
#define CT_F_FROM_PROXY     (1 << 5)

/* TCP flag bits as on the wire (byte 13 of the TCP header) */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10
#define TCP_FLAG_URG 0x20
#define TCP_FLAG_ECE 0x40
#define TCP_FLAG_CWR 0x80
/* flags that force a trace report when first seen in a direction */
#define CT_REPORT_FLAGS (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)

/* ---- policy (Cilium's bpf/lib/policy.h) ---- */
/* policy_key: identity (32) + direction byte (8) are always matched in full;
 * protocol adds 8 bits, the destination port up to 16 more */
#define POLICY_STATIC_PREFIX   40
#define POLICY_PROTO_PREFIX    8
#define POLICY_FULL_L4_PREFIX  24
#define POLICY_FULL_PREFIX     64
/* policy verdict directions (Cilium's POLICY_INGRESS / POLICY_EGRESS) */
#define POLICY_INGRESS 1
#define POLICY_EGRESS  2
/* match types of a policy verdict (Cilium's POLICY_MATCH_*) */
#define POLICY_MATCH_NONE       0
#define POLICY_MATCH_L3_ONLY    1
#define POLICY_MATCH_L3_L4      2
#define POLICY_MATCH_L4_ONLY    3
#define POLICY_MATCH_ALL        4
#define POLICY_MATCH_L3_PROTO   5
#define POLICY_MATCH_PROTO_ONLY 6

/* events_lost slots */
#define EVENTS_LOST_RATELIMIT 0
#define EVENTS_LOST_RINGBUF   1
#define EVENTS_LOST_SLOTS     2

/* ---- map sizes ---- */
#define PILUS_LXC_MAX      65536
#define PILUS_IPCACHE_MAX  512000
#define PILUS_TUNNEL_MAX   65536
#define PILUS_CT4_MAX      262144
#define PILUS_METRICS_MAX  65536
#define PILUS_POLICY_MAX   16384  /* entries of one endpoint's policy map (Cilium's default) */
#define PILUS_POLICY_EPS   65536  /* endpoints in pilus_policy (ep_id is 16 bits) */
#define PILUS_IPBLOCK_MAX  16384  /* prefixes that Kubernetes ipBlocks name, per node */
#define PILUS_EVENTS_BYTES (1 << 20)

/* ------------------------------------------------------------------------ */

union pilus_addr {
	__be32 ip4;      /* IPv4 in the first 4 bytes */
	__u8   ip6[16];
};

/* pilus_lxc key */
struct endpoint_key {
	union pilus_addr addr;
	__u8  family;    /* ENDPOINT_KEY_IPV4 */
	__u8  key;       /* reserved (Cilium: encryption key) */
	__u16 cluster_id;
};

/* pilus_lxc / pilus_lxc_if value */
struct endpoint_info {
	__u32  ifindex;      /* host-side veth (lxc...) */
	__u16  ep_id;        /* endpoint id */
	__u16  flags;        /* ENDPOINT_F_* */
	__u32  identity;     /* security identity */
	__be32 ipv4;         /* endpoint IPv4 */
	__u8   mac[6];       /* pod eth0 MAC */
	__u8   host_mac[6];  /* lxc MAC */
	__u32  pad;
};

/* pilus_ipcache key: LPM, prefixlen = 32 (static part) + IP prefix bits */
struct ipcache_key {
	__u32 prefixlen;
	__u16 cluster_id;
	__u8  pad1;
	__u8  family;
	union pilus_addr addr;
};

#define IPCACHE_STATIC_PREFIX 32

struct remote_endpoint_info {
	__u32  sec_identity;
	__be32 tunnel_endpoint;
	__u16  node_id;
	__u8   key;
	__u8   flags;         /* IPCACHE_F_* */
};

/* pilus_tunnel_map value: the node that owns a pod CIDR */
struct tunnel_value {
	__be32 endpoint;      /* node IP (outer destination) */
	__u32  pad;
};

/* pilus_ct4 key: original-direction tuple (saddr -> daddr) */
struct ipv4_ct_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8   nexthdr;
	__u8   flags;   /* reserved (TUPLE_F_*), 0 */
	__u16  pad;
};

struct ct_entry {
	__u64 tx_packets;     /* original direction */
	__u64 tx_bytes;
	__u64 rx_packets;     /* reply direction */
	__u64 rx_bytes;
	__u32 lifetime;       /* expiry, bpf_ktime_get_ns() seconds */
	__u16 flags;          /* CT_F_* */
	__u8  tx_flags_seen;  /* OR of TCP flags seen, original direction */
	__u8  rx_flags_seen;  /* reply direction */
	__u32 src_sec_id;     /* identity of the originator */
	__u16 rev_nat_index;  /* reserved for services */
	__be16 proxy_port;    /* CT_F_PROXY_REDIRECT: the proxy's listener port */
	__u32 last_tx_report; /* seconds, reserved for report intervals */
	__u32 last_rx_report;
};

/* per-endpoint policy map key (LPM trie, Cilium's policy_key):
 * lpm_prefixlen = POLICY_STATIC_PREFIX [+ 8 proto [+ 0..16 port bits]] */
struct policy_key {
	__u32  lpm_prefixlen;
	__u32  sec_label;  /* remote identity; 0 = any identity */
	__u8   egress;     /* 0 ingress, 1 egress */
	__u8   protocol;   /* 0 = any (then no port bits) */
	__be16 dport;      /* ICMP: the ICMP type (as a port number) */
};

struct policy_entry {
	__be16 proxy_port;         /* L7 proxy listener for what it allows; 0: none */
	__u8   deny;               /* 1 = deny rule */
	__u8   lpm_prefix_length;  /* proto+port prefix bits of this entry, 0..24 */
	__u32  pad;
	__u64  packets;            /* matches (first packets of connections) */
	__u64  bytes;
};

/* pilus_metrics */
struct metrics_key {
	__u8  reason;   /* 0 forwarded, >= 130 drop reason */
	__u8  dir;      /* METRIC_INGRESS / METRIC_EGRESS */
	__u16 pad1;
	__u32 pad2;
};

struct metrics_value {
	__u64 count;
	__u64 bytes;
};

/* pilus_ev_bucket (per-CPU token bucket for event rate limiting) */
struct ev_bucket {
	__u64 tokens;    /* in nano-tokens: 1 event = 1e9 */
	__u64 last_ns;
};

/* ---- events (ring buffer records) ---- */
struct notify_common_hdr {
	__u8  type;      /* NOTIFY_DROP / NOTIFY_TRACE */
	__u8  subtype;   /* drop reason / trace observation point */
	__u16 source;    /* endpoint id of the emitting endpoint */
	__u32 hash;
};

struct notify_capture_hdr {
	struct notify_common_hdr common;
	__u32 len_orig;
	__u16 len_cap;
	__u16 version;
};

struct drop_notify {
	struct notify_capture_hdr hdr;
	__u32 src_label;
	__u32 dst_label;
	__u32 dst_id;
	__u32 ifindex;
	__u16 line;
	__u8  file;
	__s8  ext_error;
	__u32 pad;
	__u8  data[TRACE_PAYLOAD_LEN];
};

struct trace_notify {
	struct notify_capture_hdr hdr;
	__u32 src_label;
	__u32 dst_label;
	__u32 dst_id;
	__u32 ifindex;
	__u8  reason;    /* CT state: CT_NEW / CT_ESTABLISHED / CT_REPLY */
	__u8  flags;
	__u16 pad1;
	__u32 pad2;
	__u8  data[TRACE_PAYLOAD_LEN];
};

/* policy verdict (Cilium's policy_verdict_notify): the first packet of every
 * connection whose direction is enforced, and every policy drop */
struct policy_verdict_notify {
	struct notify_capture_hdr hdr;  /* common.source = the local endpoint */
	__u32 remote_label;  /* identity of the peer */
	__u32 local_label;   /* identity of the local endpoint */
	__s32 verdict;       /* 0 allowed, -DROP_POLICY / -DROP_POLICY_DENY */
	__u16 dst_port;      /* host order; ICMP type for ICMP */
	__u8  proto;
	__u8  dir;           /* POLICY_INGRESS / POLICY_EGRESS */
	__u8  match_type;    /* POLICY_MATCH_* */
	__u8  audited;       /* reserved (audit mode), 0 */
	__be16 proxy_port;   /* of the matched entry */
	__u32 ifindex;
	__u8  data[TRACE_PAYLOAD_LEN];
};

/* node configuration: .rodata.config, set by the loader before load */
struct pilus_config {
	__be32 router_ip;
	__be32 node_ip;
	__be32 pod_cidr;
	__u32  pod_prefixlen;
	__u32  events_rate;       /* events per second per CPU, 0 = unlimited */
	__u32  events_burst;
	__u32  ct_lifetime_tcp;
	__u32  ct_syn_timeout;
	__u32  ct_close_timeout;
	__u32  ct_lifetime_nontcp;
	__u32  trace_aggregate;   /* Cilium's --monitor-aggregation level (lib/trace.h) */
	__u32  tunnel_ifindex;    /* the VXLAN device (tunnel mode); 0 = native routing */
	__u32  lb_dsr;            /* 1: --bpf-lb-mode dsr (native routing only): NodePort to a
	                           * remote backend carries the frontend in an IPv4 option
	                           * (lib/nodeport.h) and the backend's node answers directly */
	__u32  trace_report_interval; /* seconds: CT-aggregated traces report a live connection
	                               * again after this long (--monitor-aggregation-interval) */
	__u32  tunnel_port;       /* tunnel mode: the VXLAN UDP port (host order); 0 = native */
};

#endif /* __PILUS_COMMON_H */
