"""A gateway in front of the echo backend double, served by uvicorn on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from google.protobuf.message import Message
from spaces.rooms.v1 import rooms_events_pb2, rooms_service_pb2
from starlette.applications import Starlette

from services.common.auth import StaticJwksSource, TokenVerifier
from services.gateway.app import GatewayConfig, create_app
from services.gateway.clients import ClientIdentifier
from services.gateway.descriptors import load_api
from services.gateway.main import WS_MAX_FRAME_BYTES
from services.gateway.ratelimit import MemoryRateLimiter, RateLimiter, RateLimitGate
from services.gateway.transcoder.backend import Backend, BackendRouter
from services.gateway.ws_protocol import HandshakeCheckedWebSocketProtocol
from tests.helpers.tokens import SigningKey, jwks
from tests.integration.gateway.double import EchoBackend, start_double

SERVICES = ("identity", "rooms", "media", "notify", "payments")


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port; yield its base URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        lifespan="on",
        # As the gateway's main serves it.
        ws=HandshakeCheckedWebSocketProtocol,
        ws_max_size=WS_MAX_FRAME_BYTES,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class GatewayUnderTest:
    url: str
    double: EchoBackend
    client: httpx.AsyncClient
    router: BackendRouter


@asynccontextmanager
async def gateway_with_double(
    signing_key: SigningKey,
    *,
    config: GatewayConfig | None = None,
    limiter: RateLimiter | None = None,
) -> AsyncIterator[GatewayUnderTest]:
    server, double, port = await start_double()
    router = BackendRouter({name: f"127.0.0.1:{port}" for name in SERVICES})
    backend = Backend(router)
    verifier = TokenVerifier(StaticJwksSource(jwks(signing_key)), None)
    gate = RateLimitGate(
        limiter or MemoryRateLimiter(10_000, 10_000), ClientIdentifier(verifier), "test limit"
    )
    app = create_app(load_api(), backend, gate, config or GatewayConfig())
    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield GatewayUnderTest(url, double, client, router)
    finally:
        await server.stop(0)


@pytest.fixture(scope="module")
async def gw(signing_key: SigningKey) -> AsyncIterator[GatewayUnderTest]:
    async with gateway_with_double(signing_key) as running:
        yield running


def ws_url(gw: GatewayUnderTest, path: str) -> str:
    """The WebSocket URL of ``path`` on the gateway under test."""
    return gw.url.replace("http://", "ws://") + path


async def endless(request: Message, context: Any) -> AsyncIterator[Message]:
    """A WatchSpace stream that never ends: an event every 10 ms."""
    sequence = 0
    while True:
        sequence += 1
        event = rooms_events_pb2.SpaceEvent(sequence=sequence, resume_token=f"t{sequence}")
        yield rooms_service_pb2.WatchSpaceResponse(events=[event])
        await asyncio.sleep(0.01)
