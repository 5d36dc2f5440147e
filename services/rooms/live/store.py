"""The SQL of the event log (tables from migration ``0002_live_events.sql``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from services.common.db import Pool

logger = logging.getLogger(__name__)

__all__ = ["EventStore", "StoredEvent", "Tail"]

# One round trip: bump the Space's counter (its row lock serializes the Space's writers
# until commit), store the event under the new number, and queue a notification that
# PostgreSQL delivers only if and when the transaction commits.
_APPEND = """
WITH counter AS (
    INSERT INTO space_event_counters AS c (space_id, last_seq) VALUES (%(space)s, 1)
    ON CONFLICT (space_id) DO UPDATE SET last_seq = c.last_seq + 1
    RETURNING last_seq
), stored AS (
    INSERT INTO space_events (space_id, seq, body, event_time, ephemeral)
    SELECT %(space)s, last_seq, %(body)s, %(time)s, %(ephemeral)s FROM counter
    RETURNING seq
)
SELECT seq, pg_notify(%(channel)s, %(payload)s || ':' || seq) FROM stored
"""

# The counter and the events after a position, read in one statement (one snapshot), so
# "the log ends at last_seq" and "these are the events up to it" agree.
_TAIL = """
SELECT c.last_seq, e.seq, e.ephemeral, e.body, e.event_time
FROM space_event_counters c
LEFT JOIN LATERAL (
    SELECT seq, ephemeral, CASE WHEN %(with_ephemeral)s OR NOT ephemeral THEN body END AS body,
           event_time
    FROM space_events
    WHERE space_id = c.space_id AND seq > %(after)s
    ORDER BY seq
) e ON true
WHERE c.space_id = %(space)s
ORDER BY e.seq
"""

_RANGE = """
SELECT seq, ephemeral, body, event_time FROM space_events
WHERE space_id = %s AND seq >= %s AND seq <= %s
ORDER BY seq
"""

_LAST_SEQS = "SELECT space_id, last_seq FROM space_event_counters WHERE space_id = ANY(%s)"

_PRUNE = """
DELETE FROM space_events WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM space_events WHERE event_time < %s LIMIT %s
))
"""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One row of ``space_events``.

    :ivar seq: sequence number.
    :ivar ephemeral: a reaction or speaking-levels event.
    :ivar body: the event without header fields; ``None`` when not asked for.
    :ivar event_time: when it was appended.
    """

    seq: int
    ephemeral: bool
    body: bytes | None
    event_time: datetime


@dataclass(frozen=True, slots=True)
class Tail:
    """A Space's log after some position, as of one moment.

    :ivar last_seq: the last sequence number handed out (0: no event yet).
    :ivar events: the retained events after the position, in order.
    """

    last_seq: int
    events: list[StoredEvent]

    def complete_after(self, after: int) -> bool:
        """Whether every event after ``after`` up to ``last_seq`` is still retained."""
        if after > self.last_seq:
            return False
        expected = range(after + 1, self.last_seq + 1)
        return len(self.events) == len(expected) and all(
            e.seq == s for e, s in zip(self.events, expected, strict=True)
        )


class EventStore:
    """Reads and writes the event tables through the service's pool.

    :param pool: the rooms pool (``search_path`` on the rooms schema).
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @staticmethod
    async def append(
        conn: AsyncConnection[Any],
        *,
        space_id: str,
        body: bytes,
        event_time: datetime,
        ephemeral: bool,
        channel: str,
        payload: str,
    ) -> int:
        """Store an event in ``conn``'s transaction; return its sequence number.

        The commit notifies ``channel`` with ``payload:seq``.
        """
        cursor = await conn.execute(
            _APPEND,
            {
                "space": space_id,
                "body": body,
                "time": event_time,
                "ephemeral": ephemeral,
                "channel": channel,
                "payload": payload,
            },
        )
        row = await cursor.fetchone()
        if row is None:  # pragma: no cover - the INSERT always returns its row
            raise RuntimeError("appending a space event returned nothing")
        return int(row[0])

    async def tail(self, space_id: str, after: int, *, with_ephemeral: bool = False) -> Tail:
        """Return the counter and every retained event after ``after``.

        :param with_ephemeral: include the bodies of ephemeral events (their rows are
            always listed, so :meth:`Tail.complete_after` sees no false holes).
        """
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                _TAIL, {"space": space_id, "after": after, "with_ephemeral": with_ephemeral}
            )
            rows = await cursor.fetchall()
        if not rows:
            return Tail(0, [])
        events = [
            StoredEvent(int(seq), bool(eph), bytes(body) if body is not None else None, time)
            for _last, seq, eph, body, time in rows
            if seq is not None
        ]
        return Tail(int(rows[0][0]), events)

    async def last_seq(self, space_id: str) -> int:
        """Return the last sequence number of ``space_id`` (0 before its first event)."""
        return (await self.last_seqs([space_id])).get(space_id, 0)

    async def last_seqs(self, space_ids: list[str]) -> dict[str, int]:
        """Return the last sequence number of each Space that has events."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_LAST_SEQS, (space_ids,))
            return {space: int(last) for space, last in await cursor.fetchall()}

    async def read_range(self, space_id: str, first: int, last: int) -> list[StoredEvent]:
        """Return the retained events ``first..last`` (inclusive), in order."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_RANGE, (space_id, first, last))
            rows = await cursor.fetchall()
        return [StoredEvent(int(s), bool(e), bytes(b), t) for s, e, b, t in rows]

    async def prune(self, older_than: datetime, *, batch: int = 5000) -> int:
        """Delete events appended before ``older_than``; return how many.

        Deletes in batches, each its own short transaction, so pruning never holds many
        locks or blocks writers for long.
        """
        total = 0
        while True:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_PRUNE, (older_than, batch))
                deleted = cursor.rowcount
            total += deleted
            if deleted < batch:
                return total
