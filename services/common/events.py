"""Reading the event streams services publish through their outbox.

Each service's events are one Redis stream, ``spaces:events:<service>``, whose entries carry
the fields written by :class:`services.common.outbox.OutboxRelay`. A consumer reads with a
consumer group (:class:`StreamConsumer`): every group sees every event; within a group each
event goes to one consumer and stays pending until acknowledged, and entries a crashed
consumer left pending are claimed by the others after ``claim_idle_ms``. Delivery is at
least once, so handlers must be idempotent (the event id is unique); an event that failed is
retried after later ones, so ordering holds only among successful deliveries.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis.asyncio
from google.protobuf.message import Message
from opentelemetry import propagate, trace
from redis.exceptions import ResponseError

from services.common import context
from services.common.tasks import reraise_if_cancelling, stop_tasks

logger = logging.getLogger(__name__)

__all__ = [
    "STREAM_PREFIX",
    "EventHandler",
    "StreamConsumer",
    "StreamEvent",
    "publish_event",
    "stream_name",
]

STREAM_PREFIX = "spaces:events:"
M = TypeVar("M", bound=Message)
_tracer = trace.get_tracer(__name__)


def stream_name(service: str) -> str:
    """Return the stream a service's events go to: ``spaces:events:<service>``."""
    return STREAM_PREFIX + service


async def publish_event(
    client: redis.asyncio.Redis,
    service: str,
    event_type: str,
    key: str,
    payload: Message,
    *,
    event_id: str,
    max_len: int = 1_000_000,
) -> None:
    """Append an event to a service's stream directly, for a service without a database
    (media): the same fields the outbox relay writes, with an id the caller derives from
    the event's subject so that a repeated publish is deduplicated by consumers.
    """
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    fields: dict[str, str | bytes] = {
        "id": event_id,
        "type": event_type,
        "key": key,
        "ts": datetime.now().astimezone().isoformat(),
        "payload_type": payload.DESCRIPTOR.full_name,
        "data": payload.SerializeToString(),
    }
    if "traceparent" in carrier:
        fields["traceparent"] = carrier["traceparent"]
    await client.xadd(
        stream_name(service),
        fields,  # type: ignore[arg-type]
        maxlen=max_len,
        approximate=True,
    )


@dataclass(frozen=True)
class StreamEvent:
    """One event read from a stream.

    :ivar stream_id: the entry id, ``<seq>-1``; ``seq`` counts the service's events.
    :ivar event_id: unique id of the event (a UUID); use it to deduplicate.
    :ivar type: what happened, e.g. ``space.started``.
    :ivar key: what it happened to, e.g. ``spaces/abc``.
    :ivar ts: when the change was committed.
    :ivar payload_type: full name of the payload's message type.
    :ivar data: the serialized payload.
    :ivar traceparent: W3C trace context of the transaction that wrote it, if traced.
    """

    stream_id: str
    event_id: str
    type: str
    key: str
    ts: datetime
    payload_type: str
    data: bytes
    traceparent: str | None = None

    @classmethod
    def from_entry(cls, stream_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEvent:
        """Build an event from a raw stream entry."""

        def text(name: bytes) -> str:
            return fields[name].decode()

        return cls(
            stream_id=stream_id.decode() if isinstance(stream_id, bytes) else stream_id,
            event_id=text(b"id"),
            type=text(b"type"),
            key=text(b"key"),
            ts=datetime.fromisoformat(text(b"ts")),
            payload_type=text(b"payload_type"),
            data=fields[b"data"],
            traceparent=fields[b"traceparent"].decode() if b"traceparent" in fields else None,
        )

    @property
    def seq(self) -> int:
        """Position of the event among its service's events."""
        return int(self.stream_id.split("-", 1)[0])

    def unpack(self, message_type: builtins.type[M]) -> M:
        """Parse the payload as ``message_type``.

        :raises TypeError: the payload is of another type.
        """
        expected = message_type.DESCRIPTOR.full_name
        if self.payload_type != expected:
            raise TypeError(f"event {self.event_id} holds {self.payload_type}, not {expected}")
        message = message_type()
        message.ParseFromString(self.data)
        return message


EventHandler = Callable[[StreamEvent], Awaitable[None]]


class StreamConsumer:
    """Feeds the events of one stream to a handler as a member of a consumer group.

    :param redis: client (``decode_responses=False``).
    :param stream: the stream, e.g. ``stream_name("rooms")``.
    :param group: the consumer group, typically the consuming service (``notify``).
    :param consumer: this process's name in the group (e.g. the pod name); must be stable
        across restarts for its own pending entries to come back to it quickly.
    :param handler: called once per event; an exception leaves the event pending for retry.
    :param batch_size: most entries read at once.
    :param block_ms: how long one read waits for new entries.
    :param claim_idle_ms: pending entries idle this long are taken over (and retried).
    :param start_id: where a new group starts: ``"0"`` = everything retained, ``"$"`` = new only.
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        stream: str,
        group: str,
        consumer: str,
        handler: EventHandler,
        *,
        batch_size: int = 100,
        block_ms: int = 2000,
        claim_idle_ms: int = 30_000,
        start_id: str = "0",
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._handler = handler
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._start_id = start_id
        self._group_ready = False
        self._task: asyncio.Task[None] | None = None

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            await self._redis.xgroup_create(
                self._stream, self._group, self._start_id, mkstream=True
            )
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    async def poll(self, *, block: bool = True) -> int:
        """Handle stale pending entries, then new ones; return how many were handled.

        :param block: wait up to ``block_ms`` for new entries when there are none.
        """
        if not self._group_ready:
            await self.ensure_group()
        handled = await self._handle(await self._claim_stale())
        response = await self._redis.xreadgroup(
            self._group,
            self._consumer,
            {self._stream: ">"},
            count=self._batch_size,
            block=self._block_ms if block and not handled else None,
        )
        streams: list[Any] = list(response or [])
        for _stream, entries in streams:
            handled += await self._handle(entries)
        return handled

    async def _claim_stale(self) -> list[Any]:
        response = await self._redis.xautoclaim(
            self._stream,
            self._group,
            self._consumer,
            min_idle_time=self._claim_idle_ms,
            start_id="0-0",
            count=self._batch_size,
        )
        entries: list[Any] = response[1] if response else []
        return entries

    async def _handle(self, entries: Sequence[Any]) -> int:
        handled = 0
        for stream_id, fields in entries:
            if not fields:
                continue  # trimmed away while pending
            event = StreamEvent.from_entry(stream_id, fields)
            if await self._deliver(event):
                await self._redis.xack(self._stream, self._group, stream_id)
                handled += 1
        return handled

    async def _deliver(self, event: StreamEvent) -> bool:
        parent = propagate.extract({"traceparent": event.traceparent} if event.traceparent else {})
        with (
            context.bind_call(request_id=event.event_id, timeout=None),
            _tracer.start_as_current_span(f"consume {event.type}", context=parent),
        ):
            try:
                await self._handler(event)
            except Exception:
                logger.exception(
                    "handling %s %s (%s) failed; it stays pending for a retry",
                    event.type,
                    event.event_id,
                    event.stream_id,
                )
                return False
        return True

    async def run(self) -> None:
        """Consume until cancelled, riding out Redis errors with a pause."""
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.exception("reading %s failed; retrying", self._stream)
                self._group_ready = False
                await asyncio.sleep(1.0)

    def start(self) -> None:
        """Run :meth:`run` in a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"consume {self._stream}")

    async def stop(self) -> None:
        """Cancel the background task and wait for it."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
