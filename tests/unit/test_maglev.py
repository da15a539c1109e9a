"""Maglev table construction: balance, minimal disruption, determinism."""

from __future__ import annotations

import pytest

from pilus.loadbalancer.maglev import DEFAULT_TABLE_SIZE, build_table, distribution


def backends(n, base=1):
    return [(base + i, f"10.0.{i // 200}.{i % 200 + 1}:8080/TCP") for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 50, 100])
def test_balance_within_one_percent(n):
    table = build_table(backends(n))
    assert len(table) == DEFAULT_TABLE_SIZE
    dist = distribution(table)
    assert set(dist) == {b for b, _ in backends(n)}
    fair = DEFAULT_TABLE_SIZE / n
    for count in dist.values():
        assert abs(count - fair) / fair < 0.01, (n, dist)


@pytest.mark.parametrize("n,bound", [(3, 1.05), (5, 1.05), (10, 1.1), (20, 1.25)])
def test_removing_one_backend_moves_about_one_nth(n, bound):
    bes = backends(n)
    before = build_table(bes)
    for gone in range(n):
        after = build_table(bes[:gone] + bes[gone + 1:])
        moved = sum(1 for x, y in zip(before, after, strict=True) if x != y)
        # every slot of the removed backend must move; the rest mostly stays
        assert moved >= before.count(bes[gone][0])
        assert moved / len(before) <= bound / n, (n, gone, moved / len(before))


def test_adding_a_backend_moves_about_one_nth():
    bes = backends(10)
    before = build_table(bes)
    after = build_table([*bes, (100, "10.9.9.9:8080/TCP")])
    moved = sum(1 for x, y in zip(before, after, strict=True) if x != y)
    assert moved / len(before) <= 1.15 / 11


def test_order_independent_and_deterministic():
    bes = backends(8)
    assert build_table(bes) == build_table(list(reversed(bes))) == build_table(bes)
    # other seed -> other table
    assert build_table(bes, seed=b"another-seed") != build_table(bes)


def test_other_primes_and_errors():
    for m in (251, 1021, 65521):
        t = build_table(backends(4), m)
        assert len(t) == m and set(t) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="not prime"):
        build_table(backends(2), 1000)
    with pytest.raises(ValueError, match="do not fit"):
        build_table(backends(300), 251)
    assert build_table([], 251) == [0] * 251


def test_weights():
    bes = backends(2)
    dist = distribution(build_table(bes, 1021, weights={1: 3, 2: 1}))
    assert 0.7 < dist[1] / 1021 < 0.8
