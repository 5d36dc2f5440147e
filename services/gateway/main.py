"""Runs the gateway: ``python -m services.gateway.main``.

Wiring only: settings → logging and tracing → metrics server → backend channels, rate
limiter and client identification → the ASGI app under uvicorn (which handles SIGTERM:
it stops accepting, gives open requests ``GATEWAY_SHUTDOWN_GRACE_S``, then runs the app's
shutdown, closing channels and Redis).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

import uvicorn
from starlette.applications import Starlette

from services.common.auth import TokenVerifier
from services.common.jwks_client import IdentityJwksSource
from services.common.logs import configure_logging
from services.common.redis import create_redis
from services.common.settings import CommonSettings
from services.common.telemetry import (
    MetricsServer,
    setup_tracing,
    shutdown_tracing,
    start_metrics_server,
)
from services.gateway.app import GatewayConfig, create_app
from services.gateway.clients import ClientIdentifier
from services.gateway.descriptors import ApiDescription, http_rule, load_api
from services.gateway.ratelimit import (
    MemoryRateLimiter,
    RateLimiter,
    RateLimitGate,
    RedisRateLimiter,
)
from services.gateway.routing import http_bindings
from services.gateway.settings import GatewaySettings
from services.gateway.transcoder.backend import Backend, BackendRouter, addresses_from_settings
from services.gateway.ws_protocol import HandshakeCheckedWebSocketProtocol
from services.media.registry import NodeRegistry

logger = logging.getLogger(__name__)

__all__ = ["WS_MAX_FRAME_BYTES", "build_gateway", "main", "rate_limit_redis_url"]

WS_MAX_FRAME_BYTES = 64 * 1024
"""Largest WebSocket frame a client may send. Clients send nothing over stream sockets
(frames are read only to notice a close): a small limit keeps a client from making us
buffer megabytes."""


def _read_methods(api: ApiDescription) -> list[str]:
    """``pkg.Service/Method`` of every RPC served only by GET: safe to retry."""
    found: list[str] = []
    for service in api.services:
        for method in service.methods:
            rule = http_rule(method)
            if rule is not None and all(v == "GET" for v, _, _ in http_bindings(rule)):
                found.append(f"{service.full_name}/{method.name}")
    return found


def rate_limit_redis_url(settings: GatewaySettings, common: CommonSettings) -> str | None:
    """Where the buckets live: GATEWAY_REDIS_URL, else SPACES_REDIS_URL when it was set.

    The shared setting has a default (localhost), so only an explicit value counts: a
    gateway started without any Redis configured keeps its buckets in memory.
    """
    if settings.redis_url:
        return settings.redis_url
    return common.redis_url if "redis_url" in common.model_fields_set else None


def build_gateway(
    settings: GatewaySettings,
    common: CommonSettings,
    *,
    router: BackendRouter | None = None,
) -> Starlette:
    """Build the application from settings.

    :param router: backend addresses; default: the ``SPACES_<SVC>_ADDR`` settings.
    """
    api = load_api(settings.descriptor_set)
    # Reads (GET) are safe to retry on UNAVAILABLE; writes are not.
    backend = Backend(
        router or BackendRouter(addresses_from_settings(common)),
        idempotent_methods=_read_methods(api),
    )
    jwks = IdentityJwksSource.connect(common.identity_addr)
    verifier = TokenVerifier(jwks, common.internal_secret)
    limiter: RateLimiter
    closers: list[Callable[[], Awaitable[None]]] = [jwks.close]
    redis_url = rate_limit_redis_url(settings, common)
    if redis_url:
        redis_client = create_redis(redis_url)
        redis_limiter = RedisRateLimiter(
            redis_client, settings.rate_limit_per_s, settings.rate_limit_burst
        )
        closers.append(redis_limiter.close)
        limiter = redis_limiter
        if router is None:
            # Media sessions live on one node: route their calls there (media's registry
            # shares this Redis). Without Redis, node calls go to SPACES_MEDIA_ADDR.
            backend.router.set_node_resolver(NodeRegistry(redis_client).address_of)
    else:
        limiter = MemoryRateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    gate = RateLimitGate(
        limiter,
        ClientIdentifier(verifier),
        f"{settings.rate_limit_per_s:g} requests per second, bursts of {settings.rate_limit_burst}",
    )
    config = GatewayConfig(
        default_timeout_s=settings.default_timeout_s,
        stream_timeout_s=settings.stream_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        cors_allowed_origins=tuple(settings.cors_allowed_origins),
    )
    return create_app(api, backend, gate, config, on_shutdown=closers)


async def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    settings = GatewaySettings()
    common = CommonSettings()
    configure_logging("gateway", common)
    setup_tracing("gateway", common)
    metrics: MetricsServer | None = None
    if settings.metrics_port is not None:
        metrics = start_metrics_server(settings.metrics_port)
    app = build_gateway(settings, common)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        # None: uvicorn's loggers propagate to our handler, which redacts tokens (WebSocket
        # URLs may carry access_token) and writes JSON like every other service.
        log_config=None,
        lifespan="on",
        proxy_headers=True,
        ws=HandshakeCheckedWebSocketProtocol,
        ws_max_size=WS_MAX_FRAME_BYTES,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    server = uvicorn.Server(config)
    try:
        await server.serve()
    finally:
        if metrics is not None:
            metrics.stop()
        shutdown_tracing()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
