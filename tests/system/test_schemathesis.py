"""Schemathesis over the whole running suite: every service's routes through the gateway.

The suite runs as ``make up`` runs it (``tools/devstack.py``: every service its own process,
embedded PostgreSQL and Valkey). A user signs up, hosts a live Space that another user has
joined, follows that user, has a webhook, an open media session and a reminder of a ticketed
Space the other user scheduled. The run gets the user's access token as a header and, half
of the time, those resources' ids as path parameters (a schemathesis dictionary), so
requests reach the services' real logic and not only their 404s. The checks: no 5xx;
status codes, content types, headers and bodies as the gateway's own ``/openapi.json``
declares them.

Bounded so the test stays near two minutes on a loaded 2-core machine (most of it is the
stack starting); ``GATEWAY_FUZZ_EXAMPLES``, ``GATEWAY_FUZZ_PHASES`` and
``GATEWAY_FUZZ_CHECKS`` widen it
(for example ``GATEWAY_FUZZ_EXAMPLES=25 GATEWAY_FUZZ_PHASES=examples,coverage,fuzzing``,
~2 min unloaded), and ``GATEWAY_FUZZ_SEED`` picks another seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.apps import call, gateway_client, join_and_connect, sign_up
from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.integration.media.peers import App
from tools.devstack import Stack

TAGS = ("IdentityService", "RoomsService", "MediaService", "NotifyService", "PaymentsService")

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)

#: Operations left out of the run, each with its reason.
EXCLUDED_OPERATIONS: dict[str, str] = {
    # Open-ended server streams: over plain GET a valid request streams NDJSON until the
    # Space ends / for as long as the client stays, so every valid case would hang until the
    # request timeout. They are WebSocket endpoints first; tests/integration/gateway/
    # test_streams.py covers them (frames, errors, close codes, resume).
    "RoomsService_WatchSpace": "open-ended stream (WebSocket), covered by test_streams.py",
    "NotifyService_SubscribeNotifications": (
        "open-ended stream (WebSocket), covered by test_streams.py"
    ),
}


@dataclass(frozen=True)
class KnownBug:
    """A 5xx of a service this test does not own, and the narrowest way around it.

    The operations stay in the run; only the generated input that triggers the bug is
    switched off for them (a schemathesis ``[[operations]]`` generation setting), so every
    other check still applies to them. Delete the entry when the service is fixed.
    """

    bug: str
    operations: tuple[str, ...]
    generation: dict[str, str | bool]


KNOWN_BUGS: tuple[KnownBug, ...] = ()
"""Service bugs the run steps around (an entry narrows what is generated for a few
operations, with the bug described in a comment); none are known now. Found and fixed this
way: a non-ASCII page token crashed notify's listings, and a NUL character in any stored
text crashed identity, rooms and notify (every request's strings are now checked for NUL)."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("fuzz-stack")
    # The fuzzer is one client sending as fast as it can: lift the per-client rate limit,
    # or most cases would only see 429.
    limits = {"GATEWAY_RATE_LIMIT_PER_S": "100000", "GATEWAY_RATE_LIMIT_BURST": "100000"}
    with Stack(run_dir, auto_ports=True, extra_env=limits) as running:
        yield running


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(stack, timeout=20) as http:
        yield http


def last(name: str) -> str:
    return name.rsplit("/", 1)[1]


async def seed(client: httpx.AsyncClient, app: App) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Real resources for the run: the fuzzer's auth header and ids per path parameter."""
    fuzzer = await sign_up(client, "fuzzer")
    second = await sign_up(client, "other")
    me, auth = fuzzer.user_id, fuzzer.auth
    other, other_auth = second.user_id, second.auth
    space = (
        await call(
            client, "/v1/spaces", auth, space={"title": "Fuzzed"}, requestId=str(uuid.uuid4())
        )
    )["space"]["name"]
    await call(client, f"/v1/{space}:join", other_auth, requestId=str(uuid.uuid4()))
    await call(client, f"/v1/users/{other}:follow", auth)
    # A ticketed Space the other user schedules, and the fuzzer's reminder of it.
    start = datetime.now(UTC) + timedelta(days=2)
    scheduled = (
        await call(
            client,
            "/v1/spaces",
            other_auth,
            space={"title": "Later", "scheduledStartTime": start.strftime("%Y-%m-%dT%H:%M:%SZ")},
            requestId=str(uuid.uuid4()),
        )
    )["space"]["name"]
    offering = {
        "ticketOffering": {"price": {"currencyCode": "USD", "amountMinor": "500"}, "capacity": 10},
        "requestId": str(uuid.uuid4()),
    }
    # Payments learns of new Spaces from rooms' events: 404 until then.
    deadline = time.monotonic() + 30
    while True:
        reply = await client.post(
            f"/v1/{scheduled}/ticketOffering", json=offering, headers=other_auth
        )
        if reply.status_code != 404 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert reply.status_code == 200, reply.text
    reminder = (await call(client, f"/v1/{scheduled}/reminders", auth))["reminder"]["name"]
    webhook = await call(
        client,
        f"/v1/users/{me}/webhooks",
        auth,
        webhook={"url": "https://93.184.216.34/hook"},
        requestId=str(uuid.uuid4()),
    )
    # A media session of the host's: JoinSpace's grant, then Negotiate on its node.
    answer = (await join_and_connect(client, auth, space, app))["answer"]
    node = answer["session"].split("/")[1]
    values = {
        "space": [last(space), last(scheduled)],
        "reminder": [last(reminder)],
        "participant": [me, other],
        "user": [me, other, "me"],
        "relationship": [other],
        "webhook": [last(webhook["webhook"]["name"])],
        "mediaNode": [node],
        "session": [last(answer["session"])],
    }
    return auth, values


def config_toml(values: dict[str, list[str]], probability: float) -> str:
    """A schemathesis.toml: each path parameter takes a real id with ``probability``; the
    known bugs' operations get their generation settings."""
    lines: list[str] = []
    for name, ids in values.items():
        lines.append(f"[dictionaries.{name}]")
        lines.append(f"values = {json.dumps(ids)}")
    lines.append("[parameters]")
    for name in values:
        lines.append(f'"path.{name}" = {{ dictionary = "{name}", probability = {probability} }}')
    for known in KNOWN_BUGS:
        lines.append(f"# {known.bug}")
        lines.append("[[operations]]")
        lines.append(f"include-operation-id = {json.dumps(list(known.operations))}")
        for key, value in known.generation.items():
            lines.append(f"generation.{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def operations_to_test(document: dict[str, Any]) -> set[str]:
    """The operation ids of the run: every route of the five services but the excluded."""
    tags = {tag["name"] for tag in document["tags"]}
    assert tags == set(TAGS), f"a service was added or renamed: {sorted(tags)}; update TAGS"
    found = {
        operation["operationId"]
        for methods in document["paths"].values()
        for operation in methods.values()
        if operation["tags"][0] in TAGS
    }
    assert set(EXCLUDED_OPERATIONS) <= found
    return found - set(EXCLUDED_OPERATIONS)


# Default bounds take ~40 s unloaded, ~2 min on a loaded machine; room for wider runs.
@pytest.mark.timeout(900)
async def test_schemathesis_over_every_service(
    stack: Stack, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """No 5xx and every response as ``/openapi.json`` declares it, for all five services."""
    document = (await client.get("/openapi.json")).json()
    expected = operations_to_test(document)
    app = App("fuzzer", None)
    try:
        auth, values = await seed(client, app)
        config = tmp_path / "schemathesis.toml"
        config.write_text(config_toml(values, probability=0.5))
        arguments = [
            "--config-file",
            str(config),
            "run",
            f"http://127.0.0.1:{stack.services['gateway'].http_port}/openapi.json",
            *(option for tag in TAGS for option in ("--include-tag", tag)),
            *(option for op in EXCLUDED_OPERATIONS for option in ("--exclude-operation-id", op)),
            "--checks",
            os.environ.get("GATEWAY_FUZZ_CHECKS", CHECKS),
            # The coverage phase (boundary and negative values of every parameter) adds
            # ~90 s on a loaded machine; GATEWAY_FUZZ_PHASES=examples,coverage,fuzzing runs
            # it (it passes).
            "--phases",
            os.environ.get("GATEWAY_FUZZ_PHASES", "examples,fuzzing"),
            "--max-examples",
            os.environ.get("GATEWAY_FUZZ_EXAMPLES", "5"),
            "--seed",
            os.environ.get("GATEWAY_FUZZ_SEED", "20261123"),
            # One worker: Hypothesis's lambda introspection is not thread-safe.
            "--workers",
            "1",
            "--no-shrink",
            "--request-timeout",
            "20",
            "-H",
            f"Authorization: {auth['Authorization']}",
            "--report",
            "junit,ndjson",
            "--report-dir",
            str(tmp_path),
        ]
        started = time.monotonic()
        # The CLI runs in a subprocess (cwd holds its schemathesis.toml) so this event loop
        # keeps the test's media session alive.
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "schemathesis"),
            *arguments,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=780)
        text = output.decode(errors="replace")
        (tmp_path / "schemathesis.txt").write_text(text)
        print(f"schemathesis ran {time.monotonic() - started:.0f} s; report in {tmp_path}")
        stack.check_alive()
        assert process.returncode == 0, text[-12000:]
        assert f"Tested: {len(expected)}" in text, text[-3000:]
    finally:
        await app.close()
