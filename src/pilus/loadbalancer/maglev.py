"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), pure Python.

Each backend gets a permutation of the table slots from two hashes of its name
(offset = h1 mod M, skip = h2 mod (M - 1) + 1, permutation[j] = (offset +
j * skip) mod M); backends take turns claiming their next preferred free slot
until all M slots are filled. Every backend ends up with floor(M/N) or
ceil(M/N) slots, and removing one of N backends moves only a little more than
its own 1/N of the slots (the others keep most of their preferences).

The table is a list of M backend ids, written as is into ``pilus_lb4_maglev``;
the datapath indexes it with hash(5-tuple) mod M. M must be prime (Cilium's
allowed sizes: see ``pilus.datapath.lb.MAGLEV_PRIMES``, default 16381).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence

DEFAULT_TABLE_SIZE = 16381
#: Cilium's default `bpf-lb-maglev-hash-seed`
DEFAULT_SEED = "JLfvgnHc2kaSUFaI"


def _hashes(name: str, seed: bytes) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode(), key=seed, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def _seed_bytes(seed: str | bytes) -> bytes:
    if isinstance(seed, bytes):
        return seed
    try:
        return base64.b64decode(seed, validate=True)
    except ValueError:
        return seed.encode()


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def build_table(
    backends: Iterable[tuple[int, str]] | Sequence[tuple[int, str]],
    m: int = DEFAULT_TABLE_SIZE,
    seed: str | bytes = DEFAULT_SEED,
    weights: dict[int, int] | None = None,
) -> list[int]:
    """Lookup table of ``m`` backend ids for ``backends`` = [(id, name), ...].

    ``name`` identifies the backend independently of its id (use
    "addr:port/proto"), so two nodes build the same table. The result does not
    depend on the order of ``backends``. ``weights`` (id -> positive int,
    default 1): a backend claims that many slots per round. No backends: all 0.
    """
    if not _is_prime(m):
        raise ValueError(f"Maglev table size {m} is not prime")
    items = sorted({(name, bid) for bid, name in backends})
    n = len(items)
    if n == 0:
        return [0] * m
    if n > m:
        raise ValueError(f"{n} backends do not fit a Maglev table of {m} slots")
    key = _seed_bytes(seed)
    offsets = []
    skips = []
    for name, _ in items:
        h1, h2 = _hashes(name, key)
        offsets.append(h1 % m)
        skips.append(h2 % (m - 1) + 1)
    ids = [bid for _, bid in items]
    turns = [max(1, int((weights or {}).get(bid, 1))) for bid in ids]
    nxt = [0] * n
    entry = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            off, skip = offsets[i], skips[i]
            for _ in range(turns[i]):
                j = nxt[i]
                c = (off + j * skip) % m
                while entry[c] >= 0:
                    j += 1
                    c = (off + j * skip) % m
                entry[c] = i
                nxt[i] = j + 1
                filled += 1
                if filled == m:
                    return [ids[e] for e in entry]


def distribution(table: Sequence[int]) -> dict[int, int]:
    """Slots per backend id."""
    out: dict[int, int] = {}
    for bid in table:
        out[bid] = out.get(bid, 0) + 1
    return out
