"""Turning the other services' events into notifications, reminders and fan-out jobs.

notify reads ``spaces:events:{rooms,identity,payments,media}`` in the consumer group
``notify`` (:class:`services.common.events.StreamConsumer`): each event goes to one replica
and stays pending until handled, and a crashed replica's pending events are taken over.
Delivery is at least once; every handler runs in :meth:`PostgresNotifyStore.event_transaction`,
which records the event id in the same transaction as the effect, so a second delivery does
nothing. Handlers dispatch on the payload type (not the event type string), so a renamed
event type cannot silently break notify.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
from spaces.identity.v1 import identity_events_pb2 as identity_events
from spaces.media.v1 import media_events_pb2 as media_events
from spaces.notify.v1 import notify_resources_pb2 as resources_pb
from spaces.payments.v1 import payments_events_pb2 as payments_events
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_pb

from services.common.events import StreamConsumer, StreamEvent, stream_name
from services.notify import metrics
from services.notify.domain import (
    Draft,
    fanout_draft,
    reminder_fire_time,
    space_id_of,
    user_id_of,
)
from services.notify.live import LiveHub
from services.notify.store import CreatedNotification, EventTx, PostgresNotifyStore

logger = logging.getLogger(__name__)

__all__ = ["CONSUMER_GROUP", "STREAMS", "EventHandler", "build_consumers"]

CONSUMER_GROUP = "notify"
STREAMS = ("rooms", "identity", "payments", "media")
K = resources_pb.NotificationKind
R = resources_pb.ReminderKind

NameLookup = Callable[[str], Awaitable[str]]
_Handler = Callable[[EventTx, StreamEvent, str], Awaitable[list[Draft]]]


async def _no_name(user_id: str) -> str:
    return ""


class EventHandler:
    """Applies one event.

    :param store: storage.
    :param hub: live delivery.
    :param reminder_lead: how long before a start subscribers are reminded.
    :param display_name: looks up a user's display name for titles ("" when unknown).
    """

    def __init__(
        self,
        store: PostgresNotifyStore,
        hub: LiveHub,
        *,
        reminder_lead: dt.timedelta,
        display_name: NameLookup = _no_name,
    ) -> None:
        self._store = store
        self._hub = hub
        self._lead = reminder_lead
        self._name = display_name
        self._handlers: dict[str, _Handler] = {
            _type(rooms_events.SpaceStartedEvent): self._space_started,
            _type(rooms_events.SpaceScheduledEvent): self._space_scheduled,
            _type(rooms_events.SpaceRescheduledEvent): self._space_rescheduled,
            _type(rooms_events.SpaceCanceledEvent): self._space_canceled,
            _type(rooms_events.SpaceEndedEvent): self._space_ended,
            _type(rooms_events.SpeakRequestedEvent): self._speak_requested,
            _type(rooms_events.SpeakInvitationEvent): self._speak_invitation,
            _type(rooms_events.CoHostInvitationEvent): self._co_host_invitation,
            _type(rooms_events.SpaceInvitationEvent): self._space_invitation,
            _type(rooms_events.ReminderSetEvent): self._reminder_set,
            _type(rooms_events.ReminderDeletedEvent): self._reminder_deleted,
            _type(identity_events.UserBlockedEvent): self._user_blocked,
            _type(identity_events.UserUnblockedEvent): self._user_unblocked,
            _type(media_events.RecordingReadyEvent): self._recording_ready,
            _type(payments_events.TicketPurchasedEvent): self._ticket_purchased,
            _type(payments_events.TicketRefundedEvent): self._ticket_refunded,
            _type(payments_events.TipSentEvent): self._tip_sent,
            _type(payments_events.PayoutPaidEvent): self._payout_paid,
            _type(payments_events.PayoutFailedEvent): self._payout_failed,
        }

    async def __call__(self, event: StreamEvent) -> None:
        """Handle ``event`` exactly once in effect."""
        handler = self._handlers.get(event.payload_type)
        if handler is None:
            metrics.EVENTS.labels("ignored").inc()
            return
        # Names are looked up before the transaction: a slow identity must not hold locks.
        prepared = await self._prepare(event)
        created: list[CreatedNotification] = []
        async with self._store.event_transaction(uuid.UUID(event.event_id), event.type) as tx:
            if tx is None:
                metrics.EVENTS.labels("duplicate").inc()
                logger.info("event %s was already handled", event.event_id)
                return
            drafts = await handler(tx, event, prepared)
            created = await tx.create(drafts)
        metrics.EVENTS.labels("applied").inc()
        metrics.NOTIFICATIONS_CREATED.labels("event").inc(len(created))
        try:
            await self._hub.publish_new(created)
        except Exception:
            logger.exception("publishing live notifications of %s failed", event.event_id)

    async def _prepare(self, event: StreamEvent) -> str:
        """The display name of the event's actor, when its wording needs one."""
        actor = ""
        if event.payload_type in (
            _type(rooms_events.SpaceStartedEvent),
            _type(rooms_events.SpaceScheduledEvent),
        ):
            message: Any = event.unpack(
                rooms_events.SpaceStartedEvent
                if event.payload_type == _type(rooms_events.SpaceStartedEvent)
                else rooms_events.SpaceScheduledEvent
            )
            actor = message.host_id
        elif event.payload_type == _type(payments_events.TipSentEvent):
            actor = user_id_of(event.unpack(payments_events.TipSentEvent).tip.sender)
        elif event.payload_type == _type(rooms_events.SpeakRequestedEvent):
            actor = event.unpack(rooms_events.SpeakRequestedEvent).requester_id
        return await self._name(actor) if actor else ""

    # -- rooms ---------------------------------------------------------------------------

    async def _space_started(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        started = event.unpack(rooms_events.SpaceStartedEvent)
        await tx.remember_space(started.space_id, started.host_id, started.title, None)
        template = fanout_draft(
            K.NOTIFICATION_KIND_SPACE_STARTED,
            started.host_id,
            started.space_id,
            started.title,
            name,
        )
        if started.visibility != rooms_pb.SPACE_VISIBILITY_INVITED_ONLY:
            await tx.create_fanout_job(uuid.UUID(event.event_id), template, started.visibility)
        # People waiting for a reminder hear now if the Space started early.
        await tx.fire_space_reminders_now(started.space_id)
        return []

    async def _space_scheduled(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        scheduled = event.unpack(rooms_events.SpaceScheduledEvent)
        start = scheduled.scheduled_start_time.ToDatetime(dt.UTC)
        await tx.remember_space(scheduled.space_id, scheduled.host_id, scheduled.title, start)
        template = fanout_draft(
            K.NOTIFICATION_KIND_SPACE_SCHEDULED,
            scheduled.host_id,
            scheduled.space_id,
            scheduled.title,
            name,
        )
        if scheduled.visibility != rooms_pb.SPACE_VISIBILITY_INVITED_ONLY:
            await tx.create_fanout_job(uuid.UUID(event.event_id), template, scheduled.visibility)
        now = dt.datetime.now(dt.UTC)
        await tx.schedule_reminder(
            scheduled.space_id,
            scheduled.host_id,
            R.REMINDER_KIND_HOST,
            reminder_fire_time(R.REMINDER_KIND_HOST, start, self._lead, now),
        )
        return []

    async def _space_rescheduled(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        moved = event.unpack(rooms_events.SpaceRescheduledEvent)
        start = moved.new_scheduled_start_time.ToDatetime(dt.UTC)
        now = dt.datetime.now(dt.UTC)
        await tx.remember_space(moved.space_id, moved.host_id, "", start)
        for kind in (R.REMINDER_KIND_HOST, R.REMINDER_KIND_SUBSCRIBER):
            await tx.reschedule(
                moved.space_id, reminder_fire_time(kind, start, self._lead, now), kind
            )
        recipients = set(await tx.scheduled_reminder_users(moved.space_id))
        recipients |= set(await tx.ticket_holders(moved.space_id))
        info = await tx.space(moved.space_id)
        return [
            Draft(
                user_id=user,
                kind=K.NOTIFICATION_KIND_SPACE_RESCHEDULED,
                title="A Space you are waiting for moved",
                body=info[1] if info else "",
                actor_id=moved.host_id,
                space_id=moved.space_id,
                dedupe_key=f"rescheduled:{moved.space_id}:{start.isoformat()}",
            )
            for user in sorted(recipients - {moved.host_id})
        ]

    async def _space_canceled(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        canceled = event.unpack(rooms_events.SpaceCanceledEvent)
        recipients = set(await tx.scheduled_reminder_users(canceled.space_id))
        recipients |= set(await tx.ticket_holders(canceled.space_id))
        await tx.cancel_space_reminders(canceled.space_id)
        await tx.cancel_fanouts(canceled.space_id)
        info = await tx.space(canceled.space_id)
        return [
            Draft(
                user_id=user,
                kind=K.NOTIFICATION_KIND_SPACE_CANCELED,
                title="A Space you were waiting for was canceled",
                body=info[1] if info else "",
                actor_id=canceled.host_id,
                space_id=canceled.space_id,
                dedupe_key=f"canceled:{canceled.space_id}",
            )
            for user in sorted(recipients - {canceled.host_id})
        ]

    async def _space_ended(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        ended = event.unpack(rooms_events.SpaceEndedEvent)
        # "X is hosting" is pointless once it is over: stop a fan-out still running.
        await tx.cancel_fanouts(ended.space_id)
        return []

    async def _speak_requested(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        request = event.unpack(rooms_events.SpeakRequestedEvent)
        who = name or "A listener"
        return [
            Draft(
                user_id=moderator,
                kind=K.NOTIFICATION_KIND_SPEAK_REQUESTED,
                title=f"{who} asked to speak",
                actor_id=request.requester_id,
                space_id=request.space_id,
                dedupe_key=f"event:{event.event_id}",
            )
            for moderator in dict.fromkeys(request.moderator_ids)
            if moderator != request.requester_id
        ]

    async def _speak_invitation(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        invitation = event.unpack(rooms_events.SpeakInvitationEvent)
        return [
            Draft(
                user_id=invitation.invitee_id,
                kind=K.NOTIFICATION_KIND_SPEAK_INVITATION,
                title="You were invited to speak",
                actor_id=invitation.inviter_id,
                space_id=invitation.space_id,
                dedupe_key=f"event:{event.event_id}",
            )
        ]

    async def _co_host_invitation(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        invitation = event.unpack(rooms_events.CoHostInvitationEvent)
        return [
            Draft(
                user_id=invitation.invitee_id,
                kind=K.NOTIFICATION_KIND_CO_HOST_INVITATION,
                title="You were invited to co-host",
                actor_id=invitation.inviter_id,
                space_id=invitation.space_id,
                dedupe_key=f"event:{event.event_id}",
            )
        ]

    async def _space_invitation(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        invitation = event.unpack(rooms_events.SpaceInvitationEvent)
        return [
            Draft(
                user_id=invitee,
                kind=K.NOTIFICATION_KIND_SPACE_INVITATION,
                title="You were invited to a Space",
                body=invitation.title,
                actor_id=invitation.inviter_id,
                space_id=invitation.space_id,
                dedupe_key=f"invited:{invitation.space_id}",
            )
            for invitee in dict.fromkeys(invitation.invitee_ids)
        ]

    async def _reminder_set(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        reminder = event.unpack(rooms_events.ReminderSetEvent)
        start = reminder.scheduled_start_time.ToDatetime(dt.UTC)
        fire = reminder_fire_time(
            R.REMINDER_KIND_SUBSCRIBER, start, self._lead, dt.datetime.now(dt.UTC)
        )
        await tx.schedule_reminder(
            reminder.space_id, reminder.user_id, R.REMINDER_KIND_SUBSCRIBER, fire
        )
        return []

    async def _reminder_deleted(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        deleted = event.unpack(rooms_events.ReminderDeletedEvent)
        await tx.cancel_reminder(deleted.space_id, deleted.user_id)
        return []

    # -- identity --------------------------------------------------------------------------

    async def _user_blocked(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        block = event.unpack(identity_events.UserBlockedEvent)
        await tx.set_block(block.blocker_id, block.blocked_id, True)
        return []

    async def _user_unblocked(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        block = event.unpack(identity_events.UserUnblockedEvent)
        await tx.set_block(block.blocker_id, block.blocked_id, False)
        return []

    # -- media -----------------------------------------------------------------------------

    async def _recording_ready(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        recording = event.unpack(media_events.RecordingReadyEvent).recording
        space_id = space_id_of(recording.space or recording.name)
        info = await tx.space(space_id)
        recipients = set(await tx.ticket_holders(space_id))
        if info is not None:
            recipients.add(info[0])
        return [
            Draft(
                user_id=user,
                kind=K.NOTIFICATION_KIND_RECORDING_AVAILABLE,
                title="A Space's recording is ready",
                body=info[1] if info else "",
                space_id=space_id,
                subject=recording.name,
                dedupe_key=f"recording:{recording.name}",
            )
            for user in sorted(recipients)
        ]

    # -- payments --------------------------------------------------------------------------

    async def _ticket_purchased(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        purchase = event.unpack(payments_events.TicketPurchasedEvent)
        ticket = purchase.ticket
        buyer = user_id_of(ticket.owner)
        space_id = space_id_of(ticket.name)
        await tx.set_ticket(space_id, ticket.name, buyer, True)
        price = _money(ticket.price.amount_minor, ticket.price.currency_code)
        drafts = [
            Draft(
                user_id=buyer,
                kind=K.NOTIFICATION_KIND_TICKET_PURCHASED,
                title="Your ticket is confirmed",
                body=price,
                space_id=space_id,
                subject=ticket.name,
                dedupe_key=f"ticket:{ticket.name}:buyer",
            )
        ]
        if purchase.host_id and purchase.host_id != buyer:
            drafts.append(
                Draft(
                    user_id=purchase.host_id,
                    kind=K.NOTIFICATION_KIND_TICKET_PURCHASED,
                    title="You sold a ticket",
                    body=price,
                    actor_id=buyer,
                    space_id=space_id,
                    subject=ticket.name,
                    dedupe_key=f"ticket:{ticket.name}:host",
                )
            )
        return drafts

    async def _ticket_refunded(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        refund = event.unpack(payments_events.TicketRefundedEvent)
        ticket = refund.ticket
        owner = user_id_of(ticket.owner)
        space_id = space_id_of(ticket.name)
        await tx.set_ticket(space_id, ticket.name, owner, False)
        return [
            Draft(
                user_id=owner,
                kind=K.NOTIFICATION_KIND_TICKET_REFUNDED,
                title="Your ticket was refunded",
                body=refund.note or _money(ticket.price.amount_minor, ticket.price.currency_code),
                space_id=space_id,
                subject=ticket.name,
                dedupe_key=f"refund:{ticket.name}",
            )
        ]

    async def _tip_sent(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        tip = event.unpack(payments_events.TipSentEvent).tip
        who = name or "Someone"
        amount = _money(tip.amount.amount_minor, tip.amount.currency_code)
        return [
            Draft(
                user_id=user_id_of(tip.recipient),
                kind=K.NOTIFICATION_KIND_TIP_RECEIVED,
                title=f"{who} tipped you {amount}",
                body=tip.message,
                actor_id=user_id_of(tip.sender),
                space_id=space_id_of(tip.name),
                subject=tip.name,
                dedupe_key=f"tip:{tip.name}",
            )
        ]

    async def _payout_paid(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        payout = event.unpack(payments_events.PayoutPaidEvent).payout
        return [self._payout(payout, K.NOTIFICATION_KIND_PAYOUT_PAID, "Your payout was paid")]

    async def _payout_failed(self, tx: EventTx, event: StreamEvent, name: str) -> list[Draft]:
        payout = event.unpack(payments_events.PayoutFailedEvent).payout
        return [
            self._payout(
                payout,
                K.NOTIFICATION_KIND_PAYOUT_FAILED,
                "Your payout failed; the amount is back in your balance",
            )
        ]

    @staticmethod
    def _payout(payout: Any, kind: int, title: str) -> Draft:
        user = payout.name.split("/")[1] if payout.name.startswith("users/") else ""
        return Draft(
            user_id=user,
            kind=kind,
            title=title,
            body=_money(payout.amount.amount_minor, payout.amount.currency_code),
            subject=payout.name,
            dedupe_key=f"payout:{payout.name}:{kind}",
        )


def _type(message: Any) -> str:
    return str(message.DESCRIPTOR.full_name)


def _money(amount_minor: int, currency: str) -> str:
    return f"{amount_minor / 100:.2f} {currency}".strip()


def build_consumers(
    redis: redis.asyncio.Redis,
    handler: EventHandler,
    *,
    consumer_name: str,
    claim_idle_ms: int,
    block_ms: int,
) -> list[StreamConsumer]:
    """One consumer per stream notify reads, all in group ``notify``."""
    return [
        StreamConsumer(
            redis,
            stream_name(service),
            CONSUMER_GROUP,
            consumer_name,
            handler,
            claim_idle_ms=claim_idle_ms,
            block_ms=block_ms,
        )
        for service in STREAMS
    ]
