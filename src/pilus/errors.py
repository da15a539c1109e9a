"""Which exceptions are the user's to fix: those print as one line, not a traceback."""

from __future__ import annotations


class TraceInputError(ValueError):
    """A policy trace request that names nothing traceable."""


def user_facing() -> tuple[type[BaseException], ...]:
    from pilus.agent import AgentError
    from pilus.datapath import DatapathError
    from pilus.datapath.links import LinkError
    from pilus.identity.labels import LabelError
    from pilus.ipam.hostscope import IPAMExhausted
    from pilus.kvstore.base import KVStoreError
    from pilus.node.setup import NodeSetupError

    return (AgentError, DatapathError, LinkError, LabelError, IPAMExhausted, KVStoreError, NodeSetupError)


def user_message(exc: BaseException) -> str | None:
    if isinstance(exc, user_facing()):
        return str(exc)
    return None
