"""Tracing (OpenTelemetry) and the Prometheus metrics endpoint.

Spans are always created, so trace context propagates across gRPC hops and into logs;
they are exported (OTLP/gRPC, batched) only when ``SPACES_OTLP_ENDPOINT`` is set. Health
checks and reflection are left out of traces: probes every few seconds would drown the rest.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc.aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import Histogram, start_http_server

from services.common.settings import CommonSettings

logger = logging.getLogger(__name__)

__all__ = [
    "GC_PAUSE",
    "MetricsServer",
    "client_tracing_interceptors",
    "server_tracing_interceptor",
    "setup_tracing",
    "shutdown_tracing",
    "start_metrics_server",
    "track_gc_pauses",
]

_provider: TracerProvider | None = None
_provider_lock = threading.Lock()


def setup_tracing(service_name: str, settings: CommonSettings) -> TracerProvider:
    """Install the process's tracer provider (once; later calls return the first one).

    :param service_name: ``service.name`` of the spans unless ``OTEL_SERVICE_NAME`` is set.
    :param settings: ``otlp_endpoint`` switches exporting on.
    """
    global _provider
    with _provider_lock:
        if _provider is not None:
            return _provider
        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        if settings.otlp_endpoint:
            # Imported here: the exporter pulls in its own gRPC stack, needless when off.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
            )
            logger.info("exporting traces to %s", settings.otlp_endpoint)
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def shutdown_tracing() -> None:
    """Flush and stop exporting (call at exit; safe when tracing was never set up)."""
    if _provider is not None:
        _provider.shutdown()


def _traced_methods() -> Any:
    return filters.negate(
        filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection."))
    )


def server_tracing_interceptor() -> grpc.aio.ServerInterceptor[Any, Any]:
    """Return the OTel aio server interceptor (spans for every RPC but health/reflection)."""
    interceptor: grpc.aio.ServerInterceptor[Any, Any] = aio_server_interceptor(  # type: ignore[no-untyped-call]
        filter_=_traced_methods()
    )
    return interceptor


def client_tracing_interceptors() -> Sequence[Any]:
    """Return the OTel aio client interceptors (one per RPC kind), health excluded."""
    interceptors: Sequence[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        filter_=_traced_methods()
    )
    return interceptors


class MetricsServer:
    """The Prometheus HTTP endpoint (``/metrics``), served from a daemon thread.

    :param port: TCP port; 0 picks a free one.
    :param addr: bind address.
    """

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        server, thread = start_http_server(port, addr)
        self._server: WSGIServer = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


GC_PAUSE = Histogram(
    "spaces_gc_pause_seconds",
    "Cyclic garbage collections of the process (each holds the GIL: in media, a pause of "
    "all forwarding), by generation.",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
_gc_started = [0.0]


def _time_collection(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _gc_started[0])


def track_gc_pauses() -> None:
    """Time every garbage collection into :data:`GC_PAUSE` (idempotent)."""
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve the default Prometheus registry over HTTP (``/metrics``), with garbage
    collection pauses timed (:func:`track_gc_pauses`).

    :param port: TCP port; 0 picks a free one (see :attr:`MetricsServer.port`).
    :param addr: bind address.
    """
    track_gc_pauses()
    server = MetricsServer(port, addr)
    logger.info("metrics on http://%s:%d/metrics", addr, server.port)
    return server
