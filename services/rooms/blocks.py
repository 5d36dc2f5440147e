"""Identity's block answers on the join/watch path, kept briefly and dropped when they change.

Every GetSpace, JoinSpace, WatchSpace and moderation call asks whether there is a block
between the Space's host and the caller. Asking identity each time costs a gRPC round trip
and a query, and a popular Space gets the same question from the same people over and over
(rejoins, reconnecting watchers). :class:`BlockCache` keeps each (host, user) answer for a
short TTL and drops it as soon as identity announces a block or an unblock between the two
(``user.blocked`` / ``user.unblocked`` on identity's event stream, which every replica
tails on its own). Staleness is therefore bounded twice over: normally by how long that
event takes to arrive (milliseconds), and by the TTL if the stream is late or unreadable
(the whole cache is dropped when reading it fails, since an event may have been missed).

An answer that was being fetched while an invalidation arrived is not kept: it may predate
the block.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis.asyncio
from spaces.identity.v1 import identity_events_pb2

from services.common.events import StreamEvent, stream_name
from services.common.tasks import reraise_if_cancelling, stop_tasks
from services.rooms.clients import Identity

logger = logging.getLogger(__name__)

__all__ = ["BlockCache"]

_BLOCK_MS = 5000
_RETRY_S = 1.0
_EVENTS: dict[
    str, type[identity_events_pb2.UserBlockedEvent | identity_events_pb2.UserUnblockedEvent]
] = {
    "user.blocked": identity_events_pb2.UserBlockedEvent,
    "user.unblocked": identity_events_pb2.UserUnblockedEvent,
}


class BlockCache:
    """Caches "is there a block between host and user" (either direction).

    :param identity: the identity client asked on a miss.
    :param redis: where identity's event stream is read (None: TTL only).
    :param ttl_s: how long an answer is reused; 0 disables the cache.
    :param max_size: pairs kept (least recently stored dropped first).
    :param clock: monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        identity: Identity,
        redis: redis.asyncio.Redis | None,
        *,
        ttl_s: float,
        max_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._identity = identity
        self._redis = redis
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._clock = clock
        self._answers: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self._position = b"$"
        self.hits = 0
        self.misses = 0

    async def start(self) -> None:
        """Start following identity's blocks (once this returns, none is missed)."""
        if self._redis is None or self._task is not None or self._ttl_s <= 0:
            return
        newest: Any = await self._redis.xrevrange(stream_name("identity"), count=1)
        self._position = newest[0][0] if newest else b"0-0"
        self._task = asyncio.create_task(self._follow_forever(), name="rooms block cache")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None

    async def blocked(self, host_id: str, user_id: str) -> bool:
        """Whether either of the two blocks the other."""
        if self._ttl_s <= 0:
            return bool(await self._identity.blocked_between(host_id, [user_id]))
        key = _key(host_id, user_id)
        now = self._clock()
        cached = self._answers.get(key)
        if cached is not None and cached[1] > now:
            self.hits += 1
            return cached[0]
        self.misses += 1
        generation = self._generation
        answer = bool(await self._identity.blocked_between(host_id, [user_id]))
        if generation == self._generation:
            self._answers[key] = (answer, self._clock() + self._ttl_s)
            self._answers.move_to_end(key)
            while len(self._answers) > self._max_size:
                self._answers.popitem(last=False)
        return answer

    def forget(self, one: str, other: str) -> None:
        """Drop what is known about a pair (a block or unblock between them)."""
        self._generation += 1
        self._answers.pop(_key(one, other), None)

    def clear(self) -> None:
        """Drop everything (invalidations may have been missed)."""
        self._generation += 1
        self._answers.clear()

    async def _follow_forever(self) -> None:
        assert self._redis is not None
        key = stream_name("identity")
        while True:
            try:
                response: Any = await self._redis.xread(
                    {key: self._position}, count=500, block=_BLOCK_MS
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.warning("reading identity's events failed; dropping the block cache")
                self.clear()
                await asyncio.sleep(_RETRY_S)
                continue
            for _, entries in response or []:
                for entry_id, fields in entries:
                    self._position = entry_id
                    self._apply(entry_id, fields)

    def _apply(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        kind = fields.get(b"type", b"").decode()
        message_type = _EVENTS.get(kind)
        if message_type is None:
            return
        event: identity_events_pb2.UserBlockedEvent | identity_events_pb2.UserUnblockedEvent
        try:
            event = StreamEvent.from_entry(entry_id, fields).unpack(message_type)
        except Exception:
            logger.warning("unreadable %s event; dropping the block cache", kind, exc_info=True)
            self.clear()
            return
        self.forget(event.blocker_id, event.blocked_id)


def _key(one: str, other: str) -> tuple[str, str]:
    return (one, other) if one <= other else (other, one)
