"""Two media processes behind the whole suite: an edge relays a full origin's Space, and when
the origin process is killed its participants are moved by rooms and heard again.

The stack runs two media processes: ``media-1`` holds two peers, ``media-2`` the rest. The
host and one listener land on ``media-1`` (the origin), the next listener on ``media-2`` (an
edge pulling a relay). Then ``media-1`` is SIGKILLed: ``media-2`` notices its report
expire, rooms sends the host and the first listener a ``media_reconnect`` event with a
grant for ``media-2`` (now the origin), they negotiate again, and everyone hears the host
again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.apps import Member, gateway_client
from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.integration.media.peers import Tone, eventually, heard_since
from tools.devstack import Stack

pytestmark = pytest.mark.resilience


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("fleet-stack")
    # media-1 takes two peers; media-2 takes the rest.
    with Stack(
        run_dir,
        auto_ports=True,
        media_nodes=2,
        process_env={"media": {"MEDIA_CAPACITY": "2"}, "media-2": {"MEDIA_CAPACITY": "100"}},
    ) as running:
        yield running


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(stack, timeout=20) as http:
        yield http


async def test_an_edge_relays_a_full_origin_and_a_killed_origin_s_participants_move(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    host, near, far = (
        Member(client, "host", Tone(440, 0.3)),
        Member(client, "near", None),
        Member(client, "far", None),
    )
    for member in (host, near, far):
        await member.sign_up()
    created = await host.post("/v1/spaces", space={"title": "Fleet"}, requestId=str(uuid.uuid4()))
    space = created["space"]["name"]
    watchers: list[asyncio.Task[None]] = []
    try:
        await host.join(space)
        await near.join(space)
        assert host.node == near.node == "media-1", "the origin takes its first two peers"
        await asyncio.sleep(1.5)  # media-1 reports itself full
        await far.join(space)
        assert far.node == "media-2", "the next listener goes to the edge"
        t0 = time.monotonic()
        assert await eventually(lambda: heard_since(far.app, 440, t0), 15.0), "relayed"
        assert await eventually(lambda: heard_since(near.app, 440, t0), 5.0)

        rooms_port = stack.services["rooms"].grpc_port
        assert rooms_port is not None
        watchers = [
            asyncio.create_task(m.follow_reconnects(rooms_port, space)) for m in (host, near)
        ]
        await asyncio.sleep(1.0)
        origin = stack.services["media"].process
        os.killpg(origin.pid, signal.SIGKILL)
        origin.wait(10)
        killed = time.monotonic()

        assert await eventually(lambda: bool(host.reconnects and near.reconnects), 20.0), (
            "rooms moved the dead node's participants"
        )
        assert await eventually(lambda: host.node == near.node == "media-2", 10.0)
        assert all(r.reason == 2 for r in host.reconnects + near.reconnects), "NODE_FAILED"
        assert await eventually(
            lambda: heard_since(near.app, 440, killed) and heard_since(far.app, 440, killed), 20.0
        ), "everyone hears the host again, from media-2"
        print(f"audible again {time.monotonic() - killed:.1f} s after the origin was killed")
    finally:
        for task in watchers:
            task.cancel()
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError("a reconnect watcher failed") from task.exception()
        for member in (host, near, far):
            await member.app.close()
