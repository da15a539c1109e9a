"""Which exceptions are the user's to fix: those print as one line, not a traceback.

This module sits above the rooms whose error classes it lists and below the agent and the
API, which import it; it imports only error classes, never the agent or the API.
"""

from __future__ import annotations

from pilus.datapath.errors import DatapathError
from pilus.identity.labels import LabelError
from pilus.ipam.hostscope import IPAMExhausted
from pilus.kvstore.base import KVStoreError
from pilus.node.setup import NodeSetupError


class AgentError(RuntimeError):
    """A start-up problem the user can fix; printed as one line."""


class TraceInputError(ValueError):
    """A policy trace request that names nothing traceable."""


USER_FACING: tuple[type[BaseException], ...] = (
    AgentError,
    DatapathError,  # links' failures too
    LabelError,
    IPAMExhausted,
    KVStoreError,
    NodeSetupError,
)


def user_message(exc: BaseException) -> str | None:
    if isinstance(exc, USER_FACING):
        return str(exc)
    return None
