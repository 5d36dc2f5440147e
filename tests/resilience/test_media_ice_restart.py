"""Issue #11: a listener whose address changes restarts ICE and resumes audio without
rejoining the Space, against the real processes of the stack.

The listener's app reaches its media node through a UDP relay (its NAT). The relay moves
to a new source port and the old path goes dead: media's packets to the old port are lost
and the app hears nothing. The app notices (no audio for a second), restarts ICE through
the gateway (``POST /v1/{session}:restartIce`` with new credentials) and hears the
speaker again: same media session, no new grant, and rooms never saw it leave or join.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiortc import RTCSessionDescription

from tests.helpers.apps import Account, call, join_and_connect, sign_up
from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.helpers.ice_restart import UdpRelay, apply_restart_answer, restart_offer, route_via
from tests.integration.media.peers import App, SlotRecorder, Tone, eventually, heard_since
from tests.resilience.harness import Api, Watcher
from tools.devstack import Stack

pytestmark = pytest.mark.resilience

NOTICE_S = 1.0
"""How long the app waits without audio before it restarts ICE."""


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    port = stack.services["gateway"].http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
        yield http


def node_address(answer: str) -> tuple[str, int]:
    """The media node's host candidate in its answer."""
    found = re.search(r"(?m)^a=candidate:\S+ 1 udp \d+ (\S+) (\d+) typ host", answer)
    assert found, "the answer has a host candidate"
    return found.group(1), int(found.group(2))


async def join_via_relay(
    client: httpx.AsyncClient, account: Account, space: str, app: App
) -> tuple[str, UdpRelay, tuple[str, int]]:
    """JoinSpace and Negotiate as an app does, the app's ICE going through a relay."""
    joined = await call(client, f"/v1/{space}:join", account.auth, requestId=str(uuid.uuid4()))
    grant = joined["mediaGrant"]
    await app.pc.setLocalDescription(await app.pc.createOffer())
    answer = await call(
        client,
        f"/v1/mediaNodes/{grant['endpoint']['node']}/sessions:negotiate",
        account.auth,
        grant=grant["token"],
        sdpOffer=app.pc.localDescription.sdp,
    )
    node = node_address(answer["sdpAnswer"])
    relay = UdpRelay(node)
    sdp = route_via(answer["sdpAnswer"], node, relay.address)
    await app.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
    app.recorder = SlotRecorder([t.receiver.track for t in app.slot_transceivers])
    app.session = answer["session"]
    return answer["session"], relay, node


def last_frame(app: App) -> float:
    """When the app last played a frame in any slot (0: never)."""
    return max((slot.times[-1] for slot in app.slots if slot.times), default=0.0)


async def participants(client: httpx.AsyncClient, account: Account, space: str) -> list[Any]:
    reply = await client.get(f"/v1/{space}/participants", headers=account.auth)
    assert reply.status_code == 200, reply.text
    return sorted(reply.json().get("participants", []), key=lambda p: p["name"])


async def test_a_listener_whose_address_changes_restarts_ice_and_hears_again(
    stack: Stack, api: Api, client: httpx.AsyncClient
) -> None:
    host_account = await sign_up(client, "rhost")
    listener_account = await sign_up(client, "rlist")
    created = await call(
        client,
        "/v1/spaces",
        host_account.auth,
        space={"title": "ICE restart"},
        requestId=str(uuid.uuid4()),
    )
    space = created["space"]["name"]
    host = App("host", Tone(440, 0.3))
    listener = App("listener", None)
    relay: UdpRelay | None = None
    watcher: Watcher | None = None
    try:
        await join_and_connect(client, host_account.auth, space, host)
        session, relay, node = await join_via_relay(client, listener_account, space, listener)
        t0 = time.monotonic()
        assert await eventually(lambda: heard_since(listener, 440, t0), 15.0), "heard at first"

        def connected(people: list[Any]) -> bool:
            return any(
                p["name"].endswith(listener_account.user_id) and p.get("connected") for p in people
            )

        assert await eventually_async(
            lambda: participants(client, host_account, space), connected, 5.0
        ), "rooms sees the listener's media connected"
        before = await participants(client, host_account, space)
        token = listener_account.auth["Authorization"].removeprefix("Bearer ")
        watcher = Watcher(api, token, space.removeprefix("spaces/")).start()
        await watcher.wait_for(lambda e: e.WhichOneof("event") == "snapshot")

        # The listener's address changes; media's packets to the old one are lost.
        relay.rebind()
        changed = time.monotonic()

        # The app notices: no audio for NOTICE_S.
        assert await eventually(
            lambda: time.monotonic() - max(last_frame(listener), changed) > NOTICE_S, 10.0, 0.02
        )
        noticed = time.monotonic()
        offer = restart_offer(listener.pc)
        restarted = time.monotonic()
        reply = await call(
            client, f"/v1/{session}:restartIce", listener_account.auth, sdpOffer=offer
        )
        answered = time.monotonic()
        await apply_restart_answer(listener.pc, route_via(reply["sdpAnswer"], node, relay.address))
        assert await eventually(lambda: heard_since(listener, 440, restarted), 10.0, 0.02), (
            "the listener hears the speaker again after the ICE restart"
        )
        heard = time.monotonic()
        # Consent checks both ways pass with the new credentials: audio keeps coming.
        await asyncio.sleep(6.0)
        assert heard_since(listener, 440, time.monotonic() - 1.0), "still hearing"
        print(
            f"address change -> noticed {noticed - changed:.2f} s -> RestartIce answered in "
            f"{(answered - restarted) * 1000:.0f} ms -> audio again {heard - restarted:.2f} s "
            f"after RestartIce, {heard - changed:.2f} s after the address change"
        )

        # Same session, no rejoin: rooms' participants are the same people, joined at the
        # same time, the listener still connected; nobody left or joined meanwhile.
        assert listener.session == session
        after = await participants(client, host_account, space)
        assert [(p["name"], p.get("joinTime"), p.get("role")) for p in after] == [
            (p["name"], p.get("joinTime"), p.get("role")) for p in before
        ]
        assert connected(after)
        churn = [
            e
            for e in watcher.events
            if e.WhichOneof("event") in ("participant_left", "participant_joined")
        ]
        assert churn == [], "no leave or join around the restart"
    finally:
        if watcher is not None:
            await watcher.stop()
        for app in (host, listener):
            await app.close()
        if relay is not None:
            relay.close()


async def eventually_async(fetch: Any, predicate: Any, timeout: float) -> bool:
    """Poll an async ``fetch`` until ``predicate`` holds for what it returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(await fetch()):
            return True
        await asyncio.sleep(0.1)
    return bool(predicate(await fetch()))


CHROMIUM = Path("/usr/bin/chromium")


async def test_the_web_client_restarts_ice_on_its_session_in_chromium(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    """The web client's own restart (media.js: ``pc.restartIce()``, a new offer to
    RestartIce, its answer) in a real browser: Chromium takes media's answer (new
    credentials, same fingerprint and DTLS role), nominates again and keeps receiving on
    the same session."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium to run this browser check")
    playwright_api = pytest.importorskip("playwright.async_api")
    host_account = await sign_up(client, "bhost")
    signed = await call(
        client,
        "/v1/users",
        {},
        user={"handle": f"blis_{uuid.uuid4().hex[:8]}", "displayName": "Browser listener"},
        password="correct horse battery",
        requestId=str(uuid.uuid4()),
    )
    listener_auth = {"Authorization": f"Bearer {signed['tokens']['accessToken']}"}
    created = await call(
        client,
        "/v1/spaces",
        host_account.auth,
        space={"title": "Browser ICE restart"},
        requestId=str(uuid.uuid4()),
    )
    space = created["space"]["name"]
    host = App("host", Tone(440, 0.3))
    try:
        await join_and_connect(client, host_account.auth, space, host)
        joined = await call(client, f"/v1/{space}:join", listener_auth, requestId=str(uuid.uuid4()))
        async with playwright_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--autoplay-policy=no-user-gesture-required",
                ],
            )
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                await page.goto(str(client.base_url) + "/")
                await page.evaluate(
                    """async ({ tokens, user, grant }) => {
                        const api = await import("/web/js/api.js");
                        api.session.set(tokens, user);
                        const { MediaSession } = await import("/web/js/media.js");
                        const sinks = document.createElement("div");
                        document.body.append(sinks);
                        window.testMedia = new MediaSession(sinks);
                        await window.testMedia.connect(grant);
                    }""",
                    {
                        "tokens": signed["tokens"],
                        "user": signed["user"],
                        "grant": joined["mediaGrant"],
                    },
                )

                async def stats() -> dict[str, Any]:
                    result: dict[str, Any] = await page.evaluate("window.testMedia.audioStats()")
                    return result

                async def packets() -> int:
                    return sum(s["packetsReceived"] for s in (await stats())["inbound"])

                async def receiving(since: int, timeout: float = 15.0) -> int:
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        count = await packets()
                        if count > since + 50:  # a second of Opus in 20 ms packets
                            return count
                        await asyncio.sleep(0.1)
                    raise AssertionError(f"no audio packets: {await stats()}")

                first = await receiving(0)
                before = await stats()
                assert before["state"] == "connected"
                ufrag = (
                    "window.testMedia.conn.pc.remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1]"
                )
                media_ufrag = await page.evaluate(ufrag)
                restarted = time.monotonic()
                await page.evaluate("window.testMedia.conn.restartIce()")
                answered = time.monotonic()
                after_restart = await packets()
                await receiving(after_restart)
                flowing = time.monotonic() - answered
                after = await stats()
                print(
                    f"Chromium's ICE restart: restartIce() (gathering, RestartIce, answer) took "
                    f"{(answered - restarted) * 1000:.0f} ms; a second of audio arrived "
                    f"{flowing:.2f} s after it; {after_restart - first} packets meanwhile"
                )
                assert await page.evaluate(ufrag) != media_ufrag, "media's new credentials"
                # Consent checks both ways (every few seconds) pass with the new credentials.
                await asyncio.sleep(8.0)
                await receiving(await packets(), 3.0)
                assert after["iceRestarts"] == 1, "the restart went through media's answer"
                assert after["session"] == before["session"], "same media session"
                assert after["state"] == "connected"
                ice = await page.evaluate("window.testMedia.conn.pc.iceConnectionState")
                assert ice in ("connected", "completed")
                assert errors == [], errors
            finally:
                await browser.close()
    finally:
        await host.close()
