"""Deadlines and retries across the real hops.

A recording proxy (:class:`~tests.resilience.harness.FaultProxy`) sits in front of rooms,
identity and payments: every process calls them through it (``SPACES_<NAME>_ADDR``), so it
sees each hop's incoming deadline, each attempt and its request id.

* A JoinSpace with ``X-Request-Timeout: 300m`` at the gateway reaches rooms with at most
  300 ms left, and identity (called by rooms) with less than rooms had: each hop passes on
  the remaining budget, never a fresh one.
* With identity failing every second call with UNAVAILABLE, rooms' retries of identity
  (idempotent reads) stay within the retry policy (at most 4 attempts per call) and the
  retry throttle; with rooms failing every second call, the gateway retries reads (GET) a
  bounded number of times and never retries a write (POST), which reaches rooms exactly
  once per request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.resilience.harness import (
    Api,
    FaultProxy,
    LoopThread,
    User,
    create_live_space,
    running_stack,
    signup,
)
from tools.devstack import Stack

pytestmark = pytest.mark.resilience

PROXIED = ("identity", "rooms", "payments")


@dataclass
class ProxiedStack:
    stack: Stack
    proxies: dict[str, FaultProxy]

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.stack.services['gateway'].http_port}"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedStack]:
    run_dir: Path = tmp_path_factory.mktemp("deadlines")
    loops = LoopThread()
    proxies = {name: FaultProxy(loops) for name in PROXIED}
    env = {f"SPACES_{name.upper()}_ADDR": f"127.0.0.1:{p.start()}" for name, p in proxies.items()}
    try:
        with running_stack(run_dir, extra_env=env) as stack:
            for name, proxy in proxies.items():
                proxy.backend = f"127.0.0.1:{stack.services[name].grpc_port}"
            yield ProxiedStack(stack, proxies)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        loops.close()


@pytest.fixture(scope="module")
def stack(proxied: ProxiedStack) -> Stack:
    return proxied.stack


async def _join_over_http(
    client: httpx.AsyncClient, user: User, space: str, timeout: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {user.token}", "X-Request-Id": uuid.uuid4().hex}
    if timeout:
        headers["X-Request-Timeout"] = timeout
    return await client.post(
        f"/v1/spaces/{space}:join", json={"requestId": str(uuid.uuid4())}, headers=headers
    )


async def test_a_300_ms_deadline_reaches_every_hop_as_what_is_left(
    proxied: ProxiedStack, api: Api
) -> None:
    host = await signup(api, "dlhost")
    guests = [await signup(api, f"dl{i}") for i in range(6)]
    space = await create_live_space(api, host)
    rooms, identity = proxied.proxies["rooms"], proxied.proxies["identity"]
    budgets: list[tuple[float, float]] = []
    async with httpx.AsyncClient(base_url=proxied.gateway, timeout=10) as client:
        # Warm up: tokens' keys cached, channels connected.
        assert (await _join_over_http(client, guests[0], space)).status_code == 200
        for guest in guests[1:]:
            reply = await _join_over_http(client, guest, space, timeout="300m")
            request_id = reply.headers["x-request-id"]
            assert reply.status_code == 200, reply.text
            at_rooms = [c for c in rooms.calls if c.request_id == request_id]
            at_identity = [c for c in identity.calls if c.request_id == request_id]
            assert [c.method for c in at_rooms] == ["/spaces.rooms.v1.RoomsService/JoinSpace"]
            assert at_identity, "rooms asked identity nothing during JoinSpace"
            join = at_rooms[0]
            # grpc-timeout travels in whole units (300m): allow its rounding, nothing more.
            assert join.remaining_s is not None and 0 < join.remaining_s <= 0.305
            for hop in at_identity:
                assert hop.remaining_s is not None, f"{hop.method} carried no deadline"
                assert 0 < hop.remaining_s < join.remaining_s, (hop, join)
                budgets.append((join.remaining_s, hop.remaining_s))
    print(
        "\ndeadline: gateway 300 ms -> rooms "
        + ", ".join(f"{r * 1000:.0f}" for r, _ in budgets)
        + " ms -> identity "
        + ", ".join(f"{i * 1000:.0f}" for _, i in budgets)
        + " ms left"
    )


async def test_retries_are_bounded_and_writes_are_never_retried(
    proxied: ProxiedStack, api: Api
) -> None:
    host = await signup(api, "rthost")
    guests = [await signup(api, f"rt{i}") for i in range(20)]
    space = await create_live_space(api, host)
    rooms, identity = proxied.proxies["rooms"], proxied.proxies["identity"]
    identity_start, rooms_start = len(identity.calls), len(rooms.calls)

    # identity fails every second call: rooms' calls to it during joins.
    identity.fail_methods = ("/spaces.identity.v1.IdentityService/BatchCheckBlocks",)
    identity.fail_every = 2
    outcomes: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=proxied.gateway, timeout=15) as client:
        for guest in guests[:10]:
            reply = await _join_over_http(client, guest, space)
            outcomes[reply.status_code] += 1
        identity.fail_every = 0

        # rooms fails every second call: reads (GET) and writes (POST) through the gateway.
        rooms.fail_methods = ("/spaces.rooms.v1.RoomsService/",)
        rooms.fail_every = 2
        write_codes: Counter[int] = Counter()
        read_codes: Counter[int] = Counter()
        write_ids, read_ids = [], []
        for guest in guests[10:]:
            headers = {"Authorization": f"Bearer {guest.token}"}
            joined = await _join_over_http(client, guest, space)
            write_codes[joined.status_code] += 1
            write_ids.append(joined.headers["x-request-id"])
            for _ in range(2):
                reply = await client.post(
                    f"/v1/spaces/{space}:sendReaction",
                    json={"emoji": "EMOJI_HEART"},
                    headers=headers,
                )
                write_codes[reply.status_code] += 1
                write_ids.append(reply.headers["x-request-id"])
                reply = await client.get(f"/v1/spaces/{space}", headers=headers)
                read_codes[reply.status_code] += 1
                read_ids.append(reply.headers["x-request-id"])
        rooms.fail_every = 0
        await asyncio.sleep(0.2)

    def attempts(proxy: FaultProxy, start: int, prefix: str) -> Counter[str]:
        return Counter(c.request_id for c in proxy.calls[start:] if c.method.startswith(prefix))

    blocks = attempts(identity, identity_start, identity.fail_methods[0])
    injected = sum(1 for c in identity.calls[identity_start:] if c.failed)
    writes = attempts(rooms, rooms_start, "/spaces.rooms.v1.RoomsService/")
    write_attempts = [writes[r] for r in write_ids]
    read_attempts = [writes[r] for r in read_ids]
    print(
        f"\nretries: identity failing 1/2 -> {len(blocks)} rooms->identity calls,"
        f" attempts per call {sorted(Counter(blocks.values()).items())}, {injected} failures"
        f" injected, joins {dict(outcomes)}; rooms failing 1/2 -> gateway writes"
        f" {dict(write_codes)} with attempts {sorted(Counter(write_attempts).items())},"
        f" reads {dict(read_codes)} with attempts {sorted(Counter(read_attempts).items())}"
    )
    assert blocks and max(blocks.values()) <= 4, blocks
    assert sum(blocks.values()) <= 2 * len(blocks) + 4, "retries exceeded the throttle"
    assert set(outcomes) <= {200, 503}, outcomes
    assert outcomes[200] >= 5, "retries did not mask half the calls failing"
    assert write_attempts and set(write_attempts) == {1}, "a write reached rooms twice"
    assert 503 in write_codes, "no write failed: the injection did not reach them"
    assert read_attempts and max(read_attempts) <= 4
    assert any(n > 1 for n in read_attempts), "reads were never retried"
    assert set(read_codes) <= {200, 503}
