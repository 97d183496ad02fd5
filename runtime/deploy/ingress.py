"""What Serve's gRPC proxy registers: the unimp.v1 services with raw-bytes requests.

Ray Serve's gRPC ingress is configured with ``grpc_servicer_functions``: import paths of functions
``f(servicer, server)`` that add handlers to its proxy server. The proxy keeps each handler's request
deserializer and replaces everything else with a call to the application's ingress deployment, whose
method of the same name gets the deserialized request. ``add_unimp_services`` registers the
Personalization and Catalog methods (and grpc.health.v1 Check) **without** a deserializer, so the
proxy hands the replica the request's raw bytes, exactly what ``unimp serve``'s handlers get: the
servicer parses them (a malformed message is INVALID_ARGUMENT naming nothing, not grpc's INTERNAL),
the bytes pickle cheaply on their way to a replica, and the request router reads ``user_id`` from
them without the proxy's message classes.

This module imports grpc and the generated descriptors only (never ray), so the proxy can import it.
"""

from __future__ import annotations

from typing import Any

import grpc

from runtime.server.servicer import CATALOG, PERSONALIZATION

SERVICER_FUNCTION = "runtime.deploy.ingress.add_unimp_services"
"""The import path to put in Serve's ``grpc_options.grpc_servicer_functions``."""

HEALTH_SERVICE = "grpc.health.v1.Health"


def _placeholder(request: bytes, context: grpc.ServicerContext) -> Any:  # pragma: no cover - replaced by Serve
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "served by the Ray Serve proxy only")


def _handlers() -> list[grpc.GenericRpcHandler]:
    out = []
    for service in (PERSONALIZATION, CATALOG):
        handlers = {}
        for method in service.methods:
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(_placeholder)
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(_placeholder)
        out.append(grpc.method_handlers_generic_handler(service.full_name, handlers))
    out.append(grpc.method_handlers_generic_handler(
        HEALTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(_placeholder)}))
    return out


def add_unimp_services(servicer: Any, server: Any) -> None:
    """Register the unimp.v1 services (raw-bytes requests) and grpc.health.v1 Check on ``server``."""
    for handler in _handlers():
        server.add_generic_rpc_handlers((handler,))
