"""Path templates (google/api/http.proto grammar) and route matching."""

from __future__ import annotations

import pytest
from spaces.rooms.v1 import rooms_service_pb2

from services.gateway.routing import PathTemplate, Route, RouteTable, TemplateError

METHOD = rooms_service_pb2.DESCRIPTOR.services_by_name["RoomsService"].methods_by_name["GetSpace"]


def route(http_method: str, template: str) -> Route:
    return Route(http_method, PathTemplate.parse(template), "", "", METHOD)


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v1/spaces", "/v1/spaces", {}),
        ("/v1/{name=spaces/*}", "/v1/spaces/abc", {"name": "spaces/abc"}),
        ("/v1/{name}", "/v1/abc", {"name": "abc"}),
        ("/v1/{name=spaces/*}:join", "/v1/spaces/abc:join", {"name": "spaces/abc"}),
        ("/v1/{user.name=users/*}", "/v1/users/me", {"user.name": "users/me"}),
        (
            "/v1/{name=spaces/*/participants/*}",
            "/v1/spaces/a/participants/b",
            {"name": "spaces/a/participants/b"},
        ),
        ("/v1/{name=files/**}", "/v1/files/a/b/c", {"name": "files/a/b/c"}),
        ("/v1/{a}/x/{b}", "/v1/1/x/2", {"a": "1", "b": "2"}),
        ("/v1/*/{id}", "/v1/anything/7", {"id": "7"}),
        (
            "/v1/{name=users/*/notificationPreferences}",
            "/v1/users/me/notificationPreferences",
            {"name": "users/me/notificationPreferences"},
        ),
    ],
)
def test_matches(template: str, path: str, expected: dict[str, str]) -> None:
    assert PathTemplate.parse(template).match(path) == expected


@pytest.mark.parametrize(
    ("template", "path"),
    [
        ("/v1/{name=spaces/*}", "/v1/spaces"),
        ("/v1/{name=spaces/*}", "/v1/spaces/a/b"),
        ("/v1/{name=spaces/*}", "/v1/spaces/"),
        ("/v1/{name=spaces/*}:join", "/v1/spaces/abc:leave"),
        ("/v1/{name=spaces/*}:join", "/v1/spaces/abc"),
        ("/v1/spaces", "/v2/spaces"),
        ("/v1/{name=files/**}", "/v1/files"),
    ],
)
def test_does_not_match(template: str, path: str) -> None:
    assert PathTemplate.parse(template).match(path) is None


def test_percent_decoding_single_vs_multi_segment() -> None:
    single = PathTemplate.parse("/v1/{id}")
    assert single.match("/v1/a%2Fb%20c") == {"id": "a/b c"}
    multi = PathTemplate.parse("/v1/{name=things/*}")
    # Reserved characters stay encoded in multi-segment variables; others are decoded.
    assert multi.match("/v1/things/a%2Fb%20c") == {"name": "things/a%2Fb c"}


@pytest.mark.parametrize(
    "template",
    ["v1/x", "/v1/{a=**/b}", "/v1/{a}/{a}", "/v1/{a", "/v1/{a.}", "/v1/x:", "/v1/{a={b}}"],
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(TemplateError):
        PathTemplate.parse(template)


def test_literals_beat_variables_and_verbs_beat_plain() -> None:
    table = RouteTable(
        [
            route("GET", "/v1/{name=users/*}"),
            route("GET", "/v1/users/me"),
            route("GET", "/v1/users:lookup"),
            route("GET", "/v1/{name=users/**}"),
        ]
    )
    me = table.match("GET", "/v1/users/me")
    assert me is not None and me.route.template.text == "/v1/users/me"
    other = table.match("GET", "/v1/users/bob")
    assert other is not None and other.route.template.text == "/v1/{name=users/*}"
    deep = table.match("GET", "/v1/users/bob/x")
    assert deep is not None and deep.route.template.text == "/v1/{name=users/**}"
    lookup = table.match("GET", "/v1/users:lookup")
    assert lookup is not None and lookup.route.template.verb == "lookup"


def test_a_custom_method_path_is_not_swallowed_by_another_http_method() -> None:
    table = RouteTable(
        [route("PATCH", "/v1/{name=users/*}"), route("POST", "/v1/{name=users/*}:block")]
    )
    assert table.match("PATCH", "/v1/users/bob:block") is None
    assert table.allowed_methods("/v1/users/bob:block") == ["POST"]
    # A colon that is not a served verb stays part of the id, as in grpc-gateway.
    odd = table.match("PATCH", "/v1/users/bob:other")
    assert odd is not None and odd.path_params == {"name": "users/bob:other"}


def test_conflicting_routes_are_refused() -> None:
    with pytest.raises(TemplateError):
        RouteTable([route("GET", "/v1/{name=spaces/*}"), route("GET", "/v1/{other=spaces/*}")])


def test_openapi_paths_name_wildcards_after_collections() -> None:
    path, params = PathTemplate.parse("/v1/{name=spaces/*/participants/*}:mute").openapi_path()
    assert path == "/v1/spaces/{space}/participants/{participant}:mute"
    assert [name for name, _ in params] == ["space", "participant"]
    path, _ = PathTemplate.parse("/v1/{id}/{user.name=users/*}").openapi_path()
    assert path == "/v1/{id}/users/{user}"
