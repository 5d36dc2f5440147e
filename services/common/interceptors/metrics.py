"""RPC metrics in the Prometheus default registry.

Labels are the fully qualified gRPC service, the short method name and the status code
name; never ids, so the series count stays bounded. The service label is ``grpc_service``
rather than ``service`` because Prometheus' Kubernetes discovery attaches a ``service``
target label (the Kubernetes Service) that would otherwise clash with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import grpc
import grpc.aio
from prometheus_client import Counter, Histogram

from services.common.interceptors.base import ScopedServerInterceptor, ServerCall

logger = logging.getLogger(__name__)

__all__ = ["RPC_DURATION", "RPC_HANDLED", "MetricsInterceptor"]

RPC_HANDLED = Counter(
    "spaces_rpc_server_handled",
    "RPCs completed by the server, by status code.",
    ["grpc_service", "method", "code"],
)
RPC_DURATION = Histogram(
    "spaces_rpc_server_duration_seconds",
    "Time from receiving an RPC to finishing it; for streaming RPCs, the stream's lifetime.",
    ["grpc_service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


class MetricsInterceptor(ScopedServerInterceptor):
    """Counts every RPC by outcome and times it. Put it outermost so it sees every status."""

    def scope(self, call: ServerCall) -> AbstractAsyncContextManager[None]:
        return self._measure(call)

    @asynccontextmanager
    async def _measure(self, call: ServerCall) -> AsyncIterator[None]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
            code = _code_set_by_handler(call)
        except grpc.aio.AbortError:
            code = _code_set_by_handler(call)
            raise
        except asyncio.CancelledError:
            remaining = call.context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            # What gRPC itself reports for an exception escaping a handler.
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            RPC_HANDLED.labels(call.method.service, call.method.method, code.name).inc()
            RPC_DURATION.labels(call.method.service, call.method.method).observe(
                time.perf_counter() - started
            )


def _code_set_by_handler(call: ServerCall) -> grpc.StatusCode:
    try:
        code = call.context.code()
    except (AttributeError, NotImplementedError):
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    # Some gRPC versions report the raw cygrpc integer.
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.OK
