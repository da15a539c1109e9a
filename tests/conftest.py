"""Test tiers: the folder decides the tier; tiers that need root skip loudly without it."""

import os

import pytest
from hypothesis import settings

from pilus import programs

IS_ROOT = os.geteuid() == 0

# Property tests explore at random while developing; CI replays a fixed set of examples
# (derandomized) with no per-example deadline, so a noisy machine cannot make it flaky.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _needs_root(item) -> bool:
    path = str(item.fspath)
    return "/tests/bpf/" in path or "/tests/e2e/" in path


def pytest_collection_modifyitems(config, items):
    if IS_ROOT and any(_needs_root(i) for i in items) and (gone := programs.missing()):
        # one line naming the packages, not a failure deep inside a test
        pytest.exit(f"not installed: {programs.describe(gone)}; run `make setup`", returncode=4)
    for item in items:
        if _needs_root(item):
            item.add_marker(pytest.mark.root)
            if not IS_ROOT:
                item.add_marker(pytest.mark.skip(reason="needs root (BPF syscalls and network namespaces)"))
