"""Binding edge cases: nested path fields, repeated and nested query, body fields, errors."""

from __future__ import annotations

from spaces.identity.v1 import identity_service_pb2
from spaces.rooms.v1 import rooms_service_pb2

from tests.integration.gateway.conftest import GatewayUnderTest


async def test_nested_path_field_and_body_field(gw: GatewayUnderTest) -> None:
    response = await gw.client.patch(
        "/v1/users/bob",
        params={"updateMask": "displayName,bio"},
        json={"displayName": "Bob", "bio": "hi", "name": "users/ignored"},
    )
    assert response.status_code == 200, response.text
    request = gw.double.last().request
    assert isinstance(request, identity_service_pb2.UpdateUserRequest)
    # The path binds user.name and wins over the body's value.
    assert request.user.name == "users/bob"
    assert request.user.display_name == "Bob"
    assert list(request.update_mask.paths) == ["display_name", "bio"]


async def test_repeated_query_parameters_and_both_names(gw: GatewayUnderTest) -> None:
    response = await gw.client.get(
        "/v1/spaces?states=SPACE_STATE_LIVE&states=1&page_size=5&pageToken=t"
    )
    assert response.status_code == 200, response.text
    request = gw.double.last().request
    assert isinstance(request, rooms_service_pb2.ListSpacesRequest)
    assert len(request.states) == 2
    assert request.page_size == 5
    assert request.page_token == "t"


async def test_repeated_string_query(gw: GatewayUnderTest) -> None:
    response = await gw.client.get("/v1/users:batchGet?names=users/a&names=users/b")
    assert response.status_code == 200, response.text
    assert list(gw.double.last().request.names) == ["users/a", "users/b"]  # type: ignore[attr-defined]


async def test_percent_encoded_single_segment_is_decoded(gw: GatewayUnderTest) -> None:
    response = await gw.client.get("/v1/users/a%20b")
    assert response.status_code == 200
    assert gw.double.last().request.name == "users/a b"  # type: ignore[attr-defined]


async def test_unknown_body_field_is_400(gw: GatewayUnderTest) -> None:
    response = await gw.client.post("/v1/spaces", json={"space": {"title": "x"}, "bogus": 1})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    assert body["details"][0]["reason"] == "INVALID_JSON"
    assert "bogus" in body["message"]


async def test_unknown_query_parameter_is_400(gw: GatewayUnderTest) -> None:
    response = await gw.client.get("/v1/spaces?bogus=1")
    assert response.status_code == 400
    assert response.json()["details"][0]["reason"] == "UNKNOWN_QUERY_PARAMETER"
    assert response.json()["details"][1]["fieldViolations"][0]["field"] == "bogus"


async def test_query_cannot_rebind_a_path_field(gw: GatewayUnderTest) -> None:
    response = await gw.client.get("/v1/spaces/abc?name=spaces/other")
    assert response.status_code == 400


async def test_bad_values_are_400(gw: GatewayUnderTest) -> None:
    assert (await gw.client.get("/v1/spaces?page_size=many")).status_code == 400
    assert (await gw.client.get("/v1/spaces?states=NOT_A_STATE")).status_code == 400
    assert (await gw.client.get("/v1/spaces?page_size=1&page_size=2")).status_code == 400
    assert (await gw.client.post("/v1/spaces", content=b"{not json")).status_code == 400
    assert (await gw.client.post("/v1/spaces", content=b"[1, 2]")).status_code == 400
    deep = b"[" * 100_000 + b"]" * 100_000
    assert (await gw.client.post("/v1/spaces", content=deep)).status_code == 400


async def test_body_star_takes_no_query(gw: GatewayUnderTest) -> None:
    response = await gw.client.post("/v1/spaces/abc:join?requestId=x", json={})
    assert response.status_code == 400


async def test_responses_are_camel_case_proto3_json(gw: GatewayUnderTest) -> None:
    response = await gw.client.get("/v1/spaces")
    assert response.status_code == 200
    assert response.json() == {"spaces": [], "nextPageToken": ""}
