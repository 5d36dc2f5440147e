"""The gateway in front of the real identity service: sign-up, log-in, the caller's profile
(the schemathesis run over every service is tests/system/test_schemathesis.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from pydantic import SecretStr

from services.common.settings import CommonSettings
from services.gateway.main import build_gateway
from services.gateway.settings import GatewaySettings
from tests.helpers.tokens import TEST_INTERNAL_SECRET
from tests.integration.gateway.conftest import serving
from tests.integration.identity.harness import running_identity


@dataclass
class Stack:
    url: str
    client: httpx.AsyncClient


@pytest.fixture
async def stack(database_url: str, redis_url: str) -> AsyncIterator[Stack]:
    async with running_identity(database_url, redis_url) as identity:
        common = CommonSettings(
            identity_addr=f"127.0.0.1:{identity.service.port}",
            internal_secret=SecretStr(TEST_INTERNAL_SECRET),
        )
        settings = GatewaySettings(
            http_port=0, metrics_port=None, redis_url=redis_url, rate_limit_per_s=1000
        )
        app = build_gateway(settings, common)
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield Stack(url, client)


async def test_sign_up_log_in_and_me(stack: Stack) -> None:
    signup = await stack.client.post(
        "/v1/users",
        json={
            "user": {"handle": "Carol_1", "displayName": "Carol"},
            "password": "correct horse battery",
            "requestId": str(uuid.uuid4()),
        },
    )
    assert signup.status_code == 200, signup.text
    body = signup.json()
    assert body["user"]["handle"] == "Carol_1"
    assert body["tokens"]["accessToken"]

    login = await stack.client.post(
        "/v1/auth:login", json={"handle": "carol_1", "password": "correct horse battery"}
    )
    assert login.status_code == 200, login.text
    token = login.json()["tokens"]["accessToken"]

    me = await stack.client.get("/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200, me.text
    assert me.json()["user"]["name"] == body["user"]["name"]
    assert me.json()["user"]["displayName"] == "Carol"

    anonymous = await stack.client.get("/v1/users/me")
    assert anonymous.status_code == 401
    assert anonymous.json()["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"

    wrong = await stack.client.post(
        "/v1/auth:login", json={"handle": "carol_1", "password": "not the password"}
    )
    assert wrong.status_code == 401

    duplicate = await stack.client.post(
        "/v1/users",
        json={
            "user": {"handle": "carol_1", "displayName": "Other"},
            "password": "correct horse battery",
            "requestId": str(uuid.uuid4()),
        },
    )
    assert duplicate.status_code == 409

    invalid = await stack.client.post(
        "/v1/users",
        json={"user": {"handle": "no spaces allowed"}, "password": "x", "requestId": "nope"},
    )
    assert invalid.status_code == 400
    types = {d["@type"].rsplit(".", 1)[1] for d in invalid.json()["details"]}
    assert "BadRequest" in types
