"""Every annotated RPC is reachable at its route, with path, query and body bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from spaces.media.v1 import media_resources_pb2, media_service_pb2

from services.gateway.app import build_route_table
from services.gateway.binding import RequestBinder
from services.gateway.descriptors import http_rule, load_api
from services.gateway.routing import Route
from tests.integration.gateway.conftest import GatewayUnderTest

API = load_api()
TABLE = build_route_table(API)
READ_RECORDING = "/spaces.media.v1.MediaService/ReadRecording"


def concrete_path(route: Route) -> tuple[str, dict[str, str]]:
    """A request path for ``route`` and the value each path variable should bind."""
    template = route.template
    parts: list[str] = []
    expected: dict[str, str] = {}
    variables = {v.start: v for v in template.variables}
    index = 0
    counter = 0
    while index < len(template.segments):
        variable = variables.get(index)
        if variable is None:
            parts.append(template.segments[index].literal)
            index += 1
            continue
        values: list[str] = []
        for segment in template.segments[variable.start : variable.end]:
            counter += 1
            values.append(segment.literal or f"id{counter}")
        expected[variable.field_path] = "/".join(values)
        parts.extend(values)
        index = variable.end
    path = "/" + "/".join(parts)
    return (f"{path}:{template.verb}" if template.verb else path), expected


def free_string_field(route: Route, binder: RequestBinder) -> FieldDescriptor | None:
    """A top-level singular string field neither the path nor (for queries) the body binds."""
    bound = {v.field_path.split(".")[0] for v in route.template.variables}
    for field in route.method.input_type.fields:
        if field.is_repeated or field.type != FieldDescriptor.TYPE_STRING or field.name in bound:
            continue
        if route.body == "*" or binder.is_query_field([field]):
            return field
    return None


def get_path(message: Message, dotted: str) -> Any:
    value: Any = message
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


async def recording(request: Message, context: Any) -> AsyncIterator[Message]:
    yield media_service_pb2.ReadRecordingResponse(
        recording=media_resources_pb2.Recording(size_bytes=3, format="audio/ogg"),
        offset=0,
        data=b"abc",
    )


def test_every_rpc_with_an_http_rule_has_a_route_and_internal_ones_none() -> None:
    routed = {route.method.full_name for route in TABLE.routes}
    for service in API.services:
        for method in service.methods:
            assert (method.full_name in routed) == (http_rule(method) is not None)
    assert len(routed) > 80


@pytest.mark.parametrize("route", TABLE.routes, ids=lambda r: f"{r.http_method} {r.template.text}")
async def test_route_reaches_its_rpc(gw: GatewayUnderTest, route: Route) -> None:
    gw.double.streams[READ_RECORDING] = recording
    binder = RequestBinder(route)
    path, expected = concrete_path(route)
    extra = free_string_field(route, binder)
    params: dict[str, str] = {}
    body: dict[str, Any] | None = None
    if route.body == "*":
        body = {extra.json_name: "from-body"} if extra is not None else {}
    elif route.body:
        body = {}
    elif extra is not None:
        params[extra.name] = "from-query"
    response = await gw.client.request(route.http_method, path, params=params, json=body)
    assert response.status_code == 200, response.text
    call = gw.double.last()
    assert call.method == route.grpc_path
    for field_path, value in expected.items():
        assert get_path(call.request, field_path) == value
    if extra is not None:
        want = "from-body" if route.body == "*" else "from-query"
        assert getattr(call.request, extra.name) == want
