"""Starting the test service in-process (port 0) and talking to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc.aio
from pydantic import SecretStr
from spaces.testing.v1 import testing_service_pb2 as pb
from spaces.testing.v1 import testing_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenIssuer, StaticJwksSource
from services.common.server import Hook, Service
from services.common.settings import CommonSettings, ServiceSettings
from tests.helpers.testing_servicer import TestingServicer
from tests.helpers.tokens import TEST_INTERNAL_SECRET, SigningKey, jwks

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TestingService"].full_name


def testing_settings(
    *, metrics: bool = False, max_connection_age_s: float | None = None
) -> ServiceSettings:
    return ServiceSettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0 if metrics else None,
        shutdown_grace_s=1.0,
        max_connection_age_s=max_connection_age_s,
    )


def build_testing_service(
    key: SigningKey,
    *,
    name: str = "testing",
    metrics: bool = False,
    secret: str = TEST_INTERNAL_SECRET,
    startup: Sequence[Hook] = (),
    max_connection_age_s: float | None = None,
) -> Service:
    common = CommonSettings(internal_secret=SecretStr(secret))
    settings = testing_settings(metrics=metrics, max_connection_age_s=max_connection_age_s)
    service = Service(name, settings, common, jwks=StaticJwksSource(jwks(key)))
    issuer = ServiceTokenIssuer(name, secret)
    service.add_servicer(
        pb.DESCRIPTOR.services_by_name["TestingService"],
        TestingServicer(issuer),
        pb_grpc.add_TestingServiceServicer_to_server,
    )
    for hook in startup:
        service.on_startup(hook)
    return service


@asynccontextmanager
async def running_testing_service(key: SigningKey, **kwargs: Any) -> AsyncIterator[Service]:
    """Start the test service on a free port; stop it afterwards."""
    service = build_testing_service(key, **kwargs)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=0)


@asynccontextmanager
async def plain_channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    """A channel with no interceptors: the test is the client, metadata set by hand."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close(None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
