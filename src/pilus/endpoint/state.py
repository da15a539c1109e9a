"""Endpoint lifecycle states and the transitions between them, as data.

Rules (Cilium's endpoint states, the subset a pod without a kubelet needs):
- a new endpoint waits for its identity, then regenerates (netns, veth, maps,
  programs), then is ready;
- a ready endpoint regenerates again when its identity or the datapath changes
  (agent restart restores it through "restoring");
- deletion goes through disconnecting to disconnected; any state may fail into
  "invalid" when its datapath cannot be built.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    WAITING_FOR_IDENTITY = "waiting-for-identity"
    REGENERATING = "regenerating"
    READY = "ready"
    RESTORING = "restoring"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"
    INVALID = "invalid"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.WAITING_FOR_IDENTITY: frozenset({State.REGENERATING, State.DISCONNECTING, State.INVALID}),
    State.REGENERATING: frozenset({State.READY, State.DISCONNECTING, State.INVALID}),
    State.READY: frozenset({State.REGENERATING, State.DISCONNECTING, State.RESTORING}),
    State.RESTORING: frozenset({State.REGENERATING, State.READY, State.DISCONNECTING, State.INVALID}),
    State.DISCONNECTING: frozenset({State.DISCONNECTED, State.INVALID}),
    State.DISCONNECTED: frozenset(),
    State.INVALID: frozenset({State.DISCONNECTING, State.RESTORING}),
}


class TransitionError(RuntimeError):
    pass


def check_transition(current: State, new: State) -> None:
    if new not in TRANSITIONS[current]:
        raise TransitionError(f"endpoint state cannot change from {current.value} to {new.value}")
