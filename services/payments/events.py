"""Rooms' events, consumed into payments' Space projection and their money effects.

payments never reads rooms' tables: what it needs of a Space (host, state, scheduled
start) comes from rooms' outbox events on ``spaces:events:rooms`` (consumer group
``payments``). Delivery is at least once and possibly out of order, so:

* the projection only moves forward (a late "scheduled" cannot undo "live");
* the effects (refund every ticket of a canceled Space, settle an ended one) are
  idempotent and resumable, and the event is recorded as processed only after them, so
  a crash in the middle redelivers it and the effect picks up where it stopped;
* an event already recorded is skipped (exactly-once effect).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from google.protobuf import timestamp_pb2
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from services.common.errors import FailedPrecondition
from services.common.events import StreamEvent
from services.payments.domain import SpaceState
from services.payments.flows import Payments

logger = logging.getLogger(__name__)

__all__ = ["ROOMS_STREAM_GROUP", "RoomsEventHandler"]

ROOMS_STREAM_GROUP = "payments"


def _time(stamp: timestamp_pb2.Timestamp, present: bool) -> dt.datetime | None:
    return stamp.ToDatetime(tzinfo=dt.UTC) if present else None


class RoomsEventHandler:
    """The :class:`~services.common.events.StreamConsumer` handler for rooms' events.

    :param payments: the use cases (refunds, settlement) and their store.
    :param refund_batch: tickets per refund batch.
    """

    def __init__(self, payments: Payments, *, refund_batch: int = 100) -> None:
        self._payments = payments
        self._store = payments.store
        self._refund_batch = refund_batch

    async def __call__(self, event: StreamEvent) -> None:
        """Apply one event (raising leaves it pending for a retry)."""
        event_id = uuid.UUID(event.event_id)
        if await self._store.event_processed(event_id):
            return
        name = event.payload_type
        if name == rooms_events.SpaceScheduledEvent.DESCRIPTOR.full_name:
            scheduled = event.unpack(rooms_events.SpaceScheduledEvent)
            await self._store.project_space(
                scheduled.space_id,
                scheduled.host_id,
                SpaceState.SCHEDULED,
                _time(scheduled.scheduled_start_time, scheduled.HasField("scheduled_start_time")),
            )
        elif name == rooms_events.SpaceRescheduledEvent.DESCRIPTOR.full_name:
            moved = event.unpack(rooms_events.SpaceRescheduledEvent)
            await self._store.project_space(
                moved.space_id,
                moved.host_id,
                SpaceState.SCHEDULED,
                _time(moved.new_scheduled_start_time, moved.HasField("new_scheduled_start_time")),
                reschedule=True,
            )
        elif name == rooms_events.SpaceStartedEvent.DESCRIPTOR.full_name:
            started = event.unpack(rooms_events.SpaceStartedEvent)
            await self._store.project_space(
                started.space_id, started.host_id, SpaceState.LIVE, None
            )
        elif name == rooms_events.SpaceEndedEvent.DESCRIPTOR.full_name:
            ended = event.unpack(rooms_events.SpaceEndedEvent)
            state = await self._store.project_space(
                ended.space_id, ended.host_id, SpaceState.ENDED, None
            )
            if state is not SpaceState.ENDED:
                logger.warning("%s ended after it was %s; not settling", ended.space_id, state)
                await self._store.mark_processed(event_id, event.type)
                return
            try:
                settlement = await self._payments.settle(ended.space_id)
            except FailedPrecondition as refused:
                # A canceled offering has nothing to settle: its tickets were refunded.
                logger.info("not settling %s: %s", ended.space_id, refused.reason)
            else:
                logger.info("settled %s: %s", ended.space_id, settlement.amounts)
        elif name == rooms_events.SpaceCanceledEvent.DESCRIPTOR.full_name:
            canceled = event.unpack(rooms_events.SpaceCanceledEvent)
            state = await self._store.project_space(
                canceled.space_id, canceled.host_id, SpaceState.CANCELED, None
            )
            if state is SpaceState.CANCELED:
                await self._payments.refund_all_until_done(canceled.space_id, self._refund_batch)
            else:
                # A Space that went live cannot be canceled; its revenue follows its end.
                logger.warning(
                    "ignoring the cancellation of %s, which is %s", canceled.space_id, state
                )
        else:
            logger.debug("ignoring %s", event.type)
        await self._store.mark_processed(event_id, event.type)
