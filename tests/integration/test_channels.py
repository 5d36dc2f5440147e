"""A channel to several replicas spreads calls over all of them and skips one that died
(``create_channel``'s service config: round_robin)."""

from __future__ import annotations

import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.clients import create_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _replica(status: int) -> tuple[grpc.aio.Server, int]:
    """A server whose health of service "who" tells replicas apart."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("who", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_calls_spread_over_replicas_and_skip_a_dead_one() -> None:
    first, first_port = await _replica(SERVING)
    second, second_port = await _replica(NOT_SERVING)
    channel = create_channel(f"ipv4:127.0.0.1:{first_port},127.0.0.1:{second_port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        seen = [
            (await stub.Check(health_pb2.HealthCheckRequest(service="who"), timeout=5)).status
            for _ in range(20)
        ]
        assert seen.count(SERVING) >= 5 and seen.count(NOT_SERVING) >= 5, seen
        await first.stop(None)
        after = [
            (await stub.Check(health_pb2.HealthCheckRequest(service="who"), timeout=5)).status
            for _ in range(10)
        ]
        assert after == [NOT_SERVING] * 10, "every call reaches the replica that is left"
    finally:
        await channel.close()
        await first.stop(None)
        await second.stop(None)
