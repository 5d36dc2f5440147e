"""An annotated RPC the gateway has never heard of is served as soon as it is in the pool."""

from __future__ import annotations

from typing import Any

import httpx
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool

from services.gateway.app import GatewayConfig, create_app
from services.gateway.clients import ClientIdentifier
from services.gateway.descriptors import ApiDescription
from services.gateway.ratelimit import MemoryRateLimiter, RateLimitGate
from services.gateway.transcoder.backend import Backend, BackendRouter
from tests.integration.gateway.conftest import serving
from tests.integration.gateway.double import start_double

FDP = descriptor_pb2.FieldDescriptorProto


def extra_service() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="spaces/extra/v1/extra_service.proto", package="spaces.extra.v1", syntax="proto3"
    )
    request = file.message_type.add(name="PokeThingRequest")
    request.field.add(name="name", number=1, type=FDP.TYPE_STRING, label=FDP.LABEL_OPTIONAL)
    request.field.add(
        name="times", number=2, type=FDP.TYPE_INT32, label=FDP.LABEL_OPTIONAL, json_name="times"
    )
    nested = file.message_type.add(name="Filter")
    nested.field.add(
        name="kind", number=1, type=FDP.TYPE_STRING, label=FDP.LABEL_OPTIONAL, json_name="kind"
    )
    nested.field.add(
        name="ids", number=2, type=FDP.TYPE_INT64, label=FDP.LABEL_REPEATED, json_name="ids"
    )
    request.field.add(
        name="filter",
        number=3,
        type=FDP.TYPE_MESSAGE,
        type_name=".spaces.extra.v1.Filter",
        label=FDP.LABEL_OPTIONAL,
        json_name="filter",
    )
    response = file.message_type.add(name="PokeThingResponse")
    response.field.add(
        name="poked_name",
        number=1,
        type=FDP.TYPE_STRING,
        label=FDP.LABEL_OPTIONAL,
        json_name="pokedName",
    )
    service = file.service.add(name="ExtraService")
    method = service.method.add(
        name="PokeThing",
        input_type=".spaces.extra.v1.PokeThingRequest",
        output_type=".spaces.extra.v1.PokeThingResponse",
    )
    rule = http_pb2.HttpRule(post="/v1/{name=things/*}:poke", body="*")
    rule.additional_bindings.add(get="/v1/{name=things/*}/pokes")
    method.options.Extensions[annotations_pb2.http].CopyFrom(rule)  # type: ignore[index]
    return file


async def test_a_new_annotated_rpc_needs_no_gateway_code() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName("spaces.extra.v1.ExtraService")
    except KeyError:
        pool.Add(extra_service())
    service = pool.FindServiceByName("spaces.extra.v1.ExtraService")
    server, double, port = await start_double()
    backend = Backend(BackendRouter({"extra": f"127.0.0.1:{port}"}))
    gate = RateLimitGate(MemoryRateLimiter(100, 100), ClientIdentifier(None), "test")
    app = create_app(ApiDescription([service]), backend, gate, GatewayConfig())
    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/v1/things/t1:poke", json={"times": 3})
            first = double.last()
            # The additional binding, with nested and repeated query parameters.
            listed = await client.get(
                "/v1/things/t2/pokes?filter.kind=big&filter.ids=1&filter.ids=2&times=4"
            )
            second = double.last()
            document = (await client.get("/openapi.json")).json()
    finally:
        await server.stop(0)
    assert response.status_code == 200, response.text
    assert response.json() == {"pokedName": ""}
    assert first.method == "/spaces.extra.v1.ExtraService/PokeThing"
    assert first.request.name == "things/t1"  # type: ignore[attr-defined]
    assert first.request.times == 3  # type: ignore[attr-defined]
    assert listed.status_code == 200, listed.text
    assert second.method == first.method
    request: Any = second.request
    assert (request.name, request.times) == ("things/t2", 4)
    assert request.filter.kind == "big"
    assert list(request.filter.ids) == [1, 2]
    assert "/v1/things/{thing}:poke" in document["paths"]
    parameters = document["paths"]["/v1/things/{thing}/pokes"]["get"]["parameters"]
    assert {p["name"] for p in parameters} == {"thing", "times", "filter.kind", "filter.ids"}
