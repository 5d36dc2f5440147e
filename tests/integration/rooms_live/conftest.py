"""Replicas of the live machinery on the test's own PostgreSQL database and Redis index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from psycopg import AsyncConnection
from spaces.rooms.v1 import rooms_events_pb2, rooms_resources_pb2, rooms_service_pb2

from services.common.auth import Principal
from services.common.db import Pool, create_pool
from services.common.migrations import Migration, apply_migrations
from services.common.redis import create_redis
from services.rooms.live import LiveHub, LiveSettings, SpaceEventLog

MIGRATION = Path(__file__).resolve().parents[3] / "services/rooms/migrations/0002_live_events.sql"
SPACE = "space-1"

SpaceEvent = rooms_events_pb2.SpaceEvent


def fast_settings(**overrides: object) -> LiveSettings:
    """Settings with short timers, so tests take milliseconds rather than seconds."""
    values: dict[str, object] = {
        "check_interval_s": 0.2,
        "gap_grace_s": 0.02,
        "flush_interval_s": 0.002,
        "prune_interval_s": 3600,
        "reaction_window_s": 0.1,
        "speaking_levels_interval_s": 0.1,
        "resume_token_secret": "test-secret-test-secret-test-secret",
    }
    values.update(overrides)
    return LiveSettings(**values)  # type: ignore[arg-type]


@dataclass
class Replica:
    """One rooms process's share of the machinery: its own pool, Redis client, log, hub."""

    pool: Pool
    log: SpaceEventLog
    hub: LiveHub
    closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)

    async def append(self, space_id: str, event: SpaceEvent) -> int:
        """Append ``event`` in a transaction of its own."""
        async with self.pool.connection() as conn, conn.transaction():
            return await self.log.append(conn, space_id, event)

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()
        self.closers.clear()


ReplicaFactory = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def migrated(database_url: str) -> str:
    """The test database with the live tables (0002 alone: it must not need 0001)."""
    async with await AsyncConnection.connect(database_url) as conn:
        await apply_migrations(conn, "rooms", [Migration.from_file(MIGRATION)])
    return database_url


@pytest.fixture
async def new_replica(migrated: str, redis_url: str) -> AsyncIterator[ReplicaFactory]:
    """Start replicas (all closed after the test)."""
    replicas: list[Replica] = []

    async def start(*, started: bool = True, settings: LiveSettings | None = None) -> Replica:
        settings = settings or fast_settings()
        pool = await create_pool(migrated, "rooms", min_size=1, max_size=6, timeout_s=10)
        redis = create_redis(redis_url)
        log = SpaceEventLog(pool, redis, settings)
        hub = LiveHub(pool, redis, settings, event_log=log)
        replica = Replica(pool, log, hub)
        replica.closers += [pool.close, redis.aclose]
        if started:
            await log.start()
            await hub.start()
            replica.closers += [log.stop, hub.stop]
        replicas.append(replica)
        return replica

    yield start
    for replica in replicas:
        await replica.close()


async def snapshot_of(space_id: str, principal: Principal | None) -> SpaceEvent.Snapshot:
    """A stand-in for the api layer's snapshot."""
    del principal
    return SpaceEvent.Snapshot(
        space=rooms_resources_pb2.Space(
            name=f"spaces/{space_id}", state=rooms_resources_pb2.SPACE_STATE_LIVE
        )
    )


def joined(n: int) -> SpaceEvent:
    """A distinguishable durable event."""
    return SpaceEvent(
        participant_joined=SpaceEvent.ParticipantJoined(
            participant=rooms_resources_pb2.Participant(
                name=f"spaces/{SPACE}/participants/u{n}", user=f"users/u{n}"
            )
        )
    )


def ended() -> SpaceEvent:
    return SpaceEvent(
        space_ended=SpaceEvent.SpaceEnded(
            space=rooms_resources_pb2.Space(
                name=f"spaces/{SPACE}", state=rooms_resources_pb2.SPACE_STATE_ENDED
            )
        )
    )


class Watcher:
    """Consumes a watch stream in the background, keeping every event it gets."""

    def __init__(self, stream: AsyncIterator[rooms_service_pb2.WatchSpaceResponse]) -> None:
        self.stream = stream
        self.events: list[SpaceEvent] = []
        self.responses = 0
        self.error: BaseException | None = None
        self._arrived = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for response in self.stream:
                self.responses += 1
                self.events.extend(response.events)
                self._arrived.set()
        except Exception as error:
            self.error = error
            self._arrived.set()

    def live(self) -> list[SpaceEvent]:
        """The events after the first (snapshot) one."""
        return [e for e in self.events if e.WhichOneof("event") != "snapshot"]

    async def wait_for(self, predicate: Callable[[Watcher], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self.error is not None:
                    raise AssertionError(f"the stream failed: {self.error!r}")
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_count(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` events arrived (snapshot included)."""
        await self.wait_for(lambda w: len(w.events) >= count, timeout)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.stream.aclose()  # type: ignore[attr-defined]
