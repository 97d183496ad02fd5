"""Bearer-token authentication, admin authorization, and the rule on which addresses may be bound.

* Clients send exactly one ``authorization: Bearer <token>`` (a request with two is rejected, so a
  proxy that appends its own header cannot make the server pick one of them). A client token (``auth.tokens``, one per tenant)
  may call every Personalization RPC, read the catalog and use reflection; only ``auth.admin_token``
  may call UpsertItem and DeleteItem. The health service is always open (load balancers probe it).
* With no token configured, authentication is off; that is only allowed on a loopback address.
* Binding any other address needs TLS **and** a token, unless ``insecure`` is set: tokens must not
  cross a store network in clear text, and an open port must not serve anyone who finds it.

Tokens are compared in constant time. Rejections happen in a server interceptor, before the request
is deserialized.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from runtime.server.config import AuthConfig, ConfigError, ServerConfig
from runtime.server.errors import PermissionDenied, Status, Unauthenticated, status_for

logger = logging.getLogger(__name__)

PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Methods that need no token."""
ADMIN_METHODS = frozenset({"/unimp.v1.Catalog/UpsertItem", "/unimp.v1.Catalog/DeleteItem"})
"""Methods that need the admin token."""

ADMIN_TENANT = "admin"
"""Tenant name of requests made with the admin token."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant of their token, and whether it is the admin token."""

    tenant: str
    admin: bool


ANONYMOUS = Principal(tenant="", admin=True)
"""The caller when authentication is off (loopback only): may do everything, default tenant."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_security(config: ServerConfig) -> None:
    """Refuse configurations that would expose the server: raises ConfigError naming what is missing."""
    if is_loopback(config.host):
        if not config.auth.enabled:
            logger.info("authentication is off: no token configured and bound to loopback %s", config.host)
        return
    missing = [what for what, ok in (("TLS (tls.cert, tls.key)", config.tls.enabled),
                                     ("a token (auth.tokens or auth.admin_token)", config.auth.enabled)) if not ok]
    if not missing:
        return
    if not config.insecure:
        raise ConfigError(
            f"host: binding {config.host} needs {' and '.join(missing)}; configure them, bind 127.0.0.1, "
            "or set insecure = true (--insecure) to accept the risk"
        )
    logger.warning("serving on %s without %s because insecure is set", config.host, " and ".join(missing))


class Authenticator:
    """Maps bearer tokens to principals."""

    def __init__(self, auth: AuthConfig) -> None:
        self.enabled = auth.enabled
        self._tokens = [(token.encode(), Principal(tenant, admin=False)) for tenant, token in auth.tokens.items()]
        if auth.admin_token:
            self._tokens.append((auth.admin_token.encode(), Principal(ADMIN_TENANT, admin=True)))

    def principal(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The caller named by the metadata's bearer token; raises Unauthenticated."""
        if not self.enabled:
            return ANONYMOUS
        headers = [v for k, v in (metadata or ()) if k == "authorization"]
        if not headers:
            raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        if len(headers) > 1:
            raise Unauthenticated(
                f"{len(headers)} authorization metadata entries: send exactly one 'authorization: Bearer <token>'"
            )
        header = headers[0]
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
        presented = token.strip().encode()
        found: Principal | None = None
        for known, principal in self._tokens:  # compare against all, in constant time each
            if hmac.compare_digest(known, presented):
                found = principal
        if found is None:
            raise Unauthenticated("unknown bearer token")
        return found

    def authorize(self, principal: Principal, method: str) -> None:
        """Raises PermissionDenied when ``principal`` may not call ``method``."""
        if method in ADMIN_METHODS and not principal.admin:
            raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs the admin token")


def _abort_handler(handler: grpc.RpcMethodHandler | None, status: Status) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that fails with ``status``."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status.code, status.message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(status.code, status.message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None or not handler.response_streaming:
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    return grpc.unary_stream_rpc_method_handler(streaming)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects unauthenticated or unauthorized calls before their handler runs."""

    def __init__(self, authenticator: Authenticator, on_reject: Callable[[str, grpc.StatusCode], None] | None = None):
        self._auth = authenticator
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if not self._auth.enabled or method in PUBLIC_METHODS:
            return await continuation(handler_call_details)
        try:
            principal = self._auth.principal(handler_call_details.invocation_metadata)
            self._auth.authorize(principal, method)
        except (Unauthenticated, PermissionDenied) as exc:
            status = status_for(exc)
            logger.info("rejected %s: %s", method, status.message, extra={"rpc": method, "code": status.code.name})
            if self._on_reject is not None:
                self._on_reject(method, status.code)
            return _abort_handler(await continuation(handler_call_details), status)
        return await continuation(handler_call_details)
