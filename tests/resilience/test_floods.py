"""One client floods the gateway with reactions, hand raises and malformed requests.

The flooder fires as fast as 20 concurrent connections allow for a few seconds; at the same
time a well-behaved user of the same Space (same IP, its own token) reacts twice a second
and reads the Space four times a second. The flooder must be throttled (429 with
Retry-After and a google.rpc.Status; its accepted requests bounded by the bucket), the
other user must never be, and nothing may answer 5xx.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx
import pytest

from tests.resilience.harness import Api, create_live_space, percentile, signup
from tools.devstack import Stack

pytestmark = pytest.mark.resilience

FLOOD_S = 4.0


async def test_a_flooding_client_is_throttled_and_others_are_not(stack: Stack, api: Api) -> None:
    host = await signup(api, "flhost")
    flooder = await signup(api, "flood")
    neighbour = await signup(api, "calm")
    space = await create_live_space(api, host)
    name = f"spaces/{space}"
    for user in (flooder, neighbour):
        await api.ok(
            "RoomsService.JoinSpace", token=user.token, name=name, request_id=str(uuid.uuid4())
        )
    gateway = stack.services["gateway"]
    base = f"http://127.0.0.1:{gateway.http_port}"
    flood_headers = {"Authorization": f"Bearer {flooder.token}"}
    calm_headers = {"Authorization": f"Bearer {neighbour.token}"}

    requests = [
        ("POST", f"/v1/{name}:sendReaction", {"emoji": "EMOJI_HEART"}),
        ("POST", f"/v1/{name}:requestToSpeak", {}),
        ("POST", f"/v1/{name}:cancelSpeakRequest", {}),
        ("POST", f"/v1/{name}:sendReaction", "{not json"),  # malformed JSON
        ("POST", f"/v1/{name}:sendReaction", {"emoji": "EMOJI_NOT_A_THING"}),  # bad enum
        ("POST", f"/v1/{name}:sendReaction", {"emoji": 1, "surprise": True}),  # unknown field
        ("GET", f"/v1/{name}?pageSize=-5&%ZZ=1", None),  # broken query
    ]
    flood_codes: Counter[int] = Counter()
    retry_after: list[float] = []
    calm_codes: Counter[int] = Counter()
    calm_latency: list[float] = []
    stop = asyncio.Event()

    async def flood(client: httpx.AsyncClient, worker: int) -> None:
        n = worker
        while not stop.is_set():
            method, path, body = requests[n % len(requests)]
            n += 7
            if isinstance(body, str):
                reply = await client.request(
                    method,
                    path,
                    content=body,
                    headers={**flood_headers, "Content-Type": "application/json"},
                )
            else:
                reply = await client.request(method, path, json=body, headers=flood_headers)
            flood_codes[reply.status_code] += 1
            if reply.status_code == 429:
                assert "retry-after" in reply.headers, reply.headers
                retry_after.append(float(reply.headers["retry-after"]))
                assert reply.json()["code"] == 8  # RESOURCE_EXHAUSTED as a google.rpc.Status

    async def calm(client: httpx.AsyncClient) -> None:
        tick = 0
        while not stop.is_set():
            started = time.monotonic()
            if tick % 2 == 0:
                reply = await client.post(
                    f"/v1/{name}:sendReaction", json={"emoji": "EMOJI_CLAP"}, headers=calm_headers
                )
            else:
                reply = await client.get(f"/v1/{name}", headers=calm_headers)
            calm_latency.append(time.monotonic() - started)
            calm_codes[reply.status_code] += 1
            tick += 1
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
    async with (
        httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as flood_client,
        httpx.AsyncClient(base_url=base, timeout=10) as calm_client,
    ):
        started = time.monotonic()
        tasks = [asyncio.create_task(flood(flood_client, i)) for i in range(20)]
        tasks.append(asyncio.create_task(calm(calm_client)))
        await asyncio.sleep(FLOOD_S)
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        health = await calm_client.get("/healthz")

    sent = sum(flood_codes.values())
    throttled = flood_codes[429]
    admitted = sent - throttled
    print(
        f"\nflood: flooder sent {sent} requests in {elapsed:.1f} s ({sent / elapsed:.0f}/s),"
        f" {throttled} throttled (429, Retry-After {min(retry_after, default=0):.2f}-"
        f"{max(retry_after, default=0):.2f} s), {admitted} admitted, codes {dict(flood_codes)};"
        f" neighbour {sum(calm_codes.values())} requests, codes {dict(calm_codes)},"
        f" p99 {percentile(calm_latency, 99) * 1000:.0f} ms"
    )
    assert health.status_code == 200
    assert not [c for c in flood_codes if c >= 500], flood_codes
    assert throttled > 0, "the flooder was never throttled"
    # Gateway bucket: 60 at once, then 20 a second (GATEWAY_RATE_LIMIT_* defaults).
    assert admitted <= 60 + 20 * elapsed + 10, f"{admitted} admitted in {elapsed:.1f} s"
    assert set(calm_codes) == {200}, f"the neighbour was refused: {dict(calm_codes)}"
