"""Fixtures for BPF_PROG_TEST_RUN tests: a datapath loaded without pinning."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxc_env import make_datapath, seed


@pytest.fixture(scope="session")
def bpf_state_dir(tmp_path_factory) -> Path:
    # one compile for the whole session (cache keyed by content hash)
    return tmp_path_factory.mktemp("pilus-state")


@pytest.fixture
def dp(bpf_state_dir):
    d = make_datapath(bpf_state_dir, events_rate=100000, events_burst=10000)
    seed(d)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def events(dp):
    r = dp.events()
    r.poll()  # start empty
    try:
        yield r
    finally:
        r.close()
