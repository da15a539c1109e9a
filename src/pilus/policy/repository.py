"""The set of policy documents in force, with a revision that grows on every change."""

from __future__ import annotations

import threading

from pilus.policy.schema import PolicyDoc

__all__ = ["PolicyNotFound", "Repository"]


class PolicyNotFound(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0]) if self.args else "policy not found"


class Repository:
    """Documents keyed by (kind, namespace, name), in insertion order."""

    def __init__(self) -> None:
        self._docs: dict[tuple[str, str | None, str], PolicyDoc] = {}
        self._lock = threading.Lock()
        self.revision = 1

    def add(self, docs: list[PolicyDoc]) -> int:
        """Add or replace (same kind/namespace/name) every document; one new revision."""
        with self._lock:
            for d in docs:
                self._docs.pop(d.key, None)  # a replaced policy moves to the end
                self._docs[d.key] = d
            self.revision += 1
            return self.revision

    def delete(self, name: str, namespace: str | None, kind: str | None = None) -> int:
        """Delete the policies called ``name`` in ``namespace`` (None: cluster-wide ones)."""
        with self._lock:
            hits = [k for k in self._docs if k[2] == name and k[1] == namespace and (kind is None or k[0] == kind)]
            if not hits:
                where = f"in namespace {namespace!r}" if namespace is not None else "cluster-wide"
                what = f"{kind} {name!r}" if kind else f"policy {name!r}"
                raise PolicyNotFound(f"{what} {where} not found")
            for k in hits:
                del self._docs[k]
            self.revision += 1
            return self.revision

    def delete_all(self) -> int:
        with self._lock:
            self._docs.clear()
            self.revision += 1
            return self.revision

    def docs(self) -> list[PolicyDoc]:
        with self._lock:
            return list(self._docs.values())

    def __len__(self) -> int:
        return len(self._docs)
