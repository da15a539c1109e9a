"""Policy resolution cost: 1k rules over 10k identities (pure Python, no root).

    python -m bench.policy_resolve [--rules 1000] [--identities 10000] [--endpoints 100] [--json FILE]

Builds a synthetic cluster (namespaces, pods with app/tier labels, CIDR identities),
1k rules (CNP L3/L4 allows, cross-namespace allows, CIDR egress, deny rules, L4-only
rules, a few CCNPs and Kubernetes NetworkPolicies), and a node with N local endpoints.
Reports: parse time, full resolution time for all local endpoints, map entries
(total, per endpoint max/mean) and approximate BPF map memory, then the time to add
one identity incrementally (upsert + changed_endpoints + policy_for of the touched
endpoints) vs a full recompute of every endpoint. Prints a small table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pilus.identity.labels import Label, Labels, endpoint_labels
from pilus.identity.reserved import RESERVED_IDENTITIES
from pilus.policy import PolicyEngine, parse_policies

# Approximate kernel cost of one LPM-trie policy entry: key 12 B (without the 4-byte
# prefixlen header), value 12 B (proxy_port, flags, prefix length, auth, cookie),
# plus an lpm_trie_node (rcu head, 2 children, prefixlen, flags ~ 40 B) and on average
# about one intermediate node per entry.
KEY_B, VALUE_B, NODE_B, INTERMEDIATE_B = 12, 12, 40, 40 + 12


def build_policies(n_rules: int, n_ns: int, n_apps: int, rng: random.Random, subjects: list[tuple[str, str]]) -> str:
    """Rules whose subjects are (namespace, app) pairs of the node's local endpoints."""
    docs = []
    for i in range(n_rules):
        ns, app = rng.choice(subjects)
        peer = f"app{rng.randrange(n_apps)}"
        kind = i % 20
        if kind < 11:  # same-namespace L3/L4
            spec = {
                "endpointSelector": {"matchLabels": {"app": app}},
                "ingress": [
                    {
                        "fromEndpoints": [{"matchLabels": {"app": peer}}],
                        "toPorts": [{"ports": [{"port": str(rng.choice([80, 443, 8080, 5432])), "protocol": "TCP"}]}],
                    }
                ],
            }
        elif kind < 14:  # cross-namespace, tier-wide, port range
            spec = {
                "endpointSelector": {"matchLabels": {"app": app}},
                "ingress": [
                    {
                        "fromEndpoints": [
                            {
                                "matchLabels": {
                                    "k8s:io.kubernetes.pod.namespace": f"ns{rng.randrange(n_ns)}",
                                    "tier": rng.choice(["web", "api", "db"]),
                                }
                            }
                        ],
                        "toPorts": [{"ports": [{"port": "8000", "endPort": 8100, "protocol": "TCP"}]}],
                    }
                ],
            }
        elif kind < 16:  # egress to CIDRs with except + DNS
            spec = {
                "endpointSelector": {"matchLabels": {"app": app}},
                "egress": [
                    {
                        "toCIDRSet": [
                            {
                                "cidr": f"10.{rng.randrange(256)}.0.0/16",
                                "except": [f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24"],
                            }
                        ]
                    },
                    {
                        "toEndpoints": [
                            {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "app": "dns"}}
                        ],
                        "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}],
                    },
                ],
            }
            spec["egress"][0]["toCIDRSet"][0]["except"] = []
        elif kind < 18:  # deny rules
            spec = {
                "endpointSelector": {"matchLabels": {"app": app}},
                "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": peer}}]}],
                "ingress": [{"fromEndpoints": [{}], "toPorts": [{"ports": [{"port": "80"}]}]}],
            }
        elif kind < 19:  # L4-only
            spec = {
                "endpointSelector": {"matchLabels": {"tier": "web"}},
                "ingress": [{"toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}],
            }
        else:
            docs.append(
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": f"np{i}", "namespace": ns},
                    "spec": {
                        "podSelector": {"matchLabels": {"app": app}},
                        "ingress": [
                            {
                                "from": [
                                    {
                                        "namespaceSelector": {"matchLabels": {"env": "prod"}},
                                        "podSelector": {"matchLabels": {"tier": "api"}},
                                    }
                                ],
                                "ports": [{"port": 9090}],
                            }
                        ],
                    },
                }
            )
            continue
        docs.append(
            {
                "apiVersion": "cilium.io/v2",
                "kind": "CiliumNetworkPolicy",
                "metadata": {"name": f"p{i}", "namespace": ns},
                "spec": spec,
            }
        )
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def pod_labels(i: int, n_ns: int, n_apps: int, rng: random.Random) -> Labels:
    ns = f"ns{i % n_ns}"
    return endpoint_labels(
        ns,
        {"app": f"app{rng.randrange(n_apps)}", "tier": rng.choice(["web", "api", "db"]), "version": f"v{i % 7}"},
        namespace_labels={"kubernetes.io/metadata.name": ns, "env": rng.choice(["prod", "dev"])},
    )


def run(n_rules: int, n_ids: int, n_eps: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    n_ns, n_apps = 50, 200
    out: dict = {"rules": n_rules, "identities": n_ids, "endpoints": n_eps}

    labels = {256 + i: pod_labels(i, n_ns, n_apps, rng) for i in range(n_ids)}
    local = rng.sample(sorted(labels), n_eps)
    subjects = [(labels[e]["io.kubernetes.pod.namespace"].value, labels[e]["app"].value) for e in local]
    text = build_policies(n_rules, n_ns, n_apps, rng, subjects)
    t = time.perf_counter()
    docs = parse_policies(text)
    out["parse_s"] = time.perf_counter() - t

    eng = PolicyEngine()
    t = time.perf_counter()
    for r in RESERVED_IDENTITIES:
        if r.id:
            eng.upsert_identity(r.id, r.labels)
    for i, lbls in labels.items():
        eng.upsert_identity(i, lbls)
    eng.upsert_identity(256 + n_ids, endpoint_labels("kube-system", {"app": "dns"}))
    out["identities_s"] = time.perf_counter() - t

    for ep in local:
        eng.upsert_endpoint(ep, labels[ep])
    t = time.perf_counter()
    eng.set_policies(docs)
    out["set_policies_s"] = time.perf_counter() - t
    for n, pfx in enumerate(sorted(eng.cidr_prefixes())):
        eng.upsert_identity((1 << 24) | (n + 1), Labels([Label("cidr", str(pfx)), Label("reserved", "world")]))
    out["cidr_identities"] = len(eng.cidr_prefixes())
    t = time.perf_counter()
    pols = {ep: eng.policy_for(ep) for ep in local}
    out["resolve_all_s"] = time.perf_counter() - t
    counts = [len(p.entries) for p in pols.values()]
    out["entries_total"] = sum(counts)
    out["entries_max"] = max(counts)
    out["entries_mean"] = statistics.mean(counts)
    out["selectors"] = len(eng.selectors())
    out["map_bytes_total"] = sum(counts) * (KEY_B + VALUE_B + NODE_B + INTERMEDIATE_B)
    out["map_bytes_max_ep"] = max(counts) * (KEY_B + VALUE_B + NODE_B + INTERMEDIATE_B)

    # one new pod whose labels match existing selectors: incremental
    busiest = max(pols, key=lambda e: len(pols[e].entries))
    sel = max(
        (s for s in eng.selectors() if '"any:app"' in s["selector"] and "namespace" in s["selector"]),
        key=lambda s: s["users"],
    )
    want = json.loads(sel["selector"])["matchLabels"]
    out["new_identity_selector_users"] = sel["users"]
    new_lbls = endpoint_labels(
        want["k8s:io.kubernetes.pod.namespace"],
        {"app": want["any:app"], "tier": "web"},
        namespace_labels={"env": "prod"},
    )
    eng.changed_endpoints()
    inc_times = []
    touched = 0
    for k in range(20):
        ident = 200_000 + k
        t = time.perf_counter()
        eng.upsert_identity(ident, new_lbls)
        ch = eng.changed_endpoints()
        for ep in ch:
            eng.policy_for(ep)
        inc_times.append(time.perf_counter() - t)
        touched = len(ch)
    out["incremental_add_s"] = statistics.median(inc_times)
    out["incremental_touched_eps"] = touched

    full_times = []
    for _ in range(3):
        eng._mark_all()  # what a non-incremental engine would do on every identity change
        t = time.perf_counter()
        for ep in local:
            eng.policy_for(ep)
        full_times.append(time.perf_counter() - t)
    out["full_recompute_s"] = statistics.median(full_times)
    out["speedup"] = out["full_recompute_s"] / max(out["incremental_add_s"], 1e-9)
    out["busiest_entries"] = len(pols[busiest].entries)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--identities", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--json")
    a = ap.parse_args()
    r = run(a.rules, a.identities, a.endpoints)
    rows = [
        ("rules / identities / local endpoints", f"{r['rules']} / {r['identities']} / {r['endpoints']}"),
        ("parse + validate", f"{r['parse_s'] * 1e3:.0f} ms"),
        ("add identities (selector cache)", f"{r['identities_s'] * 1e3:.0f} ms"),
        (
            "resolve all local endpoints (full)",
            f"{r['resolve_all_s'] * 1e3:.0f} ms ({r['resolve_all_s'] / r['endpoints'] * 1e3:.1f} ms/endpoint)",
        ),
        ("selectors in cache", str(r["selectors"])),
        ("CIDR identities", str(r["cidr_identities"])),
        (
            "map entries total / max / mean per ep",
            f"{r['entries_total']} / {r['entries_max']} / {r['entries_mean']:.0f}",
        ),
        (
            "approx. map memory total / max ep",
            f"{r['map_bytes_total'] / 1024:.0f} KiB / {r['map_bytes_max_ep'] / 1024:.1f} KiB",
        ),
        (
            "add 1 identity, incremental (median)",
            f"{r['incremental_add_s'] * 1e3:.2f} ms, {r['incremental_touched_eps']}/{r['endpoints']} endpoints touched",
        ),
        ("full recompute of all endpoints", f"{r['full_recompute_s'] * 1e3:.0f} ms"),
        ("incremental speedup", f"{r['speedup']:.0f}x"),
    ]
    w = max(len(k) for k, _ in rows)
    print("policy resolution (python, one process)")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
