"""Agent metrics, read on demand from the datapath's metrics map and the agent state.

One source of rows feeds both the JSON list (`pilus metrics list`) and the
Prometheus exposition, so the two never disagree. Label values are bounded:
reasons come from a fixed table, directions are ingress/egress, states are enum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    kind: str  # "counter" | "gauge"
    help: str


def datapath_samples(rows: Iterable[dict]) -> list[Sample]:
    """Rows of the metrics map -> drop/forward counters (Cilium's metric names)."""
    out = []
    for row in rows:
        direction = row["direction"]
        if row["reason"] == 0:
            labels = {"direction": direction}
            out.append(Sample("pilus_forward_count_total", labels, row["packets"], "counter",
                              "Packets forwarded by the datapath"))
            out.append(Sample("pilus_forward_bytes_total", labels, row["bytes"], "counter",
                              "Bytes forwarded by the datapath"))
        else:
            labels = {"reason": row["reason_desc"], "direction": direction}
            out.append(Sample("pilus_drop_count_total", labels, row["packets"], "counter",
                              "Packets dropped by the datapath, by reason"))
            out.append(Sample("pilus_drop_bytes_total", labels, row["bytes"], "counter",
                              "Bytes dropped by the datapath, by reason"))
    return out


class AgentCollector(Collector):
    """Prometheus view of `samples()`; registered on a private registry."""

    def __init__(self, samples: Callable[[], list[Sample]]) -> None:
        self._samples = samples

    def collect(self):
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for s in self._samples():
            family = families.get(s.name)
            if family is None:
                cls = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                base = s.name.removesuffix("_total") if s.kind == "counter" else s.name
                family = cls(base, s.help, labels=sorted(s.labels))
                families[s.name] = family
            family.add_metric([s.labels[k] for k in sorted(s.labels)], s.value)
        yield from families.values()
