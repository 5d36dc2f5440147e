"""The whole suite on loopback: apps sign up, host a Space, join it and talk through the
gateway, rooms and a media node; audio is decoded by the apps' own aiortc receivers.

This is the path a browser takes (the browser tests drive the same calls from Chromium):
``JoinSpace`` gives a media grant naming a node, the gateway routes ``Negotiate`` to that
node through media's registry, and rooms pushes every role change to media.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.apps import call, gateway_client, join_and_connect, sign_up
from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.integration.media.peers import (
    App,
    Tone,
    eventually,
    heard,
    heard_since,
)
from tools.devstack import Stack

SILENCE_RMS = 50.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("media-stack")
    with Stack(run_dir, auto_ports=True) as running:
        yield running


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(stack, timeout=20) as http:
        yield http


async def test_a_space_is_heard_through_the_whole_suite(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    host_auth = (await sign_up(client, "host")).auth
    guest_auth = (await sign_up(client, "guest")).auth
    other_auth = (await sign_up(client, "other")).auth
    created = await call(
        client, "/v1/spaces", host_auth, space={"title": "Media path"}, requestId=str(uuid.uuid4())
    )
    space = created["space"]["name"]

    host = App("host", Tone(440, 0.3))
    guest = App("guest", Tone(660, 0.3))  # a listener whose app sends audio anyway
    other = App("other", None)
    try:
        host_session = await join_and_connect(client, host_auth, space, host)
        guest_session = await join_and_connect(client, guest_auth, space, guest)
        await join_and_connect(client, other_auth, space, other)
        assert host_session["answer"]["mayPublish"] and not guest_session["answer"]["mayPublish"]

        assert await eventually(lambda: heard(guest, 440) and heard(other, 440), 15.0)
        t_listen = time.monotonic()
        await asyncio.sleep(1.0)
        assert not heard_since(host, 660, t_listen) and not heard_since(other, 660, t_listen), (
            "a listener is never heard"
        )

        # The guest asks to speak; the host approves; a new speaker comes on stage muted
        # and unmutes themself; rooms tells media each step; then the guest is heard.
        await call(client, f"/v1/{space}:requestToSpeak", guest_auth)
        guest_participant = guest_session["joined"]["participant"]["name"]
        approved = await call(client, f"/v1/{guest_participant}:approveSpeaker", host_auth)
        assert approved["participant"]["muted"], "speakers come on stage muted"
        await asyncio.sleep(0.5)
        assert not heard(other, 660), "still muted: not heard"
        t0 = time.monotonic()
        await call(client, f"/v1/{space}:setOwnMute", guest_auth, muted=False)
        assert await eventually(lambda: heard(host, 660) and heard(other, 660), 10.0)
        print(f"unmuted speaker heard after {(time.monotonic() - t0) * 1000:.0f} ms")

        # The host mutes the guest: silence on the other listener's guest slot.
        await call(client, f"/v1/{guest_participant}:mute", host_auth)
        t1 = time.monotonic()
        await asyncio.sleep(1.0)
        assert not heard_since(other, 660, t1 + 0.2), "muted: silent within 200 ms"
        assert heard_since(other, 440, t1 + 0.2), "the host still is heard"

        stats = await client.get(f"/v1/{space}", headers=guest_auth)
        assert stats.json()["space"]["state"] == "SPACE_STATE_LIVE"
        ended = await call(client, f"/v1/{space}:end", host_auth)
        assert ended["space"]["state"] == "SPACE_STATE_ENDED"
        assert await eventually(
            lambda: host.pc.connectionState == "closed" or not heard(other, 440), 10.0
        )
    finally:
        for app in (host, guest, other):
            await app.close()
