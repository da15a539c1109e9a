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


def test_monitor_aggregation_levels_are_ciliums():
    c = build_config(_cfg())
    assert (c.trace_aggregate, c.trace_report_interval) == (3, 5)  # medium, every 5 s
    levels = {name: build_config(_cfg(monitor_aggregation=name)).trace_aggregate
              for name in ("none", "disabled", "lowest", "low", "medium", "max", "maximum", "enabled")}
    assert levels == {"none": 0, "disabled": 0, "lowest": 1, "low": 2, "medium": 3, "max": 4, "maximum": 4,
                      "enabled": 4}
    assert build_config(_cfg(monitor_aggregation_interval=60)).trace_report_interval == 60
    with pytest.raises(ValueError, match="monitor aggregation 'high': use one of none, disabled"):
        _cfg(monitor_aggregation="high")
    with pytest.raises(ValueError, match="interval 0s: use 1 to 86400"):
        _cfg(monitor_aggregation_interval=0)


def test_agent_flags_reach_the_config(capsys):
    base = ["--node-name", "n1", "--state-dir", "/tmp/x", "--pod-cidr", "10.200.1.0/24"]
    cfg = config_from_args(build_parser().parse_args(base + ["--monitor-aggregation", "none",
                                                             "--hubble-metrics", "flow,drop"]))
    assert cfg.monitor_aggregation == "none" and cfg.hubble_metrics == ("flow", "drop")
    for text, seconds in (("30", 30), ("30s", 30), ("2m", 120), ("1h", 3600)):
        args = build_parser().parse_args(base + ["--monitor-aggregation", "maximum",
                                                 "--monitor-aggregation-interval", text])
        cfg = config_from_args(args)
        assert (cfg.monitor_aggregation, cfg.monitor_aggregation_interval) == ("maximum", seconds)
    for bad in (["--monitor-aggregation", "high"], ["--hubble-metrics", "icmp"],
                ["--monitor-aggregation-interval", "500ms"], ["--monitor-aggregation-interval", "0s"],
                ["--hubble-event-buffer-capacity", "4096"], ["--hubble-monitor-events", "l7"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + bad)
    err = capsys.readouterr().err
    assert "invalid choice: 'high'" in err and "got '500ms'" in err and "got '0s'" in err
    assert "unknown Hubble metric 'icmp'" in err
    assert "2^k - 1" in err and "expected a list of drop, policy-verdict, trace" in err


def test_event_rate_limit_flags_reach_the_datapath(capsys):
    base = ["--node-name", "n1", "--state-dir", "/tmp/x", "--pod-cidr", "10.200.1.0/24"]
    cfg = config_from_args(build_parser().parse_args(base))
    assert (cfg.bpf_events_rate_limit, cfg.bpf_events_burst_limit) == (1000, 200)
    cfg = config_from_args(build_parser().parse_args(base + ["--bpf-events-default-rate-limit", "0",
                                                             "--bpf-events-default-burst-limit", "50"]))
    assert (cfg.bpf_events_rate_limit, cfg.bpf_events_burst_limit) == (0, 50)  # 0: no limit
    c = build_config(_cfg(events_rate=0, events_burst=50))
    assert (c.events_rate, c.events_burst) == (0, 50)
    for bad in ("-1", "1k", "4294967296"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + ["--bpf-events-default-rate-limit", bad])
    assert "expected a whole number 0-4294967295, got '1k'" in capsys.readouterr().err
