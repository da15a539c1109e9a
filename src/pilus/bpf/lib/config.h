/* SPDX-License-Identifier: Apache-2.0 */
/* Node configuration: constants patched by the loader before load
 * (bpf_map__set_initial_value on ".rodata.config"); the verifier sees them as
 * known values, so disabled branches are pruned. Defaults are for tests. */
#ifndef __PILUS_CONFIG_H
#define __PILUS_CONFIG_H

#include "common.h"

const volatile struct pilus_config pilus_cfg SEC(".rodata.config") = {
	.router_ip = 0,
	.node_ip = 0,
	.pod_cidr = 0,
	.pod_prefixlen = 0,
	.events_rate = 1000,
	.events_burst = 200,
	.ct_lifetime_tcp = 8000,
	.ct_syn_timeout = 60,
	.ct_close_timeout = 10,
	.ct_lifetime_nontcp = 60,
	.trace_aggregate = 3,
	.trace_report_interval = 5,
};

#define CFG(field) (pilus_cfg.field)

#endif /* __PILUS_CONFIG_H */
