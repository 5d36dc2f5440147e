"""One Space's live events inside one replica: put in order, kept briefly, shared.

A :class:`SpaceFeed` receives the Space's events in whatever order Redis (or a repair read
from PostgreSQL) brings them, releases them strictly by sequence number with no gap and no
duplicate, and keeps the last ``capacity`` of them in a ring that every local watcher
reads with its own cursor. This is each watcher's bounded queue without the per-watcher
copy: an event costs the same whether 1 or 10,000 watchers follow the Space, and a
watcher whose cursor falls off the ring's tail is too slow.
"""

from __future__ import annotations

import asyncio
import logging
import time

from spaces.rooms.v1 import rooms_service_pb2

from services.rooms.live.codec import EncodedEvent
from services.rooms.live.metrics import DELIVERED, FEED_LAG

logger = logging.getLogger(__name__)

__all__ = ["FellBehind", "SpaceFeed"]

_RESPONSE_CACHE = 32


def _seconds(event: EncodedEvent) -> float:
    stamp = event.event.event_time
    return stamp.seconds + stamp.nanos / 1e9


_WAKE_CHUNK = 256


def _field_one(data: bytes) -> bytes:
    """``data`` as field 1 (length-delimited) of a message: tag, length, bytes."""
    size = len(data)
    prefix = bytearray(b"\x0a")
    while size > 0x7F:
        prefix.append((size & 0x7F) | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + data


class FellBehind(Exception):
    """The events a watcher needs next are no longer in the ring."""


class SpaceFeed:
    """Ordered delivery of one Space's events to the local watchers.

    :param space_id: the Space.
    :param next_seq: the first sequence number to deliver (the Space's last one + 1 when
        the first local watcher arrived).
    :param stream_id: the Redis stream entry to read after.
    :param capacity: events kept for watchers (how far one may fall behind).
    :param flush_interval_s: watchers are woken at most this often, so a burst of events
        goes out in few messages.
    """

    def __init__(
        self,
        space_id: str,
        next_seq: int,
        stream_id: bytes,
        *,
        capacity: int,
        flush_interval_s: float,
    ) -> None:
        self.space_id = space_id
        self.next_seq = next_seq
        self.known_max = next_seq - 1
        self.stream_id = stream_id
        self.watchers = 0
        self.closed = False
        self.end_seq: int | None = None
        self.repair: asyncio.Task[None] | None = None
        self._capacity = capacity
        self._flush_interval_s = flush_interval_s
        self._first_seq = next_seq
        self._ring: dict[int, EncodedEvent] = {}
        self._pending: dict[int, EncodedEvent] = {}
        self.generation = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._wake_handle: asyncio.TimerHandle | None = None
        self._responses: dict[tuple[int, int], rooms_service_pb2.WatchSpaceResponse] = {}
        self._encoded: dict[tuple[int, int], bytes] = {}

    async def wait(self, generation: int) -> None:
        """Return once the feed has changed since it was at ``generation``.

        Read :attr:`generation` before looking at the events, then wait with it: a change
        in between is not missed.
        """
        if generation != self.generation:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def offer(self, event: EncodedEvent) -> None:
        """Take an event in any order; duplicates and already delivered ones are ignored."""
        if event.seq < self.next_seq:
            return
        self.known_max = max(self.known_max, event.seq)
        self._pending[event.seq] = event
        released = 0
        while self.next_seq in self._pending:
            released_event = self._pending.pop(self.next_seq)
            if self.end_seq is None and released_event.kind == "space_ended":
                # Watchers stop after it; found once here, not once per watcher.
                self.end_seq = released_event.seq
            self._ring[self.next_seq] = released_event
            self.next_seq += 1
            released += 1
            FEED_LAG.observe(max(0.0, time.time() - _seconds(released_event)))
        if released:
            DELIVERED.inc(released * self.watchers)
            self._trim()
            self._schedule_wake()

    def note_last_seq(self, last_seq: int) -> None:
        """Record that events up to ``last_seq`` exist (committed), delivered or not."""
        self.known_max = max(self.known_max, last_seq)

    def missing(self) -> tuple[int, int] | None:
        """Return the first and last sequence number known to exist but not yet arrived."""
        if self.known_max < self.next_seq:
            return None
        return self.next_seq, self.known_max

    def skip_to(self, seq: int) -> None:
        """Give up on events before ``seq`` (no longer retained anywhere).

        Watchers that still needed them fall behind and end with a resumable error; they
        resume with a snapshot.
        """
        if seq <= self.next_seq:
            return
        logger.warning(
            "space %s: events %d..%d are lost; watchers before them restart",
            self.space_id,
            self.next_seq,
            seq - 1,
        )
        self._ring.clear()
        self._first_seq = seq
        self.next_seq = seq
        for stale in [s for s in self._pending if s < seq]:
            del self._pending[stale]
        pending = self._pending
        self._pending = {}
        for event in pending.values():
            self.offer(event)
        self._schedule_wake()

    def events_after(self, cursor: int) -> list[EncodedEvent]:
        """Return the delivered events after sequence ``cursor``, in order.

        :raises FellBehind: some of them already left the ring.
        """
        if cursor + 1 < self._first_seq:
            raise FellBehind(f"needs event {cursor + 1}, oldest kept is {self._first_seq}")
        return [self._ring[seq] for seq in range(cursor + 1, self.next_seq)]

    def response(self, events: list[EncodedEvent]) -> rooms_service_pb2.WatchSpaceResponse:
        """Return the message carrying ``events`` (a contiguous run), shared by every
        unfiltered watcher sending that same run."""
        key = (events[0].seq, events[-1].seq)
        response = self._responses.get(key)
        if response is None:
            response = rooms_service_pb2.WatchSpaceResponse(events=[e.event for e in events])
            if len(self._responses) >= _RESPONSE_CACHE:
                del self._responses[next(iter(self._responses))]
            self._responses[key] = response
        return response

    def encoded(self, events: list[EncodedEvent]) -> bytes:
        """Return the serialized message carrying ``events`` (a contiguous run), encoded
        once and shared by every unfiltered watcher sending that same run.

        Built from the events' own bytes: a ``WatchSpaceResponse`` is its repeated
        ``events`` field (number 1) and nothing else, so nothing is parsed or re-encoded.
        """
        key = (events[0].seq, events[-1].seq)
        data = self._encoded.get(key)
        if data is None:
            data = b"".join(_field_one(e.data) for e in events)
            if len(self._encoded) >= _RESPONSE_CACHE:
                del self._encoded[next(iter(self._encoded))]
            self._encoded[key] = data
        return data

    @staticmethod
    def encoded_alone(events: list[EncodedEvent]) -> bytes:
        """Return the serialized message carrying ``events`` (any subset, not shared)."""
        return b"".join(_field_one(e.data) for e in events)

    def close(self) -> None:
        """Stop: wake every watcher so it notices and ends."""
        self.closed = True
        if self.repair is not None:
            self.repair.cancel()
        if self._wake_handle is not None:
            self._wake_handle.cancel()
            self._wake_handle = None
        self._wake()

    def _trim(self) -> None:
        while len(self._ring) > self._capacity:
            del self._ring[self._first_seq]
            self._first_seq += 1

    def _schedule_wake(self) -> None:
        if self._wake_handle is not None:
            return
        if self._flush_interval_s <= 0:
            self._wake()
            return
        loop = asyncio.get_running_loop()
        self._wake_handle = loop.call_later(self._flush_interval_s, self._wake)

    def _wake(self) -> None:
        self._wake_handle = None
        self.generation += 1
        waiters, self._waiters = self._waiters, []
        self._release(waiters, 0)

    def _release(self, waiters: list[asyncio.Future[None]], start: int) -> None:
        # Thousands of watchers woken in one go would make one event-loop iteration long
        # enough to stall everything else (commits, Redis reads, the next events). Waking
        # them a chunk per iteration lets that work interleave.
        end = start + _WAKE_CHUNK
        for waiter in waiters[start:end]:
            if not waiter.done():
                waiter.set_result(None)
        if end < len(waiters):
            asyncio.get_running_loop().call_soon(self._release, waiters, end)
