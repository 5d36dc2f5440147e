"""Small pieces: status mapping, timeouts, ranges, rate limiting, the OpenAPI document."""

from __future__ import annotations

import re

import grpc
import pytest

from services.gateway.app import build_route_table
from services.gateway.calls import parse_timeout
from services.gateway.descriptors import load_api
from services.gateway.errors import GatewayError, http_status_of
from services.gateway.openapi import build_openapi
from services.gateway.ranges import ByteRange, parse_range
from services.gateway.ratelimit import MemoryRateLimiter

API = load_api()
DOCUMENT = build_openapi(API, build_route_table(API))
SCHEMAS = DOCUMENT["components"]["schemas"]


def test_grpc_gateway_status_table() -> None:
    assert http_status_of(grpc.StatusCode.FAILED_PRECONDITION) == 400
    assert http_status_of(grpc.StatusCode.CANCELLED) == 499
    assert http_status_of(99) == 500


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 10.0), ("2S", 2.0), ("500m", 0.5), ("1M", 10.0), ("2.5", 2.5), ("100u", 1e-4)],
)
def test_timeouts(header: str | None, expected: float) -> None:
    assert parse_timeout(header, 10.0) == pytest.approx(expected)


@pytest.mark.parametrize("header", ["soon", "0", "-1S", "1X", "0S"])
def test_bad_timeouts(header: str) -> None:
    with pytest.raises(GatewayError):
        parse_timeout(header, 10.0)


def test_ranges() -> None:
    assert parse_range("bytes=0-9") == ByteRange(0, 9)
    assert parse_range("bytes=5-") == ByteRange(5, None)
    assert parse_range("bytes=-3") == ByteRange(None, None, suffix=3)
    assert parse_range("bytes=0-1,5-6") is None
    assert parse_range("items=0-1") is None
    assert parse_range("bytes=9-3") is None
    assert ByteRange(5, 100).resolve(10) == (5, 9)
    assert ByteRange(10, None).resolve(10) is None
    assert ByteRange(None, None, suffix=50).resolve(10) == (0, 9)
    assert ByteRange(None, None, suffix=0).resolve(10) is None


async def test_memory_buckets_refill() -> None:
    limiter = MemoryRateLimiter(1000.0, 2)
    assert (await limiter.acquire("a")).allowed
    assert (await limiter.acquire("a")).allowed
    refused = await limiter.acquire("a")
    assert not refused.allowed and 0 < refused.retry_after_s <= 0.001
    assert (await limiter.acquire("b")).allowed


def test_openapi_covers_every_route_and_no_internal_rpc() -> None:
    operations = {op["operationId"] for path in DOCUMENT["paths"].values() for op in path.values()}
    assert len(operations) == len(build_route_table(API).routes)
    assert not any("CheckHostEligibility" in op or "OpenSpace" in op for op in operations)
    assert DOCUMENT["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    login = DOCUMENT["paths"]["/v1/auth:login"]["post"]
    assert login["security"] == []
    assert login["requestBody"]["required"] is True


def test_openapi_json_mapping_and_rules() -> None:
    space = SCHEMAS["spaces.rooms.v1.Space"]["properties"]
    create_time = space["createTime"]
    assert create_time.get("format") == "date-time" and create_time.get("readOnly") is True
    user = SCHEMAS["spaces.identity.v1.User"]["properties"]
    assert user["followerCount"]["type"] == "string"
    assert user["followerCount"]["format"] == "int64"
    assert user["displayName"]["maxLength"] == 50
    create = SCHEMAS["spaces.identity.v1.CreateUserRequest"]
    assert create["properties"]["password"]["minLength"] == 8
    assert create["properties"]["requestId"]["format"] == "uuid"
    assert set(create["required"]) >= {"password"}
    assert create["additionalProperties"] is False
    # Enums by name; UNSPECIFIED left out where the rules refuse it.
    states = [
        p for p in DOCUMENT["paths"]["/v1/spaces"]["get"]["parameters"] if p["name"] == "states"
    ][0]
    assert states["schema"]["type"] == "array"
    names = states["schema"]["items"].get("enum") or SCHEMAS["spaces.rooms.v1.SpaceState"]["enum"]
    assert "SPACE_STATE_LIVE" in names
    list_spaces = DOCUMENT["paths"]["/v1/spaces"]["get"]["parameters"]
    page_size = next(p for p in list_spaces if p["name"] == "pageSize")
    assert page_size["schema"]["maximum"] == 100


def test_openapi_oneof_is_at_most_one() -> None:
    event = SCHEMAS["spaces.rooms.v1.SpaceEvent"]
    branches = event["allOf"][0]["oneOf"]
    assert {"required": ["snapshot"]} in branches
    assert "not" in branches[-1]


def test_openapi_streams_and_ranges() -> None:
    watch = DOCUMENT["paths"]["/v1/spaces/{space}:watch"]["get"]
    assert watch["x-websocket"] is True
    assert "application/x-ndjson" in watch["responses"]["200"]["content"]
    read = DOCUMENT["paths"]["/v1/spaces/{space}/recordings/{recording}:read"]["get"]
    assert set(read["responses"]) == {"200", "206", "416", "default"}
    assert "audio/ogg" in read["responses"]["206"]["content"]


def test_openapi_field_mask_in_rules_become_a_pattern() -> None:
    """A FieldMask limited by ``field_mask.in`` lists its camelCase paths, so generated
    requests (schemathesis) name fields the service accepts."""
    patch = DOCUMENT["paths"]["/v1/spaces/{space}"]["patch"]
    mask = next(p for p in patch["parameters"] if p["name"] == "updateMask")["schema"]
    pattern = re.compile(mask["pattern"])
    assert pattern.fullmatch("title")
    assert pattern.fullmatch("title,scheduledStartTime,speakPermission")
    assert not pattern.fullmatch("scheduled_start_time")
    assert not pattern.fullmatch("title,")
    assert not pattern.fullmatch("host")
    assert mask["minLength"] == 1, "a required mask names at least one path"


def test_openapi_nonempty_cel_rules_of_request_members() -> None:
    """``this.title != ''`` on CreateSpaceRequest.space: title required there, not in Space."""
    space = SCHEMAS["spaces.rooms.v1.CreateSpaceRequest"]["properties"]["space"]
    constraint = space["allOf"][1]
    assert constraint["required"] == ["title"]
    assert constraint["properties"]["title"]["minLength"] == 1
    assert "title" not in SCHEMAS["spaces.rooms.v1.Space"].get("required", [])
