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
from typing import Any

import grpc
import httpx
import pytest
from aiortc import RTCSessionDescription
from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as rooms_grpc

from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.integration.media.peers import App, SlotRecorder, Tone, eventually, heard_since
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
    port = stack.services["gateway"].http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
        yield http


class Member:
    """A user with an app connected to media, able to follow a media_reconnect event."""

    def __init__(self, client: httpx.AsyncClient, name: str, tone: Tone | None) -> None:
        self.client = client
        self.name = name
        self.tone = tone
        self.auth: dict[str, str] = {}
        self.token = ""
        self.app = App(name, tone)
        self.node = ""
        self.reconnects: list[Any] = []

    async def sign_up(self) -> None:
        reply = await self.client.post(
            "/v1/users",
            json={
                "user": {"handle": f"{self.name}_{uuid.uuid4().hex[:8]}", "displayName": self.name},
                "password": "correct horse battery",
                "requestId": str(uuid.uuid4()),
            },
        )
        assert reply.status_code == 200, reply.text
        self.token = reply.json()["tokens"]["accessToken"]
        self.auth = {"Authorization": f"Bearer {self.token}"}

    async def post(self, path: str, **body: Any) -> Any:
        reply = await self.client.post(path, json=body, headers=self.auth)
        assert reply.status_code == 200, f"{path}: {reply.text}"
        return reply.json()

    async def join(self, space: str) -> None:
        joined = await self.post(f"/v1/{space}:join", requestId=str(uuid.uuid4()))
        await self.negotiate(
            joined["mediaGrant"]["token"], joined["mediaGrant"]["endpoint"]["node"]
        )

    async def negotiate(self, grant: str, node: str) -> None:
        self.node = node
        await self.app.pc.setLocalDescription(await self.app.pc.createOffer())
        answer = await self.post(
            f"/v1/mediaNodes/{node}/sessions:negotiate",
            grant=grant,
            sdpOffer=self.app.pc.localDescription.sdp,
        )
        await self.app.pc.setRemoteDescription(RTCSessionDescription(answer["sdpAnswer"], "answer"))
        self.app.recorder = SlotRecorder([t.receiver.track for t in self.app.slot_transceivers])

    async def follow_reconnects(self, rooms_port: int, space: str) -> None:
        """Watch the Space; on media_reconnect, negotiate again with the fresh grant."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rooms_port}") as channel:
            stream = rooms_grpc.RoomsServiceStub(channel).WatchSpace(
                rooms_pb.WatchSpaceRequest(name=space),
                metadata=(("authorization", f"Bearer {self.token}"),),
            )
            async for batch in stream:
                for event in batch.events:
                    if event.WhichOneof("event") != "media_reconnect":
                        continue
                    grant = event.media_reconnect.media_grant
                    self.reconnects.append(event.media_reconnect)
                    await self.app.close()
                    self.app = App(self.name, Tone(self.tone.freq, 0.3) if self.tone else None)
                    await self.negotiate(grant.token, grant.endpoint.node)


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
