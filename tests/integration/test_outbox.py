"""The transactional outbox and its relay against real PostgreSQL and Valkey: every event
reaches the stream exactly once, in commit order, across crashes, restarts and races."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from spaces.testing.v1 import testing_service_pb2 as pb

from services.common import outbox
from services.common.db import Pool, create_pool
from services.common.events import StreamConsumer, StreamEvent, stream_name
from services.common.migrations import migrate

SCHEMA = "rooms"
STREAM = stream_name("rooms")


class Crash(Exception):
    """Stands for the process dying at a chosen point."""


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    await migrate(database_url, SCHEMA, None)
    pool = await create_pool(database_url, SCHEMA, min_size=1, max_size=8, timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()


def new_relay(database_url: str, client: redis.asyncio.Redis) -> outbox.OutboxRelay:
    return outbox.OutboxRelay(
        database_url,
        SCHEMA,
        client,
        "rooms",
        batch_size=7,  # small, so every test spans several batches
        poll_interval_s=0.05,
        retry_interval_s=0.05,
    )


async def produce(pool: Pool, producer: int, count: int, *, per_tx: int = 1) -> None:
    """Append ``count`` events numbered producer*1000 + i, ``per_tx`` per transaction."""
    for start in range(0, count, per_tx):
        async with pool.connection() as conn, conn.transaction():
            for i in range(start, min(start + per_tx, count)):
                await outbox.append(
                    conn,
                    "thing.counted",
                    f"things/{producer}",
                    pb.CountResponse(value=producer * 1000 + i),
                )


async def stream_events(client: redis.asyncio.Redis) -> list[StreamEvent]:
    entries = await client.xrange(STREAM)
    return [StreamEvent.from_entry(stream_id, fields) for stream_id, fields in entries]


async def wait_for_events(client: redis.asyncio.Redis, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while await client.xlen(STREAM) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {await client.xlen(STREAM)} of {count} events arrived")
        await asyncio.sleep(0.02)


async def outbox_rows(pool: Pool) -> int:
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT count(*) FROM outbox")
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


def assert_exactly_once_in_order(events: list[StreamEvent], expected: dict[int, int]) -> None:
    """Each producer's events all arrived once, in the order produced; ids count up from 1."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.stream_id.endswith("-1") for e in events)
    assert len({e.event_id for e in events}) == len(events)
    values = [e.unpack(pb.CountResponse).value for e in events]
    for producer, count in expected.items():
        mine = [v - producer * 1000 for v in values if v // 1000 == producer]
        assert mine == list(range(count)), f"producer {producer}: {mine}"
    assert len(values) == sum(expected.values())


async def test_relay_delivers_every_event_once_in_order(
    database_url: str, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    relay = new_relay(database_url, redis_client)
    relay.start()
    try:
        await asyncio.gather(*(produce(pool, p, 20, per_tx=p + 1) for p in range(4)))
        await wait_for_events(redis_client, 80)
    finally:
        await relay.stop()
    events = await stream_events(redis_client)
    assert_exactly_once_in_order(events, {p: 20 for p in range(4)})
    first = events[0]
    assert (first.type, first.payload_type) == ("thing.counted", "spaces.testing.v1.CountResponse")
    assert first.key.startswith("things/")
    assert await outbox_rows(pool) == 0


async def test_commit_wakes_the_relay(
    database_url: str, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    relay = outbox.OutboxRelay(database_url, SCHEMA, redis_client, "rooms", poll_interval_s=30)
    relay.start()
    try:
        await asyncio.sleep(0.2)  # let it take the lock and go idle
        started = time.monotonic()
        await produce(pool, 0, 1)
        await wait_for_events(redis_client, 1, timeout=5)
        # Far sooner than the 30 s poll: the NOTIFY sent at commit woke it.
        assert time.monotonic() - started < 2
    finally:
        await relay.stop()


async def test_relay_restart_picks_up_where_it_stopped(
    database_url: str, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    relay = new_relay(database_url, redis_client)
    relay.start()
    await produce(pool, 0, 10)
    await wait_for_events(redis_client, 10)
    await relay.stop()
    await produce(pool, 0, 0)
    await produce(pool, 1, 15)  # written while no relay runs
    relay = new_relay(database_url, redis_client)
    relay.start()
    try:
        await wait_for_events(redis_client, 25)
    finally:
        await relay.stop()
    assert_exactly_once_in_order(await stream_events(redis_client), {0: 10, 1: 15})


async def relay_connection(database_url: str) -> AsyncConnection[TupleRow]:
    conn = await AsyncConnection.connect(database_url, autocommit=True)
    await conn.execute(f"SET search_path TO {SCHEMA}")
    return conn


@pytest.mark.parametrize("crash_in", ["_publish", "_forget"])
async def test_crash_between_steps_loses_and_duplicates_nothing(
    database_url: str,
    pool: Pool,
    redis_client: redis.asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    crash_in: str,
) -> None:
    caplog.set_level(logging.INFO, logger="services.common.outbox")
    await produce(pool, 0, 10)
    crashing = new_relay(database_url, redis_client)
    if crash_in == "_publish":
        # Rows sequenced and committed, nothing sent.
        monkeypatch.setattr(crashing, "_publish", _raise_crash)
    else:
        # Rows sent to Redis, not yet deleted: the re-send must be a no-op.
        async def forget_then_crash(*args: object) -> None:
            raise Crash()

        monkeypatch.setattr(crashing, "_forget", forget_then_crash)
    conn = await relay_connection(database_url)
    try:
        with pytest.raises(Crash):
            await crashing.relay_batch(conn)
    finally:
        await conn.close()
    assert await redis_client.xlen(STREAM) == (7 if crash_in == "_forget" else 0)

    await produce(pool, 1, 5)
    relay = new_relay(database_url, redis_client)
    relay.start()
    try:
        await wait_for_events(redis_client, 15)
        await asyncio.sleep(0.2)  # would any duplicate show up?
    finally:
        await relay.stop()
    assert_exactly_once_in_order(await stream_events(redis_client), {0: 10, 1: 5})
    assert await outbox_rows(pool) == 0
    resent = [r for r in caplog.records if "was already in" in r.getMessage()]
    assert len(resent) == (7 if crash_in == "_forget" else 0)


async def _raise_crash(*args: object) -> None:
    raise Crash()


async def test_two_relays_racing(
    database_url: str, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    relays = [new_relay(database_url, redis_client) for _ in range(2)]
    for relay in relays:
        relay.start()
    try:
        await asyncio.gather(*(produce(pool, p, 25, per_tx=3) for p in range(3)))
        await wait_for_events(redis_client, 75)
    finally:
        for relay in relays:
            await relay.stop()
    assert_exactly_once_in_order(await stream_events(redis_client), {p: 25 for p in range(3)})


async def test_relay_batches_without_the_lock_still_never_duplicate(
    database_url: str, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    # As if two relays both believed they held the lock (e.g. across a network split).
    producers = asyncio.gather(*(produce(pool, p, 30, per_tx=2) for p in range(2)))
    conns = [await relay_connection(database_url) for _ in range(2)]
    relays = [new_relay(database_url, redis_client) for _ in range(2)]
    try:
        while not producers.done() or await outbox_rows(pool):
            await asyncio.gather(*(r.relay_batch(c) for r, c in zip(relays, conns, strict=True)))
        await producers
    finally:
        for conn in conns:
            await conn.close()
    assert_exactly_once_in_order(await stream_events(redis_client), {0: 30, 1: 30})


async def test_event_rolled_back_with_its_transaction(
    database_url: str, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    with pytest.raises(Crash):
        async with pool.connection() as conn, conn.transaction():
            await outbox.append(conn, "thing.counted", "things/0", pb.CountResponse(value=1))
            raise Crash()
    assert await outbox_rows(pool) == 0


async def test_consumer_group_handles_each_event_and_retries_failures(
    database_url: str, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    await produce(pool, 0, 12)
    relay = new_relay(database_url, redis_client)
    relay.start()
    try:
        await wait_for_events(redis_client, 12)
    finally:
        await relay.stop()

    handled: list[int] = []
    failed_once: set[int] = set()

    async def handler(event: StreamEvent) -> None:
        value = event.unpack(pb.CountResponse).value
        if value == 5 and value not in failed_once:
            failed_once.add(value)
            raise RuntimeError("transient")
        handled.append(value)

    consumers = [
        StreamConsumer(
            redis_client,
            STREAM,
            "notify",
            f"notify-{i}",
            handler,
            batch_size=4,
            block_ms=20,
            claim_idle_ms=50,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 5
    while len(handled) < 12 and time.monotonic() < deadline:
        for consumer in consumers:
            await consumer.poll()
        await asyncio.sleep(0.02)
    assert sorted(handled) == list(range(12))
    assert failed_once == {5}
    pending = await redis_client.xpending(STREAM, "notify")
    assert pending["pending"] == 0
