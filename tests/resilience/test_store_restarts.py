"""Restart PostgreSQL and Valkey under load (the stack's own embedded servers, same data
dir, same socket/port).

PostgreSQL: writers keep following users (identity), pinning numbered messages (rooms),
tipping the host (payments) and reading the inbox (notify) while the server is stopped
for a few seconds. While it is down, every answer must be UNAVAILABLE (or the service's
health NOT_SERVING); within 10 s of its return every writer must succeed again; and no
acknowledged write may be missing afterwards.

Valkey: a watcher follows a live Space and a follower's inbox collects "scheduled"
notifications while the host keeps scheduling Spaces and raising/lowering a hand through a
Valkey restart (snapshot kept, as a Redis with persistence restarts). Afterwards the
watcher has every durable event, rooms' outbox stream holds each event exactly once with
no hole in its sequence, and the follower got exactly one notification per Space.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import psycopg
import pytest
import redis
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spaces.common.v1 import money_pb2
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res

from tests.resilience.harness import (
    Api,
    CallResult,
    User,
    Watcher,
    create_live_space,
    signup,
)
from tools.devstack import Stack

pytestmark = pytest.mark.resilience

TRANSIENT = {grpc.StatusCode.UNAVAILABLE}


@dataclass
class Writer:
    """One client writing in a loop: what it tried, what was acknowledged, how it failed."""

    name: str
    step: Callable[[int], Awaitable[CallResult]]
    acked: list[int] = field(default_factory=list)
    failures: list[tuple[float, grpc.StatusCode, str]] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    attempts: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.attempts += 1
            n = self.attempts
            result = await self.step(n)
            now = time.monotonic()
            if result.ok:
                self.acked.append(n)
                self.successes.append(now)
            else:
                self.failures.append((now, result.code, result.reason))
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.02)

    def first_success_after(self, moment: float) -> float | None:
        return next((t for t in self.successes if t > moment), None)


def _health(stack: Stack, service: str) -> str:
    port = stack.services[service].grpc_port
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError as error:
        return f"error {error.code().name}"  # type: ignore[attr-defined]


@dataclass
class PostgresRestart:
    """What the writers saw around one PostgreSQL restart."""

    writers: list[Writer]
    stopped_at: float
    back_at: float
    health_while_down: dict[str, str]
    lost: list[str]


@pytest.fixture(scope="module")
async def postgres_restart(stack: Stack, api: Api) -> PostgresRestart:
    """Run the writers through one PostgreSQL restart, then check what they were told."""
    host = await signup(api, "pghost")
    fan = await signup(api, "pgfan")
    targets = [await signup(api, f"t{i}") for i in range(60)]
    space = await create_live_space(api, host)
    await api.ok(
        "RoomsService.JoinSpace",
        token=fan.token,
        name=f"spaces/{space}",
        request_id=str(uuid.uuid4()),
    )
    tip = money_pb2.Money(amount_minor=100, currency_code="USD")

    async def follow(n: int) -> CallResult:
        target = targets[(n - 1) % len(targets)]
        return await api.call(
            "IdentityService.FollowUser", token=fan.token, name=target.name, timeout=2
        )

    async def pin(n: int) -> CallResult:
        return await api.call(
            "RoomsService.PinMessage",
            token=host.token,
            name=f"spaces/{space}",
            text=f"pin {n}",
            timeout=2,
        )

    async def tip_host(n: int) -> CallResult:
        return await api.call(
            "PaymentsService.SendTip",
            token=fan.token,
            parent=f"spaces/{space}",
            request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{space}/{n}")),
            recipient=host.name,
            amount=tip,
            payment_method="tok_visa",
            timeout=2,
        )

    async def inbox(n: int) -> CallResult:
        return await api.call(
            "NotifyService.GetUnreadCount", token=host.token, parent=host.name, timeout=2
        )

    # What one tip adds to the host's held balance (the platform keeps a fee).
    first_tip = await tip_host(0)
    assert first_tip.ok, first_tip
    per_tip = await _held(api, host)

    writers = [
        Writer("identity follow", follow),
        Writer("rooms pin", pin),
        Writer("payments tip", tip_host),
        Writer("notify read", inbox),
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    await asyncio.sleep(2.0)

    down_at = time.monotonic()
    await asyncio.to_thread(stack.stop_postgres, "fast")
    stopped_at = time.monotonic()
    health_while_down: dict[str, str] = {}
    await asyncio.sleep(2.0)
    for service in ("identity", "rooms", "payments", "notify"):
        health_while_down[service] = await asyncio.to_thread(_health, stack, service)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(stack.start_postgres)
    back_at = time.monotonic()
    await asyncio.sleep(12.0)
    stop.set()
    await asyncio.gather(*tasks)

    lines = []
    for writer in writers:
        during = [c for t, c, _ in writer.failures if stopped_at <= t <= back_at]
        first = writer.first_success_after(back_at)
        recovery = "never" if first is None else f"{first - back_at:.2f} s"
        lines.append(
            f"{writer.name}: {len(writer.acked)}/{writer.attempts} acked, answers while down"
            f" {sorted({c.name for c in during})}, recovered {recovery} after PostgreSQL returned"
        )
    print(
        f"\npostgres restart: down {back_at - down_at:.1f} s; health while down"
        f" {health_while_down}\n  " + "\n  ".join(lines)
    )

    # No acknowledged write is lost.
    lost = []
    follow_writer, pin_writer, tip_writer = writers[0], writers[1], writers[2]
    following = await api.ok(
        "IdentityService.ListFollowing", token=fan.token, parent=fan.name, page_size=100
    )
    followed = {u.name for u in following.following}
    acked_targets = {targets[(n - 1) % len(targets)].name for n in follow_writer.acked}
    if not acked_targets <= followed:
        lost.append(f"follows lost: {acked_targets - followed}")
    got = await api.ok("RoomsService.GetSpace", token=host.token, name=f"spaces/{space}")
    pinned = int(got.space.pinned_message.text.split()[1])
    if pinned < max(pin_writer.acked):
        lost.append(f"pin {max(pin_writer.acked)} acknowledged, pinned is {pinned}")
    balance = await api.ok(
        "PaymentsService.GetBalance", token=host.token, name=f"{host.name}/balance"
    )
    held = sum(b.held.amount_minor for b in balance.balance.balances if b.currency_code == "USD")
    acked_tips, tried_tips = 1 + len(tip_writer.acked), 1 + tip_writer.attempts
    if not per_tip * acked_tips <= held <= per_tip * tried_tips:
        lost.append(f"tips: held {held}, {acked_tips} acked of {tried_tips}, {per_tip} each")
    return PostgresRestart(writers, stopped_at, back_at, health_while_down, lost)


async def test_postgres_restart_loses_no_acknowledged_write(
    postgres_restart: PostgresRestart,
) -> None:
    assert not postgres_restart.lost, postgres_restart.lost
    assert all(w.acked for w in postgres_restart.writers)


async def test_postgres_restart_every_service_recovers_within_10_s(
    postgres_restart: PostgresRestart,
) -> None:
    for writer in postgres_restart.writers:
        first = writer.first_success_after(postgres_restart.back_at)
        assert first is not None, f"{writer.name} never recovered"
        assert first - postgres_restart.back_at <= 10.0, f"{writer.name} recovered too late"


async def test_postgres_down_services_answer_unavailable_or_not_serving(
    postgres_restart: PostgresRestart,
) -> None:
    for writer in postgres_restart.writers:
        service = writer.name.split()[0]
        down = {
            c
            for t, c, _ in writer.failures
            if postgres_restart.stopped_at <= t <= postgres_restart.back_at
        }
        assert down, f"{writer.name} never noticed PostgreSQL was down"
        not_serving = postgres_restart.health_while_down[service] != "SERVING"
        assert not_serving or down <= TRANSIENT, (
            f"{service}: health {postgres_restart.health_while_down[service]} and answers"
            f" {sorted(c.name for c in down)} while PostgreSQL was down"
        )


async def _held(api: Api, user: User) -> int:
    balance = await api.ok(
        "PaymentsService.GetBalance", token=user.token, name=f"{user.name}/balance"
    )
    return sum(b.held.amount_minor for b in balance.balance.balances if b.currency_code == "USD")


async def _stream_entries(stack: Stack, stream: str) -> list[tuple[int, str, str]]:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        entries = client.xrange(stream, "-", "+")
    finally:
        client.close()
    return [
        (int(entry_id.decode().split("-")[0]), fields[b"id"].decode(), fields[b"key"].decode())
        for entry_id, fields in entries
    ]


async def test_valkey_restart_under_load(stack: Stack, api: Api) -> None:
    host = await signup(api, "vkhost")
    follower = await signup(api, "vkfan")
    hand = await signup(api, "vkhand")
    await api.ok("IdentityService.FollowUser", token=follower.token, name=host.name)
    space = await create_live_space(api, host)
    await api.ok(
        "RoomsService.JoinSpace",
        token=hand.token,
        name=f"spaces/{space}",
        request_id=str(uuid.uuid4()),
    )
    watcher = Watcher(api, host.token, space).start()
    await watcher.wait_for(lambda e: e.WhichOneof("event") == "snapshot")
    first_seq = watcher.events[0].sequence

    scheduled: list[str] = []

    async def schedule(n: int) -> CallResult:
        when = timestamp_pb2.Timestamp()
        when.FromSeconds(int(time.time() + timedelta(days=3).total_seconds()) + n)
        result = await api.call(
            "RoomsService.CreateSpace",
            token=host.token,
            space=rooms_res.Space(title=f"later {n}", scheduled_start_time=when),
            request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{host.id}/{n}")),
            timeout=3,
        )
        if result.ok:
            scheduled.append(result.response.space.name)
        return result

    raised = False

    async def toggle(n: int) -> CallResult:
        nonlocal raised
        method = "RoomsService.CancelSpeakRequest" if raised else "RoomsService.RequestToSpeak"
        result = await api.call(method, token=hand.token, name=f"spaces/{space}", timeout=3)
        if result.ok:
            raised = not raised
        return result

    # Scheduled Spaces count against the host's limit, so schedule slowly.
    async def schedule_slowly(n: int) -> CallResult:
        await asyncio.sleep(0.4)
        return await schedule(n)

    writers = [Writer("rooms schedule", schedule_slowly), Writer("rooms hand", toggle)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    await asyncio.sleep(1.5)
    before = await _stream_entries(stack, "spaces:events:rooms")

    down_at = time.monotonic()
    await asyncio.to_thread(stack.stop_valkey, save=True)
    await asyncio.sleep(3.0)
    await asyncio.to_thread(stack.start_valkey)
    back_at = time.monotonic()
    await asyncio.sleep(6.0)
    stop.set()
    await asyncio.gather(*tasks)
    # One more change: it must reach the watcher live.
    await api.ok("RoomsService.PinMessage", token=host.token, name=f"spaces/{space}", text="after")
    pinned = await watcher.wait_for(
        lambda e: e.WhichOneof("event") == "pinned_message_changed", timeout=15
    )
    await watcher.stop()

    # Notify consumed every scheduled Space exactly once (give its consumer time).
    async def inbox_complete() -> bool:
        listed = await api.ok(
            "NotifyService.ListNotifications",
            token=follower.token,
            parent=follower.name,
            page_size=100,
        )
        spaces = [n.space for n in listed.notifications if n.space in scheduled]
        return set(spaces) == set(scheduled)

    deadline = time.monotonic() + 20
    while not await inbox_complete() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    listed = await api.ok(
        "NotifyService.ListNotifications", token=follower.token, parent=follower.name, page_size=100
    )
    per_space: dict[str, int] = {}
    for note in listed.notifications:
        if note.space in scheduled:
            per_space[note.space] = per_space.get(note.space, 0) + 1

    after = await _stream_entries(stack, "spaces:events:rooms")
    seqs = [seq for seq, _, _ in after]
    ids = [event_id for _, event_id, _ in after]
    keys = [key for _, _, key in after]
    failures_down = sorted(
        {
            f"{w.name}: {c.name} {r}"
            for w in writers
            for t, c, r in w.failures
            if down_at <= t <= back_at
        }
    )
    recovery = [
        (w.name, (w.first_success_after(back_at) or float("inf")) - back_at) for w in writers
    ]
    print(
        f"\nvalkey restart: down {back_at - down_at:.1f} s; answers while down {failures_down};"
        f" writers recovered {[(n, round(s, 2)) for n, s in recovery]} s after Valkey returned;"
        f" outbox stream {len(before)} -> {len(after)} entries, {len(scheduled)} Spaces"
        f" scheduled, notifications per Space {sorted(set(per_space.values()))};"
        f" watcher events seq {first_seq}..{watcher.last_seq}, pin seen at seq {pinned.sequence}"
    )
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a hole in the outbox stream"
    assert len(ids) == len(set(ids)), "an outbox event was relayed twice"
    for name in scheduled:
        assert keys.count(name) == 1, f"{name}: {keys.count(name)} events in the stream"
        assert per_space.get(name) == 1, f"{name}: {per_space.get(name, 0)} notifications"
    durable = _durable_seqs(stack, space, first_seq)
    seen = {int(e.sequence) for e in watcher.events}
    assert not set(durable) - seen, f"events the watcher never got: {sorted(set(durable) - seen)}"
    for name, seconds in recovery:
        assert seconds <= 10.0, f"{name} did not recover within 10 s of Valkey's return"


def _durable_seqs(stack: Stack, space: str, after: int) -> list[int]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT seq FROM rooms.space_events WHERE space_id = %s AND seq > %s"
            " AND NOT ephemeral ORDER BY seq",
            (space, after),
        ).fetchall()
    return [int(r[0]) for r in rows]
