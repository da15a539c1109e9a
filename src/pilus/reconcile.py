"""Desired state -> one map: the reconciler every map writer uses.

A component that owns a BPF map says what the map should hold (``set`` for the
whole contents, ``upsert``/``delete`` for one key); the reconciler writes only
the difference, remembers what it wrote, and keeps keys whose write failed as
pending, retried with exponential backoff (``retry``). ``resync`` reads the map
back and repairs drift (entries someone else changed or removed, entries left
by an earlier run). Error counts and the last error are part of ``status()``,
which the agent shows in ``pilus status``.

The reconciler does no I/O of its own: the target does (a BPF map, or a dict in
tests). It is not thread-safe; its owner calls it from one thread at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_DELETE = object()  # pending marker: the key must go


class MapTarget(Protocol[K, V]):
    """The map a reconciler writes. ``dump`` returns values in the desired form
    (without datapath-owned parts such as counters), so equal means in sync."""

    def dump(self) -> Iterable[tuple[K, V]]: ...
    def update(self, key: K, value: V) -> None: ...
    def delete(self, key: K) -> None: ...


class ReconcileError(Exception):
    """Some writes failed; they stay pending and are retried."""


@dataclass
class Result:
    upserted: int = 0
    deleted: int = 0
    failed: int = 0
    errors: list[tuple[object, BaseException]] = field(default_factory=list)

    def raise_for_errors(self, what: str) -> None:
        if self.errors:
            key, exc = self.errors[0]
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise ReconcileError(f"{what}: writing {key} failed: {exc}{more}") from exc


def writers_status(name: str, writers: list[Reconciler]) -> dict:
    """Several reconcilers of one kind (e.g. one per endpoint map) as one status row."""
    rows = [w.status() for w in writers]
    failed = [w for w in writers if w.last_error_at is not None]
    last = max(failed, key=lambda w: w.last_error_at or 0.0, default=None)
    pending = sum(r["pending"] for r in rows)
    return {
        "name": name,
        "maps": len(rows),
        "desired": sum(r["desired"] for r in rows),
        "pending": pending,
        "errors": sum(r["errors"] for r in rows),
        "last_error": last.last_error if last else None,
        "last_error_at": last.last_error_at if last else None,
        "state": "Ok" if not pending else "Pending",
    }


class Reconciler(Generic[K, V]):
    def __init__(
        self,
        name: str,
        target: MapTarget[K, V],
        *,
        prune: bool = True,
        backoff: tuple[float, float] = (0.1, 10.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.target = target
        self.prune = prune  # resync deletes entries nobody desires
        self._desired: dict[K, V] = {}
        self._written: dict[K, V] | None = None  # what the map holds as far as we know; None: not read yet
        self._pending: dict[K, object] = {}  # key -> value to write, or _DELETE
        self._backoff_min, self._backoff_max = backoff
        self._backoff = self._backoff_min
        self._retry_at = 0.0
        self._clock = clock
        self.errors_total = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # time.time() of the last failure

    # -- desired state ---------------------------------------------------------

    @property
    def desired(self) -> Mapping[K, V]:
        return self._desired

    def set(self, desired: Mapping[K, V]) -> Result:
        """Replace the whole desired contents and write the difference."""
        written = self._known()
        self._desired = dict(desired)
        for key in list(self._pending):
            if key not in self._desired:
                self._pending[key] = _DELETE
        for key in written.keys() - self._desired.keys():
            self._pending[key] = _DELETE
        for key, value in self._desired.items():
            if written.get(key, _DELETE) != value:
                self._pending[key] = value
        return self._flush()

    def upsert(self, key: K, value: V) -> Result:
        self._desired[key] = value
        if self._written is None or self._written.get(key, _DELETE) != value or key in self._pending:
            self._pending[key] = value
        return self._flush()

    def delete(self, key: K) -> Result:
        self._desired.pop(key, None)
        if self._written is None or key in self._written or key in self._pending:
            self._pending[key] = _DELETE
        return self._flush()

    # -- repair ------------------------------------------------------------------

    def resync(self) -> Result:
        """Read the map back and write what differs from the desired contents."""
        self._written = None
        return self.set(self._desired)

    def retry_due(self) -> bool:
        return bool(self._pending) and self._clock() >= self._retry_at

    def retry(self) -> Result:
        """Write the pending keys again (call when ``retry_due``)."""
        return self._flush()

    # -- status ------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "name": self.name,
            "desired": len(self._desired),
            "pending": len(self._pending),
            "errors": self.errors_total,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "state": "Ok" if not self._pending else "Pending",
        }

    # -- internals ---------------------------------------------------------------

    def _known(self) -> dict[K, V]:
        if self._written is None:
            written = dict(self.target.dump())
            if not self.prune:  # keys we never desired belong to nobody we know: leave them
                written = {k: v for k, v in written.items() if k in self._desired}
            self._written = written
        return self._written

    def _flush(self) -> Result:
        result = Result()
        written = self._known()
        for key, value in list(self._pending.items()):
            try:
                if value is _DELETE:
                    if key in written:
                        self.target.delete(key)
                        written.pop(key, None)
                        result.deleted += 1
                else:
                    self.target.update(key, value)  # type: ignore[arg-type]
                    written[key] = value  # type: ignore[assignment]
                    result.upserted += 1
            except Exception as exc:  # noqa: BLE001 - kept pending, counted, shown in status
                if value is _DELETE and isinstance(exc, KeyError | FileNotFoundError):
                    written.pop(key, None)  # already gone: that is what we wanted
                else:
                    result.failed += 1
                    result.errors.append((key, exc))
                    continue
            del self._pending[key]
        if result.errors:
            self.errors_total += len(result.errors)
            self.last_error = f"{result.errors[0][0]}: {result.errors[0][1]}"
            self.last_error_at = time.time()
            self._retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)
        elif not self._pending:
            self._backoff = self._backoff_min
        return result
