"""The durable, totally ordered event log of every Space, and the way into it.

Every live change of a Space is appended here inside the transaction that makes the
change (see :meth:`SpaceEventLog.append`); the log gives it the Space's next sequence
number, stores it, and once the transaction commits publishes it to the Space's Redis
stream, from which every replica's :class:`~services.rooms.live.hub.LiveHub` fans it out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, timedelta
from typing import Any

import redis.asyncio
from psycopg import AsyncConnection
from spaces.rooms.v1 import rooms_events_pb2, rooms_resources_pb2

from services.common.db import Pool
from services.common.tasks import reraise_if_cancelling, stop_tasks
from services.rooms.live.coalesce import ReactionCoalescer, SpeakingLevelsCoalescer
from services.rooms.live.codec import EPHEMERAL_KINDS, event_kind, split_body, utc_now
from services.rooms.live.metrics import APPENDED
from services.rooms.live.publisher import CommitListener, CommitPublisher
from services.rooms.live.settings import LiveSettings
from services.rooms.live.store import EventStore
from services.rooms.live.tokens import ResumeTokens

logger = logging.getLogger(__name__)

__all__ = ["SpaceEventLog", "resume_tokens"]


def resume_tokens(settings: LiveSettings) -> ResumeTokens:
    """Return the resume-token codec ``settings`` configure (same on every replica)."""
    secret = settings.resume_token_secret
    return ResumeTokens(secret.get_secret_value().encode() if secret is not None else None)


class SpaceEventLog:
    """Appends events to Spaces' ordered logs and publishes them once committed.

    Call :meth:`start` before appending (it subscribes to commit notifications) and
    :meth:`stop` at shutdown (it flushes the coalescers).

    :param pool: the rooms pool.
    :param redis: client for the fan-out streams.
    :param settings: live settings; read from the environment by default.
    :param conninfo: database for the commit listener; the pool's by default.
    """

    def __init__(
        self,
        pool: Pool,
        redis: redis.asyncio.Redis,
        settings: LiveSettings | None = None,
        *,
        conninfo: str | None = None,
    ) -> None:
        self.settings = settings or LiveSettings()
        self.tokens = resume_tokens(self.settings)
        self._pool = pool
        self._store = EventStore(pool)
        if conninfo is None:
            if not isinstance(pool.conninfo, str):
                raise ValueError("pass conninfo when the pool's is computed")
            conninfo = pool.conninfo
        self._publisher = CommitPublisher(conninfo, redis, self.settings, self.tokens)
        self._reactions = ReactionCoalescer(self._append_alone, self.settings.reaction_window_s)
        self._levels = SpeakingLevelsCoalescer(
            self._append_alone, self.settings.speaking_levels_interval_s
        )
        self._pruner: asyncio.Task[None] | None = None

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Hand each event this replica appends to ``listener`` as soon as it commits.

        :class:`~services.rooms.live.hub.LiveHub` uses it so local watchers need not wait
        for the Redis round trip; events of other replicas still come through Redis.
        """
        self._publisher.add_listener(listener)

    async def start(self) -> None:
        """Start publishing committed events and pruning old ones."""
        await self._publisher.start()
        if self._pruner is None:
            self._pruner = asyncio.create_task(self._prune_forever(), name="live prune")

    async def stop(self) -> None:
        """Append what the coalescers hold, publish it, and stop."""
        await self._reactions.flush()
        await self._levels.flush()
        if self._pruner is not None:
            await stop_tasks([self._pruner])
            self._pruner = None
        # Give the last commits' notifications a moment to arrive before closing.
        await asyncio.sleep(0.05)
        await self._publisher.stop()

    async def append(
        self, conn: AsyncConnection[Any], space_id: str, event: rooms_events_pb2.SpaceEvent
    ) -> int:
        """Append ``event`` to ``space_id``'s log in ``conn``'s open transaction.

        Sets ``event.sequence``, ``event.resume_token`` and ``event.event_time`` (kept
        when the caller set it). The event reaches watchers after the transaction commits,
        and never if it rolls back. Until then, the Space's other writers (on any replica)
        wait at this call: keep the rest of the transaction short.

        :param conn: a connection of the rooms pool inside a transaction (autocommit works
            too: the event is then committed at once).
        :param space_id: the Space's id (not its resource name).
        :param event: the change; its ``oneof event`` must be set.
        :return: the event's sequence number.
        """
        kind = event_kind(event)
        if not kind:
            raise ValueError("a SpaceEvent needs its oneof event set")
        if event.HasField("event_time"):
            event_time = event.event_time.ToDatetime(tzinfo=UTC)  # microsecond precision
        else:
            event_time = utc_now()
        body = split_body(event)
        ticket, payload = self._publisher.hold(space_id, body, event_time)
        try:
            seq = await EventStore.append(
                conn,
                space_id=space_id,
                body=body,
                event_time=event_time,
                ephemeral=kind in EPHEMERAL_KINDS,
                channel=self._publisher.channel,
                payload=payload,
            )
        except BaseException:
            self._publisher.release(ticket)
            raise
        APPENDED.labels(kind).inc()
        event.sequence = seq
        event.resume_token = self.tokens.encode(space_id, seq)
        event.event_time.FromDatetime(event_time)
        return seq

    async def add_reaction(
        self, space_id: str, user_id: str, emoji: rooms_resources_pb2.Emoji.ValueType
    ) -> None:
        """Count a reaction; watchers get the window's counts as one ``reactions`` event.

        :param user_id: who reacted; the caller rate-limits per user before calling.
        """
        del user_id  # counts are anonymous; kept in the signature for per-user limits
        self._reactions.add(space_id, emoji)

    async def add_speaking_levels(
        self, space_id: str, levels: Sequence[rooms_resources_pb2.SpeakingLevel]
    ) -> None:
        """Report the current levels; watchers get the latest a few times a second."""
        self._levels.add(space_id, levels)

    async def _append_alone(self, space_id: str, event: rooms_events_pb2.SpaceEvent) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await self.append(conn, space_id, event)

    async def prune(self) -> int:
        """Delete events older than the retention period; return how many."""
        horizon = utc_now() - timedelta(seconds=self.settings.retention_s)
        return await self._store.prune(horizon)

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.prune_interval_s)
            try:
                deleted = await self.prune()
                if deleted:
                    logger.info("pruned %d live events", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.exception("pruning live events failed")
