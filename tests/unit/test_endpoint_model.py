from ipaddress import IPv4Address

import pytest

from pilus.endpoint.model import Endpoint, EndpointNameError, EndpointStore, split_name
from pilus.endpoint.state import TRANSITIONS, State, TransitionError, check_transition


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("default/xwing", ("default", "xwing")),
        ("xwing", ("default", "xwing")),
        ("kube-system/dns-1", ("kube-system", "dns-1")),
    ],
)
def test_split_name(name, expected):
    assert split_name(name) == expected


@pytest.mark.parametrize("name", ["", "Default/x", "ns/", "ns/UPPER", "ns/under_score", "a/" + "x" * 64, "-bad/x"])
def test_split_name_rejects(name):
    with pytest.raises(EndpointNameError) as err:
        split_name(name)
    assert "lowercase" in str(err.value)


def test_state_table_is_closed_and_walkable():
    assert set(TRANSITIONS) == set(State)
    for src, targets in TRANSITIONS.items():
        for dst in State:
            if dst in targets:
                check_transition(src, dst)
            else:
                with pytest.raises(TransitionError):
                    check_transition(src, dst)
    # the happy path of a create, and of a delete
    path = [State.WAITING_FOR_IDENTITY, State.REGENERATING, State.READY, State.DISCONNECTING, State.DISCONNECTED]
    for a, b in zip(path, path[1:], strict=False):
        check_transition(a, b)


def _ep(**kw) -> Endpoint:
    base = dict(id=3, namespace="default", pod_name="xwing", user_labels=["k8s:org=alliance"],
                service_account="default", ipv4=IPv4Address("10.200.1.3"), netns="pilus-n-ep3",
                interface_name="lxc0123456789a")
    base.update(kw)
    return Endpoint(**base)


def test_store_round_trip(tmp_path):
    store = EndpointStore(tmp_path)
    ep = _ep(state=State.READY, identity=300, labels=["k8s:org=alliance"], interface_index=9,
             mac="aa:bb:cc:dd:ee:ff", host_mac="02:00:00:00:00:01")
    store.save(ep)
    store.save(_ep(id=1, pod_name="a", ipv4=IPv4Address("10.200.1.2")))
    loaded = store.load_all()
    assert [e.id for e in loaded] == [1, 3]
    assert loaded[1] == ep
    assert loaded[1].to_json()["name"] == "default/xwing"
    store.remove(3)
    assert [e.id for e in store.load_all()] == [1]
