from prometheus_client import CollectorRegistry, generate_latest

from pilus.metrics.collector import AgentCollector, datapath_samples

ROWS = [
    {"reason": 0, "reason_desc": "Success", "direction": "egress", "packets": 10, "bytes": 1000},
    {"reason": 132, "reason_desc": "Invalid source ip", "direction": "egress", "packets": 2, "bytes": 84},
]


def test_rows_become_cilium_named_counters():
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in datapath_samples(ROWS)}
    assert samples[("pilus_forward_count_total", (("direction", "egress"),))] == 10
    key = ("pilus_drop_count_total", (("direction", "egress"), ("reason", "Invalid source ip")))
    assert samples[key] == 2


def test_prometheus_exposition_matches_rows():
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: datapath_samples(ROWS)))
    text = generate_latest(registry).decode()
    assert 'pilus_drop_count_total{direction="egress",reason="Invalid source ip"} 2.0' in text
    assert 'pilus_forward_bytes_total{direction="egress"} 1000.0' in text
