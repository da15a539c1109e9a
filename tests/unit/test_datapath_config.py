"""The node configuration patched into the objects: monitor aggregation levels and the
LB mode, with the agent flags that choose them; what is not built is refused by name."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from pilus.agent_flags import build_parser, config_from_args
from pilus.datapath.config import DatapathConfig, build_config


def _cfg(**kw) -> DatapathConfig:
    return DatapathConfig("n1", IPv4Address("10.200.1.1"), IPv4Address("172.30.0.11"),
                          IPv4Network("10.200.1.0/24"), **kw)


def test_monitor_aggregation_levels():
    assert build_config(_cfg()).trace_aggregate == 1  # medium: per connection
    assert build_config(_cfg(monitor_aggregation="none")).trace_aggregate == 0  # every packet
    with pytest.raises(ValueError, match="low and maximum are not built"):
        _cfg(monitor_aggregation="maximum")


def test_agent_flags_reach_the_config(capsys):
    base = ["--node-name", "n1", "--state-dir", "/tmp/x", "--pod-cidr", "10.200.1.0/24"]
    cfg = config_from_args(build_parser().parse_args(base + ["--monitor-aggregation", "none",
                                                             "--hubble-metrics", "flow,drop"]))
    assert cfg.monitor_aggregation == "none" and cfg.hubble_metrics == ("flow", "drop")
    for bad in (["--monitor-aggregation", "low"], ["--hubble-metrics", "icmp"],
                ["--hubble-event-buffer-capacity", "4096"], ["--hubble-monitor-events", "l7"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + bad)
    err = capsys.readouterr().err
    assert "invalid choice: 'low'" in err and "unknown Hubble metric 'icmp'" in err
    assert "2^k - 1" in err and "expected a list of drop, policy-verdict, trace" in err
