"""The one place where errors become gRPC status codes.

Runtime errors (``runtime.types.RuntimeError_`` subclasses) map by their ``kind``; the server adds two
of its own (authentication and authorization) that the engine never raises. Messages start with the
offending field's path when there is one, and the path is also sent as trailing metadata
``unimp-field`` so clients can act on it without parsing text. Anything else is a server bug: the
client gets INTERNAL with the request id, the log gets the traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from runtime.types import ErrorKind, RuntimeError_

logger = logging.getLogger(__name__)

FIELD_METADATA_KEY = "unimp-field"
"""Trailing metadata key naming the offending request field."""

STATUS_BY_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class Unauthenticated(Exception):
    """No bearer token, or one the server does not know."""


class PermissionDenied(Exception):
    """A valid token that may not call this method (catalog writes need the admin token)."""


@dataclass(frozen=True)
class Status:
    """A gRPC status to send: code, message and the offending field (if any)."""

    code: grpc.StatusCode
    message: str
    field: str | None = None

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((FIELD_METADATA_KEY, self.field),) if self.field else ()


def with_field(message: str, field: str | None, path: str | None = None) -> str:
    """``message`` as ``"<path>: ..."``; a leading ``field`` (the raiser's name for it) is replaced by
    ``path`` (default: ``field``)."""
    path = path or field
    if not field or not path:
        return message
    for name in (field, path):
        if message.startswith(name) and message[len(name):len(name) + 1] in ("", ":", " "):
            message = message[len(name):].lstrip(":").strip()
            break
    return f"{path}: {message}" if message else path


def status_for(exc: BaseException, request_id: str = "") -> Status:
    """The status a client sees for ``exc``."""
    if isinstance(exc, RuntimeError_):
        code = STATUS_BY_KIND.get(exc.kind, grpc.StatusCode.INTERNAL)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("engine internal error", exc_info=exc)
        return Status(code, with_field(str(exc) or exc.kind.value, exc.field), exc.field)
    if isinstance(exc, Unauthenticated):
        return Status(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    if isinstance(exc, PermissionDenied):
        return Status(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    logger.error("unhandled error while serving a request", exc_info=exc)
    suffix = f" (request id {request_id})" if request_id else ""
    return Status(grpc.StatusCode.INTERNAL, f"internal server error{suffix}")
