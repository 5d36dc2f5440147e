"""How live events are laid out in PostgreSQL, in Redis and in memory.

A stored event is split in two: the *body* (the serialized ``SpaceEvent`` with sequence,
resume token and event time cleared, i.e. only its ``oneof`` payload) and the *header*
fields, kept in columns. Protobuf fields are serialized in field-number order and the
header's fields (1-3) come before the payload's (10+), so ``header bytes + body`` is the
canonical serialization of the whole event: every replica, whether it got the event from
Redis or rebuilt it from PostgreSQL, produces byte-identical events without parsing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from spaces.rooms.v1 import rooms_events_pb2

from services.rooms.live.tokens import ResumeTokens

logger = logging.getLogger(__name__)

__all__ = [
    "EPHEMERAL_KINDS",
    "EncodedEvent",
    "SpaceEvent",
    "assemble",
    "event_kind",
    "split_body",
    "stream_key",
    "utc_now",
]

SpaceEvent = rooms_events_pb2.SpaceEvent

# Not replayed on resume (see SpaceEvent in rooms_events.proto): stale the moment they
# are sent.
EPHEMERAL_KINDS = frozenset({"reactions", "speaking_levels"})

_STREAM_PREFIX = "spaces:rooms:live:"


def stream_key(space_id: str) -> str:
    """Return the Redis stream carrying ``space_id``'s events to every replica."""
    return f"{_STREAM_PREFIX}{space_id}"


def utc_now() -> datetime:
    """Return the current time in UTC, at the microsecond precision PostgreSQL keeps."""
    return datetime.now(UTC)


def event_kind(event: rooms_events_pb2.SpaceEvent) -> str:
    """Return the name of the ``oneof event`` field set in ``event`` ("" when none)."""
    return event.WhichOneof("event") or ""


def split_body(event: rooms_events_pb2.SpaceEvent) -> bytes:
    """Return ``event`` serialized without its header fields (sequence, token, time)."""
    body = rooms_events_pb2.SpaceEvent()
    body.CopyFrom(event)
    body.ClearField("sequence")
    body.ClearField("resume_token")
    body.ClearField("event_time")
    return body.SerializeToString()


def assemble(
    tokens: ResumeTokens, space_id: str, seq: int, event_time: datetime, body: bytes
) -> bytes:
    """Return the full serialized event: header fields followed by ``body``."""
    header = rooms_events_pb2.SpaceEvent(sequence=seq, resume_token=tokens.encode(space_id, seq))
    header.event_time.FromDatetime(event_time)
    return header.SerializeToString() + body


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """One event as the hub hands it to every local watcher: decoded and encoded once.

    :ivar seq: its sequence number.
    :ivar data: its serialization.
    :ivar event: the parsed event; shared by all watchers, so never modified.
    """

    seq: int
    data: bytes
    event: rooms_events_pb2.SpaceEvent

    @classmethod
    def from_bytes(cls, seq: int, data: bytes) -> EncodedEvent:
        """Parse ``data`` (a full serialized event with sequence ``seq``)."""
        return cls(seq, data, rooms_events_pb2.SpaceEvent.FromString(data))

    @property
    def kind(self) -> str:
        """The ``oneof event`` field set."""
        return event_kind(self.event)

    @property
    def ephemeral(self) -> bool:
        """Reactions and speaking levels: delivered live, never replayed."""
        return self.kind in EPHEMERAL_KINDS
