"""The gateway in front of the real identity service: sign-up, log-in, the caller's profile,
and a bounded schemathesis run over identity's routes (no 5xx, responses match the schema)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from services.common.settings import CommonSettings
from services.gateway.main import build_gateway
from services.gateway.settings import GatewaySettings
from tests.helpers.tokens import TEST_INTERNAL_SECRET
from tests.integration.gateway.conftest import serving
from tests.integration.identity.harness import running_identity

SCHEMATHESIS_CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


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


async def test_schemathesis_over_identity_routes(stack: Stack, tmp_path: Path) -> None:
    """A bounded fuzzing run: the gateway never answers 5xx and matches its own schema.

    GATEWAY_FUZZ_EXAMPLES, GATEWAY_FUZZ_PHASES and GATEWAY_FUZZ_CHECKS widen it.
    """
    signup = await stack.client.post(
        "/v1/users",
        json={
            "user": {"handle": "fuzzer", "displayName": "Fuzzer"},
            "password": "correct horse battery",
            "requestId": str(uuid.uuid4()),
        },
    )
    token = signup.json()["tokens"]["accessToken"]
    # The CLI runs in a subprocess so this event loop keeps serving identity and the gateway.
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{stack.url}/openapi.json",
        "--include-tag",
        "IdentityService",
        "--checks",
        os.environ.get("GATEWAY_FUZZ_CHECKS", SCHEMATHESIS_CHECKS),
        # The coverage phase (boundary and negative values of every parameter) takes ~20 s
        # more; GATEWAY_FUZZ_PHASES=examples,coverage,fuzzing runs it (it passes).
        "--phases",
        os.environ.get("GATEWAY_FUZZ_PHASES", "examples,fuzzing"),
        "--max-examples",
        os.environ.get("GATEWAY_FUZZ_EXAMPLES", "10"),
        "--seed",
        "20261123",
        # One worker: Hypothesis's lambda introspection is not thread-safe.
        "--workers",
        "1",
        "--no-shrink",
        "-H",
        f"Authorization: Bearer {token}",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    text = output.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    assert process.returncode == 0, text[-12000:]
