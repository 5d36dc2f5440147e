"""What travels with a call (token, request id, deadline) and what the gateway refuses."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf.message import Message
from prometheus_client import REGISTRY
from spaces.rooms.v1 import rooms_service_pb2

from services.gateway.app import GatewayConfig
from services.gateway.ratelimit import MemoryRateLimiter
from tests.helpers.tokens import SigningKey
from tests.integration.gateway.conftest import GatewayUnderTest, gateway_with_double

GET_SPACE = "/spaces.rooms.v1.RoomsService/GetSpace"


async def test_authorization_is_forwarded(gw: GatewayUnderTest, signing_key: SigningKey) -> None:
    token = signing_key.mint("alice")
    response = await gw.client.get("/v1/spaces/abc", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert gw.double.last().metadata["authorization"] == f"Bearer {token}"
    await gw.client.get("/v1/spaces/abc")
    assert "authorization" not in gw.double.last().metadata


async def test_request_id_in_and_out(gw: GatewayUnderTest) -> None:
    response = await gw.client.get("/v1/spaces/abc", headers={"X-Request-Id": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    assert gw.double.last().metadata["x-request-id"] == "req-42"
    minted = await gw.client.get("/v1/spaces/abc", headers={"X-Request-Id": "bad id with spaces"})
    assert minted.headers["x-request-id"] != "bad id"
    assert gw.double.last().metadata["x-request-id"] == minted.headers["x-request-id"]
    # Errors from the gateway itself carry one too.
    assert (await gw.client.get("/v1/nothing")).headers["x-request-id"]


async def test_default_deadline_and_shorter_header(gw: GatewayUnderTest) -> None:
    # gRPC encodes deadlines with some rounding up: allow a little slack above.
    await gw.client.get("/v1/spaces/abc")
    remaining = gw.double.last().time_remaining
    assert remaining is not None and 9.0 < remaining <= 10.2
    await gw.client.get("/v1/spaces/abc", headers={"X-Request-Timeout": "500m"})
    remaining = gw.double.last().time_remaining
    assert remaining is not None and remaining <= 0.6
    # A header cannot lengthen the deadline.
    await gw.client.get("/v1/spaces/abc", headers={"X-Request-Timeout": "60"})
    remaining = gw.double.last().time_remaining
    assert remaining is not None and remaining <= 10.2
    bad = await gw.client.get("/v1/spaces/abc", headers={"X-Request-Timeout": "soon"})
    assert bad.status_code == 400


async def test_deadline_exceeded_is_504(gw: GatewayUnderTest) -> None:
    async def slow(request: Message, context: Any) -> Message:
        await asyncio.sleep(1)
        return rooms_service_pb2.GetSpaceResponse()

    gw.double.unary[GET_SPACE] = slow
    try:
        response = await gw.client.get("/v1/spaces/abc", headers={"X-Request-Timeout": "100m"})
    finally:
        del gw.double.unary[GET_SPACE]
    assert response.status_code == 504
    assert response.json()["code"] == 4


async def test_body_size_limit(signing_key: SigningKey) -> None:
    config = GatewayConfig(max_body_bytes=1000)
    async with gateway_with_double(signing_key, config=config) as running:
        big = {"space": {"title": "x" * 2000}}
        response = await running.client.post("/v1/spaces", json=big)
        assert response.status_code == 413
        assert response.json()["details"][0]["reason"] == "BODY_TOO_LARGE"

        async def chunked() -> Any:
            for _ in range(20):
                yield b" " * 100

        streamed = await running.client.post("/v1/spaces", content=chunked())
        assert streamed.status_code == 413
        small = await running.client.post("/v1/spaces", json={"space": {"title": "x"}})
        assert small.status_code == 200


async def test_rate_limit_per_client(signing_key: SigningKey) -> None:
    async with gateway_with_double(signing_key, limiter=MemoryRateLimiter(0.5, 2)) as running:
        codes = [(await running.client.get("/v1/spaces/abc")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        refused = await running.client.get("/v1/spaces/abc")
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        body = refused.json()
        assert body["code"] == 8
        types = [d["@type"].rsplit(".", 1)[1] for d in body["details"]]
        assert types == ["ErrorInfo", "QuotaFailure", "RetryInfo"]
        assert body["details"][1]["violations"][0]["subject"] == "ip"
        # A signed-in user has a bucket of their own, whatever their address.
        token = signing_key.mint("alice")
        user = await running.client.get(
            "/v1/spaces/abc", headers={"Authorization": f"Bearer {token}"}
        )
        assert user.status_code == 200
        # A forged token does not buy a fresh bucket.
        forged = await running.client.get(
            "/v1/spaces/abc", headers={"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}
        )
        assert forged.status_code == 429


async def test_cors_off_by_default(gw: GatewayUnderTest) -> None:
    response = await gw.client.get("/v1/spaces/abc", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_for_configured_origins(signing_key: SigningKey) -> None:
    config = GatewayConfig(cors_allowed_origins=("https://app.example",))
    async with gateway_with_double(signing_key, config=config) as running:
        preflight = await running.client.options(
            "/v1/spaces",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        allowed = await running.client.get(
            "/v1/spaces/abc", headers={"Origin": "https://app.example"}
        )
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "X-Request-Id" in allowed.headers["access-control-expose-headers"]
        other = await running.client.get(
            "/v1/spaces/abc", headers={"Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


async def test_metrics_use_the_template(gw: GatewayUnderTest) -> None:
    labels = {"route": "/v1/{name=spaces/*}", "method": "GET", "code": "200"}
    before = REGISTRY.get_sample_value("spaces_gateway_http_requests_total", labels) or 0.0
    await gw.client.get("/v1/spaces/one")
    await gw.client.get("/v1/spaces/two")
    after = REGISTRY.get_sample_value("spaces_gateway_http_requests_total", labels)
    assert after == before + 2
    count = REGISTRY.get_sample_value(
        "spaces_gateway_http_request_duration_seconds_count",
        {"route": "/v1/{name=spaces/*}", "method": "GET"},
    )
    assert count is not None and count >= 2
    concrete = REGISTRY.get_sample_value(
        "spaces_gateway_http_requests_total", {**labels, "route": "/v1/spaces/one"}
    )
    assert concrete is None


async def test_health_index_and_openapi(gw: GatewayUnderTest) -> None:
    assert (await gw.client.get("/healthz")).json() == {"status": "ok"}
    index = await gw.client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "<title>" in index.text, "the web client's page"
    openapi = await gw.client.get("/openapi.json")
    assert openapi.status_code == 200 and openapi.json()["openapi"].startswith("3.")


async def test_trace_context_reaches_the_backend(gw: GatewayUnderTest) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    header = f"00-{trace_id}-00f067aa0ba902b7-01"
    await gw.client.get("/v1/spaces/abc", headers={"traceparent": header})
    sent = gw.double.last().metadata.get("traceparent", "")
    assert sent.split("-")[1] == trace_id
