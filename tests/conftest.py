"""Test tiers: the folder decides the tier; tiers that need root skip loudly without it."""

import os

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if "/tests/bpf/" in path or "/tests/e2e/" in path:
            item.add_marker(pytest.mark.root)
            if not IS_ROOT:
                item.add_marker(pytest.mark.skip(reason="needs root (BPF syscalls and network namespaces)"))
