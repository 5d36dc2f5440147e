"""Server interceptors of every Spaces service, and the order they run in.

Outermost first: metrics (sees every outcome) → request context (request id and deadline,
so everything below can log them) → errors (turns what anything below raises into a
status, including the refusals of the next three) → readiness → authentication →
validation → the servicer. Authentication runs before validation so anonymous callers learn
nothing about a method's request rules.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from services.common.auth import TokenVerifier
from services.common.interceptors.auth import AuthInterceptor, access_of
from services.common.interceptors.base import (
    INFRASTRUCTURE_SERVICES,
    MethodName,
    ScopedServerInterceptor,
    ServerCall,
)
from services.common.interceptors.errors import ErrorInterceptor
from services.common.interceptors.metrics import RPC_DURATION, RPC_HANDLED, MetricsInterceptor
from services.common.interceptors.readiness import ReadinessInterceptor
from services.common.interceptors.request_context import (
    REQUEST_ID_HEADER,
    RequestContextInterceptor,
)
from services.common.interceptors.validation import ValidationInterceptor

__all__ = [
    "INFRASTRUCTURE_SERVICES",
    "REQUEST_ID_HEADER",
    "RPC_DURATION",
    "RPC_HANDLED",
    "AuthInterceptor",
    "ErrorInterceptor",
    "MethodName",
    "MetricsInterceptor",
    "ReadinessInterceptor",
    "RequestContextInterceptor",
    "ScopedServerInterceptor",
    "ServerCall",
    "ValidationInterceptor",
    "access_of",
    "server_interceptors",
]


def server_interceptors(
    *, domain: str, verifier: TokenVerifier, readiness: ReadinessInterceptor
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """Return the Spaces interceptors in the order they must run (outermost first).

    :param domain: ErrorInfo domain of the service, ``spaces.<service>``.
    :param verifier: checks bearer tokens.
    :param readiness: the gate the server opens once start-up is done.
    """
    return [
        MetricsInterceptor(),
        RequestContextInterceptor(),
        ErrorInterceptor(domain),
        readiness,
        AuthInterceptor(verifier),
        ValidationInterceptor(),
    ]
