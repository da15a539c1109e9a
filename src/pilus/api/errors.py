"""The API's one error mapping: which exceptions are the caller's fault, their HTTP status,
and the one body shape ``{"error": "<one line>"}`` every route answers errors with.

Handlers raise the components' own exceptions; ``json_errors`` (the app's middleware)
turns them into responses, so no route catches them itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pilus.endpoint.manager import EndpointExists, EndpointNotFound
from pilus.endpoint.model import EndpointNameError
from pilus.errors import TraceInputError
from pilus.identity.labels import LabelError
from pilus.ipam.hostscope import IPAMExhausted
from pilus.kvstore.base import KVStoreError
from pilus.loadbalancer.manager import BackendNotFound, ServiceConflict, ServiceNotFound
from pilus.loadbalancer.model import ServiceValidationError
from pilus.policy.distribution import NamespaceError
from pilus.policy.repository import PolicyNotFound
from pilus.policy.schema import PolicyValidationError

log = logging.getLogger(__name__)

#: exception type -> HTTP status; the exception's text is the message users see
ERROR_STATUS: list[tuple[type[BaseException], int]] = [
    (EndpointNotFound, 404),
    (EndpointExists, 409),
    (EndpointNameError, 400),
    (LabelError, 400),
    (IPAMExhausted, 503),
    (PolicyNotFound, 404),
    (PolicyValidationError, 400),
    (NamespaceError, 400),
    (TraceInputError, 400),
    (ServiceValidationError, 400),
    (ServiceConflict, 409),
    (ServiceNotFound, 404),
    (BackendNotFound, 404),
    (KVStoreError, 503),  # cluster state cannot be written now: nothing changed, try again
]

#: exception type -> more fields of its error body (a policy's issue list, for editors)
ERROR_DETAILS: dict[type[BaseException], Callable[[Any], dict[str, Any]]] = {
    PolicyValidationError: lambda exc: {"errors": [vars(issue) for issue in exc.errors]},
}

#: the largest request body the API takes: 20,000 services are ~4 MB, so this holds more
#: services than the LB maps do; a larger body is refused (413) before it is parsed
MAX_BODY_BYTES = 64 * 1024 * 1024


def error_response(status: int, message: str, **details: Any) -> web.Response:
    """The one error body: ``{"error": message, ...details}`` with ``status``."""
    return web.json_response({"error": message, **details}, status=status)


def exception_response(exc: BaseException) -> web.Response | None:
    """The response for an exception of ERROR_STATUS; None for any other (a bug: 500)."""
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            details = ERROR_DETAILS.get(cls)
            return error_response(status, str(exc), **(details(exc) if details else {}))
    return None


def body_too_large(size: int | None) -> str:
    """The 413 message; ``size`` is None when the body came without a Content-Length."""
    what = f"{size / 2**20:.1f} MiB, over" if size else "over"
    return (f"request body is {what} the API's limit of {MAX_BODY_BYTES >> 20} MiB: "
            "split the input into several imports")


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every failure of every route as an error body (aiohttp's own included)."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return error_response(413, body_too_large(request.content_length))
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:  # chunked: counted while read (client_max_size)
        return error_response(413, body_too_large(None))
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return error_response(exc.status, exc.reason)
    except Exception as exc:
        response = exception_response(exc)
        if response is not None:
            return response
        log.exception("API %s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {exc}")
