"""Backend statuses become grpc-gateway's HTTP statuses with a JSON google.rpc.Status."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from tests.integration.gateway.conftest import GatewayUnderTest
from tests.integration.gateway.double import abort

GET_SPACE = "/spaces.rooms.v1.RoomsService/GetSpace"

EXPECTED = [
    (grpc.StatusCode.CANCELLED, 499),
    (grpc.StatusCode.UNKNOWN, 500),
    (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.ALREADY_EXISTS, 409),
    (grpc.StatusCode.PERMISSION_DENIED, 403),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.ABORTED, 409),
    (grpc.StatusCode.OUT_OF_RANGE, 400),
    (grpc.StatusCode.UNIMPLEMENTED, 501),
    (grpc.StatusCode.INTERNAL, 500),
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DATA_LOSS, 500),
    (grpc.StatusCode.UNAUTHENTICATED, 401),
]


def failing_status(code: grpc.StatusCode) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=f"failed with {code.name}")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="SPACE_NOT_FOUND", domain="spaces.rooms")
    )
    status.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="name", description="bad")
            ]
        )
    )
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=1))
    )
    return status


@pytest.mark.parametrize(("code", "http_status"), EXPECTED, ids=lambda v: str(v))
async def test_status_mapping(
    gw: GatewayUnderTest, code: grpc.StatusCode, http_status: int
) -> None:
    async def fail(request: Message, context: Any) -> Message:
        await abort(context, failing_status(code))
        raise AssertionError("unreachable")

    gw.double.unary[GET_SPACE] = fail
    try:
        response = await gw.client.get("/v1/spaces/abc")
    finally:
        del gw.double.unary[GET_SPACE]
    assert response.status_code == http_status
    body = response.json()
    assert body["code"] == code.value[0]
    assert body["message"] == f"failed with {code.name}"
    types = [d["@type"] for d in body["details"]]
    assert types == [
        "type.googleapis.com/google.rpc.ErrorInfo",
        "type.googleapis.com/google.rpc.BadRequest",
        "type.googleapis.com/google.rpc.RetryInfo",
    ]
    assert body["details"][0]["reason"] == "SPACE_NOT_FOUND"
    assert body["details"][1]["fieldViolations"] == [{"field": "name", "description": "bad"}]
    if http_status in (429, 503):
        assert response.headers["retry-after"] == "3"  # 2.000000001 s, rounded up
    else:
        assert "retry-after" not in response.headers


async def test_plain_status_without_details(gw: GatewayUnderTest) -> None:
    async def fail(request: Message, context: Any) -> Message:
        await context.abort(grpc.StatusCode.NOT_FOUND, "gone")
        raise AssertionError("unreachable")

    gw.double.unary[GET_SPACE] = fail
    try:
        response = await gw.client.get("/v1/spaces/abc")
    finally:
        del gw.double.unary[GET_SPACE]
    assert response.status_code == 404
    assert response.json() == {"code": 5, "message": "gone", "details": []}


async def test_backend_down_is_503(signing_key: Any) -> None:
    from services.gateway.transcoder.backend import BackendRouter
    from tests.integration.gateway.conftest import gateway_with_double

    async with gateway_with_double(signing_key) as running:
        running.router._addresses["rooms"] = "127.0.0.1:1"  # nothing listens there
        response = await running.client.get("/v1/spaces/abc", headers={"X-Request-Timeout": "2S"})
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    # gRPC's own message names the address: clients get a fixed text and a reason.
    assert "127.0.0.1" not in body["message"]
    assert body["details"][0]["reason"] == "BACKEND_UNAVAILABLE"
    assert isinstance(running.router, BackendRouter)


async def test_unknown_route_and_wrong_method(gw: GatewayUnderTest) -> None:
    missing = await gw.client.get("/v1/nothing/here")
    assert missing.status_code == 404
    assert missing.json()["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    wrong = await gw.client.delete("/v1/spaces/abc")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET, PATCH"


async def test_unparseable_paths_get_a_status_too(gw: GatewayUnderTest) -> None:
    response = await gw.client.post("/v1/users/a%0Ab:unfollow", json={})
    assert response.status_code in (400, 404)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] in (3, 5)


async def test_internal_rpcs_have_no_route(gw: GatewayUnderTest) -> None:
    for path in (
        "/spaces.identity.v1.IdentityService/CheckHostEligibility",
        "/v1/spaces.identity.v1.IdentityService/CheckHostEligibility",
    ):
        response = await gw.client.post(path, json={})
        assert response.status_code == 404
    assert not any("CheckHostEligibility" in call.method for call in gw.double.calls)


async def test_a_gateway_bug_is_a_500_status_with_request_id(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.gateway.transcoder.http import HttpTranscoder

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug: secret=hunter2")

    monkeypatch.setattr(HttpTranscoder, "handle", broken)
    response = await gw.client.get("/v1/spaces/abc", headers={"X-Request-Id": "bug-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "bug-1"
    body = response.json()
    assert body["code"] == 13 and "hunter2" not in body["message"]
