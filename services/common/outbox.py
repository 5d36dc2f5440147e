"""Transactional outbox: events commit with the change they describe, then reach Redis.

:func:`append` writes an event row in the caller's transaction, so an event exists exactly
when its change does. :class:`OutboxRelay` moves rows to the service's stream
(``spaces:events:<service>``) without losing, duplicating or reordering any:

1. Only one relay per service works at a time: it holds a session advisory lock; the
   others wait for it (and take over when its connection dies).
2. In one transaction it gives the rows not yet sequenced the next numbers of a counter that
   never goes back (``outbox_relay_state``), in id order, and commits. Sequence numbers thus
   follow the order in which rows became visible; row ids alone would not do, since a
   transaction may commit after one that started later.
3. It appends each sequenced row with the explicit stream id ``<seq>-1``. Redis refuses an
   id at or below the stream's last one, so re-sending a row after a crash is a detected
   no-op rather than a duplicate.
4. It deletes the rows it sent.

A crash after 2 or 3 leaves sequenced rows that the next relay re-sends; 3 makes that safe.
Even two relays running at once (lock lost on a network split) cannot reorder or duplicate:
both send the same rows with the same ids, each in sequence order.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis.asyncio
from google.protobuf.message import Message
from opentelemetry import propagate
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow
from redis.exceptions import ResponseError

from services.common.db import schema_identifier
from services.common.events import stream_name
from services.common.tasks import reraise_if_cancelling, stop_tasks

logger = logging.getLogger(__name__)

__all__ = ["OutboxRelay", "append", "notify_channel"]

_INSERT = """
INSERT INTO outbox (event_id, event_type, event_key, payload_type, payload, traceparent)
VALUES (%s, %s, %s, %s, %s, %s)
"""
# Delivered at commit, to the relay LISTENing for this schema.
_NOTIFY = "SELECT pg_notify(current_schema() || '_outbox', '')"


def notify_channel(schema: str) -> str:
    """Return the LISTEN/NOTIFY channel that wakes the relay of ``schema``."""
    return f"{schema}_outbox"


async def append(
    conn: AsyncConnection[Any],
    event_type: str,
    key: str,
    payload: Message,
    *,
    event_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Record an event in the caller's transaction; return its id.

    :param conn: a connection of the service's pool, inside the transaction making the
        change (its ``search_path`` selects the service's outbox).
    :param event_type: what happened, lower-case dotted, e.g. ``space.started``.
    :param key: the resource it happened to, e.g. ``spaces/abc``.
    :param payload: the event message (its full type name travels with it).
    :param event_id: a given id (e.g. derived from an idempotency key); new by default.
    """
    event_id = event_id or uuid.uuid4()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    await conn.execute(
        _INSERT,
        (
            event_id,
            event_type,
            key,
            payload.DESCRIPTOR.full_name,
            payload.SerializeToString(),
            carrier.get("traceparent"),
        ),
    )
    await conn.execute(_NOTIFY)
    return event_id


class OutboxRelay:
    """Moves a service's outbox rows to its Redis stream (see the module docs).

    :param url: libpq URI or DSN; the relay keeps one connection of its own.
    :param schema: the service's schema (holding ``outbox``).
    :param redis: client for the stream.
    :param service: service name; the stream is ``spaces:events:<service>``.
    :param batch_size: rows sequenced and sent per round.
    :param poll_interval_s: longest wait between rounds when no NOTIFY arrives.
    :param max_len: approximate cap on the stream's length (oldest entries trimmed);
        ``None`` keeps everything.
    :param retry_interval_s: pause after an error, and between tries for the lock.
    """

    def __init__(
        self,
        url: str,
        schema: str,
        redis: redis.asyncio.Redis,
        service: str,
        *,
        batch_size: int = 500,
        poll_interval_s: float = 0.1,
        max_len: int | None = 1_000_000,
        retry_interval_s: float = 1.0,
    ) -> None:
        self._url = url
        self._schema = schema
        self._redis = redis
        self.stream = stream_name(service)
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._max_len = max_len
        self._retry_interval_s = retry_interval_s
        self._lock_key = f"spaces.outbox.{schema}"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the relay in a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"outbox relay {self._schema}")

    async def stop(self) -> None:
        """Cancel the relay and wait for it; rows in flight are re-sent by the next relay."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None

    async def run(self) -> None:
        """Relay until cancelled, reconnecting after errors."""
        while True:
            try:
                async with await AsyncConnection.connect(self._url, autocommit=True) as conn:
                    await self._serve(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.exception("outbox relay for %s failed; restarting", self._schema)
                await asyncio.sleep(self._retry_interval_s)

    async def _serve(self, conn: AsyncConnection[TupleRow]) -> None:
        ident = schema_identifier(self._schema)
        await conn.execute(sql.SQL("SET search_path TO {}").format(ident))
        await conn.execute(
            sql.SQL("LISTEN {}").format(sql.Identifier(notify_channel(self._schema)))
        )
        while not await self._try_lock(conn):
            await asyncio.sleep(self._retry_interval_s)
        logger.info("outbox relay for %s is active", self._schema)
        while True:
            while await self.relay_batch(conn) >= self._batch_size:
                reraise_if_cancelling()
            # redis-py's pipeline can swallow a cancel and return normally: look again.
            reraise_if_cancelling()
            # Sleep until a commit announces new rows, or the poll interval passes (a
            # notification can be missed while the connection was busy).
            async for _ in conn.notifies(timeout=self._poll_interval_s, stop_after=1):
                pass

    async def _try_lock(self, conn: AsyncConnection[TupleRow]) -> bool:
        cursor = await conn.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self._lock_key,)
        )
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def relay_batch(self, conn: AsyncConnection[TupleRow]) -> int:
        """Sequence, send and delete up to one batch; return how many rows were sent.

        :param conn: an autocommit connection with ``search_path`` on the schema, holding
            the relay lock.
        """
        await self._sequence(conn)
        rows = await self._sequenced(conn)
        if not rows:
            return 0
        await self._publish(rows)
        await self._forget(conn, rows[-1][0])
        return len(rows)

    async def _sequence(self, conn: AsyncConnection[TupleRow]) -> None:
        async with conn.transaction():
            cursor = await conn.execute("SELECT last_seq FROM outbox_relay_state FOR UPDATE")
            state = await cursor.fetchone()
            if state is None:
                raise RuntimeError(f"{self._schema}.outbox_relay_state is empty")
            cursor = await conn.execute(
                "SELECT id FROM outbox WHERE relay_seq IS NULL ORDER BY id LIMIT %s FOR UPDATE",
                (self._batch_size,),
            )
            ids = [row[0] for row in await cursor.fetchall()]
            if not ids:
                return
            last_seq: int = state[0]
            await conn.execute(
                "UPDATE outbox SET relay_seq = %s + batch.n"
                " FROM unnest(%s::bigint[]) WITH ORDINALITY AS batch(id, n)"
                " WHERE outbox.id = batch.id",
                (last_seq, ids),
            )
            await conn.execute(
                "UPDATE outbox_relay_state SET last_seq = %s", (last_seq + len(ids),)
            )

    async def _sequenced(self, conn: AsyncConnection[TupleRow]) -> list[tuple[Any, ...]]:
        cursor = await conn.execute(
            "SELECT relay_seq, event_id, event_type, event_key, payload_type, payload,"
            " traceparent, created_at FROM outbox WHERE relay_seq IS NOT NULL"
            " ORDER BY relay_seq LIMIT %s",
            (self._batch_size,),
        )
        return list(await cursor.fetchall())

    async def _publish(self, rows: Sequence[tuple[Any, ...]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for seq, event_id, event_type, key, payload_type, payload, traceparent, created in rows:
            fields: dict[str, str | bytes] = {
                "id": str(event_id),
                "type": event_type,
                "key": key,
                "ts": _timestamp(created),
                "payload_type": payload_type,
                "data": bytes(payload),
            }
            if traceparent:
                fields["traceparent"] = traceparent
            pipe.xadd(
                self.stream,
                fields,  # type: ignore[arg-type]
                id=f"{seq}-1",
                maxlen=self._max_len,
                approximate=True,
            )
        results = await pipe.execute(raise_on_error=False)
        for (seq, *_), result in zip(rows, results, strict=True):
            if isinstance(result, ResponseError) and "equal or smaller" in str(result):
                # Sent before a crash (or by a relay that lost its lock): already delivered.
                logger.info("%s: event %d was already in %s", self._schema, seq, self.stream)
            elif isinstance(result, Exception):
                raise result

    async def _forget(self, conn: AsyncConnection[TupleRow], up_to_seq: int) -> None:
        await conn.execute(
            "DELETE FROM outbox WHERE relay_seq IS NOT NULL AND relay_seq <= %s", (up_to_seq,)
        )


def _timestamp(created: datetime) -> str:
    return created.isoformat()
