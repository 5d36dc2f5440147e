"""Request building without a server: path, query and body binding rules."""

from __future__ import annotations

import pytest
from spaces.identity.v1 import identity_service_pb2
from spaces.rooms.v1 import rooms_service_pb2

from services.gateway.app import build_route_table
from services.gateway.binding import RequestBinder
from services.gateway.descriptors import load_api
from services.gateway.errors import GatewayError
from services.gateway.routing import Route

TABLE = build_route_table(load_api())


def route_of(method: str) -> Route:
    return next(r for r in TABLE.routes if r.method.name == method)


def test_path_and_query() -> None:
    binder = RequestBinder(route_of("ListFollowers"))
    request = binder.build({"parent": "users/me"}, [("pageSize", "10")], b"")
    assert isinstance(request, identity_service_pb2.ListFollowersRequest)
    assert (request.parent, request.page_size) == ("users/me", 10)


def test_body_field_and_nested_path() -> None:
    binder = RequestBinder(route_of("UpdateSpace"))
    request = binder.build(
        {"space.name": "spaces/s1"},
        [("update_mask", "title")],
        b'{"title": "Hello", "topics": ["a"]}',
    )
    assert isinstance(request, rooms_service_pb2.UpdateSpaceRequest)
    assert request.space.name == "spaces/s1"
    assert request.space.title == "Hello"
    assert list(request.update_mask.paths) == ["title"]


def test_query_may_not_touch_the_body_field() -> None:
    binder = RequestBinder(route_of("UpdateSpace"))
    with pytest.raises(GatewayError) as refused:
        binder.build({"space.name": "spaces/s1"}, [("space.title", "x")], b"{}")
    assert refused.value.http_status == 400


def test_empty_body_is_an_empty_message() -> None:
    binder = RequestBinder(route_of("JoinSpace"))
    request = binder.build({"name": "spaces/s1"}, [], b"")
    assert request == rooms_service_pb2.JoinSpaceRequest(name="spaces/s1")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ([("nope", "1")], "UNKNOWN_QUERY_PARAMETER"),
        ([("pageSize", "x")], "INVALID_QUERY_PARAMETER"),
        ([("pageSize", "1"), ("page_size", "2")], "INVALID_QUERY_PARAMETER"),
    ],
)
def test_bad_queries(query: list[tuple[str, str]], reason: str) -> None:
    binder = RequestBinder(route_of("ListFollowers"))
    with pytest.raises(GatewayError) as refused:
        binder.build({"parent": "users/me"}, query, b"")
    assert refused.value.status.code == 3
    assert any(reason.encode() in d.value for d in refused.value.status.details)


def test_access_token_is_never_bound() -> None:
    binder = RequestBinder(route_of("WatchSpace"))
    request = binder.build(
        {"name": "spaces/s1"}, [("access_token", "secret"), ("resumeToken", "t1")], b""
    )
    assert request == rooms_service_pb2.WatchSpaceRequest(name="spaces/s1", resume_token="t1")
