"""Small pure pieces of the runtime: settings, retry config, method names, field paths."""

from __future__ import annotations

import json

import protovalidate
import pytest
from spaces.common.v1 import options_pb2
from spaces.testing.v1 import testing_service_pb2 as pb

from services.common import context
from services.common.clients import retry_service_config
from services.common.interceptors import MethodName, access_of
from services.common.interceptors.validation import violations_of
from services.common.settings import CommonSettings, ServiceSettings


def test_common_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACES_DATABASE_URL", "postgresql://db/spaces")
    monkeypatch.setenv("SPACES_INTERNAL_SECRET", "s" * 40)
    monkeypatch.setenv("SPACES_ROOMS_ADDR", "rooms:50051")
    settings = CommonSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.database_url == "postgresql://db/spaces"
    assert settings.rooms_addr == "rooms:50051"
    assert settings.identity_addr == "localhost:50051"
    assert settings.internal_secret is not None
    assert "s" * 40 not in repr(settings)


def test_service_settings_take_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic_settings import SettingsConfigDict

    class IdentitySettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="IDENTITY_", extra="ignore")
        grpc_port: int = 50051

    monkeypatch.setenv("IDENTITY_GRPC_PORT", "6000")
    monkeypatch.setenv("ROOMS_GRPC_PORT", "7000")
    assert IdentitySettings().grpc_port == 6000


def test_retry_config_names_only_given_methods() -> None:
    config = json.loads(
        retry_service_config(["spaces.a.v1.AService/GetThing", "/spaces.b.v1.BService"])
    )
    (method_config,) = config["methodConfig"]
    assert method_config["name"] == [
        {"service": "spaces.a.v1.AService", "method": "GetThing"},
        {"service": "spaces.b.v1.BService"},
    ]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert json.loads(retry_service_config([]))["methodConfig"] == []


def test_method_names_and_access() -> None:
    method = MethodName.parse("/spaces.testing.v1.TestingService/InternalWhoAmI")
    assert (method.service, method.method) == ("spaces.testing.v1.TestingService", "InternalWhoAmI")
    assert access_of(method) == options_pb2.ACCESS_INTERNAL
    ping = MethodName.parse("/spaces.testing.v1.TestingService/Ping")
    assert access_of(ping) == options_pb2.ACCESS_PUBLIC
    unknown = MethodName.parse("/spaces.nope.v1.Nope/Get")
    assert access_of(unknown) == options_pb2.ACCESS_USER
    assert access_of(MethodName.parse("/grpc.health.v1.Health/Check")) == options_pb2.ACCESS_PUBLIC


def test_field_paths_of_violations() -> None:
    request = pb.CreateThingRequest(thing=pb.Thing(handle="x", size=3, tags=["a", "", "b"]))
    paths = dict(violations_of(protovalidate.collect_violations(request)))
    assert set(paths) == {"thing.handle", "thing.tags[1]"}


def test_time_remaining_and_principal() -> None:
    assert context.time_remaining() is None
    with context.bind_call(request_id="r", timeout=5):
        remaining = context.time_remaining()
        assert remaining is not None and 4.9 < remaining <= 5
    assert context.current_request_id() is None
    from services.common.errors import Unauthenticated

    with pytest.raises(Unauthenticated):
        context.current_principal()


def test_a_wait_keeps_a_margin_of_the_deadline_for_the_answer() -> None:
    assert context.time_left_for_wait() is None, "no call, no deadline"
    with context.bind_call(request_id=None, timeout=2.0):
        left = context.time_left_for_wait()
        assert left is not None and 1.7 < left <= 1.75, "a quarter second kept"
    with context.bind_call(request_id=None, timeout=0.3):
        left = context.time_left_for_wait()
        assert left is not None and 0.2 < left <= 0.24, "a fifth kept of a short deadline"
