"""Publishing committed events to Redis, and never an event that was rolled back.

:meth:`SpaceEventLog.append` runs inside the caller's transaction, which may still roll
back, so it cannot publish. Instead the append statement queues ``pg_notify`` with a
payload naming this replica, a local ticket and the sequence number; PostgreSQL delivers
notifications only when (and in the order) transactions commit. The
:class:`CommitPublisher` of the replica that appended listens on its own connection, looks
the ticket up among the events it kept in memory and XADDs the event to the Space's
stream. Rolled-back appends are never notified; their tickets expire.

Publishing is best effort: a notification lost while the listener reconnects, or an event
lost because the process died right after commit, is read back from PostgreSQL by every
hub's periodic check (see :mod:`services.rooms.live.hub`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import redis.asyncio
from psycopg import AsyncConnection, sql

from services.common.tasks import reraise_if_cancelling, stop_tasks
from services.rooms.live.codec import assemble, stream_key
from services.rooms.live.metrics import PUBLISH_FAILURES, PUBLISHED
from services.rooms.live.settings import LiveSettings
from services.rooms.live.tokens import ResumeTokens

logger = logging.getLogger(__name__)

__all__ = ["CommitListener", "CommitPublisher", "notify_channel"]

CommitListener = Callable[[str, int, bytes], None]
"""``(space_id, seq, data)``: told of each of this replica's events as it commits."""

_TICKET_TTL_S = 120.0
_RECONNECT_S = 1.0


def notify_channel(schema: str) -> str:
    """Return the LISTEN/NOTIFY channel of committed live events in ``schema``."""
    return f"{schema}_live"


@dataclass(frozen=True, slots=True)
class _Pending:
    space_id: str
    body: bytes
    event_time: datetime
    created: float


class CommitPublisher:
    """Sends this replica's committed events to Redis (see the module docs).

    :param conninfo: libpq URI or DSN; the publisher keeps one connection to LISTEN.
    :param redis: client for the fan-out streams.
    :param settings: stream length and expiry, schema.
    :param tokens: mints the resume tokens put into published events.
    """

    def __init__(
        self,
        conninfo: str,
        redis: redis.asyncio.Redis,
        settings: LiveSettings,
        tokens: ResumeTokens,
    ) -> None:
        self._conninfo = conninfo
        self._redis = redis
        self._settings = settings
        self._tokens = tokens
        self.channel = notify_channel(settings.schema_name)
        self._replica = uuid.uuid4().hex[:12]
        self._tickets = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._ready: list[tuple[str, int, bytes]] = []
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[CommitListener] = []

    def add_listener(self, listener: CommitListener) -> None:
        """Also hand each committed event to ``listener`` (the local hub), at once."""
        self._listeners.append(listener)

    def hold(self, space_id: str, body: bytes, event_time: datetime) -> tuple[int, str]:
        """Keep an event until its commit is announced; return its ticket and the payload
        the append statement must notify (``:seq`` is added by the statement)."""
        ticket = next(self._tickets)
        self._pending[ticket] = _Pending(space_id, body, event_time, time.monotonic())
        return ticket, f"{self._replica}:{ticket}"

    def release(self, ticket: int) -> None:
        """Forget a held event whose append statement failed."""
        self._pending.pop(ticket, None)

    async def start(self, *, wait: bool = True) -> None:
        """Start listening and publishing.

        :param wait: return only once the listener is subscribed (so no commit after this
            call is missed).
        """
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="live commit listener"),
            asyncio.create_task(self._publish_forever(), name="live publisher"),
        ]
        if wait:
            await self._listening.wait()

    async def stop(self) -> None:
        """Publish what is ready, then stop."""
        if self._ready:
            try:
                await self._publish(self._take_ready())
            except Exception:
                logger.exception("publishing the last live events failed")
        await stop_tasks(self._tasks)
        self._tasks = []

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with await AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self._listening.set()
                    async for notify in conn.notifies():
                        self._on_commit(notify.payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                # Commits announced meanwhile are recovered by the hubs' periodic check.
                logger.exception("live commit listener failed; reconnecting")
                await asyncio.sleep(_RECONNECT_S)

    def _on_commit(self, payload: str) -> None:
        replica, _, rest = payload.partition(":")
        if replica != self._replica:
            return  # another replica's event: that replica publishes it
        ticket_text, _, seq_text = rest.partition(":")
        held = self._pending.pop(int(ticket_text), None)
        if held is None:
            return
        seq = int(seq_text)
        PUBLISHED.inc()
        data = assemble(self._tokens, held.space_id, seq, held.event_time, held.body)
        self._ready.append((held.space_id, seq, data))
        self._wake.set()
        for listener in self._listeners:
            try:
                listener(held.space_id, seq, data)
            except Exception:
                logger.exception("a local commit listener failed")

    def _take_ready(self) -> list[tuple[str, int, bytes]]:
        ready, self._ready = self._ready, []
        return ready

    async def _publish_forever(self) -> None:
        last_sweep = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=10.0)
            except TimeoutError:
                pass
            self._wake.clear()
            ready = self._take_ready()
            if ready:
                try:
                    await self._publish(ready)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    reraise_if_cancelling()
                    # Best effort: watchers get these from PostgreSQL after the next check.
                    logger.exception("publishing %d live events failed", len(ready))
                    PUBLISH_FAILURES.inc(len(ready))
            if time.monotonic() - last_sweep > _TICKET_TTL_S / 2:
                last_sweep = time.monotonic()
                self._sweep()

    async def _publish(self, ready: list[tuple[str, int, bytes]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for space_id, seq, data in ready:
            key = stream_key(space_id)
            pipe.xadd(
                key,
                {"seq": str(seq), "data": data},
                maxlen=self._settings.stream_max_len,
                approximate=True,
            )
            pipe.expire(key, self._settings.stream_ttl_s)
        await pipe.execute()

    def _sweep(self) -> None:
        # Held events whose transaction rolled back (or whose notification was lost).
        horizon = time.monotonic() - _TICKET_TTL_S
        stale = [t for t, p in self._pending.items() if p.created < horizon]
        for ticket in stale:
            del self._pending[ticket]
        if stale:
            logger.debug("dropped %d live events never committed", len(stale))
