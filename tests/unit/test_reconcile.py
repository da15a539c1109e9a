"""The reconciler: desired contents -> a map, only the difference, failures retried."""

import pytest

from pilus.reconcile import ReconcileError, Reconciler


class DictMap:
    """A map target backed by a dict; ``fail`` makes writes of these keys raise."""

    def __init__(self, contents=None):
        self.contents = dict(contents or {})
        self.fail: set = set()
        self.writes: list = []

    def dump(self):
        return list(self.contents.items())

    def update(self, key, value):
        if key in self.fail:
            raise OSError(28, "no space left in map")
        self.writes.append(("update", key))
        self.contents[key] = value

    def delete(self, key):
        if key in self.fail:
            raise OSError(1, "not permitted")
        self.writes.append(("delete", key))
        if key not in self.contents:
            raise FileNotFoundError(key)
        del self.contents[key]


def test_set_writes_only_the_difference_and_prunes_leftovers():
    m = DictMap({"a": 1, "b": 2, "stale": 9})
    r = Reconciler("t", m)
    res = r.set({"a": 1, "b": 3, "c": 4})
    assert m.contents == {"a": 1, "b": 3, "c": 4}
    assert (res.upserted, res.deleted, res.failed) == (2, 1, 0)
    assert ("update", "a") not in m.writes
    m.writes.clear()
    r.set({"a": 1, "b": 3, "c": 4})
    assert m.writes == []  # nothing changed, nothing written


def test_without_prune_foreign_keys_stay():
    m = DictMap({"foreign": 1})
    r = Reconciler("t", m, prune=False)
    r.set({"a": 1})
    r.resync()
    assert m.contents == {"foreign": 1, "a": 1}


def test_failed_write_stays_pending_with_backoff_and_status():
    now = [100.0]
    m = DictMap()
    m.fail.add("x")
    r = Reconciler("ipcache", m, backoff=(1.0, 4.0), clock=lambda: now[0])
    res = r.set({"x": 1, "y": 2})
    assert res.failed == 1 and m.contents == {"y": 2}
    with pytest.raises(ReconcileError, match="x.*no space"):
        res.raise_for_errors("ipcache")
    st = r.status()
    assert st["pending"] == 1 and st["errors"] == 1 and "no space" in st["last_error"]
    assert st["state"] == "Pending"
    assert not r.retry_due()
    now[0] += 1.0
    assert r.retry_due()
    r.retry()  # still failing: backoff doubles
    now[0] += 1.0
    assert not r.retry_due()
    now[0] += 1.0
    m.fail.clear()
    assert r.retry_due()
    assert r.retry().upserted == 1
    assert m.contents == {"x": 1, "y": 2} and r.status()["state"] == "Ok" and r.status()["errors"] == 2


def test_delete_of_a_missing_key_is_done():
    m = DictMap({"a": 1})
    r = Reconciler("t", m)
    r.upsert("b", 2)
    del m.contents["b"]  # someone removed it behind our back
    res = r.delete("b")
    assert res.failed == 0 and r.status()["pending"] == 0


def test_resync_repairs_drift():
    m = DictMap()
    r = Reconciler("t", m)
    r.set({"a": 1, "b": 2})
    m.contents["a"] = 7
    del m.contents["b"]
    m.contents["z"] = 0
    r.resync()
    assert m.contents == {"a": 1, "b": 2}


def test_upsert_and_delete_are_incremental():
    m = DictMap({"old": 1})
    r = Reconciler("t", m)
    r.upsert("a", 1)
    assert m.contents == {"old": 1, "a": 1}  # upsert alone never prunes
    m.writes.clear()
    r.upsert("a", 1)
    assert m.writes == []
    r.delete("a")
    assert m.contents == {"old": 1}
