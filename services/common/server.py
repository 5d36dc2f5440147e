"""The gRPC server every Spaces service runs, from start-up to graceful shutdown.

A service's ``main.py`` builds a :class:`Service`, adds its servicers and its start-up and
shut-down hooks, and hands it to :func:`serve`::

    service = Service("rooms", settings, common, jwks=jwks)
    service.add_servicer(rooms_pb2.DESCRIPTOR.services_by_name["RoomsService"],
                         RoomsApi(...), rooms_pb2_grpc.add_RoomsServiceServicer_to_server)
    service.on_startup(open_pool)
    service.on_shutdown(close_pool)
    serve(service)

Start-up: the server binds and starts with health NOT_SERVING (product RPCs get UNAVAILABLE),
runs the start-up hooks, then turns health SERVING. On SIGTERM/SIGINT: health goes
NOT_SERVING at once (load balancers stop sending), in-flight RPCs get ``shutdown_grace_s``
to finish, then the shut-down hooks run in reverse order. Tests call :meth:`Service.start`
and :meth:`Service.stop` in their own event loop, with port 0.

Write server-streaming handlers as async generators (``yield``), not with
``context.write``: the tracing interceptor only wraps the former.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import JwksSource, TokenVerifier
from services.common.interceptors import ReadinessInterceptor, server_interceptors
from services.common.logs import configure_logging
from services.common.settings import CommonSettings, ServiceSettings
from services.common.telemetry import (
    MetricsServer,
    server_tracing_interceptor,
    setup_tracing,
    shutdown_tracing,
    start_metrics_server,
)

logger = logging.getLogger(__name__)

__all__ = ["MAX_RECEIVE_MESSAGE_BYTES", "Hook", "Service", "run_service", "serve"]

MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024

Hook = Callable[[], Awaitable[None]]
AddServicer = Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True)
class _Registration:
    descriptor: ServiceDescriptor
    servicer: object
    add_to_server: AddServicer


class Service:
    """One service's gRPC server with health, reflection, interceptors and lifecycle.

    :param name: the service's short name (``rooms``): error domain ``spaces.rooms``.
    :param settings: this service's settings (ports, grace).
    :param common: shared settings (internal secret for service tokens).
    :param jwks: source of identity's token-signing keys.
    :param verifier: a ready verifier, instead of one built from ``jwks`` and ``common``.
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        common: CommonSettings,
        *,
        jwks: JwksSource,
        verifier: TokenVerifier | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.common = common
        self._verifier = verifier or TokenVerifier(jwks, common.internal_secret)
        self._registrations: list[_Registration] = []
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._drain: list[Hook] = []
        self._readiness = ReadinessInterceptor()
        # grpc_health's stubs describe only the sync servicer; this is the asyncio one.
        self._health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsServer | None = None
        self._port = 0
        self._stopping = False
        self._stopped = asyncio.Event()

    def add_servicer(
        self, descriptor: ServiceDescriptor, servicer: object, add_to_server: AddServicer
    ) -> None:
        """Register a servicer.

        :param descriptor: its service, e.g.
            ``rooms_pb2.DESCRIPTOR.services_by_name["RoomsService"]`` (names health and
            reflection entries).
        :param servicer: the implementation.
        :param add_to_server: the generated ``add_<Name>Servicer_to_server``.
        """
        if self._server is not None:
            raise RuntimeError("add servicers before start()")
        self._registrations.append(_Registration(descriptor, servicer, add_to_server))

    def on_startup(self, hook: Hook) -> Hook:
        """Run ``hook`` during start-up, before health turns SERVING (usable as decorator)."""
        self._startup.append(hook)
        return hook

    def on_drain(self, hook: Hook) -> Hook:
        """Register a hook run at shutdown after health turns NOT_SERVING but while RPCs are
        still served (a media node moving its sessions away); it should bound its own time."""
        self._drain.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run ``hook`` after the server stopped; hooks run in reverse order of registration.

        Shut-down hooks also run when start-up failed part-way, so they must cope with
        resources their start-up hook never opened.
        """
        self._shutdown.append(hook)
        return hook

    @property
    def port(self) -> int:
        """The bound gRPC port (after :meth:`start`)."""
        return self._port

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port, or ``None`` when metrics are off."""
        return self._metrics.port if self._metrics is not None else None

    @property
    def service_names(self) -> list[str]:
        """Fully qualified names of the registered services."""
        return [r.descriptor.full_name for r in self._registrations]

    def _connection_age_options(self) -> list[tuple[str, int]]:
        """GOAWAY after ``max_connection_age_s``, with no deadline for the calls still in
        flight (gRPC's grace is unbounded unless set): streams are never cut."""
        age = self.settings.max_connection_age_s
        return [] if age is None else [("grpc.max_connection_age_ms", int(age * 1000))]

    async def start(self) -> int:
        """Bind, start serving, run the start-up hooks, then report SERVING.

        :return: the bound gRPC port.
        :raises Exception: whatever a start-up hook raised (the server is stopped again).
        """
        server = grpc.aio.server(
            interceptors=[
                server_tracing_interceptor(),
                *server_interceptors(
                    domain=f"spaces.{self.name}",
                    verifier=self._verifier,
                    readiness=self._readiness,
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
                # Fail loudly when the port is taken instead of sharing it with a stale process.
                ("grpc.so_reuseport", 0),
                # gRPC core cancels calls beyond 1,000 waiting to be picked up; a Space's
                # listeners reconnecting at once (a rooms restart) exceed that, so raise it.
                ("grpc.server.max_pending_requests", 20_000),
                ("grpc.server.max_pending_requests_hard_limit", 40_000),
                *self._connection_age_options(),
            ],
        )
        self._server = server
        for registration in self._registrations:
            registration.add_to_server(registration.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self._port = server.add_insecure_port(address)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.metrics_port is not None:
            self._metrics = start_metrics_server(self.settings.metrics_port)
        await server.start()
        logger.info("%s listening on %s:%d", self.name, self.settings.grpc_host, self._port)
        try:
            for hook in self._startup:
                await hook()
        except BaseException:
            logger.exception("%s failed to start", self.name)
            await self.stop(grace=0)
            raise
        self._readiness.set_ready()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("%s is serving", self.name)
        return self._port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish, then run the shut-down hooks.

        :param grace: seconds for in-flight RPCs; default ``settings.shutdown_grace_s``.
        """
        if self._server is None or self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        logger.info("%s shutting down (grace %.1fs)", self.name, grace)
        await self._health.enter_graceful_shutdown()
        for hook in self._drain:
            try:
                await hook()
            except Exception:
                logger.exception("a drain hook of %s failed", self.name)
        await self._server.stop(grace)
        for hook in reversed(self._shutdown):
            try:
                await hook()
            except Exception:
                logger.exception("a shut-down hook of %s failed", self.name)
        if self._metrics is not None:
            # Its shutdown waits for the serving thread's next poll (up to 0.5 s).
            await asyncio.to_thread(self._metrics.stop)
            self._metrics = None
        self._stopped.set()
        logger.info("%s stopped", self.name)

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *self.service_names):
            await self._health.set(name, status)


async def run_service(service: Service) -> None:
    """Run ``service`` in this process until SIGTERM or SIGINT, then shut it down gracefully.

    Sets up logging and tracing for the process first.
    """
    configure_logging(service.name, service.common)
    setup_tracing(service.name, service.common)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await service.start()
        await stop.wait()
        logger.info("%s received a stop signal", service.name)
        await service.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        shutdown_tracing()


def serve(service: Service) -> None:
    """Entry point for ``main.py``: run ``service`` until stopped by a signal."""
    asyncio.run(run_service(service))
